"""`--profile hardened` (secrets masked, monitor on, restricted, gone after), `coi logs -f`,
`coi audit -f` on a live session, `coi top --format json` against the daemon's state API.

Run as the unprivileged test user, in the tiny image.
"""

from __future__ import annotations

import json
import pwd
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.conftest import coi_argv, run_coi
from tests.integration.conftest import (
    USER,
    coi_names,
    remove_containers,
    user_dir,
    wait_for,
    wait_gone,
)

from coi import labels
from coi.backend import IncusClient


def _coi(uenv: dict[str, str], *args: str) -> tuple[int, str, str]:
    r = run_coi(*args, env=uenv, user=USER)
    return r.returncode, r.stdout, r.stderr


def _workspace(base: Path, user: pwd.struct_passwd) -> Path:
    ws = user_dir(base / "ws", user)
    files = {
        ".env": "API_KEY=host-secret-1\n",
        ".env.local": "host-secret-2\n",
        "deploy/server.pem": "host-secret-3\n",
        "deep/er/id_ed25519": "host-secret-4\n",
        "secrets/db/password": "host-secret-5\n",
        "README": "live file\n",
        "src/app.py": "print('hi')\n",
    }
    for rel, text in files.items():
        path = ws / rel
        for parent in reversed(path.relative_to(ws).parents[:-1]):
            user_dir(ws / parent, user)
        path.write_text(text)
    subprocess.run(["chown", "-R", f"{user.pw_uid}:{user.pw_gid}", str(ws)], check=True)
    return ws


# What the agent tries, as the agent user: read each secret, then get at the real file under
# the mask by writing, removing, renaming, linking or copying it; a folder mask by listing.
ATTACK = r"""
cd /workspace
for f in .env .env.local deploy/server.pem deep/er/id_ed25519; do echo "READ $f [$(cat $f)]"; done
echo "LIST secrets [$(ls -A secrets)]"
echo "GREP [$(grep -rl host-secret . 2>/dev/null | wc -l)]"
echo x > .env 2>/dev/null && echo "WROTE .env"
rm -f .env 2>/dev/null && echo "REMOVED .env"
mv .env moved 2>/dev/null && echo "MOVED .env"
ln .env hard 2>/dev/null && echo "LINKED [$(cat hard)]"
cp .env copy 2>/dev/null && echo "COPIED [$(cat copy)]"
echo "LIVE [$(cat README)]"
echo new > created.txt && echo "CREATED"
"""


def test_hardened_masks_secrets_with_the_monitor_on_a_restricted_network_and_leaves_nothing(
    client: IncusClient, base: Path, uenv: dict[str, str], user: pwd.struct_passwd
) -> None:
    ws = _workspace(base, user)
    try:
        code, out, err = _coi(
            uenv, "run", "--profile", "hardened", "--image", "coi-tiny", "-w", str(ws),
            "--", "sh", "-c", ATTACK,
        )  # fmt: skip
        assert code == 0, err
        for f in (".env", ".env.local", "deploy/server.pem", "deep/er/id_ed25519"):
            assert f"READ {f} []" in out, out
        assert "LIST secrets []" in out
        assert "GREP [0]" in out  # nothing in the workspace reads as a secret
        for verb in ("WROTE", "REMOVED", "MOVED", "LINKED", "COPIED [host"):
            assert verb not in out, out
        assert "LIVE [live file]" in out and "CREATED" in out
        # Said at start; the monitor on (its audit log), the network restricted and proven.
        assert "Secrets masked (read as empty inside): .env, .env.local" in err
        assert "Network mode: restricted" in err and "Network policy verified" in err
        name = next(line.split()[2] for line in err.splitlines() if "Launching container" in line)
        audit = Path(uenv["COI_HOME"]) / "audit" / f"{name}.jsonl"
        assert '"title":"Monitoring started"' in audit.read_text()
        wait_gone(client, ws)  # ephemeral: gone after the session
        # The host files are whole, the live workspace took the agent's new file.
        assert (ws / ".env").read_text() == "API_KEY=host-secret-1\n"
        assert (ws / "secrets" / "db" / "password").read_text() == "host-secret-5\n"
        assert (ws / "created.txt").read_text() == "new\n"
        assert not any((ws / n).exists() for n in ("moved", "hard"))
        assert (ws / "copy").read_text() == ""  # a copy of the mask: empty
        # Its session log says how it went.
        code, out, _ = _coi(uenv, "logs", name, "--format", "json")
        events = [json.loads(line)["event"] for line in out.splitlines()]
        assert code == 0 and {"start", "policy", "exit", "end"} <= set(events)
    finally:
        remove_containers(client, ws)


