"""Fault injection for object-store tests: an HTTP proxy on loopback in front of the moto server.

``FaultProxy`` relays HTTP/1.1 requests from S3 clients (pyarrow, s3fs, boto3) to an upstream
server on 127.0.0.1 and, under test control, answers some of them with a 5xx, resets the
connection before or after forwarding, delays them, or refuses everything (an outage). Faults are
``Rule`` objects matched by method and path; the choice among matching requests is deterministic:
either the Nth matching request, or a fraction decided by a hash of (seed, method, object key, how
many times that method and key were seen), so neither thread interleavings nor the bucket's random
name change which requests fail.
``streak`` caps how often in a row one method+path may fail, which makes a fault transient: a
client that retries that many times always gets through.

The proxy only binds and forwards to loopback addresses, and stops itself after ``lifetime_s``.
"""

from __future__ import annotations

import hashlib
import http.client
import re
import socket
import socketserver
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Callable, Iterator
from urllib.parse import urlsplit

__all__ = ["Rule", "FaultProxy", "FaultyStore", "faulty_store", "ACCESS_DENIED"]

LOOPBACK = ("127.0.0.1", "localhost", "::1")
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}


@dataclass
class Rule:
    """Which requests fail, and how.

    Attributes:
        action: ``"status"`` (answer ``status`` without forwarding), ``"reset"`` (close the connection
            abruptly before forwarding), ``"reset-after"`` (forward, then reset instead of answering:
            the store did the work but the client never hears), ``"delay"`` (sleep ``delay_s``, then
            forward) or ``"outage"`` (start an outage: this and every later request is refused until
            ``restore()``).
        method: match only this HTTP method (GET, PUT, HEAD, POST, DELETE); None matches all.
        path: a regular expression searched in the request target (path and query); None matches all.
        fraction: fail this fraction of matching requests (by a seeded hash, see the module doc).
        nth: fail exactly these matching requests (1-based, counted per rule), instead of a fraction.
        streak: at most this many failures in a row of one method+path (None: unlimited).
        limit: stop after this many failures in all (None: unlimited).
        body: the body of a ``status`` answer; None is an S3 error document (``SlowDown`` for
            503, ``InternalError`` otherwise).
    """

    action: str = "status"
    status: int = 503
    method: str | None = None
    path: str | None = None
    fraction: float = 0.0
    nth: tuple[int, ...] = ()
    seed: int = 0
    streak: int | None = None
    limit: int | None = None
    delay_s: float = 0.0
    body: bytes | None = None
    seen: int = 0
    failed: int = 0
    _streaks: dict[str, int] = field(default_factory=dict)
    _counts: dict[str, int] = field(default_factory=dict)

    def matches(self, method: str, target: str) -> bool:
        return (self.method is None or self.method == method) and (self.path is None or re.search(self.path, target) is not None)

    def decide(self, method: str, target: str) -> bool:
        """Should this (matching) request fail? Updates the counters; call under the proxy's lock."""
        self.seen += 1
        path = target.split("?", 1)[0].split("/", 2)  # ["", bucket, key]: the bucket's name is random per test
        key = f"{method} {path[2] if len(path) > 2 else ''}"
        occurrence = self._counts.get(key, 0)
        self._counts[key] = occurrence + 1
        if self.limit is not None and self.failed >= self.limit:
            fail = False
        elif self.nth:
            fail = self.seen in self.nth
        else:
            digest = hashlib.sha256(f"{self.seed}|{key}|{occurrence}".encode()).digest()
            fail = struct.unpack(">Q", digest[:8])[0] / 2**64 < self.fraction
        if fail and self.streak is not None and self._streaks.get(key, 0) >= self.streak:
            fail = False
        self._streaks[key] = self._streaks.get(key, 0) + 1 if fail else 0
        self.failed += fail
        return fail


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    proxy: "FaultProxy"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.proxy.socket_timeout_s)
        self.upstream: http.client.HTTPConnection | None = None

    def handle(self) -> None:
        if self.server.proxy.down:
            self._reset()
            return
        try:
            super().handle()
        except (ConnectionError, socket.timeout, OSError):
            pass
        finally:
            if self.upstream is not None:
                self.upstream.close()

    def _reset(self) -> None:
        """Close the client's socket with a TCP RST (SO_LINGER 0), as a crashed server would."""
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass
        self.close_connection = True

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _relay(self) -> None:
        proxy = self.server.proxy
        method, target = self.command, self.path
        body = self._body()  # read whole, so a refused request leaves the stream in step
        action = proxy.choose(method, target)
        if action is not None and action.action == "delay":
            time.sleep(action.delay_s)
            action = None
        if action is not None and action.action in ("reset", "outage"):
            self._reset()
            return
        if action is not None and action.action == "status":
            payload = action.body if action.body is not None else (f"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>"
                       f"{'SlowDown' if action.status == 503 else 'InternalError'}</Code>"
                       f"<Message>injected by the test proxy</Message></Error>").encode()
            self.send_response(action.status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(payload)
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP and k.lower() != "content-length"}
        if body or method in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        for attempt in range(2):  # the upstream may have closed an idle keep-alive connection
            if self.upstream is None:
                self.upstream = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=proxy.socket_timeout_s)
            try:
                self.upstream.request(method, target, body=body, headers=headers)
                response = self.upstream.getresponse()
                payload = response.read()
                break
            except (ConnectionError, http.client.HTTPException):
                self.upstream.close()
                self.upstream = None
                if attempt:
                    self._reset()
                    return
        if action is not None and action.action == "reset-after":
            self._reset()
            return
        self.send_response_only(response.status, response.reason)
        for key, value in response.getheaders():
            if key.lower() not in HOP_BY_HOP and key.lower() != "content-length":
                self.send_header(key, value)
        if method == "HEAD":
            length = response.getheader("Content-Length")
            if length is not None:
                self.send_header("Content-Length", length)
        else:
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(payload)
        self.wfile.flush()

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _relay


