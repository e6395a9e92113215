"""Tensor values, streamed: the one place that reads tensor bytes, in bounded chunks.

Everything else in ckptdoctor works from metadata. ``diff --values``, ``spec --digests`` and the
digest check need the values themselves, and the files can be tens of gigabytes, so:

* bytes are read with ``os.pread`` from the storage's :class:`~ckptdoctor.model.checkpoint.ByteRange`
  in chunks (pages touched through a memory map count as resident memory, so a whole-file pass
  over a mapped 20 GB file looks like a 20 GB process to the OOM killer). The one exception,
  :func:`bytes_equal`, maps a 64 MiB window of each file at a time and unmaps it at once;
* a tensor is produced in *logical* order (row-major over its shape, little-endian), whatever its
  strides, so a transposed view and its contiguous copy yield the same bytes and the same digest;
* at most about two chunks (``chunk_bytes``, 8 MiB by default) are alive at a time.

Non-contiguous views are gathered from windows of the storage with numpy (a dependency, imported
lazily so metadata commands never pay for it) by sorting a block's element addresses and reading
each dense run once. Elements are decoded with numpy too; the float8 formats, which numpy lacks,
through 256-entry tables computed from their definitions.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import mmap
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ckptdoctor.errors import CkptDoctorError, CorruptCheckpoint
from ckptdoctor.io.storage import Storage, storage_for
from ckptdoctor.model.checkpoint import TensorRecord, itemsize

Progress = Callable[[int], None]

DEFAULT_CHUNK = 8 << 20
# A gap between needed elements larger than this starts a new read instead of reading through it.
_GAP_BYTES = 64 << 10


class TensorBytesUnavailable(CkptDoctorError):
    """The tensor's values are not in the file (meta tensors) or not laid out as a strided buffer."""

    default_hint = "Only strided tensors stored in the file have values to read; compare keys and shapes instead."


@dataclass(frozen=True)
class ValueDiff:
    """Outcome of comparing two tensors element by element.

    ``max_abs_diff`` is the largest ``|a - b|`` over all elements (``inf`` when a NaN meets a
    number or infinities differ; ``None`` when the dtypes cannot be compared numerically, such
    as packed sub-byte types against anything else). ``differing`` counts elements that are not
    equal (NaN equals NaN, ``-0.0`` equals ``0.0``) or, with tolerances, not within
    ``atol + rtol * |b|``.
    """

    equal: bool
    max_abs_diff: float | None
    differing: int


# ---------------------------------------------------------------- layout


@dataclass(frozen=True)
class _View:
    path: str
    base: int  # byte offset of storage element 0 in the file
    isz: int
    offset: int  # storage offset of the view, in elements
    shape: tuple[int, ...]  # size-1 dims dropped, mergeable dims merged
    stride: tuple[int, ...]
    numel: int
    span_end: int  # one past the last byte the view touches, relative to ``base``

    @property
    def contiguous(self) -> bool:
        return not self.shape or (len(self.shape) == 1 and self.stride[0] == 1)


