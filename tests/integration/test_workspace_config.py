"""Workspace config is untrusted, and the agent cannot write it: on the real daemon.

coi runs as the unprivileged test user from inside the workspace (the config files are read
from the working directory); the agent's writes run inside, as uid 1000 or as root.
"""

from __future__ import annotations

import os
import pwd
import secrets
from pathlib import Path

import pytest
from tests.conftest import run_coi
from tests.integration.conftest import USER, coi_names, remove_containers, user_dir, wait_for

from coi.backend import IncusClient
from coi.backend.exec import ExecRequest


def _coi(uenv: dict[str, str], ws: Path, *args: str) -> tuple[int, str, str]:
    r = run_coi(*args, env=uenv, cwd=ws, user=USER, timeout=180)
    return r.returncode, r.stdout, r.stderr


def _run(uenv: dict[str, str], ws: Path, script: str) -> tuple[int, str, str]:
    return _coi(uenv, ws, "run", "--image", "coi-tiny", "-w", str(ws), "--", "sh", "-c", script)


def _own(path: Path, user: pwd.struct_passwd) -> None:
    for root, dirs, files in os.walk(path):
        for n in [root, *(os.path.join(root, x) for x in dirs + files)]:
            os.lchown(n, user.pw_uid, user.pw_gid)


@pytest.fixture
def ws(base: Path, user: pwd.struct_passwd) -> Path:
    return user_dir(base / "ws", user)


def _write(path: Path, text: str, user: pwd.struct_passwd) -> None:
    path.write_text(text)
    os.chown(path, user.pw_uid, user.pw_gid)


def test_agent_written_open_network_is_dropped(
    uenv: dict[str, str], ws: Path, user: pwd.struct_passwd
) -> None:
    _write(ws / ".coi.toml", '[network]\nmode = "open"\n', user)
    code, _, err = _run(uenv, ws, "true")
    assert code == 0, err
    assert f"Warning: {ws / '.coi.toml'} is not trusted; these settings from it are dropped" in err
    assert '  network.mode = "open"' in err
    assert "Network mode: restricted" in err and "Network mode: open" not in err


def test_untrusted_mount_is_not_made_until_trusted_and_not_after_a_change(
    uenv: dict[str, str], ws: Path, base: Path, user: pwd.struct_passwd
) -> None:
    secret = f"host-secret-{secrets.token_hex(4)}"
    hostdir = user_dir(base / "hostdir", user)
    _write(hostdir / "secret.txt", secret + "\n", user)
    text = f'[[mounts.default]]\nhost = "{hostdir}"\ncontainer = "/mnt/hostdir"\n'
    _write(ws / ".coi.toml", text, user)
    look = "cat /mnt/hostdir/secret.txt 2>/dev/null || echo not-mounted"

    code, out, err = _run(uenv, ws, look)
    assert code == 0, err
    assert secret not in out and "not-mounted" in out
    assert "mounts.default" in err and "is not trusted" in err

    code, out, err = _coi(uenv, ws, "trust")
    assert code == 0, err
    assert f"Trusted {os.path.realpath(ws)}/.coi.toml" in out and "mounts.default" in out

    code, out, err = _run(uenv, ws, look)
    assert code == 0, err
    assert secret in out
    assert "not trusted" not in err and "dropped" not in err

    with (ws / ".coi.toml").open("a") as f:  # one more byte
        f.write("\n")
    code, out, err = _run(uenv, ws, look)
    assert code == 0, err
    assert secret not in out and "not-mounted" in out
    assert f"{ws / '.coi.toml'} changed since you trusted it" in err
    assert f"coi trust {ws / '.coi.toml'}" in err