def test_hardened_refuses_a_flag_that_loosens_it_before_anything_is_made(
    client: IncusClient, base: Path, uenv: dict[str, str], user: pwd.struct_passwd
) -> None:
    ws = _workspace(base, user)
    for loosen in (["--network", "open"], ["--persistent"]):
        code, _, err = _coi(
            uenv, "run", "--profile", "hardened", *loosen, "--image", "coi-tiny", "-w", str(ws),
            "--", "true",
        )  # fmt: skip
        assert code == 2, err
        assert "loosens the built-in profile hardened" in err
    # Nor an existing container, whose network, mounts and lifetime are its own.
    code, _, err = _coi(uenv, "shell", "--profile", "hardened", "--container", "x", "-w", str(ws))
    assert code == 2 and "--container cannot be used with --profile hardened" in err
    assert coi_names(client, ws) == []


class _Follower:
    """A `coi logs -f`/`coi audit -f` process whose lines are collected as they come."""

    def __init__(self, uenv: dict[str, str], *args: str) -> None:
        self.proc = subprocess.Popen(
            coi_argv(*args, user=USER),
            env=uenv,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def has(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    def wait_exit(self, timeout: float = 30) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return code

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def live(
    client: IncusClient, base: Path, uenv: dict[str, str], user: pwd.struct_passwd
) -> Iterator[tuple[Path, str]]:
    """A `coi shell --background --debug --monitor` session in the tiny image."""
    ws = user_dir(base / "live", user)
    code, _, err = _coi(
        uenv, "shell", "--background", "--debug", "--monitor", "--image", "coi-tiny",
        "-w", str(ws),
    )  # fmt: skip
    assert code == 0, err
    (name,) = coi_names(client, ws)
    try:
        yield ws, name
    finally:
        remove_containers(client, ws)


def test_logs_and_audit_follow_a_live_session_until_it_ends(
    client: IncusClient, uenv: dict[str, str], live: tuple[Path, str]
) -> None:
    ws, name = live
    logs = _Follower(uenv, "logs", "-f", "-w", str(ws))  # by workspace: its newest session
    audit = _Follower(uenv, "audit", "-f", name)
    try:
        wait_for(lambda: logs.has(" start ") and logs.has(" detach "), "coi logs -f: the start")
        assert logs.has("policy  network restricted")
        wait_for(lambda: audit.has("Monitoring started"), "coi audit -f: the monitor's start")
        # The agent scans its environment for secrets: the detached monitor service writes
        # the event while the followers run.
        code, _, err = _coi(
            uenv, "container", "exec", name, "--", "sh", "-c", "env | grep -i token; sleep 6; true"
        )
        wait_for(lambda: audit.has("Environment scanning detected"), "the live audit event")
        # coi logs shows the monitor's alert among coi's own events.
        wait_for(lambda: logs.has("alert   WARNING Environment scanning detected"), "the alert")
        assert not logs.has(" end ")
        code, _, err = _coi(uenv, "kill", name)
        assert code == 0, err
        assert logs.wait_exit() == 0  # the end was written: the follower stops
        assert logs.has("end     removed by coi kill")
        assert audit.wait_exit() == 0  # the sandbox is gone: so does this one
        # --format json: the audit log's records as they are.
        code, out, _ = _coi(uenv, "audit", name, "--format", "json", "--level", "warning")
        records = [json.loads(line) for line in out.splitlines()]
        assert code == 0 and records and all(r["level"] != "info" for r in records)
        assert any(r["category"] == "env_scanning" for r in records)
    finally:
        logs.stop()
        audit.stop()


def test_logs_refuses_a_name_that_is_a_path(uenv: dict[str, str]) -> None:
    code, _, err = _coi(uenv, "logs", "../../etc/passwd")
    assert code == 2 and "not a container name" in err


def test_top_json_matches_the_state_api(
    client: IncusClient, uenv: dict[str, str], live: tuple[Path, str]
) -> None:
    _ws, name = live
    before = client.instances.state(name).raw
    code, out, err = _coi(uenv, "top", "--format", "json")
    after = client.instances.state(name).raw
    assert code == 0, err
    (row,) = [r for r in json.loads(out) if r["name"] == name]

    def between(value: float, a: float, b: float, slack: float = 0.0) -> bool:
        return min(a, b) * (1 - slack) <= value <= max(a, b) * (1 + slack)

    # Counters only grow: coi's sample lies between two readings of the state API.
    assert between(row["cpu_seconds"], before["cpu"]["usage"] / 1e9, after["cpu"]["usage"] / 1e9)
    nic = "eth0"
    for ours, theirs in (("net_rx_bytes", "bytes_received"), ("net_tx_bytes", "bytes_sent")):
        a = before["network"][nic]["counters"][theirs]
        b = after["network"][nic]["counters"][theirs]
        assert between(row[ours], a, b), (ours, row[ours], a, b)
    # Memory moves both ways in an idle shell: within a tenth of the two readings.
    assert between(row["memory_bytes"], before["memory"]["usage"], after["memory"]["usage"], 0.1)
    assert row["processes"] in (before["processes"], after["processes"])
    disk = [
        int(((s.get("disk") or {}).get("root") or {}).get("usage") or 0) for s in (before, after)
    ]
    assert between(row["disk_bytes"], *disk, 0.1)  # 0 where the pool does not count it
    assert row["status"] == "Running" and row["cpu_percent"] is None


def _home_file(uenv: dict[str, str], name: str, path: str) -> tuple[int, str]:
    code, out, _ = _coi(uenv, "container", "exec", name, "--", "cat", path)
    return code, out


def test_the_agent_is_told_where_it_is_in_its_home_never_the_workspace(
    client: IncusClient,
    base: Path,
    uenv: dict[str, str],
    user: pwd.struct_passwd,
    live: tuple[Path, str],
) -> None:
    ws, name = live
    code, text = _home_file(uenv, name, "/home/code/SANDBOX_CONTEXT.md")
    assert code == 0
    assert "You are in a coi sandbox" in text and "`/workspace`" in text
    assert "Network: restricted" in text and "no host credential" in text
    assert "ask the user" in text
    # Claude Code's user memory holds it too (the default tool; --debug ran bash instead).
    code, memory = _home_file(uenv, name, "/home/code/.claude/CLAUDE.md")
    assert code == 0 and "<!-- coi sandbox context -->" in memory and text in memory
    assert sorted(p.name for p in ws.iterdir()) == []  # nothing in the user's folder
    # Off with [tool] sandbox_context = false.
    user_dir(Path(uenv["HOME"]) / ".config" / "coi", user)
    (Path(uenv["HOME"]) / ".config" / "coi" / "config.toml").write_text(
        "[tool]\nsandbox_context = false\n"
    )
    ws2 = user_dir(base / "quiet", user)
    try:
        code, _, err = _coi(
            uenv, "shell", "--background", "--debug", "--image", "coi-tiny", "-w", str(ws2)
        )
        assert code == 0, err
        (other,) = coi_names(client, ws2)
        code, _ = _home_file(uenv, other, "/home/code/SANDBOX_CONTEXT.md")
        assert code != 0
    finally:
        remove_containers(client, ws2)


def test_resuming_a_persistent_session_under_hardened_stays_ephemeral(
    client: IncusClient, base: Path, uenv: dict[str, str], user: pwd.struct_passwd
) -> None:
    ws = user_dir(base / "resume", user)
    shell = ("shell", "--background", "--debug", "--image", "coi-tiny", "-w", str(ws))
    try:
        code, _, err = _coi(uenv, *shell, "--persistent")
        assert code == 0, err
        (name,) = coi_names(client, ws)
        assert _coi(uenv, "kill", name)[0] == 0
        code, _, err = _coi(uenv, *shell, "--resume", "--profile", "hardened")
        assert code == 0, err
        assert "Not inheriting persistent mode: the built-in profile hardened" in err
        assert "Inherited persistent mode" not in err
        (name,) = coi_names(client, ws)
        assert client.instances.get(name).config[labels.PERSISTENT] == "false"
    finally:
        remove_containers(client, ws)
