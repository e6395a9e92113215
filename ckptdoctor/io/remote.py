"""Every remote protocol through fsspec: range reads, listings and uploads, counted and retried.

One :class:`FsspecStorage` per protocol (``s3``, ``gs``, ``hf``, ``https``...). Each verb maps to
the fewest requests the backend allows: ``kind``/``size`` share one metadata lookup per object
(cached), ``read_range`` is one ranged GET, ``read_ranges`` hands all ranges to the backend's
concurrent ``cat_ranges``. Transient failures (dropped connections, timeouts, 5xx) are retried with
backoff; what is left becomes one typed error naming the URL, never a credential.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from ckptdoctor.errors import CkptDoctorError, InputNotFound, OutputError, RemoteError, UsageError
from ckptdoctor.io.storage import COUNTERS

T = TypeVar("T")
ATTEMPTS = 4
BACKOFF = 0.25  # seconds, doubled after every failed attempt
# An upload is retried once as a whole: the backends already retry each request (s3fs five times per
# part), and sending gigabytes again and again only delays the error.
UPLOAD_ATTEMPTS = 2
TIMEOUT = 60.0  # seconds per request, where the backend takes one
HEAD_KEPT = 1 << 20  # a first range of an object up to this size is kept for later reads inside it
MAX_HEADS = 4096
MAX_HTTP_THREADS = 16  # ranges of several http(s) objects read at once (shard headers)
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "hf": "hf", "http": "http", "https": "http"}


def _fsspec_filesystem(protocol: str, url: str) -> Any:
    try:
        import fsspec  # noqa: PLC0415 - only URLs need it
    except ImportError:
        raise UsageError(f"reading {protocol}:// URLs needs fsspec", path=url,
                         hint='pip install "ckptdoctor[remote]"') from None
    extra = EXTRAS.get(protocol, "remote")
    try:
        cls = fsspec.get_filesystem_class(protocol)
    except ImportError as exc:
        raise UsageError(f"the {protocol}:// protocol needs a package that is not installed ({exc})"[:300],
                         path=url, hint=f'pip install "ckptdoctor[{extra}]"') from None
    except ValueError:
        raise UsageError(f"unknown protocol {protocol}://", path=url,
                         hint='ckptdoctor reads local paths, s3://, gs://, hf://, https:// and any protocol '
                              'fsspec knows; pip install "ckptdoctor[remote]" for the object stores.') from None
    options: dict[str, Any] = {}
    if protocol in ("http", "https"):
        options["client_kwargs"] = {"timeout": _aiohttp_timeout()}
    try:
        return cls(**options)
    except ImportError as exc:
        raise UsageError(f"the {protocol}:// protocol needs a package that is not installed ({exc})"[:300],
                         path=url, hint=f'pip install "ckptdoctor[{extra}]"') from None


def _aiohttp_timeout() -> Any:
    try:
        import aiohttp  # noqa: PLC0415
    except ImportError:
        return None
    return aiohttp.ClientTimeout(total=None, sock_connect=TIMEOUT, sock_read=TIMEOUT)


_HTTP_POOL: ThreadPoolExecutor | None = None


def _http_pool() -> ThreadPoolExecutor:
    """Threads for concurrent http(s) ranges, kept for the process (so are their connections)."""
    global _HTTP_POOL  # noqa: PLW0603 - created on the first concurrent read
    if _HTTP_POOL is None:
        _HTTP_POOL = ThreadPoolExecutor(MAX_HTTP_THREADS, thread_name_prefix="ckptdoctor-http")
    return _HTTP_POOL


def _http_head(url: str) -> dict[str, Any]:
    """One HEAD request: fsspec's HTTP ``info`` turns every failure into "not found", losing 403 and 5xx.

    urllib follows a redirect with a GET, which starts sending the whole object (gigabytes behind a
    redirect to a CDN); the redirect handler here keeps it a HEAD.
    """
    import urllib.error  # noqa: PLC0415
    import urllib.request  # noqa: PLC0415

    class KeepHead(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> Any:
            new = super().redirect_request(req, fp, code, msg, headers, newurl)
            if new is not None:
                new.method = req.get_method()
            return new

    request = urllib.request.Request(url, method="HEAD", headers={"Accept-Encoding": "identity"})
    try:
        with urllib.request.build_opener(KeepHead).open(request, timeout=TIMEOUT) as response:
            length = response.headers.get("Content-Length")
            final = response.geturl()
    except urllib.error.HTTPError as exc:
        exc.close()
        raise
    if final == url + "/":  # a server redirects a directory's URL to its listing, as a browser expects
        return {"name": url, "type": "directory", "size": None}
    return {"name": url, "type": "file", "size": int(length) if length and length.isdigit() else None}


def _status(exc: BaseException) -> int | None:
    """The HTTP status a backend error carries, when it carries one."""
    for attr in ("status", "code", "status_code"):
        value = getattr(exc, attr, None)
        if isinstance(value, int):
            return value
    response = getattr(exc, "response", None)
    if isinstance(response, dict):  # botocore ClientError
        meta = response.get("ResponseMetadata", {})
        if isinstance(meta.get("HTTPStatusCode"), int):
            return int(meta["HTTPStatusCode"])
    if type(exc) is OSError and str(exc).startswith("Forbidden: "):  # gcsfs's 403 carries no status
        return 403
    return None


def _classify(exc: BaseException, url: str, action: str) -> tuple[CkptDoctorError, bool]:
    """(the error to raise, whether trying again may help)."""
    status = _status(exc)
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, FileNotFoundError) or status == 404:
        return InputNotFound("no such object", path=url,
                             hint="Check the bucket, repository and key; the URL names nothing."), False
    if isinstance(exc, PermissionError) or status in (401, 403):
        return InputNotFound("access denied", path=url,
                             hint="Check the store's credentials (AWS_*, GOOGLE_APPLICATION_CREDENTIALS, HF_TOKEN) "
                                  "and that they may read this object."), False
    if status is not None and 400 <= status < 500 and status not in (408, 429):
        return RemoteError(f"the store refused to {action} (HTTP {status})", path=url), False
    transient = status is None or status >= 500 or status in (408, 429)
    if status is not None:
        return RemoteError(f"the store failed to {action} (HTTP {status})", path=url,
                           hint="The store failed; try again later."), transient
    return RemoteError(f"cannot {action}: {text}"[:300], path=url,
                       hint="The store dropped the connection or failed; try again later."), transient


class FsspecStorage:
    """A remote store reached through fsspec (see the module docstring)."""

    remote = True

    def __init__(self, protocol: str, url: str) -> None:
        self.protocol, self._url = protocol, url
        # http(s) sizes and ranges need no fsspec (a HEAD, then http_ranges): its backend, aiohttp,
        # takes ~0.3 s to import, and only a directory's listing page is parsed by it.
        self._http = protocol in ("http", "https")
        self._fs: Any = None if self._http else _fsspec_filesystem(protocol, url)
        self._info: dict[str, dict[str, Any]] = {}
        self._listings: dict[str, tuple[list[str], list[str]]] = {}
        self._heads: dict[str, bytes] = {}  # the first range read of each object (format detection)
        self._lock = threading.Lock()

    @property
    def fs(self) -> Any:
        """The fsspec filesystem (created on first use for http(s))."""
        with self._lock:
            if self._fs is None:
                self._fs = _fsspec_filesystem(self.protocol, self._url)
            return self._fs

    def _range_options(self) -> dict[str, Any]:
        # Synchronous backends (HfFileSystem...) read ranges through a buffered file whose default
        # cache fetches blocks of megabytes; without a cache each read is exactly the range asked for.
        return {} if getattr(self.fs, "async_impl", False) else {"cache_type": "none"}

    def forget(self) -> None:
        """Drop cached sizes, listings and heads (objects may have changed since)."""
        with self._lock:
            self._info.clear()
            self._listings.clear()
            self._heads.clear()
        if self._http:
            from ckptdoctor.io.http_ranges import close_connections  # noqa: PLC0415

            close_connections()
        invalidate = getattr(self._fs, "invalidate_cache", None)
        if invalidate is not None:
            invalidate()

    # -- plumbing -----------------------------------------------------------------------------
    def _call(self, url: str, action: str, fn: Callable[[], T], attempts: int = ATTEMPTS) -> T:
        delay = BACKOFF
        for attempt in range(attempts):
            try:
                return fn()
            except CkptDoctorError:
                raise
            except Exception as exc:
                error, transient = _classify(exc, url, action)
                if not transient or attempt == attempts - 1:
                    raise error from None
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def _stat(self, url: str) -> dict[str, Any]:
        url = url.rstrip("/")
        with self._lock:
            cached = self._info.get(url)
        if cached is not None:
            return cached

        def lookup() -> dict[str, Any]:
            COUNTERS.request()
            if self._http:
                return _http_head(url)
            return dict(self.fs.info(url))

        info = self._call(url, "look it up", lookup)
        with self._lock:
            self._info[url] = info
        return info

    # -- the Storage verbs --------------------------------------------------------------------
    def kind(self, path: str) -> str:
        if self._http and path.endswith("/"):
            return "directory"  # HTTP has no directories; a URL ending in / names a listing page
        kind = self._stat(path).get("type")
        return "directory" if kind == "directory" else "file"

    def size(self, path: str) -> int:
        size = self._stat(path).get("size")
        if not isinstance(size, int):
            raise RemoteError("the store does not tell the object's size", path=path,
                              hint="ckptdoctor reads remote files by byte ranges and needs their size.")
        return size

    def is_file(self, path: str) -> bool:
        try:
            return self.kind(path) == "file"
        except InputNotFound:
            return False

    def read_range(self, path: str, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        end = min(offset + length, self.size(path))
        if end <= offset:
            return b""
        head = self._heads.get(path)
        if head is not None and offset < len(head):
            if end <= len(head):
                return head[offset:end]
            return head[offset:] + self.read_range(path, len(head), end - len(head))

        def fetch() -> bytes:
            COUNTERS.request()
            if self._http:
                from ckptdoctor.io.http_ranges import read  # noqa: PLC0415 - http(s) only

                data = read(path, offset, end - offset, TIMEOUT)
            else:
                data = bytes(self.fs.cat_file(path, start=offset, end=end, **self._range_options()))
            COUNTERS.read(len(data), requests=0)
            return data

        data = self._call(path, "read it", fetch)
        if len(data) != end - offset:
            raise RemoteError(f"asked for bytes {offset}..{end} and received {len(data)} bytes (the object changed "
                              "or the connection dropped)", path=path,
                              hint="The store dropped the connection or failed; try again later.")
        if offset == 0 and end <= HEAD_KEPT:
            with self._lock:
                if len(self._heads) >= MAX_HEADS:
                    self._heads.pop(next(iter(self._heads)))
                self._heads[path] = data
        return data

    def read_window(self, path: str, offset: int, buffer: bytearray) -> memoryview | bytes:
        """Up to ``len(buffer)`` bytes at ``offset`` (fewer only at the end of the object), for read-ahead.

        Over http(s) the bytes are read from the socket into ``buffer`` and a view of it is
        returned (:mod:`ckptdoctor.io.http_ranges`: a value pass moves every byte, and this costs a
        third of fsspec's CPU); other protocols return :meth:`read_range`'s bytes and leave
        ``buffer`` alone. Counted, retried and classified like every other read.
        """
        end = min(offset + len(buffer), self.size(path))
        if end <= offset:
            return b""
        if not self._http:
            return self.read_range(path, offset, end - offset)
        from ckptdoctor.io.http_ranges import read_into  # noqa: PLC0415 - value passes over http(s) only

        view = memoryview(buffer)[:end - offset]

        def fetch() -> None:
            COUNTERS.request()
            COUNTERS.read(read_into(path, offset, view, TIMEOUT), requests=0)

        self._call(path, "read it", fetch)
        return view

    def read_ranges(self, path: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        if len(ranges) <= 1:
            return [self.read_range(path, o, n) for o, n in ranges]
        return self.read_many([(path, o, n) for o, n in ranges])

    def read_many(self, requests: Sequence[tuple[str, int, int]]) -> list[bytes]:
        """Ranges of several objects fetched concurrently (the backend's ``cat_ranges``)."""
        if self._http:  # one ranged GET each, on threads (each with its own kept-alive connection)
            return list(_http_pool().map(lambda r: self.read_range(*r), requests))
        wanted = [(p, o, min(o + n, self.size(p))) for p, o, n in requests]
        live = [(i, p, o, e) for i, (p, o, e) in enumerate(wanted) if e > o]
        out = [b""] * len(wanted)
        if not live:
            return out
        first = live[0][1]

        def fetch() -> list[bytes]:
            COUNTERS.request(len(live))
            got = self.fs.cat_ranges([p for _, p, _, _ in live], [o for _, _, o, _ in live],
                                     [e for _, _, _, e in live], on_error="return")
            for item in got:
                if isinstance(item, BaseException):
                    raise item
            COUNTERS.read(sum(len(b) for b in got), requests=0)
            return [bytes(b) for b in got]

        for (i, p, o, e), data in zip(live, self._call(first, "read it", fetch)):
            if len(data) != e - o:
                raise RemoteError(f"asked for bytes {o}..{e} and received {len(data)} bytes", path=p,
                                  hint="The store dropped the connection or failed; try again later.")
            out[i] = data
        return out

    def _listing(self, path: str) -> tuple[list[str], list[str]]:
        """(files, subdirectories) directly under ``path``, sorted, from one listing request."""
        url = path.rstrip("/")
        with self._lock:
            cached = self._listings.get(url)
        if cached is not None:
            return list(cached[0]), list(cached[1])

        def listing() -> list[dict[str, Any]]:
            COUNTERS.request()
            return list(self.fs.ls(url, detail=True))

        names: list[str] = []
        dirs: list[str] = []
        for entry in self._call(url, "list it", listing):
            name = str(entry["name"]).rstrip("/").rsplit("/", 1)[-1]
            if entry.get("type") == "directory":
                if name and name not in (".", ".."):
                    dirs.append(name)
                continue
            if entry.get("type") != "file":
                continue
            full = self.join(url, name)
            if isinstance(entry.get("size"), int):  # HTTP listings carry no sizes
                with self._lock:
                    self._info.setdefault(full, dict(entry))
            names.append(name)
        names.sort()
        dirs.sort()
        with self._lock:
            self._listings[url] = (names, dirs)
        return list(names), list(dirs)

    def subdirectories(self, path: str) -> list[str]:
        return self._listing(path)[1]

    def list(self, path: str) -> list[str]:
        return self._listing(path)[0]

    def join(self, base: str, *parts: str) -> str:
        return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts if p]])

    # -- outputs ------------------------------------------------------------------------------
    def exists(self, path: str) -> bool:
        def lookup() -> bool:
            COUNTERS.request()
            return bool(self.fs.exists(path))

        return self._call(path, "look it up", lookup)

    def upload(self, local_file: str, url: str, size: int) -> None:
        """Send a finished local file to ``url``; the object appears only once the upload completes.

        S3 and GCS publish an object (single or multipart upload) atomically when it completes, and
        abort leaves nothing; for other protocols the same holds as far as the backend promises it.
        """
        def put() -> None:
            COUNTERS.wrote(size)
            self.fs.put_file(local_file, url)

        try:
            self._call(url, "upload it", put, attempts=UPLOAD_ATTEMPTS)
        except InputNotFound as exc:  # 404: no such bucket; 401/403: these credentials may not write there
            missing = exc.message == "no such object"
            raise OutputError("cannot upload it (no such bucket)" if missing else f"cannot upload it ({exc.message})",
                              path=url, hint="Create the bucket first, or choose another output path." if missing
                              else "Check the store's credentials and that they may write there.") from None
        with self._lock:
            self._info.pop(url.rstrip("/"), None)

    def remove(self, urls: Sequence[str]) -> tuple[str, ...]:
        """Delete objects (a failed or replaced output's); return those that could not be deleted.

        Never raises for a store error: it runs while another error is on its way to the user, and
        the URLs it returns are what that error must name.
        """
        def delete(url: str) -> None:
            COUNTERS.request()
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(url)

        left: tuple[str, ...] = ()
        for url in urls:
            try:
                self._call(url, "delete it", functools.partial(delete, url))
            except CkptDoctorError:
                left += (url,)
            with self._lock:
                self._info.pop(url.rstrip("/"), None)
        with self._lock:
            self._listings.clear()
        return left
