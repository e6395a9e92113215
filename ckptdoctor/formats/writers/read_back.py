"""Re-read a torch zip archive just written, without trusting the writer's own bookkeeping.

``write_checkpoint`` checks every output before it replaces OUT. Opening it with the general
reader (``zipfile`` plus a local-header read per storage) costs more than writing it when a
checkpoint holds 200,000 tensors, so the torch zip output is re-read here, from the file:

* the end records and the central directory are decoded and must list exactly the records
  written, with their names, sizes, CRC-32s and offsets;
* every local header is decoded (small records through one read per few MiB) and must match
  its directory entry, its data 64-byte aligned;
* ``data.pkl`` is read from the file and must have the CRC-32 the writer computed;
* the pickle is then unpickled by the checkpoint reader's unpickler, each storage it names
  resolved to the record the directory lists (which must exist and hold exactly its bytes),
  and the caller compares the state dict found where it was written, tensor by tensor, with
  what was meant to be written.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Sequence
from typing import Any

from ckptdoctor.formats.pickle.unpickler import load_pickle
from ckptdoctor.formats.readers.torch_zip import BadReference, storage_reference
from ckptdoctor.formats.writers.torch_zip import (
    ALIGNMENT,
    CENTRAL,
    END,
    LOCAL,
    U32_MAX,
    ZIP64_END,
    ZIP64_LOCATOR,
)
from ckptdoctor.model.checkpoint import ByteRange, StorageInfo, itemsize

Entry = tuple[bytes, int, int, int]  # (name, crc, size, header offset), as ZipArchiveWriter.entries
WINDOW = 4 << 20  # local headers of records closer together than this are read in one go
HEADER_ROOM = LOCAL.size + 20 + 4 + ALIGNMENT  # a local header past its name: zip64 field, FB padding


class ReadBackError(Exception):
    """The file on disk is not the archive that was meant to be written (the message says how)."""


def _zip64_values(extra: bytes, wanted: int) -> list[int]:
    """The 8-byte values of the zip64 extra field (id 1), or [] when there is none."""
    pos = 0
    while pos + 4 <= len(extra):
        tag, length = int.from_bytes(extra[pos:pos + 2], "little"), int.from_bytes(extra[pos + 2:pos + 4], "little")
        if tag == 1:
            body = extra[pos + 4:pos + 4 + length]
            return [int.from_bytes(body[i:i + 8], "little") for i in range(0, min(len(body), 8 * wanted), 8)]
        pos += 4 + length
    return []


def _directory(fd: int, base: int, size: int, count: int) -> tuple[bytes, int]:
    """The central directory's bytes and offset, found through the end records."""
    tail_size = ZIP64_END.size + ZIP64_LOCATOR.size + END.size
    tail = os.pread(fd, tail_size, base + size - tail_size)
    end64 = ZIP64_END.unpack_from(tail, 0)
    locator = ZIP64_LOCATOR.unpack_from(tail, ZIP64_END.size)
    end = END.unpack_from(tail, ZIP64_END.size + ZIP64_LOCATOR.size)
    if (end64[0], locator[0], end[0]) != (b"PK\x06\x06", b"PK\x06\x07", b"PK\x05\x06"):
        raise ReadBackError("the end records are not where the archive ends")
    if end64[7] != count or end64[6] != count:
        raise ReadBackError(f"the directory lists {end64[7]} records, {count} were written")
    dir_size, dir_offset = end64[8], end64[9]
    if locator[2] != dir_offset + dir_size or dir_offset + dir_size + tail_size != size:
        raise ReadBackError("the end records do not frame the central directory")
    directory = os.pread(fd, dir_size, base + dir_offset)
    if len(directory) != dir_size:
        raise ReadBackError("the central directory is cut short")
    return directory, dir_offset


def _check_directory(directory: bytes, entries: Sequence[Entry]) -> None:
    pos = 0
    for name, crc, size, offset in entries:
        fields = CENTRAL.unpack_from(directory, pos)
        name_end = pos + CENTRAL.size + fields[10]
        extra = directory[name_end:name_end + fields[11]]
        got_size, got_offset = fields[9], fields[16]
        if U32_MAX in (got_size, got_offset):
            values = iter(_zip64_values(extra, 3))
            got_size = next(values, -1) if got_size == U32_MAX else got_size
            if fields[8] == U32_MAX:
                next(values, -1)
            got_offset = next(values, -1) if got_offset == U32_MAX else got_offset
        got = (fields[0], directory[pos + CENTRAL.size:name_end], fields[7], got_size, fields[8] == fields[9],
               got_offset)
        if got != (b"PK\x01\x02", name, crc, size, True, offset) or fields[4] != 0:
            raise ReadBackError(f"the directory entry of {name.decode(errors='replace')} reads back differently")
        pos = name_end + fields[11] + fields[12]
    if pos != len(directory):
        raise ReadBackError("the central directory holds more than the records written")


