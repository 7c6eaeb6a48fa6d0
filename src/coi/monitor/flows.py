"""Every new connection of the container as the kernel tracks it (`conntrack -E`); needs root.

A sweep of /proc/<init>/net sees only connections alive at that moment; a metadata request or
a quick upload lasts milliseconds. Connection tracking reports each new flow as it starts.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
from collections.abc import Callable

from coi.monitor.collect import Conn

_EVENT = re.compile(
    r"\[NEW\]\s+(?P<proto>tcp|udp)\s.*?src=(?P<src>\S+)\s+dst=(?P<dst>\S+)\s+"
    r"sport=(?P<sport>\d+)\s+dport=(?P<dport>\d+)"
)


def available() -> bool:
    return os.geteuid() == 0 and shutil.which("conntrack") is not None


def parse_event(line: str) -> Conn | None:
    m = _EVENT.search(line)
    if not m:
        return None
    state = "SYN_SENT" if m["proto"] == "tcp" else "UDP"
    return Conn(m["proto"], f"{m['src']}:{m['sport']}", f"{m['dst']}:{m['dport']}", state, -1)


class FlowWatcher:
    """Calls `on_flow` with each new flow whose source is the container's address."""

    def __init__(self, source_ip: str, on_flow: Callable[[Conn], None]) -> None:
        self.on_flow = on_flow
        self.proc = subprocess.Popen(
            ["conntrack", "-E", "-e", "NEW", "-s", source_ip],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self._thread = threading.Thread(target=self._loop, name="coi-flows", daemon=True)

    def _loop(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if conn := parse_event(line):
                self.on_flow(conn)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._thread.join(timeout=2)
