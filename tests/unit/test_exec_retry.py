from __future__ import annotations

import pytest

from coi.backend.exec import _NOT_STARTED, _retry_not_started
from coi.errors import OperationFailed


def test_lost_child_is_started_again_only_when_nothing_ran() -> None:
    calls = []

    def flaky() -> int:
        calls.append(1)
        if len(calls) < 3:
            raise OperationFailed(f"exec: {_NOT_STARTED}")
        return 7

    assert _retry_not_started(flaky, may_retry=lambda: True) == 7 and len(calls) == 3
    calls.clear()
    with pytest.raises(OperationFailed):
        _retry_not_started(flaky, may_retry=lambda: False)
    assert len(calls) == 1

    def other() -> int:
        raise OperationFailed("exec: something else")

    with pytest.raises(OperationFailed, match="something else"):
        _retry_not_started(other, may_retry=lambda: True)
