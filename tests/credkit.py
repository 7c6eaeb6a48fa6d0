"""A stand-in model provider for the credential broker's tests and bench: an HTTPS server
with a throw-away CA, at an address in 203.0.113.0/24 inside a network namespace the test
makes. It records the headers of every request, accepts only the real test key (or the
access token its own token endpoint issued), and refreshes logins at /v1/oauth/token. A
request shaped like a real client's (Anthropic messages, OpenAI responses and chat
completions, Gemini generateContent) gets a canned reply in that API's format, streamed as
server-sent events when asked for, so the real agent CLIs can talk to it. A plain listener on
its port 80 logs every connection: a sandbox allowed only :443 must never reach it.

Nothing is sent anywhere before the namespace, its veth and the host route exist and
`ip route get` shows the address routes into the namespace (the pattern of tests/netkit.py).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import secrets
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from coi.backend import ExecRequest, IncusClient
from coi.network.hostnet import host_networks

NET = ipaddress.ip_network("203.0.113.0/24")  # TEST-NET-3: never a real host

_SERVER = r"""
import http.server, json, socket, socketserver, ssl, sys, threading, time
cert, key, log_path, addr, real_key, refresh_token, new_access, reply = sys.argv[1:9]
log = open(log_path, "a", buffering=1)
state = {"access": None}

def anthropic_events(model):
    msg = {"id": "msg_coi", "type": "message", "role": "assistant", "model": model,
           "content": [], "stop_reason": None, "stop_sequence": None,
           "usage": {"input_tokens": 10, "output_tokens": 1}}
    return [("message_start", {"type": "message_start", "message": msg}),
            ("content_block_start", {"type": "content_block_start", "index": 0,
                                     "content_block": {"type": "text", "text": ""}}),
            ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                     "delta": {"type": "text_delta", "text": reply}}),
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ("message_delta", {"type": "message_delta",
                               "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                               "usage": {"output_tokens": 5}}),
            ("message_stop", {"type": "message_stop"})]

def anthropic_message(model):
    return {"id": "msg_coi", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": reply}], "stop_reason": "end_turn",
            "stop_sequence": None, "usage": {"input_tokens": 10, "output_tokens": 5}}

def responses_events(model):
    now = int(time.time())
    item = {"id": "msg_coi", "type": "message", "role": "assistant", "status": "completed",
            "content": [{"type": "output_text", "text": reply, "annotations": []}]}
    usage = {"input_tokens": 10, "input_tokens_details": {"cached_tokens": 0},
             "output_tokens": 5, "output_tokens_details": {"reasoning_tokens": 0},
             "total_tokens": 15}
    def response(status, output, usage=None):
        return {"id": "resp_coi", "object": "response", "created_at": now, "model": model,
                "status": status, "output": output, "usage": usage,
                "incomplete_details": None, "error": None}
    started = dict(item, status="in_progress", content=[])
    part = {"type": "output_text", "text": "", "annotations": []}
    return [("response.created", {"type": "response.created",
                                  "response": response("in_progress", [])}),
            ("response.in_progress", {"type": "response.in_progress",
                                      "response": response("in_progress", [])}),
            ("response.output_item.added", {"type": "response.output_item.added",
                                            "output_index": 0, "item": started}),
            ("response.content_part.added", {"type": "response.content_part.added",
                                             "item_id": "msg_coi", "output_index": 0,
                                             "content_index": 0, "part": part}),
            ("response.output_text.delta", {"type": "response.output_text.delta",
                                            "item_id": "msg_coi", "output_index": 0,
                                            "content_index": 0, "delta": reply,
                                            "logprobs": []}),
            ("response.output_text.done", {"type": "response.output_text.done",
                                           "item_id": "msg_coi", "output_index": 0,
                                           "content_index": 0, "text": reply,
                                           "logprobs": []}),
            ("response.content_part.done", {"type": "response.content_part.done",
                                            "item_id": "msg_coi", "output_index": 0,
                                            "content_index": 0, "part": item["content"][0]}),
            ("response.output_item.done", {"type": "response.output_item.done",
                                           "output_index": 0, "item": item}),
            ("response.completed", {"type": "response.completed",
                                    "response": response("completed", [item], usage)})]

def chat_chunks(model):
    base = {"id": "chatcmpl-coi", "object": "chat.completion.chunk",
            "created": int(time.time()), "model": model}
    return [(None, dict(base, choices=[{"index": 0, "finish_reason": None,
                                        "delta": {"role": "assistant", "content": reply}}])),
            (None, dict(base, choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}],
                        usage={"prompt_tokens": 10, "completion_tokens": 5,
                               "total_tokens": 15})),
            (None, "[DONE]")]

