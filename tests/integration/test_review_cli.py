"""`coi review start`, `coi diff`, `coi apply`, `coi discard` end to end, as the test user:
the agent's copy is the adversary (tests/reviewkit.py plants its attacks)."""

from __future__ import annotations

import json
import os
import pwd
import subprocess
from pathlib import Path

import pytest
from tests.conftest import ROOT, run_coi
from tests.integration.conftest import USER
from tests.reviewkit import HUGE_CAP, fingerprint, make_repo, plant, run_the_plants


@pytest.fixture
def env(base: Path, user: pwd.struct_passwd) -> dict[str, str]:
    home = base / "home"
    home.mkdir()
    os.chown(home, user.pw_uid, user.pw_gid)
    return {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "COI_HOME": str(home / ".coi"),
        "PYTHONPATH": str(ROOT / "src"),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "COI_REVIEW_MAX_FILE_SIZE": f"{HUGE_CAP}B",
    }


def give(path: Path, user: pwd.struct_passwd) -> None:
    """Everything under `path` to the test user (as the agent's files would be); setuid bits
    are put back, as chown clears them."""
    for p in [path, *path.rglob("*")]:
        mode = p.lstat().st_mode
        os.lchown(p, user.pw_uid, user.pw_gid)
        if not p.is_symlink() and mode & 0o6000:
            p.chmod(mode & 0o7777)