@pytest.fixture
def repo(ws: Path, user: pwd.struct_passwd) -> Path:
    """A repository with coi config of its own and a worktree config."""
    (ws / ".git" / "hooks").mkdir(parents=True)
    (ws / ".git" / "objects").mkdir()
    (ws / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (ws / ".git" / "config").write_text("[core]\n\trepositoryformatversion = 0\n")
    (ws / ".git" / "config.worktree").write_text("[core]\n")
    (ws / ".coi").mkdir()
    (ws / ".coi" / "config.toml").write_text("")
    (ws / ".coi.toml").write_text('[limits.memory]\nlimit = "1GiB"\n')
    _own(ws, user)
    return ws


ORIGINAL = {
    ".coi.toml": '[limits.memory]\nlimit = "1GiB"\n',
    ".coi/config.toml": "",
    ".git/config.worktree": "[core]\n",
}


def test_agent_user_cannot_write_coi_config_or_git_extras(uenv: dict[str, str], repo: Path) -> None:
    attack = (
        "echo '[network]' >> .coi.toml; echo coitoml=$?; "
        "rm -f .coi.toml; echo rmcoitoml=$?; "
        "echo 'mode = 1' > .coi/config.toml; echo coiconfig=$?; "
        "echo x > .coi/other.toml; echo coinew=$?; "
        "mv .coi .coi-old; echo mvcoi=$?; "
        "echo '[core] hooksPath = /tmp' >> .git/config.worktree; echo worktree=$?; "
        "echo '* filter=evil' > .git/info/attributes; echo attributes=$?; "
        "id -u"
    )
    code, out, err = _run(uenv, repo, attack)
    assert code == 0, err
    for step in ("coitoml", "rmcoitoml", "coiconfig", "coinew", "mvcoi", "worktree", "attributes"):
        assert f"{step}=0" not in out, f"{step} succeeded:\n{out}\n{err}"
    assert out.strip().endswith("1000")
    for rel, text in ORIGINAL.items():
        assert (repo / rel).read_text() == text, rel
    assert not (repo / ".git" / "info" / "attributes").exists()
    assert sorted(os.listdir(repo / ".coi")) == ["config.toml"]
    assert "PROTECTED PATHS CHANGED" not in err


def test_root_inside_writes_are_undone(
    client: IncusClient, uenv: dict[str, str], repo: Path
) -> None:
    code, _, err = _coi(
        uenv, repo, "shell", "--background", "--debug", "--image", "coi-tiny", "-w", str(repo)
    )
    assert code == 0, err
    (name,) = coi_names(client, repo)
    try:
        res = client.exec.capture(
            name,
            ExecRequest(
                [
                    "sh",
                    "-c",
                    "set -e; cd /workspace; "
                    "umount .git/info .git/config.worktree .git/hooks .git/config; umount .git; "
                    "umount .coi.toml; umount .coi; "
                    "printf '[network]\\nmode = \"open\"\\n' > .coi.toml; "
                    "echo '[tool]' > .coi/config.toml; "
                    "echo '[core]' >> .git/config.worktree; "
                    "echo '* filter=evil' > .git/info/attributes; echo done",
                ]
            ),
        )
        assert res.exit_code == 0 and b"done" in res.stdout, res.stderr
        assert "open" in (repo / ".coi.toml").read_text()  # it reached the host
        code, out, err = _coi(uenv, repo, "shutdown", name)
        assert code == 0, err
    finally:
        remove_containers(client, repo)
    said = out + err
    assert f"PROTECTED PATHS CHANGED in {name}" in said
    assert ".coi.toml (content changed)" in said
    assert ".coi/config.toml (content changed)" in said
    assert ".git/config.worktree (content changed)" in said
    assert ".git/info/attributes (created)" in said
    for rel, text in ORIGINAL.items():
        assert (repo / rel).read_text() == text, rel
    assert not (repo / ".git" / "info" / "attributes").exists()


def test_coi_toml_the_agent_creates_is_removed_and_never_trusted(
    uenv: dict[str, str], ws: Path, user: pwd.struct_passwd
) -> None:
    """Absent at the start, it cannot be mounted: the agent user can create it. The check at
    the end of the session removes it; and until then, it could only tighten the sandbox."""
    code, out, err = _run(uenv, ws, "printf '[network]\\nmode = \"open\"\\n' > .coi.toml; echo $?")
    assert code == 0, err
    assert out.strip() == "0"
    wait_for(lambda: not (ws / ".coi.toml").exists(), "the created .coi.toml to be removed")
    # Had it stayed, the next session would still have dropped it:
    _write(ws / ".coi.toml", '[network]\nmode = "open"\n', user)
    code, _, err = _run(uenv, ws, "true")
    assert code == 0, err
    assert "Network mode: restricted" in err and '  network.mode = "open"' in err
