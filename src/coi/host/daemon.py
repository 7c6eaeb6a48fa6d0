"""Find, install and start the container daemon (Incus preferred, else LXD)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from coi.backend.connection import INCUS_SOCKETS, LXD_SOCKETS
from coi.errors import SetupError


@dataclass(frozen=True)
class DaemonKind:
    """How one daemon flavour is installed and started."""

    name: str  # incus | lxd
    package: str
    binary: str  # the daemon binary
    group: str
    service: str
    sockets: tuple[str, ...]
    log_dir: str


INCUS = DaemonKind(
    "incus", "incus", "incusd", "incus-admin", "incus", INCUS_SOCKETS, "/var/log/incus"
)
LXD = DaemonKind("lxd", "lxd", "lxd", "lxd", "lxd", LXD_SOCKETS, "/var/log/lxd")


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


def installed_kind() -> DaemonKind | None:
    """The daemon whose binary is installed, Incus first."""
    for kind in (INCUS, LXD):
        if _which(kind.binary):
            return kind
    return None


def apt_candidate(package: str) -> bool:
    """Whether apt can install `package` (it has a candidate version)."""
    if not shutil.which("apt-cache"):
        return False
    out = subprocess.run(
        ["apt-cache", "policy", package], capture_output=True, text=True, check=False
    ).stdout
    for line in out.splitlines():
        if line.strip().startswith("Candidate:"):
            return "(none)" not in line
    return False


def kind_to_install() -> DaemonKind:
    """Incus where the distribution packages it, else LXD."""
    if apt_candidate("incus"):
        return INCUS
    if apt_candidate("lxd"):
        return LXD
    raise SetupError(
        "neither incus nor lxd can be installed from this machine's package sources",
        resolution="Install Incus (https://linuxcontainers.org/incus/docs/main/installing/) "
        "and run 'coi setup' again.",
    )


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
