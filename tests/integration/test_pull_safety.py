"""What comes out of a container is data, on the real daemon: `coi file pull` and the session
save leave out links, FIFOs and device nodes, remove setuid/setgid/sticky/world-writable
bits, say so, and never write through a link on the host."""

from __future__ import annotations

import os
import pwd
import re
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest
from tests.conftest import coi_argv, run_coi
from tests.integration.conftest import USER, coi_names, remove_containers, user_dir, wait_gone

from coi.backend import IncusClient
from coi.backend import files as files_mod
from coi.backend.exec import ExecRequest
from coi.backend.sftp import SFTPUnavailable

# Built as root inside: every kind of entry the agent could leave for a copy out. A device
# node cannot be made in an unprivileged container (mknod is refused), but root in it can
# bind-mount one over a file, which the daemon then sees as a character device.
TREE = r"""
set -e
mkdir -p /srv/t/sub /srv/t/open
cd /srv/t
echo data > plain; chmod 640 plain
echo deep > sub/deep
ln -s /etc/passwd link
ln -s plain rel
mkfifo fifo
echo s > suid; chmod 4755 suid
echo g > sgid; chmod 2750 sgid
chmod 1777 open
mknod dev c 1 3 2>/dev/null || true
touch bound; mount --bind /dev/null bound
printf x > "$(printf 'esc\033[31mred')"
printf y > "$(printf 'bad\377name')"
"""


@pytest.fixture
def box(client: IncusClient, coi_env: dict[str, str], unique: str) -> Iterator[str]:
    """A running tiny container holding the attacker's tree at /srv/t."""
    res = run_coi("container", "launch", "coi-tiny", unique, env=coi_env)
    assert res.returncode == 0, res.stderr
    try:
        res = client.exec.capture(unique, ExecRequest(["sh", "-c", TREE]))
        assert res.exit_code == 0, res.stderr
        yield unique
    finally:
        client.instances.delete(unique, force=True)


