"""Reader for torch.save's legacy format (torch < 1.6, or ``_use_new_zipfile_serialization=False``).

Layout (torch/serialization.py ``_legacy_save``): five pickles in a row: the magic number
``0x1950a86a20f9469cfc6c``, the protocol version (1001), a sys-info dict, the object tree, and
the list of storage keys; then, for each key in that order, an 8-byte little-endian element
count followed by the storage's raw bytes. Storages are persistent ids
``('storage', StorageType, root_key, location, numel, view_metadata)``.
"""

from __future__ import annotations

import io
import struct
from typing import Any

from ckptdoctor.errors import CorruptCheckpoint, LimitExceeded, UnsupportedFormat
from ckptdoctor.formats.pickle.stand_ins import PendingStorage, StorageType, UnknownGlobal
from ckptdoctor.formats.pickle.unpickler import read_pickle_stream
from ckptdoctor.formats.registry import FileFormat, Head
from ckptdoctor.io.rangefile import RangeFile
from ckptdoctor.io.storage import storage_for
from ckptdoctor.model.checkpoint import ByteRange, Checkpoint, StorageInfo, itemsize
from ckptdoctor.model.locate import build_checkpoint

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
MAX_STORAGES = 5_000_000


def read_legacy(path: str, entry: str | None = None) -> Checkpoint:
    store = storage_for(path)
    file_size = store.size(path)
    with io.BufferedReader(RangeFile(store, path, file_size, readahead=store.remote), 1 << 16) as f:
        magic = read_pickle_stream(f, where="the magic-number pickle", path=path)
        if magic != LEGACY_MAGIC:
            raise UnsupportedFormat("a pickle file, but not a torch.save checkpoint (no torch magic number)",
                                    path=path, hint="Plain pickles are not checkpoints; re-save with torch.save.")
        protocol = read_pickle_stream(f, where="the protocol pickle", path=path)
        if protocol != LEGACY_PROTOCOL:
            raise CorruptCheckpoint(f"unsupported legacy protocol version {protocol!r:.20}", path=path)
        sys_info = read_pickle_stream(f, where="the sys-info pickle", path=path)
        little_endian = not isinstance(sys_info, dict) or sys_info.get("little_endian", True)

        roots: dict[str, dict[str, Any]] = {}  # root_key -> {"type", "location", "numel"}
        views: list[tuple[str, str, int, int]] = []  # (view_key, root_key, offset, size) in elements

        def persistent_load(pid: Any) -> Any:
            if not isinstance(pid, tuple) or not pid:
                raise CorruptCheckpoint(f"unexpected persistent id {pid!r:.80}", path=path)
            kind = pid[0].decode("ascii", "replace") if isinstance(pid[0], bytes) else pid[0]
            if kind == "module" and len(pid) >= 2:
                return pid[1]  # a module class reference from torch.save(model): kept as data
            if kind != "storage" or len(pid) != 6:
                raise CorruptCheckpoint(f"unexpected persistent id {pid!r:.80}", path=path)
            _, storage_type, root_key, location, numel, view = pid
            if not isinstance(storage_type, StorageType) or not isinstance(root_key, str) or type(numel) is not int:
                raise CorruptCheckpoint(f"malformed storage reference {pid!r:.80}", path=path)
            if len(roots) > MAX_STORAGES:
                raise LimitExceeded("too many storages", path=path)
            roots.setdefault(root_key, {"type": storage_type, "location": location, "numel": numel})
            ref = PendingStorage(root_key, storage_type.dtype, 0, numel)
            if view is not None:
                view_key, offset, size = view
                views.append((view_key, root_key, offset, size))
                ref = PendingStorage(root_key, storage_type.dtype, offset, size)
            return ref

        root = read_pickle_stream(f, persistent_load, where="the main pickle", path=path)
        keys = read_pickle_stream(f, where="the storage-key pickle", path=path)
        if not isinstance(keys, list) or len(keys) > MAX_STORAGES:
            raise CorruptCheckpoint("the storage-key list is malformed", path=path)
        resolved: dict[str, StorageInfo] = {}
        offset = f.tell()
        for key in keys:
            if key not in roots:
                raise CorruptCheckpoint(f"storage {key!r} is listed but never used", path=path)
            info = roots[key]
            dtype = info["type"].dtype
            if store.remote:
                # Each storage's element count is in the metadata (the persistent id's numel), so its
                # offset follows without fetching the 8-byte count before it (never the tensor bytes).
                count = info["numel"]
            else:
                header = store.read_range(path, offset, 8)
                if len(header) != 8:
                    raise CorruptCheckpoint("the file ends before all storages (truncated)", path=path)
                (count,) = struct.unpack("<q" if little_endian else ">q", header)
            nbytes = count * itemsize(dtype)
            if count < 0:
                raise CorruptCheckpoint(f"storage {key!r} declares a negative element count ({count})", path=path)
            if offset + 8 + nbytes > file_size:
                raise CorruptCheckpoint(f"storage {key!r} declares {count} elements ({nbytes} bytes), which run "
                                        f"{offset + 8 + nbytes - file_size} bytes past the end of the file",
                                        path=path)
            location = info["location"]
            location = location.decode("ascii", "replace") if isinstance(location, bytes) else str(location)
            resolved[key] = StorageInfo(id=key, dtype=dtype, nbytes=nbytes, device=location,
                                        source=ByteRange(path, offset + 8, nbytes), name=key)
            offset += 8 + nbytes
    missing = set(roots) - set(resolved)
    if missing:
        raise CorruptCheckpoint(f"storage {sorted(missing)[0]!r} is used but its bytes are missing", path=path)
    tree = _attach_storages(root, resolved, path)
    return build_checkpoint(path, "torch-legacy", file_size, tree, entry=entry,
                            extra={"byteorder": "little" if little_endian else "big"})


