"""Running spares: booted sandboxes that wait, under their slot's name, for the next session.

A running container cannot be renamed (Incus and LXD refuse it), and a sandbox's name is its
workspace's hash and slot, as upstream names it and as scripts read it. So a running spare
is made for one workspace, in a free slot, with everything a session there would give it:
its devices (the workspace, protected paths, masks, mounts), its config, its network with a
reserved address, its boot and set-up done and its network policy proven. The next session
in that workspace whose settings make the very same sandbox (`key`) claims that slot and
takes it: a patch of its labels, and the agent's command.

Its network is not proven a second time when it is taken, while that proof still holds: the
same daemon process (a restarted one applies its firewall afresh), the same host end of the
NIC (a container that restarted has a new one), and the same rules asked for (`key` holds
the NIC and its bridge, whose name is the policy's digest). Otherwise the session proves it
again before anything of the agent runs. What neither coi nor the daemon is told of, say a
host firewall flushed by hand, is not seen in between, as it is not seen while a session
runs: docs/sessions.md says so.

What a spare holds is what a session would have had from its first second: nothing of an
agent ever ran in it. What is read from it to decide anything is its labels, which the host
wrote and nothing inside can change.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from coi import labels

if TYPE_CHECKING:
    from coi.backend.models import Instance
    from coi.sessions.sandbox import SandboxSpec

KIND = "spare"  # `labels.KIND` of a running spare

# Labels that differ between two sandboxes made for the same session settings.
_VOLATILE = (
    labels.KIND,
    labels.OWNER_HOST,
    labels.OWNER_PID,
    labels.SPARE_KEY,
    labels.SPARE_READY,
    labels.SPARE_PROOF,
    labels.DEADLINE,
)


def wanted(spec: SandboxSpec) -> bool:
    """Whether sessions of this spec use running spares: on, and a plain sandbox (a
    persistent one is kept and reused anyway; ports belong to one slot; a name, a review
    copy or a cluster member is one session's; a remote daemon gets the workspace copied in
    after the boot)."""
    return (
        spec.running_spares > 0
        and not spec.persistent
        and not spec.remote
        and not spec.review
        and not spec.target
        and not spec.alias
        and not spec.ports
        and not spec.sockets
    )


def key(
    config: Mapping[str, str],
    devices: Mapping[str, Mapping[str, str]],
    *,
    fingerprint: str,
    ephemeral: bool,
    setup: str,
    drop_root: bool,
) -> str:
    """What a sandbox is made of, as one digest: a spare serves a session only when the
    session would make exactly this sandbox. The NIC's reserved address is left out (each
    sandbox has its own); so are the labels naming who made it."""
    devs = {n: dict(d) for n, d in devices.items()}
    if "eth0" in devs:
        devs["eth0"].pop("ipv4.address", None)
    body = {
        "config": {k: v for k, v in config.items() if k not in _VOLATILE},
        "devices": devs,
        "image": fingerprint,
        "ephemeral": ephemeral,
        "setup": setup,
        "drop_root": drop_root,
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:32]


def is_spare(inst: Instance) -> bool:
    return inst.config.get(labels.KIND) == KIND


def is_ready(inst: Instance) -> bool:
    """Booted, its network proven, its maker done with it."""
    return is_spare(inst) and inst.running and inst.config.get(labels.SPARE_READY) == "true"


def ready_for(instances: Iterable[Instance], workspace: str) -> dict[str, Instance]:
    """The ready running spares made for this workspace, by name."""
    return {
        i.name: i for i in instances if is_ready(i) and i.config.get(labels.WORKSPACE) == workspace
    }


def of_workspace(instances: Iterable[Instance], workspace: str) -> list[Instance]:
    """Running spares of this workspace, ready or being made."""
    return [i for i in instances if is_spare(i) and i.config.get(labels.WORKSPACE) == workspace]


# The daemon's name for the host end of the sandbox's NIC: a new one at every start.
_VETH = "volatile.eth0.host_name"


def proof_mark(inst: Instance, daemon_pid: int) -> str:
    """What the network proof just made on `inst` was made on (`proof_holds`)."""
    return f"{daemon_pid} {inst.config.get(_VETH, '')}"


def proof_holds(inst: Instance, daemon_pid: int) -> bool:
    """Whether the spare's network proof was made by this daemon process on the NIC it has
    now: then it still holds (see the module's note)."""
    mark = inst.config.get(labels.SPARE_PROOF, "")
    return bool(daemon_pid and inst.config.get(_VETH)) and mark == proof_mark(inst, daemon_pid)


def main(argv: list[str] | None = None) -> int:
    """`python -m coi.sessions.warm JOB WORKSPACE`: make the running spares a session that
    ended asked for (`Sandbox._boot_spares` wrote JOB, in this user's own ~/.coi, readable
    by this user only; it is read and removed at once)."""
    import pickle

    from coi.sessions.sandbox import make_spares

    job = Path((sys.argv[1:] if argv is None else argv)[0])
    try:
        data = job.read_bytes()
    finally:
        job.unlink(missing_ok=True)
    make_spares(*pickle.loads(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
