"""`coi run --review`: the agent works on a copy in a real sandbox; the user's folder is
untouched until `coi apply`, which brings the changes in, owned by the user."""

from __future__ import annotations

import json
import pwd
import re
from pathlib import Path

from tests.conftest import run_coi
from tests.integration.conftest import USER, coi_names, user_dir, wait_for
from tests.reviewkit import fingerprint

from coi.backend import IncusClient

GIB = 1 << 30


def test_the_agent_works_on_a_copy_until_apply(
    client: IncusClient, base: Path, uenv: dict[str, str], user: pwd.struct_passwd
) -> None:
    ws = user_dir(base / "ws", user)
    for name, text in (("a.txt", "one\n"), ("b.txt", "gone\n")):
        (ws / name).write_text(text)
    (ws / ".git").mkdir()  # a protected path in the copy too
    for p in (ws / "a.txt", ws / "b.txt", ws / ".git"):
        p.chmod(0o755 if p.is_dir() else 0o644)
        import os

        os.chown(p, user.pw_uid, user.pw_gid)
    before = fingerprint(ws)
    agent = (
        "cd /workspace && echo new > new.txt && echo two >> a.txt && rm b.txt "
        "&& truncate -s 1G big.bin && ls"
    )
    res = run_coi("run", "--review", "--image", "coi-tiny", "-w", str(ws), "--", "sh", "-c",
                  agent, env=uenv, user=USER)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["a.txt", "big.bin", "new.txt"]
    found = re.search(r"review (\S+): the agent works on a copy", res.stderr)
    assert found, res.stderr
    rid = found.group(1)
    assert f"'coi apply {rid}' brings them in" in res.stderr
    wait_for(lambda: not coi_names(client, ws), "the sandbox to go", 30)
    assert fingerprint(ws) == before  # the user's folder, byte for byte

    # Files over the review's size cap (100 MiB by default) are refused: this one is wanted.
    big_ok = {**uenv, "COI_REVIEW_MAX_FILE_SIZE": "2GiB"}
    diff = run_coi("diff", rid, "--format", "json", env=big_ok, user=USER)
    assert diff.returncode == 0, diff.stderr
    files = {f["path"]: f["status"] for f in json.loads(diff.stdout)["files"]}
    assert files == {
        "new.txt": "added",
        "a.txt": "modified",
        "b.txt": "deleted",
        "big.bin": "added",
    }
    applied = run_coi("apply", rid, env=big_ok, user=USER)
    assert applied.returncode == 0, applied.stdout + applied.stderr
    assert (ws / "a.txt").read_text() == "one\ntwo\n"
    assert (ws / "new.txt").read_text() == "new\n"
    assert not (ws / "b.txt").exists()
    assert (ws / "big.bin").stat().st_size == GIB
    for f in ("a.txt", "new.txt", "big.bin"):
        assert (ws / f).stat().st_uid == user.pw_uid
    listed = run_coi("review", "list", "--all", "--format", "json", env=uenv, user=USER)
    assert [r["state"] for r in json.loads(listed.stdout) if r["id"] == rid] == ["applied"]


def test_review_mode_is_refused_for_a_persistent_sandbox_before_any_copy(
    base: Path, uenv: dict[str, str], user: pwd.struct_passwd
) -> None:
    ws = user_dir(base / "ws", user)
    res = run_coi("run", "--review", "--persistent", "--image", "coi-tiny", "-w", str(ws), "--",
                  "true", env=uenv, user=USER)  # fmt: skip
    assert res.returncode == 2 and "review mode needs a sandbox" in res.stderr, res.stderr
    assert not (Path(uenv["COI_HOME"]) / "reviews").exists() or not any(
        (Path(uenv["COI_HOME"]) / "reviews").iterdir()
    )