def _attach_storages(node: Any, storages: dict[str, StorageInfo], path: str) -> Any:
    """Replace the placeholders the main pickle built with real storage records.

    Legacy files learn storage byte positions only after the main pickle, so tensors are
    rebuilt here. A legacy storage *view* (view_metadata) shifts the tensor's storage offset.
    """
    from dataclasses import replace  # noqa: PLC0415 - only the legacy path needs it

    from ckptdoctor.model.checkpoint import OpaqueObject, TensorRecord  # noqa: PLC0415

    seen: dict[int, Any] = {}

    def fix(value: Any, depth: int) -> Any:
        if depth > 200:
            raise LimitExceeded("object tree nests too deeply", path=path)
        if isinstance(value, TensorRecord) and isinstance(value.storage, PendingStorage):
            ref = value.storage
            return replace(value, storage=storages[ref.root_key], storage_offset=value.storage_offset + ref.offset)
        if id(value) in seen:
            return seen[id(value)]
        if isinstance(value, dict):
            seen[id(value)] = value
            for k in list(value):
                value[k] = fix(value[k], depth + 1)
        elif isinstance(value, list):
            seen[id(value)] = value
            value[:] = [fix(v, depth + 1) for v in value]
        elif isinstance(value, tuple):
            return tuple(fix(v, depth + 1) for v in value)
        elif isinstance(value, OpaqueObject):
            seen[id(value)] = value
            value.items = {k: fix(v, depth + 1) for k, v in value.items.items()}
            value.list_items = [fix(v, depth + 1) for v in value.list_items]
            value.state = fix(value.state, depth + 1)
        elif isinstance(value, (PendingStorage, UnknownGlobal)):
            return value
        return value

    return fix(node, 0)


def _sniff(head: Head) -> bool:
    # torch.load treats anything that is not a zip as a legacy pickle stream.
    return head.data[:1] == b"\x80"


FILE_FORMATS = (FileFormat("torch-legacy", 30, _sniff, read_legacy),)
