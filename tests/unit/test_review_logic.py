"""Review copies (coi.review): the copy, the diff, apply's three-way merge, discard, and the
agent's copy as the adversary: nothing in it is run, followed or written outside."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest
from tests.reviewkit import HUGE_CAP, fingerprint, make_repo, plant, run_the_plants

from coi.errors import ConfigError, UsageError
from coi.review import settings
from coi.review.apply import MODE_MASK, apply, git_env, is_protected, merge_text
from coi.review.copy import all_reviews, discard, find, load, start
from coi.review.diff import compare, printable, render_stat, render_text
from coi.review.settings import parse_size

PROTECTED = [".git/hooks", ".git/config", ".vscode", ".coi.toml", ".git/modules/*/hooks"]


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    d = tmp_path / "proj"
    d.mkdir()
    (d / "keep.txt").write_text("same\n")
    (d / "edit.txt").write_text("one\ntwo\nthree\nfour\nfive\nsix\nseven\n")
    (d / "gone.txt").write_text("bye\n")
    (d / "src").mkdir()
    (d / "src" / "a.py").write_text("print('a')\n")
    return d


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "coi" / "reviews"


def _apply(review, **kw):  # type: ignore[no-untyped-def]
    kw.setdefault("protected", PROTECTED)
    return apply(review, **kw)


def _tree(root: Path) -> dict[str, bytes | str]:
    out: dict[str, bytes | str] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = (
            ("-> " + os.readlink(p))
            if p.is_symlink()
            else (p.read_bytes() if p.is_file() else "dir")
        )
    return out


# --- the copy ---------------------------------------------------------------------------


def test_start_copies_the_folder_twice_into_a_private_folder(ws: Path, home: Path) -> None:
    os.symlink("keep.txt", ws / "link")  # the user's own link: copied as a link
    r = start(ws, session="s1", container="c1", home=home)
    folder = Path(r.folder)
    assert folder.parent == home and stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert _tree(Path(r.base)) == _tree(ws) == _tree(Path(r.work))
    assert os.readlink(Path(r.work) / "link") == "keep.txt"
    meta = json.loads((folder / "review.json").read_text())
    assert meta["workspace"] == str(ws) and meta["state"] == "pending"
    assert (meta["session"], meta["container"]) == ("s1", "c1")
    assert stat.S_IMODE((folder / "review.json").stat().st_mode) == 0o600
    assert load(folder) is not None and [x.id for x in all_reviews(home)] == [r.id]
    assert compare(r.base, r.work).changes == []


def test_start_refuses_what_is_not_a_folder(tmp_path: Path, home: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(UsageError):
        start(tmp_path / "f", home=home)
    with pytest.raises(UsageError):
        start(tmp_path / "missing", home=home)


def test_start_refuses_a_folder_holding_the_reviews_or_inside_them(tmp_path: Path) -> None:
    home = tmp_path / "h" / ".coi" / "reviews"
    (tmp_path / "h").mkdir()
    with pytest.raises(UsageError, match="holds coi's reviews folder"):
        start(tmp_path / "h", home=home)
    (home / "x").mkdir(parents=True)
    with pytest.raises(UsageError, match="holds coi's reviews folder"):
        start(home / "x", home=home)
    assert list(home.iterdir()) == [home / "x"]


def test_find_picks_the_workspaces_latest_pending_review(ws: Path, home: Path) -> None:
    first = start(ws, home=home)
    second = start(ws, home=home)
    assert find(None, ws, home).id == second.id
    assert find(first.id, None, home).id == first.id
    assert find(first.id[:-2], None, home).id == first.id or first.id[:-2] == second.id[:-2]
    with pytest.raises(UsageError, match="matches several"):
        find("proj-", None, home)
    discard(second)
    assert find(None, ws, home).id == first.id
    with pytest.raises(UsageError, match="no review named"):
        find("nope", None, home)
    with pytest.raises(UsageError, match="no pending review"):
        find(None, ws.parent, home)
    # A discard cut short (marked, folder still there) is finished by discarding again.
    first.state = "discarded"
    first.save()
    with pytest.raises(UsageError):
        find(first.id, None, home)
    discard(find(first.id, None, home, include_discarded=True))
    assert list(home.iterdir()) == []


# --- the diff ---------------------------------------------------------------------------


def _agent_edits(work: Path) -> None:
    (work / "edit.txt").write_text("one\ntwo\nTHREE\nfour\nfive\nsix\nseven\n")
    (work / "gone.txt").unlink()
    (work / "new.txt").write_text("hello\n")
    (work / "src" / "img.png").write_bytes(b"\x89PNG\0\x01")
    (work / "src" / "a.py").chmod(0o755)


def test_diff_shows_added_modified_deleted_binary_and_mode(ws: Path, home: Path) -> None:
    r = start(ws, home=home)
    _agent_edits(Path(r.work))
    d = compare(r.base, r.work)
    got = {c.path: (c.status, c.binary, c.added, c.removed) for c in d.changes}
    assert got == {
        "edit.txt": ("modified", False, 1, 1),
        "gone.txt": ("deleted", False, 0, 1),
        "new.txt": ("added", False, 1, 0),
        "src/a.py": ("modified", False, 0, 0),
        "src/img.png": ("added", True, 0, 0),
    }
    text = render_text(d)
    assert "-three\n+THREE\n" in text and "+++ /dev/null" in text and "--- /dev/null" in text
    assert "Binary file src/img.png added" in text and "PNG" not in text
    assert "old mode 644\nnew mode 755" in text
    st = render_stat(d)
    assert "5 files changed (2 added, 2 modified, 1 deleted)" in st
    assert "2 insertions(+), 2 deletions(-)" in st
    assert d.counts()["refused"] == 0
    assert d.changes[0].as_json() == {
        "path": "edit.txt",
        "status": "modified",
        "binary": False,
        "added": 1,
        "removed": 1,
    }


def test_undecodable_text_is_binary_and_escapes_are_not_sent_to_the_terminal(
    ws: Path, home: Path
) -> None:
    r = start(ws, home=home)
    work = Path(r.work)
    (work / "latin1.txt").write_bytes(b"caf\xe9\n")
    # A line that would erase itself on a terminal, and a name with an escape in it.
    (work / "edit.txt").write_text("one\x1b[2K\rtwo\r\n")
    (work / "evil\x1b[31mname").write_text("x\n")
    d = compare(r.base, r.work)
    assert {c.path: c.binary for c in d.changes}["latin1.txt"] is True
    text, st = render_text(d), render_stat(d)
    assert "\x1b" not in text and "+one\\x1b[2K\\x0dtwo\r\n" in text and "evil\\x1b[31mname" in text
    assert "\x1b" not in st
    assert printable("a\udcffb") == "a\\xffb"


def test_unchanged_big_or_setuid_files_of_the_user_are_not_reported(ws: Path, home: Path) -> None:
    with (ws / "big.bin").open("wb") as f:
        f.truncate(HUGE_CAP + 10)
    (ws / "tool").write_text("x")
    (ws / "tool").chmod(0o4755)
    r = start(ws, home=home)
    assert compare(r.base, r.work, max_file=HUGE_CAP).changes == []
    (Path(r.work) / "big.bin").unlink()  # removing the user's big file: a plain deletion
    [c] = compare(r.base, r.work, max_file=HUGE_CAP).changes
    assert (c.path, c.status, c.binary) == ("big.bin", "deleted", True)


def test_special_files_are_refused_with_a_reason_never_opened(ws: Path, home: Path) -> None:
    r = start(ws, home=home)
    work = Path(r.work)
    os.mkfifo(work / "fifo")  # opened without O_NONBLOCK, this would hang the diff
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(work / "sock"))
    s.close()
    os.mknod(work / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    os.symlink("/etc/shadow", work / "shadow")
    os.symlink("/", work / "src" / "root")  # a folder link inside a folder
    (work / "suid").write_text("x")
    (work / "suid").chmod(0o4755)
    (work / "sgid").write_text("x")
    (work / "sgid").chmod(0o2755)
    with (work / "huge").open("wb") as f:
        f.truncate(HUGE_CAP + 1)
    d = compare(r.base, r.work, max_file=HUGE_CAP)
    reasons = {c.path: c.reason for c in d.changes}
    assert all(c.status == "refused" for c in d.changes)
    assert "FIFO" in reasons["fifo"] and "socket" in reasons["sock"]
    assert "device" in reasons["null"] and "setuid" in reasons["suid"]
    assert "setgid" in reasons["sgid"] and "cap" in reasons["huge"]
    assert "/etc/shadow" in reasons["shadow"] and "not followed" in reasons["src/root"]
    assert not any(p.startswith("src/root/") for p in reasons)  # never descended
    assert "refused fifo: FIFO" in render_text(d)


def test_a_nest_too_deep_is_refused_not_walked(ws: Path, home: Path) -> None:
    r = start(ws, home=home)
    fd = os.open(r.work, os.O_RDONLY)
    try:
        for _ in range(300):  # deeper than MAX_DEPTH (and than the recursion would like)
            os.mkdir("d", dir_fd=fd)
            nxt = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    finally:
        os.close(fd)
    [c] = compare(r.base, r.work).changes
    assert c.status == "refused" and "deeper than 128" in c.reason
    assert c.path == "/".join(["d"] * 129)
    discard(r)
    assert list(home.iterdir()) == []


def test_a_changed_link_and_a_removed_link_of_the_user_are_refused(ws: Path, home: Path) -> None:
    os.symlink("keep.txt", ws / "l1")
    os.symlink("keep.txt", ws / "l2")
    r = start(ws, home=home)
    (Path(r.work) / "l1").unlink()
    os.symlink("/etc/passwd", Path(r.work) / "l1")
    (Path(r.work) / "l2").unlink()
    d = compare(r.base, r.work)
    assert {c.path: c.status for c in d.changes} == {"l1": "refused", "l2": "refused"}


# --- apply ------------------------------------------------------------------------------


def test_apply_brings_creates_edits_deletes_and_modes(ws: Path, home: Path) -> None:
    r = start(ws, home=home)
    _agent_edits(Path(r.work))
    (Path(r.work) / "new.txt").chmod(0o4777 & ~0o4000 | 0o1000)  # world-writable, sticky
    (Path(r.work) / "deep" / "er").mkdir(parents=True)
    (Path(r.work) / "deep" / "er" / "f").write_text("deep\n")
    res = _apply(r)
    assert res.written and not res.blocked
    assert _tree(ws) == _tree(Path(r.work))
    assert stat.S_IMODE((ws / "new.txt").stat().st_mode) == 0o775 == 0o777 & MODE_MASK
    assert stat.S_IMODE((ws / "src" / "a.py").stat().st_mode) == 0o755
    assert (ws / "new.txt").stat().st_uid == os.getuid()
    assert load(Path(r.folder)).state == "applied"  # type: ignore[union-attr]
    assert not list(ws.rglob(".coi-apply-*"))  # no temporary file left
    with pytest.raises(UsageError, match="applied, not pending"):
        _apply(r)


def test_a_compatible_edit_of_the_user_merges(ws: Path, home: Path) -> None:
    r = start(ws, home=home)
    _agent_edits(Path(r.work))
    (ws / "edit.txt").write_text("one\ntwo\nthree\nfour\nfive\nsix\nSEVEN (user)\n")
    res = _apply(r)
    assert not res.blocked
    assert (ws / "edit.txt").read_text() == "one\ntwo\nTHREE\nfour\nfive\nsix\nSEVEN (user)\n"
    assert {s.path: s.how for s in res.steps}["edit.txt"] == "merged"


def test_an_incompatible_edit_is_a_conflict_and_nothing_is_written(ws: Path, home: Path) -> None:
    r = start(ws, home=home)
    _agent_edits(Path(r.work))
    (ws / "edit.txt").write_text("one\ntwo\nthree (user)\nfour\nfive\nsix\nseven\n")
    before = _tree(ws)
    res = _apply(r)
    assert not res.written
    assert [p for p, _ in res.conflicts] == ["edit.txt"]
    assert "conflicting" in res.conflicts[0][1]
    assert _tree(ws) == before  # byte for byte: not even the clean files
    assert load(Path(r.folder)).state == "pending"  # type: ignore[union-attr]
    # --partial: the clean ones, the conflict left as the user has it.
    res = _apply(r, partial=True)
    assert res.written and [p for p, _ in res.conflicts] == ["edit.txt"]
    assert (ws / "new.txt").exists() and not (ws / "gone.txt").exists()
    assert (ws / "edit.txt").read_text().startswith("one\ntwo\nthree (user)\n")
    again = load(Path(r.folder))
    assert again is not None and again.state == "pending" and "new.txt" in again.applied


def test_deletions_apply_only_to_what_the_user_left_alone(ws: Path, home: Path) -> None:
    r = start(ws, home=home)
    (Path(r.work) / "gone.txt").unlink()
    (Path(r.work) / "keep.txt").unlink()
    (ws / "gone.txt").write_text("the user changed it\n")
    res = _apply(r)
    assert not res.written and res.conflicts == [
        ("gone.txt", "changed in your folder, deleted in the review")
    ]
    assert (ws / "gone.txt").exists() and (ws / "keep.txt").exists()


def test_other_conflicts_user_deleted_added_both_and_a_folder_there(ws: Path, home: Path) -> None:
    r = start(ws, home=home)
    work = Path(r.work)
    (work / "edit.txt").write_text("agent\n")
    (work / "both.txt").write_text("agent\n")
    (work / "dir").write_text("agent\n")
    (ws / "edit.txt").unlink()
    (ws / "both.txt").write_text("user\n")
    (ws / "dir").mkdir()
    res = _apply(r)
    why = dict(res.conflicts)
    assert "deleted in your folder" in why["edit.txt"]
    assert "added in your folder too" in why["both.txt"]
    assert "it is a dir" in why["dir"]
    assert not res.written


def test_two_reviews_of_one_workspace_the_second_conflicts(ws: Path, home: Path) -> None:
    one, two = start(ws, home=home), start(ws, home=home)
    (Path(one.work) / "edit.txt").write_text("one\ntwo\nthree by ONE\nfour\nfive\nsix\nseven\n")
    (Path(two.work) / "edit.txt").write_text("one\ntwo\nthree by TWO\nfour\nfive\nsix\nseven\n")
    assert compare(one.base, one.work).changes[0].text.count("+three by ONE") == 1
    assert compare(two.base, two.work).changes[0].text.count("+three by TWO") == 1
    assert _apply(one).written
    res = _apply(two)
    assert not res.written and [p for p, _ in res.conflicts] == ["edit.txt"]
    assert "three by ONE" in (ws / "edit.txt").read_text()


def test_reapplying_what_is_already_there_is_a_no_op(ws: Path, home: Path) -> None:
    one, two = start(ws, home=home), start(ws, home=home)
    for r in (one, two):
        (Path(r.work) / "edit.txt").write_text("same change\n")
    assert _apply(one).written
    res = _apply(two)
    assert res.written and not res.blocked
    assert [(s.path, s.how) for s in res.steps] == [("edit.txt", "already")]


def test_protected_paths_only_with_include_protected(ws: Path, home: Path) -> None:
    (ws / ".vscode").mkdir()
    r = start(ws, home=home)
    work = Path(r.work)
    (work / ".vscode" / "tasks.json").write_text('{"tasks": [{"command": "touch x"}]}\n')
    (work / ".coi.toml").write_text('[network]\nmode = "open"\n')
    (work / "ok.txt").write_text("fine\n")
    res = _apply(r)
    assert not res.written and {p for p, _ in res.refused} == {".vscode/tasks.json", ".coi.toml"}
    assert all("--include-protected" in why for _, why in res.refused)
    res = _apply(r, partial=True)
    assert (ws / "ok.txt").exists() and not (ws / ".coi.toml").exists()
    res = _apply(r, include_protected=True)
    assert res.written and not res.blocked and (ws / ".coi.toml").exists()


def test_files_host_tools_read_as_instructions_are_flagged_not_refused(
    ws: Path, home: Path
) -> None:
    r = start(ws, home=home)
    (Path(r.work) / ".gitattributes").write_text("* filter=x\n")
    (Path(r.work) / "src" / ".envrc").write_text("curl x | sh\n")
    d = compare(r.base, r.work)
    notes = {c.path: c.note for c in d.changes}
    assert "filter" in notes[".gitattributes"] and "direnv" in notes["src/.envrc"]
    assert "(note: host git reads" in render_stat(d)
    assert d.changes[0].as_json()["note"] == notes[".gitattributes"]
    res = _apply(r)
    assert res.written and {s.path: s.note for s in res.steps}["src/.envrc"]


def test_is_protected_matches_whole_components_and_what_is_under() -> None:
    assert is_protected(".git/hooks/pre-commit", PROTECTED) == ".git/hooks"
    assert is_protected(".git/modules/lib/hooks/x", PROTECTED) == ".git/modules/*/hooks"
    assert is_protected(".git/hooksx", PROTECTED) == ""
    assert is_protected("a/.vscode", PROTECTED) == ""


def test_never_written_through_a_link_in_the_users_folder(
    ws: Path, home: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    r = start(ws, home=home)
    (Path(r.work) / "sub").mkdir()
    (Path(r.work) / "sub" / "x.txt").write_text("agent\n")
    (Path(r.work) / "keep.txt").write_text("agent\n")
    # Meanwhile the user's folder has a link where a folder would go, and one at a file.
    os.symlink(outside, ws / "sub")
    (ws / "keep.txt").unlink()
    os.symlink(outside / "target", ws / "keep.txt")
    res = _apply(r, partial=True)
    why = dict(res.refused) | dict(res.conflicts)
    assert "sub is not a real folder" in why["sub/x.txt"]
    assert "symlink" in why["keep.txt"]
    assert list(outside.iterdir()) == []


def test_the_parent_swapped_for_a_link_after_the_plan_is_not_written_through(
    ws: Path, home: Path, tmp_path: Path
) -> None:
    from coi.review.tree import Unsafe, write_file

    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.rmtree(ws / "src")
    os.symlink(outside, ws / "src")
    with pytest.raises(Unsafe):
        write_file(str(ws), "src/a.py", b"x", 0o644)
    assert list(outside.iterdir()) == []


def test_discard_leaves_nothing(ws: Path, home: Path) -> None:
    r = start(ws, home=home)
    work = Path(r.work)
    (work / "locked").mkdir()
    (work / "locked" / "f").write_text("x")
    (work / "locked").chmod(0)  # the agent left a folder nobody may enter
    os.symlink(ws, work / "back")  # removed, never followed
    discard(r)
    assert list(home.iterdir()) == [] and all_reviews(home) == []
    assert (ws / "keep.txt").exists()


# --- git merge-file: no config, hooks, attributes -----------------------------------------


def test_merge_text_merges_and_reports_conflicts() -> None:
    base = b"a\nb\nc\nd\ne\n"
    merged, n = merge_text(b"A\nb\nc\nd\ne\n", base, b"a\nb\nc\nd\nE\n")
    assert (merged, n) == (b"A\nb\nc\nd\nE\n", 0)
    merged, n = merge_text(b"a\nX\nc\nd\ne\n", base, b"a\nY\nc\nd\ne\n")
    assert n == 1 and b"<<<<<<< yours" in merged and b"||||||| base" in merged


def test_merge_reads_no_config_of_the_user_nor_inherited_git_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    trace = tmp_path / "trace2"
    (home / ".gitconfig").write_text(f"[trace2]\n\teventTarget = {trace}\n")
    for name in ("a", "b", "c"):
        (tmp_path / name).write_text("x\n")
    # The control: plain git reads ~/.gitconfig, and the trace file appears.
    subprocess.run(
        ["git", "merge-file", "-p", "a", "b", "c"],
        cwd=tmp_path,
        env={"PATH": os.environ["PATH"], "HOME": str(home)},
        capture_output=True,
        check=False,
    )
    assert trace.exists()
    trace.unlink()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("GIT_TRACE", str(tmp_path / "gittrace"))
    monkeypatch.setenv("GIT_CONFIG_PARAMETERS", f"'trace2.eventtarget'='{trace}'")
    assert merge_text(b"x\n", b"x\n", b"y\n") == (b"y\n", 0)
    assert not trace.exists() and not (tmp_path / "gittrace").exists()
    env = git_env("/tmp/coi-merge-x")
    assert env["GIT_CONFIG_GLOBAL"] == "/dev/null" and env["GIT_CONFIG_NOSYSTEM"] == "1"
    assert env["HOME"] == "/tmp/coi-merge-x" and not any(k.startswith("GIT_TRACE") for k in env)


def test_merge_finds_no_repository_above_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hostile repository around the temporary folder (TMPDIR inside it) is not used: git
    would warn about (and read the config of) a repository it found."""
    repo = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", str(repo)], check=True, capture_output=True)
    subprocess.run(
        ["git", "-C", str(repo), "config", "core.repositoryformatversion", "99"], check=True
    )
    inner = repo / "tmp"
    inner.mkdir()
    for name in ("a", "b", "c"):
        (inner / name).write_text("x\n")
    control = subprocess.run(
        ["git", "merge-file", "-p", "a", "b", "c"], cwd=inner, capture_output=True, check=False
    )
    assert b"found 99" in control.stderr  # plain git found it
    monkeypatch.setattr(tempfile, "tempdir", str(inner))
    assert merge_text(b"x\n", b"x\n", b"y\n") == (b"y\n", 0)


