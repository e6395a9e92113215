"""A lean reader of a zip's central directory and of single members, for torch.save archives.

Why not ``zipfile``: it builds a ``ZipInfo`` object per member (date, attributes, extra...), a
second or more for the 200,000 storages of a large mixture-of-experts checkpoint, of which the
torch reader needs five numbers. This module keeps exactly those, as tuples, and reads like
``zipfile`` in every respect a torch.save file can exercise (so results and errors do not
change): the end record is found the same way (at the end, else searched in the last 64 KiB),
zip64 end records and extra fields are honoured, archives appended to other bytes (``cat``)
are shifted by the same ``concat`` amount, the "version needed to extract" field is ignored as
torch's miniz ignores it (zipfile refuses above 6.3), names are decoded as UTF-8 or cp437 by flag bit 11
and cut at a NUL, and a member read checks the local header's magic and name and the CRC-32.

Bounded and hostile-safe: every offset and size is checked against the file before it is used,
the directory is read in one range no larger than the file, and every failure raises
:class:`BadZip` with a plain message (the reader turns it into a ``CorruptCheckpoint``).
"""

from __future__ import annotations

import operator
import struct
import zlib
from array import array
from collections.abc import Iterator, Mapping
from itertools import compress, repeat
from typing import NamedTuple

from ckptdoctor.io.rangefile import RangeFile

STORED, DEFLATED = 0, 8
END_RECORD = struct.Struct("<4s4H2LH")  # signature, disk, disk of dir, entries here, entries, size, offset, comment
END_SIG = b"PK\x05\x06"
ZIP64_LOCATOR = struct.Struct("<4sLQL")
ZIP64_LOCATOR_SIG = b"PK\x06\x07"
ZIP64_END = struct.Struct("<4sQ2H2L4Q")
ZIP64_END_SIG = b"PK\x06\x06"
# A central-directory entry, unpacking only what is used (versions, time, disk and attributes skipped).
CENTRAL = struct.Struct("<4s4x2H4x3L3H8xL")
CENTRAL_SIG = b"PK\x01\x02"
CENTRAL_FIXED = struct.Struct("<4x2H4x3L3H8xL")  # the same entry after its signature (42 bytes)
LOCAL = struct.Struct("<4s2B4HL2L2H")
LOCAL_SIG = b"PK\x03\x04"
MAX_COMMENT = 0xFFFF
FLAG_ENCRYPTED, FLAG_UTF8 = 0x1, 0x800
FLAG_UNSUPPORTED = 0x20 | 0x40  # compressed patched data, strong encryption (zipfile refuses both)


class BadZip(Exception):
    """The archive's structure is broken; the message says where."""


class TooManyMembers(BadZip):
    """The directory lists more members than the reader accepts."""


class Member(NamedTuple):
    """What a reader needs of one central-directory entry (offsets already shifted by ``concat``)."""

    name: str  # as zipfile names it: cut at the first NUL
    raw_name: str  # as stored, compared with the local header's name
    header_offset: int
    compress_type: int
    flag_bits: int
    crc: int
    compress_size: int
    file_size: int


def _column(values: list[int], code: str) -> array[int] | list[int]:
    """``values`` as a typed array (8 bytes or fewer each, no int object per value), or the list
    itself when one does not fit (a hostile offset beyond 2**63, a negative one)."""
    try:
        return array(code, values)
    except OverflowError:
        return values


class Columns(NamedTuple):
    """The directory's entries field by field (offsets shifted by ``concat``), as the plain parse reads them."""

    names: list[str]
    offsets: tuple[int, ...]
    methods: tuple[int, ...]
    flags: tuple[int, ...]
    crcs: tuple[int, ...]
    csizes: tuple[int, ...]
    usizes: tuple[int, ...]