class FaultProxy:
    """A threaded HTTP proxy on 127.0.0.1 in front of ``upstream`` (``http://127.0.0.1:PORT``).

    Use as a context manager, or ``start()`` / ``stop()``. ``url`` is what clients point at
    (``AWS_ENDPOINT_URL``). Faults: ``add(Rule(...))``, ``clear()``, ``outage()`` / ``restore()``.
    ``requests`` lists every (method, target) seen, in arrival order; ``on_request(method, target)``,
    when set, is called first for each (a hook to act at an exact request).
    """

    def __init__(self, upstream: str, lifetime_s: float = 600.0, socket_timeout_s: float = 30.0) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or parts.hostname not in LOOPBACK or parts.port is None:
            raise ValueError(f"the fault proxy only forwards to http://<loopback>:PORT, not {upstream!r}")
        self.upstream_host, self.upstream_port = parts.hostname, parts.port
        self.lifetime_s = lifetime_s
        self.socket_timeout_s = socket_timeout_s
        self.rules: list[Rule] = []
        self.requests: list[tuple[str, str]] = []
        self.on_request: Callable[[str, str], None] | None = None
        self.down = False
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._threads: list[threading.Thread] = []

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> "FaultProxy":
        server = _Server(("127.0.0.1", 0), _Handler)
        server.proxy = self
        self._server = server
        serving = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True, name="fault-proxy")
        serving.start()
        timer = threading.Timer(self.lifetime_s, self.stop)  # bounded: never outlives a hung test
        timer.daemon = True
        timer.start()
        self._threads = [serving]
        self._timer = timer
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        timer = getattr(self, "_timer", None)
        if timer is not None:
            timer.cancel()

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the fault proxy is not running")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # -- faults -------------------------------------------------------------------------------
    def add(self, rule: Rule) -> Rule:
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        """No more faults (and the end of an outage)."""
        with self._lock:
            self.rules.clear()
            self.down = False

    def outage(self) -> None:
        """Refuse every request (each connection is reset) until ``restore()``."""
        self.down = True

    def restore(self) -> None:
        self.down = False

    def choose(self, method: str, target: str) -> Rule | None:
        """The rule that fails this request, if any (the first matching rule that decides so)."""
        hook = self.on_request
        if hook is not None:
            hook(method, target)
        with self._lock:
            self.requests.append((method, target))
            if self.down:
                return Rule(action="outage")
            for rule in self.rules:
                if rule.matches(method, target) and rule.decide(method, target):
                    if rule.action == "outage":
                        self.down = True
                    return rule
        return None

    def count(self, method: str | None = None, path: str | None = None) -> int:
        """Requests seen so far that match ``method`` and the regular expression ``path``."""
        probe = Rule(method=method, path=path)
        with self._lock:
            return sum(1 for m, t in self.requests if probe.matches(m, t))


# -- the pytest fixture: a bucket behind the proxy --------------------------------------------------

ACCESS_DENIED = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
                 b"<Message>Access Denied</Message></Error>")
TEST_STORE_RETRIES = "4"
"""Retries per store request in these tests: 25+50+100+200 ms of backoff, so an outage fails fast,
while a fault capped at ``streak=2`` in a row always gets through."""


@dataclass
class FaultyStore:
    """A bucket reached through a ``FaultProxy``: ``bucket`` (``s3://NAME``) for softlabels,
    ``proxy`` to set faults, ``direct`` (the moto endpoint) for checks that bypass the faults."""

    proxy: FaultProxy
    bucket: str
    direct: str

    @property
    def name(self) -> str:
        return self.bucket.removeprefix("s3://")

    def client(self):  # type: ignore[no-untyped-def]
        """A boto3 client on the moto server itself, past the proxy."""
        import boto3

        return boto3.client("s3", endpoint_url=self.direct)

    def pending_uploads(self) -> list[str]:
        """Keys of multipart uploads started and neither completed nor aborted."""
        return [u["Key"] for u in self.client().list_multipart_uploads(Bucket=self.name).get("Uploads", [])]

    def keys(self, prefix: str = "") -> list[str]:
        listing = self.client().list_objects_v2(Bucket=self.name, Prefix=prefix)
        return sorted(item["Key"] for item in listing.get("Contents", []))


def faulty_store(endpoint: str, monkeypatch) -> "Iterator[FaultyStore]":  # type: ignore[no-untyped-def]
    """The body of the ``faulty_s3`` fixture (conftest's ``s3_endpoint`` is the moto server)."""
    import uuid

    import boto3

    name = f"faulty-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)
    with FaultProxy(endpoint, lifetime_s=300) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        monkeypatch.setenv("SOFTLABELS_STORE_RETRIES", TEST_STORE_RETRIES)
        yield FaultyStore(proxy, f"s3://{name}", endpoint)
