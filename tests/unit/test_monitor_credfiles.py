"""Credential hunting by what a process has open (its fds, read from the host)."""

from __future__ import annotations

import pytest

from coi.monitor import detect
from coi.monitor.collect import Proc


def _proc(*files: str, nspid: int = 40, cmd: str = "kworker") -> Proc:
    p = Proc(pid=9000, nspid=nspid, ppid=1, uid=1000, cmdline=cmd, start=1)
    p.files.extend(files)
    return p


@pytest.mark.parametrize(
    "path",
    [
        "/home/code/.ssh/id_ed25519",
        "/root/.ssh/id_rsa",
        "/home/code/.aws/credentials",
        "/home/code/.config/gcloud/legacy_credentials/me/adc.json",
        "/home/code/.kube/config",
        "/home/code/.docker/config.json",
        "/home/code/.git-credentials",
        "/home/code/.netrc",
        "/home/code/.npmrc",
        "/home/code/.pypirc",
        "/home/code/.config/gh/hosts.yml",
        "/home/code/.gnupg/private-keys-v1.d/ABCD.key",
        "/home/code/.password-store/bank.gpg",
        "/home/code/.local/share/keyrings/login.keyring",
        "/home/code/.mozilla/firefox/x1y2.default/key4.db",
        "/home/code/.mozilla/firefox/x1y2.default/logins.json",
        "/home/code/.config/google-chrome/Default/Login Data",
        "/home/code/.config/chromium/Local State",
        "/etc/letsencrypt/live/site/privkey.pem",
        "/srv/tls/server-key.pem",
        "/home/code/certs/client.p12",
        "/etc/shadow",
        "/home/code/.env",  # outside the workspace
        "/proc/1/environ",  # another process's environment
    ],
)
def test_credential_shaped_open_files_are_a_hunt_whatever_the_command_line(path: str) -> None:
    t = detect.credential_access(_proc(path))
    assert t is not None and (t.level, t.category) == ("warning", "credential_scan")
    assert t.evidence["files"] == [path]


@pytest.mark.parametrize(
    "path",
    [
        "/etc/ssl/certs/ca-certificates.crt",
        "/usr/lib/ssl/cert.pem",  # the CA bundle every TLS client opens
        "/workspace/.env",  # the project's own
        "/workspace/src/keyboard.py",
        "/proc/40/environ",  # its own environment
        "/home/code/.cache/pip/http/x",
        "socket:[1234]",
    ],
)
def test_ordinary_open_files_are_not(path: str) -> None:
    assert detect.credential_access(_proc(path)) is None
