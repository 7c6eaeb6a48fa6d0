"""Which workspace owners the daemon may map into a sandbox (/etc/subuid, /etc/subgid)."""

from __future__ import annotations

from pathlib import Path

from coi.sessions.workspace import owner_mapping_problem


def _files(tmp_path: Path, uid_lines: str, gid_lines: str) -> tuple[Path, Path]:
    uids, gids = tmp_path / "subuid", tmp_path / "subgid"
    uids.write_text(uid_lines)
    gids.write_text(gid_lines)
    return uids, gids


def test_an_owner_root_may_delegate_is_fine_by_a_single_entry_or_a_range(tmp_path: Path) -> None:
    files = _files(tmp_path, "root:1000000:1000000000\nroot:1500:1\n", "root:1500:1\n")
    assert owner_mapping_problem(1500, 1500, subid_files=files) is None
    assert owner_mapping_problem(1000004242, 1500, subid_files=files) is None


def test_an_owner_nobody_delegated_is_named_with_the_file(tmp_path: Path) -> None:
    files = _files(
        tmp_path, "coitest:4242:1\nroot:1500:1\nroot:x:y\nroot:4200:42\n", "root:4343:1\n"
    )
    problem = owner_mapping_problem(4242, 4343, subid_files=files)
    assert problem == f"its uid 4242 is not delegated to root in {files[0]}"
    files = _files(tmp_path, "root:4242:1\n", "root:1:1\n")
    assert owner_mapping_problem(4242, 4343, subid_files=files) == (
        f"its gid 4343 is not delegated to root in {files[1]}"
    )


def test_unreadable_files_say_nothing(tmp_path: Path) -> None:
    missing = (tmp_path / "no-subuid", tmp_path / "no-subgid")
    assert owner_mapping_problem(4242, 4343, subid_files=missing) is None
