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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

from ckptdoctor.errors import CkptDoctorError, CorruptCheckpoint, LimitExceeded, UnsupportedFormat
from ckptdoctor.formats.magic import ZIP_LOCAL_HEADER
from ckptdoctor.formats.pickle.fast import gc_paused
from ckptdoctor.formats.pickle.stand_ins import StorageType, contiguous_stride
from ckptdoctor.formats.pickle.unpickler import load_pickle
from ckptdoctor.formats.readers.dcp_metadata import (
    DCP_MODULE,
    Fallback,
    Item,
    Metadata,
    StorageIndex,
    fast_metadata,
    generic_metadata,
)
from ckptdoctor.formats.readers.dcp_records import new_record, new_storage
from ckptdoctor.formats.readers.members import member_path
from ckptdoctor.formats.readers.torch_zip import LOCAL_HEADER
from ckptdoctor.formats.registry import DCP_METADATA, DirectoryLayout
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
            path = member_path(self.directory, relative_path, DCP_METADATA)
            try:
                opened: IO[bytes] = RangeFile(storage_for(path), path)  # type: ignore[assignment]
            except CkptDoctorError as exc:
                raise CorruptCheckpoint(f".metadata refers to {relative_path!r}, which cannot be opened "
                                        f"({exc.message})", path=self.directory) from None
            self._open[relative_path] = (opened, opened.size, path)  # type: ignore[attr-defined]
        return self._open[relative_path]

    def size_and_path(self, relative_path: str) -> tuple[int, str]:
        """The size and full path of an item file (opened once)."""
        _, size, path = self._file(relative_path)
        return size, path

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
    ask for it and so never read a ``.distcp`` byte. Slotted: a large checkpoint holds one per tensor.
    Its maker adds it to the resolver's ``pending`` list of its file (:meth:`DcpReader.tensor`)."""

    __slots__ = ("_dtype", "_fqn", "_item", "_resolver", "_shape")
    deferred = True
    _resolver: ItemResolver
    _item: Item
    _fqn: str
    _dtype: str
    _shape: tuple[int, ...]

    def __init__(self, resolver: ItemResolver, item: Item, fqn: str, path: str, length: int, dtype: str,
                 shape: tuple[int, ...]) -> None:
        # frozen: the slots are set through their descriptors (as object.__setattr__ would, faster)
        _SET_PATH(self, path)
        _SET_LENGTH(self, length)
        _SET_RESOLVER(self, resolver)
        _SET_ITEM(self, item)
        _SET_FQN(self, fqn)
        _SET_DTYPE(self, dtype)
        _SET_SHAPE(self, shape)

    @property  # ByteRange.offset is a field; here it is found on first use
    def offset(self) -> int:
        return self._resolver.offset(self._item)

    def recorded_crc32(self) -> int | None:
        """The CRC-32 the item's archive lists for its storage member, when these bytes are that
        whole member (found with the offset: see :func:`_tensor_start`)."""
        return self._resolver.crc32(self._item)


_SET_PATH, _SET_LENGTH = vars(ByteRange)["path"].__set__, vars(ByteRange)["length"].__set__
_SET_RESOLVER, _SET_ITEM, _SET_FQN, _SET_DTYPE, _SET_SHAPE = (
    vars(DeferredRange)[name].__set__ for name in ("_resolver", "_item", "_fqn", "_dtype", "_shape"))


class _DeferredTwin(ByteRange):
    """``DeferredRange(...)`` made as a same-layout twin, then retyped (see :mod:`.dcp_records`):
    half the cost of the seven slot setters, once per tensor. Both attribute hooks are object's
    own, so that its stores take CPython's fast path (a class with a Python ``__delattr__``, as
    the frozen ``ByteRange`` has, gets none)."""

    __slots__ = DeferredRange.__slots__
    __setattr__ = object.__setattr__
    __delattr__ = object.__delattr__

    def __init__(self, resolver: ItemResolver, item: Item, fqn: str, path: str, length: int, dtype: str,
                 shape: tuple[int, ...]) -> None:
        self.path = path  # type: ignore[misc]
        self.length = length  # type: ignore[misc]
        self._resolver = resolver
        self._item = item
        self._fqn = fqn
        self._dtype = dtype
        self._shape = shape
        self.__class__ = DeferredRange  # type: ignore[assignment]


