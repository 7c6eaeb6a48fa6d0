"""Find, install and start the container daemon (Incus preferred, else LXD)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from coi.backend.connection import INCUS_SOCKETS, LXD_SOCKETS
from coi.errors import SetupError


@dataclass(frozen=True)
class DaemonKind:
    """How one daemon flavour is installed and started."""

    name: str  # incus | lxd
    packages: tuple[str, ...]  # what apt installs, without recommends
    binary: str  # the daemon binary
    group: str
    service: str
    sockets: tuple[str, ...]
    log_dir: str


# incus-base is the container-only daemon: the `incus` package adds VM support, and with its
# recommends QEMU and a desktop stack (hundreds of MB) that a container sandbox never uses.
INCUS = DaemonKind(
    "incus",
    ("incus-base", "incus-client"),
    "incusd",
    "incus-admin",
    "incus",
    INCUS_SOCKETS,
    "/var/log/incus",
)
LXD = DaemonKind("lxd", ("lxd",), "lxd", "lxd", "lxd", LXD_SOCKETS, "/var/log/lxd")
KINDS = {"incus": INCUS, "lxd": LXD}

DaemonChoice = Literal["auto", "incus", "lxd"]

# Debian releases whose own suite has no Incus but whose backports suite does.
BACKPORTS = {"bookworm": "bookworm-backports"}
BACKPORTS_SOURCE = Path("/etc/apt/sources.list.d/coi-backports.sources")
APT_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
DEFAULT_MIRROR = "http://deb.debian.org/debian"


def _which(binary: str) -> str | None:
    # incusd lives outside PATH on some distributions.
    found = shutil.which(binary)
    if found:
        return found
    for d in ("/usr/libexec/incus", "/usr/lib/incus", "/opt/incus/bin", "/usr/sbin"):
        p = Path(d) / binary
        if p.is_file():
            return str(p)
    return None


def installed_kind(choice: DaemonChoice = "auto") -> DaemonKind | None:
    """The daemon asked for if it is installed; for "auto" the one that runs, else the one
    installed, Incus first (with both installed, a second must not be started beside the
    first: they name their bridges alike)."""
    if choice != "auto":
        return KINDS[choice] if _which(KINDS[choice].binary) else None
    installed = [k for k in (INCUS, LXD) if _which(k.binary)]
    for kind in installed:
        if running_socket(kind):
            return kind
    return installed[0] if installed else None


def running_socket(kind: DaemonKind) -> str | None:
    """The daemon's socket if it answers a connect there."""
    from coi.backend.connection import is_listening

    return next((s for s in kind.sockets if is_listening(s)), None)


def apt_candidate(package: str, *, release: str | None = None) -> str | None:
    """The version apt would install for `package` (from `release`), or None."""
    if not shutil.which("apt-cache"):
        return None
    argv = ["apt-cache", "policy", package]
    out = subprocess.run(argv, capture_output=True, text=True, check=False).stdout
    return candidate_from_policy(out, release=release)


def candidate_from_policy(policy: str, *, release: str | None = None) -> str | None:
    """Read `apt-cache policy` output: the candidate, or with `release` the best version
    that suite offers (backports are pinned at 100, below the candidate of the main suite)."""
    if release is None:
        for line in policy.splitlines():
            if line.strip().startswith("Candidate:"):
                value = line.split(":", 1)[1].strip()
                return None if value == "(none)" else value
        return None
    version: str | None = None
    for line in policy.splitlines():
        words = line.replace("***", "").split()
        # A version line: "<version> <priority>"; its sources follow, indented deeper.
        if len(words) == 2 and words[1].lstrip("-").isdigit() and not line.startswith("  " * 4):
            version = words[0]
        elif version and any(w.startswith(release + "/") for w in words):
            return version
    return None


def os_release(path: Path = Path("/etc/os-release")) -> dict[str, str]:
    """/etc/os-release as a dict (empty when it is missing)."""
    out: dict[str, str] = {}
    try:
        text = path.read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip()] = value.strip().strip('"')
    return out


def _source_files() -> list[Path]:
    files: list[Path] = []
    for p in APT_SOURCES:
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix in (".list", ".sources"))
    return files


def _source_words(files: list[Path] | None) -> Iterator[tuple[str, list[str]]]:
    """(file suffix, words) of every line of the apt sources, comments left out."""
    for f in _source_files() if files is None else files:
        try:
            text = f.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            yield f.suffix, line.split("#", 1)[0].split()


def has_suite(suite: str, files: list[Path] | None = None) -> bool:
    """Whether an enabled apt source already names `suite` (ours or the admin's)."""
    return any(
        suite in words and (suffix != ".list" or words[:1] == ["deb"])
        for suffix, words in _source_words(files)
    )


def debian_mirror(files: list[Path] | None = None) -> str:
    """The Debian mirror the machine already uses (so backports come from the same place)."""
    for suffix, words in _source_words(files):
        if words[:1] != ["URIs:" if suffix == ".sources" else "deb"]:
            continue
        uris = [w for w in words[1:] if w.rstrip("/").endswith("/debian")]
        if uris:
            return uris[0].rstrip("/")
    return DEFAULT_MIRROR


def backports_source(suite: str, mirror: str) -> str:
    """The deb822 source file coi writes to enable a backports suite."""
    return (
        "# Written by 'coi setup': Incus comes from here on this Debian release.\n"
        "Types: deb\n"
        f"URIs: {mirror}\n"
        f"Suites: {suite}\n"
        "Components: main\n"
        f"Signed-By: {DEBIAN_KEYRING}\n"
    )


