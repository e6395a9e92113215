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
non-tensor values (``BYTE_IO``) as a saved object. ``.metadata`` already gives every tensor's
shape and dtype, so reading it touches no ``.distcp`` byte beyond a size check: each tensor gets a
:class:`DeferredRange` whose offset is found on first use (values, digests, fix), for all tensors
of that file in one pass of a few small reads per item (central directory, ``data.pkl``, local
header), so values stream from the ``.distcp`` file like any other format. The few non-tensor
values are small archives read eagerly. Tensors split into
several chunks (sharded saves), written through a transform (compression extensions) or saved
with ``SerializationFormat.SAFETENSORS`` keep shape and dtype but get no byte range; a note says so.
"""

from __future__ import annotations

import io
import math
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from ckptdoctor.errors import CkptDoctorError, CorruptCheckpoint, LimitExceeded, UnsupportedFormat
from ckptdoctor.formats.magic import ZIP_LOCAL_HEADER
from ckptdoctor.formats.pickle.stand_ins import SHARED_DIMS, StorageType, contiguous_stride
from ckptdoctor.formats.pickle.unpickler import load_pickle
from ckptdoctor.formats.readers.members import member_path
from ckptdoctor.formats.readers.torch_zip import LOCAL_HEADER
from ckptdoctor.formats.registry import DirectoryLayout
from ckptdoctor.io.rangefile import RangeFile
from ckptdoctor.io.storage import Storage, storage_for
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
        self._open: dict[str, tuple[IO[bytes], int, str]] = {}

    def close(self) -> None:
        for f, _, _ in self._open.values():
            f.close()

    def _file(self, relative_path: str) -> tuple[IO[bytes], int, str]:
        if relative_path not in self._open:
            path = member_path(self.directory, relative_path, ".metadata")
            try:
                opened: IO[bytes] = RangeFile(storage_for(path), path)  # type: ignore[assignment]
            except CkptDoctorError as exc:
                raise CorruptCheckpoint(f".metadata refers to {relative_path!r}, which cannot be opened "
                                        f"({exc.message})", path=self.directory) from None
            self._open[relative_path] = (opened, opened.size, path)  # type: ignore[attr-defined]
        return self._open[relative_path]

    def check(self, item: Item) -> str:
        """The item's file opens and holds its whole range (no byte of it is read); its path."""
        _, size, path = self._file(item.relative_path)
        if item.offset < 0 or item.length < 0 or item.offset + item.length > size:
            raise CorruptCheckpoint(f"an item at {item.relative_path}@{item.offset} (+{item.length}) lies past "
                                    f"the end of the {size}-byte file", path=self.directory)
        return path

    def starts_archive(self, item: Item) -> bool:
        """Whether the item starts like a torch.save archive (4 bytes read, once per checkpoint).

        ``SerializationFormat.SAFETENSORS`` writes one safetensors file per rank instead.
        """
        f, size, _ = self._file(item.relative_path)
        if item.offset + 4 > size:
            return True  # reported as past the end by check()
        f.seek(item.offset)
        return f.read(4) == ZIP_LOCAL_HEADER

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


# ---- byte ranges resolved on first use ---------------------------------------------------------

_EOCD = struct.Struct("<4sHHHHIIH")
_CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")
MAX_ARCHIVE_TAIL = 1 << 16


class DeferredRange(ByteRange):
    """A tensor's bytes inside a ``.distcp`` item: the file and length are known from
    ``.metadata``; the offset needs the item's archive, so it is found on first use, for every
    tensor of that file in one pass (:meth:`ItemResolver.resolve_file`). Metadata commands never
    ask for it and so never read a ``.distcp`` byte."""

    deferred = True

    def __init__(self, resolver: ItemResolver, item: Item, fqn: str, path: str, length: int) -> None:
        object.__setattr__(self, "path", path)
        object.__setattr__(self, "length", length)
        object.__setattr__(self, "_resolver", resolver)
        object.__setattr__(self, "_item", item)
        object.__setattr__(self, "_fqn", fqn)

    @property
    def offset(self) -> int:
        return self._resolver.offset(self._item, self._fqn)  # type: ignore[attr-defined]


