"""Runs one corpus entry the way an agent would: `coi run --monitor` of its script in a fresh
sandbox, and reads what the monitor said (its audit log) and did.

Three variants of every entry: "plain" (the script on the shell's command line, as `coi run
-- sh -c '...'`), "script" (the same text run from a file: no command line shows it) and
"renamed" (the programs it uses replaced by copies under other names or paths).

The start of an attack is the moment the sandbox's shell touches `.attack/t0` in the
workspace (its mtime, read on the host: same clock); the time to alert is the first audit
event at warning or above after it. A paused sandbox waits for review, so the harness removes
it once the pause is logged; an attack nothing answered is ended after its window.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from coi.backend import IncusClient
from coi.errors import CoiError
from coi.sessions.naming import workspace_hash
from tests.attacks import net as attacknet
from tests.attacks.corpus import (
    ACTION,
    DNS_HOST,
    FAKE_CREDENTIALS,
    H2,
    LAN,
    MD,
    PLANT,
    Entry,
    H,
    encoded,
)

VARIANTS = ("plain", "script", "renamed")
EXFIL_LIMIT = 10_000_000  # an exfiltration must be stopped before this much has left
RANK = {"info": 0, "warning": 1, "high": 2, "critical": 3}
APPLETS = ("nc", "sh", "cat", "telnet", "awk", "wget")
# Real programs get a real new name; busybox applets cannot (busybox runs the applet its
# argv[0] names), so they run from a copy of busybox elsewhere, through a link of their name.
RENAMED = {"bash": "kworker", "perl": "updater", "python3": "helper"}
HOSTS = {"H": H, "H2": H2, "LAN": LAN, "MD": MD, "DNS": DNS_HOST}
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Outcome:
    entry: Entry
    variant: str
    skipped: str = ""  # why it did not run (a program the image lacks)
    level: str = "info"
    category: str = ""
    title: str = ""
    action: str = ""
    alert_after: float | None = None  # seconds from the attack's start to the first alert
    # What this run's own connections brought to the listeners, counted once the sandbox is
    # gone and the listeners have read their sockets dry (connections older than the run,
    # another sandbox's, are not counted: see `cross_talk`).
    bytes_out: int | None = None
    # Of bytes_out, what came more than PAUSE_SETTLE s after the pause was logged (the
    # sandbox frozen, its cap in force: nothing should come).
    bytes_after_pause: int | None = None
    cross_talk: int | None = None  # what older connections brought meanwhile (not counted)
    exit_code: int | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    error: str = ""  # the harness could not run it (no start seen)
    output: str = ""  # the end of coi's stdout and stderr, for a failure's message

    @property
    def detected(self) -> bool:
        """An attack raised at the expected level or above, and answered as that level is
        (a kill where a pause was expected stops it all the same); a benign workload ran to
        its end with nothing above info."""
        e = self.entry
        if e.level == "info":
            return self.level == "info" and not self.error and self.exit_code == 0
        if e.measure_bytes and (self.bytes_out or 0) > EXFIL_LIMIT:
            return False  # stopped, but only after it had left
        # "deduplicated", "logged (already killed)": answered moments before, as the level says.
        answered = self.action == ACTION[self.level] or self.action.startswith(
            ("deduplicated", "logged (already")
        )
        return RANK[self.level] >= RANK[e.level] and answered

    def summary(self) -> str:
        got = f"{self.level}/{self.action or '-'}"
        when = f" after {self.alert_after:.2f}s" if self.alert_after is not None else ""
        return (
            f"{self.entry.id} [{self.variant}]: expected {self.entry.level}/{self.entry.action}, "
            f"got {got}{when} ({self.title or 'nothing raised'}) {self.error}".rstrip()
        )


def _libs(binary: str) -> set[str]:
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=False).stdout
    return {part.split()[0] for part in out.splitlines() if "=>" in part}


def host_extras() -> tuple[dict[str, list[str]], dict[str, str]]:
    """The host programs the tiny image is given read-only (its own has no bash or perl): the
    mounts for each, and why one cannot be given."""
    from coi.images.tiny import _shared_libs

    tiny = {Path(lib).name for lib in _shared_libs("/usr/bin/tmux")}
    mounts: dict[str, list[str]] = {}
    missing: dict[str, str] = {}
    bash = shutil.which("bash")
    if bash and _libs(bash) <= tiny | {"linux-vdso.so.1"}:
        mounts["bash"] = [f"{os.path.realpath(bash)}:/usr/local/bin/bash:ro"]
    else:
        missing["bash"] = "the host's bash needs libraries the tiny image lacks"
    perl = shutil.which("perl")
    crypt = Path("/lib/x86_64-linux-gnu/libcrypt.so.1")
    if perl and crypt.exists() and _libs(perl) <= tiny | {"linux-vdso.so.1", crypt.name}:
        mounts["perl"] = [
            f"{os.path.realpath(perl)}:/usr/local/bin/perl:ro",
            f"{crypt.resolve()}:/lib/x86_64-linux-gnu/libcrypt.so.1:ro",
        ]
    else:
        missing["perl"] = "no host perl whose libraries fit the tiny image"
    return mounts, missing


def _subst(text: str, names: dict[str, str]) -> str:
    for k, v in {**HOSTS, **names}.items():
        text = text.replace(f"@{k}@", v)
    return text


def _names(variant: str) -> dict[str, str]:
    if variant == "renamed":
        names = {a: f"/tmp/.k/{a}" for a in APPLETS}
        names.update({p: f"/tmp/.k/{n}" for p, n in RENAMED.items()})
        return names
    names = {a: a for a in APPLETS}
    names["sh"] = "/bin/sh"
    names.update({p: p for p in RENAMED})
    return names


_RENAME_PREP = (
    "mkdir -p /tmp/.k && cp /bin/busybox /tmp/.k/busybox-k && "
    "for a in "
    + " ".join(APPLETS)
    + "; do ln -sf busybox-k /tmp/.k/$a; done; "
    + "; ".join(
        f'command -v {p} >/dev/null && cp "$(command -v {p})" /tmp/.k/{n}'
        for p, n in RENAMED.items()
    )
)


def scripts(entry: Entry, variant: str) -> tuple[str, str]:
    """The workspace's `.attack/run.sh` (setup, the start mark, then the attack) and
    `.attack/job.sh` (the attack)."""
    names = _names(variant)
    job = _subst(entry.script, names)
    if entry.encode:
        job = _subst(encoded(job), names)
    shell = names["bash"] if entry.shell == "bash" else names["sh"]
    lines = ["cd /workspace"]
    if variant == "renamed":
        lines.append(_RENAME_PREP)
    if entry.prep:
        lines.append(entry.prep)
    if variant == "renamed" or entry.prep:
        lines.append("sleep 1")  # what the setup did is seen (and dropped) before the start
    if variant == "script":
        lines += [": > /workspace/.attack/t0", f"exec {shell} /workspace/.attack/job.sh"]
    else:
        lines += [
            'job="$(cat /workspace/.attack/job.sh)"',
            ": > /workspace/.attack/t0",
            f'exec {shell} -c "$job"',
        ]
    return "\n".join(lines) + "\n", job + "\n"


def _creds_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        dirs = sorted({str(Path(p).parent) for p in FAKE_CREDENTIALS} - {"."})
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type, info.mode, info.uid, info.gid = tarfile.DIRTYPE, 0o700, 1000, 1000
            tar.addfile(info)
        for path, text in FAKE_CREDENTIALS.items():
            data = text.encode()
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.uid, info.gid = len(data), 0o600, 1000, 1000
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _events(home: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for f in sorted((home / "audit").glob("*.jsonl")):
        for line in f.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


PAUSE_SETTLE = 0.5  # s: what a pause leaves in flight arrives within this


def _wait(proc: subprocess.Popen[str], t0_file: Path, home: Path, window: float) -> float | None:
    """Until coi ends, a pause is logged, or the window after the start is over; the host
    time the pause was seen, if it was."""
    t0: float | None = None
    hard = time.monotonic() + 90 + window
    while proc.poll() is None and time.monotonic() < hard:
        if t0 is None and t0_file.exists():
            t0 = t0_file.stat().st_mtime_ns / 1e9
        if t0 is not None and time.time() > t0 + window:
            return None  # nothing more to wait for
        if any(e.get("action") == "paused" for e in _events(home)):
            seen = time.time()
            time.sleep(PAUSE_SETTLE)  # let what the pause left in flight settle
            return seen
        time.sleep(0.1)
    return None


def _ts(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"]).timestamp()


CONFIG = f"""\
[monitoring]
enabled = true

