"""Decode pickle opcodes the way CPython's unpicklers read them, frames included.

``pickletools.genops`` reads every argument linearly and treats ``FRAME`` as a no-op. CPython
does not: after ``FRAME n`` the next *n* bytes are a frame, and how a read that runs past the
frame's end behaves depends on the unpickler (python/cpython#154848, fickling's
``test_frame_boundary_divergence``):

* ``pickle._Unpickler`` (``Lib/pickle.py``, ``_Unframer``) and the C unpickler from CPython
  3.13.15 / 3.14.7 on refuse it: "pickle exhausted before end of frame", and a ``FRAME`` that
  opens before the previous frame is used up is refused too. That is :data:`STRICT`, the
  reading the scan reports by default.
* older C unpicklers (``Modules/_pickle.c``) reading a file object without ``peek`` -- which is
  how ``torch.load`` reads ``data.pkl`` (an ``io.BytesIO`` over the zip record) -- fetch the
  whole frame into their buffer, and a fixed-size read or a line that does not fit in what is
  left of the buffer is read afresh *from the file after the frame*: the rest of the frame is
  skipped, and bytes a linear reader takes for an argument are run as opcodes
  (:data:`C_STREAM`). Bytes payloads (``_Unpickler_ReadInto``) continue linearly.
* the C unpickler over bytes in memory (``pickle.loads``) and ``pickletools`` read linearly and
  ignore frames (:data:`LINEAR`).

A pickle whose frames are consistent reads the same under all three. When they are not, the
walker reports the violation and walks the pickle again under the other two readings, so the
globals any of them would import are all reported.

Every read goes through :class:`Source`, which clips to the pickle's window and never holds
more than a bounded chunk: a ``BINBYTES8`` of 2^62 costs nothing, and bytes arguments are handed
out as spans (offsets), not copies.
"""

from __future__ import annotations

import codecs
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

STRICT = "strict"
C_STREAM = "c-stream"
LINEAR = "linear"

MAX_TEXT = 64 << 20  # text arguments longer than this are not materialised (never needed for a verdict)
MAX_LINE = 1 << 20  # protocol 0 lines: only the first MiB of a line is kept
_CHUNK = 1 << 20


class PickleReadError(Exception):
    """The pickle cannot be read further; ``code`` is the scan's anomaly code."""

    def __init__(self, code: str, message: str, offset: int) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.offset = offset


@dataclass(frozen=True)
class Span:
    """``length`` bytes of the pickle starting at ``start`` (relative to the pickle's start)."""

    start: int
    length: int