class MemberTable(Mapping[str, Member]):
    """The members by name, kept as columns; each :class:`Member` is made when asked for.

    Why: a 200,000-storage checkpoint's members as tuples cost ~120 bytes each plus an int
    object per offset and CRC-32 (~37 MB), and they stay alive while its pickle is unpickled,
    which is when ``inspect`` peaks. Columns cost ~30 bytes a member (name index included);
    the reader asks for a few fields of each storage by position (:meth:`position`).
    """

    __slots__ = (
        "compress_sizes",
        "compress_types",
        "crcs",
        "file_sizes",
        "flag_bits",
        "header_offsets",
        "index",
        "names",
        "raw_names",
    )

    def __init__(self, columns: Columns, raw_names: dict[int, str] | None = None) -> None:
        """``raw_names``: position -> the name as stored, for the names cut at a NUL (none in a plain parse)."""
        self.names: list[str] = columns.names
        # A later duplicate wins, as in a dict of the members (the reader refuses duplicates).
        self.index: dict[str, int] = dict(zip(self.names, range(len(self.names))))
        self.raw_names: dict[int, str] = raw_names or {}
        self.header_offsets = _column(list(columns.offsets), "q")
        self.compress_types = _column(list(columns.methods), "H")
        self.flag_bits = _column(list(columns.flags), "H")
        self.crcs = _column(list(columns.crcs), "L")
        self.compress_sizes = _column(list(columns.csizes), "q")
        self.file_sizes = _column(list(columns.usizes), "q")

    @classmethod
    def from_members(cls, members: list[Member]) -> MemberTable:
        """The table of members the entry-by-entry loop read (a name may be cut at a NUL there)."""
        names = list(map(operator.itemgetter(0), members))
        raws = list(map(operator.itemgetter(1), members))
        differ = list(compress(range(len(members)), map(operator.ne, names, raws)))
        fields = (tuple(map(operator.itemgetter(k), members)) for k in range(2, 8))  # Member order = Columns order
        return cls(Columns(names, *fields), dict(zip(differ, map(raws.__getitem__, differ))))

    def member(self, position: int) -> Member:
        """The member at ``position`` in directory order."""
        name = self.names[position]
        return tuple.__new__(Member, (name, self.raw_names.get(position, name), self.header_offsets[position],
                                      self.compress_types[position], self.flag_bits[position], self.crcs[position],
                                      self.compress_sizes[position], self.file_sizes[position]))

    def position(self, name: str) -> int | None:
        """Where the member ``name`` is in the columns, or None."""
        return self.index.get(name)

    def __getitem__(self, name: str) -> Member:
        return self.member(self.index[name])

    def __contains__(self, name: object) -> bool:
        return name in self.index

    def __iter__(self) -> Iterator[str]:
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)


def _end_record(file: RangeFile) -> tuple[list[int], int, bool]:
    """(disk, dir disk, entries here, entries, dir size, dir offset), where the end record starts, zip64."""
    size = file.size
    last = file.read_at(max(0, size - END_RECORD.size), END_RECORD.size)
    if len(last) == END_RECORD.size and last[:4] == END_SIG and last[-2:] == b"\x00\x00":
        tail, where = last, 0  # no comment: the common case, one small read
    else:  # a comment follows: search the last 64 KiB for the signature
        tail = file.read_at(max(0, size - END_RECORD.size - MAX_COMMENT), END_RECORD.size + MAX_COMMENT)
        where = tail.rfind(END_SIG)
        if where < 0 or len(tail) - where < END_RECORD.size:
            raise BadZip("File is not a zip file")
    fields = list(END_RECORD.unpack_from(tail, where)[1:7])
    location = size - len(tail) + where
    return fields, location, _zip64_end(file, location, fields)


def _zip64_end(file: RangeFile, location: int, fields: list[int]) -> bool:
    """Replace ``fields`` by the zip64 end record's when a locator precedes the end record."""
    at = location - ZIP64_LOCATOR.size
    if at < 0:
        return False
    locator = file.read_at(at, ZIP64_LOCATOR.size)
    if len(locator) != ZIP64_LOCATOR.size:
        return False
    sig, disk, _offset, disks = ZIP64_LOCATOR.unpack(locator)
    if sig != ZIP64_LOCATOR_SIG:
        return False
    if disk != 0 or disks > 1:
        raise BadZip("zipfiles that span multiple disks are not supported")
    at -= ZIP64_END.size
    if at < 0:  # zipfile's seek before the start fails here: not a zip
        raise BadZip("File is not a zip file")
    record = file.read_at(at, ZIP64_END.size)
    if len(record) != ZIP64_END.size:
        return False
    sig, _sz, _made, _needed, disk_num, dir_disk, here, total, dir_size, dir_offset = ZIP64_END.unpack(record)
    if sig != ZIP64_END_SIG:
        return False
    fields[:] = [disk_num, dir_disk, here, total, dir_size, dir_offset]
    return True


