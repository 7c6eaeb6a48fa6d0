"""SDK benchmark: `sb.run(["true"])` on a running sandbox against the daemon's own exec floor,
same sandbox, same run, interleaved.

    .venv/bin/python bench/sdk.py [--runs 30] [--image coi-tiny]

Rows:
  sdk run        `sb.run(["true"])`: as the agent user, in the workspace, session
                 environment, output captured through the exec websockets
  sdk run (out)  the same for `echo hi` (output read back)
  raw exec ws    the backend's exec with websockets (`client.exec.run`), no session parts
  raw exec       one POST + wait, no websockets, no output (`client.exec.quiet`): the floor
                 the daemon sets for starting a command and learning its exit code
  incus exec     the daemon's CLI (`incus exec NAME -- true`), a process per call
Prints a Markdown table of medians with [min..max].
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile

from _common import cli, fmt, timed

import coi
from coi.backend import ExecRequest


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--image", default="coi-tiny")
    a = ap.parse_args()
    rows: dict[str, list[float]] = {
        k: [] for k in ("sdk run", "sdk run (out)", "raw exec ws", "raw exec", "incus exec")
    }
    with (
        tempfile.TemporaryDirectory() as ws,
        coi.connect() as client,
        client.sandbox(ws, image=a.image, log=lambda _line: None) as sb,
    ):
        raw = client.backend
        argv = [cli(), "exec", "--project", raw.project, sb.name, "--", "true"]
        for _ in range(3):  # warm: the first exec in a container costs more
            sb.run(["true"])
        for _ in range(a.runs):
            rows["sdk run"].append(timed(lambda: sb.run(["true"])))
            rows["sdk run (out)"].append(timed(lambda: sb.run(["echo", "hi"])))
            rows["raw exec ws"].append(timed(lambda: raw.exec.run(sb.name, ExecRequest(["true"]))))
            rows["raw exec"].append(timed(lambda: raw.exec.quiet(sb.name, ExecRequest(["true"]))))
            rows["incus exec"].append(timed(lambda: subprocess.run(argv, check=True)))
    print(f"daemon: {client.daemon}, runs: {a.runs}\n")
    print("| row | median [min..max] |\n|---|---|")
    for k, xs in rows.items():
        print(f"| {k} | {fmt(xs)} |")


if __name__ == "__main__":
    main()
