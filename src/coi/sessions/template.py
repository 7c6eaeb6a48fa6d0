"""Pre-shifted templates: a stopped copy of an image whose files already carry the uid map.

Without idmapped mounts (LXD 5.0 here), the first start of every container re-owns its whole
root filesystem into the container's uid range: a second or more for the 2.9 GB `coi` image.
A template is created and started once per (image, uid map); sandboxes are then copies of it
(a btrfs/ZFS snapshot) that start without any re-owning.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from coi.backend.client import IncusClient
from coi.errors import BackendError, NotFound

PREFIX = "coitmpl-"  # not the session prefix: `coi list` and `coi clean` leave templates alone
KIND_KEY = "user.coi.kind"
IMAGE_KEY = "user.coi.template.image"
# Config keys that decide how files are owned on disk: they must match the copy's.
IDMAP_KEYS = ("raw.idmap", "security.privileged", "security.idmap.isolated", "security.idmap.base")

Log = Callable[[str], None]


def template_name(fingerprint: str, config: Mapping[str, str]) -> str:
    idmap = "\n".join(f"{k}={config.get(k, '')}" for k in IDMAP_KEYS)
    return f"{PREFIX}{fingerprint[:12]}-{hashlib.sha256(idmap.encode()).hexdigest()[:8]}"


@contextmanager
def _lock(lock_dir: Path, name: str) -> Iterator[None]:
    lock_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_dir / f"{name}.lock", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def ready(
    client: IncusClient,
    fingerprint: str,
    config: Mapping[str, str],
    *,
    pool: str,
    lock_dir: Path,
    log: Log,
) -> str | None:
    """The template for this image and uid map, made now if missing; None if it cannot be."""
    name = template_name(fingerprint, config)
    try:
        if _usable(client, name, repair=False):
            return name
        with _lock(lock_dir, name):
            if _usable(client, name, repair=True):  # another coi made it while we waited
                return name
            log("Preparing a ready-to-start copy of the image (once per image and user)...")
            _make(client, name, fingerprint, config, pool)
            _drop_stale(client, name, config)
        return name
    except BackendError as err:
        log(f"Warning: no template ({err}); creating from the image instead")
        return None


def _usable(client: IncusClient, name: str, *, repair: bool) -> bool:
    """Stopped and shifted. With `repair` (under the lock, so nobody is making it right now)
    a half-made one (coi killed midway) is removed to start over."""
    try:
        inst = client.instances.get(name)
    except NotFound:
        return False
    if inst.status == "Stopped" and "volatile.last_state.idmap" in inst.config:
        return True
    if repair:
        client.instances.delete(name, force=True)
    return False


def _make(
    client: IncusClient, name: str, fingerprint: str, config: Mapping[str, str], pool: str
) -> None:
    tconfig = {k: config[k] for k in IDMAP_KEYS if k in config}
    tconfig.update({KIND_KEY: "template", IMAGE_KEY: fingerprint})
    client.instances.create(
        name,
        image=fingerprint,
        config=tconfig,
        devices={"root": {"type": "disk", "path": "/", "pool": pool}},
        start=True,  # the first start re-owns the files: this is the cost paid once
        description="coi template: a pre-shifted copy of an image",
    )
    client.instances.stop(name, force=True)


def _drop_stale(client: IncusClient, keep: str, config: Mapping[str, str]) -> None:
    """Templates of older images for the same uid map (the image was rebuilt)."""
    suffix = keep.rsplit("-", 1)[1]
    for other in client.instances.names():
        if other.startswith(PREFIX) and other != keep and other.endswith(f"-{suffix}"):
            client.instances.delete(other, force=True)


def stale(client: IncusClient) -> list[str]:
    """Templates whose image is gone or no longer the target of any alias (for `coi clean`)."""
    current = {fp for img in client.images.list() for fp in [img.fingerprint] if img.aliases}
    out = []
    for inst in client.instances.list():
        if inst.name.startswith(PREFIX) and inst.config.get(IMAGE_KEY) not in current:
            out.append(inst.name)
    return out
