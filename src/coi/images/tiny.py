"""The tiny image: busybox + tmux from the host's Debian packages, built in about a second.

It has a user `code` (uid 1000), busybox init as PID 1 (it reaps zombies and stops on the
daemon's power signal), DHCP on eth0, and tmux. Tests and health probes use it; nothing is
downloaded from an image server.
"""

from __future__ import annotations

import io
import re
import subprocess
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from coi.errors import SetupError

TINY_ALIAS = "coi-tiny"
DESCRIPTION = "coi tiny image (busybox, tmux)"
# Raised whenever what goes into the image changes: `coi setup` then rebuilds it.
TINY_VERSION = "4"
VERSION_PROPERTY = "coi.tiny.version"

_TERMINFO = (
    "dumb",
    "linux",
    "vt100",
    "xterm",
    "xterm-256color",
    "screen",
    "screen-256color",
    "tmux",
    "tmux-256color",
)

_INITTAB = """\
::sysinit:/etc/init.d/rcS
::shutdown:/bin/sync
"""

_RCS = """\
#!/bin/sh
# Bring up the network; the daemon already mounted /proc, /sys and /dev.
hostname -F /etc/hostname 2>/dev/null
ip link set lo up
if ip link show eth0 >/dev/null 2>&1; then
    ip link set eth0 up
    udhcpc -b -q -t 20 -T 1 -i eth0 -s /etc/udhcpc.script >/dev/null 2>&1 &
fi
exit 0
"""

_UDHCPC = """\
#!/bin/sh
# Minimal udhcpc hook: address, default route and resolver from the lease. coi may have set
# the sandbox's reserved address already (network/address.py): an address on the interface is
# kept, and the lease's added only when there is none (a DHCP server that has not yet read the
# reservation hands out a pool address).
case "$1" in
  bound|renew)
    if [ -z "$(ip -4 addr show dev "$interface" | awk '/inet /{print $2}')" ]; then
      ip addr add "$ip/${mask:-24}" dev "$interface" 2>/dev/null
    fi
    [ -n "$router" ] && ip route replace default via "${router%% *}" dev "$interface"
    : > /etc/resolv.conf.new
    for ns in $dns; do echo "nameserver $ns" >> /etc/resolv.conf.new; done
    mv /etc/resolv.conf.new /etc/resolv.conf
    ;;
esac
exit 0
"""

_PASSWD = "root:x:0:0:root:/root:/bin/sh\ncode:x:1000:1000:code:/home/code:/bin/sh\n"
_GROUP = "root:x:0:\ncode:x:1000:\nsudo:x:27:code\n"


@dataclass(frozen=True)
class _Entry:
    path: str  # inside the rootfs, without leading slash
    kind: str  # file, dir, symlink
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    target: str = ""


def host_requirements() -> dict[str, str]:
    """Host files the tiny image is made of, and the Debian package that provides each."""
    return {"/bin/busybox": "busybox-static", "/usr/bin/tmux": "tmux"}


def _shared_libs(binary: str) -> list[str]:
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=False).stdout
    libs = []
    for line in out.splitlines():
        m = re.search(r"(/\S+)", line.split("=>")[-1])
        if m and Path(m.group(1)).exists():
            libs.append(m.group(1))
    return libs


