"""How often the daemon loses track of an exec whose command runs, with and without syscall
interception, in the same run.

    .venv/bin/python bench/exec_lost.py [--execs 400] [--threads 4] [--rounds 2]

Two `coi-tiny` containers in a project of the bench's own (removed at the end, also on an
error): one with `security.syscalls.intercept.setxattr=true` (what upstream sets, and coi
only with `[incus] intercept_setxattr`), one without. Each round, `--threads` threads per
container start `--execs` execs of `sh -c 'echo TOKEN >> /tmp/log'` in all, each started once
(no retry: coi's own `_run_once`). A start the daemon fails with "Failed to retrieve PID of
executing child process" is lost; the log then says whether its command ran anyway. The two
containers take turns, round by round.
"""

from __future__ import annotations

import argparse
import secrets
import threading
from collections.abc import Callable

from coi.backend import ExecRequest, IncusClient
from coi.errors import OperationFailed

IMAGE = "coi-tiny"
INTERCEPT = {"security.syscalls.intercept.setxattr": "true", "security.nesting": "true"}


def one_round(c: IncusClient, name: str, execs: int, threads: int) -> tuple[int, int]:
    """Lost starts, and how many of their commands ran."""
    lost: list[str] = []
    lock = threading.Lock()
    tokens = [f"t{secrets.token_hex(4)}" for _ in range(execs)]

    def worker(mine: list[str]) -> None:
        for tok in mine:
            req = ExecRequest(["sh", "-c", f"echo {tok} >> /tmp/log"])
            try:
                c.exec._run_once(name, req, None, _drop, _drop, None)
            except OperationFailed as err:
                if "Failed to retrieve PID" not in err.message:
                    raise
                with lock:
                    lost.append(tok)

    ts = [threading.Thread(target=worker, args=(tokens[i::threads],)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    logged = set(c.exec.capture(name, ExecRequest(["cat", "/tmp/log"])).stdout.decode().split())
    c.exec.quiet(name, ExecRequest(["rm", "-f", "/tmp/log"]))
    return len(lost), sum(tok in logged for tok in lost)


def _drop(_data: bytes) -> None:
    pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--execs", type=int, default=400)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    base = IncusClient.connect()
    project = f"coi-bench-{secrets.token_hex(3)}"
    base.projects.create(project, config={"features.images": "false", "features.profiles": "false"})
    c = IncusClient.connect(project=project)
    devices = {"root": {"type": "disk", "path": "/", "pool": "coi"}}
    rows: dict[str, list[tuple[int, int]]] = {"interception on": [], "interception off": []}
    made: list[str] = []
    try:
        boxes: dict[str, str] = {}
        for label, config in (("interception on", INTERCEPT), ("interception off", {})):
            name = f"lost-{'on' if config else 'off'}"
            c.instances.create(name, image=IMAGE, devices=devices, config=config, start=True)
            made.append(name)
            boxes[label] = name
        runs: list[tuple[str, Callable[[], tuple[int, int]]]] = [
            (label, lambda n=name: one_round(c, n, a.execs, a.threads))  # type: ignore[misc]
            for label, name in boxes.items()
        ]
        for r in range(a.rounds):
            for label, run in runs if r % 2 == 0 else list(reversed(runs)):
                rows[label].append(run())
    finally:
        for name in made:
            c.instances.delete(name, force=True)
        base.projects.delete(project)
    print(f"{a.execs} execs a round, {a.threads} at a time, {a.rounds} rounds, image {IMAGE}\n")
    print("| container | lost starts per round | of which the command ran |")
    print("|---|---|---|")
    for label, got in rows.items():
        lost = ", ".join(str(x) for x, _ in got)
        ran = ", ".join(str(y) for _, y in got)
        print(f"| {label} | {lost} | {ran} |")


if __name__ == "__main__":
    main()
