"""What comes out of a container is data: entry filtering, host modes, names, destinations,
the tree walk over a fake source and the SFTP reader over a fake server."""

from __future__ import annotations

import os
import socket
import stat
import struct
import threading
from pathlib import Path

import pytest

from coi.backend.files import FilesAPI, _Source
from coi.backend.intake import (
    PullReport,
    check_destination,
    check_name,
    host_mode,
    kind_of,
    new_file,
    sanitize_tree,
    shown,
)
from coi.backend.sftp import Attrs, SFTPSession
from coi.errors import BackendError, UsageError


@pytest.mark.parametrize(
    ("mode", "kind"),
    [
        (stat.S_IFREG | 0o644, "file"),
        (stat.S_IFDIR | 0o755, "directory"),
        (stat.S_IFLNK | 0o777, "symbolic link"),
        (stat.S_IFIFO | 0o644, "FIFO"),
        (stat.S_IFSOCK | 0o755, "socket"),
        (stat.S_IFCHR | 0o666, "character device"),
        (stat.S_IFBLK | 0o660, "block device"),
        (None, "entry of unknown type"),
    ],
)
def test_kind_of_names_what_is_kept_and_what_is_not(mode: int | None, kind: str) -> None:
    assert kind_of(mode) == kind


def test_host_mode_removes_special_and_world_writable_bits() -> None:
    assert host_mode(stat.S_IFREG | 0o4755, directory=False) == (0o755, ["setuid bit"])
    assert host_mode(0o2750, directory=False) == (0o750, ["setgid bit"])
    assert host_mode(0o6777, directory=False) == (
        0o775,
        ["setuid bit", "setgid bit", "world-writable bit"],
    )
    assert host_mode(stat.S_IFDIR | 0o1777, directory=True) == (
        0o775,
        ["sticky bit", "world-writable bit"],
    )
    # A directory always stays usable by its owner; nothing to report for that.
    assert host_mode(0o000, directory=True) == (0o700, [])
    assert host_mode(0o640, directory=False) == (0o640, [])


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "/etc", "../x", "a\0b", b"..", b"x/y"])
def test_names_that_are_not_one_plain_name_are_refused(name: str | bytes) -> None:
    with pytest.raises(BackendError, match="refusing unsafe file name"):
        check_name(name, "box:/dir")


def test_plain_names_pass() -> None:
    for name in ["a", ".hidden", "..x", "x..", "with space", b"\xff\xfe", "é"]:
        check_name(name, "box:/dir")


def test_names_are_shown_without_terminal_control() -> None:
    assert shown("esc\x1b[31mred") == "esc\\x1b[31mred"
    assert shown(b"bad\xffbyte") == "bad\\xffbyte"
    assert shown("new\nline") == "new\\nline"
    assert shown("back\\slash") == "back\\\\slash"
    assert shown("plain é") == "plain é"


def test_report_lists_each_entry_then_summarizes() -> None:
    r = PullReport()
    r.drop("/s/link", "symbolic link -> /etc/passwd")
    r.strip("/s/suid", ["setuid bit"])
    r.strip("/s/plain", [])
    assert r.warnings() == [
        "not copied: /s/link (symbolic link -> /etc/passwd)",
        "/s/suid: copied without its setuid bit",
    ]
    for i in range(30):
        r.drop(f"/s/f{i}", "FIFO")
    lines = r.warnings(limit=5)
    assert len(lines) == 6 and lines[-1] == "... and 27 more not copied or changed"


def test_destination_through_a_link_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(UsageError, match="goes through a symbolic link"):
        check_destination(tmp_path / "link" / "out")
    with pytest.raises(UsageError, match="goes through a symbolic link"):
        check_destination(tmp_path / "link")
    assert check_destination(real / "out") == real / "out"


def test_links_above_a_trusted_folder_are_the_users_own(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "home").symlink_to(tmp_path / "data")
    home = tmp_path / "home"
    # A home reached through a link is the user's set-up: below it, links are still refused.
    assert check_destination(home / "out", trusted=[home]) == home / "out"
    (tmp_path / "data" / "planted").symlink_to("/etc")
    with pytest.raises(UsageError):
        check_destination(home / "planted" / "x", trusted=[home])
    with pytest.raises(UsageError):
        check_destination(home / "out", trusted=[tmp_path / "elsewhere"])


def test_new_file_never_opens_an_existing_entry_or_a_link(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "link").symlink_to(victim)
    with pytest.raises(FileExistsError):
        new_file(tmp_path / "link")
    with pytest.raises(FileExistsError):
        new_file(victim)
    os.close(new_file(tmp_path / "fresh"))
    assert stat.S_IMODE((tmp_path / "fresh").stat().st_mode) == 0o600
    assert victim.read_text() == "precious"


