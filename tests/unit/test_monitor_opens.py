"""The open watcher's pure parts: fanotify's event records, and which paths go further."""

from __future__ import annotations

import struct

from coi.monitor import detect
from coi.monitor.collect import Proc
from coi.monitor.fanwatch import _META, FAN_OPEN, FAN_Q_OVERFLOW, credential_shaped, parse


def test_events_are_parsed() -> None:
    one = _META.pack(_META.size, 3, 0, _META.size, FAN_OPEN, 7, 4242)
    overflow = _META.pack(_META.size, 3, 0, _META.size, FAN_Q_OVERFLOW, -1, 0)
    assert parse(one + overflow) == [(FAN_OPEN, 7, 4242), (FAN_Q_OVERFLOW, -1, 0)]
    assert parse(one[:10]) == []  # a truncated record is not an event
    assert _META.size == struct.calcsize("=IBBHQii") == 24


def test_credential_shaped_paths_go_on_to_the_rules_and_the_rest_stop_here() -> None:
    for path in (
        "/home/code/.ssh/id_rsa", "/home/code/.aws/credentials", "/home/code/.git-credentials",
        "/home/code/.netrc", "/home/code/.config/gh/hosts.yml", "/proc/77/environ",
        "/etc/shadow", "/home/code/.kube/config", "/srv/tls/privkey.pem",
    ):  # fmt: skip
        assert credential_shaped(path), path
        proc = Proc(pid=1, nspid=5, ppid=0, uid=0, cmdline="grep -r x /home/code", start=1)
        proc.files.append(path)
        t = detect.credential_access(proc)
        assert t is not None and t.level == "warning", path
    for path in ("/usr/lib/libc.so.6", "/etc/ld.so.cache", "/home/code/.bashrc",
                 "/workspace/src/main.c", "/etc/ssl/certs/ca-certificates.crt"):  # fmt: skip
        assert not credential_shaped(path), path
    # Its own environment is not another process's.
    me = Proc(pid=1, nspid=5, ppid=0, uid=0, cmdline="cat", start=1, files=["/proc/5/environ"])
    assert detect.credential_access(me) is None
