"""Session lifecycle commands: list, info, attach, persist, shutdown, kill, clean, resume."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from coi.cli.app import CoiCommand
from coi.cli.completion import complete_containers, complete_sessions
from coi.cli.context import daemon
from coi.cli.options import stacked
from coi.cli.render import check_format, confirm, echo_json, human_size, local_time

if TYPE_CHECKING:
    from coi.backend.client import IncusClient
    from coi.sessions.cleanup import CleanPlan
    from coi.sessions.control import Outcome
    from coi.sessions.inventory import ContainerInfo, SavedSession


def _state_dirs() -> dict[str, str]:
    from coi.tools.registry import all_tools

    return {name: t.state_dir for name, t in all_tools().items()}


def _sessions() -> list[SavedSession]:
    from coi.config.paths import coi_home
    from coi.sessions.inventory import saved_sessions

    return saved_sessions(coi_home(), _state_dirs())


# -- list ---------------------------------------------------------------------------------


def _container_json(c: ContainerInfo) -> dict[str, Any]:
    return {
        "name": c.name,
        "status": c.status,
        "created_at": c.created_at,
        "image": c.image,
        "persistent": c.persistent,
        # "" for none, as upstream gives (scripts test it as a string), never null.
        "ipv4": c.ipv4 or "",
        "workspace": c.workspace,
        "kind": c.kind,
        "alias": c.alias,
        "review": c.review,  # review mode: the review it works on ("" for none)
        "location": c.location,  # the cluster member it runs on ("" off a cluster)
        "ports": [p.as_json() for p in c.ports],
        "sockets": [{"host": h, "container": i} for h, i in c.sockets],
    }


def _session_json(s: SavedSession) -> dict[str, Any]:
    return {
        "id": s.id,
        "tool": s.tool,
        "saved_at": s.saved_at,
        "workspace": s.workspace,
        "container": s.container_name,
    }


def _print_container(c: ContainerInfo) -> None:
    click.echo(f"  {c.name} ({'persistent' if c.persistent else 'ephemeral'})")
    if c.alias:
        click.echo(f"    Alias: {c.alias}")
    click.echo(f"    Status: {c.status}")
    if c.kind == "spare":
        click.echo(
            "    Spare: booted, waits for the next session here (sandbox.running_spares)"
            if c.spare_ready
            else "    Spare: being made"
        )
    if c.location:
        click.echo(f"    Member: {c.location}")
    if c.ipv4:
        click.echo(f"    IPv4: {c.ipv4}")
    click.echo(f"    Created: {local_time(c.created_at)}")
    if c.image:
        click.echo(f"    Image: {c.image}")
    if c.workspace:
        click.echo(f"    Workspace: {c.workspace}")
    if c.review:
        click.echo(f"    Review: {c.review} (the agent works on a copy)")
    if c.ports:
        click.echo(f"    Ports: {', '.join(p.text() for p in c.ports)}")
    for host, inside in c.sockets:
        click.echo(f"    Socket: {host} -> {inside}")


@click.command(
    "list",
    cls=CoiCommand,
    examples="  coi list\n  coi list --all\n"
    "  coi list --format json | jq '.active_containers[].name'",
)
@click.option("--all", "all_", is_flag=True, help="Also list saved sessions.")
@click.option("--format", "fmt", default="text", metavar="FORMAT", help="text or json.")
def list_cmd(all_: bool, fmt: str) -> None:
    """List coi containers (and, with --all, saved sessions)."""
    from coi.sessions.inventory import containers

    check_format(fmt, ("text", "json"))
    sessions = cache(_sessions)  # read only if asked for (--all) or needed (old containers)
    _cfg, client = daemon()
    with client:
        active = containers(client, sessions)
    pending = _pending_reviews()
    if fmt == "json":
        out: dict[str, Any] = {"active_containers": [_container_json(c) for c in active]}
        if all_:
            out["saved_sessions"] = [_session_json(s) for s in sessions() if s.has_state]
        out["pending_reviews"] = pending
        echo_json(out)
        return
    click.echo("Active Containers:\n------------------")
    for c in active:
        _print_container(c)
    if not active:
        click.echo("  (none)")
    if pending:
        click.echo("\nPending Reviews:\n----------------")
        for r in pending:
            click.echo(f"  {r['id']} ({r['workspace']})")
        click.echo("  coi diff ID, coi apply ID or coi discard ID")
    if all_:
        click.echo("\nSaved Sessions:\n---------------")
        saved = [s for s in sessions() if s.has_state]
        for s in saved:
            click.echo(f"  {s.id} ({s.tool})")
            click.echo(f"    Saved: {s.saved_at}")
            if s.workspace:
                click.echo(f"    Workspace: {s.workspace}")
        if not saved:
            click.echo("  (none)")


def _pending_reviews() -> list[dict[str, Any]]:
    """The review copies waiting for `coi apply` or `coi discard` (a folder read, no daemon)."""
    from coi.config.paths import reviews_dir

    # Where there is no review at all (most machines), one look at the folder the reviews
    # live in instead of importing the review code (8 ms). A review is a folder (as
    # `all_reviews` reads them): the lock files `coi apply` leaves beside them are not.
    try:
        if not any(p.is_dir() and not p.is_symlink() for p in reviews_dir().iterdir()):
            return []
    except (FileNotFoundError, NotADirectoryError):
        return []
    from coi.review.copy import all_reviews

    return [
        {"id": r.id, "workspace": r.workspace, "created": r.created, "session": r.session}
        for r in all_reviews()
        if r.state == "pending"
    ]


# -- info ---------------------------------------------------------------------------------


def _dir_size(path: Path) -> int:
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _container_shown(name: str, sessions: list[SavedSession], fmt: str) -> bool:
    """`coi info NAME` of a container (by its name or alias): its facts, published ports
    and sockets, and its latest saved session. False: no such container."""
    from coi.errors import DaemonUnreachable
    from coi.sessions.inventory import find_container

    try:
        _cfg, client = daemon()
        with client:
            c = find_container(client, name)
    except DaemonUnreachable:
        return False  # then it is a session ID that is not there
    if c is None:
        return False
    mine = [s for s in sessions if s.container_name == c.name]
    latest = max(mine, key=lambda s: s.saved_at) if mine else None
    if fmt == "json":
        out = _container_json(c)
        out["session"] = _session_json(latest) if latest else None
        echo_json(out)
        return True
    click.echo("Container Information\n=====================\n")
    _print_container(c)
    if latest:
        click.echo(f"\nLatest session: {latest.id} ({latest.tool})")
        click.echo(f"Resume:         coi shell --resume={latest.id}")
    return True


@click.command(
    "info",
    cls=CoiCommand,
    examples="  coi info                 # the latest session\n  coi info 3f2a...-...\n"
    "  coi info web             # a container by its alias (or name): ports too\n"
    "  coi info web --format json",
)
@click.argument("session_id", required=False, shell_complete=complete_sessions)
@click.option("--format", "fmt", default="text", metavar="FORMAT", help="text or json.")
def info_cmd(session_id: str | None, fmt: str) -> None:
    """Show a saved session (default: the latest of all workspaces), or a container by its
    name or alias (`--name`, `coi alias`) with the ports it publishes."""
    from coi.config.paths import coi_home
    from coi.errors import NotFound, UsageError

    check_format(fmt, ("text", "json"))
    sessions = _sessions()
    if (
        session_id is not None
        and not any(s.id == session_id for s in sessions)
        and _container_shown(session_id, sessions, fmt)
    ):
        return
    if session_id is None:
        with_meta = [s for s in sessions if s.metadata]
        if not with_meta:
            raise UsageError("no sessions found (specify session ID or use 'coi list --all')")
        s = max(with_meta, key=lambda s: s.saved_at)
    else:
        found = [s for s in sessions if s.id == session_id]
        if not found:
            raise NotFound(
                f"session not found: {session_id}",
                resolution="List saved sessions with 'coi list --all'.",
            )
        s = found[0]
    if fmt == "json":
        echo_json({**_session_json(s), "has_state": s.has_state, "path": str(s.path)})
        return
    if s.metadata is None:
        click.echo("Warning: No metadata found", err=True)
    state = _state_dirs().get(s.tool, "")
    lines = ["Session Information", "===================", "", f"Session ID:     {s.id}"]
    lines.append(f"Tool:           {s.tool}")
    if s.container_name:
        lines.append(f"Container:      {s.container_name}")
    if s.workspace:
        lines.append(f"Workspace:      {s.workspace}")
    if s.metadata and s.metadata.saved_at:
        lines.append(f"Saved At:       {s.metadata.saved_at}")
    lines.append(f"Credentials:    {_credentials(s.tool)}")
    if s.has_state:
        what = f"{state} directory" if state else "metadata"
        lines.append(f"Session Data:   ✓ Present ({what})")
        if state:
            lines.append(f"Data Size:      {human_size(_dir_size(s.path / state))}")
    else:
        lines.append("Session Data:   ✗ Missing")
    home = str(Path.home())
    shown = str(s.path)
    if shown.startswith(home + "/") and str(coi_home()).startswith(home):
        shown = "~" + shown[len(home) :]
    lines += ["", f"Session Path:   {shown}", "", f"Resume:         coi shell --resume={s.id}"]
    click.echo("\n".join(lines))


def _credentials(tool_name: str) -> str:
    """What a session of this tool does with its credentials now (the current config)."""
    from coi.cli.context import load_settings
    from coi.credentials import plan
    from coi.errors import CoiError
    from coi.tools.registry import get_tool

    try:
        cfg = load_settings()
        local = not cfg.get_str("incus.remote")
        return plan(get_tool(tool_name), cfg, local=local, run_command=False).summary
    except CoiError as err:
        return f"unknown ({err.message})"


# -- attach -------------------------------------------------------------------------------


@click.command(
    "attach",
    cls=CoiCommand,
    examples="  coi attach\n  coi attach coi-abc12345-1\n  coi attach --slot 2\n"
    "  coi attach coi-abc12345-1 --bash",
)
@click.argument("name", required=False, shell_complete=complete_containers)
@click.option("--slot", type=int, default=None, help="Attach to this slot of the workspace.")
@click.option("-w", "--workspace", default=None, metavar="DIR", help="Workspace (with --slot).")
@click.option("--bash", "bash", is_flag=True, help="Open bash instead of the tmux session.")
@click.pass_context
def attach_cmd(
    ctx: click.Context, name: str | None, slot: int | None, workspace: str | None, bash: bool
) -> None:
    """Attach to a running session's tmux (or a bash in it)."""
    from coi.sessions import control

    cfg, client = daemon()
    with client:
        target = control.attach_target(client, name, slot=slot, workspace=workspace)
        if not target.name:
            if not target.running:
                click.echo("No active sessions")
                return
            click.echo("Active sessions:")
            for i, n in enumerate(target.running, 1):
                click.echo(f"  {i}. {n}")
            click.echo("\nUse: coi attach <container-name>")
            return
        name = target.name
        if target.slot:
            click.echo(f"Attaching to {name} (slot {slot})...", err=True)
        elif target.running:
            click.echo(f"Attaching to {name}...", err=True)
        code = control.attach(client, cfg, name, bash=bash, protect_log=_to_stderr)
    if code in (0, 130, 137, 143):
        return
    if not bash:
        click.echo(
            "\nNo tmux session found in container.\n"
            "The container is still running. To get a shell, use:\n"
            f"  coi attach {name} --bash",
            err=True,
        )
        return
    ctx.exit(code)


