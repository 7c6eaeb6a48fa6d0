"""Environment and identity (issue 26, items 7 and 10): forward_env, the timezone, the git
identity, the workspace's mount path, the run script, Docker's settings per daemon; and what
an untrusted workspace file may do with each."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from coi import labels
from coi.config.loader import Config, load_config
from coi.errors import ConfigError, SessionError, UsageError
from coi.sessions import environment as envmod
from coi.sessions.environment import (
    Zone,
    forwarded_env,
    git_config_text,
    git_identity,
    host_zone,
    run_script,
    setup_script,
    workspace_target,
    zone_for,
)
from coi.sessions.sandbox import (
    MKNOD_INTERCEPT,
    SETXATTR_INTERCEPT,
    docker_ready_config,
    mknod_works,
)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    return h


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    w = tmp_path / "ws"
    w.mkdir()
    return w


def load(
    ws: Path, home: Path, user: str = "", workspace: str = "", profile: str | None = None
) -> Config:
    """Defaults < the user's own file (`user`) < the workspace's untrusted ./.coi.toml."""
    own = home / "user.toml"
    own.write_text(user)
    if workspace:
        (ws / ".coi.toml").write_text(workspace)
    env = {"HOME": str(home), "COI_HOME": str(home / ".coi")}
    return load_config(cwd=ws, env=env, files=[own, ws / ".coi.toml"], profile=profile)


# -- forward_env ------------------------------------------------------------------------------


def test_forward_env_is_an_allowlist_with_nothing_by_default(ws: Path, home: Path) -> None:
    host = {"HOME": "/h", "SECRET": "s", "API_KEY": "k", "PATH": "/bin"}
    env, warnings = forwarded_env(load(ws, home), host)
    assert env == {} and warnings == []
    cfg = load(ws, home, '[defaults]\nforward_env = ["API_KEY", "MISSING"]\n')
    env, warnings = forwarded_env(cfg, host)
    assert env == {"API_KEY": "k"}
    assert warnings == ['forward_env variable "MISSING" is not set on host, skipping']
    # coi's older key is joined with upstream's, each name once.
    cfg = load(
        ws,
        home,
        '[defaults]\nforward_env = ["API_KEY"]\n[tool]\nforward_env = ["API_KEY", "SECRET"]\n',
    )
    assert forwarded_env(cfg, host)[0] == {"API_KEY": "k", "SECRET": "s"}
    with pytest.raises(ConfigError, match="not an environment variable name"):
        forwarded_env(load(ws, home, '[defaults]\nforward_env = ["A=B"]\n'), host)


def test_an_untrusted_workspace_file_cannot_add_a_name_to_forward_env(ws: Path, home: Path) -> None:
    """The attack: a cloned repository's .coi.toml names the host's secrets so that they
    come into the sandbox, where the agent (or the repo's code) reads them."""
    host = {"AWS_SECRET_ACCESS_KEY": "aws", "API_KEY": "k"}
    cfg = load(ws, home, workspace='[defaults]\nforward_env = ["AWS_SECRET_ACCESS_KEY"]\n')
    assert forwarded_env(cfg, host)[0] == {}
    assert any("forward_env" in w for w in cfg.warnings)
    cfg = load(ws, home, workspace='[tool]\nforward_env = ["AWS_SECRET_ACCESS_KEY"]\n')
    assert forwarded_env(cfg, host)[0] == {}
    # In a profile of its own, too.
    cfg = load(
        ws, home, workspace='[profiles.p]\nforward_env = ["AWS_SECRET_ACCESS_KEY"]\n', profile="p"
    )
    assert forwarded_env(cfg, host)[0] == {}
    # Taking names out of the user's list tightens: that applies.
    cfg = load(
        ws,
        home,
        user='[defaults]\nforward_env = ["API_KEY", "AWS_SECRET_ACCESS_KEY"]\n',
        workspace='[defaults]\nforward_env = ["API_KEY"]\n',
    )
    assert forwarded_env(cfg, host)[0] == {"API_KEY": "k"}


# -- timezone ---------------------------------------------------------------------------------


@pytest.fixture
def zoneinfo(tmp_path: Path) -> Path:
    z = tmp_path / "zoneinfo"
    (z / "Europe").mkdir(parents=True)
    (z / "Europe" / "Berlin").write_bytes(b"TZif-berlin")
    (z / "UTC").write_bytes(b"TZif-utc")
    return z


def test_host_zone_from_tz_localtime_or_etc_timezone(tmp_path: Path, zoneinfo: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    # $TZ first: a zone name the host has a file for.
    z = host_zone({"TZ": "Europe/Berlin"}, etc=etc, zoneinfo=zoneinfo)
    assert z == Zone("Europe/Berlin", "Europe/Berlin", b"TZif-berlin")
    # A POSIX rule needs no file: the variable alone.
    assert host_zone({"TZ": "<+0545>-5:45"}, etc=etc, zoneinfo=zoneinfo) == Zone("<+0545>-5:45")
    # A file named by $TZ.
    z = host_zone({"TZ": f":{zoneinfo}/Europe/Berlin"}, etc=etc, zoneinfo=zoneinfo)
    assert z == Zone("Europe/Berlin", "Europe/Berlin", b"TZif-berlin")
    # No $TZ: /etc/localtime, a link into zoneinfo.
    (etc / "localtime").symlink_to(zoneinfo / "Europe" / "Berlin")
    assert host_zone({}, etc=etc, zoneinfo=zoneinfo) == Zone(
        "Europe/Berlin", "Europe/Berlin", b"TZif-berlin"
    )
    # A copied /etc/localtime: the name from /etc/timezone, the data from the copy.
    (etc / "localtime").unlink()
    (etc / "localtime").write_bytes(b"TZif-copy")
    (etc / "timezone").write_text("Europe/Berlin\n")
    assert host_zone({}, etc=etc, zoneinfo=zoneinfo) == Zone(
        "Europe/Berlin", "Europe/Berlin", b"TZif-copy"
    )
    # A name that leads out of zoneinfo is not one.
    (etc / "timezone").write_text("../../etc/passwd\n")
    assert host_zone({}, etc=etc, zoneinfo=zoneinfo) == Zone("", "", b"TZif-copy")


def test_zone_modes(ws: Path, home: Path, zoneinfo: Path) -> None:
    cfg = load(ws, home, '[timezone]\nmode = "utc"\n')
    assert zone_for(cfg, {"TZ": "Europe/Berlin"}, zoneinfo=zoneinfo) == Zone(
        "UTC", "UTC", b"TZif-utc"
    )
    cfg = load(ws, home, '[timezone]\nmode = "fixed"\nname = "Europe/Berlin"\n')
    assert zone_for(cfg, {}, zoneinfo=zoneinfo).data == b"TZif-berlin"
    for bad in ("../etc/passwd", "Europe/Berlin;rm", ""):
        cfg = load(ws, home, f'[timezone]\nmode = "fixed"\nname = "{bad}"\n')
        with pytest.raises(ConfigError, match="not a zone name"):
            zone_for(cfg, {}, zoneinfo=zoneinfo)


def test_the_setup_script_is_quoted_and_never_fails_the_start(tmp_path: Path) -> None:
    script = setup_script(
        Zone("Europe/Berlin", "Europe/Berlin", b"\x00TZif'$(x)"), ("O'Brien $(x)", 'e"`x`')
    )
    assert script.startswith("(\n") and script.endswith(") </dev/null >/dev/null 2>&1 || true\n")
    # Valid shell whatever the data holds.
    assert subprocess.run(["sh", "-n", "-c", script], check=False).returncode == 0
    assert setup_script(Zone(), None) == ""
    # Run for real against a scratch root: what lands in the git config is the identity.
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    git_part = envmod.git_script("O'Brien $(x)", 'e"`x`').replace("/etc/", f"{root}/etc/")
    assert subprocess.run(["sh", "-c", git_part], check=False).returncode == 0
    assert subprocess.run(["sh", "-c", git_part], check=False).returncode == 0  # idempotent
    include = (root / "etc" / "gitconfig").read_text()
    assert include.count(f"path = {root}/etc/coi/gitconfig") == 1
    got = subprocess.run(
        ["git", "config", "--file", str(root / "etc/coi/gitconfig"), "--get-regexp", "user"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert got == "user.name O'Brien $(x)\nuser.email e\"`x`\nuser.useconfigonly true\n"


# -- git identity -----------------------------------------------------------------------------


def test_git_identity_from_config_or_the_host(ws: Path, home: Path, tmp_path: Path) -> None:
    hosthome = tmp_path / "hosthome"
    hosthome.mkdir()
    (hosthome / ".gitconfig").write_text("[user]\n\tname = Host Person\n\temail = h@example.org\n")
    environ = {"HOME": str(hosthome), "PATH": os.environ["PATH"]}
    assert git_identity(load(ws, home), environ) == ("Host Person", "h@example.org")
    cfg = load(ws, home, '[git]\nname = "Ada"\n')
    assert git_identity(cfg, environ) == ("Ada", "h@example.org")
    cfg = load(ws, home, "[git]\nseed_host_identity = false\n")
    assert git_identity(cfg, environ) == ("", "")
    cfg = load(ws, home, '[git]\nname = "Ada\\n[core]\\n\\thooksPath = /tmp"\n')
    with pytest.raises(ConfigError, match="control character"):
        git_identity(cfg, environ)


def test_an_untrusted_workspace_file_cannot_choose_the_commit_identity(
    ws: Path, home: Path
) -> None:
    cfg = load(ws, home, workspace='[git]\nname = "Mallory"\nemail = "m@evil.example"\n')
    assert git_identity(cfg, {"HOME": str(home)}) == ("", "")
    # Turning host seeding off tightens: it applies.
    cfg = load(ws, home, workspace="[git]\nseed_host_identity = false\n")
    assert cfg.get_bool("git.seed_host_identity") is False


def test_git_config_always_forbids_a_made_up_identity(tmp_path: Path) -> None:
    text = git_config_text('Ada "the" Lovelace\\', "ada@example.org")
    assert "\tuseConfigOnly = true" in text and text.startswith("# Written by coi")
    assert git_config_text("", "").endswith("[user]\n\tuseConfigOnly = true\n")
    # git itself reads it back as written.
    f = tmp_path / "gitconfig"
    f.write_text(text)
    got = subprocess.run(
        ["git", "config", "--file", str(f), "--get", "user.name"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert got == 'Ada "the" Lovelace\\\n'


# -- workspace mount path ---------------------------------------------------------------------


def test_mount_path_same_and_what_it_refuses(ws: Path, home: Path) -> None:
    assert workspace_target(load(ws, home), Path("/home/alice/proj")) == "/workspace"
    same = load(ws, home, '[workspace]\nmount_path = "same"\n')
    assert workspace_target(same, Path("/home/alice/proj")) == "/home/alice/proj"
    assert workspace_target(same, Path("/srv/app")) == "/srv/app"
    legacy = load(ws, home, "[paths]\npreserve_workspace_path = true\n")
    assert workspace_target(legacy, Path("/opt/p")) == "/opt/p"
    for bad in ("/", "/etc", "/usr/local/src/x", "/home", "/home/code", "/tmp", "/root/p",
                "/var/lib/x", "/proc/1"):  # fmt: skip
        with pytest.raises(UsageError, match="cannot be mounted at the same path"):
            workspace_target(same, Path(bad))
    assert workspace_target(same, Path("/home/code/proj")) == "/home/code/proj"


def test_an_untrusted_workspace_file_cannot_move_the_mount(ws: Path, home: Path) -> None:
    cfg = load(ws, home, workspace='[workspace]\nmount_path = "same"\n')
    assert workspace_target(cfg, Path("/home/alice/proj")) == "/workspace"
    cfg = load(
        ws,
        home,
        user='[workspace]\nmount_path = "same"\n',
        workspace='[workspace]\nmount_path = "/workspace"\n',
    )
    assert workspace_target(cfg, Path("/home/alice/proj")) == "/workspace"


# -- coi-run ----------------------------------------------------------------------------------


def test_run_script_rules(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    with pytest.raises(UsageError, match="no coi-run found in workspace"):
        run_script(ws, "/workspace")
    script = ws / "coi-run"
    script.write_text("#!/bin/sh\necho hi\n")
    with pytest.raises(SessionError, match="not executable"):
        run_script(ws, "/workspace")
    script.chmod(0o755)
    assert run_script(ws, "/workspace") == ["/workspace/coi-run"]
    assert run_script(ws, "/home/a/p/") == ["/home/a/p/coi-run"]
    # A link inside the workspace, absolute or not: the file it names, as seen inside.
    script.rename(ws / "run.sh")
    (ws / "coi-run").symlink_to(ws / "run.sh")
    assert run_script(ws, "/workspace") == ["/workspace/run.sh"]
    # A link out of the workspace would not exist inside.
    (ws / "coi-run").unlink()
    outside = tmp_path / "elsewhere.sh"
    outside.write_text("#!/bin/sh\n")
    outside.chmod(0o755)
    (ws / "coi-run").symlink_to(outside)
    with pytest.raises(SessionError, match="resolving outside the workspace"):
        run_script(ws, "/workspace")
    (ws / "coi-run").unlink()
    (ws / "coi-run").mkdir()
    with pytest.raises(SessionError, match="is a directory"):
        run_script(ws, "/workspace")


# -- Docker inside: by API extension ------------------------------------------------------------


def test_docker_settings_follow_the_daemons_extensions_and_setups_verdict() -> None:
    def has(name: str) -> bool:
        return name == "container_syscall_intercept"

    full = docker_ready_config(has, mknod_works=True, setxattr=True)
    assert full == {"security.nesting": "true", MKNOD_INTERCEPT: "true", SETXATTR_INTERCEPT: "true"}
    # mknod interception only where `coi setup` saw it work; no verdict: off. setxattr only
    # when asked (`incus.intercept_setxattr`): it makes execs under load fail while they run.
    assert docker_ready_config(has) == {"security.nesting": "true"}
    assert docker_ready_config(has, setxattr=True) == {
        "security.nesting": "true",
        SETXATTR_INTERCEPT: "true",
    }
    assert mknod_works({labels.MKNOD_WORKS: "true"})
    assert not mknod_works({}) and not mknod_works({labels.MKNOD_WORKS: "false"})
    assert docker_ready_config(lambda _name: False, mknod_works=True) == {
        "security.nesting": "true"
    }


def test_the_module_reads_only_schema_keys() -> None:
    # The keys this module reads exist (a typo would read a default): checked here as well
    # as by test_config_keys, next to the code that reads them.
    from coi.config.schema import BY_KEY

    for key in ("defaults.forward_env", "timezone.mode", "timezone.name", "git.name",
                "git.email", "git.seed_host_identity", "workspace.mount_path"):  # fmt: skip
        assert key in BY_KEY
    assert envmod.GIT_INCLUDE == "/etc/coi/gitconfig"
