"""How long secret masking's walk of the workspace takes (`security.mask_secrets`).

    .venv/bin/python bench/mask_plan.py [DIR ...]

With no DIR: a made-up tree of 500 packages x 100 files (51 000 entries), then this checkout.
Prints the time of three walks each with the default patterns, and how many paths matched.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

from coi.config.schema import DEFAULT_SECRET_PATTERNS
from coi.protection.masks import plan_masks


def walk(root: Path) -> None:
    times = []
    for _ in range(3):
        t = time.perf_counter()
        plan = plan_masks(root, DEFAULT_SECRET_PATTERNS)
        times.append(time.perf_counter() - t)
    shown = ", ".join(f"{x * 1000:.0f} ms" for x in times)
    print(f"{root}: {shown}; {len(plan.paths)} masked")


def main(argv: list[str]) -> None:
    if argv:
        for d in argv:
            walk(Path(d))
        return
    tree = Path(tempfile.mkdtemp(prefix="coi-maskbench-"))
    try:
        for i in range(500):
            lib = tree / f"pkg{i}" / "lib"
            lib.mkdir(parents=True)
            for j in range(100):
                (lib / f"m{j}.js").touch()
        (tree / ".env").touch()
        walk(tree)
    finally:
        shutil.rmtree(tree)
    walk(Path(__file__).resolve().parent.parent)


if __name__ == "__main__":
    main(sys.argv[1:])