# -- persist, shutdown, kill: act on named containers or --all ----------------------------


def _select(
    client: IncusClient, names: tuple[str, ...], all_: bool, force: bool, verb: str, noun: str
) -> list[str] | None:
    """The containers to act on after the upstream-style listing and confirmation.

    None: nothing to do (already reported) or the user said no.
    """
    from coi.errors import UsageError
    from coi.sessions.inventory import containers

    if all_:
        found = [c.name for c in containers(client, with_state=False)]
        if not found:
            click.echo(f"No containers to {noun}")
            return None
        click.echo(f"Found {len(found)} container(s):")
        for n in found:
            click.echo(f"  - {n}")
        if not force and not confirm(f"\n{verb} all these containers?"):
            click.echo("Cancelled.")
            return None
        return found
    if not names:
        raise UsageError(
            "no container names provided - use 'coi list' to see active containers",
            resolution=f"Name the containers, or use --all to {noun} every coi container.",
        )
    if len(names) > 1 and not force and not confirm(f"{verb} {len(names)} container(s)?"):
        click.echo("Cancelled.")
        return None
    return list(names)


def _run_bulk(
    names: tuple[str, ...],
    all_: bool,
    force: bool,
    *,
    verb: str,
    noun: str,
    past: str,
    one: Callable[[IncusClient, str], bool],
) -> None:
    """Select (names or --all, with confirmation), act on each, report, fail if none worked."""
    from coi.errors import CoiError

    _cfg, client = daemon()
    with client:
        chosen = _select(client, names, all_, force, verb, noun)
        if chosen is None:
            return
        done = 0
        for n in chosen:
            try:
                done += one(client, n)
            except CoiError as err:
                click.echo(f"  Warning: {n}: {err}", err=True)
    if done:
        click.echo(f"\n{past} {done} container(s)")
        return
    click.echo(f"\nNo containers were {past.lower()}")
    if names:
        raise CoiError(f"failed to {noun} specified containers")


