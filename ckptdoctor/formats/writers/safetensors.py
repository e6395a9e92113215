"""Write a state dict as a ``.safetensors`` file.

Layout (huggingface/safetensors, ``safetensors/src/tensor.rs`` ``prepare``/``serialize``): an
8-byte little-endian header length, a JSON header ``{"__metadata__": {...}, name: {"dtype",
"shape", "data_offsets": [begin, end]}}`` padded with spaces to a multiple of 8, then the
tensors' bytes back to back with no gaps. Tensors are laid out by element size, largest first
(as ``prepare`` sorts by dtype), so each one stays aligned to its element size.

The format has no storages: every tensor owns exactly its bytes, so views are written as
their own (row-major, contiguous, little-endian) bytes, gathered by stride in bounded chunks
when the view is not contiguous, and tensors that shared storage become separate copies
(reported).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ckptdoctor.errors import UnsupportedFormat
from ckptdoctor.formats.readers.safetensors import SAFETENSORS_DTYPES
from ckptdoctor.formats.tensor_bytes import iter_tensor_chunks
from ckptdoctor.io.atomic import CHUNK, EarlyWriteback, SourceFiles, copy_range, write_all
from ckptdoctor.model.checkpoint import OpaqueObject, TensorRecord, itemsize

# torch dtype name -> safetensors dtype: the reader's table inverted, without float4 (its
# element count differs between the two libraries, see safetensors_format).
TORCH_TO_SAFETENSORS: dict[str, str] = {torch: st for st, torch in SAFETENSORS_DTYPES.items() if st != "F4"}


def check_tensor(key: str, tensor: TensorRecord) -> None:
    if tensor.dtype not in TORCH_TO_SAFETENSORS:
        raise UnsupportedFormat(f"tensor {key!r} is {tensor.dtype}, which safetensors cannot store",
                                hint="Write a torch.save file instead (an OUT not ending in .safetensors).")
    if tensor.layout != "strided" or (tensor.storage is None and tensor.numel):
        raise UnsupportedFormat(f"tensor {key!r} is a {tensor.layout} tensor without data in the file; "
                                "safetensors stores only dense tensors",
                                hint="Save a full, plain state dict first (a DTensor: torch.distributed.checkpoint."
                                     "state_dict.get_model_state_dict with full_state_dict=True), then convert that.")
    if tensor.storage is not None and tensor.storage.source is None and tensor.numel:
        raise UnsupportedFormat(f"tensor {key!r} has no data in the file")


SPARSE_REBUILD = "torch._utils._rebuild_sparse_tensor"  # torch.save's record of every sparse layout


def refuse_sparse(entries: Sequence[tuple[str, Any]], container: str) -> None:
    """Refuse a sparse tensor among a state dict's non-tensor entries.

    Non-tensor entries (``_extra_state``, counters) are left out of a tensors-only container
    with a note, as ``save_pretrained`` does; a sparse tensor is a weight: leaving it out
    would write a file that no longer loads into the model, under a success message.
    """
    for key, value in entries:
        if isinstance(value, OpaqueObject) and value.cls.dotted == SPARSE_REBUILD:
            layout = str(value.args[0]) if value.args else "sparse"
            raise UnsupportedFormat(f"tensor {key!r} is a {layout} tensor, which {container} cannot store "
                                    "(dense tensors only)",
                                    hint="Write a torch.save file instead (an OUT ending in .pt), or save the "
                                         "tensor densified (tensor.to_dense()) first.")


def layout_entries(entries: Sequence[tuple[str, TensorRecord]]) -> list[tuple[str, TensorRecord, int, int]]:
    """(key, tensor, begin, end) with data ordered by element size, largest first (stable).

    Empty tensors go last, all at the end of the data, so no reader can mistake a zero-length
    span sitting at another tensor's start for an overlap.
    """
    order = sorted(range(len(entries)), key=lambda i: (entries[i][1].numel == 0, -itemsize(entries[i][1].dtype)))
    spans: dict[int, tuple[int, int]] = {}
    pos = 0
    for i in order:
        size = entries[i][1].nbytes
        spans[i] = (pos, pos + size)
        pos += size
    return [(key, tensor, *spans[i]) for i, (key, tensor) in enumerate(entries)]


def build_header(layout: Sequence[tuple[str, TensorRecord, int, int]], metadata: Mapping[str, str]) -> bytes:
    """The length-prefixed, space-padded JSON header; keys in state-dict order."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    for key, tensor, begin, end in layout:
        header[key] = {"dtype": TORCH_TO_SAFETENSORS[tensor.dtype], "shape": list(tensor.shape),
                       "data_offsets": [begin, end]}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-(8 + len(text)) % 8)
    return struct.pack("<Q", len(text)) + text


def write_view(sources: SourceFiles, tensor: TensorRecord, out_fd: int, byteorder: str,
               progress: Callable[[int], None] | None) -> None:
    """Append the view's elements, row-major and little-endian, to ``out_fd``.

    A contiguous little-endian view is one kernel copy; anything else (a transposed or strided
    view, a big-endian legacy source) is gathered and byte-swapped in bounded chunks by
    :func:`~ckptdoctor.formats.tensor_bytes.iter_tensor_chunks`.
    """
    if tensor.numel == 0 or tensor.storage is None or tensor.storage.source is None:
        return
    source = tensor.storage.source
    if tensor.is_contiguous() and byteorder == "little":
        start = source.offset + tensor.storage_offset * itemsize(tensor.dtype)
        copy_range(sources, source.path, start, tensor.nbytes, out_fd, with_crc=False, progress=progress)
        return
    for chunk in iter_tensor_chunks(tensor, CHUNK, byteorder=byteorder, progress=progress):
        write_all(out_fd, chunk)


def sharing_notes(entries: Sequence[tuple[str, TensorRecord]]) -> list[str]:
    """One note per storage that several entries viewed: safetensors gets separate copies."""
    groups: dict[Any, list[str]] = {}
    for key, tensor in entries:
        if tensor.storage is not None and tensor.numel:
            groups.setdefault(tensor.storage, []).append(key)
    notes = []
    for keys in groups.values():
        if len(keys) > 1:
            names = " and ".join(f"`{k}`" for k in keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")
            notes.append(f"{names} shared storage; written as separate copies (safetensors cannot share)")
    return notes


def write_safetensors(fd: int, entries: Sequence[tuple[str, TensorRecord]], metadata: Mapping[str, str], *,
                      byteorder: str = "little", progress: Callable[[int], None] | None = None) -> int:
    """Write ``entries`` as a safetensors file to ``fd``; return the file size."""
    for key, tensor in entries:
        check_tensor(key, tensor)
    layout = layout_entries(entries)
    header = build_header(layout, metadata)
    write_all(fd, header)
    writeback = EarlyWriteback(fd)
    with SourceFiles() as sources:
        for _key, tensor, _begin, end in sorted(layout, key=lambda item: item[2]):
            write_view(sources, tensor, fd, byteorder, progress)
            writeback.advance(len(header) + end)
    return len(header) + sum(t.nbytes for _, t in entries)
