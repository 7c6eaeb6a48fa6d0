"""Remote daemons: coi's own list of them (with a client certificate and pinned server
certificates), the incus/lxc client's remotes read as they are, and trust by token."""

from __future__ import annotations

import base64
import binascii
import datetime
import json
import os
import re
import socket
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from coi.backend.connection import (
    CertificateMismatch,
    Endpoint,
    _client_config_dirs,
    config_dir,
    fingerprint_of,
    pem_fingerprint,
    remotes_store,
)
from coi.errors import BackendError, ConfigError, PermissionDenied, UsageError
from coi.fsio import write_atomic

LOCAL = "local"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
DEFAULT_PORT = 8443
# How long a first look at a server (its certificate) may take.
CONNECT_TIMEOUT = 10.0

Log = Callable[[str], None]


def _cert_paths(env: Mapping[str, str]) -> tuple[Path, Path]:
    d = config_dir(env)
    return d / "client.crt", d / "client.key"


def pinned_cert_path(env: Mapping[str, str], name: str) -> Path:
    return config_dir(env) / "servercerts" / f"{name}.crt"


@dataclass(frozen=True)
class Remote:
    """One remote as `coi remote list` shows it."""

    name: str
    url: str
    project: str
    fingerprint: str
    source: str  # "coi" or the incus/lxc client config folder it comes from
    current: bool = False


def _load(env: Mapping[str, str]) -> dict[str, Any]:
    path = remotes_store(env)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {"current": "", "remotes": {}}
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"cannot read {path}",
            details=str(err),
            resolution="Fix or remove the file, then add your remotes again.",
        ) from err
    if not isinstance(data, dict) or not isinstance(data.get("remotes"), dict):
        raise ConfigError(f"{path} is not a coi remotes file", resolution="Remove it.")
    data.setdefault("current", "")
    return data