def _to_stderr(message: str) -> None:
    click.echo(message, err=True)


def _show(outcome: Outcome) -> bool:
    """Render what an action did; whether it acted."""
    for w in outcome.warnings:
        click.echo(f"  Warning: {w}", err=True)
    for step in outcome.steps:
        click.echo(f"  {step}")
    return outcome.done


_bulk_options = stacked(
    click.argument("names", nargs=-1, shell_complete=complete_containers),
    click.option("-a", "--all", "all_", is_flag=True, help="Every coi container."),
    click.option("-f", "--force", is_flag=True, help="Do not ask for confirmation."),
)


@click.command(
    "persist",
    cls=CoiCommand,
    examples="  coi persist coi-abc12345-1\n  coi persist --all --force",
)
@_bulk_options
def persist_cmd(names: tuple[str, ...], all_: bool, force: bool) -> None:
    """Keep ephemeral session containers after their session ends."""
    from coi.sessions import control

    sessions = _sessions()

    def one(client: IncusClient, n: str) -> bool:
        click.echo(f"Persisting container {n}...")
        return _show(control.persist(client, n, sessions))

    _run_bulk(names, all_, force, verb="Persist", noun="persist", past="Persisted", one=one)


@click.command(
    "shutdown",
    cls=CoiCommand,
    examples="  coi shutdown coi-abc12345-1\n  coi shutdown --all --force --timeout 10",
)
@_bulk_options
@click.option("--timeout", type=int, default=60, show_default=True, help="Seconds to wait.")
def shutdown_cmd(names: tuple[str, ...], all_: bool, force: bool, timeout: int) -> None:
    """Stop containers gracefully (force after --timeout), then delete them."""
    from coi.sessions import control

    def one(client: IncusClient, n: str) -> bool:
        click.echo(f"Shutting down container {n} (timeout: {timeout}s)...")
        return _show(control.shutdown(client, n, timeout=timeout, log=_to_stderr))

    _run_bulk(names, all_, force, verb="Shutdown", noun="shutdown", past="Shutdown", one=one)