def _deferred_twin_matches() -> bool:
    """Whether the twin makes what ``DeferredRange(...)`` makes (its fields and type)."""
    fields = ("path", "length", "_resolver", "_item", "_fqn", "_dtype", "_shape")
    args: tuple[Any, ...] = (None, None, "k", "p", 8, "float32", (2,))
    try:
        made: Any = _DeferredTwin(*args)
    except TypeError:  # the layouts differ: CPython refuses the retyping
        return False
    expected = DeferredRange(*args)
    return type(made) is DeferredRange and all(getattr(made, f) == getattr(expected, f) for f in fields)


new_deferred: Any = _DeferredTwin if _deferred_twin_matches() else DeferredRange


class ItemResolver:
    """Finds where each tensor item's storage starts, one ``.distcp`` file at a time."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.pending: dict[str, list[DeferredRange]] = {}
        self.found: dict[tuple[str, int], tuple[int, int | None]] = {}  # -> (offset, member CRC-32 or None)

    def _found(self, item: Item) -> tuple[int, int | None]:
        key = (item.relative_path, item.offset)
        if key not in self.found:
            self.resolve_file(item.relative_path)
        return self.found[key]

    def offset(self, item: Item) -> int:
        return self._found(item)[0]

    def crc32(self, item: Item) -> int | None:
        return self._found(item)[1]

    def resolve_file(self, relative_path: str) -> None:
        """Read every pending item of one file in offset order, with a few small reads each."""
        path = member_path(self.directory, relative_path, DCP_METADATA)
        pending = self.pending.get(relative_path, [])
        ranges = sorted(pending, key=lambda r: r._item.offset)
        pending.clear()  # emptied, not removed: the reader keeps appending to this list
        source = _Source(storage_for(path), path)
        for r in ranges:
            self.found[(relative_path, r._item.offset)] = _tensor_start(source, r._item, r._fqn, r._dtype, r._shape,
                                                                        self.directory)


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


def _members(fd: _Source, item: Item, where: str, directory: str) -> dict[str, tuple[int, int, int, int]]:
    """name -> (local header offset, stored size, compression, CRC-32) from the item's central directory."""
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
    out: dict[str, tuple[int, int, int, int]] = {}
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
        out[name] = (header, size, method, fields[7])
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


def _tensor_start(fd: _Source, item: Item, fqn: str, dtype: str, shape: tuple[int, ...], directory: str
                  ) -> tuple[int, int | None]:
    """File offset of the first byte of the tensor saved at ``item`` (checked against ``.metadata``),
    and the CRC-32 the archive lists for its storage member when the tensor's bytes are exactly
    that member (a tensor saved whole, not a view into a larger storage), else None."""
    where = f"{item.relative_path}@{item.offset}"
    members = _members(fd, item, where, directory)
    pickles = sorted((n for n in members if n == "data.pkl" or n.endswith("/data.pkl")), key=len)
    if not pickles or members[pickles[0]][1] > MAX_EMBEDDED_PICKLE or members[pickles[0]][2] != 0:
        raise CorruptCheckpoint(f"{where} holds no readable data.pkl", path=directory)
    prefix = pickles[0][: -len("data.pkl")]
    header, size, _, _ = members[pickles[0]]
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
    whole = begin == 0 and end == member[1]
    return item.offset + first + begin, member[3] if whole else None


# ---- the checkpoint tree ----------------------------------------------------------------------

