"""Sessions, side by side with the raw daemon doing the same work, in one run.

    sudo .venv/bin/python bench/session.py [--runs 5] [--image coi] [--parallel 10]

Rows (median [min..max] of --runs; before each timed run the machine is left to settle: no
sandbox still going away, no spare still being copied):
- `coi run -- true` on the image, the whole command (interpreter start included), with a
  spare ready (the default) and with spares off (`COI_SPARES=0`), against floors measured
  with direct REST calls from this (already started) process:
  A. create from the image, start, exec `true`, delete: what a client does without coi;
  B. copy the pre-shifted template, start, exec `true`, stop without waiting: the daemon
     work coi asks for without a spare;
  C. rename a ready copy, set its devices, start, exec `true`, stop without waiting: the
     daemon work coi asks for with a spare.
  W. start a stopped copy made beforehand and exec `true`: the warm floor.
  and with templates off (`COI_TEMPLATES=never`: every sandbox created from the image; the
  other rows force templates and spares on with `always`).
- `coi shell --background --debug` until tmux runs, against floor C plus tmux.
- `coi --version`, `coi --help`, and `coi list` with 10 containers against `lxc list`.
- --parallel sessions (`coi shell --background`) started at once, with that many spares
  ready and with spares off: time until all are up, against the daemon alone doing the same
  (C or B, plus tmux), and the memory each idle sandbox uses.
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
from coi.config.paths import coi_home
from coi.sessions import template
from coi.sessions.sandbox import SandboxSpec, instance_config

POOL = os.environ.get("COI_POOL", "coi")
NET = os.environ.get("COI_NETWORK", "coibr0")
COI = [sys.executable, "-m", "coi"]
# The sessions the benchmark makes are saved in a state directory of its own, removed at the
# end: they would otherwise pile up in the user's ~/.coi (and slow `coi list --all`).
HOME = Path(tempfile.mkdtemp(prefix="coi-bench-home-"))
os.environ["COI_HOME"] = str(HOME)
LOCKS = coi_home() / "locks"


def coi(*args: str, spares: int = 2, templates: bool = True) -> None:
    env = {
        **os.environ,
        "COI_SPARES": str(spares),
        "COI_TEMPLATES": "always" if templates else "never",
    }
    subprocess.run(
        [*COI, *args], check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def coi_names(c: IncusClient) -> list[str]:
    return [n for n in c.instances.names() if n.startswith("coi-")]


def spares(c: IncusClient) -> list[str]:
    return [n for n in c.instances.names() if n.startswith(template.SPARE_PREFIX)]


def settle(c: IncusClient, want_spares: int | None = None) -> None:
    """Wait (bounded) until no sandbox is going away and no copy is under way."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        busy = c.instances.busy()
        have = spares(c)
        enough = want_spares is None or len([n for n in have if n not in busy]) >= want_spares
        if not busy and not coi_names(c) and enough:
            return
        time.sleep(0.1)
    raise SystemExit("the machine did not settle within 60 s")


def drop_spares(c: IncusClient) -> None:
    for n in spares(c):
        c.instances.delete(n, force=True)


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


def floor_b(c: IncusClient, tmpl: str, ws: Path, name: str = "bench-fb") -> Callable[[], None]:
    def run() -> None:
        c.instances.create(
            name,
            image="",
            source={"type": "copy", "source": tmpl},
            devices=devices(ws),
            ephemeral=True,
            start=True,
        )
        c.exec.run(name, ExecRequest(["true"]))

    return run


def copies(c: IncusClient, tmpl: str, n: int) -> list[str]:
    """n stopped copies of the template, made before the clock starts (floor C's spares)."""
    names = [f"bench-cp{i}" for i in range(n)]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda m: c.instances.create(
            m, image="", source={"type": "copy", "source": tmpl}), names))  # fmt: skip
    return names


