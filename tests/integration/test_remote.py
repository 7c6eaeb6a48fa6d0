"""coi on a remote daemon: a second Incus reachable only over HTTPS (tests/remotekit.py),
added with a trust token; sessions on it; its certificate pinned and checked."""

from __future__ import annotations

import base64
import getpass
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests import remotekit
from tests.conftest import run_coi

from coi.backend import IncusClient

PROJECT = f"coi-{getpass.getuser()}"


@pytest.fixture(scope="module")
def remote(tiny_tarball: Path, test_project: str) -> Iterator[remotekit.RemoteDaemon]:
    """The second daemon, with the tiny image in its default project (the user's project
    shares the default project's images). `test_project`: the main daemon answers."""
    try:
        rd = remotekit.start()
    except RuntimeError as err:
        pytest.fail(f"the second daemon did not start: {err}", pytrace=False)
    try:
        with rd.admin() as c:
            c.images.import_tarball(tiny_tarball, aliases=("coi-tiny",))
        yield rd
    finally:
        remotekit.stop(rd)
    # Nothing of it is left on this machine.
    assert not rd.root.exists()
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert rd.ns not in netns
    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
    assert rd.veth not in links


@pytest.fixture
def env(tmp_path: Path, remote: remotekit.RemoteDaemon) -> dict[str, str]:
    """A user of their own: coi's config folder and state in the test's folder."""
    remotekit.check_route(remote)
    return remotekit.user_env(tmp_path)


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "notes.txt").write_text("from the host\n")
    (ws / "sub").mkdir()
    (ws / "sub" / "deep.txt").write_text("deep\n")
    return ws


