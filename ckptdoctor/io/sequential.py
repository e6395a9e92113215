"""Read-ahead for value passes over remote objects: aligned windows fetched before they are needed.

A value pass (``diff --values``, digests) walks tensors in file order, one after the other. Read
tensor by tensor, every range waits a full round trip and the link idles in between. Here each
object is read in aligned WINDOW-sized ranges, AHEAD windows past the one being consumed are already
in flight, and a window is dropped once the reader has moved past it: memory stays at
(AHEAD + 2) windows per object whatever its size, and the transfer is the object's bytes once plus at
most AHEAD windows past the last byte used.

Where the storage can fill a buffer itself (``read_window``: http(s), straight from the socket), a
window's buffer is reused for a later window once the reader has moved past it, so a pass over
gigabytes neither allocates nor faults in fresh memory for every window; :meth:`SequentialReader.read`
copies what it returns out of the windows, so no caller ever holds a view of a reused buffer.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

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
        self.windows: dict[int, Future[Any]] = {}
        self._read_window: Callable[[str, int, bytearray], Any] | None = getattr(storage, "read_window", None)
        self._buffers: dict[int, bytearray] = {}  # window -> the buffer its read fills
        self._free: list[bytearray] = []  # buffers of windows left behind, for later windows

    def _want(self, k: int) -> Future[Any] | None:
        if k * WINDOW >= self.size:
            return None
        future = self.windows.get(k)
        if future is None:
            if self._read_window is None:
                future = _pool().submit(self.storage.read_range, self.path, k * WINDOW, WINDOW)
            else:
                buffer = self._buffers[k] = self._free.pop() if self._free else bytearray(WINDOW)
                future = _pool().submit(self._read_window, self.path, k * WINDOW, buffer)
            self.windows[k] = future
        return future

    def _leave(self, k: int) -> None:
        """Window ``k`` is behind the reader: cancel it, and reuse its buffer once no read fills it."""
        future = self.windows.pop(k)
        buffer = self._buffers.pop(k, None)
        if future.cancel() or buffer is None:
            if buffer is not None:
                self._free.append(buffer)
            return
        future.add_done_callback(lambda _f: self._free.append(buffer))

    def _move_to(self, first: int, last: int) -> None:
        """Leave the windows before ``first``; have ``first`` to ``last + AHEAD`` fetched or in flight."""
        for k in list(self.windows):
            if k < first:  # the reader moved past it
                self._leave(k)
        for k in range(first, last + AHEAD + 1):
            self._want(k)

    def _piece(self, k: int, offset: int, length: int) -> Any:
        """The part of window ``k`` inside ``offset .. offset + length`` (waits for the window)."""
        data = self.windows[k].result()
        lo = max(offset, k * WINDOW) - k * WINDOW
        hi = min(offset + length, (k + 1) * WINDOW) - k * WINDOW
        return data if lo == 0 and hi == len(data) else memoryview(data)[lo:hi]

    def _clamp(self, offset: int, length: int) -> tuple[int, int, int]:
        """(length inside the object, first window, last window)."""
        length = max(0, min(length, self.size - offset))
        return length, offset // WINDOW, (offset + max(length, 1) - 1) // WINDOW

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` (fewer at the end of the object), copied out of the windows."""
        length, first, last = self._clamp(offset, length)
        if length == 0:
            return b""
        self._move_to(first, last)
        parts = [self._piece(k, offset, length) for k in range(first, last + 1)]
        if len(parts) == 1 and isinstance(parts[0], bytes):
            return parts[0]  # a whole window fetched as bytes (not a reused buffer): nothing to copy
        return b"".join(parts)

    def views(self, offset: int, length: int) -> Iterator[memoryview]:
        """The bytes :meth:`read` returns, as views of the windows themselves: nothing is copied.

        Each view is valid only until the next one is asked for (its window is then left behind
        and its buffer reused), so a caller compares or hashes a view before moving on.
        """
        length, first, last = self._clamp(offset, length)
        if length == 0:
            return
        for k in range(first, last + 1):
            self._move_to(k, last)
            yield memoryview(self._piece(k, offset, length))

    def close(self) -> None:
        for future in self.windows.values():
            future.cancel()
        self.windows.clear()
        self._buffers.clear()
        self._free.clear()


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
