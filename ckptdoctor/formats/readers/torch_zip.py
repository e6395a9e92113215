"""Reader for torch.save's zip format (torch >= 1.6) and TorchScript archives.

Layout (torch/serialization.py ``_save``, caffe2/serialize/inline_container.cc): every member
sits under one top-level folder; ``data.pkl`` is the pickled object tree, each storage is an
uncompressed member ``data/<key>`` whose bytes are read in place, ``byteorder`` says
``little``/``big``. TorchScript archives add ``code/`` and ``constants.pkl``. The pickle refers
to storages by persistent id ``('storage', StorageType, key, location, numel)``.
"""

from __future__ import annotations

import bisect
import struct
import sys
from array import array
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from operator import add, methodcaller
from typing import Any

from ckptdoctor.errors import CorruptCheckpoint, LimitExceeded, UnsafeContent, UnsupportedFormat
from ckptdoctor.formats.magic import ZIP_LOCAL_HEADER
from ckptdoctor.formats.pickle.stand_ins import StorageType
from ckptdoctor.formats.pickle.unpickler import load_pickle_read
from ckptdoctor.formats.readers.zip_directory import (
    FLAG_ENCRYPTED,
    STORED,
    BadZip,
    Member,
    TooManyMembers,
    ZipDirectory,
)
from ckptdoctor.formats.registry import FileFormat, Head
from ckptdoctor.io.rangefile import RangeFile
from ckptdoctor.io.storage import storage_for
from ckptdoctor.limits import MAX_MEMBERS, MAX_PICKLE_BYTES
from ckptdoctor.model.checkpoint import DTYPE_BITS, ByteRange, Checkpoint, StorageInfo
from ckptdoctor.model.locate import build_checkpoint

MAX_PICKLE_MEMBER = MAX_PICKLE_BYTES
LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")
SUFFIX_GUESS = 48 << 10  # remote: the end records and (usually) the whole central directory in one range
HEADER_WINDOW = 256 << 10  # local headers read together: a range spans the records starting this close


def _case_twins_possible(names: Sequence[str]) -> bool:
    """Could two of *names* differ only in case? Not when all are ASCII without an upper-case
    letter, as torch.save writes them: one C-level pass over the joined names (~12 ms for
    200,000 members) instead of lower-casing each."""
    joined = "\n".join(names)
    if not joined.isascii():
        return True
    raw = joined.encode("ascii")
    return raw.lower() != raw