class DcpReader:
    """Turns ``.metadata``'s entries into records and values."""

    def __init__(self, directory: str, files: DcpFiles, storage: StorageIndex) -> None:
        self.directory, self.files, self.storage = directory, files, storage
        self.notes: list[str] = []
        self.resolver = ItemResolver(directory)
        self.torch_save: bool | None = None  # items are torch.save archives (not SerializationFormat.SAFETENSORS)
        self.unmapped_count = 0
        self._layouts: dict[tuple[int, ...], tuple[tuple[int, ...], int]] = {}  # shape -> (stride, numel)
        # relative path -> (size, path, its ranges pending resolution), once opened
        self._files: dict[str, tuple[int, str, list[DeferredRange]]] = {}

    def tensor(self, fqn: str, dtype: str, shape: tuple[int, ...], requires_grad: bool, chunks: int) -> TensorRecord:
        """The record from ``.metadata`` alone; its byte range is resolved on first use.

        Runs once per entry (200,000 in a large run's ``.metadata``): what depends only on the
        shape, or only on the item's file (its size, path and pending list), is looked up once,
        and the three records are made by their twins (:mod:`.dcp_records`).
        """
        layout = self._layouts.get(shape)
        if layout is None:
            layout = self._layouts[shape] = (contiguous_stride(shape), math.prod(shape))
        stride = layout[0]
        nbytes = layout[1] * DTYPE_BITS[dtype] // 8
        found = self.storage.get(fqn)
        # one chunk, saved whole, without a transform: one run of bytes in one file
        if chunks == 1 and type(found) is tuple and not found[1].transform_descriptors and not any(found[0]):
            item = found[1]
            # the bounds of `files.check`, without a call once the file is open
            opened = self._files.get(item.relative_path)
            if opened is None or item.offset < 0 or item.length < 0 or item.offset + item.length > opened[0]:
                self.files.check(item)  # raises when out of bounds
                size, path = self.files.size_and_path(item.relative_path)
                opened = self._files[item.relative_path] = (
                    size, path, self.resolver.pending.setdefault(item.relative_path, []))
            if self.torch_save is None:
                self.torch_save = self.files.starts_archive(item)
            if self.torch_save:
                source = new_deferred(self.resolver, item, fqn, opened[1], nbytes, dtype, shape)
                opened[2].append(source)
                storage = new_storage(f"{fqn}@0", dtype, nbytes, source, f"{item.relative_path}@{item.offset}/0")
                return new_record(dtype, shape, stride, storage, requires_grad)
        # several chunks, a transform, or not a torch.save archive: metadata only (``source=None``)
        self.unmapped_count += 1
        return new_record(dtype, shape, stride, new_storage(f"{fqn}@", dtype, nbytes, None, fqn), requires_grad)

    def value(self, fqn: str) -> Any:
        """A non-tensor entry: the saved object as data when small and readable, else opaque."""
        found = self.storage.get(fqn)
        placeholder = OpaqueObject(GlobalRef(DCP_MODULE, "BytesStorageMetadata"), state={"fqn": fqn})
        if type(found) is not tuple or found[1].transformed or found[1].length > MAX_BYTES_ITEM:
            return placeholder
        try:
            return self.files.load_item(found[1], f"{fqn}@")
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
    if isinstance(path, tuple) and path and len(path) <= MAX_TREE_DEPTH:
        try:  # the common case, all parts strings: one join in C checks their types and the key
            return path if ".".join(path) == fqn else (fqn,)
        except TypeError:  # an int part (param_groups, a list index), or not a key part at all
            pass
        for part in path:  # a plain loop: the cheapest check for a few parts
            if not isinstance(part, (str, int)):
                return (fqn,)
        if ".".join(map(str, path)) == fqn:
            return path
    return (fqn,)


class _Tree:
    """The nested state dict DCP flattened, rebuilt from each key's path (``planner_data``).

    Consecutive keys mostly share their parent (``model.layers.3.*``), so the last parent is
    kept and the walk from the root is skipped when the next key has the same one.
    """

    def __init__(self, directory: str) -> None:
        self.root: dict[Any, Any] = {}
        self.directory = directory
        self._parent_path: tuple[Any, ...] = ()
        self._parent: dict[Any, Any] = self.root
        self.nodes = {id(self.root)}  # the dicts made here (values read from items may be dicts too)

    def insert(self, path: tuple[Any, ...], value: Any) -> None:
        parent_path = path[:-1]
        if parent_path == self._parent_path:
            node = self._parent
        else:
            node = self.root
            for part in parent_path:
                if part not in node:
                    child = node[part] = {}
                    self.nodes.add(id(child))
                elif not isinstance(child := node[part], dict):
                    raise CorruptCheckpoint(f".metadata: {'.'.join(map(str, path))!r} nests inside a value",
                                            path=self.directory)
                node = child
            self._parent_path, self._parent = parent_path, node
        if path[-1] in node:
            raise CorruptCheckpoint(f".metadata: {'.'.join(map(str, path))!r} appears twice", path=self.directory)
        node[path[-1]] = value


