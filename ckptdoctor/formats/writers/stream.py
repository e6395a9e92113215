"""Tensors to write, each with the dtype it is written in, streamed from the source in bounded chunks.

The containers ``convert`` writes (safetensors files and shards, DCP records) all store a
tensor as its own dense, row-major, little-endian bytes. :func:`stream_item` produces exactly
those: a kernel copy (``copy_file_range``) when the view is contiguous and keeps its dtype,
otherwise chunk by chunk through the gatherer of :mod:`ckptdoctor.formats.tensor_bytes` and,
for a cast, :func:`~ckptdoctor.formats.writers.cast.cast_bytes`. At most a few chunks are alive.
"""

from __future__ import annotations

import os
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from ckptdoctor.errors import UnsupportedFormat
from ckptdoctor.formats.pickle.stand_ins import contiguous_stride
from ckptdoctor.formats.tensor_bytes import iter_tensor_chunks
from ckptdoctor.formats.writers.safetensors import TORCH_TO_SAFETENSORS, build_header, check_tensor, layout_entries
from ckptdoctor.io.atomic import CHUNK, EarlyWriteback, SourceFiles, copy_range, write_all
from ckptdoctor.model.checkpoint import TensorRecord, itemsize

Progress = Callable[[int], None]
CAST_CHUNK = 1 << 20
CAST_THREADS = min(4, os.cpu_count() or 1)
CAST_AHEAD = 2 * CAST_THREADS


@dataclass(frozen=True)
class Item:
    """One tensor to write: its key, the source record, the dtype it is written in, the source's byte order."""

    key: str
    tensor: TensorRecord
    dtype: str
    byteorder: str = "little"

    @property
    def cast(self) -> bool:
        return self.dtype != self.tensor.dtype

    @property
    def nbytes(self) -> int:
        return self.tensor.numel * itemsize(self.dtype)

    def written(self) -> TensorRecord:
        """The record as written: dense, row-major, in the output dtype (no storage)."""
        return TensorRecord(dtype=self.dtype, shape=self.tensor.shape, stride=contiguous_stride(self.tensor.shape))


def output_chunks(item: Item, progress: Progress | None = None) -> Iterator[bytes | memoryview]:
    """The item's bytes as written, in bounded chunks (each a whole number of elements).

    Casts run on CAST_THREADS threads (numpy releases the GIL) while the next chunks are read,
    at most CAST_AHEAD chunks in flight, so memory stays bounded and the cores are busy.
    """
    # A cast makes several numpy passes over each chunk: 1 MiB chunks stay in the CPU cache
    # (measured 2x faster than 16 MiB ones); a plain gather uses the copy chunk.
    size = CAST_CHUNK if item.cast else CHUNK
    per = size // itemsize(item.tensor.dtype) * itemsize(item.tensor.dtype)
    chunks = iter_tensor_chunks(item.tensor, per, byteorder=item.byteorder)
    if not item.cast:
        for chunk in chunks:
            if progress is not None:
                progress(len(chunk))
            yield chunk
        return
    from ckptdoctor.formats.writers.cast import cast_bytes  # noqa: PLC0415 - numpy only when casting

    src, dst = item.tensor.dtype, item.dtype
    with ThreadPoolExecutor(max_workers=CAST_THREADS) as pool:
        pending: deque[Future[bytes | memoryview]] = deque()
        try:
            for chunk in chunks:
                pending.append(pool.submit(cast_bytes, chunk, src, dst))
                if len(pending) >= CAST_AHEAD:
                    yield _done(pending.popleft(), progress)
            while pending:
                yield _done(pending.popleft(), progress)
        finally:
            for future in pending:
                future.cancel()


def _done(future: Future[bytes | memoryview], progress: Progress | None) -> bytes | memoryview:
    out = future.result()
    if progress is not None:
        progress(len(out))
    return out


def stream_item(sources: SourceFiles, item: Item, fd: int, *, with_crc: bool = False,
                progress: Progress | None = None) -> int:
    """Append the item's bytes as written to ``fd``; return their CRC-32 when asked (else 0)."""
    tensor = item.tensor
    if tensor.numel == 0:
        return 0
    if tensor.storage is None or tensor.storage.source is None:
        raise UnsupportedFormat(f"tensor {item.key!r} has no data in the file (a meta tensor)")
    if not item.cast and tensor.is_contiguous() and item.byteorder == "little":
        source = tensor.storage.source
        start = source.offset + tensor.storage_offset * itemsize(tensor.dtype)
        return copy_range(sources, source.path, start, tensor.nbytes, fd, with_crc=with_crc, progress=progress)
    crc = 0
    for chunk in output_chunks(item, progress):
        if with_crc:
            crc = zlib.crc32(chunk, crc)
        write_all(fd, chunk)
    return crc


def write_safetensors_items(fd: int, items: Sequence[Item], metadata: Mapping[str, str], *,
                            progress: Progress | None = None) -> int:
    """Write ``items`` as one safetensors file (the layout of :mod:`.safetensors`); return its size.

    Every tensor's place is known from the header, so casts of contiguous tensors are written
    by position on two threads (:mod:`.cast_pipeline`); the rest is streamed in order.
    """
    from ckptdoctor.formats.writers.cast_pipeline import cast_pieces, parallel_castable, write_cast_pieces  # noqa: PLC0415

    for item in items:
        check_tensor(item.key, item.tensor)
        if item.dtype not in TORCH_TO_SAFETENSORS:
            raise UnsupportedFormat(f"tensor {item.key!r} is {item.dtype}, which safetensors cannot store")
    by_key = {item.key: item for item in items}
    layout = layout_entries([(item.key, item.written()) for item in items])
    header = build_header(layout, metadata)
    write_all(fd, header)
    writeback = EarlyWriteback(fd)
    base = len(header)
    size = base + sum(item.nbytes for item in items)
    with SourceFiles() as sources:
        pieces = []
        for key, _record, begin, end in sorted(layout, key=lambda entry: entry[2]):
            item = by_key[key]
            if parallel_castable(item):
                pieces += cast_pieces(item, base + begin)
                continue
            write_cast_pieces(sources, pieces, fd, writeback=writeback, progress=progress)
            pieces = []
            os.lseek(fd, base + begin, os.SEEK_SET)
            stream_item(sources, item, fd, progress=progress)
            writeback.advance(base + end)
        write_cast_pieces(sources, pieces, fd, writeback=writeback, progress=progress)
    os.lseek(fd, size, os.SEEK_SET)
    return size
