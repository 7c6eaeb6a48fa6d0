"""`coi diff`, `coi apply`, `coi discard`, `coi review start|list`: the agent's copy, reviewed."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import click

from coi.cli.app import CoiCommand, CoiGroup
from coi.cli.options import stacked
from coi.cli.render import echo_json, table

if TYPE_CHECKING:
    from coi.review.apply import Applied
    from coi.review.copy import Review
    from coi.review.gitbranch import Commits

_which = stacked(
    click.argument("review", required=False),
    click.option(
        "-w",
        "--workspace",
        default=None,
        metavar="DIR",
        help="Whose latest pending review, when REVIEW is not given (default: .).",
    ),
    click.option(
        "--slot",
        type=click.IntRange(min=1),
        default=None,
        metavar="N",
        help="The latest pending review of the folder's sandbox in slot N.",
    ),
)

DIFF_EXAMPLES = """\
  coi diff                       # the latest pending review of this folder
  coi diff --stat
  coi diff myproj-3fa9c1 --format json"""

APPLY_EXAMPLES = """\
  coi apply                      # all of it, or nothing if anything conflicts
  coi apply --partial            # the clean files; the rest is named and left
  coi apply --include-protected  # also .git/hooks, .vscode, .coi.toml, ..."""


def _find(review: str | None, workspace: str | None, slot: int | None = None) -> Review:
    from coi.errors import UsageError
    from coi.review.copy import find

    if review and slot is not None:
        raise UsageError("give a REVIEW or --slot, not both")
    return find(review, workspace, slot=slot)