@click.command(
    "kill",
    cls=CoiCommand,
    examples="  coi kill coi-abc12345-1\n  coi kill --all --force",
)
@_bulk_options
def kill_cmd(names: tuple[str, ...], all_: bool, force: bool) -> None:
    """Stop and delete containers at once (persistent ones too)."""
    from coi.sessions import control

    def one(client: IncusClient, n: str) -> bool:
        click.echo(f"Killing container {n}...")
        return _show(control.kill(client, n, log=_to_stderr))

    _run_bulk(names, all_, force, verb="Kill", noun="kill", past="Killed", one=one)


# -- resume (unfreeze) ----------------------------------------------------------------------


@click.command(
    "resume",
    cls=CoiCommand,
    examples="  coi resume                 # every paused coi container\n"
    "  coi resume coi-abc12345-1",
)
@click.argument("name", required=False, shell_complete=complete_containers)
def resume_cmd(name: str | None) -> None:
    """Resume containers the security monitor paused (frozen)."""
    from coi.sessions import control

    _cfg, client = daemon()
    with client:
        if name:
            for step in control.resume(client, name).steps:
                click.echo(step, err=True)
            return
        frozen = control.resume_frozen(client, log=_to_stderr)
        click.echo(
            f"Resumed {len(frozen)} container(s)" if frozen else "No frozen COI containers found",
            err=True,
        )


