"""Pre-shifted templates and their spares: stopped containers a sandbox starts from.

Without idmapped mounts (LXD 5.0 here), the first start of every container re-owns its whole
root filesystem into the container's uid range: a second or more for the 2.9 GB `coi` image.
A template is created and started once per (image, uid map); sandboxes are then copies of it
(a btrfs/ZFS snapshot) that start without any re-owning.

Even that copy costs the daemon 0.3-0.5 s (LXD walks the whole tree looking for nested
subvolumes). So a few spares, copies made in the background after a session, wait for the
next sandbox: it renames one, sets its config and starts it. Stopped spares cost no memory
and, as snapshots, almost no disk.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import random
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path

from coi import labels
from coi.backend.client import IncusClient
from coi.errors import BackendError, NotFound
from coi.locks import held, open_lock, tried

PREFIX = "coitmpl-"  # not the session prefix: `coi list` and `coi clean` leave templates alone
SPARE_PREFIX = "coispare-"
# Set once the first start (the re-owning) is over and the template is stopped again. Until
# then another coi must not copy it: a copy taken mid-start fails or comes out half-shifted.
# Config keys that decide how files are owned on disk: they must match the copy's.
IDMAP_KEYS = ("raw.idmap", "security.privileged", "security.idmap.isolated", "security.idmap.base")

Log = Callable[[str], None]


def template_name(fingerprint: str, config: Mapping[str, str]) -> str:
    idmap = "\n".join(f"{k}={config.get(k, '')}" for k in IDMAP_KEYS)
    return f"{PREFIX}{fingerprint[:12]}-{hashlib.sha256(idmap.encode()).hexdigest()[:8]}"


def _lock_path(lock_dir: Path, name: str) -> Path:
    return lock_dir / f"{name}.lock"


# Held shared by every sandbox of this user from when it is made until it is up; while anyone
# holds it, no spare is copied (see `replenish`).
STARTING_LOCK = "starting"
# Held by the coi that is copying spares, so that two ending together do not both copy.
SPARES_LOCK = "spares"


class Starting:
    """The mark that a sandbox of this user is starting: a shared lock, held until `leave`."""

    def __init__(self, lock_dir: Path) -> None:
        self._lock_dir = lock_dir
        self._fd = -1

    def enter(self) -> None:
        if self._fd < 0:
            self._fd = open_lock(_lock_path(self._lock_dir, STARTING_LOCK))
            fcntl.flock(self._fd, fcntl.LOCK_SH)

    def leave(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Starting:
        self.enter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.leave()


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
        with held(_lock_path(lock_dir, name)):
            if _usable(client, name, repair=True):  # another coi made it while we waited
                return name
            log("Preparing a ready-to-start copy of the image (once per image and user)...")
            _make(client, name, fingerprint, config, pool)
            _drop_stale(client, name)
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
    if inst.status == "Stopped" and inst.config.get(labels.TEMPLATE_READY) == "true":
        return True
    if repair:
        client.instances.delete(name, force=True)
    return False


def _make(
    client: IncusClient, name: str, fingerprint: str, config: Mapping[str, str], pool: str
) -> None:
    tconfig = {k: config[k] for k in IDMAP_KEYS if k in config}
    tconfig.update({labels.KIND: "template", labels.TEMPLATE_IMAGE: fingerprint})
    client.instances.create(
        name,
        image=fingerprint,
        config=tconfig,
        devices={"root": {"type": "disk", "path": "/", "pool": pool}},
        start=True,  # the first start re-owns the files: this is the cost paid once
        description="coi template: a pre-shifted copy of an image",
    )
    client.instances.stop(name, force=True)
    _render_on_rename(client, name)
    client.instances.set_config(name, {labels.TEMPLATE_READY: "true"})


def _render_on_rename(client: IncusClient, name: str) -> None:
    """A spare becomes a sandbox by a rename: the image's file templates made at copy time
    (/etc/hostname, /etc/hosts) must be made again then, or the sandbox keeps the spare's
    name as its hostname. Images coi builds say so already; others get it here."""
    meta = client.instances.metadata(name)
    templates = meta.get("templates") or {}
    changed = False
    for entry in templates.values():
        when = list(entry.get("when") or [])
        if "copy" in when and "rename" not in when:
            entry["when"] = [*when, "rename"]
            changed = True
    if changed:
        client.instances.set_metadata(name, meta)


def _drop_stale(client: IncusClient, keep: str) -> None:
    """Templates and spares of images that were rebuilt or removed (`stale`): a template is
    made for a new image, which is when an older one may have lost its alias. Templates of
    other images still in use stay, whatever their uid map."""
    for name in stale(client):
        if name != keep:
            client.instances.delete(name, force=True)


def pay_off(client: IncusClient, pool: str, pool_config: Mapping[str, str] | None = None) -> bool:
    """Whether templates and spares make sandboxes start faster on this daemon: only where
    it re-owns a container's files at its first start. Where it shifts them on the fly
    (idmapped mounts: Incus 6.0 here) a sandbox made from the image starts as fast as a
    copy of a template (measured: docs/performance.md), and templates are only clutter.
    `coi setup`'s verdict is kept on the pool; without it, the server's idmapped flags.
    `pool_config`: the pool's config when the caller has read it already."""
    from coi.sessions.workspace import can_map_root

    if pool_config is None:
        found = client.networks.pool(pool)
        pool_config = found.config if found else {}
    return not can_map_root(pool_config, client.server.idmapped_mounts)