def _another_certificate() -> str:
    """A self-signed certificate that is not the server's (PEM)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not-the-server")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA384())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _add(remote: remotekit.RemoteDaemon, env: dict[str, str], name: str = "r1") -> None:
    res = run_coi(
        "remote", "add", name, remote.url, "--token", remote.trust_token("alice"), env=env
    )
    assert res.returncode == 0, res.stderr


def _remote_names(remote: remotekit.RemoteDaemon) -> list[str]:
    with remote.admin(PROJECT) as c:
        return [i.name for i in c.instances.list()]


def _wait_gone(remote: remotekit.RemoteDaemon, name: str, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while name in _remote_names(remote):
        assert time.monotonic() < end, f"{name} still on the remote after {timeout}s"
        time.sleep(0.3)


def test_add_with_a_token_pins_the_certificate_and_list_switch_remove(
    remote: remotekit.RemoteDaemon, env: dict[str, str], ws: Path, tmp_path: Path
) -> None:
    token = remote.trust_token("alice")
    res = run_coi("remote", "add", "r1", remote.url, "--token", token, env=env)
    assert res.returncode == 0, res.stderr
    # The fingerprint shown is the one the daemon's certificate really has.
    assert f"fingerprint (pinned): {remote.fingerprint()}" in res.stdout
    assert "alice" in remote.trusted_names()
    conf = Path(env["XDG_CONFIG_HOME"]) / "coi"
    assert (conf / "client.key").stat().st_mode & 0o777 == 0o600
    # The user's own project was made on the server.
    with remote.admin() as c:
        assert c.projects.exists(PROJECT)
    # A token is good once: another user (another certificate) with the same token is
    # refused, and nothing is added for them.
    other = {**env, "XDG_CONFIG_HOME": str(tmp_path / "xdg-other")}
    again = run_coi("remote", "add", "r1", remote.url, "--token", token, env=other)
    assert again.returncode == 1
    assert "refused the trust token" in again.stderr
    assert json.loads(run_coi("remote", "list", "--format", "json", env=other).stdout) == []
    listed = json.loads(run_coi("remote", "list", "--format", "json", env=env).stdout)
    assert [(r["name"], r["url"], r["project"], r["current"]) for r in listed] == [
        ("r1", remote.url, PROJECT, False)
    ]
    # --accept-certificate pins what the server presents (the same server, already trusting
    # this user's certificate: no token needed).
    acc = run_coi("remote", "add", "same", remote.url, "--accept-certificate", env=env)
    assert acc.returncode == 0, acc.stderr
    assert "already trusted" in acc.stdout
    assert remote.fingerprint() in acc.stdout
    assert run_coi("remote", "remove", "same", env=env).returncode == 0
    # switch: commands without --remote now work there.
    assert run_coi("remote", "switch", "r1", env=env).returncode == 0
    run = run_coi("run", "-w", str(ws), "--network", "open", "--", "true", env=env, timeout=180)
    assert run.returncode == 0, run.stderr
    assert f"the daemon is {remote.url}" in run.stderr
    assert run_coi("remote", "switch", "local", env=env).returncode == 0
    # remove: gone from the list, and the name no longer connects.
    assert run_coi("remote", "remove", "r1", env=env).returncode == 0
    assert json.loads(run_coi("remote", "list", "--format", "json", env=env).stdout) == []
    gone = run_coi("--remote", "r1", "list", env=env)
    assert gone.returncode == 2
    assert "remote 'r1' is not usable" in gone.stderr


def test_a_remote_the_incus_client_added_works_by_name(
    remote: remotekit.RemoteDaemon, env: dict[str, str], ws: Path
) -> None:
    """`incus remote add` (the real client, its config.yml, client.crt and servercerts) is
    enough: coi uses the remote by name, with that certificate pinned."""
    incus = shutil.which("incus")
    assert incus, "the incus client is installed with the daemon"
    added = subprocess.run(
        [incus, "remote", "add", "box", remote.url, "--token", remote.trust_token("bob"),
         "--accept-certificate"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    listed = json.loads(run_coi("remote", "list", "--format", "json", env=env).stdout)
    assert [(r["name"], r["url"], r["fingerprint"]) for r in listed] == [
        ("box", remote.url, remote.fingerprint())
    ]
    assert listed[0]["source"].endswith("/incus")
    res = run_coi("--remote", "box", "run", "--network", "open", "-w", str(ws), "--", "cat",
                  "/workspace/notes.txt", env=env, timeout=180)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout == "from the host\n"
    # Its pinned certificate is checked as coi's own are.
    crt = Path(env["HOME"]) / ".config" / "incus" / "servercerts" / "box.crt"
    crt.write_text(_another_certificate())
    refused = run_coi("--remote", "box", "list", env=env)
    assert refused.returncode == 1
    assert "other than the one pinned for remote 'box'" in refused.stderr


def test_run_list_shell_and_shutdown_on_the_remote(
    remote: remotekit.RemoteDaemon, env: dict[str, str], ws: Path
) -> None:
    _add(remote, env)
    script = (
        "cat /workspace/notes.txt /workspace/sub/deep.txt; id -u; echo agent > /workspace/new; "
        "exit 7"
    )
    res = run_coi(
        "--remote", "r1", "run", "-w", str(ws), "--", "sh", "-c", script, env=env, timeout=180
    )
    # Output streamed back, exit code passed on.
    assert res.returncode == 7, res.stderr
    assert res.stdout.splitlines() == ["from the host", "deep", "1000"]
    assert "changes stay in the remote sandbox" in res.stderr
    # The copy stays there: the user's folder is untouched.
    assert not (ws / "new").exists()

    bg = run_coi(
        "shell", "--background", "--debug", "--network", "open", "-w", str(ws), "--remote", "r1",
        env=env, timeout=180,
    )  # fmt: skip
    assert bg.returncode == 0, bg.stderr
    listed = json.loads(run_coi("list", "--remote", "r1", "--format", "json", env=env).stdout)
    names = [c["name"] for c in listed["active_containers"] if c["kind"] == "shell"]
    assert len(names) == 1, listed
    (name,) = names
    # It runs on the remote, in the user's project, and not on the main daemon.
    assert name in _remote_names(remote)
    with IncusClient.connect() as main_daemon:
        urls = main_daemon.get("/1.0/instances", **{"all-projects": "true"})
    assert name not in [u.rsplit("/", 1)[-1].split("?")[0] for u in urls]
    # The local daemon's list does not show it.
    local = json.loads(run_coi("list", "--format", "json", env=env).stdout)
    assert name not in [c["name"] for c in local["active_containers"]]

    # The background shell answers through coi tmux, over HTTPS.
    sent = run_coi("--remote", "r1", "tmux", "send", name, "echo from-$((6*7))", env=env)
    assert sent.returncode == 0, sent.stderr
    end = time.monotonic() + 30
    while "from-42" not in run_coi("--remote", "r1", "tmux", "capture", name, env=env).stdout:
        assert time.monotonic() < end, "the remote tmux pane never showed the command's output"
        time.sleep(0.3)

    down = run_coi("--remote", "r1", "shutdown", name, env=env, timeout=120)
    assert down.returncode == 0, down.stderr
    _wait_gone(remote, name)


def test_restricted_mode_blocks_the_remote_host_and_open_mode_does_not(
    remote: remotekit.RemoteDaemon, env: dict[str, str], ws: Path
) -> None:
    """The daemon listens on every address of its machine (:8443): from a restricted
    sandbox its gateway's port stays shut (the ACL the remote daemon applies); from an open
    one it answers, so the probe can tell."""
    _add(remote, env)
    probe = (
        'gw=$(ip route | awk "/default/ {print \\$3}"); '
        'if nc -w 2 "$gw" 8443 </dev/null >/dev/null 2>&1; then echo reached; '
        "else echo shut; fi"
    )
    shut = run_coi("--remote", "r1", "run", "-w", str(ws), "--", "sh", "-c", probe, env=env,
                   timeout=180)  # fmt: skip
    assert shut.returncode == 0, shut.stderr
    assert shut.stdout.strip() == "shut"
    assert "the remote daemon applies it" in shut.stderr
    opened = run_coi("--remote", "r1", "run", "--network", "open", "-w", str(ws), "--", "sh",
                     "-c", probe, env=env, timeout=180)  # fmt: skip
    assert opened.returncode == 0, opened.stderr
    assert opened.stdout.strip() == "reached"


def test_what_cannot_work_remotely_is_refused_at_the_command(
    remote: remotekit.RemoteDaemon, env: dict[str, str], ws: Path, tmp_path: Path
) -> None:
    _add(remote, env)
    before = set(_remote_names(remote))  # coi run sandboxes of other tests may be going
    mon = run_coi("--remote", "r1", "run", "--monitor", "-w", str(ws), "--", "true", env=env)
    assert mon.returncode != 0
    assert "security monitor cannot watch a sandbox on a remote daemon" in mon.stderr
    extra = tmp_path / "extra"
    extra.mkdir()
    mnt = run_coi("--remote", "r1", "run", "--mount", f"{extra}:/extra", "-w", str(ws), "--",
                  "true", env=env)  # fmt: skip
    assert mnt.returncode != 0
    assert "extra mounts need the local daemon" in mnt.stderr
    # Nothing was made for either.
    assert set(_remote_names(remote)) <= before
    # coi setup prepares this machine: asked for a remote, it says so instead.
    setup = run_coi("--remote", "r1", "setup", env=env)
    assert setup.returncode == 2
    assert "coi setup prepares this machine, not the remote 'r1'" in setup.stderr


def test_masked_files_are_not_copied_to_the_remote(
    remote: remotekit.RemoteDaemon, env: dict[str, str], ws: Path
) -> None:
    """security.mask_secrets on a remote: the secret files never leave this machine."""
    _add(remote, env)
    (ws / ".env").write_text("API_KEY=on-the-host-only\n")
    (ws / "sub" / "id.pem").write_text("-----BEGIN PRIVATE KEY-----\n")
    os.link(ws / ".env", ws / "env-hardlink")  # the same content under a name not masked
    conf = Path(env["XDG_CONFIG_HOME"]) / "coi" / "config.toml"
    conf.write_text("[security]\nmask_secrets = true\n")
    res = run_coi("--remote", "r1", "run", "--network", "open", "-w", str(ws), "--", "sh", "-c",
                  "cd /workspace && find . | sort; cat ./env-hardlink 2>/dev/null; true",
                  env=env, timeout=180)  # fmt: skip
    assert res.returncode == 0, res.stderr
    seen = res.stdout.split()
    assert "./notes.txt" in seen and "./sub/deep.txt" in seen
    assert "./.env" not in seen and "./sub/id.pem" not in seen
    assert "on-the-host-only" not in res.stdout


def test_a_wrong_certificate_at_add_is_refused_and_nothing_is_kept(
    remote: remotekit.RemoteDaemon, env: dict[str, str]
) -> None:
    """A token names the server's fingerprint: a server presenting another is refused."""
    token = remote.trust_token("mallory")
    data = json.loads(base64.b64decode(token))
    data["fingerprint"] = "00" * 32
    forged = base64.b64encode(json.dumps(data).encode()).decode()
    res = run_coi("remote", "add", "r1", remote.url, "--token", forged, env=env)
    assert res.returncode == 1
    assert "presented a certificate other than the token's: refused" in res.stderr
    assert remote.fingerprint() in res.stderr
    assert json.loads(run_coi("remote", "list", "--format", "json", env=env).stdout) == []
    conf = Path(env["XDG_CONFIG_HOME"]) / "coi"
    assert list(conf.glob("servercerts/*.crt")) == []
    assert "mallory" not in remote.trusted_names()
    # Without a token or --accept-certificate, an unknown certificate is shown, not trusted.
    bare = run_coi("remote", "add", "r1", remote.url, env=env)
    assert bare.returncode == 2
    assert remote.fingerprint() in bare.stderr


