"""Plain containers by name, for `coi container ...` and completion: launch, start, stop,
delete, check, run a command in, mount into, list."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

from coi.backend.client import IncusClient
from coi.backend.exec import ExecRequest
from coi.backend.models import ExecResult, Instance
from coi.errors import Conflict, NotFound, UsageError
from coi.sessions.inventory import is_coi_name
from coi.sessions.placement import check_target
from coi.sessions.sandbox import docker_ready_config, mknod_works, parse_env

Sink = Callable[[bytes], None]
# How a command runs: on this terminal, with its output collected, or streamed to sinks.
Mode = Literal["tty", "capture", "stream"]


def launch(
    client: IncusClient,
    image: str,
    name: str,
    *,
    pool: str,
    network: str,
    ephemeral: bool,
    target: str = "",
    setxattr: bool = False,
) -> None:
    """Create and start a container from an image, with the settings Docker inside needs;
    on a cluster, on member `target` ('': where its scheduler places it)."""
    check_target(client, target)
    found = client.networks.pool(pool)
    client.instances.create(
        name,
        image=image,
        config=docker_ready_config(
            client.has_extension,
            mknod_works=mknod_works(found.config if found else {}),
            setxattr=setxattr,
        ),
        devices={
            "root": {"type": "disk", "path": "/", "pool": pool},
            "eth0": {"type": "nic", "network": network, "name": "eth0"},
        },
        ephemeral=ephemeral,
        start=True,
        target=target,
    )


def start(client: IncusClient, name: str) -> None:
    client.instances.start(name)


def stop(client: IncusClient, name: str, *, force: bool) -> None:
    client.instances.stop(name, force=force)


def delete(client: IncusClient, name: str, *, force: bool) -> None:
    """:raises Conflict: it runs and `force` is not given."""
    if not force and client.instances.get(name).active:
        raise Conflict(
            f"container {name} is running",
            resolution=f"Stop it first, or use 'coi container delete {name} --force'.",
        )
    client.instances.delete(name, force=force)


def exists(client: IncusClient, name: str) -> bool:
    return client.instances.exists(name)


def running(client: IncusClient, name: str) -> bool:
    """Whether it exists and runs."""
    try:
        return client.instances.get(name).running
    except NotFound:
        return False


def run_command(
    client: IncusClient,
    name: str,
    command: Sequence[str],
    *,
    env: Sequence[str] = (),
    cwd: str | None = None,
    user: int | None = None,
    group: int | None = None,
    mode: Mode = "stream",
    on_stdout: Sink | None = None,
    on_stderr: Sink | None = None,
) -> ExecResult:
    """Run a command in a container (in its workspace unless `cwd` is given); its exit code,
    and with mode "capture" its output.

    :raises SessionError: an `env` item is not KEY=VALUE.
    """
    inst = client.instances.get(name)
    if cwd is None:
        cwd = (inst.devices.get("workspace") or {}).get("path") or None
    req = ExecRequest(
        command=list(command),
        env=parse_env(tuple(env)),
        cwd=cwd,
        user=user,
        group=group,
        once=True,
    )
    if mode == "tty":
        return ExecResult(client.exec.interactive(name, req))
    if mode == "capture":
        return client.exec.capture(name, req)
    return client.exec.run(name, req, on_stdout=on_stdout, on_stderr=on_stderr)


def disk_device(source: str, path: str, *, shift: bool, readonly: bool) -> dict[str, str]:
    """The disk device that mounts host directory `source` at `path`.

    :raises UsageError: `path` is not absolute.
    """
    if not path.startswith("/"):
        raise UsageError(f"container path must be absolute: {path}")
    spec = {"type": "disk", "source": source, "path": path}
    if shift:
        spec["shift"] = "true"
    if readonly:
        spec["readonly"] = "true"
    return spec


def mount(
    client: IncusClient, name: str, device: str, spec: dict[str, str], *, shift_auto: bool = False
) -> str | None:
    """Add a device (e.g. a `disk_device`) to a container; a note for the user, or None.

    `shift_auto`: the shift was not asked for by name (upstream shifts by default, so that
    the agent user can write a host folder it owns): where the daemon cannot shift with
    idmapped mounts, the folder is mounted without it, and the note says so.
    """
    note = None
    if shift_auto and spec.get("shift") == "true" and not client.server.idmapped_mounts:
        spec = {k: v for k, v in spec.items() if k != "shift"}
        note = (
            "this daemon cannot shift ownership (no idmapped mounts): mounted without "
            "--shift, so files keep their host owners inside"
        )
    client.instances.add_device(name, device, spec)
    return note


def every_container(client: IncusClient) -> list[Instance]:
    """Every container of the project (not only coi's), with its state."""
    return client.instances.list(with_state=True)


def names(client: IncusClient, *, coi_only: bool = False) -> list[str]:
    """The names of the project's containers (with `coi_only`, those with coi's prefix)."""
    found = client.instances.names()
    return [n for n in found if is_coi_name(n)] if coi_only else found