def floor_c(c: IncusClient, spare: str, ws: Path, name: str = "bench-fc") -> Callable[[], None]:
    def run() -> None:
        c.instances.rename(spare, name)
        c.instances.patch(name, {"devices": devices(ws), "ephemeral": True})
        c.instances.start(name)
        c.exec.run(name, ExecRequest(["true"]))

    return run


def floor_w(c: IncusClient, copy: str) -> Callable[[], None]:
    """The warm floor: start a stopped copy made beforehand and exec `true` in it."""

    def run() -> None:
        c.instances.start(copy)
        c.exec.run(copy, ExecRequest(["true"]))

    return run


def stop_async(c: IncusClient, name: str) -> None:
    c.instances.stop(name, force=True, wait=False)


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
    run_true = ("run", "--image", a.image, "-w", str(ws), "--", "true")
    try:
        # Warm-up: makes the template (once per image and user) and the policy bridge.
        coi(*run_true)
        fp = c.images.alias_target(a.image) or a.image
        # The template of the sandboxes' own uid map (root's folder: host root is mapped).
        idmap = instance_config(SandboxSpec(workspace=ws, image=a.image, persistent=False))
        tmpl = template.template_name(fp, idmap)
        assert c.instances.exists(tmpl), f"no template {tmpl}"
        with_spare: list[float] = []
        no_spare: list[float] = []
        fa: list[float] = []
        fb: list[float] = []
        fc: list[float] = []
        fw: list[float] = []
        no_tmpl: list[float] = []
        for _ in range(a.runs):
            template.replenish(c, tmpl, 1, lock_dir=LOCKS)
            settle(c, want_spares=1)
            with_spare.append(timed(lambda: coi(*run_true)))
            settle(c)
            drop_spares(c)
            no_spare.append(timed(lambda: coi(*run_true, spares=0)))
            settle(c)
            fa.append(timed(floor_a(c, a.image, ws)))
            fb.append(timed(floor_b(c, tmpl, ws)))
            stop_async(c, "bench-fb")
            (spare,) = copies(c, tmpl, 1)
            fc.append(timed(floor_c(c, spare, ws)))
            stop_async(c, "bench-fc")
            settle(c)
            # Templates off: every sandbox is created from the image (what the daemon's
            # idmapped mounts make cheap, where it has them).
            no_tmpl.append(timed(lambda: coi(*run_true, spares=0, templates=False)))
            settle(c)
            (warm,) = copies(c, tmpl, 1)
            fw.append(timed(floor_w(c, warm)))
            c.instances.delete(warm, force=True)
        out.append(row(f"`coi run -- true` ({a.image}), spare ready, vs floor A", with_spare, fa,
                       "(A)"))  # fmt: skip
        out.append(row("the same vs floor C (the daemon's work with a spare)", with_spare, fc,
                       "(C)"))  # fmt: skip
        out.append(row(f"`coi run -- true` ({a.image}), spares off, vs floor B", no_spare, fb,
                       "(B)"))  # fmt: skip
        out.append(row(f"`coi run -- true` ({a.image}), templates off, vs floor A", no_tmpl, fa,
                       "(A)"))  # fmt: skip
        out.append(row("the warm floor W: start a prepared copy, exec `true` (no coi)", fw, None))
        out.append(row("`coi run -- true`, spare ready, vs the warm floor W", with_spare, fw,
                       "(W)"))  # fmt: skip

        shells: list[float] = []
        raw: list[float] = []
        for _ in range(a.runs):
            template.replenish(c, tmpl, 1, lock_dir=LOCKS)
            settle(c, want_spares=1)
            shells.append(
                timed(
                    lambda: coi(
                        "shell", "--background", "--debug", "--image", a.image, "-w", str(ws)
                    )
                )
            )
            coi("kill", "--all", "--force")
            settle(c)
            (spare,) = copies(c, tmpl, 1)

            def raw_shell(spare: str = spare) -> None:
                floor_c(c, spare, ws, "bench-sh")()
                c.exec.run("bench-sh", ExecRequest(["tmux", "new-session", "-d", "-s", "x"]))

            raw.append(timed(raw_shell))
            c.instances.delete("bench-sh", force=True)
        out.append(row("`coi shell --background` until tmux runs", shells, raw, "(C + tmux)"))
        plain: list[float] = []
        for _ in range(a.runs):
            settle(c)
            plain.append(
                timed(
                    lambda: coi(
                        "shell", "--background", "--debug", "--image", a.image, "-w", str(ws),
                        spares=0, templates=False,
                    )
                )
            )  # fmt: skip
            coi("kill", "--all", "--force")
        out.append(row("`coi shell --background`, templates off", plain, raw, "(C + tmux)"))

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

        out += parallel_rows(c, a.image, tmpl, ws, a.parallel)
        out += state_rows(c, a.runs, tmpl, ws)
    finally:
        for n in coi_names(c):
            c.instances.delete(n, force=True)
        shutil.rmtree(ws, ignore_errors=True)
        shutil.rmtree(HOME, ignore_errors=True)
    print(f"{c.server.display_name}, pool {POOL}, image {a.image}, {a.runs} runs, ", end="")
    print(f"{os.cpu_count()} CPUs\n")
    print("| row | coi | raw daemon floor | coi / floor |")
    print("|---|---|---|---|")
    print("\n".join(out))


