"""Where bytes come from and go to: the local disk or any fsspec URL, behind one small interface.

Readers and writers never call ``open``/``os.stat``/``os.listdir`` themselves; they ask
:func:`storage_for` for the :class:`Storage` that serves a path and use its five verbs
(``size``, ``read_range``, ``read_ranges``, ``list``, ``kind``), so every format works remotely the
day it works locally and every byte is counted once, here (:data:`COUNTERS`, reported as the
``io`` object of every ``--json`` document: cli-contract.md, "Where PATH, SOURCE and OUT may live").

:class:`LocalStorage` keeps the disk's speed (``os.pread`` on a descriptor kept open per file);
:class:`~ckptdoctor.io.remote.FsspecStorage` serves every remote protocol by range requests.
"""

from __future__ import annotations

import io
import os
import re
import stat
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ckptdoctor.errors import CorruptCheckpoint, InputNotFound

URL_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


@dataclass
class IOCounters:
    """Requests issued and bytes moved since the process started (or :meth:`reset`)."""

    requests: int = 0
    bytes_read: int = 0
    bytes_written: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def read(self, nbytes: int, requests: int = 1) -> None:
        with self._lock:
            self.requests += requests
            self.bytes_read += nbytes

    def wrote(self, nbytes: int, requests: int = 1) -> None:
        with self._lock:
            self.requests += requests
            self.bytes_written += nbytes

    def request(self, count: int = 1) -> None:
        """A request that moves no payload (a size lookup, a listing)."""
        with self._lock:
            self.requests += count

    def reset(self) -> None:
        with self._lock:
            self.requests = self.bytes_read = self.bytes_written = 0

    def document(self) -> dict[str, int]:
        with self._lock:
            return {"requests": self.requests, "bytes_read": self.bytes_read, "bytes_written": self.bytes_written}


COUNTERS = IOCounters()


def io_counters() -> dict[str, int]:
    """The ``io`` object of a ``--json`` document."""
    return COUNTERS.document()


