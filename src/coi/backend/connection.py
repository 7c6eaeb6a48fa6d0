"""Where the daemon is: local unix sockets (Incus preferred over LXD) or a remote HTTPS server."""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from coi.errors import BackendError, ConfigError, DaemonUnreachable, PermissionDenied

# Incus first: when both daemons are installed, coi talks to Incus.
INCUS_SOCKETS = ("/var/lib/incus/unix.socket", "/run/incus/unix.socket")
LXD_SOCKETS = ("/var/lib/lxd/unix.socket", "/var/snap/lxd/common/lxd/unix.socket")


def config_dir(env: Mapping[str, str]) -> Path:
    """coi's own config folder (beside config.toml): ~/.config/coi."""
    home = Path(env.get("HOME") or Path.home())
    return Path(env.get("XDG_CONFIG_HOME") or home / ".config") / "coi"


def remotes_store(env: Mapping[str, str]) -> Path:
    """The remotes file (coi.backend.remotes): here so that its absence, the usual case, is
    seen without importing the remotes code."""
    return config_dir(env) / "remotes.json"


@dataclass(frozen=True)
class Endpoint:
    """How to reach one daemon: a unix socket path, or an HTTPS URL with client TLS."""

    socket_path: str | None = None
    url: str | None = None
    client_cert: tuple[str, str] | None = None
    server_cert: str | None = None
    # The server certificate's SHA-256 (hex) pinned for this remote: checked at every TLS
    # handshake instead of a CA chain and host name (Incus servers present self-signed
    # certificates, rarely naming the address they are reached at).
    fingerprint: str | None = None
    # The remote's name ('' for a bare URL), for messages.
    name: str = ""

    @property
    def is_local(self) -> bool:
        return self.socket_path is not None

    def describe(self) -> str:
        where = self.socket_path or self.url or "?"
        return f"{where} (remote '{self.name}')" if self.name else where


class CertificateMismatch(BackendError):
    """The server presented a certificate other than the one pinned for it."""


class _PinMismatch(ssl.SSLCertVerificationError):
    """Raised in the TLS handshake; `map_transport_errors` makes it a CertificateMismatch."""

    def __init__(self, expected: str, got: str) -> None:
        super().__init__(f"server certificate {got} is not the pinned {expected}")
        self.expected = expected
        self.got = got


def fingerprint_of(der: bytes) -> str:
    """A certificate's SHA-256 fingerprint, as Incus shows it (lowercase hex)."""
    return hashlib.sha256(der).hexdigest()


def pem_fingerprint(pem: str) -> str:
    return fingerprint_of(ssl.PEM_cert_to_DER_cert(pem))


class _PinnedSocket(ssl.SSLSocket):
    def do_handshake(self, block: bool = False) -> None:
        super().do_handshake(block)
        expected = getattr(self.context, "pin", "")
        der = self.getpeercert(binary_form=True) or b""
        got = fingerprint_of(der)
        if not expected or got != expected:
            raise _PinMismatch(expected, got)


class _PinnedContext(ssl.SSLContext):
    sslsocket_class = _PinnedSocket
    pin: str = ""


def tls_context(endpoint: Endpoint) -> ssl.SSLContext:
    """The TLS settings for an HTTPS endpoint: its pinned server certificate (else the
    system's CAs and the host name, or `server_cert` as CA) and the client certificate."""
    ctx: ssl.SSLContext
    if endpoint.fingerprint:
        pinned = _PinnedContext(ssl.PROTOCOL_TLS_CLIENT)
        pinned.check_hostname = False
        pinned.verify_mode = ssl.CERT_NONE  # the handshake checks the pin itself
        pinned.pin = endpoint.fingerprint.lower()
        ctx = pinned
    elif endpoint.server_cert:
        ctx = ssl.create_default_context(cafile=endpoint.server_cert)
    else:
        ctx = ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if endpoint.client_cert:
        ctx.load_cert_chain(*endpoint.client_cert)
    return ctx


