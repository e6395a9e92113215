"""Reader for torch.distributed.checkpoint (DCP) directories.

Layout (torch/distributed/checkpoint/filesystem.py, metadata.py): ``.metadata`` is a plain
pickle of a ``Metadata`` dataclass, read here by the allowlisting unpickler, so every dataclass
arrives as an :class:`OpaqueObject` whose ``state`` holds its fields:

* ``state_dict_metadata``: flattened key (fqn) -> ``TensorStorageMetadata(properties, size, chunks)``
  or ``BytesStorageMetadata()``, in the saved state dict's order. ``TensorProperties`` pickles
  as a tuple ``(dtype, layout, requires_grad, memory-format enum, pin_memory)`` (its
  ``__getstate__``); older torch pickled it as a dict.
* ``storage_data``: ``MetadataIndex(fqn, offset, index)`` -> ``_StorageInfo(relative_path, offset,
  length[, transform_descriptors])``: where each chunk's bytes lie in the ``*.distcp`` files.
* ``planner_data``: fqn -> the key path in the original nested state dict (``_flatten_state_dict``),
  which lets us rebuild ``{"model": {...}, "optim": {...}}`` so the state dict is found under ``model``.

With the default ``SerializationFormat.TORCH_SAVE``, ``_write_item`` writes every item as a
complete ``torch.save`` zip archive at ``[offset, offset + length)``: tensors as a saved tensor,
non-tensor values (``BYTE_IO``) as a saved object. We read each archive's central directory and
tiny ``data.pkl`` in place and point the tensor's :class:`ByteRange` at the raw storage inside
it, so values stream from the ``.distcp`` file like any other format. Tensors split into
several chunks (sharded saves), written through a transform (compression extensions) or saved
with ``SerializationFormat.SAFETENSORS`` keep shape and dtype but get no byte range; a note says so.
"""

from __future__ import annotations

import io
import math
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from ckptdoctor.errors import CkptDoctorError, CorruptCheckpoint, LimitExceeded, UnsupportedFormat
from ckptdoctor.formats.magic import ZIP_LOCAL_HEADER
from ckptdoctor.formats.pickle.stand_ins import StorageType, contiguous_stride
from ckptdoctor.formats.pickle.unpickler import load_pickle
from ckptdoctor.formats.readers.members import member_path
from ckptdoctor.formats.readers.torch_zip import LOCAL_HEADER
from ckptdoctor.formats.registry import DirectoryLayout
from ckptdoctor.io.rangefile import RangeFile
from ckptdoctor.io.storage import storage_for
from ckptdoctor.model.checkpoint import (
    DTYPE_BITS,
    ByteRange,
    Checkpoint,
    GlobalRef,
    OpaqueObject,
    StorageInfo,
    TensorRecord,
)
from ckptdoctor.model.locate import build_checkpoint

DCP_MODULE = "torch.distributed.checkpoint.metadata"
DCP_MODULES = frozenset({DCP_MODULE, "torch.distributed.checkpoint.filesystem"})  # _StorageInfo lives in the latter
MAX_METADATA_BYTES = 1 << 30
MAX_EMBEDDED_PICKLE = 16 << 20
MAX_BYTES_ITEM = 1 << 20  # non-tensor values larger than this are kept opaque, not read
MAX_TREE_DEPTH = 100


class FileSlice(io.RawIOBase):
    """A read-only, seekable window ``[start, start + length)`` of an open file, for ``zipfile``."""

    def __init__(self, f: IO[bytes], start: int, length: int) -> None:
        super().__init__()
        self._f, self._start, self._length, self._pos = f, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        count = max(0, min(len(view), self._length - self._pos))
        self._f.seek(self._start + self._pos)
        data = self._f.read(count)
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)


@dataclass(frozen=True)
class Item:
    """Where one DCP item's bytes lie: ``length`` bytes at ``offset`` of ``relative_path``."""

    relative_path: str
    offset: int
    length: int
    transformed: bool