def _kinds(root: Path) -> dict[str, int]:
    """Every entry under root (not following links): relative path -> full st_mode."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in [*dirnames, *filenames]:
            p = Path(dirpath) / n
            out[str(p.relative_to(root))] = p.lstat().st_mode
    return out


def test_recursive_pull_brings_out_data_only(
    coi_env: dict[str, str], box: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    res = run_coi("file", "pull", "-r", f"{box}:/srv/t", str(out), env=coi_env, timeout=60)
    assert res.returncode == 0, res.stderr
    found = _kinds(out)
    assert sorted(found) == [
        "bad\udcffname", "esc\x1b[31mred", "open", "plain", "sgid", "sub", "sub/deep", "suid",
    ]  # fmt: skip
    assert (out / os.fsdecode(b"bad\xffname")).read_bytes() == b"y"
    for mode in found.values():
        assert stat.S_ISREG(mode) or stat.S_ISDIR(mode)
        assert not mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX | stat.S_IWOTH)
    assert stat.S_IMODE(found["suid"]) == 0o755 and stat.S_IMODE(found["sgid"]) == 0o750
    assert stat.S_IMODE(found["plain"]) == 0o640 and stat.S_IMODE(found["open"]) == 0o775
    assert (out / "plain").read_text() == "data\n" and (
        out / "sub" / "deep"
    ).read_text() == "deep\n"
    for line in [
        "Warning: not copied: /srv/t/bound (character device)",
        "Warning: not copied: /srv/t/fifo (FIFO)",
        "Warning: not copied: /srv/t/link (symbolic link -> /etc/passwd)",
        "Warning: not copied: /srv/t/rel (symbolic link -> plain)",
        "Warning: /srv/t/open: copied without its sticky bit and world-writable bit",
        "Warning: /srv/t/sgid: copied without its setgid bit",
        "Warning: /srv/t/suid: copied without its setuid bit",
    ]:
        assert line in res.stderr
    # A name from the container never reaches the terminal with its control characters.
    assert "\x1b" not in res.stderr
    assert f"Pulled directory {box}:/srv/t -> {out}" in res.stderr


def test_single_pulls_of_links_fifos_and_devices_are_refused_at_once(
    coi_env: dict[str, str], box: str, tmp_path: Path
) -> None:
    for name, what in [
        ("link", "is a symbolic link"),
        ("fifo", "is a FIFO"),
        ("bound", "is a character device"),
    ]:
        started = time.monotonic()
        res = run_coi("file", "pull", f"{box}:/srv/t/{name}", str(tmp_path / name), env=coi_env)
        assert res.returncode == 2 and what in res.stderr, res.stderr
        assert time.monotonic() - started < 30  # a FIFO is not opened, so nothing waits
        assert not (tmp_path / name).exists() and not (tmp_path / name).is_symlink()
    res = run_coi("file", "pull", f"{box}:/srv/t/link", str(tmp_path / "x"), env=coi_env)
    assert "/etc/passwd" in res.stderr
    res = run_coi("file", "pull", f"{box}:/srv/t/suid", str(tmp_path / "suid"), env=coi_env)
    assert res.returncode == 0, res.stderr
    assert stat.S_IMODE((tmp_path / "suid").stat().st_mode) == 0o755
    assert "Warning: /srv/t/suid: copied without its setuid bit" in res.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["suid"]  # no temporary file left


def test_a_link_at_the_host_destination_is_never_written_through(
    coi_env: dict[str, str], box: str, tmp_path: Path
) -> None:
    victim_dir = tmp_path / "victim-dir"
    victim_dir.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (tmp_path / "to-dir").symlink_to(victim_dir)
    (tmp_path / "to-file").symlink_to(victim)

    def pull(*args: str) -> tuple[int, str]:
        r = run_coi("file", "pull", *args, env=coi_env)
        return r.returncode, r.stderr

    code, err = pull("-r", f"{box}:/srv/t", str(tmp_path / "to-dir"))
    assert code == 2 and "symbolic link" in err
    code, err = pull("-r", f"{box}:/srv/t", str(tmp_path / "to-dir" / "t"))
    assert code == 2 and "goes through a symbolic link" in err
    code, err = pull(f"{box}:/srv/t/plain", str(tmp_path / "to-file"))
    assert code == 2 and "symbolic link" in err
    code, err = pull(f"{box}:/srv/t/plain", str(tmp_path / "to-dir"))
    assert code == 2 and "symbolic link" in err
    assert list(victim_dir.iterdir()) == [] and victim.read_text() == "precious\n"
    assert (tmp_path / "to-dir").is_symlink() and (tmp_path / "to-file").is_symlink()

    # A pull into a real folder puts the file in it; a pull over a real file replaces it.
    real = tmp_path / "real"
    real.mkdir()
    code, err = pull(f"{box}:/srv/t/plain", str(real))
    assert code == 0 and (real / "plain").read_text() == "data\n", err
    code, err = pull(f"{box}:/srv/t/sub/deep", str(real / "plain"))
    assert code == 0 and (real / "plain").read_text() == "deep\n", err


def test_the_session_save_leaves_out_what_the_agent_planted(
    client: IncusClient, base: Path, uenv: dict[str, str], user: pwd.struct_passwd
) -> None:
    """The agent leaves a link to a host file, a FIFO, a device node, a setuid program and a
    world-writable directory in the state folder coi saves when the session ends: none of
    them arrives on the host as such, and the session end says what was left out."""
    ws = user_dir(base / "ws", user)
    argv = coi_argv(
        "shell", "--tool", "claude", "--debug", "--image", "coi-tiny", "-w", str(ws), user=USER
    )  # fmt: skip
    child = pexpect.spawn(argv[0], argv[1:], env=uenv, encoding="utf-8", timeout=60)
    state = "/home/code/.claude"
    try:
        child.expect("Mode: Interactive")
        (name,) = coi_names(client, ws)
        time.sleep(1)  # let tmux draw its shell (coi has laid out the home by then)
        # What root in the container can do (the agent may be root there): a device node.
        res = client.exec.capture(
            name,
            ExecRequest(["sh", "-c", f"touch {state}/dev && mount --bind /dev/null {state}/dev"]),
        )
        assert res.exit_code == 0, res.stderr
        child.sendline(
            f"cd {state} && ln -s {base}/victim link && mkfifo fifo && echo x > suid && "
            "chmod 4755 suid && mkdir open && chmod 1777 open && echo kept > notes; exit"
        )
        for line in [
            f"not copied: {state}/dev (character device)",
            f"not copied: {state}/fifo (FIFO)",
            f"not copied: {state}/link (symbolic link -> {base}/victim)",
            f"{state}/open: copied without its sticky bit and world-writable bit",
            f"{state}/suid: copied without its setuid bit",
            "Session data saved successfully",
        ]:
            child.expect(re.escape(line))
        child.expect(pexpect.EOF, timeout=60)
    finally:
        child.close()
        remove_containers(client, ws)
    (saved,) = (Path(uenv["COI_HOME"]) / "sessions-claude").iterdir()
    found = _kinds(saved / ".claude")
    assert {"notes", "suid", "open"} <= set(found)
    assert not {"dev", "fifo", "link"} & set(found)
    for mode in found.values():
        assert stat.S_ISREG(mode) or stat.S_ISDIR(mode)
        assert not mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX | stat.S_IWOTH)
    assert (saved / ".claude" / "notes").read_text() == "kept\n"
    wait_gone(client, ws)


def test_without_sftp_the_files_api_fallback_brings_nothing_special_and_never_hangs(
    client: IncusClient, box: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A daemon without the SFTP endpoint: the files API calls a FIFO or device a "file" of
    size 0, so they arrive as empty files, unread (reading the FIFO would never end)."""

    def no_sftp(*args: object) -> None:
        raise SFTPUnavailable("no SFTP in this test")

    monkeypatch.setattr(files_mod.SFTPSession, "open", no_sftp)
    out = tmp_path / "out"
    started = time.monotonic()
    report = client.files.pull_tree(box, "/srv/t", out)
    assert time.monotonic() - started < 30
    found = _kinds(out)
    assert sorted(found) == [
        "bound", "esc\x1b[31mred", "fifo", "open", "plain", "sgid", "sub", "sub/deep", "suid",
    ]  # fmt: skip
    for mode in found.values():
        assert stat.S_ISREG(mode) or stat.S_ISDIR(mode)
        assert not mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX | stat.S_IWOTH)
    assert (out / "fifo").read_bytes() == b"" and (out / "bound").read_bytes() == b""
    assert (out / "plain").read_text() == "data\n"
    # The files API's JSON cannot carry a name that is not UTF-8: that entry is left out.
    assert sorted(report.dropped) == [
        ("/srv/t/bad\ufffdname", "entry of unknown type"),
        ("/srv/t/link", "symbolic link -> /etc/passwd"),
        ("/srv/t/rel", "symbolic link -> /srv/t/plain"),
    ]