def pin_mismatch(err: BaseException, endpoint: Endpoint) -> CertificateMismatch | None:
    """The coi error for a handshake that failed on the pinned certificate (else None)."""
    seen: set[int] = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, _PinMismatch):
            name = endpoint.name or endpoint.url or "?"
            return CertificateMismatch(
                f"the server at {endpoint.url} presented a certificate other than the one "
                f"pinned for remote '{name}': refused",
                details=f"pinned: {cur.expected}\npresented: {cur.got}\nSomeone may be "
                "intercepting the connection, or the server's certificate was replaced.",
                resolution="Check the server's fingerprint with its administrator ('incus "
                "info' on the server shows certificate_fingerprint). If the change is "
                f"expected: 'coi remote remove {name}' and add it again.",
            )
        cur = cur.__cause__ or cur.__context__
    return None


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def is_listening(path: str) -> bool:
    """Whether a daemon listens on the socket: a stopped one may leave its socket file (both
    daemons installed, one stopped: the other must be found). A refused connect takes
    microseconds; a socket we may not open counts as listening (the caller says why)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError:
        return True
    finally:
        sock.close()
    return True


def candidate_sockets(env: Mapping[str, str]) -> list[str]:
    """Sockets to try, in order: explicit env first, then Incus's, then LXD's."""
    explicit = [env[k] for k in ("INCUS_SOCKET", "LXD_SOCKET") if env.get(k)]
    incus_dir = env.get("INCUS_DIR")
    lxd_dir = env.get("LXD_DIR")
    derived = [f"{d}/unix.socket" for d in (incus_dir, lxd_dir) if d]
    return [*explicit, *derived, *INCUS_SOCKETS, *LXD_SOCKETS]


def find_local_socket(env: Mapping[str, str]) -> str:
    """Return the first usable daemon socket.

    :raises DaemonUnreachable: no socket exists.
    :raises PermissionDenied: a socket exists but this user cannot open it.
    """
    candidates = candidate_sockets(env)
    explicit = [env[k] for k in ("INCUS_SOCKET", "LXD_SOCKET") if env.get(k)]
    for path in explicit:
        if not _is_socket(path):
            raise DaemonUnreachable(
                f"no daemon socket at {path}",
                details="INCUS_SOCKET/LXD_SOCKET names a path that is not a unix socket.",
                resolution="Unset the variable or point it at the daemon's unix.socket.",
            )
    for path in candidates:
        if _is_socket(path) and (path in explicit or is_listening(path)):
            if not os.access(path, os.R_OK | os.W_OK):
                raise PermissionDenied(
                    f"permission denied on the daemon socket {path}",
                    details="The socket exists but your user may not read and write it.",
                    resolution=(
                        "Add yourself to the daemon's group (incus-admin for Incus, lxd for "
                        "LXD) and log in again, or run coi as root."
                    ),
                )
            return path
    raise DaemonUnreachable(
        "no Incus or LXD daemon is running",
        details="Looked for a socket at: " + ", ".join(dict.fromkeys(candidates)),
        resolution="Run 'coi setup' to install, start and initialize a daemon.",
    )


def _client_config_dirs(env: Mapping[str, str]) -> list[Path]:
    home = Path(env.get("HOME", str(Path.home())))
    dirs = []
    if env.get("INCUS_CONF"):
        dirs.append(Path(env["INCUS_CONF"]))
    if env.get("LXD_CONF"):
        dirs.append(Path(env["LXD_CONF"]))
    xdg = Path(env.get("XDG_CONFIG_HOME", str(home / ".config")))
    # The incus and lxc clients themselves use $HOME/.config whatever XDG_CONFIG_HOME says.
    dirs += [xdg / "incus", xdg / "lxc", home / ".config/incus", home / ".config/lxc"]
    dirs.append(home / "snap/lxd/common/config")
    return list(dict.fromkeys(dirs))


def remote_endpoint(remote: str, env: Mapping[str, str]) -> Endpoint:
    """Resolve `[incus] remote` (a remote name from the client config, or an https URL).

    The TLS client certificate is the one the user's incus/lxc client already uses.

    :raises ConfigError: the remote or its certificates cannot be found.
    """
    for conf_dir in _client_config_dirs(env):
        crt, key = conf_dir / "client.crt", conf_dir / "client.key"
        if not (crt.is_file() and key.is_file()):
            continue
        url = remote
        server_cert: Path | None = None
        if not remote.startswith("https://"):
            url = _lookup_remote_url(conf_dir / "config.yml", remote) or ""
            if not url:
                continue
            server_cert = conf_dir / "servercerts" / f"{remote}.crt"
        return Endpoint(
            url=url.rstrip("/"),
            client_cert=(str(crt), str(key)),
            server_cert=str(server_cert) if server_cert and server_cert.is_file() else None,
        )
    raise ConfigError(
        f"remote '{remote}' is not usable",
        details="Neither coi's remotes ('coi remote list') nor an incus/lxc client "
        "configuration with a client certificate names it.",
        resolution=(
            "Add it with 'coi remote add NAME https://HOST:8443 --token TOKEN' (or 'incus "
            "remote add'), or use 'local' for the local daemon."
        ),
    )


def _lookup_remote_url(config_yml: Path, name: str) -> str | None:
    if not config_yml.is_file():
        return None
    import yaml  # lazily: only remote users pay for it

    data = yaml.safe_load(config_yml.read_text()) or {}
    remote = (data.get("remotes") or {}).get(name) or {}
    addr = remote.get("addr")
    return str(addr) if isinstance(addr, str) and addr.startswith("https://") else None