# --- the agent as the adversary ------------------------------------------------------------


def test_planted_hooks_filters_links_and_special_files_run_and_leak_nothing(
    tmp_path: Path, home: Path
) -> None:
    ws = tmp_path / "repo"
    make_repo(ws)
    r = start(ws, home=home)
    p = plant(Path(r.work), tmp_path)
    # The user edits another line of the README meanwhile: apply must merge it (git runs).
    (ws / "README.md").write_text("# project (user)\n\nline one\nline two\nline three\n")
    outside = fingerprint(p.ssh, p.outside, Path("/etc/passwd"))

    d = compare(r.base, r.work, max_file=HUGE_CAP)
    render_text(d)
    render_stat(d)
    reasons = {c.path: c.reason for c in d.refused}
    for path, word in p.refused.items():
        assert word in reasons[path], (path, reasons.get(path))
    before = _tree(ws)
    res = _apply(r, max_file=HUGE_CAP)
    assert not res.written and _tree(ws) == before
    assert {path for path, _ in res.refused} >= set(p.refused)
    # Git mode: the agent's .git/ files (hooks, config) are git's data, never applied.
    assert set(p.protected) <= set(res.git_files)
    git_config = (ws / ".git" / "config").read_bytes()
    res = _apply(r, max_file=HUGE_CAP, partial=True, include_protected=True)
    assert res.written
    assert (ws / ".git" / "config").read_bytes() == git_config
    assert not (ws / ".git" / "hooks" / "pre-commit").exists()
    assert (ws / "README.md").read_text() == (
        "# project (user)\n\nline one\nline two\nline THREE by agent\n"
    )
    # Nothing planted ran, nothing outside changed, no link or special file came over.
    assert list(p.markers.iterdir()) == []
    assert fingerprint(p.ssh, p.outside, Path("/etc/passwd")) == outside
    for path in p.refused:
        assert not os.path.lexists(ws / path), path
    # The control: the same plants are live under plain git.
    run_the_plants(Path(r.work), p.ssh.parent)
    assert {m.name for m in p.markers.iterdir()} >= {"fsmonitor", "external", "clean", "hookspath"}