def test_without_sftp_and_head_a_fifo_is_left_out_after_a_bounded_wait(
    client: IncusClient, box: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An older daemon without HEAD on the files API: coi's stat is a GET, which opens the
    entry; the FIFO's never answers, and after a bounded wait it is left out as a FIFO."""

    def no_sftp(*args: object) -> None:
        raise SFTPUnavailable("no SFTP in this test")

    monkeypatch.setattr(files_mod.SFTPSession, "open", no_sftp)
    monkeypatch.setattr(files_mod, "_GET_WAIT", 3.0)
    real = client.has_extension
    monkeypatch.setattr(client, "has_extension", lambda n: n != "instance_file_head" and real(n))
    started = time.monotonic()
    report = client.files.pull_tree(box, "/srv/t", tmp_path / "out")
    assert time.monotonic() - started < 30
    assert not (tmp_path / "out" / "fifo").exists()
    assert ("/srv/t/fifo", "FIFO") in report.dropped
    assert (tmp_path / "out" / "plain").read_text() == "data\n"


def test_a_home_reached_through_a_link_is_the_users_own(
    coi_env: dict[str, str], box: str, tmp_path: Path
) -> None:
    """Links above the home folder are the user's set-up: a pull into a real folder in a
    home reached through a link works; a link planted below the home is still refused."""
    (tmp_path / "real-home" / "in").mkdir(parents=True)
    home = tmp_path / "home"
    home.symlink_to(tmp_path / "real-home")
    env = {**coi_env, "HOME": str(home)}
    res = run_coi("file", "pull", f"{box}:/srv/t/plain", str(home / "in"), env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (home / "in" / "plain").read_text() == "data\n"
    (home / "planted").symlink_to(tmp_path / "real-home" / "in")
    res = run_coi("file", "pull", f"{box}:/srv/t/plain", str(home / "planted" / "x"), env=env)
    assert res.returncode == 2 and "goes through a symbolic link" in res.stderr
    assert not (home / "in" / "x").exists()