# -- clean --------------------------------------------------------------------------------


@click.command(
    "clean",
    cls=CoiCommand,
    examples="  coi clean --dry-run\n  coi clean --force\n  coi clean --all --force",
)
@click.option("-a", "--all", "all_", is_flag=True, help="Containers, saved sessions and orphans.")
@click.option("-f", "--force", is_flag=True, help="Do not ask for confirmation.")
@click.option("--sessions", is_flag=True, help="Delete saved session data (all of it).")
@click.option("--orphans", is_flag=True, help="Only orphaned resources (no containers).")
@click.option(
    "--reviews",
    is_flag=True,
    help="Also delete review copies, pending or applied (never without this flag).",
)
@click.option(
    "--workspace-caches",
    is_flag=True,
    help="Also delete your workspaces' caches on a remote server (the next session there "
    "uploads the whole workspace).",
)
@click.option("--dry-run", is_flag=True, help="Show what would be removed; change nothing.")
def clean_cmd(
    all_: bool,
    force: bool,
    sessions: bool,
    orphans: bool,
    reviews: bool,
    workspace_caches: bool,
    dry_run: bool,
) -> None:
    """Remove stopped sandboxes, orphaned resources and (with --sessions) saved sessions."""
    from coi.config.paths import coi_home
    from coi.sessions import cleanup

    all_sessions = _sessions()
    cfg, client = daemon()

    def ask(prompt: str) -> bool:
        if dry_run:
            return False
        if force or confirm(prompt):
            return True
        click.echo("Cancelled.")
        return False

    cleaned = 0
    found_any = False
    log = click.echo
    with client:
        if all_ or not (sessions or orphans):
            click.echo("Checking for stopped coi containers...")
            plan = cleanup.plan_containers(client, all_sessions)
            _report_containers(plan)
            found_any |= bool(plan.containers)
            if plan.containers and ask("\nDelete these containers?"):
                cleaned += cleanup.execute(client, plan, log)
        if all_ or sessions:
            click.echo("\nChecking for saved session data...")
            plan = cleanup.plan_sessions(all_sessions)
            if all_sessions:
                click.echo(f"Found {len(all_sessions)} session(s):")
                for s in all_sessions:
                    click.echo(f"  - {s.id} ({s.tool})")
            else:
                click.echo("  (no saved sessions found)")
            found_any |= bool(all_sessions)
            if all_sessions and ask("\nDelete all session data?"):
                cleaned += cleanup.execute(client, plan, log)
        click.echo("\nScanning for orphaned resources...")
        plan = cleanup.plan_orphans(client, cfg, coi_home(), all_sessions)
        _report_orphans(plan)
        found_any |= bool(plan.count())
        if plan.count() and ask("\nClean up orphaned resources?"):
            cleaned += cleanup.execute(client, plan, log)
        cleaned += _clean_reviews(client, cfg.get_str("incus.pool"), reviews, ask)
        cleaned += _clean_caches(client, cfg.get_str("incus.pool"), workspace_caches, ask)
    if dry_run:
        click.echo("\n[Dry run] No changes made.")
    elif cleaned:
        click.echo(f"\n✓ Cleaned {cleaned} item(s)")
    elif not found_any:
        click.echo("\nNothing to clean.")