def _entries() -> list[_Entry]:
    missing = [
        f"{p} (package {pkg})" for p, pkg in host_requirements().items() if not Path(p).exists()
    ]
    if missing:
        raise SetupError(
            "cannot build the tiny image: host files are missing",
            details="Missing: " + ", ".join(missing),
            resolution="Run 'coi setup' (it installs them) or apt-get install busybox-static tmux.",
        )
    entries: list[_Entry] = []
    dirs = [
        "bin",
        "sbin",
        "usr",
        "usr/bin",
        "usr/sbin",
        "etc",
        "etc/init.d",
        "proc",
        "sys",
        "dev",
        "run",
        "var",
        "var/log",
        "root",
        "lib",
        "lib64",
        "usr/lib",
        "workspace",
        "usr/share",
        "usr/share/terminfo",
        "mnt",
    ]
    entries += [_Entry(d, "dir", mode=0o755) for d in dirs]
    entries += [
        _Entry("tmp", "dir", mode=0o1777),
        _Entry("home", "dir", mode=0o755),
        _Entry("home/code", "dir", mode=0o755, uid=1000),
    ]
    entries.append(_Entry("bin/busybox", "file", Path("/bin/busybox").read_bytes(), 0o755))
    applets = subprocess.run(
        ["/bin/busybox", "--list-full"], capture_output=True, text=True, check=True
    ).stdout.split()
    for applet in applets:
        if applet != "bin/busybox":
            entries.append(_Entry(applet, "symlink", target="/bin/busybox"))
    # Sessions fall back to `bash` when the agent exits; busybox's ash stands in for it.
    entries.append(_Entry("bin/bash", "file", b'#!/bin/sh\nexec /bin/sh "$@"\n', 0o755))
    entries.append(_Entry("usr/bin/tmux", "file", Path("/usr/bin/tmux").read_bytes(), 0o755))
    seen_dirs = set(dirs)
    for lib in _shared_libs("/usr/bin/tmux"):
        real = Path(lib).resolve()
        rel = lib.lstrip("/")
        parent = str(Path(rel).parent)
        parts = Path(parent).parts
        for i in range(1, len(parts) + 1):
            d = str(Path(*parts[:i]))
            if d not in seen_dirs:
                seen_dirs.add(d)
                entries.append(_Entry(d, "dir", mode=0o755))
        entries.append(_Entry(rel, "file", real.read_bytes(), 0o755))
    entries += _locale_entries(seen_dirs)
    for name in _TERMINFO:
        for base in ("/lib/terminfo", "/usr/share/terminfo"):
            src = Path(base) / name[0] / name
            if src.exists():
                d = f"usr/share/terminfo/{name[0]}"
                if d not in seen_dirs:
                    seen_dirs.add(d)
                    entries.append(_Entry(d, "dir", mode=0o755))
                entries.append(_Entry(f"{d}/{name}", "file", src.resolve().read_bytes()))
                break
    entries += [
        _Entry("sbin/init", "symlink", target="/bin/busybox"),
        _Entry("etc/inittab", "file", _INITTAB.encode()),
        _Entry("etc/init.d/rcS", "file", _RCS.encode(), 0o755),
        _Entry("etc/udhcpc.script", "file", _UDHCPC.encode(), 0o755),
        _Entry("etc/passwd", "file", _PASSWD.encode()),
        _Entry("etc/group", "file", _GROUP.encode()),
        _Entry("etc/hostname", "file", b"coi\n"),
        _Entry("etc/hosts", "file", b"127.0.0.1 localhost\n"),
        _Entry("etc/resolv.conf", "file", b""),
        _Entry(
            "etc/profile", "file", b"export PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin\n"
        ),
    ]
    return entries


def _locale_entries(seen_dirs: set[str]) -> list[_Entry]:
    """glibc's C.UTF-8 locale: tmux refuses to start without a UTF-8 locale."""
    entries: list[_Entry] = []
    locale_dir = Path("/usr/lib/locale/C.utf8")
    if not locale_dir.is_dir():
        return entries
    for d in ("usr/lib/locale", "usr/lib/locale/C.utf8", "usr/lib/locale/C.utf8/LC_MESSAGES"):
        if d not in seen_dirs:
            seen_dirs.add(d)
            entries.append(_Entry(d, "dir", mode=0o755))
    for f in sorted(locale_dir.rglob("*")):
        if f.is_file():
            entries.append(
                _Entry(f"usr/lib/locale/C.utf8/{f.relative_to(locale_dir)}", "file", f.read_bytes())
            )
    return entries


def _metadata() -> bytes:
    return (
        "architecture: x86_64\n"
        f"creation_date: {int(time.time())}\n"
        "properties:\n"
        f"  description: {DESCRIPTION}\n"
        "  os: busybox\n"
        "  release: tiny\n"
        # Each container gets its own name as hostname, also after a rename (a spare).
        "templates:\n"
        "  /etc/hostname:\n"
        "    when: [create, copy, rename]\n"
        "    template: hostname.tpl\n"
    ).encode()


def build_tarball(dest: Path) -> Path:
    """Write the unified image tarball (metadata.yaml + rootfs/) to `dest`."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".part")
    with tarfile.open(tmp, "w") as tar:
        _add(tar, "metadata.yaml", _metadata(), 0o644)
        _add_dir(tar, "templates", 0o755, 0)
        _add(tar, "templates/hostname.tpl", b"{{ container.name }}\n", 0o644)
        _add_dir(tar, "rootfs", 0o755, 0)
        for e in _entries():
            name = f"rootfs/{e.path}"
            if e.kind == "dir":
                _add_dir(tar, name, e.mode, e.uid)
            elif e.kind == "symlink":
                info = tarfile.TarInfo(name)
                info.type = tarfile.SYMTYPE
                info.linkname = e.target
                tar.addfile(info)
            else:
                _add(tar, name, e.data, e.mode, e.uid)
    tmp.replace(dest)
    return dest


def _add(tar: tarfile.TarFile, name: str, data: bytes, mode: int, uid: int = 0) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.uid, info.gid = len(data), mode, uid, uid
    info.mtime = int(time.time())
    tar.addfile(info, io.BytesIO(data))


def _add_dir(tar: tarfile.TarFile, name: str, mode: int, uid: int) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.uid, info.gid = tarfile.DIRTYPE, mode, uid, uid
    info.mtime = int(time.time())
    tar.addfile(info)
