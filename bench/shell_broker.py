"""What the credential broker adds to a `coi shell` start, same machine, same run.

    sudo .venv/bin/python bench/shell_broker.py [--runs 5]

`coi shell --background` of the tests' `standin-api` tool (tests/standin: it declares a
broker for the anthropic provider) on `coi-tiny`, the whole command (interpreter start
included) until it returns with the agent running in tmux, alternating:
- copy: `COI_CREDENTIALS=copy`, no broker (what every session did before);
- broker: the broker's host process spawned and its proxy device added (the daemon takes a
  second for that, overlapped with the network proof and the rest of the set-up).
Then the broker service's memory (RSS) while it serves an idle session.

    sudo .venv/bin/python bench/shell_broker.py --timeline

instead runs one (warm) start of each mode with coi's own steps stamped in-process (the
container made, the device asked for and added, the network proof, the broker process
spawned and ready, tmux started): where the broker's time goes. The provider is the
tests' stand-in (tests/credkit.py, 203.0.113.x in a network namespace this script makes);
nothing is sent anywhere else. Sandboxes and sessions go to a state dir of their own,
removed at the end; each run's sandbox is removed before the next (not timed).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import credkit

from coi.backend import IncusClient
from coi.sessions.naming import workspace_hash

ROOT = Path(__file__).resolve().parent.parent
STANDIN = ROOT / "tests" / "standin"


# Runs coi's CLI with its steps wrapped to print when each starts and ends (stderr lines
# "  <seconds> <thread> <step> >|<").
_TIMELINE = r"""
import functools, sys, threading, time
t0 = time.perf_counter()
marks = []
def wrap(obj, name):
    f = getattr(obj, name, None)
    if f is None:
        return
    def mark(edge):
        who = threading.current_thread().name[:12]
        marks.append((time.perf_counter() - t0, who, name, edge))
    @functools.wraps(f)
    def g(*a, **k):
        mark(">")
        try:
            return f(*a, **k)
        finally:
            mark("<")
    setattr(obj, name, g)
from coi.backend.instances import InstancesAPI
from coi.credentials import service, session
from coi.sessions import runner, sandbox
for obj, name in ((InstancesAPI, "create"), (InstancesAPI, "add_device"),
                  (sandbox.Sandbox, "verify_network"), (runner.ShellSession, "_start_broker"),
                  (runner.ShellSession, "_broker_ready"),
                  (runner.ShellSession, "_new_tmux_session"),
                  (service, "spawn"), (service.Service, "ready")):
    wrap(obj, name)
from coi.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
for t, thread, name, edge in marks:
    print(f"  {t:6.3f} {thread:<12} {name} {edge}", file=sys.stderr)
"""


def fmt(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} s [{min(xs):.2f}..{max(xs):.2f}]"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--timeline", action="store_true", help="one start of each, steps stamped")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="coi-bench-shell-broker-"))
    standin = credkit.create(tmp)
    client = IncusClient.connect()
    ws = tmp / "ws"
    ws.mkdir()
    mine = workspace_hash(str(ws))

    def remove() -> None:
        for n in client.instances.names():
            if mine in n:
                client.instances.delete(n, force=True)

    try:
        home = tmp / "home"
        (home / ".config" / "coi").mkdir(parents=True)
        (home / ".config" / "coi" / "config.toml").write_text(
            f'[credentials]\nca_bundle = "{standin.ca}"\n'
            f'[credentials.upstream]\nanthropic = "{standin.url}"\n'
        )
        env = {
            "PATH": os.environ["PATH"],
            "HOME": str(home),
            "COI_HOME": str(home / ".coi"),
            "PYTHONPATH": f"{ROOT / 'src'}:{STANDIN / 'plugin'}",
            "TERM": "xterm",
            "ANTHROPIC_API_KEY": standin.key,
        }
        coi = ["-c", _TIMELINE] if args.timeline else ["-m", "coi"]
        argv = [sys.executable, *coi, "shell", "--background", "--tool", "standin-api"]
        argv += ["--image", "coi-tiny", "-w", str(ws), "--mount", f"{STANDIN}:/opt/standin"]
        times: dict[str, list[float]] = {"copy": [], "broker": []}
        rss = 0
        for i in range(2 if args.timeline else args.runs + 1):  # round 0 warms up caches
            for mode in ("copy", "broker"):
                time.sleep(2)  # spares copied, the last sandbox gone
                t = time.perf_counter()
                res = subprocess.run(
                    argv, env={**env, "COI_CREDENTIALS": mode}, capture_output=True, text=True
                )
                took = time.perf_counter() - t
                if res.returncode != 0 or ("brokered" in res.stderr) != (mode == "broker"):
                    raise SystemExit(res.stderr)
                if i:
                    times[mode].append(took)
                if args.timeline and i:
                    stamped = [ln for ln in res.stderr.splitlines() if ln.startswith("  ")]
                    stamped = [ln for ln in stamped if ln.split()[0].replace(".", "").isdigit()]
                    print(f"{mode}: {took:.2f} s, from the interpreter's start:")
                    print("\n".join(stamped))
                if mode == "broker":
                    pids = subprocess.run(
                        ["pgrep", "-f", f"coi.credentials.service coi-{mine}"],
                        capture_output=True,
                        text=True,
                    ).stdout.split()
                    for pid in pids:
                        status = Path(f"/proc/{pid}/status").read_text()
                        kib = [ln for ln in status.splitlines() if ln.startswith("VmRSS:")]
                        rss = max(rss, int(kib[0].split()[1]) if kib else 0)
                remove()
        print(f"coi shell --background, {args.runs} runs each, median [min..max]:")
        for mode, xs in times.items():
            print(f"  {mode:<7} {fmt(xs)}")
        added = statistics.median(times["broker"]) - statistics.median(times["copy"])
        print(f"  added by the broker: {added:.2f} s")
        print(f"broker service RSS (idle session): {rss / 1024:.1f} MiB")
    finally:
        remove()
        client.close()
        credkit.destroy(standin)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