class TorchZipArchive:
    """The archive's members, with data offsets resolved lazily from the local headers."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.storage = storage_for(path)
        self.file = RangeFile(self.storage, path, readahead=self.storage.remote)
        self.file_size = self.file.size
        if self.storage.remote:
            self.file.prefetch(self.file_size - SUFFIX_GUESS, SUFFIX_GUESS)
        try:
            self.zip = ZipDirectory(self.file, MAX_MEMBERS, members=False)
            # Columns built by C-level passes (no Python step per member: 200,000 of them in a
            # large file), small while the pickle is unpickled (see MemberTable).
            self.members = self.zip.table()
        except TooManyMembers as exc:
            raise LimitExceeded(str(exc), path=path) from None
        except (BadZip, UnicodeDecodeError, OSError) as exc:
            raise CorruptCheckpoint(f"not a readable zip archive ({exc})", path=path) from None
        if len(self.members) != len(self.members.names):
            dupes = [name for name, n in Counter(self.members.names).items() if n > 1]
            raise UnsafeContent(f"the archive holds member {dupes[0]!r} more than once, so readers disagree on "
                                "its contents", path=path)
        # torch's reader (miniz's mz_zip_reader_locate_file without MZ_ZIP_FLAG_CASE_SENSITIVE) finds
        # `archive/DATA.pkl` when asked for `archive/data.pkl`: names that differ only in case are
        # the same member to torch and two to everyone else.
        if _case_twins_possible(self.members.names) and \
                len(set(map(str.lower, self.members.names))) != len(self.members.names):
            folded = Counter(map(str.lower, self.members.names))
            twins = [name for name in self.members.names if folded[name.lower()] > 1]
            shown = ", ".join(map(repr, twins[:2]))
            raise UnsafeContent(f"the archive holds members that differ only in case ({shown}): torch's zip reader "
                                "ignores case, other readers do not, so they disagree on its contents", path=path)
        pickles = [*filter(methodcaller("endswith", "/data.pkl"), self.members)]
        if "data.pkl" in self.members:
            pickles.insert(0, "data.pkl")
        if not pickles:
            if any(n.endswith(("archive_format", "serialized_exported_program.json")) or "/models/" in n
                   for n in self.members):
                raise UnsupportedFormat("a torch.export archive (.pt2), not a torch.save checkpoint", path=path,
                                        hint="Load it with torch.export.load(); its weights are not a state dict.")
            raise UnsupportedFormat("a zip archive without data.pkl: not a torch.save file", path=path)
        self.pickle_name = min(pickles, key=len)
        self.prefix = self.pickle_name[: -len("data.pkl")]
        self._sorted_starts: list[int] | None = None
        self._window_start = 0
        self._window = b""
        if self.storage.remote:
            # data.pkl and the small members torch writes beside it (byteorder, versions) in one range:
            # from data.pkl's record up to the first storage's (or the central directory).
            first = self.members[self.pickle_name].header_offset
            storages = [m.header_offset for n, m in self.members.items()
                        if n.startswith(self.prefix + "data/") and m.header_offset > first]
            self.file.prefetch(first, min([*storages, self.zip.start_dir]) - first)

    def close(self) -> None:
        self.file.close()

    @property
    def _starts(self) -> list[int]:
        """Where each member's record ends: the next record's start (members are contiguous).

        Sorted on first use: a local archive whose headers :meth:`verified_starts` checks never needs it."""
        if self._sorted_starts is None:
            self._sorted_starts = sorted({*self.members.header_offsets, self.zip.start_dir})
        return self._sorted_starts

    def has(self, name: str) -> bool:
        return self.prefix + name in self.members

    def read_member(self, name: str, limit: int = MAX_PICKLE_MEMBER) -> bytes:
        info = self.members[self.prefix + name]
        if info.file_size > limit or info.compress_size > limit:
            raise LimitExceeded(f"member {info.name} declares {max(info.file_size, info.compress_size)} bytes",
                                path=self.path)
        if info.flag_bits & FLAG_ENCRYPTED:
            raise CorruptCheckpoint(f"member {info.name} is flagged as encrypted; torch.save never encrypts",
                                    path=self.path, hint="Run `ckptdoctor scan PATH` to see the archive's anomalies.")
        try:
            return self.zip.read(info)
        except (BadZip, UnicodeDecodeError, OSError, ValueError, OverflowError) as exc:  # offsets past 2**63
            raise CorruptCheckpoint(f"member {info.name} cannot be read ({exc})", path=self.path) from None

    def data_offset(self, name: str) -> tuple[int, int]:
        """(offset of the first data byte, stored length) of an uncompressed member."""
        return self.stored_range(self.members[name])

    def stored_range(self, info: Member) -> tuple[int, int]:
        """:meth:`data_offset` of a member already looked up."""
        name = info.name
        if info.compress_type != STORED:
            raise UnsupportedFormat(f"member {name} is compressed; torch.save writes storages uncompressed",
                                    path=self.path)
        if self.storage.remote:
            inferred = self._inferred_start(info)
            if inferred is not None:
                return inferred, info.file_size
        at = info.header_offset - self._window_start
        if not 0 <= at <= len(self._window) - LOCAL_HEADER.size:
            self._read_window(info.header_offset)
            at = info.header_offset - self._window_start
        window = self._window
        if len(window) - at < LOCAL_HEADER.size or window[at:at + 4] != ZIP_LOCAL_HEADER:
            raise CorruptCheckpoint(f"member {name} has no valid local header", path=self.path)
        fields = LOCAL_HEADER.unpack_from(window, at)
        name_len, extra_len = fields[9], fields[10]
        start = info.header_offset + LOCAL_HEADER.size + name_len + extra_len
        if start + info.file_size > self.file_size:
            raise CorruptCheckpoint(f"member {name} extends past the end of the file (truncated?)", path=self.path)
        return start, info.file_size


    def verified_starts(self, names: Iterable[str]) -> dict[str, int]:
        """Data offsets of the members ``names`` (all stored), every local header read and checked at once.

        What :meth:`stored_range` checks member by member (the header's magic, its name and extra
        lengths, the data lying within the file), done for all members together: the headers are
        read in ranges of :data:`HEADER_WINDOW` bytes, as :meth:`_read_window` reads them, and
        checked by C-level passes over their bytes, with no Python step per member (a second
        at 200,000 storages). Empty when the archive is remote (its headers are not fetched at
        all, see :meth:`_inferred_start`) or when any member fails a check or is compressed: then
        each member goes through :meth:`stored_range` when the pickle names it, which raises the
        same error as ever, at the same point.
        """
        positions, starts = self.verified_positions(names)
        return dict(zip(map(self.members.names.__getitem__, positions), starts))

    def verified_positions(self, names: Iterable[str]) -> tuple[list[int], list[int]]:
        """:meth:`verified_starts` as (the members' positions in :attr:`members`, their data offsets)."""
        if self.storage.remote:
            return [], []
        table = self.members
        positions = list(map(table.index.__getitem__, names))
        count = len(positions)
        if not count or any(map(STORED.__ne__, map(table.compress_types.__getitem__, positions))):
            return [], []
        offsets = list(map(table.header_offsets.__getitem__, positions))
        if offsets != sorted(offsets):  # torch lists members in file order; the windows need it
            positions.sort(key=table.header_offsets.__getitem__)
            offsets = list(map(table.header_offsets.__getitem__, positions))
        size = LOCAL_HEADER.size
        heads: list[bytes] = []
        i = 0
        while i < count:  # one step per window (a thousand small records), not per member
            first = offsets[i]
            j = bisect.bisect_right(offsets, first + HEADER_WINDOW, i)
            window = self.file.read_at(first, offsets[j - 1] - first + size)
            at = list(map(first.__rsub__, offsets[i:j]))
            heads.append(b"".join(map(window.__getitem__, map(slice, at, map(size.__add__, at)))))
            i = j
        joined = b"".join(heads)
        del heads
        if len(joined) != size * count or any(joined[k::size] != ZIP_LOCAL_HEADER[k:k + 1] * count for k in range(4)):
            return [], []
        halves = array("H", joined)  # 15 per header: name length at byte 26, extra length at 28
        if sys.byteorder != "little":
            halves.byteswap()
        starts = list(map(add, map(add, offsets, halves[13::15]), map(size.__add__, halves[14::15])))
        if max(map(add, starts, map(table.file_sizes.__getitem__, positions))) > self.file_size or min(starts) < 0:
            return [], []
        return positions, starts

    def _read_window(self, offset: int) -> None:
        """Read the local headers of the records from ``offset`` on in one range.

        A 200,000-tensor archive would otherwise cost 200,000 reads of 30 bytes. The range ends
        with the header of the last record starting within :data:`HEADER_WINDOW` bytes, so an
        archive of large storages still reads only its headers (never the tensor bytes between).
        Only a forward move opens a wide range (an archive whose records are named out of order
        gets one 30-byte read per header), so the ranges never overlap and never add up to more
        than the file.
        """
        last = offset
        if offset >= self._window_start + len(self._window):
            k = bisect.bisect_right(self._starts, offset + HEADER_WINDOW) - 1
            last = max(offset, self._starts[k]) if k >= 0 else offset
        self._window_start = offset
        self._window = self.file.read_at(offset, last - offset + LOCAL_HEADER.size)

    def _inferred_start(self, info: Member) -> int | None:
        """A stored member's data offset from the layout alone, without fetching its local header.

        A record is local header + data + (flag bit 3) a data descriptor, and the next record starts
        right after it, so the data starts ``descriptor + size`` before the next record. torch's
        writer (miniz) writes a 16-byte descriptor, 24 bytes for members of 4 GiB or more. None when
        the layout does not fit (then the header is read).
        """
        k = bisect.bisect_right(self._starts, info.header_offset)
        if k == 0 or k >= len(self._starts) or self._starts[k - 1] != info.header_offset:
            return None
        end = self._starts[k]
        descriptor = (24 if info.file_size >= 0xFFFFFFFF else 16) if info.flag_bits & 0x8 else 0
        start = end - descriptor - info.file_size
        header_end = info.header_offset + LOCAL_HEADER.size + len(info.raw_name.encode("utf-8"))
        if not header_end <= start <= header_end + 0xFFFF or start + info.file_size > self.file_size:
            return None
        return start


_LOCATIONS: dict[str, str] = {}


def _location(value: Any) -> str:
    if type(value) is str and value in _LOCATIONS:  # "cpu", "cuda:0": 200,000 storages, a few locations
        return _LOCATIONS[value]
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if not isinstance(value, str) or len(value) > 64:
        raise CorruptCheckpoint(f"invalid storage location {value!r:.40}")
    if type(value) is str and len(_LOCATIONS) < 64:
        _LOCATIONS[value] = value
    return value


class BadReference(ValueError):
    """A persistent id that is not torch's ``('storage', StorageType, key, location, numel)``."""


def storage_reference(pid: Any) -> tuple[StorageType, str, Any, int]:
    """(storage type, key, location, numel) of a persistent id, or :class:`BadReference`.

    Shared by the reader and the read-back of what ``fix`` wrote (each raises its own error)."""
    if not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage":
        raise BadReference(f"unexpected persistent id {pid!r:.80}")
    _, storage_type, key, location, numel = pid
    if not isinstance(storage_type, StorageType) or not isinstance(key, str) or type(numel) is not int:
        raise BadReference(f"malformed storage reference {pid!r:.80}")
    return storage_type, key, location, numel


def read_torch_zip(path: str, entry: str | None = None) -> Checkpoint:
    archive = TorchZipArchive(path)
    try:
        members, data_prefix = archive.members, archive.prefix + "data/"
        position, names, file_sizes, crcs = members.index.get, members.names, members.file_sizes, members.crcs
        # By member position: its data offset when verified_starts has checked its header (else -1),
        # then its StorageInfo once the pickle has named it. Columns, not dicts by name: the tables
        # are alive while the pickle is unpickled, inspect's peak (200,000 entries: 3 MB, not 25).
        starts = array("q", [-1]) * len(names)
        deque(map(starts.__setitem__, *archive.verified_positions(
            filter(methodcaller("startswith", data_prefix), members))), maxlen=0)
        infos: list[StorageInfo | None] = [None] * len(names)

        def persistent_load(pid: Any) -> StorageInfo:
            # Called once per tensor (200,000 times for a large MoE file): torch's own reference
            # (a tuple of exact types) skips storage_reference's call, a storage whose header
            # verified_starts has checked skips stored_range's, a known location skips _location's.
            if (type(pid) is tuple and len(pid) == 5 and type(pid[1]) is StorageType and type(pid[2]) is str
                    and type(pid[4]) is int and pid[0] == "storage"):
                _, storage_type, key, location, numel = pid
            else:
                try:
                    storage_type, key, location, numel = storage_reference(pid)
                except BadReference as exc:
                    raise CorruptCheckpoint(str(exc), path=path) from None
            at = position(data_prefix + key)
            if at is None:
                raise CorruptCheckpoint(f"the pickle refers to storage {key!r}, which the archive lacks", path=path)
            known = infos[at]
            if known is not None:  # shared: tied weights, views of one storage
                return known
            offset = starts[at]
            if offset >= 0:
                length = file_sizes[at]
            else:
                offset, length = archive.stored_range(members.member(at))
            dtype = storage_type.dtype
            nbytes = numel * (DTYPE_BITS[dtype] // 8)  # itemsize(), inline
            if numel < 0 or nbytes > length:
                raise CorruptCheckpoint(f"storage {key!r} declares {nbytes} bytes but holds {length}", path=path)
            device = _LOCATIONS.get(location) if type(location) is str else None
            if device is None:
                device = _location(location)
            # Positional: keyword arguments cost as much as the rest of the construction.
            info = StorageInfo(key, dtype, nbytes, device, ByteRange(path, offset, nbytes), names[at],
                               crcs[at] if nbytes == length else None)
            infos[at] = info
            return info

        # Read through a function, so that no reference here keeps the bytes alive during the load.
        root = load_pickle_read(lambda: archive.read_member("data.pkl"), persistent_load, where=archive.pickle_name,
                                path=path)
        torchscript = archive.has("constants.pkl") or any(
            map(methodcaller("startswith", archive.prefix + "code/"), archive.members))
        extra: dict[str, Any] = {"archive_prefix": archive.prefix.rstrip("/")}
        if archive.has("byteorder"):
            extra["byteorder"] = archive.read_member("byteorder", 16).decode("ascii", "replace")
        if torchscript:
            from ckptdoctor.formats.readers.torchscript import torchscript_state_dict  # noqa: PLC0415 - rare path

            root = torchscript_state_dict(root)
        return build_checkpoint(path, "torchscript" if torchscript else "torch-zip", archive.file_size, root,
                                entry=entry, extra=extra)
    finally:
        archive.close()



def _sniff(head: Head) -> bool:
    return head.data.startswith(ZIP_LOCAL_HEADER)


FILE_FORMATS = (FileFormat("torch-zip", 10, _sniff, read_torch_zip),)
