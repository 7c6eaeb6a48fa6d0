"""Remotes without a daemon: the store, names and URLs, tokens, the incus client's config,
the config layer, and the pinned certificate checked in a real TLS handshake."""

from __future__ import annotations

import base64
import datetime
import json
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from coi.backend import remotes
from coi.backend.client import IncusClient
from coi.backend.connection import CertificateMismatch, Endpoint, fingerprint_of
from coi.config.loader import load_config
from coi.errors import ConfigError, UsageError


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {"HOME": str(tmp_path / "home"), "XDG_CONFIG_HOME": str(tmp_path / "xdg")}


def _store(env: dict[str, str], data: dict[str, object]) -> None:
    path = remotes.config_dir(env) / "remotes.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _self_signed(tmp: Path, cn: str) -> tuple[Path, Path, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    crt, kf = tmp / f"{cn}.crt", tmp / f"{cn}.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    kf.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return crt, kf, cert.public_bytes(serialization.Encoding.DER)


def test_names_urls_and_tokens() -> None:
    assert remotes.normalize_url("https://h.example") == "https://h.example:8443"
    assert remotes.normalize_url("h.example:9443") == "https://h.example:9443"
    for bad in ("http://h:8443", "https://h:8443/x", "https://"):
        with pytest.raises(UsageError):
            remotes.normalize_url(bad)
    for bad in ("local", "", "a b", "-x", "x/y"):
        with pytest.raises(UsageError):
            remotes.check_name(bad)
    remotes.check_name("build-1.eu")
    raw = base64.b64encode(
        json.dumps(
            {"client_name": "a", "fingerprint": "AB" * 32, "addresses": ["h:1"], "secret": "s"}
        ).encode()
    ).decode()
    tok = remotes.decode_token(raw.rstrip("="))  # padding may be lost in a copy
    assert (tok.client_name, tok.fingerprint, tok.addresses) == ("a", "ab" * 32, ("h:1",))
    for bad in ("not-a-token", base64.b64encode(b'{"secret": "s"}').decode()):
        with pytest.raises(UsageError):
            remotes.decode_token(bad)


def test_store_switch_remove_and_the_config_layer(env: dict[str, str], tmp_path: Path) -> None:
    fp = "cd" * 32
    _store(env, {"current": "", "remotes": {"r1": {"addr": "https://h:8443", "fingerprint": fp,
                                                      "project": "coi-alice"}}})  # fmt: skip
    assert [(r.name, r.project, r.current) for r in remotes.list_remotes(env)] == [
        ("r1", "coi-alice", False)
    ]
    cfg = load_config(cwd=tmp_path, env=env, files=[])
    assert (cfg.get_str("incus.remote"), cfg.get_str("incus.project")) == ("", "default")
    remotes.switch("r1", env)
    cfg = load_config(cwd=tmp_path, env=env, files=[])
    assert cfg.get_str("incus.remote") == "r1"
    assert cfg.origins["incus.remote"] == "coi remote switch"
    # The remote's project applies unless a project is asked for.
    assert cfg.get_str("incus.project") == "coi-alice"
    cfg = load_config(cwd=tmp_path, env={**env, "COI_PROJECT": "p2"}, files=[])
    assert cfg.get_str("incus.project") == "p2"
    # --remote / COI_REMOTE win over the switch; 'local' is the local daemon.
    cfg = load_config(cwd=tmp_path, env={**env, "COI_REMOTE": "local"}, files=[])
    assert (cfg.get_str("incus.remote"), cfg.get_str("incus.project")) == ("", "default")
    with pytest.raises(UsageError):
        remotes.switch("nope", env)
    assert remotes.remove("r1", env) is True
    assert remotes.current(env) == ""
    assert remotes.list_remotes(env) == []
    with pytest.raises(UsageError):
        remotes.remove("r1", env)


def test_a_broken_store_is_a_config_error(env: dict[str, str]) -> None:
    path = remotes.config_dir(env) / "remotes.json"
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.raises(ConfigError):
        remotes.list_remotes(env)


def test_resolve_a_coi_remote_and_an_incus_client_remote(
    env: dict[str, str], tmp_path: Path
) -> None:
    log: list[str] = []
    crt, key = remotes.ensure_client_cert(env, log.append)
    assert key.stat().st_mode & 0o777 == 0o600
    assert remotes.ensure_client_cert(env, log.append) == (crt, key)  # made once
    assert len(log) == 1
    _store(env, {"current": "", "remotes": {"r1": {"addr": "https://h:8443/",
                                                      "fingerprint": "ef" * 32}}})  # fmt: skip
    ep = remotes.resolve("r1", env)
    assert (ep.url, ep.fingerprint, ep.name) == ("https://h:8443", "ef" * 32, "r1")
    assert ep.client_cert == (str(crt), str(key))
    assert remotes.resolve("https://h:8443", env).fingerprint == "ef" * 32
    # A remote the incus client added: its certificate and its pinned server certificate.
    inc = Path(env["XDG_CONFIG_HOME"]) / "incus"
    (inc / "servercerts").mkdir(parents=True)
    ccrt, ckey, _ = _self_signed(inc, "client")
    ccrt.rename(inc / "client.crt")
    ckey.rename(inc / "client.key")
    scrt, _, der = _self_signed(tmp_path, "server")
    (inc / "servercerts" / "box.crt").write_text(scrt.read_text())
    (inc / "config.yml").write_text(
        "default-remote: local\nremotes:\n"
        "  box:\n    addr: https://10.0.0.5:8443\n    protocol: incus\n    project: team\n"
        "  images:\n    addr: https://images.example\n    protocol: simplestreams\n"
        "    public: true\n"
    )
    ep = remotes.resolve("box", env)
    assert (ep.url, ep.fingerprint) == ("https://10.0.0.5:8443", fingerprint_of(der))
    assert ep.client_cert == (str(inc / "client.crt"), str(inc / "client.key"))
    listed = {r.name: r for r in remotes.list_remotes(env)}
    assert set(listed) == {"r1", "box"}  # not the image server
    assert (listed["box"].project, listed["box"].source) == ("team", str(inc))
    with pytest.raises(ConfigError):
        remotes.resolve("nope", env)


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[int, bytes]]:
    """A TLS server on 127.0.0.1 (a host the test makes) answering one HTTP request."""
    crt, key, der = _self_signed(tmp_path, "srv")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(crt, key)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    srv.settimeout(10)
    port = srv.getsockname()[1]

    def serve() -> None:
        for _ in range(4):
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            try:
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(4096)
                    body = b'{"type":"sync","metadata":{"auth":"trusted"}}'
                    tls.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                        + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                        + body
                    )
            except (OSError, ssl.SSLError):
                continue

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield port, der
    srv.close()
    t.join(timeout=5)


