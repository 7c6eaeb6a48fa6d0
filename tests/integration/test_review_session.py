"""`coi run --review`: the agent works on a copy in a real sandbox; the user's folder is
untouched until `coi apply`, which brings the changes in, owned by the user."""

from __future__ import annotations

import json
import os
import pwd
import re
import subprocess
from pathlib import Path

from tests.conftest import run_coi
from tests.integration.conftest import USER, coi_names, remove_containers, user_dir, wait_for
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


def test_review_mode_is_refused_with_container_before_any_copy(
    base: Path, uenv: dict[str, str], user: pwd.struct_passwd
) -> None:
    ws = user_dir(base / "ws", user)
    res = run_coi("shell", "--review", "--container", "coi-somebody", "-w", str(ws),
                  "--background", env=uenv, user=USER)  # fmt: skip
    assert res.returncode == 2 and "review mode needs a sandbox" in res.stderr, res.stderr
    assert not (Path(uenv["COI_HOME"]) / "reviews").exists() or not any(
        (Path(uenv["COI_HOME"]) / "reviews").iterdir()
    )


def test_a_persistent_sandbox_mounts_each_sessions_copy_or_your_folder(
    client: IncusClient, base: Path, uenv: dict[str, str], user: pwd.struct_passwd
) -> None:
    """One persistent container, three sessions: each review session gets a new copy of
    your folder (not the previous review's), a live one your folder; a running one on
    another copy is refused, and the copy made for the refused session is dropped."""
    ws = user_dir(base / "ws", user)
    (ws / "a.txt").write_text("user\n")
    os.chown(ws / "a.txt", user.pw_uid, user.pw_gid)

    def run(*extra: str, script: str) -> subprocess.CompletedProcess[str]:
        return run_coi("run", "--slot", "1", "--persistent", *extra, "--image", "coi-tiny",
                       "-w", str(ws), "--", "sh", "-c", script, env=uenv, user=USER)  # fmt: skip

    try:
        one = run("--review", script="cat /workspace/a.txt && echo one > /workspace/a.txt")
        assert one.returncode == 0 and one.stdout.strip() == "user", one.stderr
        two = run("--review", script="cat /workspace/a.txt")
        assert two.returncode == 0 and two.stdout.strip() == "user", two.stderr
        rid1, rid2 = _rid(one.stderr), _rid(two.stderr)
        assert rid1 != rid2 and "Restarting existing persistent container" in two.stderr
        live = run(script="cat /workspace/a.txt && echo live > /workspace/b.txt")
        assert live.returncode == 0 and live.stdout.strip() == "user", live.stderr
        assert (ws / "b.txt").read_text() == "live\n" and (ws / "a.txt").read_text() == "user\n"
        assert len(coi_names(client, ws)) == 1

        diffs = {}
        for rid in (rid1, rid2):
            d = run_coi("diff", rid, "--format", "json", env=uenv, user=USER)
            diffs[rid] = {f["path"]: f["status"] for f in json.loads(d.stdout)["files"]}
        assert diffs == {rid1: {"a.txt": "modified"}, rid2: {}}

        # Running live (a shell in the background): a review session on it is refused.
        bg = run_coi("shell", "--slot", "1", "--persistent", "--background", "--image",
                     "coi-tiny", "-w", str(ws), env=uenv, user=USER)  # fmt: skip
        assert bg.returncode == 0, bg.stderr
        pending = run_coi("review", "list", "--format", "json", env=uenv, user=USER).stdout
        refused = run("--review", script="true")
        assert refused.returncode == 2, refused.stderr
        assert "is running on your folder itself" in refused.stderr
        after = run_coi("review", "list", "--format", "json", env=uenv, user=USER).stdout
        assert json.loads(after) == json.loads(pending)  # its copy was dropped
    finally:
        remove_containers(client, ws)


def _rid(stderr: str) -> str:
    found = re.search(r"review (\S+): the agent works on a copy", stderr)
    assert found, stderr
    return found.group(1)
