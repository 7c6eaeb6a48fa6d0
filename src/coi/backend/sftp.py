"""A minimal SFTP (version 3) client over the daemon's `/1.0/instances/<name>/sftp` upgrade:
the only way to learn an entry's true type and full mode (the files API calls a FIFO or a
device node a "file" and gives permission bits only)."""

from __future__ import annotations

import json
import os
import socket
import struct
from collections import deque
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit

from coi.backend.connection import tls_context
from coi.errors import BackendError, IncusTimeout, NotFound

if TYPE_CHECKING:
    from coi.backend.client import IncusClient

# Packet types (draft-ietf-secsh-filexfer-02, the version every server speaks).
_INIT, _VERSION = 1, 2
_OPEN, _CLOSE, _READ = 3, 4, 5
_LSTAT, _FSTAT = 7, 8
_OPENDIR, _READDIR = 11, 12
_READLINK = 19
_EXTENDED = 200
_STATUS, _HANDLE, _DATA, _NAME, _ATTRS = 101, 102, 103, 104, 105

_FX_OK, _FX_EOF, _FX_NO_SUCH_FILE = 0, 1, 2
_ATTR_SIZE, _ATTR_UIDGID, _ATTR_PERMISSIONS, _ATTR_ACMODTIME = 0x1, 0x2, 0x4, 0x8
_ATTR_EXTENDED = 0x80000000
_FXF_READ = 0x1

READ_SIZE = 32 * 1024  # what servers answer at most per read
_WINDOW = 16  # reads in flight per file: the round trips, not the bytes, bound the speed
_MAX_PACKET = 1024 * 1024
TIMEOUT = 60.0  # seconds without an answer before the pull is abandoned


class SFTPUnavailable(BackendError):
    """The daemon has no SFTP endpoint (an old LXD)."""