def test_sanitize_tree_leaves_data_only(tmp_path: Path) -> None:
    root = tmp_path / "state"
    (root / "d").mkdir(parents=True)
    (root / "ok").write_text("ok")
    (root / "suid").write_text("x")
    (root / "suid").chmod(0o4755)
    (root / "link").symlink_to("/etc/passwd")
    (root / "d" / "dirlink").symlink_to(tmp_path)
    os.mkfifo(root / "fifo")
    (root / "d").chmod(0o777)
    warnings = sanitize_tree(root).warnings()
    assert sorted(p.name for p in root.rglob("*")) == ["d", "ok", "suid"]
    assert stat.S_IMODE((root / "suid").stat().st_mode) == 0o755
    assert stat.S_IMODE((root / "d").stat().st_mode) == 0o775
    assert "not copied: link (symbolic link)" in warnings
    assert "not copied: fifo (FIFO)" in warnings
    assert "not copied: d/dirlink (symbolic link)" in warnings
    assert "suid: copied without its setuid bit" in warnings


# -- the tree walk over a fake container ----------------------------------------------------


class FakeSource(_Source):
    """A container's tree: path -> (full mode, content or link target or None)."""

    def __init__(self, tree: dict[str, tuple[int, bytes | None]], names: dict[str, list[bytes]]):
        self.tree = tree
        self.names = names

    def lstat(self, path: str) -> Attrs:
        mode, data = self.tree[path]
        return Attrs(mode, len(data or b""), 0, 0)

    def listdir(self, path: str) -> list[tuple[bytes, Attrs]]:
        out = []
        for n in self.names[path]:
            child = f"{path}/{os.fsdecode(n)}"
            out.append((n, self.lstat(child) if child in self.tree else Attrs(None, 0, 0, 0)))
        return out

    def readlink(self, path: str) -> bytes:
        return self.tree[path][1] or b""

    def copy_file(self, path: str, fd: int) -> int | None:
        mode, data = self.tree[path]
        os.write(fd, data or b"")
        return mode


def _api(monkeypatch: pytest.MonkeyPatch, src: FakeSource) -> FilesAPI:
    api = FilesAPI(client=None)  # type: ignore[arg-type]
    monkeypatch.setattr(api, "_source", lambda instance: src)
    return api


REG, DIR = stat.S_IFREG, stat.S_IFDIR


def test_pull_tree_keeps_files_and_directories_only(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    src = FakeSource(
        {
            "/t": (DIR | 0o755, None),
            "/t/plain": (REG | 0o640, b"data"),
            "/t/suid": (REG | 0o4755, b"#!"),
            "/t/link": (stat.S_IFLNK | 0o777, b"/etc/passwd"),
            "/t/fifo": (stat.S_IFIFO | 0o644, None),
            "/t/dev": (stat.S_IFCHR | 0o666, None),
            "/t/sock": (stat.S_IFSOCK | 0o755, None),
            "/t/sub": (DIR | 0o1777, None),
            "/t/sub/deep": (REG | 0o600, b"deep"),
        },
        {"/t": [b"plain", b"suid", b"link", b"fifo", b"dev", b"sock", b"sub"], "/t/sub": [b"deep"]},
    )
    dst = tmp_path / "dst"
    report = _api(monkeypatch, src).pull_tree("box", "/t", dst)
    found = {str(p.relative_to(dst)): p.lstat().st_mode for p in dst.rglob("*")}
    assert found == {
        "plain": REG | 0o640,
        "suid": REG | 0o755,
        "sub": DIR | 0o775,
        "sub/deep": REG | 0o600,
    }
    assert (dst / "sub" / "deep").read_bytes() == b"deep"
    assert report.entries == 4
    assert report.warnings() == [
        "not copied: /t/dev (character device)",
        "not copied: /t/fifo (FIFO)",
        "not copied: /t/link (symbolic link -> /etc/passwd)",
        "not copied: /t/sock (socket)",
        "/t/sub: copied without its sticky bit and world-writable bit",
        "/t/suid: copied without its setuid bit",
    ]


@pytest.mark.parametrize("bad", [b"..", b"../../etc", b"/abs", b"a/b"])
def test_pull_tree_refuses_a_name_that_leaves_the_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, bad: bytes
) -> None:
    src = FakeSource({"/t": (DIR | 0o755, None)}, {"/t": [bad]})
    with pytest.raises(BackendError, match="refusing unsafe file name"):
        _api(monkeypatch, src).pull_tree("box", "/t", tmp_path / "dst")
    assert not (tmp_path / "etc").exists()


