"""Read-ahead for value passes over remote objects: aligned windows fetched before they are needed.

A value pass (``diff --values``, digests) walks tensors in file order, one after the other. Read
tensor by tensor, every range waits a full round trip and the link idles in between. Here each
object is read in aligned WINDOW-sized ranges, AHEAD windows past the one being consumed are already
in flight, and a window is dropped once the reader has moved past it: memory stays at
(AHEAD + 2) windows per object whatever its size, and the transfer is the object's bytes once plus at
most AHEAD windows past the last byte used.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

from ckptdoctor.io.storage import Storage

WINDOW = 8 << 20
AHEAD = 4
MAX_OBJECTS = 4

_POOL: ThreadPoolExecutor | None = None
_READERS: OrderedDict[str, SequentialReader] = OrderedDict()
_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _POOL  # noqa: PLW0603 - one pool for the process, created on first remote value read
    if _POOL is None:
        _POOL = ThreadPoolExecutor(2 * AHEAD, thread_name_prefix="ckptdoctor-readahead")
    return _POOL


class SequentialReader:
    """Windows of one object, fetched ahead of a mostly forward-moving reader."""

    def __init__(self, storage: Storage, path: str) -> None:
        self.storage, self.path = storage, path
        self.size = storage.size(path)
        self.windows: dict[int, Future[bytes]] = {}

    def _want(self, k: int) -> Future[bytes] | None:
        if k * WINDOW >= self.size:
            return None
        future = self.windows.get(k)
        if future is None:
            future = _pool().submit(self.storage.read_range, self.path, k * WINDOW, WINDOW)
            self.windows[k] = future
        return future

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` (fewer at the end of the object)."""
        length = max(0, min(length, self.size - offset))
        if length == 0:
            return b""
        first, last = offset // WINDOW, (offset + length - 1) // WINDOW
        for k in list(self.windows):
            if k < first:  # the reader moved past it
                self.windows.pop(k).cancel()
        for k in range(first, last + AHEAD + 1):
            self._want(k)
        parts = []
        for k in range(first, last + 1):
            future = self._want(k)
            if future is None:
                break
            data = future.result()
            lo = max(offset, k * WINDOW) - k * WINDOW
            hi = min(offset + length, (k + 1) * WINDOW) - k * WINDOW
            parts.append(data[lo:hi])
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def close(self) -> None:
        for future in self.windows.values():
            future.cancel()
        self.windows.clear()


def sequential_reader(storage: Storage, path: str) -> SequentialReader:
    """The read-ahead reader of ``path`` (a few objects are kept; the oldest is dropped)."""
    with _LOCK:
        reader = _READERS.get(path)
        if reader is None:
            reader = _READERS[path] = SequentialReader(storage, path)
            while len(_READERS) > MAX_OBJECTS:
                _READERS.popitem(last=False)[1].close()
        _READERS.move_to_end(path)
        return reader


def forget_readers() -> None:
    """Drop every window (a new command starts; objects may have changed)."""
    with _LOCK:
        for reader in _READERS.values():
            reader.close()
        _READERS.clear()