def test_health_and_a_stopped_server_on_a_remote(
    remote: remotekit.RemoteDaemon, env: dict[str, str]
) -> None:
    """coi health checks the remote daemon and says which checks are its machine's; a server
    that does not answer is said to be one, not a local daemon to start."""
    _add(remote, env)
    health = run_coi("--remote", "r1", "health", env=env, timeout=180)
    assert "Traceback" not in health.stderr
    assert f"may use {remote.url} (remote 'r1')" in health.stdout
    assert "made by the remote daemon" in health.stdout
    assert "a setting of the remote daemon's machine" in health.stdout
    with remotekit.stopped(remote):
        res = run_coi("--remote", "r1", "list", env=env)
    assert res.returncode != 0
    assert f"cannot connect to the daemon at {remote.url} (remote 'r1')" in res.stderr
    assert "Check that the server runs" in res.stderr
    assert run_coi("--remote", "r1", "list", env=env).returncode == 0


def test_a_changed_server_certificate_is_refused_with_a_clear_error(
    remote: remotekit.RemoteDaemon, env: dict[str, str], tmp_path: Path
) -> None:
    _add(remote, env)
    assert run_coi("--remote", "r1", "list", env=env).returncode == 0
    pinned = remote.fingerprint()
    remotekit.restart(remote, new_certificate=True)
    assert remote.fingerprint() != pinned
    res = run_coi("--remote", "r1", "list", env=env)
    assert res.returncode == 1
    assert "presented a certificate other than the one pinned for remote 'r1': refused" in (
        res.stderr
    )
    assert f"pinned: {pinned}" in res.stderr
    assert f"presented: {remote.fingerprint()}" in res.stderr
    assert "To fix:" in res.stderr
    # Removing and adding again (after checking the new fingerprint) is the way back.
    assert run_coi("remote", "remove", "r1", env=env).returncode == 0
    _add(remote, env)
    assert run_coi("--remote", "r1", "list", env=env).returncode == 0
    shutil.rmtree(tmp_path / "xdg", ignore_errors=True)


