"""Where one `coi run -- true` or `coi shell --background` spends its time, per phase.

    cd bench && sudo ../.venv/bin/python phases.py --runs 5 [--image coi-tiny] [--shell]
    cd bench && sudo ../.venv/bin/python phases.py --timeline -- [coi run flags] -- true

Each run is a fresh process (as a user's command is): this script starts itself as the child,
which wraps coi's steps and every daemon request with timers and then runs the real `coi
run`/`coi shell` in-process; the parent times the whole process from its spawn to its exit,
so the interpreter's start and its exit are phases too. Clocks: `time.perf_counter` is the
system-wide monotonic clock on Linux, comparable across the two processes.

Per phase: median [min..max] of its duration, and the daemon requests made inside it
(HTTP requests on the API, plus each websocket an exec opens). `--timeline` prints one run's
events instead, with every request.
"""

# ruff: noqa: E402  (the clock starts before this script's own imports)
from __future__ import annotations

import time

T0 = time.perf_counter()  # before this script's own imports: they are not coi's

import argparse
import importlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import wait_spare_makers

# (module, attribute path, label): the steps of a session, in the order they run.
STEPS: list[tuple[str, str, str]] = [
    ("coi.cli.session_cmds", "_prepare", "config + prepare (options, profiles, plans)"),
    ("coi.cli.context", "connect", "connect (server info)"),
    ("coi.sessions.reap", "after_restart", "reap check (daemon restarted?)"),
    ("coi.sessions.runner", "ShellSession._plan_credentials", "credentials plan"),
    ("coi.sessions.sandbox", "Sandbox.check_owner", "workspace owner check"),
    ("coi.sessions.sandbox", "Sandbox.ensure_image", "image lookup"),
    ("coi.sessions.sandbox", "Sandbox.choose_slot", "slot (list + claim)"),
    ("coi.sessions.runner", "spawn_keeper", "keeper spawned"),
    ("coi.sessions.runner", "ShellSession._spawn_keeper", "keeper spawned"),
    ("coi.sessions.sandbox", "Sandbox._protect", "protection record"),
    ("coi.sessions.sandbox", "Sandbox._attach_network", "policy bridge + ACL check"),
    ("coi.sessions.sandbox", "Sandbox._template", "template decision"),
    ("coi.backend.instances", "InstancesAPI.create", "create + start (a retry: other)"),
    ("coi.sessions.sandbox", "Sandbox.verify_network", "boot wait + network proof"),
    ("coi.sessions.sandbox", "Sandbox._record_start", "session log record"),
    ("coi.sessions.sandbox", "Sandbox._start_clock", "max_duration clock"),
    ("coi.sessions.runner", "_execute", "exec the command"),
    ("coi.sessions.runner", "ShellSession._run_tool", "home files + tmux + agent"),
    ("coi.sessions.runner", "finish_run", "cleanup (stop without waiting)"),
    ("coi.sessions.runner", "ShellSession._cleanup", "cleanup (background: hand over)"),
]

EVENTS: list[dict[str, Any]] = []


def _main() -> bool:
    """Whether this runs on the main thread (a step in a thread overlaps the main path)."""
    return threading.current_thread() is threading.main_thread()


def _wrap(module: str, attr: str, label: str) -> None:
    mod = importlib.import_module(module)
    owner: Any = mod
    *path, name = attr.split(".")
    for part in path:
        owner = getattr(owner, part)
    original: Callable[..., Any] = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ev = {"kind": "step", "label": label, "start": time.perf_counter(), "main": _main()}
        EVENTS.append(ev)
        try:
            return original(*args, **kwargs)
        finally:
            ev["end"] = time.perf_counter()

    setattr(owner, name, wrapper)


