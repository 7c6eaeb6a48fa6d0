"""The attack suite: every corpus entry (tests/attacks/corpus.py) run as the agent in a real
sandbox under `coi run --monitor`, default settings, against hosts this test makes.

Attacks must be raised at their expected level (or above) and answered (killed, paused,
alerted); exfiltration must be stopped before 10 MB has left; benign developer workloads must
finish and raise nothing above info. One reverse shell of each kind also runs from a script
file and with its programs renamed. Entries the monitor does not catch yet are expected
failures (strict: the day a rule catches one, it fails until its mark is removed); entries it
catches only when it wins a race (a 1 ms command's line read in time) are non-strict expected
failures. Entries that need a program the tiny image can never have (python3, git, a C
compiler) are not collected here: `bench/attacks.py --image coi` runs them, and its table lists
them as not run elsewhere. Nothing is skipped: an entry that cannot run fails.
"""

from __future__ import annotations

import json

import pytest

from tests.attacks import corpus, harness
from tests.attacks.corpus import Entry

pytestmark = [pytest.mark.incus, pytest.mark.timeout(1200)]


def _case(entry: Entry, variant: str) -> object:
    marks = []
    if gap := entry.gap_for(variant):
        marks.append(pytest.mark.xfail(strict=True, reason=gap))
    elif entry.racy:
        marks.append(pytest.mark.xfail(strict=False, reason=f"racy today: {entry.racy}"))
    return pytest.param((entry, variant), id=f"{entry.id}[{variant}]", marks=marks)


# One reverse shell of each kind also from a script file and renamed (bench/attacks.py runs
# every entry in all three forms; this keeps the suite within its few minutes).
FORMS = (
    "nc-e-443", "fifo-nc-443", "nc-sh-nc", "telnet-sh-telnet", "awk-system-runner",
    "base64-fifo", "bash-dev-tcp-443", "bash-exec-fd-80", "bash-dev-udp", "perl-socket-443",
)  # fmt: skip
# Programs the tiny image (what the suite runs in) never has; bash and perl come from the host.
NOT_IN_TINY = {"python3", "git", "cc"}
CASES = [_case(e, "plain") for e in corpus.ALL if not NOT_IN_TINY & set(e.needs)] + [
    _case(e, v) for e in corpus.REVERSE_SHELLS if e.name in FORMS for v in ("script", "renamed")
]


@pytest.mark.parametrize("case", CASES)
def test_entry(case: tuple[Entry, str], outcomes: dict[tuple[str, str], harness.Outcome]) -> None:
    entry, variant = case
    out = outcomes[(entry.id, variant)]
    assert not out.skipped, f"could not run here: {out.skipped}"  # CI skips nothing
    assert not out.error, out.error
    detail = json.dumps(out.events, indent=1)[:4000] + "\n" + out.output[-1500:]
    if entry.family == corpus.BENIGN:
        assert out.exit_code == 0, f"the workload failed: {detail}"
        assert out.level == "info", f"false alarm: {out.summary()}\n{detail}"
        return
    assert out.detected, f"{out.summary()}, {out.bytes_out} bytes out\n{detail}"
    if out.action == "killed":
        assert out.exit_code == 137, detail
