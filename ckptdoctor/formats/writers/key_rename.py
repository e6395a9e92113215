"""``fix``'s fast path for a torch.save zip whose repair only renames keys.

When the new state dict holds exactly the source's values, in the source's order, under other
names (``--strip module.``, ``--add-prefix``, ``--rename``, most ``--against`` repairs), the
repaired file is the source archive with the key strings in ``data.pkl`` replaced: every storage
record, every other member and every other pickle opcode stays byte for byte as it was. This
module writes exactly that, so a 200,000-tensor file is not re-pickled from the object tree,
and its storages are copied as one range (``copy_file_range``: a reflink or a server-side
copy where the filesystem offers one).

Why the substitution is exact, and how it is proved before anything is written:

1. ``data.pkl`` is tokenised by one regular expression from its first byte to ``STOP``
   (:func:`.fast.opcode_pattern`: the opcodes ``torch.save`` emits, memo indices bounded as the
   C-unpickler pre-pass bounds them), every ``BINUNICODE`` returned as a token. So each
   candidate is a whole string opcode at an opcode boundary, never bytes inside another one.
2. Every string opcode whose text is an old key is replaced by one carrying the new text; the
   replacements must number exactly the keys that change (one opcode per key).
3. The new pickle is unpickled by the C unpickler with inert stand-ins that keep every argument
   (so every use of a string stays visible), and the dictionary at the state dict's path must
   hold exactly the new keys in order. Only string texts changed, so each renamed key's text
   comes from a replaced opcode; there are as many replaced opcodes as renamed keys, so the
   replaced opcodes are exactly those keys. Each of those string objects must then be
   referenced by its dictionary alone (:func:`sys.getrefcount`, calibrated): a string the
   pickle's memo also hands to another place (an EMA copy sharing the key objects, a list of
   parameter names) would have been renamed there too, and sends the repair to the general
   writer instead.

Anything this path does not handle returns ``None`` and ``fix`` takes the general writer:
reordered or dropped keys, a ``_metadata`` whose entries merge, other globals in the pickle,
protocol 4 frames, a compressed ``data.pkl``, a remote source, offsets that would cross 4 GiB.

The archive then keeps its layout: the new ``data.pkl`` record replaces the old one, the
records after it move by a multiple of 64 bytes (its padding absorbs the rest), so every
storage stays 64-byte aligned; the central directory and end records are patched by the same
shift. The output is read back (end records, central directory, ``data.pkl`` and its CRC-32,
the local headers around the moved range) before it replaces OUT.
"""

from __future__ import annotations

import collections
import itertools
import operator
import os
import pickle
import re
import struct
import sys
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from ckptdoctor.formats.pickle.fast import c_unpickler_input, key_tokens
from ckptdoctor.formats.readers.zip_directory import FLAG_UTF8, BadZip, Member, ZipDirectory
from ckptdoctor.formats.writers.read_back import ReadBackError
from ckptdoctor.formats.writers.torch_zip import ALIGNMENT, CENTRAL, END, LOCAL, U32_MAX, ZIP64_END, ZIP64_LOCATOR
from ckptdoctor.io.atomic import EarlyWriteback, atomic_output
from ckptdoctor.io.rangefile import RangeFile
from ckptdoctor.io.storage import LocalStorage, storage_for
from ckptdoctor.model.checkpoint import Checkpoint

DESCRIPTOR_SIG = b"PK\x07\x08"
FLAG_DESCRIPTOR = 0x8
PADDING_ID = b"FB"  # the extra field torch's writer pads local headers with
COPY_STEP = EarlyWriteback.STEP  # per copy_file_range call (the kernel moves the bytes), then writeback starts
USER_COPY_STEP = 8 << 20  # per read/write when the kernel cannot copy between the two files
_U32 = struct.Struct("<I")
REBUILD_FUNCTIONS = frozenset({("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter")})


class NotEligible(Exception):
    """This repair is not a pure key rename of this archive: the general writer does it."""


