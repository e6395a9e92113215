"""A read-only, seekable file object over a :class:`~ckptdoctor.io.storage.Storage`.

Parsers written against file objects (``zipfile``, the streaming unpickler) read through it.
It keeps the ranges it has fetched (the caller can :meth:`prefetch` the ones it knows it needs,
e.g. a zip's end records and central directory in one suffix range), and otherwise reads ahead
in blocks that grow with what was read so far, so a sequential parse of an N-byte region costs
O(log N) requests and transfers at most about twice what it consumes.
"""

from __future__ import annotations

import bisect
import io
from typing import Any

from ckptdoctor.io.storage import Storage

MIN_BLOCK = 64 << 10
MAX_BLOCK = 16 << 20
MAX_CACHED = 256 << 20
LOOK_BACK = 4


class RangeFile(io.RawIOBase):
    """``[0, size)`` of ``path`` on ``storage``, read by ranges and cached (see the module docstring)."""

    def __init__(self, storage: Storage, path: str, size: int | None = None, *, readahead: bool = True) -> None:
        super().__init__()
        self.storage, self.path = storage, path
        self.size = storage.size(path) if size is None else size
        self._pos = 0
        self._starts: list[int] = []
        self._chunks: list[bytes] = []
        self._cached = 0
        self._consumed = 0
        self._readahead = readahead

    # -- cache --------------------------------------------------------------------------------
    def prefetch(self, offset: int, length: int) -> None:
        """Fetch ``[offset, offset + length)`` in one request (clipped to the file) and keep it."""
        offset = max(0, offset)
        length = min(length, self.size - offset)
        if length > 0 and self._find(offset, length) is None:
            self._add(offset, self.storage.read_range(self.path, offset, length))

    def add(self, offset: int, data: bytes) -> None:
        """Keep bytes fetched elsewhere (a head read during format detection)."""
        if data:
            self._add(offset, data)

    def _add(self, offset: int, data: bytes) -> None:
        if self._cached + len(data) > MAX_CACHED:
            self._starts.clear()
            self._chunks.clear()
            self._cached = 0
        i = bisect.bisect_left(self._starts, offset)
        self._starts.insert(i, offset)
        self._chunks.insert(i, data)
        self._cached += len(data)

    def _find(self, offset: int, length: int) -> bytes | None:
        i = bisect.bisect_right(self._starts, offset) - 1
        for j in range(i, max(i - LOOK_BACK, -1), -1):  # the few chunks starting at or before offset
            start, chunk = self._starts[j], self._chunks[j]
            if start + len(chunk) >= offset + length:
                return chunk[offset - start: offset - start + length]
        return None

    def read_at(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` (fewer at the end of the file), from the cache if there.

        An offset outside the file (negative, as a lying zip field can make one) reads as nothing.
        """
        if offset < 0:
            return b""
        length = max(0, min(length, self.size - offset))
        if length == 0:
            return b""
        found = self._find(offset, length)
        if found is not None:
            return found
        if not self._readahead:  # each read is one range; only prefetched ranges are kept
            return self.storage.read_range(self.path, offset, length)
        block = min(max(length, min(MAX_BLOCK, max(MIN_BLOCK, self._consumed))), self.size - offset)
        data = self.storage.read_range(self.path, offset, block)
        self._add(offset, data)
        return data[:length]

    # -- io.RawIOBase -------------------------------------------------------------------------
    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self.read_at(self._pos, len(view))
        view[: len(data)] = data
        self._pos += len(data)
        self._consumed += len(data)
        return len(data)

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            size = self.size - self._pos
        data = self.read_at(self._pos, size)
        self._pos += len(data)
        self._consumed += len(data)
        return data