class DcpFiles:
    """The ``*.distcp`` files of a directory, opened once each, and the archives inside them."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._open: dict[str, tuple[IO[bytes], int]] = {}

    def close(self) -> None:
        for f, _ in self._open.values():
            f.close()

    def _file(self, relative_path: str) -> tuple[IO[bytes], int, str]:
        path = member_path(self.directory, relative_path, ".metadata")
        if relative_path not in self._open:
            try:
                opened: IO[bytes] = RangeFile(storage_for(path), path)  # type: ignore[assignment]
            except CkptDoctorError as exc:
                raise CorruptCheckpoint(f".metadata refers to {relative_path!r}, which cannot be opened "
                                        f"({exc.message})", path=self.directory) from None
            self._open[relative_path] = (opened, opened.size)  # type: ignore[attr-defined]
        f, size = self._open[relative_path]
        return f, size, path

    def load_item(self, item: Item, id_prefix: str) -> Any:
        """The object a ``torch.save`` archive embedded at ``item`` holds, tensors as records."""
        f, size, path = self._file(item.relative_path)
        if item.offset < 0 or item.length < 0 or item.offset + item.length > size:
            raise CorruptCheckpoint(f"an item at {item.relative_path}@{item.offset} (+{item.length}) lies past "
                                    f"the end of the {size}-byte file", path=self.directory)
        where = f"{item.relative_path}@{item.offset}"
        f.seek(item.offset)
        if f.read(4) != ZIP_LOCAL_HEADER:
            # SerializationFormat.SAFETENSORS writes one safetensors file per rank instead of archives.
            raise UnsupportedFormat(f"{where} is not a torch.save archive", path=self.directory)
        try:
            archive = zipfile.ZipFile(FileSlice(f, item.offset, item.length))
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            raise CorruptCheckpoint(f"{where} is not a torch.save archive ({exc})", path=self.directory) from None
        with archive:
            members = {info.filename: info for info in archive.infolist()}
            pickles = sorted((n for n in members if n == "data.pkl" or n.endswith("/data.pkl")), key=len)
            if not pickles or members[pickles[0]].file_size > MAX_EMBEDDED_PICKLE:
                raise CorruptCheckpoint(f"{where} holds no readable data.pkl", path=self.directory)
            prefix = pickles[0][: -len("data.pkl")]
            data = archive.read(members[pickles[0]])
        resolve = self._storage_resolver(f, item, path, members, prefix, id_prefix)
        return load_pickle(data, resolve, where=where, path=self.directory)

    def _storage_resolver(self, f: IO[bytes], item: Item, path: str, members: dict[str, zipfile.ZipInfo],
                          prefix: str, id_prefix: str) -> Callable[[Any], StorageInfo]:
        """persistent_load for an embedded archive: ``('storage', type, key, location, numel)``."""
        where = f"{item.relative_path}@{item.offset}"

        def resolve(pid: Any) -> StorageInfo:
            if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                    and isinstance(pid[1], StorageType) and isinstance(pid[2], str) and type(pid[4]) is int):
                raise CorruptCheckpoint(f"{where}: unexpected persistent id {pid!r:.80}", path=self.directory)
            _, storage_type, key, location, numel = pid
            info = members.get(f"{prefix}data/{key}")
            if info is None or info.compress_type != zipfile.ZIP_STORED:
                raise CorruptCheckpoint(f"{where}: storage {key!r} is missing or compressed", path=self.directory)
            start = _member_data_start(f, item, info, where, self.directory)
            nbytes = numel * DTYPE_BITS[storage_type.dtype] // 8
            if numel < 0 or nbytes > info.file_size:
                raise CorruptCheckpoint(f"{where}: storage {key!r} declares {nbytes} bytes but holds "
                                        f"{info.file_size}", path=self.directory)
            device = location if isinstance(location, str) and len(location) <= 64 else "cpu"
            return StorageInfo(id=f"{id_prefix}{key}", dtype=storage_type.dtype, nbytes=nbytes, device=device,
                               source=ByteRange(path, item.offset + start, nbytes), name=f"{where}/{key}",
                               crc32=info.CRC if nbytes == info.file_size else None)

        return resolve


def _member_data_start(f: IO[bytes], item: Item, info: zipfile.ZipInfo, where: str, directory: str) -> int:
    """Offset, within the embedded archive, of a stored member's first data byte (local header)."""
    f.seek(item.offset + info.header_offset)
    header = f.read(LOCAL_HEADER.size)
    if len(header) != LOCAL_HEADER.size or header[:4] != ZIP_LOCAL_HEADER:
        raise CorruptCheckpoint(f"{where}: member {info.filename} has no valid local header", path=directory)
    fields = LOCAL_HEADER.unpack(header)
    start = info.header_offset + LOCAL_HEADER.size + fields[9] + fields[10]
    if start + info.file_size > item.length:
        raise CorruptCheckpoint(f"{where}: member {info.filename} extends past the item", path=directory)
    return start


# ---- the Metadata object tree -----------------------------------------------------------------

def _fields(node: Any, cls: str, what: str, directory: str) -> dict[str, Any]:
    """The dataclass fields of a pickled DCP object of class ``cls``."""
    if not (isinstance(node, OpaqueObject) and node.cls.module in DCP_MODULES and node.cls.name == cls):
        found = node.cls.dotted if isinstance(node, OpaqueObject) else type(node).__name__
        raise CorruptCheckpoint(f".metadata: {what} is a {found}, expected {cls}", path=directory)
    return dict(node.state_dict_view())


