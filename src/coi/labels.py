"""The `user.coi.*` keys coi writes on the daemon's objects, named once: what made a container,
whose it is, its workspace, and the marks on networks, templates and pools."""

from __future__ import annotations

import os
import socket

# On sandboxes
WORKSPACE = "user.coi.workspace"  # the host folder it was made for
PERSISTENT = "user.coi.persistent"  # "true": kept after its session
KIND = "user.coi.kind"  # "run", "shell", "build", "template", "spare"
OWNER_HOST = "user.coi.owner_host"  # the machine whose coi made it
OWNER_PID = "user.coi.owner_pid"  # ... and that coi's process
DEADLINE = "user.coi.deadline"  # max_duration: when the watchdog stops it (epoch seconds)
ALIAS = "user.coi.alias"  # the name the user gave it (`--name`, `coi alias`)
REVIEW = "user.coi.review"  # review mode: the id of the review it works on

# On running spares (sessions/warm.py): what the spare was made for, and that it is booted
# and its network proven (until then it is being made)
SPARE_KEY = "user.coi.spare.key"
SPARE_READY = "user.coi.spare.ready"
SPARE_PROOF = "user.coi.spare.proof"  # where its network was proven: daemon pid, host veth

# On templates and spares (sessions/template.py)
TEMPLATE_IMAGE = "user.coi.template.image"
TEMPLATE_READY = "user.coi.template.ready"

# On networks and ACLs coi made, and the policy a bridge enforces
MANAGED = "user.coi.managed"
NETWORK_MODE = "user.coi.mode"

# On the storage pool: the daemon's verdict on mapping host root (coi setup)
MAP_ROOT = "user.coi.map_root"
# ... and on its mknod interception: "true" only where a container with it on can make the
# device nodes and whiteouts Docker's image layers hold (coi setup probes it)
MKNOD_WORKS = "user.coi.mknod_intercept"


def owner_config(kind: str) -> dict[str, str]:
    """What made a container and which process owns it (`coi clean` and the keeper read it)."""
    return {
        KIND: kind,
        OWNER_HOST: socket.gethostname(),
        OWNER_PID: str(os.getpid()),
    }
