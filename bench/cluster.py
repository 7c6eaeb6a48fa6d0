"""How long coi's commands take on a three-member Incus cluster (tests/clusterkit.py), and
how long the cluster takes to make and remove.

    .venv/bin/python bench/cluster.py [--runs 5]

Starts the cluster (three incusd reachable over HTTPS only, in namespaces of their own; their
routes checked before anything is sent), adds it through member m2 in fresh config folders,
and times fresh `coi --remote lab ...` processes: `run -- true` restricted (the policy's
bridge made by the first run, not timed), open, and with `--target m3`; and `list`. Prints
medians [min..max]. Everything it made (members, namespaces, folders) is removed at the end.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import clusterkit  # noqa: E402

from coi.images.tiny import build_tarball  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="coi-bench-cluster-"))
    tarball = build_tarball(tmp / "tiny.tar")
    ws = tmp / "ws"
    ws.mkdir()
    (ws / "notes.txt").write_text("hello\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("COI_")}
    env.update(
        HOME=str(tmp / "home"),
        XDG_CONFIG_HOME=str(tmp / "xdg"),
        COI_HOME=str(tmp / "coi-home"),
        COI_IMAGE="coi-tiny",
    )
    (tmp / "home").mkdir()

    def coi(*argv: str) -> float:
        began = time.monotonic()
        res = subprocess.run(
            [str(ROOT / ".venv/bin/coi"), *argv],
            env=env, cwd=ws, capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        if res.returncode != 0:
            raise SystemExit(f"coi {' '.join(argv)} failed:\n{res.stderr}")
        return time.monotonic() - began

    began = time.monotonic()
    cl = clusterkit.start()
    up = time.monotonic() - began
    try:
        clusterkit.check_routes(cl)
        with cl.members[0].admin() as c:
            c.images.import_tarball(tarball, aliases=("coi-tiny",))
        m2 = cl.member("m2")
        coi("remote", "add", "lab", m2.url, "--token", m2.trust_token("bench"))
        coi("--remote", "lab", "run", "--", "true")  # makes the restricted policy's bridge
        cases = {
            "run -- true (restricted)": ["run", "--", "true"],
            "run --network open -- true": ["run", "--network", "open", "--", "true"],
            "run --target m3 -- true": ["run", "--target", "m3", "--", "true"],
            "list": ["list"],
        }
        for label, argv in cases.items():
            times = [coi("--remote", "lab", *argv) for _ in range(args.runs)]
            print(
                f"coi --remote lab {label}: {statistics.median(times):.2f} s "
                f"[{min(times):.2f}..{max(times):.2f}]",
                flush=True,
            )
    finally:
        began = time.monotonic()
        clusterkit.stop(cl)
        down = time.monotonic() - began
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"cluster up in {up:.1f} s, removed in {down:.1f} s; left: {clusterkit.leftovers(cl)}")


if __name__ == "__main__":
    main()