def chat_completion(model):
    return {"id": "chatcmpl-coi", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": [{"index": 0, "finish_reason": "stop",
                                         "message": {"role": "assistant", "content": reply}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}

def sample(schema):
    # A value that fits a JSON schema (gemini-cli's model router asks for JSON): the first
    # enum value, else a plain value of the type.
    if not isinstance(schema, dict):
        return reply
    if schema.get("enum"):
        return schema["enum"][0]
    kind = str(schema.get("type", "string")).lower()
    if kind == "object":
        props = schema.get("properties") or {}
        return {k: sample(v) for k, v in props.items()}
    if kind == "array":
        return [sample(schema.get("items"))]
    return {"integer": 1, "number": 1, "boolean": False}.get(kind, reply)

def gemini_answer(model, got=None):
    config = (got or {}).get("generationConfig") or {}
    schema = config.get("responseJsonSchema") or config.get("responseSchema")
    text = json.dumps(sample(schema)) if schema else reply
    return {"candidates": [{"content": {"parts": [{"text": text}], "role": "model"},
                            "finishReason": "STOP", "index": 0}],
            "usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": 5,
                              "totalTokenCount": 15},
            "modelVersion": model}

class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def setup(self):
        super().setup()  # headers and body go in separate writes: no Nagle delay between
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    def _answer(self, status, body, ctype="application/json"):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    def _chunk(self, data):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data)); self.wfile.flush()
    def _sse(self, events):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for name, data in events:
            text = data if isinstance(data, str) else json.dumps(data)
            head = f"event: {name}\n" if name else ""
            self._chunk(f"{head}data: {text}\n\n".encode())
        self.wfile.write(b"0\r\n\r\n")
    def _provider(self, path, got):
        # Answers shaped like each provider's API (a request with messages, input or
        # contents, as the real clients send): the canned reply, streamed when asked for.
        model = str(got.get("model") or path.rsplit("/", 1)[-1].split(":")[0])
        stream = got.get("stream") is True
        if path == "/v1/messages/count_tokens":
            self._answer(200, {"input_tokens": 10})
            return True
        if path == "/v1/messages":
            if stream:
                self._sse(anthropic_events(model))
                return True
            self._answer(200, anthropic_message(model))
            return True
        if path == "/v1/responses":
            if stream:
                self._sse(responses_events(model))
                return True
            self._answer(200, responses_events(model)[-1][1]["response"])
            return True
        if path == "/v1/chat/completions":
            if stream:
                self._sse(chat_chunks(model))
                return True
            self._answer(200, chat_completion(model))
            return True
        if path.endswith(":streamGenerateContent"):
            self._sse([(None, gemini_answer(model, got))])
            return True
        if path.endswith(":generateContent"):
            self._answer(200, gemini_answer(model, got))
            return True
        if path.endswith(":countTokens"):
            self._answer(200, {"totalTokens": 10})
            return True
        return False
    def _handle(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        log.write(json.dumps({"method": self.command, "path": self.path,
                              "headers": dict(self.headers.items()), "bytes": len(body)}) + "\n")
        path = self.path.split("?", 1)[0]
        if path == "/v1/oauth/token":
            got = json.loads(body or b"{}")
            grant, token = got.get("grant_type"), got.get("refresh_token")
            if grant == "refresh_token" and token == refresh_token:
                state["access"] = new_access
                return self._answer(200, {"access_token": new_access, "refresh_token": "rt-rotated",
                                          "expires_in": 3600})
            return self._answer(400, {"error": "invalid_grant"})
        if not path.startswith(("/v1/", "/v1beta/")):
            return self._answer(404, {"error": "not found"})
        h = self.headers
        ok = real_key in (h.get("x-api-key"), h.get("x-goog-api-key")) or (
            h.get("authorization") == "Bearer " + real_key) or (
            state["access"] and h.get("authorization") == "Bearer " + state["access"])
        if not ok:
            return self._answer(401, {"type": "error", "error": {"type": "authentication_error",
                                                                 "message": "invalid x-api-key"}})
        try:
            got = json.loads(body) if body else {}
        except ValueError:
            got = {}
        if not isinstance(got, dict):
            got = {}
        if "messages" in got or "contents" in got or "input" in got or ":" in path:
            if self._provider(path, got):
                return
        if self.command == "GET" and path in ("/v1/models", "/v1beta/models"):
            return self._answer(200, {"object": "list", "data": [], "models": [],
                                      "has_more": False})
        if b'"stream": true' in body or b'"stream":true' in body:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(3):
                self._chunk(f"event: delta\ndata: {i}\n\n".encode())
                time.sleep(0.05)
            self.wfile.write(b"0\r\n\r\n")
            return
        return self._answer(200, {"ok": True, "path": self.path})
    do_GET = do_POST = _handle
    def log_message(self, *a): pass

class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True

def canary(port):
    # A plain listener on a port the sandbox must not reach (the allowlist names :443 only):
    # every connection it accepts is logged, so a probe that got through is seen here.
    srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((addr, port)); srv.listen(16)
    while True:
        c, peer = srv.accept()
        log.write(json.dumps({"canary": port, "peer": peer[0]}) + "\n")
        c.close()
threading.Thread(target=canary, args=(80,), daemon=True).start()
srv = S((addr, 443), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
srv.serve_forever()
"""


@dataclass
class StandIn:
    """The running stand-in: its address, CA and what it received."""

    ns: str
    veth: str
    host_side: str
    addr: str
    ca: Path
    log: Path
    key: str  # the real test key the stand-in accepts
    refresh_token: str  # the refresh token its token endpoint accepts
    new_access: str  # the access token it issues for it
    reply: str  # the canned answer of its provider-shaped endpoints
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"https://{self.addr}"

    def _lines(self) -> list[dict[str, object]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line]

    def requests(self) -> list[dict[str, object]]:
        """The HTTPS requests it received, in order."""
        return [r for r in self._lines() if "canary" not in r]

    def canary_hits(self) -> list[dict[str, object]]:
        """Connections accepted on its plain port 80 (a sandbox must not reach it)."""
        return [r for r in self._lines() if "canary" in r]


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def _pick_subnet() -> ipaddress.IPv4Network:
    """A /30 of 203.0.113.0/24 nothing on this machine uses (another run may hold one)."""
    used = host_networks()
    subnets = list(NET.subnets(new_prefix=30))
    for _ in range(64):
        sub = secrets.choice(subnets)
        if not any(sub.overlaps(u) for u in used):
            return sub
    raise RuntimeError("no free /30 in 203.0.113.0/24 on this machine")


def check_route(s: StandIn) -> None:
    """The stand-in's address must route into our namespace, or nothing may be sent."""
    out = subprocess.run(
        ["ip", "-o", "route", "get", s.addr], capture_output=True, text=True, check=True
    ).stdout
    if f" dev {s.veth} " not in out + " ":
        raise RuntimeError(f"{s.addr} does not route into the test namespace: {out.strip()}")


def make_ca(tmp: Path, addr: str) -> tuple[Path, Path, Path]:
    """A throw-away CA and a certificate for `addr` signed by it: (ca, cert, key) PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "coi test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, addr)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(addr))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = tmp / "ca.pem", tmp / "server.pem", tmp / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


def create(tmp: Path) -> StandIn:
    """Namespace, veth, route (checked), CA, then the server: in that order."""
    sub = _pick_subnet()
    host_ip, ns_ip = (str(h) for h in list(sub.hosts())[:2])
    tag = secrets.token_hex(3)
    s = StandIn(
        ns=f"coicred-{tag}",
        veth=f"cc{tag}",
        host_side=f"{host_ip}/30",
        addr=ns_ip,
        ca=tmp / "ca.pem",
        log=tmp / "standin.jsonl",
        key=f"sk-test-{secrets.token_hex(16)}",
        refresh_token=f"rt-test-{secrets.token_hex(16)}",
        new_access=f"at-new-{secrets.token_hex(16)}",
        reply=f"coi-canned-reply-{secrets.token_hex(4)}",
    )
    peer = f"cq{tag}"
    try:
        _run("ip", "netns", "add", s.ns)
        _run("ip", "link", "add", s.veth, "type", "veth", "peer", "name", peer)
        _run("ip", "link", "set", peer, "netns", s.ns)
        _run("ip", "addr", "add", s.host_side, "dev", s.veth)
        _run("ip", "link", "set", s.veth, "up")
        _run("ip", "-n", s.ns, "addr", "add", f"{ns_ip}/30", "dev", peer)
        _run("ip", "-n", s.ns, "link", "set", peer, "up")
        _run("ip", "-n", s.ns, "link", "set", "lo", "up")
        check_route(s)
        _, cert, key = make_ca(tmp, s.addr)
        argv = [str(cert), str(key), str(s.log), s.addr, s.key, s.refresh_token, s.new_access]
        argv.append(s.reply)
        s.procs.append(
            subprocess.Popen(
                ["ip", "netns", "exec", s.ns, sys.executable, "-c", _SERVER, *argv],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        _wait_listening(s)
    except BaseException:
        destroy(s)
        raise
    return s


def _wait_listening(s: StandIn) -> None:
    for _ in range(100):
        out = subprocess.run(
            ["ip", "netns", "exec", s.ns, "ss", "-ltn"], capture_output=True, text=True
        ).stdout
        if f"{s.addr}:443 " in out and f"{s.addr}:80 " in out:
            return
        time.sleep(0.05)
    raise RuntimeError("the stand-in provider did not start")


def destroy(s: StandIn) -> None:
    for p in s.procs:
        p.kill()
        p.wait(timeout=5)
    subprocess.run(["ip", "link", "del", s.veth], capture_output=True)
    subprocess.run(["ip", "netns", "del", s.ns], capture_output=True)


def _pattern(secret: str) -> str:
    """A grep pattern matching `secret` whose own text does not (grep's command line is in
    /proc too)."""
    return f"{secret[:3]}[{secret[3]}]{secret[4:]}"


def find_inside(client: IncusClient, box: str, *found: str, files: bool = True) -> str:
    """Every place inside the sandbox, searched as root, that holds one of `found`: each
    regular file (not /proc, /sys, /dev), each process's environment and command line."""
    pats = " ".join(f"-e {shlex.quote(_pattern(x))}" for x in found)
    script = (
        "find / \\( -path /proc -o -path /sys -o -path /dev \\) -prune -o -type f "
        f"-exec grep -l {pats} {{}} + 2>/dev/null; "
        if files
        else ""
    ) + (
        "for f in /proc/[0-9]*/environ /proc/[0-9]*/cmdline; do "
        f"tr '\\0' '\\n' < $f 2>/dev/null | grep -q {pats} && echo $f; done; true"
    )
    res = client.exec.capture(box, ExecRequest(["sh", "-c", script], user=0))
    assert res.exit_code == 0, res.stderr
    return res.stdout.decode().strip()


def daemon_view(client: IncusClient, box: str) -> str:
    """The container's config and devices as the daemon has them (incus config show
    --expanded), and the proxy device's log."""
    inst = client.get(f"/1.0/instances/{box}")
    logs = ""
    for d in Path("/var/log/incus").glob(f"*_{box}"):
        for f in d.glob("proxy.*"):
            logs += f.read_text(errors="replace")
    return json.dumps(inst) + logs
