"""Image benchmark: the `coi` image's size, how fast instances are made from it, and build time.

    .venv/bin/python bench/image.py [--runs 5] [--image coi] [--build]

Instance creation from the image, coi's client vs the daemon's CLI, same run (the image must
exist: `coi build`). With --build, also times `coi build --force` from the cached base.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

from _common import cli, fmt, timed

from coi.backend import ExecRequest, IncusClient

POOL = os.environ.get("COI_POOL", "coi")
DEVICES = {"root": {"type": "disk", "path": "/", "pool": POOL}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--image", default="coi")
    ap.add_argument("--build", action="store_true", help="also time `coi build --force`")
    args = ap.parse_args()
    c = IncusClient.connect()
    img = c.images.by_alias(args.image)
    if img is None:
        sys.exit(f"image '{args.image}' not found: run `coi build` first")
    # The first instance on a pool unpacks the image volume once; not what users wait for.
    c.instances.create("bench-warm", image=args.image, devices=DEVICES)
    c.instances.delete("bench-warm")
    create: tuple[list[float], list[float]] = ([], [])
    boot: list[float] = []
    for i in range(args.runs):
        a, b = f"bench-a{i}", f"bench-b{i}"
        create[0].append(timed(lambda: c.instances.create(a, image=args.image, devices=DEVICES)))
        create[1].append(
            timed(
                lambda: subprocess.run(
                    [cli(), "init", args.image, b, "-s", POOL], check=True, capture_output=True
                )
            )
        )
        c.instances.start(a)
        ready = ExecRequest(["systemctl", "is-system-running", "--wait"])
        boot.append(timed(lambda: c.exec.run(a, ready)))
        for n in (a, b):
            c.instances.delete(n, force=True)
    print(f"{c.server.display_name}, pool {POOL}, image {args.image}, {args.runs} runs\n")
    print(f"image size: {img.size / 1e9:.2f} GB (uncompressed tarball, as the daemon reports)\n")
    print("| operation | coi client | CLI | coi / CLI |")
    print("|---|---|---|---|")
    ratio = statistics.median(create[0]) / statistics.median(create[1])
    print(f"| create from image | {fmt(create[0])} | {fmt(create[1])} | {ratio:.2f} |")
    print(f"| start → systemd running | {fmt(boot)} | | |")
    if args.build:
        t = timed(
            lambda: subprocess.run(
                [sys.executable, "-m", "coi", "build", "--force"], check=True, capture_output=True
            )
        )
        print(f"\n`coi build --force` from the cached base: {t:.0f} s")


if __name__ == "__main__":
    main()