def _properties(node: Any, fqn: str, directory: str) -> tuple[str, bool]:
    """(dtype, requires_grad) of a ``TensorProperties`` (tuple state since torch 2.2, dict before)."""
    if isinstance(node, OpaqueObject) and isinstance(node.state, tuple) and len(node.state) == 5:
        dtype, requires_grad = node.state[0], node.state[2]
    else:
        fields = _fields(node, "TensorProperties", f"the properties of {fqn!r}", directory)
        dtype, requires_grad = fields.get("dtype"), fields.get("requires_grad", False)
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise CorruptCheckpoint(f".metadata: {fqn!r} has an invalid dtype {dtype!r:.40}", path=directory)
    return str(dtype), bool(requires_grad)


def _dims(value: Any, what: str, directory: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or len(value) > 64 or not all(
            type(v) is int and 0 <= v < 1 << 62 for v in value):
        raise CorruptCheckpoint(f".metadata: {what} is not a list of sizes: {value!r:.60}", path=directory)
    return tuple(value)


def _storage_index(storage_data: Any, directory: str) -> dict[str, list[tuple[tuple[int, ...], Item]]]:
    """fqn -> [(chunk offset, item)] from ``storage_data``."""
    if not isinstance(storage_data, dict):
        raise CorruptCheckpoint(".metadata has no storage_data mapping", path=directory)
    out: dict[str, list[tuple[tuple[int, ...], Item]]] = {}
    for key, value in storage_data.items():
        index = _fields(key, "MetadataIndex", "a storage_data key", directory)
        info = _fields(value, "_StorageInfo", "a storage_data value", directory)
        fqn, rel, offset, length = index.get("fqn"), info.get("relative_path"), info.get("offset"), info.get("length")
        if not isinstance(fqn, str) or not isinstance(rel, str) or type(offset) is not int or type(length) is not int:
            raise CorruptCheckpoint(f".metadata: malformed storage entry for {fqn!r:.80}", path=directory)
        chunk = _dims(index.get("offset") or (), f"the chunk offset of {fqn!r}", directory)
        item = Item(rel, offset, length, bool(info.get("transform_descriptors")))
        out.setdefault(fqn, []).append((chunk, item))
    return out


@dataclass
class DcpReader:
    """Turns the pickled ``Metadata`` into an object tree of records and values."""

    directory: str
    files: DcpFiles
    storage: dict[str, list[tuple[tuple[int, ...], Item]]]
    notes: list[str]

    def tensor(self, fqn: str, fields: dict[str, Any]) -> TensorRecord:
        dtype, requires_grad = _properties(fields.get("properties"), fqn, self.directory)
        shape = _dims(fields.get("size"), f"the size of {fqn!r}", self.directory)
        chunks = fields.get("chunks")
        items = self.storage.get(fqn, [])
        whole = (isinstance(chunks, list) and len(chunks) == 1 and len(items) == 1
                 and not any(items[0][0]) and not items[0][1].transformed)
        if whole:
            try:
                record = self.files.load_item(items[0][1], f"{fqn}@")
            except UnsupportedFormat:
                return self.unmapped(fqn, dtype, shape, requires_grad)
            if not isinstance(record, TensorRecord) or record.dtype != dtype or record.shape != shape:
                raise CorruptCheckpoint(f".metadata describes {fqn!r} as {dtype}{list(shape)} but its bytes hold "
                                        f"{_describe(record)}", path=self.directory)
            return TensorRecord(dtype=dtype, shape=shape, stride=record.stride, storage_offset=record.storage_offset,
                                storage=record.storage, requires_grad=requires_grad)
        return self.unmapped(fqn, dtype, shape, requires_grad)

    @staticmethod
    def unmapped(fqn: str, dtype: str, shape: tuple[int, ...], requires_grad: bool) -> TensorRecord:
        """A tensor whose bytes are not one plain run in a file: metadata only (``source=None``)."""
        nbytes = math.prod(shape) * DTYPE_BITS[dtype] // 8
        storage = StorageInfo(id=f"{fqn}@", dtype=dtype, nbytes=nbytes, source=None, name=fqn)
        return TensorRecord(dtype=dtype, shape=shape, stride=contiguous_stride(shape), storage=storage,
                            requires_grad=requires_grad)

    def value(self, fqn: str) -> Any:
        """A non-tensor entry: the saved object as data when small and readable, else opaque."""
        items = self.storage.get(fqn, [])
        placeholder = OpaqueObject(GlobalRef(DCP_MODULE, "BytesStorageMetadata"), state={"fqn": fqn})
        if len(items) != 1 or items[0][1].transformed or items[0][1].length > MAX_BYTES_ITEM:
            return placeholder
        try:
            return self.files.load_item(items[0][1], f"{fqn}@")
        except CkptDoctorError as exc:
            self.notes.append(f"the value of {fqn!r} was not read: {exc.message}")
            return placeholder


def _describe(record: Any) -> str:
    if isinstance(record, TensorRecord):
        return f"{record.dtype}{list(record.shape)}"
    return f"a {type(record).__name__}"


def _key_path(fqn: str, planner_data: Any) -> tuple[Any, ...]:
    """The nested key path of ``fqn`` (``planner_data``), or the flat key when it does not match."""
    path = planner_data.get(fqn) if isinstance(planner_data, dict) else None
    if (isinstance(path, tuple) and path and len(path) <= MAX_TREE_DEPTH
            and all(isinstance(p, (str, int)) for p in path) and ".".join(map(str, path)) == fqn):
        return path
    return (fqn,)


def _insert(tree: dict[Any, Any], path: tuple[Any, ...], value: Any, directory: str) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise CorruptCheckpoint(f".metadata: {'.'.join(map(str, path))!r} nests inside a value",
                                    path=directory)
        node = child
    if path[-1] in node:
        raise CorruptCheckpoint(f".metadata: {'.'.join(map(str, path))!r} appears twice", path=directory)
    node[path[-1]] = value


def _lists(node: Any, depth: int = 0) -> Any:
    """Turn dicts keyed 0..n-1 by ints back into the lists they were (``param_groups``)."""
    if not isinstance(node, dict) or depth > MAX_TREE_DEPTH:
        return node
    converted = {k: _lists(v, depth + 1) for k, v in node.items()}
    if converted and all(type(k) is int for k in converted) and sorted(converted) == list(range(len(converted))):
        return [converted[i] for i in range(len(converted))]
    return converted


def _file_size(directory: str, name: str) -> int:
    try:
        path = member_path(directory, name, ".metadata")
        return storage_for(path).size(path)
    except CkptDoctorError:
        return 0


def read_dcp(directory: str, entry: str | None = None) -> Checkpoint:
    """Read a DCP checkpoint directory's metadata and locate each tensor's bytes."""
    store = storage_for(directory)
    meta_path = store.join(directory, ".metadata")
    size = store.size(meta_path)
    if size > MAX_METADATA_BYTES:
        raise LimitExceeded(f".metadata is {size} bytes (limit {MAX_METADATA_BYTES})", path=directory)
    metadata = load_pickle(store.read_range(meta_path, 0, size), None, where=".metadata", path=directory)
    fields = _fields(metadata, "Metadata", "the .metadata pickle", directory)
    entries = fields.get("state_dict_metadata")
    if not isinstance(entries, dict):
        raise CorruptCheckpoint(".metadata has no state_dict_metadata mapping", path=directory)
    files = DcpFiles(directory)
    reader = DcpReader(directory, files, _storage_index(fields.get("storage_data"), directory), [])
    tree: dict[Any, Any] = {}
    split = 0
    try:
        for fqn, md in entries.items():
            if not isinstance(fqn, str):
                raise CorruptCheckpoint(f".metadata: a key is not a string: {fqn!r:.60}", path=directory)
            if isinstance(md, OpaqueObject) and md.cls.name == "BytesStorageMetadata":
                value = reader.value(fqn)
            else:
                value = reader.tensor(fqn, _fields(md, "TensorStorageMetadata", f"the entry {fqn!r}", directory))
                split += value.storage is not None and value.storage.source is None
            _insert(tree, _key_path(fqn, fields.get("planner_data")), value, directory)
    finally:
        files.close()
    if split:
        reader.notes.append(f"{split} tensors are stored in several chunks, through a transform or not as "
                            "torch.save archives (sharded, compressed or safetensors-format save); their "
                            "shapes and dtypes are known but their bytes are not mapped")
    files_used = sorted({item.relative_path for items in reader.storage.values() for _, item in items})
    total = size + sum(_file_size(directory, name) for name in files_used)
    extra = {"dcp_version": fields.get("version"), "files": files_used}
    return build_checkpoint(directory, "dcp", total, _lists(tree), entry=entry, extra=extra,
                            notes=tuple(reader.notes))


def _pick_metadata(names: list[str], path: str) -> str | None:
    return ".metadata" if ".metadata" in names else None


DIRECTORY_LAYOUTS = (DirectoryLayout("dcp", 20, _pick_metadata, lambda d, _name, entry: read_dcp(d, entry)),)
