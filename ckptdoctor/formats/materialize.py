"""Turn a read checkpoint into real tensors, for the Python API (``ckptdoctor.adapt``).

Bytes come straight from each storage's ByteRange, one read per storage, so tensors that
share a storage in the file share it in memory too, and nothing is unpickled by torch.
torch is imported here only, lazily.
"""

from __future__ import annotations

from typing import Any

from ckptdoctor.errors import CorruptCheckpoint, UnsupportedFormat
from ckptdoctor.io.storage import storage_for
from ckptdoctor.model.checkpoint import Checkpoint, StorageInfo


def _read(storage: StorageInfo) -> bytearray:
    source = storage.source
    if source is None:
        raise UnsupportedFormat(f"storage {storage.name or storage.id} has no bytes in the file (meta tensor)")
    data = storage_for(source.path).read_range(source.path, source.offset, source.length)
    if len(data) != source.length:
        raise CorruptCheckpoint("the file ends inside a tensor's bytes (truncated)", path=source.path)
    return bytearray(data)


def materialize(ckpt: Checkpoint) -> dict[str, Any]:
    """The state dict as CPU tensors (device tags are metadata; values land on the CPU)."""
    import torch  # noqa: PLC0415 - only the Python API needs torch

    if ckpt.extra.get("byteorder", "little") != "little":
        raise UnsupportedFormat("big-endian checkpoints cannot be materialized", path=ckpt.path)
    storages: dict[str, Any] = {}
    out: dict[str, Any] = {}
    for info in ckpt.tensors:
        t = info.tensor
        if t.storage is None:
            raise UnsupportedFormat(f"tensor {info.key!r} has no data in the file", path=ckpt.path)
        dtype = getattr(torch, t.dtype)
        if t.storage.id not in storages:
            data = _read(t.storage)
            storages[t.storage.id] = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(
                0, dtype=torch.uint8)
        flat = storages[t.storage.id]
        typed = flat[: len(flat) // dtype.itemsize * dtype.itemsize].view(dtype)
        out[info.key] = torch.as_strided(typed, t.shape, t.stride, t.storage_offset)
    return out