def parallel_rows(c: IncusClient, image: str, tmpl: str, ws: Path, n: int) -> list[str]:
    """n sessions at once, with n spares ready and with none, against the daemon alone."""

    def shells(spares: int) -> float:
        def one(_i: int) -> None:
            coi("shell", "--background", "--debug", "--image", image, "-w", str(ws),
                spares=spares)  # fmt: skip

        return timed(lambda: list(ThreadPoolExecutor(n).map(one, range(n))))

    def floor(make: Callable[[int], Callable[[], None]]) -> float:
        def one(i: int) -> None:
            make(i)()
            c.exec.run(f"bench-par{i}", ExecRequest(["tmux", "new-session", "-d", "-s", "x"]))

        try:
            return timed(lambda: list(ThreadPoolExecutor(n).map(one, range(n))))
        finally:
            for i in range(n):
                c.instances.delete(f"bench-par{i}", force=True)

    # Spares ready: the first batch leaves n spares behind (made after they are up).
    settle(c)
    template.replenish(c, tmpl, n, lock_dir=LOCKS)
    settle(c, want_spares=n)
    up_spares = shells(n)
    time.sleep(5)  # let them settle into idle
    mems = [c.instances.state(m).memory_usage for m in coi_names(c)]
    started = len(mems)
    coi("kill", "--all", "--force")
    settle(c)
    drop_spares(c)
    up_copies = shells(0)
    coi("kill", "--all", "--force")
    settle(c)
    ready = copies(c, tmpl, n)
    floor_spares = floor(lambda i: floor_c(c, ready[i], ws, f"bench-par{i}"))
    floor_copies = floor(lambda i: floor_b(c, tmpl, ws, f"bench-par{i}"))
    return [
        f"| {n} `coi shell --background` at once, {n} spares ready, until all are up | "
        f"{up_spares:.1f} s ({started} up) | {floor_spares:.1f} s (C + tmux) | "
        f"{up_spares / floor_spares:.2f} |",
        f"| {n} at once, spares off | {up_copies:.1f} s | {floor_copies:.1f} s (B + tmux) | "
        f"{up_copies / floor_copies:.2f} |",
        f"| memory per idle sandbox | {statistics.median(mems) / 2**20:.0f} MiB "
        f"[{min(mems) / 2**20:.0f}..{max(mems) / 2**20:.0f}] | | |",
    ]


def state_rows(c: IncusClient, runs: int, tmpl: str, ws: Path) -> list[str]:
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