[network]
resolver = "{DNS_HOST}"
allowed_domains = ["allowed.coi-test"]
"""


class Runner:
    """Runs entries one at a time against one daemon project and one test network."""

    def __init__(
        self,
        client: IncusClient,
        net: attacknet.Net,
        tmp: Path,
        env: dict[str, str],
        *,
        image: str = "coi-tiny",
        available: set[str] | None = None,
        mounts: dict[str, list[str]] | None = None,
        missing: dict[str, str] | None = None,
    ) -> None:
        self.client = client
        self.net = net
        self.tmp = tmp
        self.image = image
        self.available = available if available is not None else set()
        self.mounts = mounts or {}
        self.missing = missing or {}
        self.config = tmp / "attack-coi.toml"
        self.config.write_text(CONFIG)
        self.env = {**env, "COI_CONFIG": str(self.config)}
        self.count = 0
        self._lock = threading.Lock()  # the counter and the daemon client, across workers

    def _data_files(self) -> tuple[Path, Path]:
        """40 MB of random bytes and their base64, made once and linked into workspaces."""
        data, b64 = self.tmp / "data.bin", self.tmp / "data.b64"
        if not data.exists():
            raw = os.urandom(40_000_000)
            data.write_bytes(raw)
            b64.write_bytes(base64.encodebytes(raw))
        return data, b64

    def lacks(self, entry: Entry) -> str:
        gone = [n for n in entry.needs if n not in self.available and n not in self.mounts]
        if not gone:
            return ""
        why = "; ".join(self.missing.get(n, f"no {n} in {self.image}") for n in gone)
        return f"needs {', '.join(gone)}: {why}"

    def _workspace(self, entry: Entry, variant: str) -> Path:
        """A fresh workspace holding the entry's scripts (and files it needs)."""
        with self._lock:
            self.count += 1
            ws = self.tmp / f"run{self.count}" / "ws"
        (ws / ".attack").mkdir(parents=True)
        run_sh, job_sh = scripts(entry, variant)
        (ws / ".attack" / "run.sh").write_text(run_sh)
        (ws / ".attack" / "job.sh").write_text(job_sh)
        if PLANT in entry.prep:
            (ws / ".attack" / "creds.tar").write_bytes(_creds_tar())
        if entry.data:
            for f in self._data_files():
                os.link(f, ws / ".attack" / f.name)
        return ws

    def _argv(self, entry: Entry, ws: Path) -> list[str]:
        argv = [sys.executable, "-m", "coi", "run", "--monitor", "--image", self.image]
        argv += ["--network", entry.network, "-w", str(ws)]
        argv += ["--limit-processes", str(entry.processes)]
        for need in entry.needs:
            for m in self.mounts.get(need, []) if need not in self.available else []:
                argv += ["--mount", m]
        return [*argv, "--", "sh", "/workspace/.attack/run.sh"]

    def run(self, entry: Entry, variant: str = "plain") -> Outcome:
        if why := self.lacks(entry):
            return Outcome(entry, variant, skipped=why)
        attacknet.check(self.net)  # nothing is sent unless every test address routes to us
        ws = self._workspace(entry, variant)
        home = ws.parent / "home"
        before = self.net.conns() if entry.measure_bytes else {}
        proc = subprocess.Popen(
            self._argv(entry, ws),
            env={**self.env, "COI_HOME": str(home)},
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        t0_file = ws / ".attack" / "t0"
        at_pause: dict[str, attacknet.Conn] | None = None
        try:
            paused_at = _wait(proc, t0_file, home, entry.window)
            if entry.measure_bytes and paused_at is not None:
                at_pause = self.net.conns(after=paused_at + PAUSE_SETTLE)
        finally:
            self._remove(ws)
            try:
                stdout, stderr = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                stdout, stderr = proc.communicate()
        out = Outcome(entry, variant, exit_code=proc.returncode)
        out.output = (stdout[-1500:] + "\n" + stderr[-1500:]).strip()
        if not t0_file.exists():
            out.error = f"the attack never started (coi exit {proc.returncode}): {stderr[-600:]}"
            return out
        t0 = t0_file.stat().st_mtime_ns / 1e9
        events = [e for e in _events(home) if e.get("category") != "monitor"]
        if entry.level != "info":
            # Setup (renamed copies, planted files) comes before the start; only the attack
            # counts. A benign workload is judged on everything.
            events = [e for e in events if _ts(e) >= t0 - 0.05]
        out.events = events
        if events:
            worst = max(RANK[e["level"]] for e in events)
            top = [e for e in events if RANK[e["level"]] == worst]
            acted = [e for e in top if not e["action"].startswith(("deduplicated", "logged ("))]
            first = (acted or top)[0]
            out.level, out.category = first["level"], first["category"]
            out.title, out.action = first["title"], first["action"]
            alerts = [e for e in events if RANK[e["level"]] >= 1]
            if alerts:
                out.alert_after = max(0.0, min(_ts(e) for e in alerts) - t0)
        if entry.measure_bytes:
            self._measure(out, before, at_pause)
        return out

    def _measure(
        self,
        out: Outcome,
        before: dict[str, attacknet.Conn],
        at_pause: dict[str, attacknet.Conn] | None,
    ) -> None:
        """Bytes out, once the sandbox is gone (removed, coi ended) and the listeners have
        read what reached them: only this run's connections count (the listeners see every
        sandbox behind the bridge's one NAT address, so a connection is told by being new)."""
        gone = time.time()
        time.sleep(0.3)  # a socket's last bytes are read after the sandbox went
        after = self.net.conns(after=gone + 0.3)
        mine = {k: c for k, c in after.items() if k not in before}
        out.bytes_out = sum(c.bytes for c in mine.values())
        out.cross_talk = sum(c.bytes - before[k].bytes for k, c in after.items() if k in before)
        if at_pause is not None:
            out.bytes_after_pause = out.bytes_out - sum(
                c.bytes for k, c in at_pause.items() if k not in before
            )

    def _remove(self, ws: Path) -> None:
        """Remove the entry's sandbox (paused, or left running after its window)."""
        tag = workspace_hash(str(ws))
        with self._lock:
            for name in self.client.instances.names():
                if tag in name:
                    try:
                        self.client.instances.delete(name, force=True)
                    except CoiError:  # already gone: coi removed it
                        pass

    def run_all(
        self, jobs: list[tuple[Entry, str]], workers: int = 2
    ) -> dict[tuple[str, str], Outcome]:
        """Each (entry, variant), by (entry id, variant), `workers` at a time; those that must
        run alone afterwards, one at a time."""
        out: dict[tuple[str, str], Outcome] = {}

        # Other network modes too: two sandboxes starting at once on a new or changed bridge
        # once made the daemon fail an ACL update ("flush chain … No such file or directory").
        def single(e: Entry) -> bool:
            return e.measure_bytes or e.alone or e.network != "restricted"

        shared = [j for j in jobs if not single(j[0])]
        alone = [j for j in jobs if single(j[0])]
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for (e, v), o in zip(shared, pool.map(lambda j: self.run(*j), shared), strict=True):
                out[(e.id, v)] = o
        for e, v in alone:
            out[(e.id, v)] = self.run(e, v)
        return out


PROBED = ("bash", "perl", "python3", "git", "cc")


def probe(image: str, env: dict[str, str], ws: Path) -> set[str]:
    """Which of PROBED the image itself has (one short `coi run`)."""
    ws.mkdir(parents=True, exist_ok=True)
    script = "for p in " + " ".join(PROBED) + "; do command -v $p >/dev/null && echo have:$p; done"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "coi",
            "run",
            "--image",
            image,
            "-w",
            str(ws),
            "--",
            "sh",
            "-c",
            script,
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    have = {line[5:] for line in res.stdout.split() if line.startswith("have:")}
    if image == "coi-tiny":
        have.discard("bash")  # its bash is a two-line wrapper that runs busybox ash
    return have
