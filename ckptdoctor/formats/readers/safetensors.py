"""Reader for ``.safetensors`` files, parsed by hand so the package never needs ``safetensors``.

Layout (huggingface/safetensors ``safetensors/src/tensor.rs``): an 8-byte little-endian header
length N, N bytes of JSON (padded with spaces to 8-byte alignment), then the data region. The
JSON maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` with offsets
relative to the data region, plus an optional ``"__metadata__"`` string-to-string map.
Every tensor is its own buffer: there is no storage sharing and no strides (row-major).

The Rust loader refuses headers over 100 MB, offsets that overlap, leave holes or do not end
at the end of the file (``SafeTensorError::InvalidOffset`` / ``MetadataIncompleteBuffer``).
We refuse overlaps and out-of-range offsets (they make readers disagree), and report holes
and trailing bytes as notes, since the tensor bytes themselves are still well defined.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ckptdoctor.errors import CorruptCheckpoint, EntryNotFound, LimitExceeded, UnsupportedFormat
from ckptdoctor.formats.pickle.stand_ins import contiguous_stride
from ckptdoctor.formats.registry import FileFormat, safetensors_length_ok
from ckptdoctor.io.storage import storage_for
from ckptdoctor.model.checkpoint import DTYPE_BITS, ByteRange, Checkpoint, StorageInfo, TensorRecord, itemsize
from ckptdoctor.model.locate import build_checkpoint

MAX_HEADER_BYTES = 100_000_000  # safetensors' own MAX_HEADER_SIZE (src/tensor.rs)
MAX_DIMS = 64
MAX_DIM = 2**63 - 1  # torch sizes are int64: a larger dimension is no tensor torch (or safetensors) can load
FIRST_GUESS = 64 << 10  # remote: the length field and (usually) the whole header in one range, as the Hub reads
BAD_HEADER_HINT = "The safetensors header is malformed; the file is damaged, truncated or not safetensors."

# safetensors dtype names (src/tensor.rs `Dtype`) to torch names, as safetensors/torch.py `_TYPES` maps them.
SAFETENSORS_DTYPES: dict[str, str] = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz", "F8_E8M0": "float8_e8m0fnu", "C64": "complex64",
    # 4-bit floats: safetensors counts 4-bit elements, torch packs two per byte (float4_e2m1fn_x2),
    # so safetensors/torch.py saves a [.., n] x2 tensor with shape [.., 2n]; we halve it back.
    "F4": "float4_e2m1fn_x2",
}
# Valid safetensors dtypes torch has no dtype for (src/tensor.rs): readable as bytes only.
UNREPRESENTABLE_DTYPES = frozenset({"F6_E2M3", "F6_E3M2"})
# Bits per element where safetensors counts elements differently from torch (src/tensor.rs `bitsize`).
_SUB_BYTE_BITS = {"F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}


def safetensors_bits(st_dtype: object) -> int | None:
    """Bits per element of a safetensors dtype name as the format counts them; None if unknown.

    The one table of safetensors dtypes (the reader's, above) serves the reader, the writer and
    ``scan``, so no tool flags a file another writes.
    """
    if not isinstance(st_dtype, str):
        return None
    if st_dtype in _SUB_BYTE_BITS:
        return _SUB_BYTE_BITS[st_dtype]
    torch_name = SAFETENSORS_DTYPES.get(st_dtype)
    return None if torch_name is None else DTYPE_BITS[torch_name]


@dataclass(frozen=True)
class SafetensorsEntry:
    """One header entry: torch dtype and shape, and the absolute byte range of its data."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute, in the file
    nbytes: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """The parsed, validated header: entries in data-offset (writing) order, metadata, notes."""

    entries: tuple[SafetensorsEntry, ...]
    metadata: dict[str, str] | None
    file_size: int
    notes: tuple[str, ...]


def _bad(message: str, path: str) -> CorruptCheckpoint:
    return CorruptCheckpoint(f"safetensors header: {message}", path=path, hint=BAD_HEADER_HINT)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # serde_json into a HashMap keeps the last duplicate, Python's json the last too, but other
    # readers differ: a header naming a tensor twice is refused as ambiguous.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice")
        out[key] = value
    return out


def _read_json_header(path: str) -> tuple[dict[str, Any], int, int]:
    """(header object, header length, file size) with the length field bounds-checked."""
    store = storage_for(path)
    file_size = store.size(path)
    first = store.read_range(path, 0, min(file_size, FIRST_GUESS) if store.remote else 8)
    head = first[:8]
    if len(head) < 8:
        raise _bad(f"the file has {len(head)} bytes, fewer than the 8-byte length field", path)
    (header_len,) = struct.unpack("<Q", head)
    if header_len > MAX_HEADER_BYTES:
        raise LimitExceeded(f"safetensors header declares {header_len} bytes (limit {MAX_HEADER_BYTES})",
                            path=path)
    if header_len > file_size - 8:
        raise _bad(f"declares {header_len} bytes but the file has {file_size - 8} after the length field "
                   "(truncated?)", path)
    raw = first[8:8 + header_len]
    if len(raw) < header_len:  # the header is longer than the first guess: one more range
        raw += store.read_range(path, 8 + len(raw), header_len - len(raw))
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: nesting too deep
        raise _bad(f"not valid JSON ({exc})"[:300], path) from None
    if not isinstance(header, dict):
        raise _bad(f"the JSON is a {type(header).__name__}, not an object", path)
    return header, header_len, file_size


def _metadata(value: Any, path: str) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise _bad("__metadata__ must map strings to strings", path)
    return dict(value)


def _dims(name: str, shape: Any, path: str) -> tuple[int, ...]:
    if not isinstance(shape, list) or len(shape) > MAX_DIMS:
        raise _bad(f"tensor {name!r} has shape {shape!r:.60}, not a list of at most {MAX_DIMS} integers", path)
    for n in shape:
        if type(n) is not int or not 0 <= n <= MAX_DIM:
            raise _bad(f"tensor {name!r} has an invalid dimension {n!r:.30} in its shape", path)
    return tuple(shape)


def _torch_dtype(name: str, st_dtype: Any, shape: tuple[int, ...], path: str) -> tuple[str, tuple[int, ...]]:
    """The torch dtype name and shape for a safetensors dtype (F4 packs two values a byte)."""
    if st_dtype in UNREPRESENTABLE_DTYPES:
        raise UnsupportedFormat(f"tensor {name!r} has dtype {st_dtype}, which torch has no dtype for", path=path,
                                hint="Only readers that support 6-bit floats can load this file.")
    if not isinstance(st_dtype, str) or st_dtype not in SAFETENSORS_DTYPES:
        known = ", ".join(SAFETENSORS_DTYPES)
        raise _bad(f"tensor {name!r} has unknown dtype {st_dtype!r:.30} (known: {known})", path)
    dtype = SAFETENSORS_DTYPES[st_dtype]
    if st_dtype == "F4":
        if not shape or shape[-1] % 2:
            raise _bad(f"F4 tensor {name!r} has shape {list(shape)}: the last dimension must be even to "
                       "pack two 4-bit values per byte", path)
        shape = (*shape[:-1], shape[-1] // 2)
    return dtype, shape


def _entry(name: str, spec: Any, data_start: int, data_len: int, path: str) -> tuple[SafetensorsEntry, int]:
    """One validated entry and its begin offset in the data region."""
    if not isinstance(spec, dict):
        raise _bad(f"tensor {name!r} is described by a {type(spec).__name__}, not an object", path)
    shape = _dims(name, spec.get("shape"), path)
    dtype, shape = _torch_dtype(name, spec.get("dtype"), shape, path)
    offsets = spec.get("data_offsets")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(v) is int for v in offsets)):
        raise _bad(f"tensor {name!r} has data_offsets {offsets!r:.60}, not [begin, end]", path)
    begin, end = offsets
    if begin < 0 or end < begin or end > data_len:
        raise _bad(f"tensor {name!r} has data_offsets [{begin}, {end}] outside the {data_len}-byte data region",
                   path)
    nbytes = math.prod(shape) * itemsize(dtype)
    if end - begin != nbytes:
        raise _bad(f"tensor {name!r} ({dtype}{list(shape)}) needs {nbytes} bytes but data_offsets "
                   f"[{begin}, {end}] span {end - begin}", path)
    return SafetensorsEntry(name, dtype, shape, data_start + begin, nbytes), begin


