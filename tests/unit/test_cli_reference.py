from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def test_cli_reference_matches_help() -> None:
    res = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "cli_reference.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, res.stderr
