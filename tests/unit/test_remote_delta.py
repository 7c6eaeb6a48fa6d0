"""The workspace cache's pure parts (coi.sessions.wscache): the scan, the delta from what
the cache holds, the tar of the delta, and this machine's manifest of the cache."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest

from coi.sessions import wscache
from coi.sessions.wscache import Sig, delta, scan, write_tar


def _tree(root: Path) -> Path:
    (root / "b").mkdir(parents=True)
    (root / "a.txt").write_text("a\n")
    (root / "b" / "c.txt").write_text("c\n")
    (root / "b" / "d").mkdir()
    (root / "b" / "d" / "e.bin").write_bytes(b"\0" * 1000)
    os.symlink("b", root / "to-b")  # a link to a folder: never walked through
    os.mkfifo(root / "fifo")
    return root


def test_scan_lists_what_a_sandbox_gets_in_tar_order(tmp_path: Path) -> None:
    got = scan(_tree(tmp_path))
    assert list(got) == ["a.txt", "b", "b/c.txt", "b/d", "b/d/e.bin", "to-b"]
    assert got["to-b"][0] == "symlink" and got["to-b"][6] == "b"
    assert got["b/d/e.bin"][:1] == ("file",) and got["b/d/e.bin"][2] == 1000
    assert got["b"][0] == "dir"


def test_scan_leaves_out_masked_paths_and_their_other_names(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    (root / ".env").write_text("SECRET\n")
    os.link(root / ".env", root / "b" / "same-secret")
    (root / "keys").mkdir()
    (root / "keys" / "id").write_text("KEY\n")
    os.link(root / "keys" / "id", root / "id-again")
    got = scan(root, masked_files=frozenset({".env"}), masked_dirs=("keys/",))
    assert not {".env", "b/same-secret", "keys", "keys/id", "id-again"} & set(got)
    assert "b/c.txt" in got


def _sig(
    kind: str = "file", size: int = 1, mtime: int = 1, ctime: int = 1, target: str = ""
) -> Sig:
    return (kind, 0o100644 if kind == "file" else 0o40755, size, mtime, ctime, 7, target)


def test_no_cache_sends_everything() -> None:
    new = {"d": _sig("dir"), "d/f": _sig(), "l": _sig("symlink", target="d")}
    d = delta(None, new, strict=True)
    assert (d.send, d.delete, d.changed, d.removed) == (["d", "d/f", "l"], [], 2, 0)


def test_nothing_changed_sends_nothing() -> None:
    new = {"d": _sig("dir"), "d/f": _sig(), "l": _sig("symlink", target="d")}
    d = delta(dict(new), new, strict=True)
    assert (d.send, d.delete, d.changed, d.removed) == ([], [], 0, 0)


def test_a_folder_goes_when_new_or_changed() -> None:
    """Its header sets its mode and mtime (which moves when entries come or go)."""
    old = {"same": _sig("dir"), "moved": _sig("dir")}
    new = {"same": _sig("dir"), "moved": _sig("dir", mtime=2, ctime=2), "new": _sig("dir")}
    assert delta(old, new, strict=True).send == ["moved", "new"]


def test_changed_added_and_deleted_entries() -> None:
    old = {
        "d": _sig("dir"),
        "d/f": _sig(),
        "d/gone": _sig(),
        "old-dir": _sig("dir"),
        "old-dir/x": _sig(),
        "was-file": _sig(),
        "l": _sig("symlink", target="a"),
    }
    new = {
        "d": _sig("dir", mtime=2, ctime=2),  # an entry came and one went
        "d/f": _sig(size=2),  # changed
        "d/new": _sig(),  # added
        "was-file": _sig("dir"),  # a file became a folder
        "old-dir": _sig(),  # a folder became a file
        "l": _sig("symlink", target="b"),  # a link pointed elsewhere
    }
    d = delta(old, new, strict=True)
    assert d.send == ["d", "d/f", "d/new", "was-file", "old-dir", "l"]
    # Deepest first; re-sent files and links are removed before the tar writes them.
    assert d.delete == ["d/f", "d/gone", "old-dir/x", "l", "old-dir", "was-file"]
    assert (d.changed, d.removed) == (4, 2)


def test_strict_sees_a_change_with_size_and_mtime_restored() -> None:
    """Content rewritten, size and mtime put back (`touch -r`): only the ctime tells."""
    old = {"f": _sig(ctime=1)}
    new = {"f": _sig(ctime=2)}
    assert delta(old, new, strict=True).send == ["f"]
    # A fresh copy of the folder (a review's) has new ctimes and inodes everywhere: there the
    # quick check (kind, mode, size, mtime, target) decides.
    assert delta(old, new, strict=False).send == []
    assert delta(old, {"f": _sig(mtime=2, ctime=2)}, strict=False).send == ["f"]


def test_write_tar_keeps_links_as_links_and_owns_entries(tmp_path: Path) -> None:
    root = _tree(tmp_path / "ws")
    os.link(root / "a.txt", root / "b" / "a-again")
    names = [*scan(root), "vanished"]
    out = tmp_path / "out.tar"
    written, size = write_tar(root, names, out, 1000)
    assert "vanished" not in written
    with tarfile.open(out) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert members["./to-b"].issym() and members["./to-b"].linkname == "b"
    assert "./to-b/c.txt" not in members
    # The second name of a file in the same archive is a hard link to the first.
    assert members["./b/a-again"].islnk() and members["./b/a-again"].linkname == "./a.txt"
    assert all(m.uid == m.gid == 1000 and not m.uname for m in members.values())
    assert size == 2 + 2 + 1000


def test_write_tar_of_a_second_name_alone_carries_the_data(tmp_path: Path) -> None:
    """A new hard link to an unchanged file (not in the delta): its data, not a link to a
    name the archive does not hold."""
    root = _tree(tmp_path / "ws")
    os.link(root / "a.txt", root / "b" / "a-again")
    out = tmp_path / "out.tar"
    write_tar(root, ["b", "b/a-again"], out, 1000)
    with tarfile.open(out) as tar:
        m = tar.getmember("./b/a-again")
        assert m.isfile()
        fh = tar.extractfile(m)
        assert fh is not None and fh.read() == b"a\n"


def test_write_tar_does_not_follow_a_link_swapped_in_after_the_scan(tmp_path: Path) -> None:
    root = _tree(tmp_path / "ws")
    secret = tmp_path / "secret"
    secret.write_text("not the workspace's\n")
    names = list(scan(root))
    (root / "a.txt").unlink()
    os.symlink(secret, root / "a.txt")
    out = tmp_path / "out.tar"
    write_tar(root, names, out, 1000)
    with tarfile.open(out) as tar:
        m = tar.getmember("./a.txt")
        assert m.issym() and m.size == 0


def test_the_manifest_round_trips_with_mode_0600(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COI_HOME", str(tmp_path / "coi"))
    path = wscache.manifest_path("https://h:8443", "coi-me", "/ws")
    assert path.parent == tmp_path / "coi" / "remote-workspaces"
    assert path != wscache.manifest_path("https://other:8443", "coi-me", "/ws")
    m = wscache.Manifest(
        "https://h:8443", "coi-me", "/ws", "coi-ws-x", "gen", "/ws", {"f": _sig(), "d": _sig("dir")}
    )
    wscache.save_manifest(path, m)
    assert path.stat().st_mode & 0o777 == 0o600
    assert wscache.load_manifest(path) == m
    path.write_text('{"version": 1, "entries": {"f": [1]}}')
    assert wscache.load_manifest(path) is None
    path.write_text("not json")
    assert wscache.load_manifest(path) is None
    assert wscache.load_manifest(tmp_path / "missing.json") is None


def test_volume_names_are_per_workspace_project_user_and_machine() -> None:
    a, b = wscache.volume_name("/ws/a", "p"), wscache.volume_name("/ws/b", "p")
    assert a != b and a.startswith(wscache.PREFIX) and a == wscache.volume_name("/ws/a", "p")
    # Projects without volumes of their own share the default project's: one cache each.
    assert a != wscache.volume_name("/ws/a", "q")
    # A cluster member's own cache (and manifest), apart from the others'.
    assert wscache.volume_name("/ws/a", "p", "m1") not in (
        a,
        wscache.volume_name("/ws/a", "p", "m2"),
    )
    assert wscache.manifest_path("u", "p", "/ws/a", "m1") != wscache.manifest_path(
        "u", "p", "/ws/a"
    )
    # An Incus volume name: letters, digits and dashes, not too long.
    assert len(a) <= 63 and a.replace("-", "").isalnum()


def test_a_file_shrinking_while_it_is_sent_keeps_the_archive_whole() -> None:
    """tarfile reads exactly the size it wrote in the header: a file cut short meanwhile is
    padded (it is sent again next time: its ctime moved), never a broken archive."""
    import io

    from coi.sessions.wscache import _Exactly

    reader = _Exactly(io.BytesIO(b"abc"), 6)
    assert reader.read(4) + reader.read(4) == b"abc\0\0\0"
    assert reader.read(4) == b""


def test_the_cache_is_gated_on_the_servers_api_extensions() -> None:
    """Never on a name or a version: a server lacking one of them gets the whole upload."""

    class Server:
        def __init__(self, extensions: set[str]) -> None:
            self.extensions = extensions

        def has_extension(self, name: str) -> bool:
            return name in self.extensions

    assert wscache.supported(Server({"storage", "storage_api_project"}))  # type: ignore[arg-type]
    assert not wscache.supported(Server({"storage"}))  # type: ignore[arg-type]