@dataclass(frozen=True)
class RenameResult:
    """What the fast path wrote (``write_checkpoint`` turns it into its ``WriteReport``)."""

    size: int  # bytes of the output file
    storages: int  # storages the pickle names (all copied)


# -- 1. what changes -------------------------------------------------------------------------

def _renames(old: Mapping[Any, Any], new_keys: Sequence[Any], new_values: Sequence[Any]) -> dict[str, str]:
    """old key -> new key for the keys that change; NotEligible unless only names change."""
    if len(old) != len(new_keys) or any(map(operator.is_not, old.values(), new_values)):
        raise NotEligible("the values or their order change")
    renamed = {}
    for before, after in zip(old, new_keys):
        if before != after:
            if type(before) is not str or type(after) is not str:
                raise NotEligible("a key that is not a string changes")
            renamed[before] = after
    return renamed


def _state_dict(ckpt: Checkpoint) -> tuple[dict[Any, Any], list[Any]]:
    """The source state dict and the key objects leading to it, through plain containers only."""
    node, route = ckpt.root, []
    for name in ckpt.state_dict_path:
        if isinstance(node, dict):
            key = name if name in node else next((k for k in node if str(k) == name), None)
            if key is None or type(key) not in (str, int):
                raise NotEligible("the path to the state dict has keys of other types")
            route.append(key)
            node = node[key]
        elif isinstance(node, (list, tuple)) and name.isdigit():
            route.append(int(name))
            node = node[int(name)]
        else:
            raise NotEligible("the state dict sits inside an object")
    if type(node) not in (dict, collections.OrderedDict):
        raise NotEligible("the state dict is not a plain dict")
    return node, route


# -- 2. the new pickle -----------------------------------------------------------------------

def _encoded(texts: Sequence[str]) -> list[bytes]:
    """Each text as a BINUNICODE opcode (what pickle protocols 2 and 3 write for a str); one
    encode for all of them when no text holds the separator (C steps, not one call per key)."""
    raws = "\x00".join(texts).encode("utf-8", "surrogatepass").split(b"\x00")
    if len(raws) != len(texts):
        raws = [text.encode("utf-8", "surrogatepass") for text in texts]
    return list(map(bytes.__add__, map(b"X".__add__, map(_U32.pack, map(len, raws))), raws))


def substituted_pickle(data: bytes, renamed: Mapping[str, str]) -> bytes:
    """``data`` with each BINUNICODE opcode whose text is a key of ``renamed`` carrying the new
    text; NotEligible unless the pickle tokenises whole and exactly one opcode per key changes."""
    if not data.startswith((b"\x80\x02", b"\x80\x03")):
        raise NotEligible("not a protocol 2 or 3 pickle")
    tokens = key_tokens(data)
    if tokens is None:
        raise NotEligible("the pickle holds opcodes the tokeniser does not admit")
    swap = dict(zip(_encoded(list(renamed)), _encoded(list(renamed.values()))))
    runs, ops = zip(*tokens)  # one step per opcode, all in C from here on
    new_ops: list[bytes] = list(map(swap.get, ops, ops))  # ops as the default: never None
    if sum(map(operator.is_not, new_ops, ops)) != len(swap):
        raise NotEligible("a key's text is not exactly one string opcode")
    return b"".join(itertools.chain.from_iterable(zip(runs, new_ops)))