def _wrap_requests() -> None:
    from coi.backend.client import IncusClient
    from coi.backend.exec import ExecAPI

    raw = IncusClient.raw_request
    stream = IncusClient.stream
    ws = ExecAPI._connect_ws

    def raw_request(self: IncusClient, method: str, path: str, **kw: Any) -> Any:
        ev = {"kind": "req", "label": f"{method} {path}", "start": time.perf_counter(),
              "main": _main()}  # fmt: skip
        EVENTS.append(ev)
        try:
            return raw(self, method, path, **kw)
        finally:
            ev["end"] = time.perf_counter()

    def streamed(self: IncusClient, path: str, **kw: Any) -> Any:
        EVENTS.append({"kind": "req", "label": f"GET {path} (stream)", "main": _main(),
                       "start": time.perf_counter(), "end": time.perf_counter()})  # fmt: skip
        return stream(self, path, **kw)

    def connect_ws(self: ExecAPI, op_id: str, secret: str) -> Any:
        ev = {"kind": "req", "label": "websocket", "start": time.perf_counter(), "main": _main()}
        EVENTS.append(ev)
        try:
            return ws(self, op_id, secret)
        finally:
            ev["end"] = time.perf_counter()

    IncusClient.raw_request = raw_request  # type: ignore[method-assign]
    IncusClient.stream = streamed  # type: ignore[method-assign]
    ExecAPI._connect_ws = connect_ws  # type: ignore[method-assign]


def child(argv: list[str], out: str) -> int:
    """One coi command in this process, its steps and requests written to `out`."""
    from coi.cli import main as coi_main

    # Wrapping imports the session's modules (which `coi run` imports lazily on its way):
    # the mark after it is the session path's imports, whole.
    for module, attr, label in STEPS:
        _wrap(module, attr, label)
    _wrap_requests()
    import click  # noqa: F401  (the command line's, imported by main before parsing)

    import coi.cli.app  # noqa: F401

    EVENTS.append({"kind": "mark", "label": "imports", "start": T0,
                   "end": time.perf_counter()})  # fmt: skip
    code = 1
    try:
        code = int(coi_main(argv) or 0)
    finally:
        end = time.perf_counter()
        Path(out).write_text(json.dumps({"t0": T0, "end": end, "code": code, "events": EVENTS}))
    return code


def one_run(argv: list[str], env: dict[str, str]) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    try:
        # Output to a file, not a pipe: the time is until coi's process exits, as a shell
        # waits for it (a detached helper holding a pipe would make a reader wait longer).
        with tempfile.TemporaryFile() as err:
            spawn = time.perf_counter()
            code = subprocess.call(
                [sys.executable, __file__, "--child", out, "--", *argv],
                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
            )  # fmt: skip
            done = time.perf_counter()
            err.seek(0)
            text = err.read().decode(errors="replace")
        if code != 0:
            raise SystemExit(f"coi {' '.join(argv)} failed ({code}):\n{text}")
        data: dict[str, Any] = json.loads(Path(out).read_text())
    finally:
        os.unlink(out)
    data["spawn"], data["done"] = spawn, done
    return data


def phases(run: dict[str, Any]) -> dict[str, tuple[float, int]]:
    """Phase -> (seconds, daemon requests started inside it).

    Steps on the main thread are the critical path: a nested step (create inside the
    sandbox's make) is shown apart, its time and requests taken out of the step around it.
    A step coi runs in a thread meanwhile (the protection record) is shown with its own time
    and requests, marked as overlapped, and not counted in the path's sum."""
    steps = [e for e in run["events"] if e["kind"] == "step" and "end" in e]
    reqs = [e for e in run["events"] if e["kind"] == "req"]
    out: dict[str, tuple[float, int]] = {
        "interpreter start": (run["t0"] - run["spawn"], 0),
        "imports": (
            next(e["end"] for e in run["events"] if e["kind"] == "mark") - run["t0"],
            0,
        ),
    }
    overlapped: dict[str, tuple[float, int]] = {}
    for side in (True, False):
        mine = [e for e in steps if e.get("main", True) is side]
        theirs = [r for r in reqs if r.get("main", True) is side]
        for s in mine:
            inner = [o for o in mine if o is not s and _within(o, s)]
            own = s["end"] - s["start"] - sum(o["end"] - o["start"] for o in _outermost(inner))
            n = sum(1 for r in theirs if s["start"] <= r["start"] <= s["end"]
                    and not any(o["start"] <= r["start"] <= o["end"] for o in inner))  # fmt: skip
            into = out if side else overlapped
            label = s["label"] if side else f"{s['label']} (in a thread, overlapped)"
            t, k = into.get(label, (0.0, 0))
            into[label] = (t + own, k + n)
    covered = sum(t for t, _ in out.values())
    main_reqs = sum(1 for r in reqs if r.get("main", True))
    out["other (parsing, imports on the way, logging)"] = (
        run["end"] - run["spawn"] - covered,
        main_reqs - sum(k for _, k in out.values()),
    )
    out.update(overlapped)
    out["interpreter exit"] = (run["done"] - run["end"], 0)
    out["total (spawn to exit)"] = (run["done"] - run["spawn"], len(reqs))
    return out


