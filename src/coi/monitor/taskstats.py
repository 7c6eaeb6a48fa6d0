"""I/O of processes as they exit (the kernel's taskstats over generic netlink); needs root.

A sweep reads /proc/<pid>/io of live processes only, so a `dd` that reads 200 MB between two
sweeps would leave no trace. The kernel sends each exiting task's totals (bytes read and
written) to taskstats listeners; the monitor adds those of the container's processes.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

from coi.monitor.netlink import NetlinkReader
from coi.monitor.netlink import attr as _attr
from coi.monitor.netlink import attrs as _attrs

NETLINK_GENERIC = 16
GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID = 1
CTRL_ATTR_FAMILY_NAME = 2
TASKSTATS_CMD_GET = 1
TASKSTATS_CMD_ATTR_REGISTER_CPUMASK = 3
TASKSTATS_TYPE_PID = 1
TASKSTATS_TYPE_STATS = 3
TASKSTATS_TYPE_AGGR_PID = 4
NLM_F_REQUEST = 1
_NLMSG = struct.Struct("=IHHII")
_GENL = struct.Struct("=BBH")
# Offsets in struct taskstats (linux/taskstats.h, stable since version 4 on 64-bit).
_OFF_COMM, _OFF_PID, _OFF_READ, _OFF_WRITE = 80, 128, 216, 224


@dataclass(frozen=True)
class Exit:
    pid: int
    comm: str
    read_bytes: int  # read_char: bytes read through read(2) and friends
    write_bytes: int


def _request(family: int, cmd: int, attrs: bytes) -> bytes:
    body = _GENL.pack(cmd, 1, 0) + attrs
    return _NLMSG.pack(_NLMSG.size + len(body), family, NLM_F_REQUEST, 1, 0) + body


def parse_exits(data: bytes) -> list[Exit]:
    """The per-task exit records in one netlink datagram."""
    out: list[Exit] = []
    off = 0
    while off + _NLMSG.size <= len(data):
        length = _NLMSG.unpack_from(data, off)[0]
        if length < _NLMSG.size:
            break
        top = _attrs(data, off + _NLMSG.size + _GENL.size, off + length)
        nested = top.get(TASKSTATS_TYPE_AGGR_PID)
        if nested is not None:
            inner = _attrs(nested, 0, len(nested))
            stats = inner.get(TASKSTATS_TYPE_STATS, b"")
            if len(stats) >= _OFF_WRITE + 8:
                comm = stats[_OFF_COMM : _OFF_COMM + 32].split(b"\0")[0].decode(errors="replace")
                out.append(
                    Exit(
                        pid=struct.unpack_from("=I", stats, _OFF_PID)[0],
                        comm=comm,
                        read_bytes=struct.unpack_from("=Q", stats, _OFF_READ)[0],
                        write_bytes=struct.unpack_from("=Q", stats, _OFF_WRITE)[0],
                    )
                )
        off += (length + 3) & ~3
    return out


def _family_id(sock: socket.socket) -> int:
    sock.send(
        _request(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, _attr(CTRL_ATTR_FAMILY_NAME, b"TASKSTATS\0"))
    )
    data = sock.recv(65536)
    attrs = _attrs(data, _NLMSG.size + _GENL.size, _NLMSG.unpack_from(data, 0)[0])
    if CTRL_ATTR_FAMILY_ID not in attrs:
        raise OSError("the kernel has no taskstats")
    return int(struct.unpack_from("=H", attrs[CTRL_ATTR_FAMILY_ID])[0])


class ExitWatcher(NetlinkReader):
    """Calls `on_exit` for every task that exits on this machine (the caller filters)."""

    name = "coi-exit-watch"

    def __init__(self, on_exit: Callable[[Exit], None]) -> None:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
        sock.bind((0, 0))
        family = _family_id(sock)
        cpus = f"0-{(os.cpu_count() or 1) - 1}\0".encode()
        sock.send(
            _request(family, TASKSTATS_CMD_GET, _attr(TASKSTATS_CMD_ATTR_REGISTER_CPUMASK, cpus))
        )
        super().__init__(sock)
        self.on_exit = on_exit

    def handle(self, data: bytes) -> None:
        for ex in parse_exits(data):
            self.on_exit(ex)
