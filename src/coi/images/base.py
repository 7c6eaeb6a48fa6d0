"""The Debian base of the `coi` image: from an image server, or built here with debootstrap."""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from coi.backend._httpx import httpx
from coi.backend.client import IncusClient
from coi.errors import UsageError
from coi.images.buildlog import BuildLog

BASE_ALIAS = "coi-base-debian-12"
SUITE = "bookworm"
# Enough to boot with systemd, get an address by DHCP and run the build script; the rest is
# installed by the script itself, the same way on every kind of base.
BASE_PACKAGES = (
    "systemd-sysv",
    "udev",
    "dbus",
    "ifupdown",
    "isc-dhcp-client",
    "iproute2",
    "ca-certificates",
    "netbase",
)
_ARCH = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


@dataclass(frozen=True)
class BaseChoice:
    """Where the base comes from, and why (reported to the user)."""

    kind: str  # "local", "server" or "debootstrap"
    source: str  # alias, server URL, or mirror
    reason: str


def choose_base(
    setting: str,
    *,
    server: str,
    server_alias: str,
    mirror: str,
    local_exists: Callable[[str], bool],
    server_answers: Callable[[str], bool],
) -> BaseChoice:
    """Decide where the base comes from.

    :raises UsageError: a setting that cannot be met (server missing, unknown alias).
    """
    if setting == "server" or (setting == "auto" and server):
        if not server:
            raise UsageError(
                "build.base = 'server' but no build.image_server is set",
                resolution="Set [build] image_server, or use build.base = 'debootstrap'.",
            )
        if server_answers(server):
            return BaseChoice("server", f"{server} {server_alias}", "image server answers")
        if setting == "server":
            raise UsageError(f"image server {server} does not answer")
        reason = f"image server {server} does not answer"
    elif setting in ("auto", "debootstrap"):
        reason = "no image server configured" if setting == "auto" else "build.base = debootstrap"
    else:
        if not local_exists(setting):
            raise UsageError(
                f"base image '{setting}' not found",
                resolution="Set [build] base to 'auto', 'debootstrap' or a local image alias.",
            )
        return BaseChoice("local", setting, "build.base names a local image")
    if local_exists(BASE_ALIAS):
        return BaseChoice("local", BASE_ALIAS, f"{reason}; cached debootstrap base")
    return BaseChoice("debootstrap", mirror, reason)


def server_answers(server: str, timeout: float = 3.0) -> bool:
    """Whether a simplestreams server serves its index (only asked when one is configured)."""
    try:
        r = httpx.head(f"{server.rstrip('/')}/streams/v1/index.json", timeout=timeout)
    except httpx.HTTPError:
        return False
    return r.status_code < 400


def _metadata(description: str) -> str:
    arch = _ARCH.get(platform.machine(), platform.machine())
    return (
        f"architecture: {arch}\n"
        f"creation_date: {int(time.time())}\n"
        "properties:\n"
        f"  description: {description}\n"
        "  os: debian\n"
        f"  release: {SUITE}\n"
        # Each container gets its own name as hostname, not the build host's; also after a
        # rename (a spare taken by a sandbox, see sessions/template.py).
        "templates:\n"
        "  /etc/hostname:\n"
        "    when: [create, copy, rename]\n"
        "    template: hostname.tpl\n"
        "  /etc/hosts:\n"
        "    when: [create, copy, rename]\n"
        "    template: hosts.tpl\n"
    )


_HOSTS_TPL = "127.0.0.1 localhost\n127.0.1.1 {{ container.name }}\n::1 localhost ip6-localhost\n"


def _configure_rootfs(root: Path) -> None:
    """What a container needs from the base: DHCP on eth0, no host identity left behind."""
    (root / "etc/network/interfaces").write_text(
        "auto lo\niface lo inet loopback\n\nauto eth0\niface eth0 inet dhcp\n"
    )
    (root / "etc/hostname").write_text("coi\n")
    machine_id = root / "etc/machine-id"
    machine_id.write_text("")  # systemd makes a fresh one at first boot
    dbus_id = root / "var/lib/dbus/machine-id"
    if dbus_id.exists() or dbus_id.is_symlink():
        dbus_id.unlink()
    for p in (root / "var/cache/apt/archives").glob("*.deb"):
        p.unlink()
    shutil.rmtree(root / "var/lib/apt/lists", ignore_errors=True)
    (root / "var/lib/apt/lists/partial").mkdir(parents=True)


def build_debootstrap_base(client: IncusClient, mirror: str, log: BuildLog) -> str:
    """Bootstrap Debian here, import it as BASE_ALIAS; return its fingerprint.

    :raises UsageError: not root, or debootstrap missing.
    """
    if os.geteuid() != 0:
        raise UsageError(
            "building the Debian base with debootstrap needs root (once; it is cached)",
            resolution="Run 'sudo coi build' once, or set [build] base to an existing image.",
        )
    if shutil.which("debootstrap") is None:
        raise UsageError(
            "debootstrap is not installed", resolution="Run 'coi setup' (it installs it)."
        )
    with tempfile.TemporaryDirectory(prefix="coi-base-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        root = work / "rootfs"
        log.run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(BASE_PACKAGES)}",
                SUITE,
                str(root),
                mirror,
            ]
        )
        _configure_rootfs(root)
        (work / "metadata.yaml").write_text(_metadata("coi Debian 12 base (debootstrap)"))
        (work / "templates").mkdir()
        (work / "templates/hostname.tpl").write_text("{{ container.name }}\n")
        (work / "templates/hosts.tpl").write_text(_HOSTS_TPL)
        tarball = work / "base.tar"
        # Uncompressed: packing and unpacking are the slow part, not the bytes.
        log.run(
            ["tar", "--numeric-owner", "--xattrs", "-C", str(work), "-cf", str(tarball),
             "metadata.yaml", "templates", "rootfs"]
        )  # fmt: skip
        log.note(f"importing {tarball.stat().st_size / 1e6:.0f} MB base image")
        old = client.images.alias_target(BASE_ALIAS)
        fp = client.images.import_tarball(
            tarball, properties={"description": "coi Debian 12 base (debootstrap)"}
        )
        client.images.set_alias(BASE_ALIAS, fp)
        if old and old != fp:
            client.images.delete(old)
        return fp
