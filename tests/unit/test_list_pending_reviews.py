"""`coi list` looks for pending reviews without importing the review code where there is no
review at all, and reads them as before where there is something in the reviews folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

PROBE = """
import json, sys
from coi.cli.lifecycle_cmds import _pending_reviews
found = _pending_reviews()
print(json.dumps({"found": found, "imported": "coi.review.copy" in sys.modules}))
"""


def _probe(home: Path) -> dict[str, object]:
    env = {**os.environ, "COI_HOME": str(home)}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    ).stdout
    result: dict[str, object] = json.loads(out)
    return result


def test_no_reviews_folder_no_review_code(tmp_path: Path) -> None:
    assert _probe(tmp_path) == {"found": [], "imported": False}
    (tmp_path / "reviews").mkdir()
    assert _probe(tmp_path) == {"found": [], "imported": False}


def test_something_in_the_reviews_folder_is_read(tmp_path: Path) -> None:
    (tmp_path / "reviews" / "not-a-review").mkdir(parents=True)
    assert _probe(tmp_path) == {"found": [], "imported": True}


def test_the_lock_files_apply_leaves_are_not_reviews(tmp_path: Path) -> None:
    # `coi apply` leaves `.apply-KEY.lock` beside the reviews; a link is not read as a review
    # either (`all_reviews`): neither costs the review code's import, a folder still does.
    reviews = tmp_path / "reviews"
    reviews.mkdir()
    (reviews / ".apply-2ffa90e5037eb6ba.lock").touch()
    (tmp_path / "elsewhere").mkdir()
    (reviews / "a-link").symlink_to(tmp_path / "elsewhere")
    assert _probe(tmp_path) == {"found": [], "imported": False}
    (reviews / "ws-abc123").mkdir()
    assert _probe(tmp_path) == {"found": [], "imported": True}
