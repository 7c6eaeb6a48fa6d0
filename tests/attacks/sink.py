"""Listeners the attack suite adds to the test's own network namespace (tests/netkit.py): they
take what an attack sends and count it, so the table can say how many bytes left.

Run inside the namespace with the host's Python: `ip netns exec NS python3 sink.py COUNTS FILES`.
TCP: a discard service (reads and counts until the peer closes) on the ports below, and an
HTTP server on 8000 that counts what is POSTed and serves GETs from a folder (a package
index); UDP: discard on 9. Every 0.2 s the counts are written to COUNTS (a JSON object,
replaced atomically): "counts", keyed "proto port peer"; "conns", keyed "proto port peer
peerport" (one TCP connection, or one UDP source port), each [bytes, first, last] (the times,
host clock, of its first and last bytes), so a run can count only the connections it opened,
and see when their bytes came; and "at", when the counts were taken.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable

DISCARD_TCP = (9, 21, 53, 2222, 8443)
HTTP_PORT = 8000
DISCARD_UDP = (9,)

counts: dict[str, int] = {}
conns: dict[str, list[float]] = {}
FILES = os.path.realpath(sys.argv[2]) if len(sys.argv) > 2 else "/nonexistent"
lock = threading.Lock()


def add(key: str, n: int, conn: str = "") -> None:
    now = time.time()
    with lock:
        counts[key] = counts.get(key, 0) + n
        if conn:
            c = conns.setdefault(conn, [0, now, now])
            c[0] += n
            if n:
                c[2] = now


def discard(conn: socket.socket, key: str, ckey: str) -> None:
    conn.settimeout(120)  # a held reverse shell is closed by its sandbox's end anyway
    try:
        while data := conn.recv(65536):
            add(key, len(data), ckey)
    except OSError:
        pass
    conn.close()


def http(conn: socket.socket, key: str, ckey: str) -> None:
    """One request: a GET of a file under FILES, or a POST (Content-Length bytes, counted)."""
    conn.settimeout(120)
    buf = b""
    try:
        while b"\r\n\r\n" not in buf:
            data = conn.recv(65536)
            if not data:
                return
            buf += data
        head, _, body = buf.partition(b"\r\n\r\n")
        if head.startswith(b"GET "):
            name = head.split()[1].decode().lstrip("/")
            path = os.path.realpath(os.path.join(FILES, name))
            if not path.startswith(FILES + "/") or not os.path.isfile(path):
                conn.sendall(b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                return
            with open(path, "rb") as f:
                data = f.read()
            conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(data) + data)
            return
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        got = len(body)
        add(key, got, ckey)
        while got < length and (data := conn.recv(65536)):
            got += len(data)
            add(key, len(data), ckey)
        conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
    except (OSError, ValueError):
        pass
    finally:
        conn.close()


def serve_tcp(port: int, handler: Callable[[socket.socket, str, str], None]) -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(64)
    while True:
        conn, peer = srv.accept()
        key = f"tcp {port} {peer[0]}"
        ckey = f"{key} {peer[1]}"
        add(key, 0, ckey)
        threading.Thread(target=handler, args=(conn, key, ckey), daemon=True).start()


def serve_udp(port: int) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", port))
    while True:
        data, peer = s.recvfrom(65536)
        add(f"udp {port} {peer[0]}", len(data), f"udp {port} {peer[0]} {peer[1]}")


def main() -> None:
    out = sys.argv[1]
    for p in DISCARD_TCP:
        threading.Thread(target=serve_tcp, args=(p, discard), daemon=True).start()
    threading.Thread(target=serve_tcp, args=(HTTP_PORT, http), daemon=True).start()
    for p in DISCARD_UDP:
        threading.Thread(target=serve_udp, args=(p,), daemon=True).start()
    while True:
        with lock:
            blob = json.dumps({"counts": counts, "conns": conns, "at": time.time()})
        with open(out + ".tmp", "w") as f:
            f.write(blob)
        os.replace(out + ".tmp", out)
        time.sleep(0.2)


if __name__ == "__main__":
    main()