def _layout_notes(spans: list[tuple[int, int, str]], data_len: int, path: str) -> list[str]:
    """Refuse overlapping tensors; note holes and trailing bytes (safetensors itself refuses them)."""
    notes: list[str] = []
    position, previous = 0, ""
    for begin, end, name in spans:
        if begin == end:
            continue  # an empty tensor claims no bytes, wherever its offsets point
        if begin < position:
            raise _bad(f"tensors {previous!r} and {name!r} overlap (bytes {begin}..{position} are claimed twice)",
                       path)
        if begin > position:
            notes.append(f"bytes {position}..{begin} of the data region belong to no tensor "
                         "(safetensors.load_file would refuse the file: InvalidOffset)")
        position, previous = end, name
    if position < data_len:
        notes.append(f"{data_len - position} bytes after the last tensor belong to no tensor "
                     "(safetensors.load_file would refuse the file: MetadataIncompleteBuffer)")
    return notes[:5]


def read_safetensors_header(path: str) -> SafetensorsHeader:
    """Parse and validate the header of ``path``; reads the header bytes only."""
    header, header_len, file_size = _read_json_header(path)
    data_start = 8 + header_len
    data_len = file_size - data_start
    metadata = _metadata(header.get("__metadata__"), path)
    found: list[tuple[int, int, int, SafetensorsEntry]] = []
    for position, (name, spec) in enumerate(header.items()):
        if name == "__metadata__":
            continue
        entry, begin = _entry(name, spec, data_start, data_len, path)
        found.append((begin, begin + entry.nbytes, position, entry))
    # Writing order, as safetensors sorts (by data_offsets); ties keep header order.
    found.sort(key=lambda item: item[:3])
    spans = [(begin, end, e.name) for begin, end, _, e in found]
    notes = _layout_notes(spans, data_len, path)
    return SafetensorsHeader(tuple(e for *_, e in found), metadata, file_size, tuple(notes))