# --- settings -----------------------------------------------------------------------------


def test_size_setting_parses_and_an_untrusted_file_may_only_lower_it() -> None:
    from coi.config.schema import BY_KEY
    from coi.config.untrusted import judge

    assert parse_size("100MiB") == 100 * 2**20 and parse_size("5KB") == 5000
    assert parse_size("") == parse_size("0") == 0 and parse_size("10B") == 10
    with pytest.raises(ConfigError):
        parse_size("lots")
    s = BY_KEY["review.max_file_size"]
    assert s.trust == "lower" and parse_size(s.default) == 100 * 2**20
    assert judge(s, "1MiB", "100MiB") is None
    assert judge(s, "1GiB", "100MiB") and judge(s, "0", "100MiB") and judge(s, "", "100MiB")


def test_protected_includes_coi_config_even_with_protection_off() -> None:
    from coi.config.loader import load_config

    cfg = load_config(cwd=Path("/nonexistent"), env={}, files=[])
    assert ".git/hooks" in settings.protected(cfg)
    cfg.set("security.disable_protection", True, "test")
    assert set(settings.protected(cfg)) == {".coi.toml", ".coi"}
    assert settings.max_file(cfg) == 100 * 2**20


# --- the index: files untouched since the copy are not read ---------------------------------


def test_an_unchanged_review_is_diffed_without_reading_a_file(
    ws: Path, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import coi.review.diff as diffmod

    r = start(ws, home=home)
    (Path(r.work) / "new.txt").write_text("x\n")

    def no_reading(*args: object) -> bool:
        raise AssertionError("read a file")

    monkeypatch.setattr(diffmod, "same_content", no_reading)
    assert [c.path for c in compare(r.base, r.work, index=r.index()).changes] == ["new.txt"]
    with pytest.raises(AssertionError, match="read a file"):
        compare(r.base, r.work)  # without the index every file is read


def test_a_change_hidden_behind_the_same_size_and_an_old_mtime_is_still_seen(
    ws: Path, home: Path
) -> None:
    r = start(ws, home=home)
    work = Path(r.work)
    st = (work / "keep.txt").stat()
    (work / "keep.txt").write_text("SAME\n")  # same size
    os.utime(work / "keep.txt", ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime put back
    (work / "gone.txt").unlink()  # a new file under the old name (perhaps the same inode)
    (work / "gone.txt").write_text("bye\n")
    os.utime(work / "gone.txt", ns=(st.st_atime_ns, st.st_mtime_ns))
    (work / "edit.txt").rename(work / "tmp")
    (work / "tmp").rename(work / "edit.txt")  # renamed away and back: ctime moves, content same
    changes = compare(r.base, r.work, index=r.index()).changes
    assert [(c.path, c.status) for c in changes] == [("keep.txt", "modified")]


def test_clean_plan_keeps_reviews_a_running_sandbox_works_on(ws: Path, home: Path) -> None:
    from coi.review import clean

    used, free, applied = (start(ws, home=home) for _ in range(3))
    applied.state = "applied"
    applied.save()
    todo = clean.plan({used.id: "coi-abc-1"}, home)
    assert [(r.id, name) for r, name in todo.in_use] == [(used.id, "coi-abc-1")]
    assert sorted(r.id for r in todo.remove) == sorted([free.id, applied.id])


def test_snapshots_diff_by_inode_and_ctime_not_an_index(ws: Path, home: Path) -> None:
    """A pool review has no index: a file keeping base's inode and ctime is base's; one the
    agent rewrote (even with its size and mtime put back) is read and reported."""
    r = start(ws, home=home)
    r.store = r.folder  # as if base/ and work/ were snapshots on the pool
    assert r.snapshots and r.index() is None
    target = next(p for p in Path(r.work).rglob("*") if p.is_file() and not p.is_symlink())
    old = target.stat()
    data = target.read_bytes()
    target.write_bytes(bytes([data[0] ^ 1]) + data[1:] if data else b"x")
    os.utime(target, ns=(old.st_atime_ns, old.st_mtime_ns))
    d = compare(r.base, r.work, index=r.index(), snapshots=True)
    assert [c.path for c in d.changes] == [str(target.relative_to(r.work))]