def _clean_reviews(
    client: IncusClient, pool: str, reviews: bool, ask: Callable[[str], bool]
) -> int:
    """Review copies go only with --reviews; without it, say how many are kept."""
    from coi.review import clean
    from coi.sessions.inventory import containers

    in_use = {c.review: c.name for c in containers(client, lambda: []) if c.review and c.running}
    plan = clean.plan(in_use)
    pending = [r for r in plan.remove if r.state == "pending"]
    if not reviews:
        if pending:
            click.echo(
                f"\nKept {len(pending)} pending review(s): 'coi review list' shows them, "
                "'coi clean --reviews' deletes them."
            )
        return 0
    click.echo("\nChecking for review copies...")
    for r in plan.remove:
        click.echo(f"  - {r.id} ({r.state}, {r.workspace})")
    for r, name in plan.in_use:
        click.echo(f"  kept: {r.id} (sandbox {name} works on it)")
    if not plan.remove and not plan.in_use:
        click.echo("  (no reviews found)")
    if not ask("\nDelete these reviews (and coi's copies on the pool)?"):
        return 0
    return clean.execute(client, pool, plan, click.echo)


def _clean_caches(client: IncusClient, pool: str, wanted: bool, ask: Callable[[str], bool]) -> int:
    """A remote's workspace caches go only with --workspace-caches; else say how many stay."""
    if client.endpoint.is_local:
        if wanted:
            click.echo(
                "\nWorkspace caches are kept on remote servers only: "
                "'coi clean --workspace-caches --remote NAME'."
            )
        return 0
    from coi.errors import BackendError
    from coi.sessions import wscache

    try:
        caches = wscache.list_caches(client, pool)
    except BackendError as err:
        click.echo(f"\nWarning: could not list the workspace caches: {err.message}")
        return 0
    if not wanted:
        if caches:
            click.echo(
                f"\nKept {len(caches)} workspace cache(s) on the server: "
                "'coi clean --workspace-caches' deletes them."
            )
        return 0
    click.echo("\nChecking for workspace caches on the server...")
    for c in caches:
        busy = f" (in use by {len(c.used_by)} sandbox(es): kept)" if c.used_by else ""
        click.echo(f"  - {c.name} ({c.workspace}){busy}")
    if not caches:
        click.echo("  (no workspace caches found)")
        return 0
    if not ask("\nDelete these workspace caches?"):
        return 0
    try:
        removed = wscache.remove_caches(client, pool, caches)
    except BackendError as err:
        click.echo(f"  Warning: could not delete a workspace cache: {err.message}")
        return 0
    for name in removed:
        click.echo(f"Deleted workspace cache {name}")
    return len(removed)


def _report_containers(plan: CleanPlan) -> None:
    if plan.stopped:
        click.echo(f"Found {len(plan.stopped)} stopped container(s):")
        for c in plan.stopped:
            click.echo(f"  - {c.name}")
    else:
        click.echo("  (no stopped containers found)")
    if plan.orphaned:
        click.echo(f"Found {len(plan.orphaned)} abandoned sandbox(es) (their coi process is gone):")
        for c in plan.orphaned:
            click.echo(f"  - {c.name}")
    if plan.kept:
        click.echo(
            f"Keeping {len(plan.kept)} stopped persistent container(s) "
            "(remove with 'coi kill NAME'):"
        )
        for c in plan.kept:
            click.echo(f"  - {c.name}")


def _report_orphans(plan: CleanPlan) -> None:
    if not plan.count():
        click.echo("  (no orphaned resources found)")
        return
    click.echo(f"Found {plan.count()} orphaned resource(s):")
    if plan.resources:
        click.echo(f"  Unused network objects ({len(plan.resources)}):")
        for r in plan.resources:
            click.echo(f"    - {r}")
    if plan.templates:
        click.echo(
            f"  Templates and spares of images no longer in use, or spares turned off "
            f"({len(plan.templates)}):"
        )
        for t in plan.templates:
            click.echo(f"    - {t}")
    if plan.build_images:
        n = len(plan.build_images)
        click.echo(f"  Images a killed 'coi build' published and never named ({n}):")
        for fp in plan.build_images:
            click.echo(f"    - {fp[:12]}")
    if plan.leftovers:
        click.echo(f"  Leftover session files ({len(plan.leftovers)}):")
        for p in plan.leftovers:
            click.echo(f"    - {p}")
