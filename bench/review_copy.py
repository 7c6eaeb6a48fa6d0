"""How long making a review copy takes (`coi review start`: `cp -a --reflink=auto`, coi.review
.copy), against a plain `cp -a` of the same tree in the same run, and what `coi diff` costs.

    .venv/bin/python bench/review_copy.py [--dir DIR] [--gib 2] [--layout mixed|big] [--pool coi]

Makes a tree of GIB GiB under DIR (default: the temporary folder): `mixed`, half in 4 large
files and half in 64 KiB files across 128 folders (like a repository with build outputs), or
`big`, all of it in 4 files; then times:
a plain copy (`cp -a --reflink=never`: coreutils 9's `cp -a` already reflinks where it
can), one `cp -a --reflink=auto`, a whole review (base/ and work/), and
`coi diff`'s compare on the unchanged review (reading every file, then trusting the
review's index of what was copied) and after one edit. Everything it made is
removed at the end. With `--pool POOL` (root, a local btrfs pool), also the copies on the
daemon's pool (coi.review.pool): the first review of the tree (the mirror made, then two
snapshots), one after a file changed, and one after nothing changed. The page cache is not
dropped (that would slow everybody's machine): the
copies read a warm tree, so the plain copy's time is mostly writing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from coi.review import pool
from coi.review.copy import Review, discard, remove_tree, start
from coi.review.diff import compare

SMALL = 64 * 1024


def make_tree(root: Path, gib: float, layout: str) -> int:
    total = int(gib * 2**30)
    big = (total if layout == "big" else total // 2) // 4
    block = os.urandom(1 << 20)
    for i in range(4):
        with (root / f"blob{i}.bin").open("wb") as f:
            for j in range(big >> 20):
                f.write(block[j % 7 :] + block[: j % 7])  # not all the same block
    n = 0 if layout == "big" else (total // 2) // SMALL
    for i in range(n):
        d = root / f"pkg{i % 128:03d}"
        d.mkdir(exist_ok=True)
        (d / f"f{i}.txt").write_bytes(block[(i * 31) % (len(block) - SMALL) :][:SMALL])
    return 4 + n


def fs_type(path: Path) -> str:
    res = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True)
    return res.stdout.strip()


def reflinks(path: Path) -> bool:
    a, b = path / ".reflink-a", path / ".reflink-b"
    a.write_bytes(b"x" * 4096)
    ok = subprocess.run(["cp", "--reflink=always", str(a), str(b)], capture_output=True)
    a.unlink()
    b.unlink(missing_ok=True)
    return ok.returncode == 0


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(seconds until `fn` returned, seconds until its writes were on disk too)."""
    subprocess.run(["sync"], check=True)
    t = time.perf_counter()
    fn()
    returned = time.perf_counter() - t
    subprocess.run(["sync"], check=True)
    return returned, time.perf_counter() - t


def cp(*argv: str) -> Callable[[], object]:
    return lambda: subprocess.run(["cp", *argv], check=True)


def row(label: str, times: tuple[float, float]) -> None:
    print(f"{label:<30} {times[0]:6.2f} s  ({times[1]:6.2f} s with sync)")


def on_pool(src: Path, home: Path, pool_name: str) -> None:
    """Review copies on the daemon's pool: the first (mirror + snapshots), then later ones."""
    from coi.backend import IncusClient

    with IncusClient.connect() as client:
        had_volume = client.networks.volume_exists(pool_name, pool.VOLUME)
        store = pool.open_store(client, pool_name)
        if store is None:
            print(f"pool {pool_name}: not usable for review copies (root, local btrfs?)")
            return
        made: list[Review] = []
        try:
            row(
                "pool review, first (mirror)",
                timed(lambda: made.append(start(src, home=home, store=store))),
            )
            (src / "blob1.bin").write_bytes(b"changed\n")
            row(
                "pool review, 1 file changed",
                timed(lambda: made.append(start(src, home=home, store=store))),
            )
            row(
                "pool review, nothing changed",
                timed(lambda: made.append(start(src, home=home, store=store))),
            )
            last = made[-1]
            (Path(last.work) / "blob0.bin").write_bytes(b"changed\n")
            t = time.perf_counter()
            d = compare(last.base, last.work, snapshots=True)
            took = time.perf_counter() - t
            print(f"diff, one file changed, pool   {took:6.2f} s ({len(d.changes)} changes)")
        finally:
            for r in made:
                discard(r)
            pool.drop_mirror(store, os.path.realpath(src))
            if not had_volume:
                pool.remove_volume(client, pool_name)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--gib", type=float, default=2.0)
    ap.add_argument("--layout", choices=("mixed", "big"), default="mixed")
    ap.add_argument("--pool", help="also time review copies on this btrfs pool (root)")
    args = ap.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="coi-reviewbench-", dir=args.dir))
    try:
        src = scratch / "ws"
        src.mkdir()
        home = scratch / "reviews"
        t = time.perf_counter()
        files = make_tree(src, args.gib, args.layout)
        subprocess.run(["sync"], check=True)
        print(f"tree: {args.gib:g} GiB, {files} files, made in {time.perf_counter() - t:.1f} s")
        print(f"filesystem: {fs_type(scratch)}; reflinks: {'yes' if reflinks(scratch) else 'no'}")
        for _ in range(2):  # alternated, so neither always runs on a cleaner cache
            plain = cp("-a", "--reflink=never", f"{src}/.", str(scratch / "plain"))
            row("cp -a --reflink=never", timed(plain))
            shutil.rmtree(scratch / "plain")
            ref = cp("-a", "--reflink=auto", f"{src}/.", str(scratch / "ref"))
            row("cp -a --reflink=auto", timed(ref))
            shutil.rmtree(scratch / "ref")
        made: list[Review] = []
        row("review start (base + work)", timed(lambda: made.append(start(src, home=home))))
        review = made[0]
        for label, index in (("every file read", None), ("by the index", review.index())):
            t = time.perf_counter()
            d = compare(review.base, review.work, index=index)
            took = time.perf_counter() - t
            print(f"diff, unchanged, {label:<16} {took:6.2f} s ({len(d.changes)} changes)")
        (Path(review.work) / "blob0.bin").write_bytes(b"changed\n")
        t = time.perf_counter()
        d = compare(review.base, review.work, index=review.index())
        took = time.perf_counter() - t
        print(f"diff, one file changed, index  {took:6.2f} s ({len(d.changes)} changes)")
        if args.pool:
            on_pool(src, home, args.pool)
    finally:
        remove_tree(scratch)


if __name__ == "__main__":
    main()
