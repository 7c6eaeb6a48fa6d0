"""Acting on sessions that run: attach (with its watchers), persist, shut down, kill, resume;
each returns what happened for the caller to show."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from coi.audit import session_log
from coi.backend.client import IncusClient
from coi.config.loader import Config
from coi.errors import BackendError, NotFound, UsageError
from coi.protection.guard import Guard, settle
from coi.sessions import access, aliases, naming
from coi.sessions.inventory import SavedSession, containers, mark_persistent
from coi.sessions.remote import before_removal
from coi.sessions.runner import guarded, terminal_alert
from coi.sessions.workspace import resolve_workspace

Log = Callable[[str], None]


@dataclass(frozen=True)
class Outcome:
    """What an action on one container did: whether it acted, and the steps to show."""

    name: str
    done: bool
    steps: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


def _missing(name: str) -> Outcome:
    return Outcome(name, False, warnings=(f"Container {name} does not exist",))


def shutdown(client: IncusClient, name: str, *, timeout: int, log: Log) -> Outcome:
    """Stop gracefully (forced after `timeout` seconds), delete, settle protected paths.
    `name`: the container's name or its alias (here and in `kill`)."""
    name = aliases.resolve(client, name)
    if not client.instances.exists(name):
        return _missing(name)
    steps: list[str] = []
    kept = before_removal(client, name, log)
    if kept is not None:
        return Outcome(
            name,
            False,
            warnings=(
                f"{name} kept: the agent's work could not be fetched into its review: {kept}; "
                f"'coi kill {name}' removes it without",
            ),
        )
    if client.instances.get(name).active:
        steps.append("Attempting graceful shutdown...")
        try:
            client.instances.stop(name, timeout=timeout)
            steps.append("Graceful shutdown successful")
        except BackendError:
            steps.append("Timeout reached, force-killing...")
    client.instances.delete(name, force=True)
    session_log.record(name, "end", "removed by coi shutdown")
    settle(name, removed=True, log=log)
    return Outcome(name, True, (*steps, f"✓ Shutdown {name}"))


def persist(client: IncusClient, name: str, sessions: Iterable[SavedSession]) -> Outcome:
    """Keep an ephemeral container after its session ends (in the daemon and in the
    metadata of its saved sessions)."""
    if not client.instances.exists(name):
        return _missing(name)
    warnings: tuple[str, ...] = ()
    if not mark_persistent(client, name, sessions):
        warnings = (f"no session metadata found for container {name}",)
    return Outcome(name, True, (f"✓ Persisted {name}",), warnings)


def kill(client: IncusClient, name: str, *, log: Log) -> Outcome:
    """Stop and delete at once (persistent ones too); settle protected paths."""
    name = aliases.resolve(client, name)
    if not client.instances.exists(name):
        return _missing(name)
    client.instances.delete(name, force=True)
    session_log.record(name, "end", "removed by coi kill")
    settle(name, removed=True, log=log)
    return Outcome(name, True, (f"✓ Killed {name}",))


def resume(client: IncusClient, name: str) -> Outcome:
    """Unfreeze a container the security monitor paused.

    :raises NotFound: no such container.
    :raises UsageError: it is not frozen.
    """
    try:
        status = client.instances.get(name).status
    except NotFound:
        raise NotFound(f"container {name} not found: container not found") from None
    if status != "Frozen":
        raise UsageError(f"container {name} is not frozen (status: {status.upper()})")
    client.instances.unfreeze(name)
    return Outcome(name, True, (f"Resumed container: {name}",))


def resume_frozen(client: IncusClient, *, log: Log) -> tuple[str, ...]:
    """Unfreeze every frozen coi container, logging each as it goes; their names."""
    frozen = tuple(c.name for c in containers(client, with_state=False) if c.status == "Frozen")
    for n in frozen:
        client.instances.unfreeze(n)
        log(f"Resumed container: {n}")
    return frozen


@dataclass(frozen=True)
class AttachTarget:
    """Which container `coi attach` means; `name` empty when it cannot tell (`running` lists
    the candidates, none or several)."""

    name: str
    running: tuple[str, ...] = field(default=())
    slot: int | None = None


def attach_target(
    client: IncusClient, name: str | None, *, slot: int | None, workspace: str | None
) -> AttachTarget:
    """The container named, else the workspace's slot, else the only running one.

    :raises SessionError: the named (or slot's) container does not run.
    """
    if slot:
        name = naming.container_name(str(resolve_workspace(workspace)), slot)
        access.running_instance(client, name)
        return AttachTarget(name, slot=slot)
    if name:
        return AttachTarget(aliases.resolve(client, name))
    # A running spare has no session to join (sandbox.running_spares).
    running = tuple(
        c.name for c in containers(client, with_state=False) if c.running and c.kind != "spare"
    )
    return AttachTarget(running[0] if len(running) == 1 else "", running)


def attach(client: IncusClient, cfg: Config, name: str, *, bash: bool, protect_log: Log) -> int:
    """Join a running session on this terminal, its protected paths checked and (when
    configured) its monitor watching while attached; the exit code of tmux (or bash).

    :raises SessionError: the container does not run.
    """
    from coi.monitor.monitor import Settings, context_of

    inst = access.running_instance(client, name)
    agent = access.agent_of(
        inst, uid=cfg.get_int("incus.code_uid"), user=cfg.get_str("incus.code_user")
    )
    guard = Guard(name)
    settings = Settings.from_config(cfg)
    if settings.enabled:
        settings.net = context_of(client, name)
    with guarded(
        client,
        name,
        guard=guard if guard.exists() else None,
        verify_interval=cfg.get_int("security.verify_interval_seconds"),
        monitor=settings,
        log=protect_log,
        alert=terminal_alert,
        service=True,
        remote=cfg.get_str("incus.remote") or None,
    ):
        code = access.attach(client, agent, bash=bash)
    settle(name, removed=not client.instances.exists(name), log=protect_log)
    return code