class ItemResolver:
    """Finds where each tensor item's storage starts, one ``.distcp`` file at a time."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.pending: dict[str, list[tuple[Item, str, str, tuple[int, ...]]]] = {}
        self.found: dict[tuple[str, int], int] = {}

    def add(self, item: Item, fqn: str, dtype: str, shape: tuple[int, ...]) -> None:
        self.pending.setdefault(item.relative_path, []).append((item, fqn, dtype, shape))

    def offset(self, item: Item, fqn: str) -> int:
        key = (item.relative_path, item.offset)
        if key not in self.found:
            self.resolve_file(item.relative_path)
        return self.found[key]

    def resolve_file(self, relative_path: str) -> None:
        """Read every pending item of one file in offset order, with a few small reads each."""
        path = member_path(self.directory, relative_path, ".metadata")
        items = sorted(self.pending.pop(relative_path, []), key=lambda entry: entry[0].offset)
        source = _Source(storage_for(path), path)
        for item, fqn, dtype, shape in items:
            self.found[(relative_path, item.offset)] = _tensor_start(source, item, fqn, dtype, shape, self.directory)


@dataclass(frozen=True)
class _Source:
    """One ``.distcp`` file, read through the storage layer (local or remote alike)."""

    store: Storage
    path: str


def _pread(fd: _Source, size: int, offset: int, where: str, directory: str) -> bytes:
    try:
        data = fd.store.read_range(fd.path, offset, size)
    except CkptDoctorError as exc:
        raise CorruptCheckpoint(f"{where} cannot be read ({exc.message})", path=directory) from None
    if len(data) != size:
        raise CorruptCheckpoint(f"{where} is truncated", path=directory)
    return data


def _members(fd: _Source, item: Item, where: str, directory: str) -> dict[str, tuple[int, int, int]]:
    """name -> (local header offset, stored size, compression) from the item's central directory."""
    tail_size = min(item.length, MAX_ARCHIVE_TAIL)
    tail = _pread(fd, tail_size, item.offset + item.length - tail_size, where, directory)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or at + _EOCD.size > len(tail):
        raise CorruptCheckpoint(f"{where} is not a torch.save archive (no end of central directory)", path=directory)
    _, _, _, _, _, cd_size, cd_offset, _ = _EOCD.unpack_from(tail, at)
    if cd_offset == 0xFFFFFFFF or cd_size == 0xFFFFFFFF:
        z64 = tail.rfind(b"PK\x06\x06", 0, at)
        if z64 < 0 or z64 + 56 > len(tail):
            raise CorruptCheckpoint(f"{where}: malformed zip64 directory", path=directory)
        cd_size, cd_offset = struct.unpack_from("<QQ", tail, z64 + 40)
    if cd_offset + cd_size > item.length or cd_size > MAX_EMBEDDED_PICKLE:
        raise CorruptCheckpoint(f"{where}: the central directory lies outside the item", path=directory)
    central = _pread(fd, cd_size, item.offset + cd_offset, where, directory)
    out: dict[str, tuple[int, int, int]] = {}
    pos = 0
    while pos + _CENTRAL.size <= len(central):
        fields = _CENTRAL.unpack_from(central, pos)
        if fields[0] != b"PK\x01\x02":
            break
        method, size, name_len, extra_len, comment_len, header = fields[4], fields[9], fields[10], fields[11], \
            fields[12], fields[16]
        name = central[pos + _CENTRAL.size: pos + _CENTRAL.size + name_len].decode("utf-8", "replace")
        extra = central[pos + _CENTRAL.size + name_len: pos + _CENTRAL.size + name_len + extra_len]
        if 0xFFFFFFFF in (size, header):
            size, header = _zip64_sizes(extra, fields[9], fields[8], header)
        out[name] = (header, size, method)
        pos += _CENTRAL.size + name_len + extra_len + comment_len
    return out


def _zip64_sizes(extra: bytes, size: int, compressed: int, header: int) -> tuple[int, int]:
    """(uncompressed size, local header offset) with the zip64 extra field's values filled in."""
    pos = 0
    while pos + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, pos)
        if tag == 1:
            values = list(struct.unpack_from(f"<{length // 8}Q", extra, pos + 4))
            if size == 0xFFFFFFFF and values:
                size = values.pop(0)
            if compressed == 0xFFFFFFFF and values:
                values.pop(0)
            if header == 0xFFFFFFFF and values:
                header = values.pop(0)
            break
        pos += 4 + length
    return size, header


def _data_start(fd: _Source, item: Item, header: int, size: int, where: str, directory: str) -> int:
    local = _pread(fd, LOCAL_HEADER.size, item.offset + header, where, directory)
    fields = LOCAL_HEADER.unpack(local)
    if fields[0] != ZIP_LOCAL_HEADER:
        raise CorruptCheckpoint(f"{where}: a member has no valid local header", path=directory)
    start = header + LOCAL_HEADER.size + fields[9] + fields[10]
    if start + size > item.length:
        raise CorruptCheckpoint(f"{where}: a member extends past the item", path=directory)
    return start


