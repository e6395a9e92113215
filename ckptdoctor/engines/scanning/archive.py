"""Zip audit for torch.save / TorchScript archives, with our own parser of the raw records.

``zipfile`` (and miniz, which torch uses in caffe2/serialize/inline_container.cc) each resolve
ambiguities their own way: duplicate names, a local header that names a different file than the
central directory, bytes prepended before the first header (``zipfile`` tolerates them and
shifts every offset; torch's ``_is_zipfile`` in torch/serialization.py looks only at the first
four bytes and otherwise treats the file as a legacy pickle stream). A scanner that trusts one
reader can be shown a benign archive while the loader runs another. So the archive is parsed
here with ``struct``, every disagreement is an anomaly, and every pickle any reader might load
is walked.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from typing import IO

from ckptdoctor.engines.scanning.payloads import NPY_HEADER_LIMIT, code_like, npy_pickle_offset
from ckptdoctor.engines.scanning.pickle_walk import (
    TRIAL_BYTES,
    Findings,
    is_pickle_start,
    looks_like_pickle,
    walk_pickle,
)
from ckptdoctor.errors import CorruptCheckpoint, LimitExceeded
from ckptdoctor.formats.magic import NPY_MAGIC, ZIP_LOCAL_HEADER
from ckptdoctor.limits import MAX_MEMBERS, MAX_PICKLE_BYTES

CENTRAL_SIG = b"PK\x01\x02"
EOCD_SIG = b"PK\x05\x06"
EOCD64_SIG = b"PK\x06\x06"
EOCD64_LOCATOR_SIG = b"PK\x06\x07"
DESCRIPTOR_SIG = b"PK\x07\x08"
MAX_COMMENT = 0xFFFF
MAX_CENTRAL_DIR = 256 << 20
CRC_LIMIT = 64 << 20  # CRC is checked for pickles and for members up to this size
MAX_PICKLE = MAX_PICKLE_BYTES  # a deflated pickle is inflated up to this many bytes
HEAD = 4096  # bytes of each member read to recognise pickles and code
# what torch.save writes under the archive's folder besides data/<key> (torch/serialization.py
# _save, caffe2/serialize/inline_container.cc); TorchScript adds code/, constants/, extra/
TORCH_LAYOUT = frozenset(
    {"data.pkl", "byteorder", "version", ".format_version", ".storage_alignment", ".data/version",
     ".data/serialization_id", "constants.pkl"}
)  # fmt: skip
FLAG_ENCRYPTED = 0x0001
FLAG_DESCRIPTOR = 0x0008
FLAG_STRONG_ENCRYPTION = 0x0040
FLAG_MASKED_HEADERS = 0x2000


@dataclass(frozen=True)
class Member:
    """One central-directory entry plus what its local header says."""

    name: str
    local_name: str | None
    flags: int
    method: int
    crc: int
    csize: int
    usize: int
    header_offset: int  # absolute, after correcting for prepended bytes
    data_offset: int | None  # absolute; None when the local header is unreadable
    local_flags: int
    local_method: int


def find_eocd(f: IO[bytes], size: int) -> int | None:
    """Offset of the end-of-central-directory record, searching the last 64 KiB like zipfile."""
    tail_len = min(size, 22 + MAX_COMMENT)
    f.seek(size - tail_len)
    tail = f.read(tail_len)
    pos = tail.rfind(EOCD_SIG)
    while pos >= 0:
        if pos + 22 <= len(tail):
            return size - tail_len + pos
        pos = tail.rfind(EOCD_SIG, 0, pos)
    return None


def _read_at(f: IO[bytes], offset: int, n: int) -> bytes:
    """*n* bytes at *offset*, or fewer past the end of the file.

    Offsets come from the archive itself: a lying zip64 field can name one no file system can
    seek to (ext4 refuses offsets beyond its largest file with EINVAL, Python any past 2**63),
    which reads as nothing,
    like any other offset past the end, so the caller reports it as the corruption it is.
    """
    if offset < 0:
        return b""
    try:
        f.seek(offset)
    except (OSError, OverflowError, ValueError):  # ValueError: past 2**63, no off_t holds it
        return b""
    return f.read(n)


def _zip64_extra(extra: bytes, usize: int, csize: int, offset: int) -> tuple[int, int, int]:
    """Apply a zip64 extended-information extra field (id 0x0001) to 0xFFFFFFFF placeholders."""
    i = 0
    while i + 4 <= len(extra):
        tag, ln = struct.unpack_from("<HH", extra, i)
        body = extra[i + 4 : i + 4 + ln]
        if tag == 1:
            vals = [struct.unpack_from("<Q", body, j)[0] for j in range(0, len(body) - 7, 8)]
            if usize == 0xFFFFFFFF and vals:
                usize = vals.pop(0)
            if csize == 0xFFFFFFFF and vals:
                csize = vals.pop(0)
            if offset == 0xFFFFFFFF and vals:
                offset = vals.pop(0)
        i += 4 + ln
    return usize, csize, offset


class ArchiveAudit:
    """Parse one zip archive and report every irregularity into *findings*."""

    storage_crc = True  # False for remote files: tensor bytes are never fetched to check their CRC

    def __init__(self, f: IO[bytes], size: int, findings: Findings, eocd: int) -> None:
        self.f = f
        self.size = size
        self.fd = findings
        self.eocd = eocd
        self.members: list[Member] = []
        self.concat = 0
        self.end_of_archive = size
        self.torchscript = False
        self.cd_start = 0
        self.prefix = ""
        self.unrecorded = 0  # members whose stored CRC-32 is 0 ("not computed") while their bytes hash otherwise

    def anomaly(self, code: str, message: str, where: str) -> None:
        self.fd.anomaly(code, message, where)

    # -- structure -----------------------------------------------------------------------
    def read_directory(self) -> None:
        rec = _read_at(self.f, self.eocd, 22)
        (_, _, _, _, count, cd_size, cd_offset, comment_len) = struct.unpack("<4sHHHHIIH", rec)
        self.end_of_archive = self.eocd + 22 + comment_len
        cd_end = self.eocd
        loc = _read_at(self.f, self.eocd - 20, 20) if self.eocd >= 20 else b""
        if loc[:4] == EOCD64_LOCATOR_SIG:
            (eocd64_off,) = struct.unpack_from("<Q", loc, 8)
            rec64 = _read_at(self.f, eocd64_off, 56)
            if rec64[:4] == EOCD64_SIG and len(rec64) == 56:
                count, cd_size, cd_offset = struct.unpack_from("<QQQ", rec64, 32)
                cd_end = eocd64_off
            else:
                raise CorruptCheckpoint("zip64 end-of-central-directory locator points at garbage")
        if cd_size > MAX_CENTRAL_DIR or count > MAX_MEMBERS:
            raise LimitExceeded(f"zip central directory declares {count} members / {cd_size} bytes")
        # zipfile's "concat": bytes prepended to the archive shift every recorded offset.
        self.concat = cd_end - cd_size - cd_offset
        if self.concat < 0:
            raise CorruptCheckpoint("zip central directory offsets point past the end of the file")
        self.cd_start = cd_offset + self.concat
        cd = _read_at(self.f, self.cd_start, cd_size)
        if len(cd) != cd_size:
            raise CorruptCheckpoint("zip central directory is truncated")
        i = 0
        while i + 46 <= len(cd) and cd[i : i + 4] == CENTRAL_SIG and len(self.members) < MAX_MEMBERS:
            (flags, method, _t, _d, crc, csize, usize, nlen, xlen, clen) = struct.unpack_from("<HHHHIIIHHH", cd, i + 8)
            (offset,) = struct.unpack_from("<I", cd, i + 42)
            name = cd[i + 46 : i + 46 + nlen].decode("utf-8", "replace")
            extra = cd[i + 46 + nlen : i + 46 + nlen + xlen]
            usize, csize, offset = _zip64_extra(extra, usize, csize, offset)
            self.members.append(self._with_local(name, flags, method, crc, csize, usize, offset + self.concat))
            i += 46 + nlen + xlen + clen
        if len(self.members) != count:
            self.anomaly(
                "directory-count",
                f"central directory holds {len(self.members)} entries, end record says {count}",
                "zip central directory",
            )

    def _with_local(self, name: str, flags: int, method: int, crc: int, csize: int, usize: int, offset: int) -> Member:
        hdr = _read_at(self.f, offset, 30)
        if len(hdr) < 30 or hdr[:4] != ZIP_LOCAL_HEADER:
            self.anomaly(
                "bad-local-header", f"no local header where the central directory puts {name!r}", f"{name} @ {offset}"
            )
            return Member(name, None, flags, method, crc, csize, usize, offset, None, flags, method)
        (_v, lflags, lmethod, _t, _d, lcrc, lcsize, lusize, nlen, xlen) = struct.unpack_from("<HHHHHIIIHH", hdr, 4)
        lname_b = _read_at(self.f, offset + 30, nlen)
        lextra = self.f.read(xlen)
        lname = lname_b.decode("utf-8", "replace")
        lusize, lcsize, _ = _zip64_extra(lextra, lusize, lcsize, 0)
        if not (lflags & FLAG_DESCRIPTOR) and (lcsize, lusize, lcrc) != (csize, usize, crc):
            self.anomaly(
                "size-mismatch",
                f"local header says {lcsize}/{lusize} bytes crc {lcrc:08x}, central directory says "
                f"{csize}/{usize} crc {crc:08x}",
                name,
            )
        return Member(name, lname, flags, method, crc, csize, usize, offset, offset + 30 + nlen + xlen, lflags, lmethod)

    # -- checks --------------------------------------------------------------------------
    def audit(self) -> None:
        # torch.jit.save deflates code/ sources and their .debug_pkl pickles (torch/csrc/jit/
        # serialization/export_module.cpp); that is normal for TorchScript, not a trick.
        self.torchscript = any(is_torchscript_member(m.name) for m in self.members)
        names: dict[str, int] = {}
        for m in self.members:
            names[m.name] = names.get(m.name, 0) + 1
            if m.local_name is not None and m.local_name != m.name:
                self.anomaly(
                    "name-mismatch",
                    f"central directory says {m.name!r}, local header says "
                    f"{m.local_name!r}: readers disagree on which file this is",
                    m.name,
                )
            if (m.flags | m.local_flags) & (FLAG_ENCRYPTED | FLAG_STRONG_ENCRYPTION | FLAG_MASKED_HEADERS):
                self.anomaly("encrypted-member", "encryption flag set (torch never encrypts)", m.name)
            ts_code = self.torchscript and "/code/" in f"/{m.name}"
            if (m.method != 0 and not (ts_code and m.method == 8)) or m.local_method != m.method:
                self.anomaly(
                    "compressed-member",
                    f"compression method {m.method} (local {m.local_method}); torch writes stored members only",
                    m.name,
                )
            if m.method == 0 and m.csize != m.usize:
                self.anomaly("size-mismatch", f"stored member with compressed size {m.csize} != size {m.usize}", m.name)
            if m.data_offset is not None and m.data_offset + m.csize > self.size:
                self.anomaly(
                    "member-out-of-bounds",
                    f"data runs {m.data_offset + m.csize - self.size} bytes past the end of the file",
                    m.name,
                )
            if m.name.startswith("/") or ".." in m.name.split("/"):
                self.anomaly("path-traversal", "member name escapes the archive directory", m.name)
        for name, n in names.items():
            if n > 1:
                self.anomaly(
                    "duplicate-member",
                    f"{n} members named {name!r}; zipfile reads the last, other readers the first",
                    name,
                )
        folded: dict[str, list[str]] = {}
        for name in names:
            folded.setdefault(name.lower(), []).append(name)
        for spellings in folded.values():
            if len(spellings) > 1:
                self.anomaly(
                    "duplicate-member",
                    f"members {', '.join(map(repr, spellings))} differ only in case: torch's zip reader (miniz) "
                    "looks names up ignoring case, zipfile does not, so they read different bytes",
                    spellings[0],
                )
        # torch's reader takes the archive name from the first record (inline_container.cc).
        prefix = self.prefix = self.members[0].name.split("/", 1)[0] if self.members else ""
        for m in self.members:
            if "/" not in m.name or m.name.split("/", 1)[0] != prefix:
                self.anomaly("outside-prefix", f"member is outside the archive's top-level folder {prefix!r}", m.name)
        self._layout()

    def _span_end(self, m: Member) -> int:
        assert m.data_offset is not None
        end = m.data_offset + m.csize
        if m.local_flags & FLAG_DESCRIPTOR:
            sig = _read_at(self.f, end, 4)
            end += (4 if sig == DESCRIPTOR_SIG else 0) + (20 if m.csize >= 0xFFFFFFFF else 12)
        return end

    def _layout(self) -> None:
        """Overlaps, prepended bytes, gaps between members and bytes after the end record."""
        spans = sorted((m.header_offset, self._span_end(m), m.name) for m in self.members if m.data_offset is not None)
        cursor = 0
        for start, end, name in spans:
            if start < cursor:
                self.anomaly(
                    "overlapping-members",
                    f"member starts at {start}, inside the previous member (which ends at {cursor})",
                    name,
                )
            elif start > cursor:
                self._gap(cursor, start, "before the first member" if cursor == 0 else f"before {name!r}")
            cursor = max(cursor, end)
        if spans and cursor < self.cd_start:
            self._gap(cursor, self.cd_start, "between the last member and the central directory")
        if self.end_of_archive < self.size:
            self.anomaly(
                "trailing-bytes",
                f"{self.size - self.end_of_archive} bytes after the end of the zip archive",
                f"offset {self.end_of_archive}",
            )

    def _gap(self, start: int, end: int, what: str) -> None:
        code = "prefix-bytes" if start == 0 else "unaccounted-bytes"
        self.anomaly(code, f"{end - start} bytes {what} that no zip member accounts for", f"offset {start}")
        head = _read_at(self.f, start, 30)
        if is_pickle_start(head):
            label = "leading pickle (bytes before the zip)" if start == 0 else f"pickle hidden at offset {start}"
            self.f.seek(start)
            walk_pickle(self.f, end - start, self.fd, label)
        elif head[:4] == ZIP_LOCAL_HEADER and len(head) == 30:
            # A member the central directory does not list: invisible to zipfile and miniz,
            # visible to readers that stream local headers.
            (nlen, xlen) = struct.unpack_from("<HH", head, 26)
            name = self.f.read(nlen).decode("utf-8", "replace")
            data_start = start + 30 + nlen + xlen
            self.anomaly(
                "orphan-member", f"local header for {name!r} is not in the central directory", f"offset {start}"
            )
            if data_start < end and (name.endswith(".pkl") or is_pickle_start(_read_at(self.f, data_start, 2))):
                self.f.seek(data_start)
                walk_pickle(self.f, end - data_start, self.fd, f"orphan member {name}")

    # -- contents ------------------------------------------------------------------------
    def scan_members(self) -> None:
        """Walk every pickle in the archive, wherever it sits and whatever it is called.

        torch loads ``data.pkl`` only. A pickle (any protocol, with or without PROTO) or code in
        a member outside torch's layout is reported with what it holds: torch never reads it,
        but a tool that walks the archive, or a user told to, may.
        """
        seen: dict[str, int] = {}
        big = unchecked = 0
        for m in self.members:
            if m.data_offset is None:
                continue
            seen[m.name] = seen.get(m.name, 0) + 1
            label = m.name if seen[m.name] == 1 else f"{m.name} (copy {seen[m.name]})"
            is_storage = (
                "/data/" in f"/{m.name}" or (self.torchscript and "/constants/" in f"/{m.name}")
            ) and not m.name.endswith(".pkl")
            skip_bytes = is_storage and m.method == 0 and not self.storage_crc
            if skip_bytes:  # remote: a stored tensor's bytes are never fetched (scanned as a pickle if it is one)
                head = b""
            elif m.method == 0:
                head = _read_at(self.f, m.data_offset, min(m.csize, HEAD))
            else:
                head = self._inflate(m, HEAD)
            named_pickle = m.name.endswith((".pkl", ".debug_pkl")) or (m.local_name or "").endswith(".pkl")
            expected = self._in_layout(m.name)
            ts_code = self.torchscript and "/code/" in f"/{m.name}"
            hidden = (
                not named_pickle
                and not is_storage
                and not ts_code
                and (is_pickle_start(head) or self._member_is_pickle(m))
            )
            if skip_bytes:
                unchecked += 1
            elif m.usize <= CRC_LIMIT or named_pickle or hidden:
                self._check_crc(m, label)
            else:
                big += 1
            if hidden:
                self.anomaly("hidden-pickle", "member is a pickle under a name that is not .pkl", label)
            elif named_pickle and not expected:
                self.anomaly(
                    "stray-pickle",
                    "pickle outside torch's layout: torch.load never reads it, tools that walk the archive may",
                    label,
                )
            if named_pickle or hidden:
                self._scan_pickle_member(m, label)
            elif head.startswith(NPY_MAGIC):
                self._scan_npy_member(m, label)
            elif not expected and not is_storage and not ts_code:
                what = code_like(head)
                if what is not None:
                    self.anomaly("stray-code", f"member outside torch's layout holds {what}", label)
        if big:
            self.fd.note(f"CRC not checked for {big} member(s) larger than {CRC_LIMIT >> 20} MiB")
        if unchecked:
            self.fd.note(f"CRC not checked for {unchecked} tensor storage(s): a remote scan reads the archive's "
                         "directory and pickles, not the weights")
        if self.unrecorded:
            self.fd.note(f"CRC-32 not recorded for {self.unrecorded} member(s) (stored as 0, as torch.save writes "
                         "under torch.serialization.set_crc32_options(False)); torch.load and ckptdoctor read "
                         "them unchecked")

    def _scan_npy_member(self, m: Member, label: str) -> None:
        """An .npy member (an .npz archive): an object array's data is a pickle np.load runs."""
        assert m.data_offset is not None
        if m.method == 0:
            offset = npy_pickle_offset(_read_at(self.f, m.data_offset, min(m.csize, NPY_HEADER_LIMIT)))
            if offset is not None:
                self.f.seek(m.data_offset + offset)
                walk_pickle(self.f, max(0, m.csize - offset), self.fd, f"{label} (object array)")
        elif m.method == 8:
            data = self._inflate(m, MAX_PICKLE)
            offset = npy_pickle_offset(data[:NPY_HEADER_LIMIT])
            if offset is not None:
                walk_pickle(io.BytesIO(data[offset:]), len(data) - offset, self.fd, f"{label} (object array)")

    def _in_layout(self, name: str) -> bool:
        """Is *name* a member torch.save or torch.jit.save writes (under the archive's folder)?"""
        folder, _, rest = name.partition("/")
        if folder != self.prefix or not rest:
            return False
        if self.torchscript and rest.startswith(("code/", "constants/", "extra/")):
            return True
        return rest in TORCH_LAYOUT or (rest.startswith("data/") and "/" not in rest[5:])

    def _member_is_pickle(self, m: Member) -> bool:
        """A protocol 0/1 pickle has no header; try to parse the member's start as one."""
        assert m.data_offset is not None
        if m.method == 0:
            return looks_like_pickle(self.f, m.data_offset, max(0, min(m.csize, self.size - m.data_offset)))
        data = self._inflate(m, TRIAL_BYTES)
        return looks_like_pickle(io.BytesIO(data), 0, len(data))

    def _inflate(self, m: Member, limit: int) -> bytes:
        assert m.data_offset is not None
        if m.method != 8:
            return b""
        d = zlib.decompressobj(-15)
        self.f.seek(m.data_offset)
        out = bytearray()
        left = m.csize
        try:
            while left > 0 and len(out) < limit:
                chunk = self.f.read(min(1 << 20, left))
                if not chunk:
                    break
                left -= len(chunk)
                out += d.decompress(chunk, limit - len(out))
        except zlib.error:
            self.anomaly("corrupt-member", "deflate stream is invalid", m.name)
        return bytes(out[:limit])

    def _check_crc(self, m: Member, label: str) -> None:
        assert m.data_offset is not None
        if m.method == 8:
            data = self._inflate(m, m.usize if m.usize <= MAX_PICKLE else MAX_PICKLE)
            crc = zlib.crc32(data)
        elif m.method == 0:
            self.f.seek(m.data_offset)
            crc, left = 0, min(m.csize, self.size - m.data_offset)
            while left > 0:
                chunk = self.f.read(min(1 << 20, left))
                if not chunk:
                    break
                crc = zlib.crc32(chunk, crc)
                left -= len(chunk)
        else:
            return
        if crc != m.crc and m.crc == 0:
            self.unrecorded += 1  # "not computed", not a mismatch: one note for the archive
        elif crc != m.crc:
            self.anomaly("crc-mismatch", f"stored CRC {m.crc:08x}, contents hash to {crc:08x}", label)

    def _scan_pickle_member(self, m: Member, label: str) -> None:
        assert m.data_offset is not None
        if m.method == 0:
            length = max(0, min(m.csize, self.size - m.data_offset))
            self.f.seek(m.data_offset)
            res = walk_pickle(self.f, length, self.fd, label)
            stream: IO[bytes] = self.f
            base = m.data_offset
        elif m.method == 8:
            data = self._inflate(m, MAX_PICKLE)
            length = len(data)
            stream = io.BytesIO(data)
            base = 0
            res = walk_pickle(stream, length, self.fd, label)
        else:
            self.anomaly("compressed-member", f"pickle stored with unknown method {m.method}; not scanned", label)
            return
        if res.end is not None and res.end < length:
            self.anomaly(
                "data-after-stop", f"{length - res.end} bytes follow the pickle's STOP opcode", f"{label} @ {res.end}"
            )
            stream.seek(base + res.end)
            if is_pickle_start(stream.read(2)):
                stream.seek(base + res.end)
                walk_pickle(stream, length - res.end, self.fd, f"second pickle in {label} @ offset {res.end}")


def is_torchscript_member(name: str) -> bool:
    """``code/`` sources or ``constants.pkl`` mark a torch.jit.save archive."""
    return "/code/" in f"/{name}" or name.endswith("constants.pkl")


def audit_zip(f: IO[bytes], size: int, findings: Findings, eocd: int, *, storage_crc: bool = True) -> tuple[str, ...]:
    """Audit the archive whose end record is at *eocd*; return its member names.

    ``storage_crc=False`` (a remote file) checks the CRC of pickles and of every other member but
    not of tensor storages, so a scan fetches the directory and the pickles, never the weights.
    """
    audit = ArchiveAudit(f, size, findings, eocd)
    audit.storage_crc = storage_crc
    audit.read_directory()
    if not any(m.data_offset is not None for m in audit.members):
        raise CorruptCheckpoint("zip archive has no readable member")
    audit.audit()
    audit.scan_members()
    return tuple(m.name for m in audit.members)
