"""Backend benchmark: coi's REST client vs the daemon's own CLI (lxc/incus), same machine, same run.

    .venv/bin/python bench/backend.py [--runs 5]

Rows: exec round trip (`true`), create+start, stop (force), delete, 64 MiB file push.
Prints a Markdown table of medians with [min..max].
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
from pathlib import Path

from _common import cli, fmt, sh, timed

from coi.backend import ExecRequest, IncusClient

POOL, IMAGE = os.environ.get("COI_POOL", "coi"), "coi-tiny"
DEVICES = {"root": {"type": "disk", "path": "/", "pool": POOL}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    n = ap.parse_args().runs
    c = IncusClient.connect()
    rows: dict[str, tuple[list[float], list[float]]] = {
        k: ([], [])
        for k in ("exec `true`", "create+start", "stop (force)", "delete", "file push 64 MiB")
    }
    blob = Path(tempfile.mkdtemp()) / "blob"
    blob.write_bytes(os.urandom(64 * 1024 * 1024))
    for i in range(n):
        a, b = f"bench-a{i}", f"bench-b{i}"
        rows["create+start"][0].append(
            timed(lambda: c.instances.create(a, image=IMAGE, devices=DEVICES, start=True))
        )
        rows["create+start"][1].append(timed(lambda: sh("launch", IMAGE, b, "-s", POOL)))
        for _ in range(3):
            rows["exec `true`"][0].append(timed(lambda: c.exec.run(a, ExecRequest(["true"]))))
            rows["exec `true`"][1].append(timed(lambda: sh("exec", b, "--", "true")))
        rows["file push 64 MiB"][0].append(timed(lambda: c.files.push_file(a, blob, "/tmp/blob")))
        rows["file push 64 MiB"][1].append(
            timed(lambda: sh("file", "push", str(blob), f"{b}/tmp/blob"))
        )
        rows["stop (force)"][0].append(timed(lambda: c.instances.stop(a, force=True)))
        rows["stop (force)"][1].append(timed(lambda: sh("stop", "-f", b)))
        rows["delete"][0].append(timed(lambda: c.instances.delete(a)))
        rows["delete"][1].append(timed(lambda: sh("delete", b)))
    shutil.rmtree(blob.parent)
    print(f"{c.server.display_name}, pool {POOL}, {n} runs; CLI = {cli()}\n")
    print("| operation | coi client | CLI | coi / CLI |")
    print("|---|---|---|---|")
    for k, (mine, theirs) in rows.items():
        ratio = statistics.median(mine) / statistics.median(theirs)
        print(f"| {k} | {fmt(mine)} | {fmt(theirs)} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