def _tensor_start(fd: _Source, item: Item, fqn: str, dtype: str, shape: tuple[int, ...], directory: str) -> int:
    """File offset of the first byte of the tensor saved at ``item`` (checked against ``.metadata``)."""
    where = f"{item.relative_path}@{item.offset}"
    members = _members(fd, item, where, directory)
    pickles = sorted((n for n in members if n == "data.pkl" or n.endswith("/data.pkl")), key=len)
    if not pickles or members[pickles[0]][1] > MAX_EMBEDDED_PICKLE or members[pickles[0]][2] != 0:
        raise CorruptCheckpoint(f"{where} holds no readable data.pkl", path=directory)
    prefix = pickles[0][: -len("data.pkl")]
    header, size, _ = members[pickles[0]]
    start = _data_start(fd, item, header, size, where, directory)
    data = _pread(fd, size, item.offset + start, where, directory)
    storages: dict[str, tuple[str, int]] = {}

    def persistent_load(pid: Any) -> StorageInfo:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], StorageType) and isinstance(pid[2], str) and type(pid[4]) is int):
            raise CorruptCheckpoint(f"{where}: unexpected persistent id {pid!r:.80}", path=directory)
        storages[pid[2]] = (pid[1].dtype, pid[4])
        return StorageInfo(id=pid[2], dtype=pid[1].dtype, nbytes=pid[4] * DTYPE_BITS[pid[1].dtype] // 8)

    record = load_pickle(data, persistent_load, where=where, path=directory)
    if not isinstance(record, TensorRecord) or record.storage is None or record.dtype != dtype \
            or record.shape != shape:
        raise CorruptCheckpoint(f".metadata describes {fqn!r} as {dtype}{list(shape)} but its bytes hold "
                                f"{_describe(record)}", path=directory)
    if record.numel and (record.stride != contiguous_stride(shape) and not record.is_contiguous()):
        raise UnsupportedFormat(f"{fqn!r} is stored with strides {record.stride}, not contiguously",
                                path=directory)
    member = members.get(f"{prefix}data/{record.storage.id}")
    if member is None or member[2] != 0:
        raise CorruptCheckpoint(f"{where}: storage {record.storage.id!r} is missing or compressed", path=directory)
    first = _data_start(fd, item, member[0], member[1], where, directory)
    begin, end = record.byte_span()
    if end > member[1] or end > record.storage.nbytes:
        raise CorruptCheckpoint(f"{where}: storage {record.storage.id!r} holds fewer bytes than {fqn!r} needs",
                                path=directory)
    return item.offset + first + begin


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
    if type(value) is tuple and SHARED_DIMS.get(value) is value:
        return value  # a torch.Size the unpickler already checked (pickle_globals._check_dims)
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
    resolver: ItemResolver
    torch_save: bool | None = None  # items are torch.save archives (not SerializationFormat.SAFETENSORS)

    def tensor(self, fqn: str, fields: dict[str, Any]) -> TensorRecord:
        """The record from ``.metadata`` alone; its byte range is resolved on first use."""
        dtype, requires_grad = _properties(fields.get("properties"), fqn, self.directory)
        shape = _dims(fields.get("size"), f"the size of {fqn!r}", self.directory)
        chunks = fields.get("chunks")
        items = self.storage.get(fqn, [])
        whole = (isinstance(chunks, list) and len(chunks) == 1 and len(items) == 1
                 and not any(items[0][0]) and not items[0][1].transformed)
        if not whole:
            return self.unmapped(fqn, dtype, shape, requires_grad)
        item = items[0][1]
        path = self.files.check(item)
        if self.torch_save is None:
            self.torch_save = self.files.starts_archive(item)
        if not self.torch_save:
            return self.unmapped(fqn, dtype, shape, requires_grad)
        nbytes = math.prod(shape) * DTYPE_BITS[dtype] // 8
        self.resolver.add(item, fqn, dtype, shape)
        where = f"{item.relative_path}@{item.offset}"
        source = DeferredRange(self.resolver, item, fqn, path, nbytes)
        storage = StorageInfo(id=f"{fqn}@0", dtype=dtype, nbytes=nbytes, source=source, name=f"{where}/0")
        return TensorRecord(dtype=dtype, shape=shape, stride=contiguous_stride(shape), storage=storage,
                            requires_grad=requires_grad)

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
    storage = _storage_index(fields.get("storage_data"), directory)
    reader = DcpReader(directory, files, storage, [], ItemResolver(directory))
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
