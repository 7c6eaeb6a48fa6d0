"""How long a remote review's round trip takes: the upload of the review's copy and the fetch
of the agent's work back (coi.sessions.remote), on the second daemon of tests/remotekit.py.

    .venv/bin/python bench/remote_review.py [--mb 100] [--runs 3]

Makes a workspace of MB files of 1 MB plus 2000 small files, starts a second incusd reachable
over HTTPS only (its own network namespace; its route is checked before anything is sent),
adds it in fresh config folders (nothing configured is left), and times `coi --remote r1 run
--review` of a command that changes one file, reading the "Copied ..." and "Fetched ..." lines
the command prints. Everything it made (daemon, namespace, folders) is removed at the end.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import remotekit  # noqa: E402

from coi.images.tiny import build_tarball  # noqa: E402

TIMES = re.compile(r"in ([0-9.]+) s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=100)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="coi-bench-remote-review-"))
    try:
        ws = tmp / "ws"
        ws.mkdir()
        for i in range(args.mb):
            (ws / f"big{i:03}.bin").write_bytes(os.urandom(1_000_000))
        for i in range(2000):
            d = ws / f"src{i % 20}"
            d.mkdir(exist_ok=True)
            (d / f"f{i}.txt").write_text(f"line {i}\n" * 20)
        tarball = build_tarball(tmp / "tiny.tar")
        with remotekit.running() as rd:
            remotekit.check_route(rd)
            with rd.admin() as c:
                c.images.import_tarball(tarball, aliases=("coi-tiny",))
            env = {k: v for k, v in os.environ.items() if not k.startswith("COI_")}
            env.update(
                HOME=str(tmp / "home"),
                XDG_CONFIG_HOME=str(tmp / "xdg"),
                COI_HOME=str(tmp / "coi-home"),
                COI_IMAGE="coi-tiny",
            )
            (tmp / "home").mkdir()
            coi = [sys.executable, "-m", "coi"]
            subprocess.run(
                [*coi, "remote", "add", "r1", rd.url, "--token", rd.trust_token("bench")],
                env=env, check=True, capture_output=True,
            )  # fmt: skip
            up: list[float] = []
            down: list[float] = []
            whole: list[float] = []
            for _ in range(args.runs):
                t = time.perf_counter()
                res = subprocess.run(
                    [*coi, "--remote", "r1", "run", "--review", "--network", "open", "-w",
                     str(ws), "--", "sh", "-c", "echo changed >> /workspace/src0/f0.txt"],
                    env=env, capture_output=True, text=True, check=False,
                )  # fmt: skip
                whole.append(time.perf_counter() - t)
                if res.returncode != 0:
                    raise SystemExit(res.stderr)
                lines = res.stderr.splitlines()
                copied = next(x for x in lines if x.startswith("Copied the workspace"))
                fetched = next(x for x in lines if "Fetched the agent's work" in x)
                up.append(float(TIMES.findall(copied)[-1]))
                down.append(float(TIMES.findall(fetched)[-1]))
                print(copied, "\n" + fetched.strip(), flush=True)

            def med(xs: list[float]) -> str:
                return f"{statistics.median(xs):.2f} s [{min(xs):.2f}..{max(xs):.2f}]"

            print(f"upload {med(up)}; fetch {med(down)}; whole coi run --review {med(whole)}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