def _skeleton(data: bytes) -> tuple[Any, list[Any]]:
    """The object tree of ``data`` built from inert stand-ins that keep every argument, and the
    persistent ids it named. Only ``OrderedDict``, the tensor rebuild functions and storage
    types are admitted (any other global: NotEligible)."""
    ids: list[Any] = []

    class Skeleton(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if (module, name) == ("collections", "OrderedDict"):
                return collections.OrderedDict
            if (module, name) in REBUILD_FUNCTIONS:
                return operator.itemgetter  # a C callable that keeps its arguments
            if module == "torch" and name.endswith("Storage") and name.isidentifier():
                return (module, name)  # only ever a value inside a persistent id
            raise NotEligible(f"the pickle names {module}.{name}")

    loader = Skeleton(c_unpickler_input(data), encoding="latin1")  # as the reader decodes BINSTRING
    loader.persistent_load = ids.append  # type: ignore[method-assign]
    try:
        root = loader.load()
    except NotEligible:
        raise
    except Exception as exc:  # any failure only means "not this path"
        raise NotEligible(f"the new pickle does not load ({type(exc).__name__})") from None
    finally:
        loader.memo = {}
    return root, ids


def _reference_counts(mapping: Mapping[Any, Any]) -> list[int]:
    return [sys.getrefcount(key) for key in mapping]


def _sole_reference(kind: type) -> int:
    """What :func:`_reference_counts` reports for a key its ``kind`` of dict alone holds (an
    OrderedDict's links hold their keys too), calibrated here, so interpreter versions that
    count differently agree with themselves."""
    probe = kind({"".join(("ckpt", "doctor")): None})
    return _reference_counts(probe)[0]


def _check_skeleton(root: Any, route: Sequence[Any], state_dict: tuple[list[Any], set[str]],
                    metadata: tuple[list[Any], set[str]] | None) -> None:
    """Step 3 of the module docstring: the dict at ``route`` holds ``state_dict``'s keys, its
    ``_metadata`` (if any) ``metadata``'s, and each renamed key is referenced by its dict alone."""
    node = root
    try:
        for key in route:
            node = node[key]
    except (KeyError, IndexError, TypeError):
        raise NotEligible("the new pickle has no state dict where the old one had it") from None
    if not isinstance(node, dict) or list(node) != state_dict[0]:
        raise NotEligible("the new pickle's state dict does not hold the new keys")
    targets = [(node, state_dict[1])]
    if metadata is not None:
        table = getattr(node, "__dict__", {}).get("_metadata")
        if not isinstance(table, dict) or list(table) != metadata[0]:
            raise NotEligible("the new pickle's _metadata does not hold the new prefixes")
        targets.append((table, metadata[1]))
    for mapping, renamed in targets:
        if type(mapping) not in (dict, collections.OrderedDict):
            raise NotEligible("a renamed dict is of another type")
        sole = _sole_reference(type(mapping))
        for key, count in zip(mapping, _reference_counts(mapping)):
            if count != sole and key in renamed:
                raise NotEligible("a renamed key's string is used elsewhere in the pickle too")


# -- 3. the archive --------------------------------------------------------------------------

class _Entry(NamedTuple):
    """One central-directory entry: where it is, where its header offset is stored, what it holds."""

    at: int  # the entry's position in the directory
    where: int  # the position of its header offset (in the entry, or in its zip64 extra field)
    wide: bool  # the offset is the zip64 extra field's 8 bytes
    offset: int
    name: bytes
    flags: int
    method: int
    size: int  # stored bytes (compressed and uncompressed sizes are checked equal)


@dataclass(frozen=True)
class _Source:
    """The source archive as this path needs it (absolute offsets)."""

    size: int
    pickle_start: int  # data.pkl's local header
    pickle_data: int  # its first data byte
    pickle_end: int  # where the record after it starts (after its data descriptor, if any)
    descriptor: bytes | None  # None: sizes in the local header; else the descriptor's signature (maybe b"")
    local: tuple[Any, ...]  # data.pkl's local header fields
    name: bytes
    data: bytes  # data.pkl
    dir_start: int
    directory: bytes
    entries: list[_Entry]
    tail_start: int  # the first byte after the central directory
    tail: bytes  # the zip64 end record and locator (if any) and the end record, as stored
    end_location: int
    zip64: bool


def _walk(directory: bytes, pickle_name: bytes) -> tuple[list[_Entry], tuple[Any, ...]]:
    """The directory's entries, and data.pkl's fields (as ``CENTRAL`` unpacks them). Entries with
    a comment, an extra field other than zip64's, or compressed sizes are not this path's."""
    entries: list[_Entry] = []
    found: tuple[Any, ...] | None = None
    unpack, at, end = CENTRAL.unpack_from, 0, len(directory)
    make = tuple.__new__  # _Entry(...) without its Python-level __new__: one per storage
    while at < end:
        if at + CENTRAL.size > end:
            raise NotEligible("the central directory does not decode")
        fields = unpack(directory, at)
        if fields[0] != b"PK\x01\x02" or fields[12]:
            raise NotEligible("the central directory does not decode, or carries comments")
        name_end = at + CENTRAL.size + fields[10]
        wide = fields[16] == U32_MAX
        if wide and not fields[11]:
            raise NotEligible("a zip64 entry without its offset")
        where = _zip64_offset_at(directory, at, fields) if fields[11] else at + 42
        offset = struct.unpack_from("<Q", directory, where)[0] if wide else fields[16]
        size = fields[9]
        if fields[8] != size or (fields[7] == 0 and size):
            # compressed, or saved under torch's set_crc32_options(False): outputs get true
            # CRC-32s, which means reading every byte (the general writer computes them as it copies)
            raise NotEligible("a record is compressed or has no CRC-32")
        if size == U32_MAX:
            if not fields[11]:
                raise NotEligible("a zip64 entry without its sizes")
            size = struct.unpack_from("<Q", directory, name_end + 4)[0]
        name = directory[at + CENTRAL.size:name_end]
        entries.append(make(_Entry, (at, where, wide, offset, name, fields[3], fields[4], size)))
        if name == pickle_name:
            if found is not None:
                raise NotEligible("data.pkl is listed twice")
            found = (*fields[:16], offset)
        at = name_end + fields[11]
    if found is None:
        raise NotEligible("the directory does not list data.pkl")
    return entries, found


def _read_source(path: str, pickle_name: str, storages: Mapping[str, Any]) -> _Source:
    """data.pkl, the central directory and the end records of the archive at ``path``, which must
    hold exactly what the general writer would write (:func:`_check_records`, :func:`_check_tail`).
    ``storages``: member name -> the reader's ``StorageInfo`` of every storage the pickle names."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        try:
            zip_dir = ZipDirectory(RangeFile(LocalStorage(), path, size, readahead=False), 1 << 30, members=False)
        except BadZip as exc:
            raise NotEligible(str(exc)) from None
        if zip_dir.concat:
            raise NotEligible("bytes precede the archive")
        directory = os.pread(fd, zip_dir.dir_size, zip_dir.start_dir)
        entries, fields = _walk(directory, pickle_name.encode("utf-8"))
        flags, method, crc, usize, start = fields[3], fields[4], fields[7], fields[9], fields[16]
        if method != 0 or usize == U32_MAX:
            raise NotEligible("data.pkl is compressed or sized in zip64 fields")
        local = LOCAL.unpack(os.pread(fd, LOCAL.size, start))
        name = os.pread(fd, local[9], start + LOCAL.size)
        if local[0] != b"PK\x03\x04" or name != pickle_name.encode("utf-8"):
            raise NotEligible("data.pkl's local header does not match its entry")
        data_at = start + LOCAL.size + local[9] + local[10]
        data = os.pread(fd, usize, data_at)
        if len(data) != usize or (crc and zlib.crc32(data) != crc):
            raise NotEligible("data.pkl does not read as the reader read it")
        end = _check_records(fd, entries, pickle_name.encode("utf-8"), data_at, storages, zip_dir.start_dir)
        slack = end - data_at - usize
        descriptor: bytes | None = None
        if flags & FLAG_DESCRIPTOR:
            signed = os.pread(fd, 4, data_at + usize) == DESCRIPTOR_SIG
            descriptor = DESCRIPTOR_SIG if signed and slack == 16 else b"" if not signed and slack == 12 else None
            if descriptor is None:
                raise NotEligible("data.pkl's data descriptor is not the 32-bit kind")
        elif slack:
            raise NotEligible("bytes lie between data.pkl and the next record")
        tail_start = zip_dir.start_dir + zip_dir.dir_size
        tail = os.pread(fd, size - tail_start, tail_start)
        _check_tail(tail, zip_dir.end_location - tail_start, zip_dir.zip64)
        return _Source(size, start, data_at, end, descriptor, local, name, data, zip_dir.start_dir, directory,
                       entries, tail_start, tail, zip_dir.end_location, zip_dir.zip64)
    finally:
        os.close(fd)


SMALL_MEMBERS = frozenset({"byteorder", "version", ".format_version", ".storage_alignment", ".data/serialization_id",
                           ".data/version"})  # what torch.save writes beside data.pkl and the storages
SMALL_TEXT = re.compile(rb"[0-9A-Za-z_\-\n]{0,64}")  # their contents: numbers, "little", ids (never a pickle)
MAX_HEADER_EXTRA = 4 + ALIGNMENT + 20  # torch's padding field, plus a zip64 field for records over 4 GiB
DESCRIPTORS = {0: (0,), FLAG_DESCRIPTOR: (12, 16, 20, 24)}  # data descriptor: no signature / signature, 32 / 64 bits


def _check_records(fd: int, entries: Sequence[_Entry], pickle_name: bytes, pickle_data: int,
                   storages: Mapping[str, Any], dir_start: int) -> int:
    """The archive is data.pkl, the storages the pickle names (each record exactly its bytes) and
    torch's small text members, back to back from byte 0 to the central directory: what is
    copied as it is holds nothing the general writer would leave out (a hidden member, bytes
    between records, an aliased record, a storage record longer than its storage).

    Returns where the record after data.pkl's starts (the directory when it is the last)."""
    prefix = pickle_name[:-len(b"data.pkl")].decode("utf-8", "replace")
    ordered = sorted(entries, key=operator.attrgetter("offset"))
    cursor, after_pickle = 0, dir_start
    for k, entry in enumerate(ordered):
        if entry.offset != cursor or entry.method != 0:
            raise NotEligible("the records are not back to back from the start of the file")
        name = entry.name.decode("utf-8", "replace")
        storage = storages.get(name)
        following = ordered[k + 1].offset if k + 1 < len(ordered) else dir_start
        if entry.name == pickle_name:
            start, after_pickle = pickle_data, following
        elif storage is not None:
            if storage.source is None or storage.nbytes != entry.size:
                raise NotEligible(f"record {name} is not exactly its storage's bytes")
            start = storage.source.offset
        elif name.startswith(prefix) and name[len(prefix):] in SMALL_MEMBERS and entry.size <= 64:
            header = os.pread(fd, LOCAL.size, entry.offset)
            if len(header) < LOCAL.size or header[:4] != b"PK\x03\x04":
                raise NotEligible(f"record {name} has no local header")
            name_len, extra_len = LOCAL.unpack(header)[9:11]
            start = entry.offset + LOCAL.size + name_len + extra_len
            if SMALL_TEXT.fullmatch(os.pread(fd, entry.size, start)) is None:
                raise NotEligible(f"record {name} holds more than torch writes there")
        else:
            raise NotEligible(f"record {name} is one the general writer would not write")
        header_extra = start - entry.offset - LOCAL.size - len(entry.name)
        if not 0 <= header_extra <= MAX_HEADER_EXTRA or \
                following - start - entry.size not in DESCRIPTORS[entry.flags & FLAG_DESCRIPTOR]:
            raise NotEligible(f"bytes lie around record {name}")
        cursor = following
    if cursor != dir_start:
        raise NotEligible("bytes lie before the central directory")
    return after_pickle


def _check_tail(tail: bytes, end_at: int, zip64: bool) -> None:
    """After the directory: exactly a zip64 end record (no extensible data) and its locator when
    ``zip64``, then the end record, without a comment, ending the file."""
    expected = (ZIP64_END.size + ZIP64_LOCATOR.size if zip64 else 0) + END.size
    if len(tail) != expected or end_at != expected - END.size or tail[-2:] != b"\x00\x00":
        raise NotEligible("bytes or a comment follow the central directory")
    if zip64 and (tail[:4] != b"PK\x06\x06" or struct.unpack_from("<Q", tail, 4)[0] != ZIP64_END.size - 12):
        raise NotEligible("the zip64 end record carries extensible data")


def _pickle_record(source: _Source, data: bytes) -> bytes:
    """data.pkl's record holding ``data``, padded so that the records after it move by a multiple
    of 64 bytes (their storages stay aligned for mmap)."""
    crc = zlib.crc32(data)
    fields = list(source.local)
    tail = b""
    if source.descriptor is None:
        fields[6:9] = crc, len(data), len(data)
    else:
        tail = source.descriptor + struct.pack("<3I", crc, len(data), len(data))
    bare = LOCAL.size + len(source.name) + 4 + len(data) + len(tail)
    padding = (source.pickle_end - source.pickle_start - bare) % ALIGNMENT
    extra = PADDING_ID + struct.pack("<H", padding) + b"Z" * padding
    fields[10] = len(extra)
    return LOCAL.pack(*fields) + source.name + extra + data + tail


def _zip64_offset_at(directory: bytes | bytearray, at: int, fields: tuple[Any, ...]) -> int:
    """Where an entry keeps its header offset: in the entry, or in its zip64 extra field (the only
    extra field accepted: torch's writer puts no other in the central directory)."""
    pos = at + CENTRAL.size + fields[10]
    end = pos + fields[11]
    tag, length = struct.unpack_from("<HH", directory, pos) if pos + 4 <= end else (0, 0)
    if tag != 1 or pos + 4 + length != end:
        raise NotEligible("a directory entry carries an extra field other than zip64's")
    if fields[16] != U32_MAX:
        return at + 42
    skip = 8 * ((fields[9] == U32_MAX) + (fields[8] == U32_MAX))
    if skip + 8 > length:
        raise NotEligible("a zip64 entry without its offset")
    return pos + 4 + skip


def _patched_directory(source: _Source, shift: int, crc: int, size: int) -> tuple[bytes, list[int]]:
    """The central directory with the records after data.pkl moved by ``shift`` and data.pkl's
    CRC-32 and sizes replaced; and each entry's new header offset, in order. (No record starts
    inside data.pkl's: :func:`_check_records` found them back to back.)"""
    out = bytearray(source.directory)
    offsets: list[int] = []
    moved, pack32, pack64 = source.pickle_end, struct.Struct("<I").pack_into, struct.Struct("<Q").pack_into
    for entry in source.entries:
        offset = entry.offset
        if offset >= moved:
            offset += shift
            if entry.wide:
                pack64(out, entry.where, offset)
            elif offset >= U32_MAX:
                raise NotEligible("a record would move past 4 GiB")
            else:
                pack32(out, entry.where, offset)
        elif offset == source.pickle_start:
            struct.pack_into("<3I", out, entry.at + 16, crc, size, size)
        offsets.append(offset)
    return bytes(out), offsets


def _patched_tail(source: _Source, shift: int) -> bytes:
    """The zip64 end record, its locator and the end record, with the directory moved by ``shift``."""
    out = bytearray(source.tail)
    end_at = source.end_location - source.tail_start
    (offset,) = struct.unpack_from("<I", out, end_at + 16)
    if offset != U32_MAX:
        if offset + shift >= U32_MAX:
            raise NotEligible("the central directory would move past 4 GiB")
        struct.pack_into("<I", out, end_at + 16, offset + shift)
    if source.zip64:
        locator_at = end_at - ZIP64_LOCATOR.size
        (record,) = struct.unpack_from("<Q", out, locator_at + 8)
        record_at = record - source.tail_start
        if not 0 <= record_at <= locator_at - ZIP64_END.size or out[record_at:record_at + 4] != b"PK\x06\x06":
            raise NotEligible("the zip64 end record is not where its locator says")
        struct.pack_into("<Q", out, locator_at + 8, record + shift)
        (dir_offset,) = struct.unpack_from("<Q", out, record_at + 48)
        struct.pack_into("<Q", out, record_at + 48, dir_offset + shift)
    elif offset == U32_MAX:
        raise NotEligible("the end record defers to a zip64 record that is missing")
    return bytes(out)


def _copy(src: int, dst: int, src_at: int, dst_at: int, length: int, advance: Callable[[int, int], None]) -> None:
    """``length`` bytes from ``src`` at ``src_at`` to ``dst`` at ``dst_at``, in the kernel where it
    can; ``advance(n, end)`` after each step (``n`` bytes copied, the output written up to ``end``)."""
    done, kernel = 0, True
    while done < length:
        n = 0
        if kernel:
            try:
                n = os.copy_file_range(src, dst, min(COPY_STEP, length - done), src_at + done, dst_at + done)
            except OSError:  # another filesystem pairing, an old kernel: through user space
                kernel = False
        if not kernel:
            chunk = os.pread(src, min(USER_COPY_STEP, length - done), src_at + done)
            n = os.pwrite(dst, chunk, dst_at + done) if chunk else 0
        if n <= 0:
            raise OSError(f"the source ended {length - done} bytes early while it was copied")
        done += n
        advance(n, dst_at + done)


# -- the entry point -------------------------------------------------------------------------

@dataclass(frozen=True)
class _Plan:
    source: _Source
    data: bytes  # the new data.pkl
    route: list[Any]
    state_dict: tuple[list[Any], set[str]]  # the new keys in order, the renamed ones
    metadata: tuple[list[Any], set[str]] | None  # the same for _metadata


def _plan(ckpt: Checkpoint, new_keys: Sequence[Any], new_values: Sequence[Any], metadata: Any,
          storages: Mapping[str, Any]) -> _Plan:
    if ckpt.format != "torch-zip" or ckpt.extra.get("byteorder", "little") != "little":
        raise NotEligible("not a little-endian torch.save zip")
    if storage_for(ckpt.path).remote:
        raise NotEligible("a remote source")
    source_dict, route = _state_dict(ckpt)
    renamed = _renames(source_dict, new_keys, new_values)
    old_metadata = getattr(source_dict, "_metadata", None)
    meta: tuple[list[Any], set[str]] | None = None
    if old_metadata is not None or metadata is not None:
        if not isinstance(old_metadata, dict) or type(old_metadata) not in (dict, collections.OrderedDict) \
                or not isinstance(metadata, dict):
            raise NotEligible("the _metadata is added, dropped or not a dict")
        prefixes = _renames(old_metadata, list(metadata), list(metadata.values()))
        if set(prefixes) & set(renamed):
            raise NotEligible("a key and a module prefix have the same text")
        meta = (list(metadata), set(prefixes.values()))
        swaps = {**renamed, **prefixes}
    else:
        swaps = renamed
    prefix = ckpt.extra.get("archive_prefix")
    if not isinstance(prefix, str):
        raise NotEligible("the archive's folder is unknown")
    source = _read_source(ckpt.path, f"{prefix}/data.pkl" if prefix else "data.pkl", storages)
    data = substituted_pickle(source.data, swaps)
    return _Plan(source, data, route, (list(new_keys), set(renamed.values())), meta)


def rename_in_place(ckpt: Checkpoint, new_keys: Sequence[Any], new_values: Sequence[Any], metadata: Any,
                    storages: Mapping[str, Any], out: str, *, force: bool,
                    progress: Callable[[int, int], None] | None = None) -> RenameResult | None:
    """Write ``ckpt`` to ``out`` with its state dict's keys renamed to ``new_keys`` (the values
    ``new_values``, the ``_metadata`` ``metadata``), or return None when the repair is not a pure
    rename this path can prove (see the module docstring); nothing is written then.

    ``storages`` maps each record name to the reader's ``StorageInfo`` for every storage in the
    tree. ``progress(done, total)`` counts storage bytes, as the general writer does. Raises
    :class:`ReadBackError` when the written file does not read back as meant, and the errors of
    :func:`atomic_output`; nothing is left behind then either.
    """
    try:
        plan = _plan(ckpt, new_keys, new_values, metadata, storages)
        record = _pickle_record(plan.source, plan.data)
        source = plan.source
        shift = len(record) - (source.pickle_end - source.pickle_start)
        directory, offsets = _patched_directory(source, shift, zlib.crc32(plan.data), len(plan.data))
        tail = _patched_tail(source, shift)
        skeleton, ids = _skeleton(plan.data)
        _check_skeleton(skeleton, plan.route, plan.state_dict, plan.metadata)
    except NotEligible:
        return None
    del skeleton, ids
    size = source.size + shift
    total = sum(s.nbytes for s in storages.values())
    span = source.dir_start - source.pickle_end + source.pickle_start
    copied = 0
    writeback: EarlyWriteback | None = None

    def advance(n: int, end: int) -> None:  # copied bytes, reported as their share of the storage bytes
        nonlocal copied
        copied += n
        if writeback is not None:
            writeback.advance(end)  # the disk writes while the kernel copies (see EarlyWriteback)
        if progress is not None:
            progress(total * copied // span if span else total, total)

    src = os.open(ckpt.path, os.O_RDONLY)
    try:
        with atomic_output(out, [ckpt.path], force=force) as (fd, tmp):
            writeback = EarlyWriteback(fd)
            _copy(src, fd, 0, 0, source.pickle_start, advance)
            os.pwrite(fd, record, source.pickle_start)
            _copy(src, fd, source.pickle_end, source.pickle_end + shift, source.dir_start - source.pickle_end,
                  advance)
            os.pwrite(fd, directory, source.dir_start + shift)
            os.pwrite(fd, tail, source.tail_start + shift)
            if progress is not None and not span:
                progress(total, total)
            _read_back(tmp, source, shift, (directory, offsets), plan.data, size)
    finally:
        os.close(src)
    return RenameResult(size=size, storages=len(storages))


def _member(directory: bytes, entry: _Entry, offset: int) -> Member:
    """The reader's view of one directory entry (its header at ``offset``)."""
    fields = CENTRAL.unpack_from(directory, entry.at)
    raw = directory[entry.at + CENTRAL.size:entry.at + CENTRAL.size + fields[10]]
    name = raw.decode("utf-8" if fields[3] & FLAG_UTF8 else "cp437")
    return Member(name, name, offset, fields[4], fields[3], fields[7], fields[8], fields[9])


def _read_back(tmp: str, source: _Source, shift: int, written: tuple[bytes, list[int]], data: bytes,
               size: int) -> None:
    """The file just written, re-read from disk: its size; its end records lead to the directory
    written, moved by ``shift`` (a multiple of 64: storages stay aligned); data.pkl reads back
    through its local header with its CRC-32; the first and last moved records' local headers
    are where the directory now says, naming them."""
    directory, offsets = written
    if os.stat(tmp).st_size != size:
        raise ReadBackError(f"the file holds {os.stat(tmp).st_size} bytes, {size} were meant")
    if shift % ALIGNMENT:
        raise ReadBackError("the records moved out of their 64-byte alignment")
    try:
        archive = ZipDirectory(RangeFile(LocalStorage(), tmp, size, readahead=False), 1 << 30, members=False)
        if (archive.start_dir, archive.dir_size, archive.concat) != (source.dir_start + shift, len(directory), 0):
            raise ReadBackError("the end records do not lead to the directory written")
        if archive.file.read_at(archive.start_dir, archive.dir_size) != directory:
            raise ReadBackError("the central directory reads back with other bytes than were written")
        entries = source.entries
        at = offsets.index(source.pickle_start)
        if archive.read(_member(directory, entries[at], source.pickle_start)) != data:
            raise ReadBackError("data.pkl reads back with other bytes than were written")
        moved = [i for i, offset in enumerate(offsets) if offset >= source.pickle_end + shift]
        for i in moved[:1] + moved[-1:]:
            archive.data_start(_member(directory, entries[i], offsets[i]))
    except BadZip as exc:
        raise ReadBackError(f"the archive does not read back ({exc})") from None
