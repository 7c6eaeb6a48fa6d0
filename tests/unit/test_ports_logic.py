"""Published ports, forwarded sockets and aliases: parsing, per-slot allocation, the device
the daemon gets, the host-side port check, and what an untrusted workspace file may ask."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from coi.config.loader import Config, load_config
from coi.errors import ConfigError, SessionError, UsageError
from coi.sessions import aliases, forwards
from coi.sessions.forwards import PortRequest, Published


def _load(tmp_path: Path, user: str = "", workspace: str = "", **env: str) -> Config:
    home = tmp_path / "home"
    ws = tmp_path / "ws"
    home.mkdir(exist_ok=True)
    ws.mkdir(exist_ok=True)
    (home / "user.toml").write_text(user)
    (ws / ".coi.toml").write_text(workspace)
    return load_config(
        cwd=ws,
        env={"HOME": str(home), "COI_HOME": str(home / ".coi"), **env},
        files=[home / "user.toml", ws / ".coi.toml"],
    )


# -- parsing ------------------------------------------------------------------------------


def test_pool_and_flag_parse() -> None:
    assert forwards.parse_pool("3000-3099") == Published(3000, 3000, 100)
    assert forwards.parse_pool(" 3000 ") == Published(3000, 3000, 1)
    assert forwards.parse_pool("") is None
    for bad in ("3099-3000", "0-10", "3000-70000", "abc", "3000-"):
        with pytest.raises(ValueError):
            forwards.parse_pool(bad)
    assert forwards.parse_flag("8080:80") == Published(8080, 80)
    assert forwards.parse_flag("3000") == Published(3000, 3000)
    for bad in ("8080:", ":80", "x:1", "70000:1", "1:0"):
        with pytest.raises(UsageError):
            forwards.parse_flag(bad)


def test_config_request_and_errors(tmp_path: Path) -> None:
    cfg = _load(
        tmp_path,
        user='[ports]\npool = "3000-3009"\n[[ports.map]]\nhost = 8080\ncontainer = 80\n',
    )
    req = forwards.port_request(cfg, ["9000:90"])
    assert req.configured == (Published(3000, 3000, 10), Published(8080, 80))
    assert req.exact == (Published(9000, 90),)
    bad = _load(tmp_path, user='[[ports.map]]\nhost = "x"\ncontainer = 80\n')
    with pytest.raises(ConfigError, match="host must be a port"):
        forwards.port_request(bad)
    twice = _load(tmp_path, user='[ports]\npool = "3000-3009"\n[[ports.map]]\nhost = 3005\n'
                  "container = 80\n")  # fmt: skip
    with pytest.raises(ConfigError, match="host port 3005 twice"):
        forwards.port_request(twice)
    with pytest.raises(UsageError, match="overlaps"):
        forwards.port_request(_load(tmp_path), ["9000:1", "9000:2"])


# -- per-slot allocation ------------------------------------------------------------------


def test_slots_shift_by_the_width_and_never_collide() -> None:
    req = PortRequest(configured=(Published(3000, 3000, 100), Published(3100, 80)))
    assert req.width == 101
    assert req.for_slot(1) == (Published(3000, 3000, 100), Published(3100, 80))
    assert req.for_slot(2) == (Published(3101, 3000, 100), Published(3201, 80))
    taken: set[int] = set()
    for slot in range(1, 11):
        ports = {port for p in req.for_slot(slot) for port in range(p.host, p.host_end + 1)}
        assert not ports & taken, f"slot {slot} collides"
        taken |= ports
    # Slot 0 (a container named by the user) publishes as slot 1.
    assert req.for_slot(0) == req.for_slot(1)


def test_explicit_ports_are_not_shifted_and_past_65535_is_an_error() -> None:
    req = PortRequest(configured=(Published(3000, 3000, 10),), exact=(Published(9000, 90),))
    assert Published(9000, 90) in req.for_slot(5)
    with pytest.raises(SessionError, match="overlaps"):
        PortRequest(configured=(Published(3000, 3000, 10),), exact=(Published(3012, 1),)).for_slot(
            2
        )
    high = PortRequest(configured=(Published(65000, 65000, 300),))
    assert high.for_slot(1)
    with pytest.raises(SessionError, match="past 65535"):
        high.for_slot(3)


# -- the device and reading it back -------------------------------------------------------


def test_one_device_publishes_all_and_reads_back() -> None:
    ports = (Published(3100, 3000, 100), Published(3200, 80), Published(9000, 90))
    dev = forwards.ports_device(ports)
    assert dev == {
        "type": "proxy",
        "listen": "tcp:127.0.0.1:3100-3199,3200,9000",
        "connect": "tcp:127.0.0.1:3000-3099,80,90",
        "bind": "host",
    }
    assert forwards.published_of({forwards.PORTS_DEVICE: dev}) == ports
    assert forwards.published_of({"other": dev}) == ()
    wide = forwards.ports_device([Published(8080, 80, 1, "0.0.0.0")])
    assert wide["listen"] == "tcp:0.0.0.0:8080"
    assert Published(3100, 3000, 100).text() == "127.0.0.1:3100-3199->3000-3099/tcp"


def test_socket_device_runs_as_the_user_and_is_the_agents_inside() -> None:
    dev = forwards.SocketForward("/run/h.sock", "/tmp/h.sock", "coi-sock-0").device(
        1000, 1500, 1501
    )
    assert dev["listen"] == "unix:/tmp/h.sock" and dev["connect"] == "unix:/run/h.sock"
    assert dev["bind"] == "container"
    assert (dev["uid"], dev["gid"], dev["mode"]) == ("1000", "1000", "0600")
    # Never the daemon's root on the host side.
    assert (dev["security.uid"], dev["security.gid"]) == ("1500", "1501")


# -- the host-side check --------------------------------------------------------------------


def test_a_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        with pytest.raises(SessionError) as err:
            forwards.check_free([Published(port, 80)])
        assert f"port {port} is already in use" in err.value.message
        assert err.value.resolution and "ss -ltnp" in err.value.resolution
        # The reused sandbox's own listener is not a conflict.
        forwards.check_free([Published(port, 80)], skip=[Published(port, 80)])
    forwards.check_free([Published(port, 80)])  # free again


def test_a_privileged_port_is_refused_for_a_user() -> None:
    """As a plain user (here: nobody, when the tests run as root) port 80 cannot be listened
    on: said before anything starts."""
    code = (
        "from coi.sessions.forwards import Published, check_free\n"
        "from coi.errors import SessionError\n"
        "try:\n    check_free([Published(80, 80)])\n"
        "except SessionError as e:\n    print(e.message)\n"
    )
    argv = [sys.executable, "-c", code]
    if os.geteuid() == 0:
        argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--", *argv]
    src = str(Path(__file__).resolve().parents[2] / "src")
    out = subprocess.run(argv, capture_output=True, text=True, env={"PYTHONPATH": src}, check=False)
    assert "below 1024" in out.stdout, out.stdout + out.stderr


# -- sockets from config --------------------------------------------------------------------


def test_sockets_and_ssh_agent(tmp_path: Path) -> None:
    path = tmp_path / "h.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        cfg = _load(
            tmp_path,
            user=f'[[sockets]]\nhost = "{path}"\ncontainer = "/run/h.sock"\n'
            "[ssh]\nforward_agent = true\n",
        )
        socks, notes = forwards.socket_forwards(cfg, {"SSH_AUTH_SOCK": str(path)})
        assert [(f.host, f.container) for f in socks] == [
            (str(path), "/run/h.sock"),
            (str(path), forwards.SSH_AGENT_PATH),
        ]
        assert forwards.ssh_env(socks) == {"SSH_AUTH_SOCK": forwards.SSH_AGENT_PATH}
        assert "sign" in notes[0]
        _socks, notes = forwards.socket_forwards(cfg, {})
        assert "no agent forwarded" in notes[-1]
    path.unlink()
    missing = _load(tmp_path, user=f'[[sockets]]\nhost = "{path}"\ncontainer = "/x"\n')
    with pytest.raises(ConfigError, match="is not there"):
        forwards.socket_forwards(missing, {})
    relative = _load(tmp_path, user='[[sockets]]\nhost = "h.sock"\ncontainer = "/x"\n')
    with pytest.raises(ConfigError, match="absolute"):
        forwards.socket_forwards(relative, {})


# -- the attacker's workspace file ----------------------------------------------------------


def test_untrusted_workspace_cannot_publish_forward_or_widen(tmp_path: Path) -> None:
    """A repository's .coi.toml asks for a listener on every address, host sockets and the
    SSH agent: all dropped, each named in the warning."""
    cfg = _load(
        tmp_path,
        workspace='[ports]\npool = "3000-3099"\nbind = "0.0.0.0"\n'
        "[[ports.map]]\nhost = 2222\ncontainer = 22\n"
        '[[sockets]]\nhost = "/run/docker.sock"\ncontainer = "/run/docker.sock"\n'
        "[ssh]\nforward_agent = true\n",
    )
    assert cfg.get_str("ports.pool") == ""
    assert cfg.get_str("ports.bind") == "127.0.0.1"
    assert cfg.get("ports.map") == [] and cfg.get("sockets") == []
    assert cfg.get_bool("ssh.forward_agent") is False
    dropped = {d.key for d in cfg.dropped}
    assert {"ports.pool", "ports.bind", "ports.map", "sockets", "ssh.forward_agent"} <= dropped
    warning = "\n".join(cfg.warnings)
    assert "is not trusted" in warning and "sockets" in warning and "0.0.0.0" in warning


def test_untrusted_may_narrow_bind_and_trusted_may_widen(tmp_path: Path) -> None:
    narrowed = _load(tmp_path, user='[ports]\nbind = "0.0.0.0"\n',
                     workspace='[ports]\nbind = "127.0.0.1"\n')  # fmt: skip
    assert narrowed.get_str("ports.bind") == "127.0.0.1"
    trusted = _load(tmp_path, workspace='[ports]\nbind = "0.0.0.0"\npool = "3000"\n',
                    COI_TRUST_ALL="1")  # fmt: skip
    assert trusted.get_str("ports.bind") == "0.0.0.0"
    assert forwards.port_request(trusted).configured == (Published(3000, 3000, 1, "0.0.0.0"),)


# -- aliases --------------------------------------------------------------------------------


def test_alias_names() -> None:
    assert aliases.check("web") == "web"
    assert aliases.check("my-app.v2_x") == "my-app.v2_x"
    for bad in ("", "2web", "-web", "a b", "x" * 64, "web/1", "coi-0123abcd-1"):
        with pytest.raises(UsageError):
            aliases.check(bad)


def test_extensions_asked_by_name_and_sockets_read_back() -> None:
    has = {"proxy", "proxy_tcp_udp_multi_port_handling", "proxy_unix"}.__contains__
    assert forwards.missing_extensions(has, ports=True, sockets=False) == []
    assert forwards.missing_extensions(has, ports=True, sockets=True) == [
        "proxy_unix_dac_properties"
    ]
    assert forwards.missing_extensions(lambda _e: False, ports=False, sockets=False) == []
    sock = forwards.SocketForward("/run/h.sock", "/tmp/h.sock", "coi-sock-0")
    devices = forwards.forward_devices([Published(3000, 3000)], [sock], agent_uid=1000)
    assert set(devices) == {forwards.PORTS_DEVICE, "coi-sock-0"}
    assert all(forwards.is_forward(d) for d in devices) and not forwards.is_forward("eth0")
    assert forwards.sockets_of({**devices, "eth0": {}}) == (("/run/h.sock", "/tmp/h.sock"),)
    assert forwards.forward_devices([], [], agent_uid=1000) == {}
