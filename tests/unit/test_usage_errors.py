"""One exit code for a usage mistake, whichever command and whichever check finds it."""

from __future__ import annotations

import pytest

from coi.cli import main

MISTAKES = [
    ["frobnicate"],  # unknown command (the parser)
    ["health", "--bogus"],  # unknown flag (the parser)
    ["run", "--format", "json", "--", "true"],  # coi's own check, in `coi run`
    ["container", "exec", "box", "--format", "json", "--", "true"],  # ... and in `container`
    ["run", "--network", "wide-open", "--", "true"],  # a value out of its choices
    ["shell", "stray-argument"],
    ["completion", "tcsh"],
]


@pytest.mark.parametrize("argv", MISTAKES, ids=lambda a: " ".join(a))
def test_every_usage_mistake_exits_2_and_says_what_to_do(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("Error: "), err