class Storage(Protocol):
    """The verbs every reader and writer uses; paths are local paths or URLs of one protocol."""

    remote: bool

    def kind(self, path: str) -> str:
        """``"file"`` or ``"directory"``; raises InputNotFound when there is nothing at ``path``."""

    def size(self, path: str) -> int: ...

    def is_file(self, path: str) -> bool: ...

    def read_range(self, path: str, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` (fewer only at the end of the file)."""

    def read_ranges(self, path: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """Several ``(offset, length)`` ranges of one file, fetched concurrently where that helps."""

    def subdirectories(self, path: str) -> list[str]:
        """Names of the directories (or sub-prefixes) directly inside ``path``, sorted."""

    def list(self, path: str) -> list[str]:
        """Names of the regular files directly inside the directory (or prefix) ``path``, sorted."""

    def join(self, base: str, *parts: str) -> str: ...


class _CountedFile(io.FileIO):
    """A local file whose reads are counted in :data:`COUNTERS` (one request per read issued)."""

    def readinto(self, buffer: Any) -> int | None:
        n = super().readinto(buffer)
        COUNTERS.read(n or 0)
        return n


def open_counted(path: str) -> io.BufferedReader:
    """``open(path, "rb")`` whose reads count in the ``io`` of ``--json`` documents, for the code
    that walks a local file through a file object (``scan``) rather than by ranges."""
    return io.BufferedReader(_CountedFile(path, "rb"))


class LocalStorage:
    """The local disk: ``os.pread`` on descriptors kept open for the process, ``os.scandir``."""

    remote = False

    def __init__(self) -> None:
        self._fds: dict[str, tuple[int, tuple[int, int]]] = {}
        self._lock = threading.Lock()

    def kind(self, path: str) -> str:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise InputNotFound("no such file or directory", path=path) from None
        except OSError as exc:
            raise InputNotFound(f"cannot access ({exc.strerror})", path=path) from None
        if stat.S_ISDIR(st.st_mode):
            return "directory"
        return "file" if stat.S_ISREG(st.st_mode) else "other"

    def size(self, path: str) -> int:
        try:
            return os.path.getsize(path)
        except FileNotFoundError:
            raise InputNotFound("no such file or directory", path=path) from None
        except OSError as exc:
            raise InputNotFound(f"cannot access ({exc.strerror})", path=path) from None

    def is_file(self, path: str) -> bool:
        return os.path.isfile(path)

    def fd(self, path: str) -> int:
        """A read-only descriptor of ``path``, opened once (closed by :meth:`close_all`).

        A kept descriptor is checked against the path's current inode: a file replaced since it
        was opened (an atomic rename over it, as every writer here does) is opened again, never
        read through the stale descriptor of the old file.
        """
        try:
            st = os.stat(path)
        except OSError as exc:
            raise InputNotFound(f"cannot read ({exc.strerror})", path=path) from None
        identity = (st.st_dev, st.st_ino)
        with self._lock:
            kept = self._fds.get(path)
            if kept is not None and kept[1] == identity:
                return kept[0]
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as exc:
                raise InputNotFound(f"cannot read ({exc.strerror})", path=path) from None
            if kept is not None:
                os.close(kept[0])
            self._fds[path] = (fd, identity)
        return fd

    def read_range(self, path: str, offset: int, length: int) -> bytes:
        fd = self.fd(path)
        parts: list[bytes] = []
        got = 0
        requests = 0
        try:
            while got < length:
                piece = os.pread(fd, length - got, offset + got)
                requests += 1
                if not piece:
                    break
                parts.append(piece)
                got += len(piece)
        except OSError as exc:
            raise CorruptCheckpoint(f"cannot read ({exc.strerror})", path=path) from None
        COUNTERS.read(got, max(requests, 1))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def read_ranges(self, path: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        return [self.read_range(path, offset, length) for offset, length in ranges]

    def subdirectories(self, path: str) -> list[str]:
        try:
            with os.scandir(path) as entries:
                return sorted(e.name for e in entries if e.is_dir())
        except OSError as exc:
            raise CorruptCheckpoint(f"the directory cannot be listed ({exc.strerror})", path=path) from None

    def list(self, path: str) -> list[str]:
        try:
            with os.scandir(path) as entries:
                names = sorted(e.name for e in entries if e.is_file())
        except OSError as exc:
            raise CorruptCheckpoint(f"the directory cannot be listed ({exc.strerror})", path=path) from None
        return names

    def join(self, base: str, *parts: str) -> str:
        return os.path.join(base, *parts)

    def close_all(self) -> None:
        with self._lock:
            for fd, _identity in self._fds.values():
                os.close(fd)
            self._fds.clear()


LOCAL = LocalStorage()
_REMOTE: dict[str, Any] = {}
_REMOTE_LOCK = threading.Lock()


def reset_io() -> None:
    """Zero the counters and forget what remote stores told before (a new command starts)."""
    COUNTERS.reset()
    with _REMOTE_LOCK:
        for store in _REMOTE.values():
            store.forget()
        if _REMOTE:
            from ckptdoctor.io.sequential import forget_readers  # noqa: PLC0415

            forget_readers()


def is_url(path: str | os.PathLike[str]) -> bool:
    return isinstance(path, str) and URL_RE.match(path) is not None and not path.startswith("file://")


READ_ONLY_PROTOCOLS = ("http", "https")  # a web server serves files; nothing standard writes them


def is_read_only_url(path: str) -> bool:
    """An http(s) URL: readable by byte ranges, never a place ckptdoctor can write to."""
    match = URL_RE.match(path) if isinstance(path, str) else None
    return match is not None and match.group(1).lower() in READ_ONLY_PROTOCOLS


def folder_of(path: str) -> str:
    """The directory (or prefix) a file path or URL sits in: ``.`` for a bare name, ``/`` at the root.

    For a path naming a whole checkpoint through its index (``model.safetensors.index.json``, DCP's
    ``.metadata``), which stands for that folder."""
    folder, _, _ = path.rpartition("/")
    return folder or ("/" if path.startswith("/") else ".")


def storage_for(path: str) -> Storage:
    """The storage that serves ``path``: the local disk, or fsspec for a URL."""
    match = URL_RE.match(path) if isinstance(path, str) else None
    if match is None or match.group(1) == "file":
        return LOCAL
    protocol = match.group(1).lower()
    with _REMOTE_LOCK:
        store = _REMOTE.get(protocol)
        if store is None:
            from ckptdoctor.io.remote import FsspecStorage  # noqa: PLC0415 - fsspec only for URLs

            store = _REMOTE[protocol] = FsspecStorage(protocol, path)
    return store


def local_path(path: str) -> str:
    """``file://`` URLs as plain paths; everything else unchanged."""
    return path[len("file://"):] if path.startswith("file://") else path


def display_name(path: str) -> str:
    """The last component of a path or URL (for messages and temp names)."""
    return path.rstrip("/").rsplit("/", 1)[-1]