def stale(
    client: IncusClient, *, keep_spares: bool = True, keep_templates: bool = True
) -> list[str]:
    """For `coi clean`: templates and spares whose image is gone or no longer the target of
    any alias, every spare when spares are turned off, and all of them when templates are."""
    current = {fp for img in client.images.list() for fp in [img.fingerprint] if img.aliases}
    out = []
    for inst in client.instances.list():
        spare = inst.name.startswith(SPARE_PREFIX)
        if not (spare or inst.name.startswith(PREFIX)):
            continue
        if (
            inst.config.get(labels.TEMPLATE_IMAGE) not in current
            or (spare and not keep_spares)
            or not keep_templates
        ):
            out.append(inst.name)
    return out


# -- spares ---------------------------------------------------------------------------------

# Keys a spare carries from its template that a sandbox must not keep.
TEMPLATE_KEYS = (labels.KIND, labels.TEMPLATE_IMAGE, labels.TEMPLATE_READY)


def _spare_prefix(tmpl: str) -> str:
    return SPARE_PREFIX + tmpl.removeprefix(PREFIX) + "-"


def claim(client: IncusClient, tmpl: str, name: str) -> bool:
    """Rename a ready spare of `tmpl` to `name`; False when there is none to have."""
    prefix = _spare_prefix(tmpl)
    spares = [n for n in client.instances.names() if n.startswith(prefix)]
    if not spares:
        return False
    # Sessions started together each try a different spare first, not all the same one.
    random.shuffle(spares)
    busy = client.instances.busy()  # still being copied
    for spare in spares:
        if spare in busy:
            continue
        try:
            client.instances.rename(spare, name)
            return True
        except BackendError:
            continue  # another coi took it a moment ago
    return False


def replenish(client: IncusClient, tmpl: str, want: int, *, lock_dir: Path, own: str = "") -> int:
    """Start copies of `tmpl` (not waited for) until `want` spares exist; how many started.

    Not while another sandbox of this user is starting (`Starting`), nor while the daemon is
    creating, starting or stopping containers (`own`, the caller's, does not count): a copy
    costs the daemon 0.4 s of CPU, and sessions started together would wait on copies made
    for later ones. The last session of a burst finds nobody starting and refills the pool;
    of two sessions ending together, one does (`SPARES_LOCK`).
    """
    if want <= 0 or someone_starting(lock_dir):
        return 0
    with tried(_lock_path(lock_dir, SPARES_LOCK)) as mine:
        if not mine or client.instances.busy() - {own}:
            return 0  # another coi is refilling right now, or the daemon is busy
        return _copy_spares(client, tmpl, want)


def someone_starting(lock_dir: Path) -> bool:
    """Whether a sandbox of this user is starting right now."""
    # Checked, not held: a sandbox starting a moment later does not wait for the refill.
    with tried(_lock_path(lock_dir, STARTING_LOCK)) as free:
        return not free


def _copy_spares(client: IncusClient, tmpl: str, want: int) -> int:
    prefix = _spare_prefix(tmpl)
    have = sum(1 for n in client.instances.names() if n.startswith(prefix))
    started = 0
    for _ in range(want - have):
        try:
            client.instances.create(
                prefix + secrets.token_hex(3),
                image="",
                source={"type": "copy", "source": tmpl, "instance_only": True},
                description="coi spare: a ready-to-start copy of a template",
                wait=False,
            )
        except BackendError:
            break  # the template went away (coi build, coi clean): nothing to copy
        started += 1
    return started