def coi(env: dict[str, str], ws: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_coi(*args, env=env, cwd=ws, user=USER)


def start(env: dict[str, str], ws: Path) -> tuple[str, Path]:
    res = coi(env, ws, "review", "start", "--format", "json")
    assert res.returncode == 0, res.stderr
    row = json.loads(res.stdout)
    assert row["workspace"] == str(ws) and row["state"] == "pending"
    return row["id"], Path(row["work"])


@pytest.fixture
def ws(base: Path, user: pwd.struct_passwd) -> Path:
    d = base / "proj"
    d.mkdir()
    (d / "notes.txt").write_text("one\ntwo\nthree\nfour\nfive\nsix\nseven\n")
    (d / "old.txt").write_text("remove me\n")
    (d / "lib").mkdir()
    (d / "lib" / "util.py").write_text("def f():\n    return 1\n")
    give(d, user)
    return d


def test_edit_create_delete_diff_and_apply_owned_by_the_user(
    env: dict[str, str], ws: Path, user: pwd.struct_passwd
) -> None:
    rid, work = start(env, ws)
    (work / "notes.txt").write_text("one\ntwo\nTHREE\nfour\nfive\nsix\nseven\n")
    (work / "old.txt").unlink()
    (work / "lib" / "new.py").write_text("X = 1\n")
    give(work, user)
    before = fingerprint(ws)
    res = coi(env, ws, "diff")
    assert res.returncode == 0, res.stderr
    assert "-three\n+THREE\n" in res.stdout and "+X = 1\n" in res.stdout
    assert "--- a/old.txt\n+++ /dev/null" in res.stdout
    res = coi(env, ws, "diff", "--stat")
    assert "3 files changed (1 added, 1 modified, 1 deleted)" in res.stdout
    res = coi(env, ws, "diff", rid, "--format", "json")
    files = {f["path"]: f for f in json.loads(res.stdout)["files"]}
    assert files["notes.txt"] == {
        "path": "notes.txt",
        "status": "modified",
        "binary": False,
        "added": 1,
        "removed": 1,
    }
    assert fingerprint(ws) == before  # diff wrote nothing
    # The user edits another line meanwhile: it merges.
    (ws / "notes.txt").write_text("one\ntwo\nthree\nfour\nfive\nsix\nseven (mine)\n")
    res = coi(env, ws, "apply")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "M notes.txt (merged with your changes)" in res.stdout
    assert (ws / "notes.txt").read_text() == "one\ntwo\nTHREE\nfour\nfive\nsix\nseven (mine)\n"
    assert not (ws / "old.txt").exists()
    for f in (ws / "notes.txt", ws / "lib" / "new.py"):
        assert f.stat().st_uid == user.pw_uid
    assert "No pending reviews." in coi(env, ws, "review", "list").stdout
    assert "applied" in coi(env, ws, "review", "list", "--all").stdout


def test_a_conflict_applies_nothing_partial_applies_the_clean_files(
    env: dict[str, str], ws: Path, user: pwd.struct_passwd
) -> None:
    start(env, ws)
    _, work = start(env, ws)  # the latest one is the default
    (work / "notes.txt").write_text("one\ntwo\nagent\nfour\nfive\nsix\nseven\n")
    (work / "added.txt").write_text("new\n")
    give(work, user)
    (ws / "notes.txt").write_text("one\ntwo\nuser\nfour\nfive\nsix\nseven\n")
    before = fingerprint(ws)
    res = coi(env, ws, "apply")
    assert res.returncode == 1
    assert (
        "nothing was written" in res.stdout and "C notes.txt: changed on both sides" in res.stdout
    )
    assert "--partial" in res.stderr
    assert fingerprint(ws) == before
    res = coi(env, ws, "apply", "--partial", "--format", "json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["files"] == [{"path": "added.txt", "result": "added"}]
    assert [c["path"] for c in out["conflicts"]] == ["notes.txt"] and out["state"] == "pending"
    assert (ws / "notes.txt").read_text().startswith("one\ntwo\nuser\n")


def test_two_reviews_change_one_file_applying_the_second_conflicts(
    env: dict[str, str], ws: Path, user: pwd.struct_passwd
) -> None:
    one, work1 = start(env, ws)
    two, work2 = start(env, ws)
    (work1 / "notes.txt").write_text("one\ntwo\nfirst\nfour\nfive\nsix\nseven\n")
    (work2 / "notes.txt").write_text("one\ntwo\nsecond\nfour\nfive\nsix\nseven\n")
    give(work1, user)
    give(work2, user)
    assert "+first" in coi(env, ws, "diff", one).stdout
    assert "+second" in coi(env, ws, "diff", two).stdout
    assert coi(env, ws, "apply", one).returncode == 0
    res = coi(env, ws, "apply", two)
    assert res.returncode == 1 and "C notes.txt" in res.stdout
    assert "first" in (ws / "notes.txt").read_text()


def test_discard_leaves_nothing_and_a_missing_review_is_a_usage_error(
    env: dict[str, str], ws: Path, user: pwd.struct_passwd
) -> None:
    rid, work = start(env, ws)
    (work / "locked").mkdir()
    (work / "locked" / "f").write_text("x")
    give(work, user)
    (work / "locked").chmod(0)
    res = coi(env, ws, "discard")
    assert res.returncode == 0 and rid in res.stdout
    assert list((Path(env["COI_HOME"]) / "reviews").iterdir()) == []
    assert (ws / "notes.txt").exists()
    for args in (("diff",), ("apply",), ("discard",), ("diff", "nope")):
        res = coi(env, ws, *args)
        assert res.returncode == 2, (args, res.stderr)


def test_the_agents_attacks_run_nothing_and_reach_nothing_outside(
    env: dict[str, str], base: Path, user: pwd.struct_passwd
) -> None:
    ws = base / "repo"
    make_repo(ws)
    give(ws, user)
    rid, work = start(env, ws)
    p = plant(work, base)
    give(work, user)
    (ws / "README.md").write_text("# project (user)\n\nline one\nline two\nline three\n")
    outside = fingerprint(p.ssh, p.outside, Path("/etc/passwd"))
    before = fingerprint(ws)

    for args in (("diff",), ("diff", "--stat"), ("diff", "--format", "json")):
        res = coi(env, ws, *args)
        assert res.returncode == 0, res.stderr
        for path, word in p.refused.items():
            assert path in res.stdout and word in res.stdout, (args, path)
    res = coi(env, ws, "apply")
    assert res.returncode == 1 and "nothing was written" in res.stdout
    for path in p.refused:
        assert f"! {path}: " in res.stdout, path
    assert "Not applied: " in res.stdout and "under .git/" in res.stdout  # git mode
    assert fingerprint(ws) == before
    res = coi(env, ws, "apply", "--partial", "--include-protected")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "M README.md (merged with your changes)" in res.stdout
    assert "A .gitattributes (note: host git reads its filter" in res.stdout
    assert list(p.markers.iterdir()) == []
    assert fingerprint(p.ssh, p.outside, Path("/etc/passwd")) == outside
    for path in p.refused:
        assert not os.path.lexists(ws / path), path
    # The control: plain git in the agent's copy runs what was planted.
    run_the_plants(work, p.ssh.parent, USER)
    assert {m.name for m in p.markers.iterdir()} >= {"fsmonitor", "external", "clean", "hookspath"}
    assert coi(env, ws, "discard", rid).returncode == 0
