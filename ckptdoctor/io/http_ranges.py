"""Byte ranges of http(s) objects read straight into the caller's buffer, on kept-alive connections.

Every http(s) range comes here (a size is one HEAD, :func:`ckptdoctor.io.remote._http_head`); only a
directory's listing page is still parsed by fsspec. Why not fsspec's HTTP backend (aiohttp): a value
pass (:mod:`ckptdoctor.io.sequential`) moves every byte of its objects, and aiohttp hands each range
back as a new ``bytes`` joined from the socket's pieces, in freshly faulted-in memory, on one event
loop thread. Measured on loopback (8 MiB ranges of a 2.4 GB object, the tests' Range server in its
own process): fsspec ``cat_file`` 3.2 s wall and 2.2 s CPU; ``http.client`` reading into one reused
buffer 1.7 s and 0.8 s. On a two-core machine that CPU is the wall time of ``diff --values``. And
aiohttp takes ~0.3 s to import, which every ``inspect`` of a URL paid for a few kilobytes.

One connection per (thread, host), reused while the server keeps it alive and closed when a
command starts (:func:`close_connections`); a kept one the server has closed meanwhile is replaced
once at no cost, as browsers and urllib3 do; after any other failure the connection is dropped and
the caller retries on a fresh one. Redirects are followed. A server that ignores
``Range`` (a 200 for a range not at 0) is an error: ckptdoctor reads remote files by ranges only.
"""

from __future__ import annotations

import atexit
import base64
import http.client
import re
import ssl
import threading
import urllib.parse

from ckptdoctor.errors import RemoteError

REDIRECTS = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 5
CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")

STALE = (http.client.RemoteDisconnected, ConnectionResetError, ConnectionAbortedError, BrokenPipeError)

_CONNECTIONS: dict[tuple[int, str, str], http.client.HTTPConnection] = {}
_LOCK = threading.Lock()


class HttpStatusError(OSError):
    """The server answered with an error status (``status`` is read by the error classifier)."""

    def __init__(self, status: int, url: str) -> None:
        super().__init__(f"HTTP {status} for {url}")
        self.status = status


class TruncatedResponse(OSError):
    """The body ended before the bytes its headers promised (a dropped connection, a truncated object)."""


def _connection(scheme: str, netloc: str, timeout: float) -> http.client.HTTPConnection:
    """This thread's connection to ``netloc`` (kept in a table, so none is left to the collector)."""
    key = (threading.get_ident(), scheme, netloc)
    with _LOCK:
        conn = _CONNECTIONS.get(key)
        if conn is None:
            if scheme == "https":
                conn = http.client.HTTPSConnection(netloc, timeout=timeout, context=ssl.create_default_context())
            else:
                conn = http.client.HTTPConnection(netloc, timeout=timeout)
            _CONNECTIONS[key] = conn
        return conn


def _drop(scheme: str, netloc: str) -> None:
    with _LOCK:
        conn = _CONNECTIONS.pop((threading.get_ident(), scheme, netloc), None)
    if conn is not None:
        conn.close()


def close_connections() -> None:
    """Close every kept connection (no read is in flight: a command starts, or the process ends)."""
    with _LOCK:
        kept = list(_CONNECTIONS.values())
        _CONNECTIONS.clear()
    for conn in kept:
        conn.close()


atexit.register(close_connections)  # no socket is left to the collector's ResourceWarning at exit


def _send(scheme: str, netloc: str, target: str, headers: dict[str, str], timeout: float) -> http.client.HTTPResponse:
    """The GET's response, on a fresh connection once more if a kept one turns out closed by the server."""
    conn = _connection(scheme, netloc, timeout)
    kept = conn.sock is not None
    try:
        conn.request("GET", target, headers=headers)
        return conn.getresponse()
    except STALE:
        if not kept:
            raise
    _drop(scheme, netloc)
    conn = _connection(scheme, netloc, timeout)
    conn.request("GET", target, headers=headers)
    return conn.getresponse()


def _headers(parts: urllib.parse.SplitResult, offset: int, end: int) -> dict[str, str]:
    headers = {"Range": f"bytes={offset}-{end - 1}", "Accept-Encoding": "identity"}
    if parts.username is not None:  # as aiohttp does for credentials written into the URL
        token = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(token.encode()).decode()
    return headers


def read_into(url: str, offset: int, buffer: memoryview, timeout: float) -> int:
    """Fill ``buffer`` with the bytes of ``url`` from ``offset`` (one ranged GET); return how many came.

    The caller asks only for bytes inside the object, so anything short of ``len(buffer)`` is a
    :class:`TruncatedResponse`. Error statuses raise :class:`HttpStatusError`.
    """
    asked, end = url, offset + len(buffer)
    for _hop in range(MAX_REDIRECTS + 1):
        parts = urllib.parse.urlsplit(url)
        scheme, netloc = parts.scheme.lower(), parts.hostname or ""
        if parts.port is not None:
            netloc = f"{netloc}:{parts.port}"
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        try:
            response = _send(scheme, netloc, target, _headers(parts, offset, end), timeout)
            if response.status in REDIRECTS and response.getheader("Location"):
                response.read()
                url = urllib.parse.urljoin(url, response.getheader("Location", ""))
                continue
            if response.status >= 400:
                response.read()
                raise HttpStatusError(response.status, url)
            if response.status == 206:
                match = CONTENT_RANGE_RE.match(response.getheader("Content-Range", "").strip())
                if match is None or int(match.group(1)) != offset or int(match.group(2)) >= end:
                    raise _range_ignored(asked, f"a Content-Range of {response.getheader('Content-Range')!r}")
            elif offset != 0 or response.status != 200:
                raise _range_ignored(asked, f"HTTP {response.status}")
            got = _read_body(response, buffer)
            if response.status == 200 and not response.isclosed():
                _drop(scheme, netloc)  # the rest of a whole object is not wanted: close, not drain
            if got < len(buffer):
                raise TruncatedResponse(f"asked for bytes {offset}..{end} and received {got} bytes "
                                        "(the connection closed early)")
            return got
        except BaseException:
            _drop(scheme, netloc)
            raise
    raise RemoteError(f"more than {MAX_REDIRECTS} redirects", path=asked,
                      hint="The server sends the request round in circles; check the URL.")


def read(url: str, offset: int, length: int, timeout: float) -> bytes:
    """``length`` bytes of ``url`` at ``offset`` (one ranged GET), as :func:`read_into` reads them."""
    buffer = bytearray(length)
    read_into(url, offset, memoryview(buffer), timeout)
    return bytes(buffer)


def _range_ignored(url: str, answer: str) -> RemoteError:
    return RemoteError(f"asked for a byte range and the server answered with {answer}"[:300], path=url,
                       hint="ckptdoctor reads remote files by byte ranges; this server does not serve them.")


def _read_body(response: http.client.HTTPResponse, buffer: memoryview) -> int:
    """Read the body into ``buffer`` until it is full or the body ends."""
    got = 0
    try:
        while got < len(buffer):
            n = response.readinto(buffer[got:])
            if not n:
                break
            got += n
    except http.client.IncompleteRead as exc:
        raise TruncatedResponse(f"received {got + len(exc.partial)} bytes, {exc.expected} fewer than the "
                                "headers promised (the connection closed early)") from None
    return got