class Source:
    """``length`` bytes of *f* from *base*, read through one bounded chunk.

    The walker is the only user of *f* while a source is alive; every read seeks first.
    """

    def __init__(self, f: IO[bytes], base: int, length: int) -> None:
        self.f = f
        self.base = base
        self.length = max(length, 0)
        self._chunk = b""
        self._chunk_at = 0

    def get(self, start: int, n: int) -> bytes:
        """Bytes ``[start, start + n)`` clipped to the window."""
        off = start - self._chunk_at
        if off >= 0 and off + n <= len(self._chunk):
            return self._chunk[off : off + n]
        return self._fill(start, n)

    def _fill(self, start: int, n: int) -> bytes:
        n = max(0, min(n, self.length - start))
        if n == 0:
            return b""
        off = start - self._chunk_at
        if off >= 0 and off + n <= len(self._chunk):
            return self._chunk[off : off + n]
        if n > _CHUNK // 2:
            self.f.seek(self.base + start)
            return self.f.read(n)
        self.f.seek(self.base + start)
        self._chunk = self.f.read(min(_CHUNK, self.length - start))
        self._chunk_at = start
        return self._chunk[:n]

    def byte(self, pos: int) -> int:
        off = pos - self._chunk_at
        if 0 <= off < len(self._chunk):
            return self._chunk[off]
        b = self.get(pos, 1)
        return b[0] if b else -1

    def find_newline(self, start: int, limit: int) -> int:
        """Offset of the first ``\\n`` in ``[start, limit)``, or -1."""
        limit = min(limit, self.length)
        pos = start
        while pos < limit:
            chunk = self.get(pos, min(_CHUNK // 2, limit - pos))
            if not chunk:
                return -1
            i = chunk.find(b"\n")
            if i >= 0:
                return pos + i
            pos += len(chunk)
        return -1


def _truncated(what: str, offset: int) -> PickleReadError:
    return PickleReadError("truncated-pickle", f"pickle ends before its STOP opcode ({what})", offset)


class Reader:
    """Linear reading (:data:`LINEAR`): frames only have to fit in the data."""

    mode = LINEAR

    def __init__(self, src: Source) -> None:
        self.src = src
        self.pos = 0
        self.skipped = 0  # bytes a C_STREAM reader jumped over (0 for the others)

    def read(self, n: int) -> int:
        """Consume *n* bytes for a fixed-size field; return where they start."""
        start = self.pos
        if start + n > self.src.length:
            raise _truncated(f"{n} bytes wanted at offset {start}", start)
        self.pos = start + n
        return start

    def take(self, n: int) -> bytes:
        """Consume *n* bytes for a fixed-size field and return them (they end at ``pos``)."""
        return self.src.get(self.read(n), n)

    def payload(self, n: int) -> int:
        """Consume a bytes payload (``BINBYTES``..., read with ``readinto`` by CPython)."""
        return self.read(n)

    def readline(self) -> tuple[int, int]:
        """Consume one ``\\n``-terminated line; return (start, end) with end after the newline."""
        start = self.pos
        nl = self.src.find_newline(start, self.src.length)
        if nl < 0:
            raise _truncated(f"no newline after offset {start}", start)
        self.pos = nl + 1
        return start, nl + 1

    def frame(self, n: int, at: int) -> None:
        if self.pos + n > self.src.length:
            raise _truncated(f"FRAME at offset {at} declares {n} bytes, {self.src.length - self.pos} remain", at)


class StrictReader(Reader):
    """``pickle._Unpickler``'s ``_Unframer`` (and CPython >= 3.13.15's C unpickler)."""

    mode = STRICT

    def __init__(self, src: Source) -> None:
        super().__init__(src)
        self.frame_end: int | None = None

    def _check(self, n: int) -> None:
        fe = self.frame_end
        if fe is None:
            return
        if self.pos >= fe:
            if n:  # an exhausted frame: the read falls through to the file
                self.frame_end = None
        elif self.pos + n > fe:
            raise PickleReadError(
                "frame-violation",
                f"a {n}-byte read at offset {self.pos} runs past the end of its frame at offset {fe}: "
                "CPython >= 3.13.15 and pickle._Unpickler refuse it (pickle exhausted before end of frame); "
                "older C unpicklers skip the rest of the frame and run what a linear reader takes for data",
                self.pos,
            )

    def read(self, n: int) -> int:
        if self.frame_end is not None:
            self._check(n)
        return super().read(n)

    # take() and payload() are Reader's: both consume through read(), so every read is checked.

    def readline(self) -> tuple[int, int]:
        fe = self.frame_end
        if fe is not None and self.pos >= fe:
            self.frame_end = fe = None
        if fe is None:
            return super().readline()
        nl = self.src.find_newline(self.pos, fe)
        if nl < 0:
            raise PickleReadError(
                "frame-violation",
                f"a text line at offset {self.pos} runs past the end of its frame at offset {fe} "
                "(pickle exhausted before end of frame)",
                self.pos,
            )
        start = self.pos
        self.pos = nl + 1
        return start, nl + 1

    def frame(self, n: int, at: int) -> None:
        if self.frame_end is not None and self.pos < self.frame_end:
            raise PickleReadError(
                "frame-violation",
                f"FRAME at offset {at} opens before the frame ending at offset {self.frame_end} is used up "
                "(beginning of a new frame before end of current frame)",
                at,
            )
        # pickle._Unpickler reads what is there; a short frame then fails on the first read past it
        self.frame_end = min(self.pos + n, self.src.length)


class CStreamReader(Reader):
    """The C unpickler of CPython < 3.13.15 reading a file object without ``peek()``.

    ``[pos, buf_end)`` is what is left of its input buffer; the file position is ``buf_end``.
    ``_Unpickler_Read`` serves a read from the buffer when it fits, else reads exactly *n*
    bytes from the file (the buffer's rest is dropped); ``_Unpickler_ReadInto`` (bytes payloads)
    drains the buffer and continues from the file; ``load_frame`` pulls the frame into the buffer.
    Without frames, the buffer is always used up and this is a linear reading.
    """

    mode = C_STREAM

    def __init__(self, src: Source) -> None:
        super().__init__(src)
        self.buf_end = 0

    def read(self, n: int) -> int:
        if n <= self.buf_end - self.pos:
            start = self.pos
            self.pos += n
            return start
        start = self.buf_end
        if start + n > self.src.length:
            raise _truncated(f"{n} bytes wanted at offset {start}", start)
        self.skipped += self.buf_end - self.pos
        self.pos = self.buf_end = start + n
        return start

    def payload(self, n: int) -> int:
        start = super().read(n)
        self.buf_end = max(self.buf_end, self.pos)
        return start

    def readline(self) -> tuple[int, int]:
        nl = self.src.find_newline(self.pos, self.buf_end)
        if nl >= 0:
            start = self.pos
            self.pos = nl + 1
            return start, nl + 1
        start = self.buf_end
        nl = self.src.find_newline(start, self.src.length)
        if nl < 0:
            raise _truncated(f"no newline after offset {start}", start)
        self.skipped += self.buf_end - self.pos
        self.pos = self.buf_end = nl + 1
        return start, nl + 1

    def frame(self, n: int, at: int) -> None:
        if n <= self.buf_end - self.pos:
            return
        start = self.buf_end
        if start + n > self.src.length:
            raise _truncated(f"FRAME at offset {at} declares {n} bytes, {self.src.length - start} remain", at)
        self.skipped += self.buf_end - self.pos
        self.pos = start
        self.buf_end = start + n


READERS: dict[str, type[Reader]] = {STRICT: StrictReader, C_STREAM: CStreamReader, LINEAR: Reader}

# -- the opcode table -------------------------------------------------------------------------
# kind: "none" (no argument), "int" (fixed-size little-endian integer; fmt), "counted" (a size
# field, then that many bytes; fmt and what the bytes are), "line", "lines2" (GLOBAL/INST).
_NONE_OPS = {
    b"(": "MARK", b".": "STOP", b"0": "POP", b"1": "POP_MARK", b"2": "DUP", b"N": "NONE",
    b"\x88": "NEWTRUE", b"\x89": "NEWFALSE", b"]": "EMPTY_LIST", b"}": "EMPTY_DICT", b")": "EMPTY_TUPLE",
    b"\x8f": "EMPTY_SET", b"a": "APPEND", b"e": "APPENDS", b"b": "BUILD", b"d": "DICT", b"l": "LIST",
    b"t": "TUPLE", b"\x85": "TUPLE1", b"\x86": "TUPLE2", b"\x87": "TUPLE3", b"R": "REDUCE", b"s": "SETITEM",
    b"u": "SETITEMS", b"\x93": "STACK_GLOBAL", b"\x94": "MEMOIZE", b"\x81": "NEWOBJ", b"\x92": "NEWOBJ_EX",
    b"o": "OBJ", b"\x90": "ADDITEMS", b"\x91": "FROZENSET", b"Q": "BINPERSID", b"\x97": "NEXT_BUFFER",
    b"\x98": "READONLY_BUFFER",
}  # fmt: skip
_INT_OPS = {
    key: (name, struct.Struct(fmt))
    for key, (name, fmt) in {
        b"\x80": ("PROTO", "<B"), b"J": ("BININT", "<i"), b"K": ("BININT1", "<B"), b"M": ("BININT2", "<H"),
        b"G": ("BINFLOAT", ">d"), b"h": ("BINGET", "<B"), b"j": ("LONG_BINGET", "<I"), b"q": ("BINPUT", "<B"),
        b"r": ("LONG_BINPUT", "<I"), b"\x82": ("EXT1", "<B"), b"\x83": ("EXT2", "<H"), b"\x84": ("EXT4", "<i"),
        b"\x95": ("FRAME", "<Q"),
    }.items()
}  # fmt: skip
# (name, size format, content): text = UTF-8 str, bytes = a Span, str8 = Python 2 str, long = ignored
_COUNTED_OPS = {
    b"\x8c": ("SHORT_BINUNICODE", "<B", "text"), b"X": ("BINUNICODE", "<I", "text"),
    b"\x8d": ("BINUNICODE8", "<Q", "text"), b"C": ("SHORT_BINBYTES", "<B", "bytes"),
    b"B": ("BINBYTES", "<I", "bytes"), b"\x8e": ("BINBYTES8", "<Q", "bytes"), b"\x96": ("BYTEARRAY8", "<Q", "bytes"),
    b"U": ("SHORT_BINSTRING", "<B", "str8"), b"T": ("BINSTRING", "<i", "str8"), b"\x8a": ("LONG1", "<B", "long"),
    b"\x8b": ("LONG4", "<i", "long"),
}  # fmt: skip
_LINE_OPS = {
    b"I": "INT", b"L": "LONG", b"F": "FLOAT", b"V": "UNICODE", b"S": "STRING", b"P": "PERSID", b"g": "GET",
    b"p": "PUT",
}  # fmt: skip
_TWO_LINE_OPS = {b"c": "GLOBAL", b"i": "INST"}
MAX_SIZE = (1 << 63) - 1  # sys.maxsize on 64-bit builds: larger sizes are refused by CPython


class LongLine:
    """A protocol 0 line longer than :data:`MAX_LINE`: its content is not kept."""


def decode(reader: Reader) -> Iterator[tuple[str, Any, int]]:
    """Yield ``(opcode name, argument, offset)`` until STOP; raise :class:`PickleReadError`.

    Arguments: ints for integer fields and memo indices, ``str`` for text (``None`` when longer
    than :data:`MAX_TEXT`), :class:`Span` for bytes, ``"module name"`` for GLOBAL/INST,
    :class:`LongLine` for over-long protocol 0 lines.
    """
    take = reader.take
    none_ops = _NONE_OPS
    int_ops = _INT_OPS
    while True:
        key = take(1)
        at = reader.pos - 1
        name = none_ops.get(key)
        if name is not None:
            yield name, None, at
            if name == "STOP":
                return
            continue
        spec = int_ops.get(key)
        if spec is not None:
            name, fmt = spec
            (value,) = fmt.unpack(take(fmt.size))
            if name == "FRAME":
                if value > MAX_SIZE:
                    raise PickleReadError("malformed-pickle", f"FRAME length {value} exceeds sys.maxsize", at)
                reader.frame(value, at)
            yield name, value, at
            continue
        counted = _COUNTED_OPS.get(key)
        if counted is not None:
            yield counted[0], _counted(reader, counted, at), at
            continue
        name = _LINE_OPS.get(key) or _TWO_LINE_OPS.get(key) or ""
        if name in ("GLOBAL", "INST"):
            module = _line(reader, at)
            qualname = _line(reader, at)
            if isinstance(module, LongLine) or isinstance(qualname, LongLine):
                raise PickleReadError("malformed-pickle", f"{name} names longer than {MAX_LINE} bytes", at)
            yield name, f"{_utf8(module, at)} {_utf8(qualname, at)}", at
        elif name:
            yield name, _line_arg(name, _line(reader, at), at), at
        else:
            raise PickleReadError("unknown-opcode", f"unknown opcode {key!r} at offset {at}", at)


def _counted(reader: Reader, spec: tuple[str, str, str], at: int) -> Any:
    name, fmt, content = spec
    (n,) = struct.unpack(fmt, reader.take(struct.calcsize(fmt)))
    if n < 0:
        raise PickleReadError("malformed-pickle", f"{name} has a negative byte count", at)
    if n > MAX_SIZE:
        raise PickleReadError("malformed-pickle", f"{name} length {n} exceeds sys.maxsize", at)
    if content == "bytes":
        return Span(reader.payload(n), n)
    start = reader.read(n)
    if content == "long":
        return None
    if n > MAX_TEXT:
        return None
    raw = reader.src.get(start, n)
    if content == "str8":
        return raw.decode("latin-1")
    try:
        return raw.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError as e:
        raise PickleReadError("malformed-pickle", f"{name} at offset {at} is not UTF-8 ({e.reason})", at) from None


def _line(reader: Reader, at: int) -> bytes | LongLine:
    start, end = reader.readline()
    if end - start > MAX_LINE:
        return LongLine()
    return reader.src.get(start, end - start - 1)


def _utf8(raw: bytes | LongLine, at: int) -> str:
    assert isinstance(raw, bytes)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise PickleReadError("malformed-pickle", f"a global name at offset {at} is not UTF-8", at) from None


def _line_arg(name: str, raw: bytes | LongLine, at: int) -> Any:
    if isinstance(raw, LongLine):
        if name in ("GET", "PUT"):  # CPython's int() refuses that many digits too
            raise PickleReadError("malformed-pickle", f"{name} index at offset {at} is over {MAX_LINE} bytes", at)
        return raw
    if name in ("GET", "PUT"):
        try:
            return int(raw)
        except ValueError:
            raise PickleReadError("malformed-pickle", f"{name} index {raw[:20]!r} is not an integer", at) from None
    if name == "UNICODE":
        try:
            return raw.decode("raw-unicode-escape")
        except UnicodeDecodeError:
            raise PickleReadError("malformed-pickle", f"UNICODE at offset {at} cannot be decoded", at) from None
    if name == "STRING":
        # pickle.py load_string: a quoted repr, escapes decoded as bytes
        if len(raw) >= 2 and raw[0] == raw[-1] and raw[:1] in (b"'", b'"'):
            try:
                return codecs.escape_decode(raw[1:-1])[0].decode("latin-1")
            except ValueError:
                pass
        raise PickleReadError("malformed-pickle", f"STRING at offset {at} is not a quoted string", at)
    return raw.decode("latin-1")