def safetensors_tensors(path: str, header: SafetensorsHeader, id_prefix: str = "") -> dict[str, TensorRecord]:
    """The file's tensors as records, in writing order; storage ids are ``id_prefix + name``."""
    out: dict[str, TensorRecord] = {}
    for e in header.entries:
        storage = StorageInfo(id=id_prefix + e.name, dtype=e.dtype, nbytes=e.nbytes, device="cpu",
                              source=ByteRange(path, e.offset, e.nbytes), name=e.name)
        out[e.name] = TensorRecord(dtype=e.dtype, shape=e.shape, stride=contiguous_stride(e.shape),
                                   storage=storage)
    return out


def read_safetensors(path: str, entry: str | None = None) -> Checkpoint:
    """Read a ``.safetensors`` file's metadata; the root is the flat name-to-tensor mapping."""
    header = read_safetensors_header(path)
    root = safetensors_tensors(path, header)
    extra: Mapping[str, Any] = {"metadata": header.metadata} if header.metadata is not None else {}
    if not root:
        raise EntryNotFound("the safetensors file holds no tensors", path=path)
    return build_checkpoint(path, "safetensors", header.file_size, root, entry=entry, extra=extra,
                            notes=header.notes)


FILE_FORMATS = (FileFormat("safetensors", 20, safetensors_length_ok, read_safetensors),)
