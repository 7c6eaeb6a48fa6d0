"""Sessions, side by side with the raw daemon doing the same work, in one run.

    sudo .venv/bin/python bench/session.py [--runs 5] [--image coi] [--parallel 10]

Rows (median [min..max] of --runs):
- `coi run -- true` on the image, the whole command (interpreter start included), against
  two floors measured with direct REST calls from this (already started) process:
  A. create from the image, start, exec `true`, delete: what a client does without coi's
     pre-shifted template;
  B. the work coi asks of the daemon: copy the pre-shifted template, start, exec `true`,
     stop an ephemeral container without waiting.
- `coi shell --background --debug` until tmux runs, against create+start+exec tmux.
- `coi --version`, `coi --help`, and `coi list` with 10 containers against `lxc list`.
- --parallel sessions (`coi shell --background`) started at once: time until all are up, and
  the memory each idle sandbox uses.
- saving and restoring a 50 MB tool state directory (the session save/restore path) against
  `lxc file pull -r` / `lxc file push -r`.
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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _common import cli, fmt, sh, timed

from coi.backend import ExecRequest, IncusClient
from coi.sessions import template

POOL = os.environ.get("COI_POOL", "coi")
NET = os.environ.get("COI_NETWORK", "coibr0")
COI = [sys.executable, "-m", "coi"]


def coi(*args: str, cwd: Path | None = None) -> None:
    subprocess.run(
        [*COI, *args], check=True, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def coi_names(c: IncusClient) -> list[str]:
    return [n for n in c.instances.names() if n.startswith("coi-")]


def wait_gone(c: IncusClient, names: list[str]) -> None:
    deadline = time.monotonic() + 30
    while any(c.instances.exists(n) for n in names) and time.monotonic() < deadline:
        time.sleep(0.05)


def devices(ws: Path) -> dict[str, dict[str, str]]:
    return {
        "root": {"type": "disk", "path": "/", "pool": POOL},
        "eth0": {"type": "nic", "network": NET, "name": "eth0"},
        "workspace": {"type": "disk", "source": str(ws), "path": "/workspace"},
    }


def floor_a(c: IncusClient, image: str, ws: Path) -> Callable[[], None]:
    def run() -> None:
        c.instances.create("bench-fa", image=image, devices=devices(ws), start=True)
        c.exec.run("bench-fa", ExecRequest(["true"]))
        c.instances.delete("bench-fa", force=True)

    return run


def floor_b(c: IncusClient, tmpl: str, ws: Path) -> Callable[[], None]:
    def run() -> None:
        c.instances.create(
            "bench-fb",
            image="",
            source={"type": "copy", "source": tmpl},
            devices=devices(ws),
            ephemeral=True,
            start=True,
        )
        c.exec.run("bench-fb", ExecRequest(["true"]))
        c.instances.stop("bench-fb", force=True, wait=False)

    return run


def row(name: str, mine: list[float], floor: list[float] | None, note: str = "") -> str:
    if floor is None:
        return f"| {name} | {fmt(mine)} | {note or '—'} | |"
    ratio = statistics.median(mine) / statistics.median(floor)
    return f"| {name} | {fmt(mine)} | {fmt(floor)} {note} | {ratio:.2f} |"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--image", default="coi")
    ap.add_argument("--parallel", type=int, default=10)
    a = ap.parse_args()
    c = IncusClient.connect()
    ws = Path(tempfile.mkdtemp(prefix="coi-bench-"))
    out: list[str] = []
    try:
        # Warm-up: makes the template (once per image and user) and the policy bridge.
        coi("run", "--image", a.image, "-w", str(ws), "--", "true")
        fp = c.images.alias_target(a.image) or a.image
        tmpl = template.template_name(fp, {})
        assert c.instances.exists(tmpl), f"no template {tmpl}"
        runs: list[float] = []
        fa: list[float] = []
        fb: list[float] = []
        for _ in range(a.runs):
            runs.append(timed(lambda: coi("run", "--image", a.image, "-w", str(ws), "--", "true")))
            wait_gone(c, coi_names(c))
            fa.append(timed(floor_a(c, a.image, ws)))
            fb.append(timed(floor_b(c, tmpl, ws)))
            wait_gone(c, ["bench-fb"])
        out.append(row(f"`coi run -- true` ({a.image}) vs floor A", runs, fa, "(A)"))
        out.append(row(f"`coi run -- true` ({a.image}) vs floor B", runs, fb, "(B)"))

        shells: list[float] = []
        raw: list[float] = []
        for _ in range(a.runs):
            shells.append(
                timed(
                    lambda: coi(
                        "shell", "--background", "--debug", "--image", a.image, "-w", str(ws)
                    )
                )
            )
            coi("kill", "--all", "--force")

            def raw_shell() -> None:
                c.instances.create("bench-sh", image="", source={"type": "copy", "source": tmpl},
                                   devices=devices(ws), start=True)  # fmt: skip
                c.exec.run("bench-sh", ExecRequest(["tmux", "new-session", "-d", "-s", "x"]))

            raw.append(timed(raw_shell))
            c.instances.delete("bench-sh", force=True)
        out.append(row("`coi shell --background` until tmux runs", shells, raw, "(B)"))

        version = [timed(lambda: coi("--version")) for _ in range(a.runs)]
        helps = [timed(lambda: coi("--help")) for _ in range(a.runs)]
        out.append(row("`coi --version`", version, None, "target < 80 ms"))
        out.append(row("`coi --help`", helps, None))
        names = [f"coi-benchlist{i:02d}-1" for i in range(10)]
        tiny = {"root": {"type": "disk", "path": "/", "pool": POOL}}
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda n: c.instances.create(n, image="coi-tiny", devices=tiny), names))
        try:
            lists = [timed(lambda: coi("list")) for _ in range(a.runs)]
            lxc = [timed(lambda: sh("list")) for _ in range(a.runs)]
        finally:
            for n in names:
                c.instances.delete(n, force=True)
        out.append(row(f"`coi list`, 10 containers vs `{Path(cli()).name} list`", lists, lxc))

        def one_shell(_i: int) -> None:
            coi("shell", "--background", "--debug", "--image", a.image, "-w", str(ws))

        up = timed(lambda: list(ThreadPoolExecutor(a.parallel).map(one_shell, range(a.parallel))))
        time.sleep(5)  # let them settle into idle
        mems = [c.instances.state(n).memory_usage for n in coi_names(c)]
        started = len(mems)
        coi("kill", "--all", "--force")
        floor = parallel_floor(c, tmpl, ws, a.parallel)
        out.append(
            f"| {a.parallel} `coi shell --background` at once, until all are up | "
            f"{up:.1f} s ({started} up) | {floor:.1f} s (B, and the network up) | "
            f"{up / floor:.2f} |"
        )
        out.append(
            f"| memory per idle sandbox | {statistics.median(mems) / 2**20:.0f} MiB "
            f"[{min(mems) / 2**20:.0f}..{max(mems) / 2**20:.0f}] | | |"
        )

        out += state_rows(c, a.image, a.runs, tmpl, ws)
    finally:
        for n in coi_names(c):
            c.instances.delete(n, force=True)
        shutil.rmtree(ws, ignore_errors=True)
    print(f"{c.server.display_name}, pool {POOL}, image {a.image}, {a.runs} runs, ", end="")
    print(f"{os.cpu_count()} CPUs\n")
    print("| row | coi | raw daemon floor | coi / floor |")
    print("|---|---|---|---|")
    print("\n".join(out))


def parallel_floor(c: IncusClient, tmpl: str, ws: Path, n: int) -> float:
    """The daemon alone: n template copies started at once, until each has its network."""

    def one(i: int) -> None:
        name = f"bench-par{i}"
        c.instances.create(
            name, image="", source={"type": "copy", "source": tmpl}, devices=devices(ws), start=True
        )
        wait = "while ! ip route | grep -q ^default; do sleep 0.02; done"
        c.exec.run(name, ExecRequest(["sh", "-c", wait]))
        c.exec.run(name, ExecRequest(["tmux", "new-session", "-d", "-s", "x"]))

    try:
        return timed(lambda: list(ThreadPoolExecutor(n).map(one, range(n))))
    finally:
        for i in range(n):
            c.instances.delete(f"bench-par{i}", force=True)


def state_rows(c: IncusClient, image: str, runs: int, tmpl: str, ws: Path) -> list[str]:
    """Session save (pull the tool's state dir) and restore (push it), 50 MB in 200 files."""
    local = Path(tempfile.mkdtemp(prefix="coi-bench-state-"))
    src = local / "state"
    for i in range(200):
        d = src / f"d{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}.jsonl").write_bytes(os.urandom(250_000))
    c.instances.create("bench-st", image="", source={"type": "copy", "source": tmpl},
                       devices=devices(ws), start=True)  # fmt: skip
    save: list[float] = []
    restore: list[float] = []
    lsave: list[float] = []
    lrestore: list[float] = []
    try:
        for i in range(runs):
            restore.append(timed(lambda: c.files.push_tree("bench-st", src, f"/root/s{i}")))
            save.append(
                timed(lambda: c.files.pull_tree("bench-st", f"/root/s{i}", local / f"p{i}"))
            )
            lrestore.append(
                timed(lambda: sh("file", "push", "-r", "-p", str(src), f"bench-st/root/l{i}/"))
            )
            dest = local / f"lp{i}"
            dest.mkdir()
            lsave.append(
                timed(lambda: sh("file", "pull", "-r", f"bench-st/root/l{i}/state", str(dest)))
            )
    finally:
        c.instances.delete("bench-st", force=True)
        shutil.rmtree(local, ignore_errors=True)
    name = Path(cli()).name
    return [
        row(f"session restore: push 50 MB state vs `{name} file push -r`", restore, lrestore),
        row(f"session save: pull 50 MB state vs `{name} file pull -r`", save, lsave),
    ]


if __name__ == "__main__":
    main()