def _zip64_extra(extra: bytes, file_size: int, compress_size: int, header_offset: int) -> tuple[int, int, int]:
    """The sizes and offset an extra field's zip64 record (id 1) replaces (as ``ZipInfo._decodeExtra``)."""
    while len(extra) >= 4:
        kind, length = struct.unpack_from("<HH", extra)
        if length + 4 > len(extra):
            raise BadZip(f"Corrupt extra field {kind:04x} (size={length})")
        if kind == 1:
            data = extra[4:length + 4]
            field = "File size"
            try:
                if file_size in (0xFFFF_FFFF_FFFF_FFFF, 0xFFFF_FFFF):
                    (file_size,), data = struct.unpack("<Q", data[:8]), data[8:]
                field = "Compress size"
                if compress_size == 0xFFFF_FFFF:
                    (compress_size,), data = struct.unpack("<Q", data[:8]), data[8:]
                field = "Header offset"
                if header_offset == 0xFFFF_FFFF:
                    (header_offset,) = struct.unpack("<Q", data[:8])
            except struct.error:
                raise BadZip(f"Corrupt zip64 extra field. {field} not found.") from None
        extra = extra[length + 4:]
    return file_size, compress_size, header_offset


def _plain_columns(data: bytes, concat: int, max_members: int) -> Columns | None:
    """The directory as torch's writer lays it out, parsed column by column at C speed; None
    when anything differs, and then ``ZipDirectory._parse``'s loop reads it (and says what is wrong).

    Why: the loop spends ~5 µs of Python per entry, a second for the 200,000 storages of a large
    mixture-of-experts file. Here the directory is split at every entry signature and each step
    maps a C function over all entries, with no Python frame per entry. The result is accepted
    only when the split pieces tile the directory exactly as entries without extra fields or
    comments, with one name encoding and no NUL in any name: a name holding the signature, a
    truncated entry or trailing bytes make some piece's length disagree with its name length,
    so such a directory always goes to the loop, which gives exactly the same members or error.
    """
    pieces = data.split(CENTRAL_SIG)
    count = len(pieces) - 1
    if pieces[0] or count > max_members:
        return None
    del pieces[0]
    fixed = CENTRAL_FIXED.size
    heads = b"".join(map(operator.itemgetter(slice(0, fixed)), pieces))
    if len(heads) != fixed * count:
        return None
    if count == 0:
        return Columns([], (), (), (), (), (), ())
    flags, methods, crcs, csizes, usizes, name_lens, extra_lens, comment_lens, offsets = zip(
        *CENTRAL_FIXED.iter_unpack(heads))
    if any(extra_lens) or any(comment_lens) or list(map(len, pieces)) != list(map(fixed.__add__, name_lens)):
        return None
    utf8 = set(map(FLAG_UTF8.__and__, flags))
    if len(utf8) != 1:
        return None
    raws = list(map(operator.itemgetter(slice(fixed, None)), pieces))
    del pieces
    if b"\x00" in b"".join(raws):
        return None  # a NUL would cut the name (zipfile's rule), and the loop applies it
    try:
        names = list(map(bytes.decode, raws, repeat("utf-8" if utf8.pop() else "cp437")))
    except UnicodeDecodeError:
        return None
    if concat:
        offsets = tuple(map(concat.__add__, offsets))
    return Columns(names, offsets, methods, flags, crcs, csizes, usizes)


def _parse_plain(data: bytes, concat: int, max_members: int) -> list[Member] | None:
    """:func:`_plain_columns` as one :class:`Member` per entry (None: the loop reads the directory)."""
    columns = _plain_columns(data, concat, max_members)
    return None if columns is None else _members(columns)


def _members(columns: Columns) -> list[Member]:
    """The plain parse's columns as one :class:`Member` per entry."""
    # Equal values share one int object (torch's flags 0x808 and a few tensor sizes, all above the
    # small-int cache): 32 bytes per member and field otherwise, 6 MB per field at 200,000 members.
    shared: dict[int, int] = {}
    flags, csizes, usizes = (tuple(map(shared.setdefault, column, column))
                             for column in (columns.flags, columns.csizes, columns.usizes))
    names = columns.names
    # Member(...) without its Python-level __new__, as in the loop
    return list(map(tuple.__new__, repeat(Member),
                    zip(names, names, columns.offsets, columns.methods, flags, columns.crcs, csizes, usizes)))


