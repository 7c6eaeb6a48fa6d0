"""The unpacking of a remote review's archive (coi.review.untar): hand-made tar files play the
agent, who writes that archive; nothing may land outside the fresh folder."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from coi.review.untar import TooBig, extract, safe_parts


def _tar(path: Path, entries: list[tarfile.TarInfo | tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for e in entries:
            if isinstance(e, tuple):
                ti, data = e
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))
            else:
                tar.addfile(e)
    return path


def _info(
    name: str, kind: bytes = tarfile.REGTYPE, mode: int = 0o644, link: str = ""
) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = mode
    ti.linkname = link
    ti.mtime = 1_700_000_000
    return ti


def _everything(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def place(tmp_path: Path) -> tuple[Path, Path]:
    """(the fresh folder, a folder beside it that nothing may reach)."""
    dest = tmp_path / "box" / "fresh"
    dest.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    return dest, outside


def test_names_outside_the_folder_are_never_written(
    tmp_path: Path, place: tuple[Path, Path]
) -> None:
    dest, outside = place
    arc = _tar(
        tmp_path / "a.tar",
        [
            (_info("../outside/x"), b"escaped"),
            (_info("./../../x"), b"escaped"),
            (_info(str(outside / "abs")), b"escaped"),
            (_info("ok.txt"), b"fine\n"),
        ],
    )
    got = extract(arc, dest, max_total=None)
    assert _everything(dest) == {"ok.txt"}
    assert _everything(outside) == set()
    assert not (tmp_path / "box" / "x").exists() and not (tmp_path / "x").exists()
    assert got.skipped == {"absolute or '..' names": 3}
    assert (got.files, got.size) == (1, 5)


def test_a_file_through_a_planted_link_is_left_out(
    tmp_path: Path, place: tuple[Path, Path]
) -> None:
    dest, outside = place
    arc = _tar(
        tmp_path / "a.tar",
        [
            _info("ssh", tarfile.SYMTYPE, link=str(outside)),
            (_info("ssh/authorized_keys"), b"ssh-ed25519 AAAA attacker\n"),
            _info("d", tarfile.SYMTYPE, link="../../outside"),
            _info("d/sub", tarfile.DIRTYPE, mode=0o755),
            (_info("d/sub/f"), b"x"),
            # A file, then something inside it.
            (_info("plain"), b"p"),
            (_info("plain/inner"), b"i"),
        ],
    )
    got = extract(arc, dest, max_total=None)
    assert _everything(outside) == set()
    # The links stay links, never followed (coi diff reads them as data).
    assert os.readlink(dest / "ssh") == str(outside)
    assert os.readlink(dest / "d") == "../../outside"
    assert (dest / "plain").read_bytes() == b"p"
    assert got.skipped == {"under a link or a file": 4}
    assert got.links == 2


def test_hard_links_only_copy_files_of_the_archive(
    tmp_path: Path, place: tuple[Path, Path]
) -> None:
    dest, _ = place
    arc = _tar(
        tmp_path / "a.tar",
        [
            _info("passwd", tarfile.LNKTYPE, link="/etc/passwd"),
            _info("passwd2", tarfile.LNKTYPE, link="etc/passwd"),
            _info("early", tarfile.LNKTYPE, link="later"),
            (_info("later"), b"data"),
            _info("twin", tarfile.LNKTYPE, link="later"),
        ],
    )
    got = extract(arc, dest, max_total=None)
    assert _everything(dest) == {"later", "twin"}
    assert (dest / "twin").read_bytes() == b"data"
    assert os.stat(dest / "twin").st_ino != os.stat(dest / "later").st_ino
    assert got.skipped == {"hard links to nothing earlier in the archive": 3}
    assert Path("/etc/passwd").stat().st_nlink == 1


def test_special_files_are_skipped_and_counted(tmp_path: Path, place: tuple[Path, Path]) -> None:
    dest, _ = place
    dev = _info("null", tarfile.CHRTYPE, mode=0o666)
    dev.devmajor, dev.devminor = 1, 3
    disk = _info("sda", tarfile.BLKTYPE, mode=0o660)
    disk.devmajor, disk.devminor = 8, 0
    arc = _tar(tmp_path / "a.tar", [dev, disk, _info("fifo", tarfile.FIFOTYPE)])
    got = extract(arc, dest, max_total=None)
    assert _everything(dest) == set()
    assert got.skipped == {"FIFOs, sockets or devices": 3}
    assert got.skipped_text() == "3 FIFOs, sockets or devices"


def test_modes_lose_setuid_sticky_and_others_write(
    tmp_path: Path, place: tuple[Path, Path]
) -> None:
    dest, _ = place
    base = tmp_path / "base"
    base.mkdir()
    (base / "shared").write_text("s")
    os.chmod(base / "shared", 0o664)
    arc = _tar(
        tmp_path / "a.tar",
        [
            (_info("suid", mode=0o4777), b"#!/bin/sh\n"),
            (_info("sgid", mode=0o2755), b"x"),
            (_info("shared", mode=0o666), b"s"),
            _info("locked", tarfile.DIRTYPE, mode=0o1000),
            (_info("locked/inside", mode=0o600), b"in"),
        ],
    )
    extract(arc, dest, max_total=None, base=base)
    mode = {
        p: stat.S_IMODE(os.lstat(dest / p).st_mode) for p in ("suid", "sgid", "shared", "locked")
    }
    # The group's write is kept where base/ had it (as the user's own file had it).
    assert mode == {"suid": 0o755, "sgid": 0o755, "shared": 0o664, "locked": 0o700}
    assert (dest / "locked" / "inside").read_bytes() == b"in"
    assert int(os.stat(dest / "suid").st_mtime) == 1_700_000_000


def test_a_second_entry_for_a_name_is_left_out(tmp_path: Path, place: tuple[Path, Path]) -> None:
    dest, outside = place
    arc = _tar(
        tmp_path / "a.tar",
        [
            (_info("f"), b"first"),
            _info("f", tarfile.SYMTYPE, link=str(outside / "x")),
            (_info("f"), b"second"),
            # A folder made implicitly, then its own entry: not a second entry.
            (_info("d/x"), b"x"),
            _info("d", tarfile.DIRTYPE, mode=0o750),
        ],
    )
    got = extract(arc, dest, max_total=None)
    assert (dest / "f").read_bytes() == b"first"
    assert stat.S_IMODE(os.stat(dest / "d").st_mode) == 0o750
    assert got.skipped == {"second entries for one name": 2}


def test_the_size_cap_stops_the_extraction(tmp_path: Path, place: tuple[Path, Path]) -> None:
    dest, _ = place
    arc = _tar(tmp_path / "a.tar", [(_info("a"), b"x" * 600), (_info("b"), b"y" * 600)])
    with pytest.raises(TooBig, match="more than 1 KB of files"):
        extract(arc, dest, max_total=1000)
    assert extract(arc, tmp_path / "outside", max_total=1200).size == 1200


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_everything_is_owned_by_the_owner_given(tmp_path: Path, place: tuple[Path, Path]) -> None:
    dest, _ = place
    ti = _info("f")
    ti.uid = ti.gid = 0
    arc = _tar(
        tmp_path / "a.tar",
        [(ti, b"x"), _info("l", tarfile.SYMTYPE, link="/root"), (_info("implicit/g"), b"g")],
    )
    extract(arc, dest, max_total=None, owner=(4321, 4322))
    for p in ("f", "l", "implicit", "implicit/g"):
        st = os.lstat(dest / p)
        assert (st.st_uid, st.st_gid) == (4321, 4322), p
    assert os.stat("/root").st_uid == 0


def test_not_a_tar_file(tmp_path: Path, place: tuple[Path, Path]) -> None:
    dest, _ = place
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"\x01" * 2000)
    from coi.errors import CoiError

    with pytest.raises(CoiError, match="not a readable tar"):
        extract(junk, dest, max_total=None)


def test_safe_parts() -> None:
    assert safe_parts("./a//b/./c") == ("a", "b", "c")
    assert safe_parts(".") == ()
    assert safe_parts("/etc/passwd") is None
    assert safe_parts("a/../b") is None
    assert safe_parts("..") is None