@dataclass(frozen=True)
class Attrs:
    """What SFTP says of an entry: the full st_mode (type bits included), size, owner."""

    mode: int | None
    size: int | None
    uid: int | None
    gid: int | None


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise BackendError("malformed SFTP packet from the daemon")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u32(self) -> int:
        return int(struct.unpack(">I", self.take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack(">Q", self.take(8))[0])

    def string(self) -> bytes:
        return self.take(self.u32())

    def attrs(self) -> Attrs:
        flags = self.u32()
        size = self.u64() if flags & _ATTR_SIZE else None
        uid = gid = None
        if flags & _ATTR_UIDGID:
            uid, gid = self.u32(), self.u32()
        mode = self.u32() if flags & _ATTR_PERMISSIONS else None
        if flags & _ATTR_ACMODTIME:
            self.take(8)
        if flags & _ATTR_EXTENDED:
            for _ in range(self.u32()):
                self.string()
                self.string()
        return Attrs(mode=mode, size=size, uid=uid, gid=gid)


def _s(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


class SFTPError(BackendError):
    """The server answered a request with an error status."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class SFTPSession:
    """One SFTP connection to an instance's filesystem (not thread-safe; use in `with`)."""

    def __init__(self, sock: socket.socket, buffered: bytes, where: str) -> None:
        self._sock = sock
        self._buf = bytearray(buffered)
        self._next_id = 0
        self.where = where
        self._send(_INIT, struct.pack(">I", 3))
        ptype, _ = self._recv()
        if ptype != _VERSION:
            raise BackendError(f"SFTP with {where}: no version answer (packet type {ptype})")

    @classmethod
    def open(cls, client: IncusClient, instance: str) -> SFTPSession:
        """Upgrade a fresh connection to the daemon to SFTP on `instance`.

        :raises SFTPUnavailable: the daemon has no such endpoint.
        :raises NotFound: no such instance.
        """
        ep = client.endpoint
        path = f"/1.0/instances/{quote(instance, safe='')}/sftp"
        if client.project != "default":
            path += f"?project={quote(client.project, safe='')}"
        try:
            if ep.socket_path:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(TIMEOUT)
                sock.connect(ep.socket_path)
                host = "incus"
            else:
                url = urlsplit(ep.url or "")
                host = url.hostname or ""
                raw = socket.create_connection((host, url.port or 8443), timeout=TIMEOUT)
                ctx = tls_context(ep)
                sock = ctx.wrap_socket(raw, server_hostname=host)
            sock.sendall(
                f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\n"
                "Upgrade: sftp\r\n\r\n".encode()
            )
            head, rest = _read_head(sock)
        except TimeoutError as err:
            raise IncusTimeout(f"SFTP with {instance}: the daemon did not answer") from err
        except OSError as err:
            raise BackendError(f"SFTP with {instance}: {err}") from err
        status = _status_code(head)
        if status != 101:
            sock.close()
            raise _http_error(status, head, rest, instance)
        return cls(sock, rest, instance)

    def __enter__(self) -> SFTPSession:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    # -- wire -----------------------------------------------------------------------------

    def _send(self, ptype: int, payload: bytes) -> None:
        try:
            self._sock.sendall(struct.pack(">IB", len(payload) + 1, ptype) + payload)
        except TimeoutError as err:
            raise IncusTimeout(f"SFTP with {self.where}: the daemon did not answer") from err
        except OSError as err:
            raise BackendError(f"SFTP with {self.where}: {err}") from err

    def _fill(self, n: int) -> None:
        while len(self._buf) < n:
            try:
                chunk = self._sock.recv(max(65536, n - len(self._buf)))
            except TimeoutError as err:
                raise IncusTimeout(
                    f"SFTP with {self.where}: no answer in {TIMEOUT:.0f} s",
                    details="An entry may have turned into a FIFO between listing and reading.",
                ) from err
            except OSError as err:
                raise BackendError(f"SFTP with {self.where}: {err}") from err
            if not chunk:
                raise BackendError(f"SFTP with {self.where}: the daemon closed the connection")
            self._buf += chunk

    def _recv(self) -> tuple[int, _Reader]:
        self._fill(4)
        (length,) = struct.unpack(">I", self._buf[:4])
        if not 1 <= length <= _MAX_PACKET:
            raise BackendError(f"SFTP with {self.where}: bad packet length {length}")
        self._fill(4 + length)
        body = bytes(self._buf[5 : 4 + length])
        ptype = self._buf[4]
        del self._buf[: 4 + length]
        return ptype, _Reader(body)

    def _request(self, ptype: int, payload: bytes) -> int:
        self._next_id = (self._next_id + 1) & 0xFFFFFFFF
        self._send(ptype, struct.pack(">I", self._next_id) + payload)
        return self._next_id

    def _answer(self, req_id: int, what: str) -> tuple[int, _Reader]:
        ptype, r = self._recv()
        if r.u32() != req_id:
            raise BackendError(f"SFTP with {self.where}: answers out of order")
        if ptype == _STATUS:
            code = r.u32()
            msg = r.string().decode(errors="replace") if code != _FX_OK else ""
            if code not in (_FX_OK, _FX_EOF):
                cls = NotFound if code == _FX_NO_SUCH_FILE else SFTPError
                if cls is NotFound:
                    raise NotFound(f"{self.where}:{what} does not exist")
                raise SFTPError(f"{self.where}:{what}: {msg or f'SFTP status {code}'}", code)
        return ptype, r

    def _call(self, ptype: int, payload: bytes, what: str) -> tuple[int, _Reader]:
        return self._answer(self._request(ptype, payload), what)

    # -- operations -----------------------------------------------------------------------

    def lstat(self, path: str) -> Attrs:
        ptype, r = self._call(_LSTAT, _s(os.fsencode(path)), path)
        if ptype != _ATTRS:
            raise BackendError(f"SFTP with {self.where}: lstat {path} answered {ptype}")
        return r.attrs()

    def readlink(self, path: str) -> bytes:
        ptype, r = self._call(_READLINK, _s(os.fsencode(path)), path)
        if ptype != _NAME or r.u32() < 1:
            return b"?"
        return r.string()

    def listdir(self, path: str) -> list[tuple[bytes, Attrs]]:
        """Every entry of a directory but `.` and `..`, with its attributes."""
        handle = self._handle(_OPENDIR, _s(os.fsencode(path)), path)
        out: list[tuple[bytes, Attrs]] = []
        try:
            while True:
                ptype, r = self._call(_READDIR, _s(handle), path)
                if ptype == _STATUS:  # end of the listing
                    break
                if ptype != _NAME:
                    raise BackendError(f"SFTP with {self.where}: readdir {path} answered {ptype}")
                for _ in range(r.u32()):
                    name = r.string()
                    r.string()  # the long (ls -l) form
                    attrs = r.attrs()
                    if name not in (b".", b".."):
                        out.append((name, attrs))
        finally:
            self._close(handle, path)
        return out

    def rename_over(self, old: str, new: str) -> None:
        """Rename `old` to `new`, replacing what is at `new` in one step (rename(2), through
        the OpenSSH extension every current server has; plain SFTP rename refuses to replace)."""
        self._call(
            _EXTENDED,
            _s(b"posix-rename@openssh.com") + _s(os.fsencode(old)) + _s(os.fsencode(new)),
            new,
        )

    def open_read(self, path: str) -> tuple[bytes, Attrs]:
        """Open a file for reading: its handle, and what the opened file is (fstat): the entry
        may have changed since it was listed."""
        handle = self._handle(_OPEN, _s(os.fsencode(path)) + struct.pack(">II", _FXF_READ, 0), path)
        try:
            ptype, r = self._call(_FSTAT, _s(handle), path)
            if ptype != _ATTRS:
                raise BackendError(f"SFTP with {self.where}: fstat {path} answered {ptype}")
            return handle, r.attrs()
        except BaseException:
            self._close(handle, path)
            raise

    def read_into(self, handle: bytes, path: str, fd: int, size: int) -> int:
        """Copy the first `size` bytes (the size when opened) of an open file to the host file
        descriptor `fd`; bytes copied. A file the agent keeps growing is copied as it was.

        A few reads are in flight at once. An answer shorter than asked (the server's cap, or
        a file cut short meanwhile) makes the answers after it stale: they are dropped and
        reading goes on from where the short one ended, so nothing is skipped or doubled.
        """
        offset = 0
        next_off = 0
        eof = False
        pending: deque[tuple[int, int]] = deque()  # (request id, offset asked)
        while True:
            while not eof and next_off < size and len(pending) < _WINDOW:
                n = min(READ_SIZE, size - next_off)
                req = self._request(_READ, _s(handle) + struct.pack(">QI", next_off, n))
                pending.append((req, next_off))
                next_off += n
            if not pending:
                return offset
            req, asked = pending.popleft()
            ptype, r = self._answer(req, path)
            if asked != offset:
                continue
            if ptype == _STATUS:
                eof = True
                continue
            if ptype != _DATA:
                raise BackendError(f"SFTP with {self.where}: read {path} answered {ptype}")
            data = r.string()[: size - offset]
            if not data:
                eof = True
                continue
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            offset += len(data)
            if offset == next_off or offset >= size:
                continue
            next_off = offset  # short answer: the ones in flight are stale

    def close_handle(self, handle: bytes, path: str) -> None:
        self._close(handle, path)

    def _handle(self, ptype: int, payload: bytes, path: str) -> bytes:
        rtype, r = self._call(ptype, payload, path)
        if rtype != _HANDLE:
            raise BackendError(f"SFTP with {self.where}: open {path} answered {rtype}")
        return r.string()

    def _close(self, handle: bytes, path: str) -> None:
        self._call(_CLOSE, _s(handle), path)


def _read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
        if len(buf) > 65536:
            raise BackendError("SFTP upgrade: the daemon's answer has no end of headers")
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


def _status_code(head: bytes) -> int:
    try:
        return int(head.split(b"\r\n", 1)[0].split()[1])
    except (IndexError, ValueError):
        return 0


def _http_error(status: int, head: bytes, body: bytes, instance: str) -> BackendError:
    try:
        message = str(json.loads(body.decode(errors="replace")).get("error") or "")
    except (ValueError, AttributeError):
        message = body.decode(errors="replace").strip()[:200]
    if status == 404 and "instance" in message.lower():
        return NotFound(f"instance {instance} not found")
    if status in (400, 404, 405, 501):
        return SFTPUnavailable(f"the daemon offers no SFTP on {instance}: {message or status}")
    return BackendError(f"SFTP with {instance}: HTTP {status} {message}", status_code=status)