class ZipDirectory:
    """The members of an archive, where its central directory starts (``start_dir``, ``dir_size``)
    and where its end record is (``end_location``; ``zip64`` when a zip64 end record precedes it)."""

    def __init__(self, file: RangeFile, max_members: int, *, members: bool = True) -> None:
        self.file = file
        fields, location, zip64 = _end_record(file)
        dir_size, dir_offset = fields[4], fields[5]
        # Bytes before the archive proper (a zip appended to other data): zipfile's `concat`.
        concat = location - dir_size - dir_offset
        if zip64:
            concat -= ZIP64_END.size + ZIP64_LOCATOR.size
        self.start_dir = dir_offset + concat
        if self.start_dir < 0:
            raise BadZip("Bad offset for central directory")
        if self.start_dir + dir_size > file.size:
            raise BadZip("Truncated central directory")
        self.concat = concat
        self.dir_size, self.end_location, self.zip64 = dir_size, location, zip64
        self.max_members = max_members
        # members=False: only where things are (a caller that walks the directory bytes itself,
        # or one that asks for the members as a table)
        self.members = self._parse(self._read_directory(), concat, max_members) if members else []

    def _read_directory(self) -> bytes:
        return self.file.read_at(self.start_dir, self.dir_size)

    def table(self) -> MemberTable:
        """The members as columns (what ``ZipDirectory(..., members=False)`` left unparsed).

        A plain directory goes from its columns to the table directly: 200,000 entries never
        become 200,000 :class:`Member` tuples only to be split into columns again."""
        data = self._read_directory()
        plain = _plain_columns(data, self.concat, self.max_members)
        if plain is not None:
            return MemberTable(plain)
        return MemberTable.from_members(self._parse(data, self.concat, self.max_members))

    @staticmethod
    def _parse(data: bytes, concat: int, max_members: int) -> list[Member]:
        plain = _parse_plain(data, concat, max_members)
        if plain is not None:
            return plain
        members: list[Member] = []
        at, size, unpack = 0, len(data), CENTRAL.unpack_from
        make = tuple.__new__  # Member(...) without its Python-level __new__: one entry per storage
        while at < size:
            if at + CENTRAL.size > size:
                raise BadZip("Truncated central directory")
            sig, flags, method, crc, csize, usize, name_len, extra_len, comment_len, offset = unpack(data, at)
            if sig != CENTRAL_SIG:
                raise BadZip("Bad magic number for central directory")
            if len(members) >= max_members:
                raise TooManyMembers(f"archive lists more than {max_members} members")
            at += CENTRAL.size
            raw = data[at:at + name_len]
            raw_name = raw.decode("utf-8") if flags & FLAG_UTF8 else raw.decode("cp437")
            at += name_len
            if extra_len:
                usize, csize, offset = _zip64_extra(data[at:at + extra_len], usize, csize, offset)
            at += extra_len + comment_len
            cut = raw_name.find("\x00")
            members.append(make(Member, (raw_name if cut < 0 else raw_name[:cut], raw_name, offset + concat, method,
                                         flags, crc, csize, usize)))
        return members

    def read(self, member: Member) -> bytes:
        """The member's bytes, checked as ``zipfile`` checks them (local header, name, CRC-32)."""
        if member.flag_bits & FLAG_UNSUPPORTED:
            raise BadZip("compressed patched data or strong encryption (flag bit 5 or 6)")
        if member.compress_type not in (STORED, DEFLATED):
            raise BadZip("That compression method is not supported")
        start = self.data_start(member)
        if start + member.compress_size > self.file.size:
            raise BadZip(f"member {member.raw_name!r} extends past the end of the file")
        raw = self.file.read_at(start, member.compress_size)
        if member.compress_type == DEFLATED:
            inflater = zlib.decompressobj(-15)
            try:
                data = inflater.decompress(raw, member.file_size + 1)
            except zlib.error as exc:
                raise BadZip(f"Error -3 while decompressing data ({exc})") from None
        else:
            data = raw
        if len(data) != member.file_size:
            raise BadZip(f"member {member.raw_name!r} holds {len(data)} bytes, its entry says {member.file_size}")
        # A recorded 0 means "not computed": torch.save under set_crc32_options(False) writes 0 for
        # every member and torch.load reads such files, so the reader does too (scan reports them).
        if member.crc != 0 and zlib.crc32(data) != member.crc:
            raise BadZip(f"Bad CRC-32 for file {member.raw_name!r}")
        return data

    def data_start(self, member: Member) -> int:
        """Where the member's stored bytes start, after its local header (whose magic and name are checked)."""
        header = self.file.read_at(member.header_offset, LOCAL.size)
        if len(header) != LOCAL.size:
            raise BadZip("Truncated file header")
        fields = LOCAL.unpack(header)
        if fields[0] != LOCAL_SIG:
            raise BadZip("Bad magic number for file header")
        name_len, extra_len = fields[-2], fields[-1]
        raw = self.file.read_at(member.header_offset + LOCAL.size, name_len)
        name = raw.decode("utf-8") if fields[3] & FLAG_UTF8 else raw.decode("cp437")
        if name != member.raw_name:
            raise BadZip(f"File name in directory {member.raw_name!r} and header {raw!r} differ.")
        return member.header_offset + LOCAL.size + name_len + extra_len