def _lists(node: dict[Any, Any], nodes: set[int], depth: int = 0) -> Any:
    """Turn the tree's dicts keyed 0..n-1 by ints back into the lists they were (``param_groups``,
    ``optim.state``), as torch's unflattening does; values read from items are left as they are."""
    if depth > MAX_TREE_DEPTH:
        return node
    for key, value in node.items():
        if type(value) is dict and id(value) in nodes:
            node[key] = _lists(value, nodes, depth + 1)
    if node and all(type(k) is int for k in node) and sorted(node) == list(range(len(node))):
        return [node[i] for i in range(len(node))]
    return node


def _items(storage: StorageIndex) -> Iterator[Item]:
    for found in storage.values():
        if type(found) is tuple:
            yield found[1]
        else:
            yield from (item for _, item in found)


def _file_size(directory: str, name: str) -> int:
    try:
        path = member_path(directory, name, DCP_METADATA)
        return storage_for(path).size(path)
    except CkptDoctorError:
        return 0


def read_dcp(directory: str, entry: str | None = None) -> Checkpoint:
    """Read a DCP checkpoint directory's metadata; each tensor's bytes are located on first use."""
    store = storage_for(directory)
    meta_path = store.join(directory, DCP_METADATA)
    size = store.size(meta_path)
    if size > MAX_METADATA_BYTES:
        raise LimitExceeded(f".metadata is {size} bytes (limit {MAX_METADATA_BYTES})", path=directory)
    with gc_paused():  # millions of objects, none of them garbage: the collector would rescan them all
        metadata = fast_metadata(store.read_range(meta_path, 0, size), directory)
        if metadata is not None:
            try:
                return _checkpoint(directory, metadata, size, entry)
            except Fallback:
                pass
        root = load_pickle(store.read_range(meta_path, 0, size), None, where=DCP_METADATA, path=directory)
        return _checkpoint(directory, generic_metadata(root, directory), size, entry)


def _checkpoint(directory: str, metadata: Metadata, size: int, entry: str | None) -> Checkpoint:
    """The checkpoint of one ``.metadata``; raises :class:`Fallback` on a fast-path surprise."""
    files = DcpFiles(directory)
    reader = DcpReader(directory, files, metadata.storage)
    tree = _Tree(directory)
    read_entry, planner_data, fast = metadata.entry, metadata.planner_data, metadata.fast
    try:
        for fqn, md in metadata.entries.items():
            if not isinstance(fqn, str):
                if fast:
                    raise Fallback  # the generic path names the key as it reads it
                raise CorruptCheckpoint(f".metadata: a key is not a string: {fqn!r:.60}", path=directory)
            found = read_entry(md, fqn)
            value = reader.value(fqn) if found is None else reader.tensor(fqn, *found)
            tree.insert(_key_path(fqn, planner_data), value)
    finally:
        files.close()
    if reader.unmapped_count:
        reader.notes.append(f"{reader.unmapped_count} tensors are stored in several chunks, through a transform or "
                            "not as torch.save archives (sharded, compressed or safetensors-format save); their "
                            "shapes and dtypes are known but their bytes are not mapped")
    files_used = sorted({item.relative_path for item in _items(reader.storage)})
    total = size + sum(_file_size(directory, name) for name in files_used)
    extra = {"dcp_version": metadata.version, "files": files_used}
    return build_checkpoint(directory, "dcp", total, _lists(tree.root, tree.nodes), entry=entry, extra=extra,
                            notes=tuple(reader.notes))


def _pick_metadata(names: list[str], path: str) -> str | None:
    return DCP_METADATA if DCP_METADATA in names else None


DIRECTORY_LAYOUTS = (DirectoryLayout("dcp", 20, _pick_metadata, lambda d, _name, entry: read_dcp(d, entry)),)
