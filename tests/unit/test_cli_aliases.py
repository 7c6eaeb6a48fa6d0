"""Upstream 0.8+'s names work beside coi's 0.7 ones."""

from __future__ import annotations

import pytest

from coi.cli import main


def test_unfreeze_is_resume(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["unfreeze", "--help"]) == 0
    assert "Resume containers the security monitor paused" in capsys.readouterr().out
    assert main(["--help"]) == 0
    assert "resume (unfreeze)" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["kill", "shutdown", "persist", "clean"])
def test_all_and_force_have_their_short_flags(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "-a, --all" in out and "-f, --force" in out


def test_powershell_completion_as_upstream_ships_it() -> None:
    """Upstream (cobra) prints a PowerShell completion; coi's script registers a completer
    that asks coi for the values, and coi answers that protocol."""
    import os
    import subprocess
    import sys

    script = subprocess.run(
        [sys.executable, "-m", "coi", "completion", "powershell"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "Register-ArgumentCompleter" in script.stdout and "powershell_complete" in script.stdout
    env = {**os.environ, "_COI_COMPLETE": "powershell_complete"}
    env.update(COMP_WORDS="coi snapshot re", COMP_CWORD="re")
    asked = subprocess.run([sys.executable, "-m", "coi"], env=env, capture_output=True, text=True)
    assert asked.stdout.split() == ["restore"]