def _within(inner: dict[str, Any], outer: dict[str, Any]) -> bool:
    return bool(outer["start"] <= inner["start"] and inner["end"] <= outer["end"])


def _outermost(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        s for s in steps
        if not any(o is not s and o["start"] <= s["start"] and s["end"] <= o["end"]
                   for o in steps)
    ]  # fmt: skip


def timeline(run: dict[str, Any]) -> None:
    base = run["spawn"]
    print(f"{run['t0'] - base:7.3f}  interpreter started")
    for e in sorted(run["events"], key=lambda e: e["start"]):
        end = e.get("end", e["start"])
        mark = "  " if e["kind"] == "req" else ""
        print(f"{e['start'] - base:7.3f} {end - e['start']:6.3f}  {mark}{e['label']}")
    print(f"{run['done'] - base:7.3f}  process exited")


FLOOR = "coi-phases-floor-w"


def floor_w(c: Any, image: str, ws: Path) -> float:
    """The warm floor W: start a stopped container made from the image beforehand (the
    devices a sandbox has) and exec `true`, over REST from this already started process."""
    from coi.backend import ExecRequest

    devices = {
        "root": {"type": "disk", "path": "/", "pool": "coi"},
        "eth0": {"type": "nic", "network": "coibr0", "name": "eth0"},
        "workspace": {"type": "disk", "source": str(ws), "path": "/workspace"},
    }
    c.instances.create(FLOOR, image=image, devices=devices)
    try:
        t = time.perf_counter()
        c.instances.start(FLOOR)
        c.exec.run(FLOOR, ExecRequest(["true"]))
        return time.perf_counter() - t
    finally:
        c.instances.delete(FLOOR, force=True)


def settled(c: Any, ws: Path, spares: int) -> bool:
    """Nothing of the last run left but `spares` ready running spares (sandbox.running_spares)."""
    left = [i for i in c.instances.list() if i.name in ours(c, ws)]
    ready = [i for i in left if i.config.get("user.coi.spare.ready") == "true"]
    return len(left) == len(ready) == spares


def ours(c: Any, ws: Path) -> list[str]:
    """The sandboxes of this script's workspace (and its floor's container)."""
    out = []
    for inst in c.instances.list():
        if inst.name == FLOOR or inst.config.get("user.coi.workspace") == str(ws):
            out.append(inst.name)
    return out