def _write(path: Path, data: bytes, mode: int) -> None:
    """Whole or not at all (coi.fsio), with `mode` from the start; its folder made 0700."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(path, data, mode=mode)


def _save(env: Mapping[str, str], data: Mapping[str, Any]) -> None:
    _write(remotes_store(env), (json.dumps(data, indent=2, sort_keys=True) + "\n").encode(), 0o600)


# -- reading -----------------------------------------------------------------------------


def current(env: Mapping[str, str]) -> str:
    """The remote `coi remote switch` chose ('' : the local daemon)."""
    try:
        name = str(_load(env).get("current") or "")
    except ConfigError:
        return ""
    return "" if name == LOCAL else name


def project_of(name: str, env: Mapping[str, str]) -> str:
    """The project recorded for remote `name` (coi's, else the incus client's; '' if none)."""
    try:
        entry = _load(env)["remotes"].get(name)
    except ConfigError:
        return ""
    if entry is not None:
        return str(entry.get("project") or "")
    return next((r.project for r in _incus_remotes(env) if r.name == name), "")


def _incus_remotes(env: Mapping[str, str]) -> list[Remote]:
    """The remotes of the incus/lxc client's config that have a client certificate."""
    import yaml  # lazily: only remote users pay for it

    out: list[Remote] = []
    for conf_dir in _client_config_dirs(env):
        cfg = conf_dir / "config.yml"
        if not cfg.is_file() or not (conf_dir / "client.crt").is_file():
            continue
        try:
            data = yaml.safe_load(cfg.read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        for name, entry in sorted((data.get("remotes") or {}).items()):
            addr = (entry or {}).get("addr")
            if not (isinstance(addr, str) and addr.startswith("https://")):
                continue
            if (entry or {}).get("public") or (entry or {}).get("protocol") not in (
                None,
                "incus",
                "lxd",
            ):
                continue  # image servers, not daemons
            crt = conf_dir / "servercerts" / f"{name}.crt"
            fp = pem_fingerprint(crt.read_text()) if crt.is_file() else ""
            project = str((entry or {}).get("project") or "")
            out.append(Remote(str(name), addr, project, fp, str(conf_dir)))
    return out


def list_remotes(env: Mapping[str, str]) -> list[Remote]:
    """coi's remotes, then the incus/lxc client's (a name coi has hides the client's)."""
    data = _load(env)
    cur = current(env)
    out = [
        Remote(
            name,
            str(e.get("addr", "")),
            str(e.get("project") or ""),
            str(e.get("fingerprint", "")),
            "coi",
            current=name == cur,
        )
        for name, e in sorted(data["remotes"].items())
    ]
    names = {r.name for r in out}
    for r in _incus_remotes(env):
        if r.name not in names:
            names.add(r.name)
            out.append(
                Remote(r.name, r.url, r.project, r.fingerprint, r.source, current=r.name == cur)
            )
    return out


def resolve(remote: str, env: Mapping[str, str]) -> Endpoint:
    """The endpoint of `remote`: a name coi added, else a name of the incus/lxc client's
    config, else an https:// URL (with a coi remote of that address, or the client's cert).

    :raises ConfigError: no such remote, or its certificates are missing.
    """
    data = _load(env)
    entry = data["remotes"].get(remote)
    if entry is None and remote.startswith("https://"):
        url = remote.rstrip("/")
        entry = next(
            (e for e in data["remotes"].values() if str(e.get("addr", "")).rstrip("/") == url),
            None,
        )
        if entry is not None:
            remote = next(n for n, e in data["remotes"].items() if e is entry)
    if entry is not None:
        crt, key = _cert_paths(env)
        if not (crt.is_file() and key.is_file()):
            raise ConfigError(
                f"coi's client certificate for remote '{remote}' is missing",
                details=f"Looked for {crt} and {key}.",
                resolution=f"'coi remote remove {remote}' and add it again.",
            )
        return Endpoint(
            url=str(entry["addr"]).rstrip("/"),
            client_cert=(str(crt), str(key)),
            fingerprint=str(entry.get("fingerprint") or "") or None,
            name=remote if not remote.startswith("https://") else "",
        )
    from coi.backend.connection import remote_endpoint

    ep = remote_endpoint(remote, env)
    fp = pem_fingerprint(Path(ep.server_cert).read_text()) if ep.server_cert else None
    return Endpoint(
        url=ep.url,
        client_cert=ep.client_cert,
        server_cert=None if fp else ep.server_cert,
        fingerprint=fp,
        name="" if remote.startswith("https://") else remote,
    )


# -- the client certificate --------------------------------------------------------------


def ensure_client_cert(env: Mapping[str, str], log: Log) -> tuple[Path, Path]:
    """coi's client certificate, made once (ECDSA P-384, as Incus's own client makes);
    the key is written 0600 from the start."""
    crt, key = _cert_paths(env)
    if crt.is_file() and key.is_file():
        return crt, key
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    user = env.get("USER") or env.get("LOGNAME") or str(os.getuid())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "coi"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{user}@{socket.gethostname()}"),
        ]
    )
    pkey = ec.generate_private_key(ec.SECP384R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(pkey.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(pkey, hashes.SHA384())
    )
    _write(
        key,
        pkey.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        0o600,
    )
    _write(crt, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    log(f"Made coi's client certificate {crt} (key {key}, mode 0600)")
    return crt, key


# -- adding ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Token:
    """What an `incus config trust add` token carries."""

    client_name: str
    fingerprint: str
    addresses: tuple[str, ...]
    secret: str
    raw: str


def decode_token(raw: str) -> Token:
    """:raises UsageError: not a trust token."""
    text = raw.strip()
    try:
        data = json.loads(base64.b64decode(text + "=" * (-len(text) % 4)))
        return Token(
            client_name=str(data.get("client_name") or ""),
            fingerprint=str(data["fingerprint"]).lower(),
            addresses=tuple(str(a) for a in data.get("addresses") or ()),
            secret=str(data["secret"]),
            raw=text,
        )
    except (ValueError, KeyError, TypeError, binascii.Error) as err:
        raise UsageError(
            "the trust token is not valid",
            details=str(err),
            resolution="Copy the whole token 'incus config trust add NAME' printed on the server.",
        ) from err


def normalize_url(url: str) -> str:
    """`https://HOST[:PORT]`, the port defaulting to 8443.

    :raises UsageError: not an https URL.
    """
    parts = urlsplit(url if "://" in url else f"https://{url}")
    if parts.scheme != "https" or not parts.hostname or parts.path not in ("", "/"):
        raise UsageError(
            f"'{url}' is not a daemon address",
            resolution="Give it as https://HOST:PORT (the server's core.https_address).",
        )
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"https://{host}:{parts.port or DEFAULT_PORT}"


def server_certificate(url: str, timeout: float = CONNECT_TIMEOUT) -> bytes:
    """The certificate the server at `url` presents (DER), read without trusting it.

    :raises BackendError: nothing answers TLS there.
    """
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or DEFAULT_PORT
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            ctx.wrap_socket(raw, server_hostname=host) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
    except OSError as err:
        raise BackendError(
            f"cannot reach a daemon at {url}",
            details=str(err),
            resolution="Check the address and port (the server's core.https_address) and "
            "that this machine may connect to it.",
        ) from err
    if not der:
        raise BackendError(f"the server at {url} presented no certificate")
    return der


def check_name(name: str) -> None:
    if name == LOCAL or not NAME_RE.fullmatch(name):
        raise UsageError(
            f"'{name}' cannot name a remote",
            resolution="Use letters, digits, '.', '_' and '-' (and not 'local').",
        )


@dataclass(frozen=True)
class Added:
    """What `coi remote add` did."""

    name: str
    url: str
    fingerprint: str
    project: str
    trusted_by: str  # "token", "already" (the server trusted the certificate before)
    project_created: bool


def add(
    name: str,
    url: str,
    *,
    token: str | None,
    accept_certificate: bool,
    project: str,
    env: Mapping[str, str],
    log: Log,
    limits: Mapping[str, str] | None = None,
) -> Added:
    """Add a remote: pin its certificate (from the token, or accepted as shown), have coi's
    client certificate trusted (by the token), make the project if it is missing, with
    `limits` (the project's `limits.*` keys) where the server lets the user set them.

    :raises UsageError: bad name or URL, the name is taken, or the certificate is unknown.
    :raises CertificateMismatch: the certificate differs from the token's.
    :raises PermissionDenied: the server does not trust coi's certificate.
    """
    from coi.backend.client import IncusClient

    check_name(name)
    check_limits(limits or {})
    url = normalize_url(url)
    data = _load(env)
    if name in data["remotes"]:
        raise UsageError(
            f"remote '{name}' already exists",
            resolution=f"Remove it first: 'coi remote remove {name}'.",
        )
    tok = decode_token(token) if token else None
    der = server_certificate(url)
    got = fingerprint_of(der)
    if tok is not None and tok.fingerprint != got:
        raise CertificateMismatch(
            f"the server at {url} presented a certificate other than the token's: refused",
            details=f"token: {tok.fingerprint}\npresented: {got}\nSomeone may be intercepting "
            "the connection, or the token is for another server.",
            resolution="Check the address, and ask the server's administrator for a new token.",
        )
    if tok is None and not accept_certificate:
        raise UsageError(
            f"the certificate of {url} is not known (fingerprint {got})",
            resolution="Compare it with the server's ('incus info' there shows "
            "certificate_fingerprint), then add again with --accept-certificate, or use "
            "--token with a token from 'incus config trust add' on the server.",
        )
    crt, key = ensure_client_cert(env, log)
    pinned = pinned_cert_path(env, name)
    _write(pinned, ssl.DER_cert_to_PEM_cert(der).encode(), 0o644)
    ep = Endpoint(url=url, client_cert=(str(crt), str(key)), fingerprint=got, name=name)
    try:
        with IncusClient(ep, timeout=30) as c:
            trusted_by = "already"
            if c.get("/1.0").get("auth") != "trusted":
                if tok is None:
                    raise PermissionDenied(
                        f"the server at {url} does not trust coi's client certificate",
                        details=f"coi's certificate: {crt}",
                        resolution="Add again with --token (from 'incus config trust add "
                        f"NAME' on the server), or have the administrator trust {crt}.",
                    )
                _redeem(c, tok, name)
                trusted_by = "token"
                c.__dict__.pop("server", None)
                if c.get("/1.0").get("auth") != "trusted":
                    raise PermissionDenied(f"the server at {url} did not accept the token")
            created = _ensure_project(c, project, log) if project else False
            if limits and project:
                _limit_project(c, project, limits, log)
    except BaseException:
        pinned.unlink(missing_ok=True)
        raise
    data = _load(env)
    data["remotes"][name] = {"addr": url, "fingerprint": got, "project": project}
    _save(env, data)
    return Added(name, url, got, project, trusted_by, created)


def _redeem(c: Any, tok: Token, name: str) -> None:
    """POST /1.0/certificates with the token. A server with the `explicit_trust_token`
    extension (LXD 5.21+) reads only `trust_token` and refuses `password`; without it, LXD
    5.0 reads the token from `password` while Incus (which dropped passwords at its fork,
    with no extension to say so) reads `trust_token`: both are sent, each server ignores the
    field it does not know."""
    body: dict[str, Any] = {"type": "client", "name": tok.client_name or name}
    body["trust_token"] = tok.raw
    if not c.has_extension("explicit_trust_token"):
        body["password"] = tok.raw
    try:
        c.request("POST", "/1.0/certificates", json=body)
    except BackendError as err:
        raise PermissionDenied(
            "the server refused the trust token",
            details=err.message,
            resolution="Tokens are for one use and expire: ask for a new one ('incus config "
            "trust add NAME' on the server).",
        ) from err


def _ensure_project(c: Any, project: str, log: Log) -> bool:
    """Make `project` when missing (sharing the default project's images, profiles and
    networks); False when it was there. A user who may not make it is told so."""
    if project == "default" or c.projects.exists(project):
        return False
    try:
        c.projects.create(
            project,
            config={
                "features.images": "false",
                "features.profiles": "false",
                "features.networks": "false",
                "features.storage.volumes": "false",
            },
            description="coi sandboxes",
        )
    except BackendError as err:
        raise PermissionDenied(
            f"the project '{project}' does not exist and the server did not let coi make it",
            details=err.message,
            resolution="Ask the administrator for a project, then add the remote with "
            "--project NAME.",
        ) from err
    log(f"Made the project {project} on the server")
    return True


LIMIT_KEY = re.compile(r"limits\.[a-z0-9][a-z0-9.-]*")


def check_limits(limits: Mapping[str, str]) -> None:
    """:raises UsageError: a key that is not a project limit (`limits.*`), or no value."""
    for key, value in limits.items():
        if not LIMIT_KEY.fullmatch(key) or not value:
            raise UsageError(
                f"'{key}={value}' is not a project limit",
                resolution="Give limits as limits.KEY=VALUE, for example --limit "
                "limits.instances=5 --limit limits.memory=16GiB (see the server's "
                "'incus project set --help').",
            )


def _limit_project(c: Any, project: str, limits: Mapping[str, str], log: Log) -> None:
    """Set the project's limits (the server checks their values and who may set them)."""
    if project == "default":
        raise UsageError(
            "coi does not set limits on the server's default project",
            resolution="Use a project of your own (--project NAME) for --limit.",
        )
    path = f"/1.0/projects/{quote(project, safe='')}"
    try:
        # PUT of the whole project with the limits merged in: a PATCH of the config alone
        # makes Incus 6.0 reconsider the project's features (and fail on its profiles).
        current = c.get(path)
        body = {
            "config": {**(current.get("config") or {}), **limits},
            "description": current.get("description") or "",
        }
        c.request("PUT", path, json=body)
    except BackendError as err:
        raise PermissionDenied(
            f"the server did not set the limits on the project '{project}'",
            details=err.message,
            resolution="Check the values, or ask the administrator to set them "
            f"('incus project set {project} KEY=VALUE' there).",
        ) from err
    log(f"Project {project}: " + ", ".join(f"{k}={v}" for k, v in sorted(limits.items())))


# -- switching and removing ----------------------------------------------------------------


def switch(name: str, env: Mapping[str, str]) -> str:
    """Make `name` (or 'local') the remote coi uses by default.

    :raises UsageError: no such remote.
    """
    if name != LOCAL and name not in {r.name for r in list_remotes(env)}:
        raise UsageError(
            f"no remote named '{name}'",
            resolution="See 'coi remote list', or add it with 'coi remote add'.",
        )
    data = _load(env)
    data["current"] = "" if name == LOCAL else name
    _save(env, data)
    return name


def remove(name: str, env: Mapping[str, str]) -> bool:
    """Forget coi's remote `name` and its pinned certificate; True when it was current.

    :raises UsageError: coi has no such remote (the incus client's are not coi's to remove).
    """
    data = _load(env)
    if name not in data["remotes"]:
        extra = ""
        if name in {r.name for r in _incus_remotes(env)}:
            extra = " (it is the incus client's: 'incus remote remove " + name + "')"
        raise UsageError(f"coi has no remote named '{name}'{extra}")
    del data["remotes"][name]
    was_current = data.get("current") == name
    if was_current:
        data["current"] = ""
    _save(env, data)
    pinned_cert_path(env, name).unlink(missing_ok=True)
    return was_current