@click.command("diff", cls=CoiCommand, examples=DIFF_EXAMPLES)
@_which
@click.option("--stat", "stat_", is_flag=True, help="Counts per file instead of the diff.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
def diff_cmd(
    review: str | None, workspace: str | None, slot: int | None, stat_: bool, fmt: str
) -> None:
    """Show what the agent changed in a review copy, against the state it started from.

    Files are compared as data: nothing from the copy is run or followed (no git, hooks,
    attributes or links); links, FIFOs, devices, setuid files and files over
    review.max_file_size are named as refused.
    """
    from coi.cli.context import load_settings
    from coi.review import settings
    from coi.review.diff import compare_review, render_stat, render_text

    cap = settings.max_file(load_settings())
    r = _find(review, workspace, slot)
    d, commits = compare_review(r, max_file=cap)
    if fmt == "json":
        out: dict[str, Any] = {
            "review": r.id,
            "workspace": r.workspace,
            "files": [c.as_json() for c in d.changes],
            "counts": d.counts(),
        }
        if commits is not None:
            out["git"] = {
                "head": commits.head,
                "start": commits.start,
                "commits": [{"sha": sha, "subject": subj} for sha, subj in commits.new],
                "problem": commits.problem,
                "git_files": len(d.git_files),
            }
        echo_json(out)
        return
    if commits is not None:
        click.echo(_commits_text(r.id, commits, len(d.git_files)), nl=False)
    if stat_:
        click.echo(render_stat(d), nl=False)
    else:
        click.echo(render_text(d) or "No changes to files.\n", nl=False)


def _commits_text(rid: str, commits: Commits, git_files: int) -> str:
    """Git mode's header of `coi diff`: the agent's commits, or why they cannot come."""
    from coi.review.diff import printable

    lines = []
    if commits.problem:
        lines.append(f"The agent's commits cannot be brought in: {printable(commits.problem)}")
    elif commits.new:
        lines.append(
            f"The agent's commits ({len(commits.new)}; coi apply makes them branch coi/{rid}):"
        )
        lines += [f"  {sha[:12]} {printable(subj)}" for sha, subj in commits.new]
    if git_files:
        lines.append(f"({git_files} change(s) under .git/ are git's data: never applied as files)")
    return "\n".join(lines) + ("\n\n" if lines else "")


def _report(res: Applied) -> list[str]:
    from coi.review.diff import printable

    marks = {"added": "A", "taken": "M", "merged": "M", "deleted": "D"}
    lines = []
    writes = [s for s in res.steps if s.action != "none"]
    if writes and not res.written:
        lines.append("Would apply:")
    for s in sorted(writes, key=lambda s: s.path):
        extra = " (merged with your changes)" if s.how == "merged" else ""
        extra += f" (note: {s.note})" if s.note else ""
        lines.append(f"  {marks[s.how]} {printable(s.path)}{extra}")
    if res.conflicts:
        lines.append("Conflicts:")
    for path, why in res.conflicts:
        lines.append(f"  C {printable(path)}: {why}")
    if res.refused:
        lines.append("Refused:")
    for path, why in res.refused:
        lines.append(f"  ! {printable(path)}: {printable(why)}")
    return lines


@click.command("apply", cls=CoiCommand, examples=APPLY_EXAMPLES)
@_which
@click.option("--partial", is_flag=True, help="Write the clean files only; name what is left.")
@click.option(
    "--include-protected",
    is_flag=True,
    help="Also write protected paths (.git/hooks, .git/config, .vscode, .coi.toml, ...).",
)
@click.option(
    "--branch",
    default="",
    metavar="NAME",
    help="Git mode: the branch the agent's commits become (default coi/<review>).",
)
@click.option("--branch-only", is_flag=True, help="Git mode: only make the branch; write no files.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
def apply_cmd(
    review: str | None,
    workspace: str | None,
    slot: int | None,
    partial: bool,
    include_protected: bool,
    branch: str,
    branch_only: bool,
    fmt: str,
) -> None:
    """Bring a review's changes into your folder (a three-way merge with your own edits).

    A file you did not touch takes the agent's version; one you changed too is merged, and
    reported as a conflict if the changes overlap. All or nothing: if anything conflicts or
    is refused, nothing is written (unless --partial).
    """
    from coi.cli.context import load_settings
    from coi.errors import CoiError
    from coi.review import settings
    from coi.review.apply import apply

    cfg = load_settings()
    r = _find(review, workspace, slot)
    res = apply(
        r,
        protected=settings.protected(cfg),
        include_protected=include_protected,
        partial=partial,
        max_file=settings.max_file(cfg),
        branch=branch,
        files=not branch_only,
    )
    if fmt == "json":
        echo_json(
            {
                "review": r.id,
                "workspace": r.workspace,
                "written": res.written,
                "state": r.state,
                "files": [
                    {"path": s.path, "result": s.how, **({"note": s.note} if s.note else {})}
                    for s in res.steps
                    if s.action != "none"
                ],
                "conflicts": [{"path": p, "reason": w} for p, w in res.conflicts],
                "refused": [{"path": p, "reason": w} for p, w in res.refused],
                "branch": res.branch,
                "commits": [
                    {"sha": sha, "subject": subj}
                    for sha, subj in (res.commits.new if res.branch and res.commits else [])
                ],
            }
        )
    else:
        lines = _report(res)
        if not res.written:
            click.echo(f"Review {r.id} not applied to {r.workspace}: nothing was written.")
        elif res.blocked:
            click.echo(f"Applied the clean part of review {r.id} to {r.workspace}:")
        else:
            click.echo(f"Applied review {r.id} to {r.workspace}:")
        click.echo("\n".join(lines) if lines else "  (no changes)")
        if res.branch and res.commits:
            click.echo(
                f"Branch {res.branch}: the agent's {len(res.commits.new)} commit(s) "
                f"(git log {res.branch}; merge or push it yourself)"
            )
        if res.git_files:
            click.echo(
                f"Not applied: {len(res.git_files)} change(s) under .git/ (git mode brings "
                "the agent's commits as a branch, never git's files)"
            )
    if not res.written:
        what = [f"{len(res.conflicts)} conflict(s)"] if res.conflicts else []
        what += [f"{len(res.refused)} refused"] if res.refused else []
        fix = ["resolve the conflicts in your folder, or discard"] if res.conflicts else []
        fix += ["apply the rest with --partial"]
        if any("--include-protected" in why for _, why in res.refused):
            fix += ["add --include-protected if you want the protected paths too"]
        raise CoiError(
            f"review {r.id} not applied: {', '.join(what)}",
            resolution="; ".join(fix).capitalize() + ".",
        )


@click.command("discard", cls=CoiCommand)
@_which
def discard_cmd(review: str | None, workspace: str | None, slot: int | None) -> None:
    """Delete a review copy and the agent's changes in it (your folder is not touched)."""
    from coi.errors import UsageError
    from coi.review.copy import discard, find

    if review and slot is not None:
        raise UsageError("give a REVIEW or --slot, not both")
    r = find(review, workspace, include_discarded=True, slot=slot)
    discard(r)
    click.echo(f"Discarded review {r.id} of {r.workspace}.")


@click.group("review", cls=CoiGroup, invoke_without_command=False)
def review_cmd() -> None:
    """Review copies: the agent works on a copy; you diff, apply or discard it."""


@review_cmd.command("start", cls=CoiCommand)
@click.option("-w", "--workspace", default=".", metavar="DIR", help="Folder to copy.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
def start_cmd(workspace: str, fmt: str) -> None:
    """Copy a folder into a new review (without a sandbox), printing its id and copy."""
    from coi.cli.context import load_settings
    from coi.review.copy import start
    from coi.review.cp import terminal_progress
    from coi.review.pool import store_for

    r = start(
        workspace,
        store=store_for(load_settings()),
        progress=terminal_progress(f"Copying {workspace} for the review"),
    )
    if fmt == "json":
        echo_json(_row(r))
        return
    click.echo(f"Review {r.id} of {r.workspace}")
    click.echo(f"Work in: {r.work}")
    click.echo("Then: coi diff, coi apply or coi discard")


def _row(r: Review) -> dict[str, Any]:
    return {
        "id": r.id,
        "workspace": r.workspace,
        "state": r.state,
        "created": r.created,
        "session": r.session,
        "container": r.container,
        "work": r.work,
        "copy": "pool" if r.snapshots else "host",
    }


@review_cmd.command("list", cls=CoiCommand)
@click.option("--all", "all_", is_flag=True, help="Applied ones too, not only pending.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
def list_cmd(all_: bool, fmt: str) -> None:
    """List review copies (pending ones, or --all)."""
    from coi.review.copy import all_reviews

    rows = [r for r in all_reviews() if r.state == "pending" or (all_ and r.state != "discarded")]
    if fmt == "json":
        echo_json([_row(r) for r in rows])
        return
    if not rows:
        click.echo("No pending reviews." if not all_ else "No reviews.")
        return
    head = [("ID", "STATE", "CREATED", "SANDBOX", "WORKSPACE")]
    body = [
        (
            r.id,
            r.state,
            time.strftime("%Y-%m-%d %H:%M", time.localtime(r.created)),
            r.container or "-",
            r.workspace,
        )
        for r in rows
    ]
    click.echo(table(head + body))


def _add_fetch() -> None:
    from coi.cli.review_fetch_cmd import fetch_cmd

    review_cmd.add_command(fetch_cmd)


_add_fetch()  # `coi review fetch` (remote review sandboxes: coi.sessions.remote)