def test_the_pinned_certificate_is_checked_in_the_handshake(
    tls_server: tuple[int, bytes],
) -> None:
    port, der = tls_server
    url = f"https://127.0.0.1:{port}"
    assert remotes.server_certificate(url) == der
    good = Endpoint(url=url, fingerprint=fingerprint_of(der), name="r1")
    with IncusClient(good, timeout=10) as c:
        assert c.get("/1.0") == {"auth": "trusted"}
    bad = Endpoint(url=url, fingerprint="00" * 32, name="r1")
    with IncusClient(bad, timeout=10) as c, pytest.raises(CertificateMismatch) as err:
        c.get("/1.0")
    assert "pinned for remote 'r1': refused" in err.value.message
    assert fingerprint_of(der) in (err.value.details or "")
    assert err.value.resolution


def test_the_workspace_archive_leaves_out_masked_files_and_follows_no_link(
    tmp_path: Path,
) -> None:
    import os
    import tarfile

    from coi.protection.masks import Masked, MaskPlan
    from coi.sessions.remote import pack
    from coi.sessions.sandbox import SandboxSpec

    ws = tmp_path / "ws"
    (ws / "src").mkdir(parents=True)
    (ws / "src" / "a.py").write_text("print(1)\n")
    (ws / ".env").write_text("KEY=secret\n")
    os.link(ws / ".env", ws / "copy-of-env")  # the masked content under another name
    (ws / "keys").mkdir()
    (ws / "keys" / "id").write_text("secret\n")
    os.link(ws / "keys" / "id", ws / "a-key")  # archived before keys/: left out all the same
    (ws / "out").symlink_to("/etc")  # stored as a link, never followed
    os.mkfifo(ws / "fifo")
    plan = MaskPlan(workspace=ws, paths=[Masked(".env", "file"), Masked("keys", "dir")])
    spec = SandboxSpec(workspace=ws, image="coi", persistent=False, masks=plan, code_uid=1234)
    count, size = pack(spec, tmp_path / "w.tar")
    with tarfile.open(tmp_path / "w.tar") as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert set(members) == {"./src", "./src/a.py", "./out"}
    assert members["./out"].issym() and members["./out"].linkname == "/etc"
    assert {(m.uid, m.gid) for m in members.values()} == {(1234, 1234)}
    assert (count, size) == (3, len("print(1)\n"))


def test_a_websocket_that_never_opens_is_given_up_in_bounded_time(
    tls_server_silent: tuple[int, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon answers TLS but not the websocket upgrade: coi gives up in about its open
    timeout (and the exec is started again by its caller) instead of waiting forever."""
    import time

    from coi.backend import exec as backend_exec

    monkeypatch.setattr(backend_exec, "_OPEN_TIMEOUT", 0.5)
    port, der = tls_server_silent
    ep = Endpoint(url=f"https://127.0.0.1:{port}", fingerprint=fingerprint_of(der))
    from coi.backend.connection import tls_context

    started = time.monotonic()
    with pytest.raises(backend_exec._OpenStalled):
        backend_exec._connect_tls(f"wss://127.0.0.1:{port}/x", tls_context(ep))
    assert time.monotonic() - started < 5


@pytest.fixture
def tls_server_silent(tmp_path: Path) -> Iterator[tuple[int, bytes]]:
    """A TLS server on 127.0.0.1 that completes handshakes and then says nothing."""
    crt, key, der = _self_signed(tmp_path, "silent")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(crt, key)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    srv.settimeout(10)
    held: list[ssl.SSLSocket] = []

    def serve() -> None:
        try:
            conn, _ = srv.accept()
            held.append(ctx.wrap_socket(conn, server_side=True))
        except OSError:
            return

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield srv.getsockname()[1], der
    srv.close()
    for h in held:
        h.close()
    t.join(timeout=5)


def test_only_project_limits_with_a_value_are_taken() -> None:
    from coi.backend.remotes import check_limits
    from coi.errors import UsageError

    check_limits({"limits.instances": "5", "limits.memory": "16GiB", "limits.cpu": "4"})
    for bad in ({"memory": "1GiB"}, {"limits.": "1"}, {"limits.instances": ""},
                {"features.images": "true"}, {"limits.X": "1"}):  # fmt: skip
        with pytest.raises(UsageError):
            check_limits(bad)