def test_pull_tree_never_writes_into_a_linked_destination(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (tmp_path / "dst").symlink_to(victim)
    src = FakeSource({"/t": (DIR | 0o755, None), "/t/f": (REG | 0o644, b"x")}, {"/t": [b"f"]})
    with pytest.raises(UsageError, match="symbolic link"):
        _api(monkeypatch, src).pull_tree("box", "/t", tmp_path / "dst")
    assert list(victim.iterdir()) == []


def test_pull_file_replaces_a_link_at_the_destination_never_writes_through(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    dst = tmp_path / "dst"
    dst.symlink_to(victim)
    src = FakeSource({"/f": (REG | 0o6755, b"new")}, {})
    api = _api(monkeypatch, src)
    with pytest.raises(UsageError, match="symbolic link"):
        api.pull_file("box", "/f", dst)
    dst.unlink()
    report = api.pull_file("box", "/f", dst)
    assert dst.read_bytes() == b"new" and stat.S_IMODE(dst.stat().st_mode) == 0o755
    assert report.warnings() == ["/f: copied without its setuid bit and setgid bit"]
    assert victim.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "victim"]  # no temporary left


@pytest.mark.parametrize("mode", [stat.S_IFLNK | 0o777, stat.S_IFIFO | 0o644])
def test_pull_file_of_a_non_file_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, mode: int
) -> None:
    src = FakeSource({"/x": (mode, b"/etc/passwd")}, {})
    with pytest.raises(UsageError, match="only files and directories"):
        _api(monkeypatch, src).pull_file("box", "/x", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


# -- the SFTP reader against a fake server ----------------------------------------------------


def _serve(sock: socket.socket, content: bytes, cap: int) -> None:
    """Answer INIT and READs; each read gets at most `cap` bytes (a server's own limit)."""
    buf = b""

    def packet() -> tuple[int, bytes] | None:
        nonlocal buf
        while len(buf) < 4 or len(buf) < 4 + struct.unpack(">I", buf[:4])[0]:
            chunk = sock.recv(65536)
            if not chunk:
                return None
            buf += chunk
        n = struct.unpack(">I", buf[:4])[0]
        ptype, body = buf[4], buf[5 : 4 + n]
        buf = buf[4 + n :]
        return ptype, body

    def send(ptype: int, payload: bytes) -> None:
        sock.sendall(struct.pack(">IB", len(payload) + 1, ptype) + payload)

    while (p := packet()) is not None:  # None: the client closed its side
        ptype, body = p
        if ptype == 1:
            send(2, struct.pack(">I", 3))
            continue
        (req,) = struct.unpack(">I", body[:4])
        hlen = struct.unpack(">I", body[4:8])[0]
        off, n = struct.unpack(">QI", body[8 + hlen : 8 + hlen + 12])
        data = content[off : off + min(n, cap)]
        if data:
            send(103, struct.pack(">II", req, len(data)) + data)
        else:
            send(101, struct.pack(">II", req, 1) + struct.pack(">I", 0) * 2)


def _read_through_fake_server(
    tmp_path: Path, content: bytes, cap: int, size: int
) -> tuple[int, bytes]:
    """`read_into` against `_serve`; the server thread ends when the client side closes."""
    a, b = socket.socketpair()
    server = threading.Thread(target=_serve, args=(b, content, cap))
    server.start()
    out = tmp_path / "out"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        s = SFTPSession(a, b"", "box")
        n = s.read_into(b"h", "/f", fd, size)
    finally:
        os.close(fd)
        a.close()
        server.join(timeout=10)
        b.close()
    return n, out.read_bytes()


@pytest.mark.parametrize("cap", [32 * 1024, 10_000, 1])
def test_sftp_reads_are_complete_and_in_order_even_when_answers_are_short(
    tmp_path: Path, cap: int
) -> None:
    content = os.urandom(200_000 if cap > 1 else 3000)
    # Asked for more than the file holds (it shrank since fstat): stops at the end.
    assert _read_through_fake_server(tmp_path, content, cap, len(content) + 5000) == (
        len(content),
        content,
    )


def test_sftp_copies_a_growing_file_as_it_was_when_opened(tmp_path: Path) -> None:
    content = os.urandom(100_000)
    n, data = _read_through_fake_server(tmp_path, content, 32 * 1024, 40_000)
    assert n == 40_000 and data == content[:40_000]


def test_a_pull_killed_half_way_leaves_parts_the_next_pull_removes(tmp_path: Path) -> None:
    import subprocess

    from coi.backend.intake import drop_stale_parts, part_prefix

    dest = tmp_path / "out[1]"
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no longer runs
    stale_dir = tmp_path / f".out[1].pull-{dead.pid}-abc"
    stale_dir.mkdir()
    (stale_dir / "x").write_text("half")
    stale_file = tmp_path / f".out[1].part-{dead.pid}-xyz"
    stale_file.write_text("half")
    live = tmp_path / (part_prefix(dest, "pull") + "mine")  # this process's: in use
    live.mkdir()
    other = tmp_path / ".other.pull-1-abc"  # another destination's
    other.mkdir()
    assert sorted(p.name for p in drop_stale_parts(dest)) == sorted(
        [stale_dir.name, stale_file.name]
    )
    assert not stale_dir.exists() and not stale_file.exists()
    assert live.exists() and other.exists()