def measure(
    a: argparse.Namespace, argv: list[str]
) -> tuple[Any, list[dict[str, Any]], list[float]]:
    """coi's runs and the floor's, interleaved; everything made is removed at the end."""
    from coi.backend import IncusClient

    ws = Path(tempfile.mkdtemp(prefix="coi-phases-"))
    home = Path(tempfile.mkdtemp(prefix="coi-phases-home-"))
    env = {**os.environ, "COI_HOME": str(home), "COI_RUNNING_SPARES": str(a.running_spares)}
    argv = [x.replace("{ws}", str(ws)) for x in argv]
    c = IncusClient.connect()
    kill = [sys.executable, "-m", "coi", "kill", "--all", "--force"]
    runs: list[dict[str, Any]] = []
    warm: list[float] = []
    try:
        one_run(argv, env)  # warm-up: the policy bridge, the page cache
        for _ in range(1 if a.timeline else a.runs):
            if a.shell and a.running_spares:
                for inst in c.instances.list():  # the last session, not the spare it left
                    spare = inst.config.get("user.coi.kind") == "spare"
                    if inst.name in ours(c, ws) and not spare and inst.name != FLOOR:
                        c.instances.delete(inst.name, force=True)
            elif a.shell:
                subprocess.run(kill, env=env, capture_output=True)
            deadline = time.monotonic() + 60
            while not settled(c, ws, a.running_spares) and time.monotonic() < deadline:
                time.sleep(0.1)  # the last run's sandbox is still going away
            runs.append(one_run(argv, env))
            if not a.timeline:
                warm.append(floor_w(c, a.image, ws))
    finally:
        wait_spare_makers(ws)  # they write to `home` and make containers until they end
        subprocess.run(kill, env=env, capture_output=True)
        for n in ours(c, ws):
            c.instances.delete(n, force=True)
        shutil.rmtree(ws, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)
    return c, runs, warm


def report(title: str, per: list[dict[str, tuple[float, int]]], warm: list[float]) -> None:
    labels: list[str] = []
    for p in per:
        labels += [k for k in p if k not in labels]
    last = ["other (parsing, imports on the way, logging)", "interpreter exit",
            "total (spawn to exit)"]  # fmt: skip
    labels = [k for k in labels if k not in last] + last
    print(f"{title}, load average {os.getloadavg()[0]:.1f}\n")
    print("| phase | time, median [min..max] | daemon requests |\n|---|---|---|")
    for k in labels:
        xs = [p.get(k, (0.0, 0))[0] * 1000 for p in per]
        ns = sorted({p.get(k, (0.0, 0))[1] for p in per})
        if max(xs) < 0.5 and ns == [0]:
            continue
        med = statistics.median(xs)
        print(f"| {k} | {med:.0f} ms [{min(xs):.0f}..{max(xs):.0f}] | {'/'.join(map(str, ns))} |")
    total = statistics.median(p["total (spawn to exit)"][0] for p in per)
    w = statistics.median(warm)
    lo, hi = min(warm) * 1000, max(warm) * 1000
    print(f"| the warm floor W: start a stopped copy, exec `true` (interleaved) | "
          f"{w * 1000:.0f} ms [{lo:.0f}..{hi:.0f}] | 2 + 6 |")  # fmt: skip
    print(f"\ncoi / W = {total / w:.2f}")


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        return child(sys.argv[4:], sys.argv[2])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--image", default="coi-tiny")
    ap.add_argument("--shell", action="store_true", help="coi shell --background --debug")
    ap.add_argument("--timeline", action="store_true", help="one run, every event")
    ap.add_argument(
        "--running-spares", type=int, default=0,
        help="sandbox.running_spares: each run takes a booted spare (made by the one before)",
    )  # fmt: skip
    ap.add_argument("args", nargs="*", help="with --timeline: coi's arguments ({ws}: a folder)")
    a = ap.parse_args()
    if a.shell:
        argv = ["shell", "--background", "--debug", "--image", a.image, "-w", "{ws}"]
    else:
        argv = ["run", "--image", a.image, "-w", "{ws}", "--", "true"]
    if a.timeline and a.args:
        argv = a.args
    c, runs, warm = measure(a, argv)
    if a.timeline:
        timeline(runs[0])
        return 0
    what = "coi shell --background --debug" if a.shell else "coi run -- true"
    title = f"`{what}` on {c.server.display_name}, image {a.image}, {a.runs} runs"
    report(title, [phases(r) for r in runs], warm)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
