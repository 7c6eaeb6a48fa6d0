"""Reaching into a running session as its agent user: attach, and its tmux server."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from coi.backend.client import IncusClient
from coi.backend.exec import ExecRequest
from coi.backend.models import Instance
from coi.errors import NotFound, SessionError
from coi.sessions import naming
from coi.sessions.sandbox import SandboxSpec, session_env


@dataclass(frozen=True)
class Agent:
    """Who the agent is in a container, and where its workspace is."""

    container: str
    uid: int
    user: str
    workspace: str

    def request(
        self, command: Sequence[str], *, cwd: str | None = None, once: bool = False
    ) -> ExecRequest:
        spec = SandboxSpec(
            workspace=Path(self.workspace),
            image="",
            persistent=False,
            code_uid=self.uid,
            code_user=self.user,
        )
        return ExecRequest(
            command=list(command),
            env=session_env(spec, {}),
            cwd=cwd or self.workspace,
            user=self.uid,
            group=self.uid,
            once=once,
        )


def running_instance(client: IncusClient, name: str) -> Instance:
    """The container of that name, or of that alias (`coi alias`, `--name`).

    :raises SessionError: the container does not exist or is not running."""
    inst: Instance | None
    try:
        inst = client.instances.get(name)
    except NotFound:
        # Not a container's name: perhaps one's alias (looked up only then, as it lists all).
        from coi.sessions import aliases

        real = aliases.resolve(client, name)
        try:
            inst = client.instances.get(real) if real != name else None
        except NotFound:
            inst = None
    if inst is None or not inst.running:
        raise SessionError(
            f"container {name} not found or not running",
            resolution="See the running sessions with 'coi list'.",
        )
    return inst


def agent_of(inst: Instance, *, uid: int = 1000, user: str = "code") -> Agent:
    ws = (inst.devices.get("workspace") or {}).get("path") or "/workspace"
    return Agent(container=inst.name, uid=uid, user=user, workspace=ws)


def attach(client: IncusClient, agent: Agent, *, bash: bool) -> int:
    """Join the agent's tmux session (or a bash) on this terminal; the exit code of it."""
    if bash:
        cmd = ["bash", "-c", "exec bash"]
    else:
        cmd = ["tmux", "attach", "-t", naming.tmux_session(agent.container)]
    return client.exec.interactive(agent.container, agent.request(cmd))


def has_tmux_session(client: IncusClient, agent: Agent) -> bool:
    req = agent.request(["tmux", "has-session", "-t", naming.tmux_session(agent.container)])
    return client.exec.quiet(agent.container, req) == 0


def tmux_send(client: IncusClient, agent: Agent, command: str) -> None:
    """Type `command` and Enter into the agent's tmux pane.

    :raises SessionError: there is no tmux session in the container.
    """
    session = naming.tmux_session(agent.container)
    res = client.exec.capture(
        agent.container,
        agent.request(["tmux", "send-keys", "-t", session, command, "Enter"], once=True),
    )
    if res.exit_code != 0:
        raise _no_session(agent, res.stderr)


def tmux_capture(client: IncusClient, agent: Agent) -> str:
    """The visible text of the agent's tmux pane."""
    session = naming.tmux_session(agent.container)
    res = client.exec.capture(
        agent.container, agent.request(["tmux", "capture-pane", "-t", session, "-p"])
    )
    if res.exit_code != 0:
        raise _no_session(agent, res.stderr)
    return res.stdout.decode(errors="replace")


def _no_session(agent: Agent, stderr: bytes) -> SessionError:
    return SessionError(
        f"no tmux session {naming.tmux_session(agent.container)} in container {agent.container}",
        details=stderr.decode(errors="replace").strip() or None,
        resolution=f"Start one with 'coi shell --container {agent.container} --background', "
        f"or get a shell with 'coi attach {agent.container} --bash'.",
    )