@dataclass(frozen=True)
class InstallPlan:
    """What `coi setup` installs for the daemon, and from where."""

    kind: DaemonKind
    packages: tuple[str, ...]
    release: str | None = None  # apt's -t, for a backports suite
    enable_backports: bool = False  # write BACKPORTS_SOURCE first
    notes: list[str] = field(default_factory=list)


def plan_install(
    choice: DaemonChoice = "auto",
    *,
    backports: bool = True,
    release_info: Mapping[str, str] | None = None,
    candidate: Callable[..., str | None] = apt_candidate,
    suite_enabled: Callable[[str], bool] = has_suite,
) -> InstallPlan:
    """Pick the daemon to install: Incus from the distribution, else from Debian backports
    (enabled here unless refused), else LXD; or what `choice` names.

    `candidate(package, release=...)` is apt's answer after any `apt-get update`; the caller
    runs that update first.
    """
    info = os_release() if release_info is None else release_info
    codename = info.get("VERSION_CODENAME", "")
    suite = BACKPORTS.get(codename) if info.get("ID") == "debian" else None
    if choice in ("auto", "incus"):
        if candidate("incus-base"):
            return InstallPlan(INCUS, INCUS.packages)
        if candidate("incus"):
            # A distribution without the split packages: the whole daemon.
            return InstallPlan(INCUS, ("incus",))
        if suite and candidate("incus-base", release=suite):
            return InstallPlan(INCUS, INCUS.packages, release=suite)
        if suite and backports and not suite_enabled(suite):
            return InstallPlan(INCUS, INCUS.packages, release=suite, enable_backports=True)
        if choice == "incus":
            raise SetupError(
                "Incus cannot be installed from this machine's package sources",
                details=(
                    f"Debian {codename} has Incus only in {suite}, and --no-backports refused it."
                    if suite and not backports
                    else None
                ),
                resolution="Install Incus (https://linuxcontainers.org/incus/docs/main/installing/)"
                " and run 'coi setup' again, or use 'coi setup --daemon lxd'.",
            )
    if candidate("lxd"):
        notes = []
        if choice == "auto":
            notes.append("Incus is not packaged here: installing LXD instead")
        return InstallPlan(LXD, LXD.packages, notes=notes)
    raise SetupError(
        f"{'neither incus nor lxd' if choice == 'auto' else choice} can be installed from this "
        "machine's package sources",
        resolution="Install Incus (https://linuxcontainers.org/incus/docs/main/installing/) "
        "and run 'coi setup' again.",
    )


def enable_backports(suite: str) -> str:
    """Write coi's deb822 source for `suite`; returns the path written."""
    BACKPORTS_SOURCE.write_text(backports_source(suite, debian_mirror()))
    return str(BACKPORTS_SOURCE)


def systemd_running() -> bool:
    return Path("/run/systemd/system").is_dir()


def socket_of(kind: DaemonKind) -> str | None:
    for s in kind.sockets:
        if Path(s).exists():
            return s
    return None


def _pid_file(kind: DaemonKind) -> Path:
    return Path(kind.log_dir) / "coi-daemon.pid"


def start_daemon(kind: DaemonKind, *, timeout: float = 60) -> str:
    """Start the daemon: with systemd where it runs, else in the background ourselves.

    Returns how it was started, for the report.
    """
    if systemd_running():
        subprocess.run(["systemctl", "start", kind.service], check=True, capture_output=True)
        how = f"systemctl start {kind.service}"
    else:
        binary = _which(kind.binary)
        if not binary:
            raise SetupError(f"the {kind.name} daemon binary '{kind.binary}' is not installed")
        Path(kind.log_dir).mkdir(parents=True, exist_ok=True)
        log = Path(kind.log_dir) / f"{kind.binary}.log"
        # No systemd: run it detached in its own session so it outlives this process.
        with open(os.devnull, "rb") as null_in, log.open("ab") as out:
            proc = subprocess.Popen(
                [binary, "--group", kind.group, "--logfile", str(log)],
                stdin=null_in,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        _pid_file(kind).write_text(f"{proc.pid}\n")
        how = f"started {kind.binary} in the background (log: {log})"
    wait_ready(kind, timeout=timeout)
    return how


def wait_ready(kind: DaemonKind, *, timeout: float = 60) -> None:
    """Wait until the daemon answers on its socket."""
    from coi.backend.client import IncusClient
    from coi.backend.connection import Endpoint
    from coi.errors import BackendError

    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        sock = socket_of(kind)
        if sock:
            try:
                with IncusClient(Endpoint(sock), timeout=5) as c:
                    c.get("/1.0")
                return
            except BackendError as err:
                last = err
        time.sleep(0.2)
    raise SetupError(
        f"the {kind.name} daemon did not become ready within {timeout:.0f}s",
        details=str(last) if last else None,
        resolution=f"Look at the daemon log in {kind.log_dir}.",
    )


def _daemon_pids(kind: DaemonKind) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            argv
            and os.path.basename(argv[0].decode(errors="replace")) == kind.binary
            and (len(argv) < 2 or argv[1] in (b"--group", b"--logfile", b"--debug", b""))
        ):
            pids.append(int(proc.name))
    return pids


def restart_daemon(kind: DaemonKind) -> str:
    """Restart the daemon so it rereads /etc/subuid and /etc/subgid. Containers keep running."""
    if systemd_running():
        subprocess.run(["systemctl", "restart", kind.service], check=True, capture_output=True)
        wait_ready(kind)
        return f"systemctl restart {kind.service}"
    for pid in _daemon_pids(kind):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 30
    while _daemon_pids(kind) and time.monotonic() < deadline:
        time.sleep(0.1)
    return start_daemon(kind)
