"""A torch.distributed.checkpoint (DCP) directory, written without torch.

What ``FileSystemWriter`` writes for a single process (torch/distributed/checkpoint/filesystem.py):

* ``__0_0.distcp``: each tensor as a complete ``torch.save`` archive of itself, one after another
  (``_write_item``: ``torch.save(tensor, stream)``); here :func:`write_torch_zip` writes each one
  with the tensor's bytes streamed (and cast) from the source;
* ``.metadata``: a pickle of ``Metadata(state_dict_metadata, planner_data, storage_data,
  storage_meta, version)``, the dataclasses of torch/distributed/checkpoint/metadata.py, which
  :func:`metadata_tree` builds as :class:`OpaqueObject` records so the torch zip writer's
  pickler emits them exactly as ``pickle`` would (NEWOBJ + BUILD of the dataclass ``__dict__``;
  ``TensorProperties`` by its ``__getstate__`` tuple; ``torch.Size(tuple)``).

The keys are the flat state dict's: ``dcp.load(model.state_dict(), checkpoint_id=OUT)`` fills a
model's state dict in place.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from ckptdoctor.formats.pickle.stand_ins import DtypeRef, LayoutRef
from ckptdoctor.formats.writers.stream import Item, stream_item
from ckptdoctor.formats.writers.torch_zip import StorageCopy, StorageTable, TreePickler, write_torch_zip
from ckptdoctor.io.atomic import SourceFiles
from ckptdoctor.model.checkpoint import GlobalRef, OpaqueObject, StorageInfo, TensorRecord

METADATA = "torch.distributed.checkpoint.metadata"
FILESYSTEM = "torch.distributed.checkpoint.filesystem"
DATA_FILE = "__0_0.distcp"  # FileSystemWriter's name for rank 0's first file; __0_1 ... with thread_count > 1
VERSION = "1.0.0"  # torch/distributed/checkpoint/metadata.py Metadata.version default


def _obj(module: str, name: str, state: Any, *, args: tuple[Any, ...] = (), via: str = "newobj") -> OpaqueObject:
    return OpaqueObject(cls=GlobalRef(module, name), args=args, state=state, via=via)


def _size(dims: Sequence[int]) -> OpaqueObject:
    return _obj("torch", "Size", None, args=(tuple(dims),), via="reduce")


def _properties(dtype: str) -> OpaqueObject:
    # TensorProperties.__getstate__: (dtype, layout, requires_grad, memory_format, pin_memory);
    # the memory format is pickled as its _MEM_FORMAT_ENCODING member (0 = contiguous_format).
    memory_format = _obj(METADATA, "_MEM_FORMAT_ENCODING", None, args=(0,), via="reduce")
    return _obj(METADATA, "TensorProperties", (DtypeRef(dtype), LayoutRef("strided"), False, memory_format, False))


Record = tuple[Item, str, int, int]  # item, data file name, offset, length


def data_file(index: int) -> str:
    return f"__0_{index}.distcp"


def metadata_tree(records: Sequence[Record]) -> OpaqueObject:
    """The ``Metadata`` object for items written at (file, offset, length)."""
    state_dict_metadata: dict[str, Any] = {}
    storage_data: dict[Any, Any] = {}
    for item, name, offset, length in records:
        shape = item.tensor.shape
        chunk = _obj(METADATA, "ChunkStorageMetadata", {"offsets": _size([0] * len(shape)), "sizes": _size(shape)})
        state_dict_metadata[item.key] = _obj(METADATA, "TensorStorageMetadata", {
            "properties": _properties(item.dtype), "size": _size(shape), "chunks": [chunk]})
        index = _obj(METADATA, "MetadataIndex", {"fqn": item.key, "offset": _size([0] * len(shape)), "index": 0})
        storage_data[index] = _obj(FILESYSTEM, "_StorageInfo",
                                   {"relative_path": name, "offset": offset, "length": length})
    return _obj(METADATA, "Metadata", {
        "state_dict_metadata": state_dict_metadata,
        "planner_data": {record[0].key: (record[0].key,) for record in records},
        "storage_data": storage_data,
        "storage_meta": None,
        "version": VERSION,
    })


def metadata_bytes(records: Sequence[Record]) -> bytes:
    return TreePickler(StorageTable()).dump(metadata_tree(records))


def _record(item: Item, index: int) -> TensorRecord:
    written = item.written()
    source = item.tensor.storage.source if item.tensor.storage is not None else None
    storage = StorageInfo(id=str(index), dtype=item.dtype, nbytes=item.nbytes, device="cpu", source=source)
    return TensorRecord(dtype=written.dtype, shape=written.shape, stride=written.stride, storage=storage)


def _streaming_copy(sources: SourceFiles, item: Item, progress: Any) -> Callable[[StorageInfo], StorageCopy]:
    """The torch zip writer's copier for the item's one storage: its bytes as written (cast if asked)."""
    def copy(_sources: SourceFiles, _storage: StorageInfo, out_fd: int) -> int:
        return stream_item(sources, item, out_fd, with_crc=True, progress=progress)
    return lambda _storage: copy


def write_dcp_data(path: str, items: Sequence[Item], progress: Any = None) -> list[Record]:
    """Write a ``.distcp`` file at ``path``: one torch.save archive per item; return the records."""
    name = os.path.basename(path)
    records: list[Record] = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with SourceFiles() as sources:
            for index, item in enumerate(items):
                offset = os.lseek(fd, 0, os.SEEK_CUR)

                size, _ = write_torch_zip(fd, "archive", _record(item, index),
                                          storage_copy=_streaming_copy(sources, item, progress))
                records.append((item, name, offset, size))
        os.fsync(fd)
    finally:
        os.close(fd)
    return records
