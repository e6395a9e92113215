"""Real servers on loopback for the remote tests: an HTTP server that honours ``Range``, and moto's S3.

Python's ``http.server`` ignores ``Range``; :class:`RangeServer` serves a directory with
``HEAD``, ``GET`` with single ``bytes=a-b`` / ``a-`` / ``-n`` ranges (206, ``Content-Range``),
directory listings as HTML links (what fsspec's HTTP ``ls`` parses), and logs every request with
the bytes it sent, so tests count requests and bytes from the server's side. Faults are injected
per path: a status code, a truncated body (fewer bytes than ``Content-Length``) or a connection
reset mid-body; a path can also redirect (302) to another. Bodies are sent with ``sendfile`` from
the page cache, as web servers send files: reading a whole 2.4 GB object into memory before its
first byte went out made every whole-object GET wait for it (the bench's fsspec ``get`` baseline).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import socket
import struct
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")
HUB_FILE_RE = re.compile(r"^/[^/]+/([^/]+)/resolve/[^/]+/(.+)$")


def hub_entry(repo: Path, path: str) -> dict[str, Any]:
    """A tree / paths-info entry as the Hub returns it."""
    target = repo / path
    oid = hashlib.sha1(path.encode()).hexdigest()
    if target.is_dir():
        return {"type": "directory", "path": path, "oid": oid}
    return {"type": "file", "path": path, "size": target.stat().st_size, "oid": oid}


@dataclass
class Logged:
    method: str
    path: str
    range: str | None
    status: int
    sent: int


@dataclass
class RangeServer:
    """Serves ``root`` on 127.0.0.1; ``faults[path] = 403 | 404 | 500 | "truncate" | "reset"``."""

    root: Path
    log: list[Logged] = field(default_factory=list)
    faults: dict[str, Any] = field(default_factory=dict)
    fail_times: dict[str, int] = field(default_factory=dict)  # a fault for the first N requests only
    redirects: dict[str, str] = field(default_factory=dict)  # path -> the Location a 302 sends it to

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                with server._lock:
                    server._open.add(self.connection)

            def finish(self) -> None:
                with server._lock:
                    server._open.discard(self.connection)
                super().finish()

            def do_HEAD(self) -> None:
                self._serve(head=True)

            def do_GET(self) -> None:
                if self.path.startswith("/api/models/"):
                    self._hub_api(None)
                    return
                self._serve(head=False)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self._hub_api(self.rfile.read(length).decode())

            def _json(self, status: int, doc: Any) -> None:
                body = json.dumps(doc).encode()
                self._record(status, len(body))
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _hub_api(self, form: str | None) -> None:
                """The Hub's file endpoints HfFileSystem uses: repo info, paths-info, tree (one page)."""
                parts = urllib.parse.urlsplit(self.path).path.split("/")  # '', api, models, org, name, ...
                repo = server.root / urllib.parse.unquote(parts[4]) if len(parts) > 4 else None
                if repo is None or not repo.is_dir():
                    self._json(404, {"error": "Repository not found"})
                    return
                if len(parts) <= 6:  # /api/models/org/name[/revision/rev]
                    self._json(200, {"id": f"{parts[3]}/{parts[4]}", "sha": "0" * 40, "siblings": []})
                    return
                if parts[5] == "paths-info" and form is not None:
                    wanted = urllib.parse.parse_qs(form).get("paths", [])
                    self._json(200, [hub_entry(repo, p) for p in wanted if (repo / p).exists()])
                    return
                if parts[5] == "tree":
                    inside = urllib.parse.unquote("/".join(parts[7:]))
                    folder = repo / inside
                    entries = [hub_entry(repo, str(c.relative_to(repo))) for c in sorted(folder.iterdir())]
                    self._json(200, entries)
                    return
                self._json(404, {"error": "unknown endpoint"})

            def _record(self, status: int, sent: int) -> None:
                with server._lock:
                    server.log.append(Logged(self.command, self.path, self.headers.get("Range"), status, sent))

            def _fault(self) -> Any:
                fault = server.faults.get(self.path)
                if fault is None:
                    return None
                with server._lock:
                    left = server.fail_times.get(self.path)
                    if left is not None:
                        if left <= 0:
                            return None
                        server.fail_times[self.path] = left - 1
                return fault

            def _serve(self, head: bool) -> None:
                if self.path in server.redirects:
                    self.send_response(302)
                    self.send_header("Location", server.redirects[self.path])
                    self.send_header("Content-Length", "0")
                    self._record(302, 0)
                    self.end_headers()
                    return
                fault = self._fault()
                if isinstance(fault, int):
                    body = b"denied" if fault == 403 else b"failure"
                    self.send_response(fault)
                    self.send_header("Content-Length", str(len(body)))
                    self._record(fault, 0)
                    self.end_headers()
                    if not head:
                        self.wfile.write(body)
                    return
                target = server.root / self.path.lstrip("/").split("?", 1)[0]
                hub = HUB_FILE_RE.match(self.path.split("?", 1)[0])
                if hub is not None:  # /org/name/resolve/revision/path: the Hub's file URL
                    target = server.root / urllib.parse.unquote(hub.group(1)) / urllib.parse.unquote(hub.group(2))
                path = self.path.split("?", 1)[0]
                if target.is_dir() and hub is None and not path.endswith("/"):
                    # as web servers do (nginx, Apache, http.server): a directory's URL without
                    # the slash redirects to its listing
                    self.send_response(301)
                    self.send_header("Location", path + "/")
                    self.send_header("Content-Length", "0")
                    self._record(301, 0)
                    self.end_headers()
                    return
                if target.is_dir():
                    names = sorted(p.name for p in target.iterdir() if p.is_file())
                    body = "".join(f'<a href="{n}">{n}</a>\n' for n in names).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html")
                    self.send_header("Content-Length", str(len(body)))
                    self._record(200, 0 if head else len(body))
                    self.end_headers()
                    if not head:
                        self.wfile.write(body)
                    return
                if not target.is_file():
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self._record(404, 0)
                    self.end_headers()
                    return
                size = target.stat().st_size
                start, end, status = 0, size, 200
                wanted = self.headers.get("Range")
                if wanted:
                    match = RANGE_RE.match(wanted.strip())
                    if match is None or (not match.group(1) and not match.group(2)):
                        self.send_response(416)
                        self.send_header("Content-Length", "0")
                        self._record(416, 0)
                        self.end_headers()
                        return
                    a, b = match.group(1), match.group(2)
                    if a:
                        start, end = int(a), min(size, int(b) + 1) if b else size
                    else:
                        start, end = max(0, size - int(b)), size
                    status = 206
                self.send_response(status)
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(end - start))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
                if head:
                    self._record(status, 0)
                    self.end_headers()
                    return
                self.end_headers()
                if fault in ("truncate", "reset"):
                    with open(target, "rb") as f:
                        f.seek(start)
                        data = f.read((end - start) // 2)
                    self._record(status, len(data))
                    self.wfile.write(data)
                    self.wfile.flush()
                    if fault == "reset":  # RST instead of FIN: SO_LINGER with a zero timeout
                        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    return
                self._record(status, end - start)  # logged before sending: the client may finish first
                with open(target, "rb") as f:  # streamed from the page cache, as web servers do
                    self.connection.sendfile(f, start, end - start)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def reset(self) -> None:
        with self._lock:
            self.log.clear()
            self.faults.clear()
            self.fail_times.clear()
            self.redirects.clear()

    def gets(self) -> list[Logged]:
        with self._lock:
            return [e for e in self.log if e.method == "GET"]

    def close_idle(self) -> None:
        """Close every open connection, as a server does with kept-alive connections left idle too long."""
        with self._lock:
            kept = list(self._open)
        for conn in kept:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def s3_environment(port: int) -> dict[str, str]:
    return {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true"}


def build_zoo(root: Path, names: list[str]) -> Path:
    """Each named zoo fixture in its own folder under ``root`` (``root/name/<its file or directory>``)."""
    from tests import zoo

    for name in names:
        (root / name).mkdir()
        zoo.build(name, root / name)
    return root


def fixture_path(root: Path, name: str) -> Path:
    """The file or directory the zoo fixture ``name`` wrote under ``root``."""
    (only,) = list((root / name).iterdir())
    return only


def upload_tree(fs: Any, local: Path, url: str) -> None:
    """Copy a file or a directory's files to ``url`` with the given fsspec filesystem."""
    if local.is_dir():
        for name in sorted(os.listdir(local)):
            if (local / name).is_file():
                fs.put_file(str(local / name), f"{url}/{name}")
    else:
        fs.put_file(str(local), url)


@dataclass
class Fault:
    """What :class:`FaultProxy` does to a request whose method is ``method`` and whose path contains ``match``.

    ``action`` is ``"reset"`` (read half the body, then close the connection with a TCP reset: the client
    sees the connection die mid-upload) or an HTTP status the proxy answers itself (the store refusing).
    ``after`` lets that many matching requests through first, so a fault can start mid-way through a run.
    """

    method: str
    match: str
    action: str | int
    after: int = 0
    seen: int = 0


@dataclass
class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of a real server (moto's S3), failing chosen requests.

    Every request is read whole, forwarded to ``upstream`` over a fresh connection and its response relayed,
    unless a :class:`Fault` matches it. The log holds ``(method, path, outcome)`` for every request, so a test
    can see that the fault fired and what the client did next (retries, an aborted multipart upload), and the
    response bytes it relayed (a server-side count for stores whose own server keeps no log).
    """

    upstream: str  # host:port
    faults: list[Fault] = field(default_factory=list)
    log: list[tuple[str, str, str, int]] = field(default_factory=list)  # method, path, outcome, body bytes sent
    spans: list[tuple[str, float, float]] = field(default_factory=list)  # path, start, end of each relayed request

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    parts = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            self.rfile.readline()
                            return b"".join(parts)
                        parts.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _fault(self) -> Fault | None:
                with proxy._lock:
                    for fault in proxy.faults:
                        if fault.method == self.command and fault.match in self.path:
                            fault.seen += 1
                            if fault.seen > fault.after:
                                return fault
                return None

            def _note(self, outcome: str, sent: int = 0) -> None:
                with proxy._lock:
                    proxy.log.append((self.command, self.path, outcome, sent))

            def _handle(self) -> None:
                fault = self._fault()
                if fault is not None and fault.action == "reset":
                    self.rfile.read(int(self.headers.get("Content-Length") or 0) // 2)
                    self._note("reset")
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    return
                body = self._body()
                if fault is not None:
                    status = int(fault.action)
                    reply = (f"<Error><Code>InternalError</Code><Message>injected {status}</Message></Error>"
                             if status >= 500 else "<Error><Code>AccessDenied</Code></Error>").encode()
                    self._note(str(status))
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(reply)))
                    self.end_headers()
                    self.wfile.write(reply)
                    return
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("transfer-encoding", "connection", "content-length")}
                headers["Content-Length"] = str(len(body))
                host, port = proxy.upstream.rsplit(":", 1)
                conn = http.client.HTTPConnection(host, int(port), timeout=60)
                start = time.perf_counter()
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    response = conn.getresponse()
                    payload = response.read()
                    self._note(str(response.status), 0 if self.command == "HEAD" else len(payload))
                    self.send_response(response.status)
                    for key, value in response.getheaders():
                        if key.lower() not in ("transfer-encoding", "connection", "content-length", "server",
                                               "date"):
                            self.send_header(key, value)
                    # a HEAD's Content-Length is the object's size, not this (empty) body's
                    length = response.getheader("Content-Length") if self.command == "HEAD" else None
                    self.send_header("Content-Length", length or str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                finally:
                    conn.close()
                    with proxy._lock:
                        proxy.spans.append((self.path, start, time.perf_counter()))

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def outcomes(self, method: str, match: str) -> list[str]:
        with self._lock:
            return [outcome for m, path, outcome, _sent in self.log if m == method and match in path]

    def most_in_flight(self, match: str) -> int:
        """The most requests whose path contains ``match`` that were being served at one moment."""
        with self._lock:
            events = sorted([(start, 1) for path, start, _end in self.spans if match in path]
                            + [(end, -1) for path, _start, end in self.spans if match in path])
        most = current = 0
        for _when, step in events:
            current += step
            most = max(most, current)
        return most

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)