def _collapse(shape: tuple[int, ...], stride: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Drop size-1 dims and merge neighbours that are contiguous with each other."""
    dims = [(n, s) for n, s in zip(shape, stride) if n != 1]
    merged: list[tuple[int, int]] = []
    for n, s in dims:
        if merged and merged[-1][1] == n * s:
            prev_n, _ = merged[-1]
            merged[-1] = (prev_n * n, s)
        else:
            merged.append((n, s))
    return tuple(n for n, _ in merged), tuple(s for _, s in merged)


def _view(tensor: TensorRecord) -> _View:
    storage = tensor.storage
    if storage is None or storage.source is None:
        raise TensorBytesUnavailable("the tensor has no bytes in the file (a meta tensor)")
    if tensor.layout not in ("strided", "quantized"):
        raise TensorBytesUnavailable(f"{tensor.layout} tensors have no single strided buffer to read")
    if any(n < 0 for n in tensor.shape) or any(s < 0 for s in tensor.stride) or tensor.storage_offset < 0:
        raise CorruptCheckpoint(f"tensor has negative sizes or strides {tensor.shape}/{tensor.stride}",
                                path=storage.source.path)
    if len(tensor.shape) != len(tensor.stride):
        raise CorruptCheckpoint(f"tensor shape {tensor.shape} and stride {tensor.stride} differ in length",
                                path=storage.source.path)
    isz = itemsize(tensor.dtype)
    _, end = tensor.byte_span()
    if tensor.numel and (end > storage.nbytes or storage.nbytes > storage.source.length):
        raise CorruptCheckpoint(f"a {tensor.dtype}{list(tensor.shape)} view reaches byte {end} of a storage "
                                f"holding {min(storage.nbytes, storage.source.length)}", path=storage.source.path)
    shape, stride = _collapse(tensor.shape, tensor.stride)
    return _View(storage.source.path, storage.source.offset, isz, tensor.storage_offset, shape, stride,
                 tensor.numel, end)


def _pread(fd: Storage, length: int, offset: int, path: str) -> bytes:
    """``length`` bytes at ``offset`` through the storage layer (``os.pread`` locally, a range remotely)."""
    data = fd.read_range(path, offset, length)
    if len(data) < length:
        raise CorruptCheckpoint(f"the file ends at byte {offset + len(data)}, before the tensor's last byte "
                                f"{offset + length} (truncated)", path=path)
    return data


def _numpy() -> Any:
    import numpy  # noqa: PLC0415 - imported only when values are read

    return numpy


# ---------------------------------------------------------------- chunk iteration


def _swap_unit(dtype: str) -> int:
    if dtype.startswith("complex"):
        return itemsize(dtype) // 2
    return itemsize(dtype)


def _to_little(chunk: bytes, unit: int) -> bytes:
    """Reverse the bytes of every ``unit``-byte element (big-endian legacy files)."""
    out = bytearray(len(chunk))
    for b in range(unit):
        out[b::unit] = chunk[unit - 1 - b::unit]
    return bytes(out)


def iter_tensor_chunks(tensor: TensorRecord, chunk_bytes: int = DEFAULT_CHUNK, *, byteorder: str = "little",
                       progress: Progress | None = None) -> Iterator[bytes]:
    """Yield the tensor's elements in row-major order, little-endian, in bounded chunks.

    Every chunk but the last holds exactly ``max(1, chunk_bytes // itemsize)`` elements, so two
    tensors of the same dtype can be walked in lockstep. An empty tensor yields nothing; a 0-d
    tensor yields its one element. ``byteorder`` is the file's (``Checkpoint.extra["byteorder"]``);
    big-endian bytes are swapped. ``progress`` receives the number of bytes each chunk produced.
    """
    view = _view(tensor)
    if view.numel == 0:
        return
    per = max(1, chunk_bytes // view.isz)
    unit = _swap_unit(tensor.dtype) if byteorder == "big" else 1
    fd = storage_for(view.path)
    chunks: Iterator[bytes]
    if view.contiguous and fd.remote:
        chunks = _remote_chunks(fd, view, per)
    elif view.contiguous:
        chunks = _contiguous_chunks(fd, view, per)
    else:
        chunks = _numpy_gather(fd, view, per, max(chunk_bytes, view.isz))
    for chunk in chunks:
        if unit > 1:
            chunk = _to_little(chunk, unit)
        if progress is not None:
            progress(len(chunk))
        yield chunk


def _remote_chunks(store: Storage, view: _View, per: int) -> Iterator[bytes]:
    """Contiguous chunks of a remote tensor through the object's read-ahead windows (bounded memory)."""
    from ckptdoctor.io.sequential import sequential_reader  # noqa: PLC0415 - remote only

    reader = sequential_reader(store, view.path)
    start = view.base + view.offset * view.isz
    for first in range(0, view.numel, per):
        count = min(per, view.numel - first)
        chunk = reader.read(start + first * view.isz, count * view.isz)
        if len(chunk) < count * view.isz:
            raise CorruptCheckpoint(f"the file ends before the tensor's last byte {start + (first + count) * view.isz}"
                                    " (truncated)", path=view.path)
        yield chunk


def _contiguous_chunks(fd: Storage, view: _View, per: int) -> Iterator[bytes]:
    start = view.base + view.offset * view.isz
    for first in range(0, view.numel, per):
        count = min(per, view.numel - first)
        yield _pread(fd, count * view.isz, start + first * view.isz, view.path)


def _numpy_gather(fd: Storage, view: _View, per: int, window: int) -> Iterator[bytes]:
    """Gather a strided view block by block: sort addresses, read each dense run once, scatter."""
    np = _numpy()
    isz = view.isz
    item = np.dtype(f"V{isz}")
    # Address arrays are int64: keep them about one chunk in size whatever the itemsize.
    sub = max(1, window // 8)
    for first in range(0, view.numel, per):
        count = min(per, view.numel - first)
        out = np.empty(count, dtype=item)
        for lo in range(0, count, sub):
            n = min(sub, count - lo)
            idx = np.arange(first + lo, first + lo + n, dtype=np.int64)
            addr = np.full(n, view.offset, dtype=np.int64)
            for size, step in zip(reversed(view.shape), reversed(view.stride)):
                addr += (idx % size) * step
                idx //= size
            order = np.argsort(addr, kind="stable")
            sorted_addr = addr[order]
            breaks = np.flatnonzero(np.diff(sorted_addr) * isz > _GAP_BYTES) + 1
            bounds = [0, *breaks.tolist(), n]
            for i, j in itertools.pairwise(bounds):
                while i < j:
                    # The longest prefix of this dense run that fits in one window.
                    limit = int(sorted_addr[i]) + max(1, window // isz)
                    k = int(np.searchsorted(sorted_addr[i:j], limit, side="left")) + i
                    k = max(k, i + 1)
                    start = int(sorted_addr[i])
                    length = (int(sorted_addr[k - 1]) + 1 - start) * isz
                    buf = np.frombuffer(_pread(fd, length, view.base + start * isz, view.path), dtype=item)
                    out[lo + order[i:k]] = buf[sorted_addr[i:k] - start]
                    i = k
        yield out.tobytes()


def tensor_digest(tensor: TensorRecord, *, byteorder: str = "little", chunk_bytes: int = DEFAULT_CHUNK,
                  progress: Progress | None = None) -> str:
    """SHA-256 (hex) of the tensor's logical bytes: row-major, little-endian, independent of strides.

    A contiguous tensor and a transposed-then-copied view with the same values hash the same;
    the dtype and shape are *not* hashed (a spec records them next to the digest).
    """
    h = hashlib.sha256()
    for chunk in iter_tensor_chunks(tensor, chunk_bytes, byteorder=byteorder, progress=progress):
        h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- decoding


def _float8_table(exp_bits: int, man_bits: int, bias: int, kind: str) -> tuple[float, ...]:
    """All 256 values of an 8-bit float format, from its definition (OCP FP8 / the fnuz variants).

    ``kind``: ``ieee`` (e5m2: inf and NaN at the top exponent), ``fn`` (e4m3fn: no inf, NaN only
    at all-ones), ``fnuz`` (no inf, no negative zero, NaN is 0x80).
    """
    values = []
    top = (1 << exp_bits) - 1
    man_max = (1 << man_bits) - 1
    for b in range(256):
        sign = -1.0 if b & 0x80 else 1.0
        e = (b >> man_bits) & top
        m = b & man_max
        if kind == "fnuz" and b == 0x80:
            values.append(math.nan)
            continue
        if kind == "ieee" and e == top:
            values.append(sign * math.inf if m == 0 else math.nan)
            continue
        if kind == "fn" and e == top and m == man_max:
            values.append(math.nan)
            continue
        if e == 0:
            values.append(sign * math.ldexp(m / (1 << man_bits), 1 - bias))
        else:
            values.append(sign * math.ldexp(1 + m / (1 << man_bits), e - bias))
    return tuple(values)


FLOAT8_TABLES: dict[str, tuple[float, ...]] = {
    "float8_e4m3fn": _float8_table(4, 3, 7, "fn"),
    "float8_e5m2": _float8_table(5, 2, 15, "ieee"),
    "float8_e4m3fnuz": _float8_table(4, 3, 8, "fnuz"),
    "float8_e5m2fnuz": _float8_table(5, 2, 16, "fnuz"),
    # Exponent only, no sign, no zero; 0xFF is NaN (OCP MX scale format).
    "float8_e8m0fnu": tuple(math.nan if b == 255 else math.ldexp(1.0, b - 127) for b in range(256)),
}

# struct codes (little-endian) of the dtypes that decode directly. Quantized integers compare
# by their stored integers (the scale and zero point are not part of the values).
_STRUCT_CODES = {
    "float64": "d", "float32": "f", "float16": "e", "int64": "q", "int32": "i", "int16": "h", "int8": "b",
    "uint64": "Q", "uint32": "I", "uint16": "H", "uint8": "B", "bool": "B",
    "qint8": "b", "quint8": "B", "qint32": "i",
}
_COMPLEX_PARTS = {"complex128": "d", "complex64": "f", "complex32": "e"}


def _kind(dtype: str) -> str:
    """``int``, ``float``, ``complex`` or ``raw`` (packed / bit types: bytes without numeric meaning)."""
    if dtype in _COMPLEX_PARTS:
        return "complex"
    if dtype.startswith(("float", "bfloat")) and dtype != "float4_e2m1fn_x2":
        return "float"
    if dtype in _STRUCT_CODES:
        return "int"
    return "raw"


def _decode_np(np: Any, chunk: bytes, dtype: str) -> Any:
    if dtype in FLOAT8_TABLES:
        return np.asarray(FLOAT8_TABLES[dtype], dtype=np.float64)[np.frombuffer(chunk, dtype=np.uint8)]
    if dtype == "bfloat16":
        return (np.frombuffer(chunk, dtype="<u2").astype(np.uint32) << 16).view("<f4").astype(np.float64)
    if dtype == "complex32":
        parts = np.frombuffer(chunk, dtype="<f2").astype(np.float64)
        return parts[0::2] + 1j * parts[1::2]
    if dtype in _COMPLEX_PARTS:
        return np.frombuffer(chunk, dtype="<c16" if dtype == "complex128" else "<c8").astype(np.complex128)
    if dtype in _STRUCT_CODES:
        arr = np.frombuffer(chunk, dtype="<" + _STRUCT_CODES[dtype])
        return arr.astype(np.float64) if _kind(dtype) == "float" else arr
    return np.frombuffer(chunk, dtype=f"<u{itemsize(dtype)}")


@dataclass
class _Tally:
    differing: int = 0
    max_abs: float = 0.0


def _compare_np(np: Any, ca: bytes, cb: bytes, da: str, db: str, rtol: float, atol: float, tally: _Tally) -> None:
    a = _decode_np(np, ca, da)
    b = _decode_np(np, cb, db)
    if da != db or a.dtype.kind not in "iub":
        a = a.astype(np.complex128 if "complex" in (_kind(da), _kind(db)) else np.float64)
        b = b.astype(a.dtype)
        same = (a == b) | (np.isnan(a) & np.isnan(b))
        with np.errstate(invalid="ignore", over="ignore"):
            diff = np.abs(a - b)
        diff[same] = 0.0
        diff[np.isnan(diff)] = np.inf
        ok = same | (diff <= atol + rtol * np.abs(b))
    else:  # same integer dtype: compare exactly in the native type, measure in float64
        ok = a == b
        diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    tally.differing += int(ok.size - np.count_nonzero(ok))
    if diff.size:
        tally.max_abs = max(tally.max_abs, float(diff.max()))


_WINDOW = 64 << 20


def _mapped_words(np: Any, fd: int, offset: int, length: int) -> tuple[mmap.mmap, Any]:
    """A read-only map of ``length`` bytes at ``offset`` and a numpy view of them (uint64 when aligned)."""
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    mapped = mmap.mmap(fd, length + offset - start, access=mmap.ACCESS_READ, offset=start)
    skip = offset - start
    if skip % 8 == 0 and length % 8 == 0:
        return mapped, np.frombuffer(mapped, dtype=np.uint64, count=length // 8, offset=skip)
    return mapped, np.frombuffer(mapped, dtype=np.uint8, count=length, offset=skip)


def bytes_equal(a: TensorRecord, b: TensorRecord, progress: Progress | None = None) -> bool | None:
    """Fast exact test for two contiguous tensors of one dtype: are their bytes identical?

    The common ``diff --values`` case (same weights, another file) is bound by memory
    bandwidth; copying every chunk out of the page cache (``pread``) costs as much again as
    comparing. Here 64 MiB windows of both files are mapped, compared as 64-bit words and
    unmapped at once, so resident memory stays at two windows. Two remote objects are compared
    inside their read-ahead windows instead (:func:`_remote_bytes_equal`). ``None`` when not
    applicable (views, other dtypes, big-endian, a local file against a remote one, one object
    against itself); the caller then takes the general path.
    """
    np = _numpy()
    if a.dtype != b.dtype or a.shape != b.shape:
        return None
    try:
        va, vb = _view(a), _view(b)
    except CkptDoctorError:
        return None
    if not (va.contiguous and vb.contiguous):
        return None
    length = va.numel * va.isz
    start_a, start_b = va.base + va.offset * va.isz, vb.base + vb.offset * vb.isz
    remote_a, remote_b = storage_for(va.path).remote, storage_for(vb.path).remote
    if remote_a and remote_b and va.path != vb.path:
        return _remote_bytes_equal(np, (va, start_a), (vb, start_b), length, progress)
    if remote_a or remote_b:
        return None
    for view, start in ((va, start_a), (vb, start_b)):
        if start + length > os.path.getsize(view.path):
            raise CorruptCheckpoint("the file ends inside a tensor's bytes (truncated)", path=view.path)
    fd_a, fd_b = os.open(va.path, os.O_RDONLY), os.open(vb.path, os.O_RDONLY)
    try:
        for done in range(0, length, _WINDOW):
            n = min(_WINDOW, length - done)
            map_a, words_a = _mapped_words(np, fd_a, start_a + done, n)
            map_b, words_b = _mapped_words(np, fd_b, start_b + done, n)
            try:
                if words_a.dtype != words_b.dtype:  # one window is 8-byte aligned, the other not
                    words_a, words_b = words_a.view(np.uint8), words_b.view(np.uint8)
                same = bool(np.array_equal(words_a, words_b))
            finally:
                del words_a, words_b
                map_a.close()
                map_b.close()
            if progress is not None:
                progress(2 * n)
            if not same:
                return False
        return True
    finally:
        os.close(fd_a)
        os.close(fd_b)


def _remote_bytes_equal(np: Any, a: tuple[_View, int], b: tuple[_View, int], length: int,
                        progress: Progress | None) -> bool:
    """:func:`bytes_equal` for two remote objects: compared where their read-ahead windows hold them.

    Copying every byte out of the windows into a new ``bytes`` per chunk, only to compare it, cost
    as much CPU as receiving it (a 2.4 GB ``diff --values`` over HTTP was bound by that CPU). The
    two objects have their own readers (the paths differ), so a view of one stays valid while
    the other moves on. Raises like the chunked reads when an object ends inside the tensor.
    """
    from ckptdoctor.io.sequential import sequential_reader  # noqa: PLC0415 - remote only

    pieces = []
    for view, start in (a, b):
        reader = sequential_reader(storage_for(view.path), view.path)
        if start + length > reader.size:
            raise CorruptCheckpoint(f"the file ends before the tensor's last byte {start + length} (truncated)",
                                    path=view.path)
        pieces.append(reader.views(start, length))
    empty = memoryview(b"")
    piece_a, piece_b = empty, empty
    done = 0
    while done < length:
        if not piece_a:
            piece_a = next(pieces[0])
        if not piece_b:
            piece_b = next(pieces[1])
        n = min(len(piece_a), len(piece_b))
        word = np.uint64 if n % 8 == 0 else np.uint8
        if not np.array_equal(np.frombuffer(piece_a[:n], dtype=word), np.frombuffer(piece_b[:n], dtype=word)):
            return False
        piece_a, piece_b = piece_a[n:], piece_b[n:]
        done += n
        if progress is not None:
            progress(2 * n)
    return True


def compare_tensors(a: TensorRecord, b: TensorRecord, rtol: float | None = None, atol: float | None = None, *,
                    byteorder_a: str = "little", byteorder_b: str = "little", chunk_bytes: int = DEFAULT_CHUNK,
                    progress: Progress | None = None) -> ValueDiff:
    """Compare two same-shaped tensors element by element, streaming both in lockstep.

    Exact by default (same dtype: byte-equal chunks are skipped without decoding; different
    dtypes: values compared after upcasting to float64/complex128). With ``rtol``/``atol`` an
    element passes when ``|a - b| <= atol + rtol * |b|``. Memory: one chunk of each tensor.
    """
    if a.shape != b.shape:
        raise ValueError(f"cannot compare values of shapes {a.shape} and {b.shape}")
    if byteorder_a == byteorder_b == "little":
        same = bytes_equal(a, b, progress)
        if same:
            return ValueDiff(equal=True, max_abs_diff=0.0, differing=0)
        if same is False:
            progress = None  # these bytes were counted once already; the exact pass below re-reads them
    rtol_f, atol_f = float(rtol or 0.0), float(atol or 0.0)
    ka, kb = _kind(a.dtype), _kind(b.dtype)
    numeric = (a.dtype == b.dtype) or ("raw" not in (ka, kb))
    per = max(1, chunk_bytes // max(itemsize(a.dtype), itemsize(b.dtype)))
    stream_a = iter_tensor_chunks(a, per * itemsize(a.dtype), byteorder=byteorder_a, progress=progress)
    stream_b = iter_tensor_chunks(b, per * itemsize(b.dtype), byteorder=byteorder_b, progress=progress)
    np = _numpy()
    tally = _Tally()
    raw_equal = True
    for ca, cb in zip(stream_a, stream_b):
        if a.dtype == b.dtype and ca == cb:
            continue
        if not numeric:
            raw_equal = raw_equal and ca == cb
            continue
        _compare_np(np, ca, cb, a.dtype, b.dtype, rtol_f, atol_f, tally)
    if not numeric:
        # Packed / bit types against another dtype: no numeric meaning, only byte identity.
        same = raw_equal and itemsize(a.dtype) == itemsize(b.dtype)
        return ValueDiff(equal=same, max_abs_diff=None, differing=0 if same else a.numel)
    return ValueDiff(equal=tally.differing == 0, max_abs_diff=tally.max_abs, differing=tally.differing)