def _check_local_headers(fd: int, base: int, entries: Sequence[Entry]) -> dict[str, tuple[int, int]]:
    """Member name -> (file offset of its data, size), each local header checked against its entry."""
    members: dict[str, tuple[int, int]] = {}
    start, buffer = -1, b""
    for i, (name, crc, size, offset) in enumerate(entries):
        need = offset + len(name) + HEADER_ROOM
        if not (start <= offset and need <= start + len(buffer)):
            end, j = need, i + 1
            while j < len(entries):  # extend the read over the records that follow closely
                later = entries[j][3] + len(entries[j][0]) + HEADER_ROOM
                if later > offset + WINDOW:
                    break
                end, j = later, j + 1
            start, buffer = offset, os.pread(fd, end - offset, base + offset)
        at = offset - start
        if len(buffer) < at + LOCAL.size:
            raise ReadBackError(f"the file ends inside the record of {name.decode(errors='replace')}")
        fields = LOCAL.unpack_from(buffer, at)
        stored = U32_MAX if size >= U32_MAX else size
        data = offset + LOCAL.size + fields[9] + fields[10]
        got = (fields[0], buffer[at + LOCAL.size:at + LOCAL.size + fields[9]], fields[3], fields[6], fields[7],
               fields[8])
        if got != (b"PK\x03\x04", name, 0, crc, stored, stored) or data % ALIGNMENT:
            raise ReadBackError(f"the local header of {name.decode(errors='replace')} reads back differently")
        members[name.decode()] = (base + data, size)
    return members


def _storage_loader(path: str, prefix: str, members: dict[str, tuple[int, int]], storages: dict[str, StorageInfo]
                    ) -> Any:
    """The pickle's persistent ids resolved against the records read back (as the reader would);
    each storage is recorded in ``storages`` by key."""

    data_prefix = f"{prefix}/data/"

    def persistent_load(pid: Any) -> StorageInfo:
        # Called once per tensor (200,000 times for a large MoE file): one lookup per fact.
        try:
            storage_type, key, location, numel = storage_reference(pid)
        except BadReference as exc:
            raise ReadBackError(str(exc)) from None
        known = storages.get(key)
        if known is not None:
            return known
        member = data_prefix + key
        record = members.get(member)
        if record is None:
            raise ReadBackError(f"the pickle refers to storage {key!r}, which the archive lacks")
        offset, length = record
        nbytes = numel * itemsize(storage_type.dtype)
        if nbytes != length:
            raise ReadBackError(f"storage {key!r} declares {nbytes} bytes but its record holds {length}")
        storages[key] = StorageInfo(id=key, dtype=storage_type.dtype, nbytes=nbytes, device=str(location),
                                    source=ByteRange(path, offset, nbytes), name=member)
        return storages[key]

    return persistent_load


def read_back_torch_zip(path: str, prefix: str, base: int, size: int, entries: Sequence[Entry]
                        ) -> tuple[Any, int]:
    """The object tree of the archive at ``path`` (``size`` bytes from ``base``) and the number
    of storages its pickle refers to.

    Raises :class:`ReadBackError` when the file differs from ``entries`` (the records the
    writer meant to write) and the reader's errors when the pickle does not read.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        if os.fstat(fd).st_size < base + size:
            raise ReadBackError(f"the file holds {os.fstat(fd).st_size - base} of the {size} bytes written")
        directory, _ = _directory(fd, base, size, len(entries))
        _check_directory(directory, entries)
        members = _check_local_headers(fd, base, entries)
        name = f"{prefix}/data.pkl"
        if name not in members:
            raise ReadBackError("the archive has no data.pkl")
        offset, length = members[name]
        data = os.pread(fd, length, offset)
        crc = next(c for n, c, _, _ in entries if n == name.encode())
        if len(data) != length or zlib.crc32(data) != crc:
            raise ReadBackError("data.pkl reads back with other bytes than were written")
    except (struct.error, ValueError) as exc:  # a record cut short or a length field gone wrong
        raise ReadBackError(f"the archive does not decode ({exc})") from None
    finally:
        os.close(fd)
    storages: dict[str, StorageInfo] = {}
    # The bytes are the writer's own (their CRC-32 matched above): no pre-pass (see fast_load).
    root = load_pickle(data, _storage_loader(path, prefix, members, storages), where=name, path=path,
                       own_writer=True)
    return root, len(storages)