def test_limits_on_the_users_project_are_set_or_refused_with_nothing_kept(
    remote: remotekit.RemoteDaemon, env: dict[str, str]
) -> None:
    def listed() -> list[str]:
        out = run_coi("remote", "list", "--format", "json", env=env).stdout
        return [r["name"] for r in json.loads(out) if r["name"].startswith("lim")]

    bad = run_coi("remote", "add", "lim0", remote.url, "--accept-certificate", "--limit",
                  "memory=1GiB", env=env)  # fmt: skip
    assert bad.returncode == 2 and "is not a project limit" in bad.stderr, bad.stderr
    res = run_coi("remote", "add", "lim1", remote.url, "--token", remote.trust_token("carol"),
                  "--project", "coi-limited", "--limit", "limits.instances=2", "--limit",
                  "limits.memory=2GiB", env=env)  # fmt: skip
    assert res.returncode == 0, res.stderr
    with remote.admin() as c:
        config = c.get("/1.0/projects/coi-limited")["config"]
    assert (config["limits.instances"], config["limits.memory"]) == ("2", "2GiB")
    # A value the server refuses: said, and the remote is not added.
    refused = run_coi("remote", "add", "lim2", remote.url, "--accept-certificate", "--project",
                      "coi-limited-2", "--limit", "limits.instances=many", env=env)  # fmt: skip
    assert refused.returncode != 0
    assert "did not set the limits on the project 'coi-limited-2'" in refused.stderr
    assert listed() == ["lim1"]
