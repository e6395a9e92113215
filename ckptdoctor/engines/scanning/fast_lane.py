"""The scan's fast lane: a pickle in ``torch.save``'s plain vocabulary, run by CPython's own C
unpickler over recording stand-ins instead of being simulated opcode by opcode in Python.

Why: the walker (:mod:`.pickle_walk`) spends ~5 µs per opcode, and a 200,000-tensor ``data.pkl``
holds ~6 million opcodes: half a minute, and past the walker's opcode limit, so a real mixture-of-
experts checkpoint came out "unsafe". A release gate cannot work like that.

Why the answer is the walker's, exactly: the lane admits a pickle only when

1. one regular expression tokenises it whole, from ``PROTO 2``/``3`` to ``STOP``, in this
   vocabulary: the opcodes torch's ``weights_only`` unpickler implements, minus ``NEWOBJ``,
   ``EMPTY_SET`` and ``SHORT_BINSTRING``; strings shorter than 256 bytes; ``GLOBAL`` naming plain
   dotted identifiers. So there are no frames (every CPython reading of the bytes agrees), no
   bytes or Python 2 strings (nothing can hide a nested pickle), no ``STACK_GLOBAL`` or ``EXT``
   (every global is literal, and its offset is known from the tokens);
2. its memo indices are 0, 1, 2... in stream order, as every pickler numbers them: none can be
   the walker's "memo index far beyond the opcodes read", and the C memo stays as small as the
   pickle;
3. ``MARK``\\ s nest no deeper than the walker's limit.

Then the C unpickler runs it with a stand-in for each global that records being called
(``REDUCE``) and returns a record of its origin, which notes a ``BUILD`` on it. Everything the
walker would report as an anomaly in this vocabulary makes the C unpickler raise instead: a stack
underflow, a missing memo entry, calling a value that is not a global, ``BUILD`` on a global,
``SETITEMS`` into something that is not a dict. The lane then returns None and the walker scans
the pickle, so its findings and messages are the scan's. Globals whose result the walker
inspects (``copyreg`` reconstructors, ``_codecs.encode``) are left to the walker too.

The walker's opcode limit bounds its Python time; the lane runs at C speed under the readers'
own bound on a pickle's bytes (:data:`~ckptdoctor.limits.MAX_PICKLE_BYTES`), so it has none.
"""

from __future__ import annotations

import itertools
import pickle
import re
import sys
from array import array
from dataclasses import dataclass
from functools import lru_cache
from typing import IO, Any

from ckptdoctor.formats.pickle.fast import (
    ENTRY_DEPTH,
    below,
    c_unpickler_input,
    entry_after_key,
    gc_paused,
    memo_bits,
    short_strings,
    tokens_admitted,
)
from ckptdoctor.formats.pickle.tables import RECONSTRUCTORS, python3_name
from ckptdoctor.limits import MAX_MARK_DEPTH, MAX_PICKLE_BYTES

WALKER_ONLY = RECONSTRUCTORS | {"_codecs.encode"}  # the walker looks at what these return
MARKS_AND_CLOSES = b"(tue"  # MARK, and TUPLE SETITEMS APPENDS, which pop one
_IDENTIFIER = b"[A-Za-z_][A-Za-z0-9_.]{0,254}"
_U32 = next(code for code in "IL" if array(code).itemsize == 4)


@lru_cache(maxsize=8)
def _lane_pattern(bits: int) -> tuple[re.Pattern[bytes], int]:
    """One token per match: a whole tensor entry (its PUTs as groups), or one opcode of the lane's
    vocabulary (a PUT, a GLOBAL, a MARK or closer, STOP and the rest of the bytes, or anything
    else and the rest of the bytes); and how many groups the entry has."""
    entry = b"X" + short_strings(b"\x00\x00\x00") + entry_after_key(bits, capture_puts=True)
    entry_groups = re.compile(entry).groups
    singles = (
        b"(q.|r" + below(bits) + b")",                        # BINPUT, LONG_BINPUT (bounded)
        b"(c" + _IDENTIFIER + b"\\n" + _IDENTIFIER + b"\\n)",  # GLOBAL module\nname\n
        b"([" + re.escape(MARKS_AND_CLOSES) + b"])",          # MARK TUPLE SETITEMS APPENDS
        b"(\\.)(?:.*)",                                        # STOP (what follows is not this pickle's)
        b"(?:[Kh].|M..|[Jj].{4}|G.{8}"                         # BININT1 BINGET BININT2 BININT LONG_BINGET BINFLOAT
        b"|X" + short_strings(b"\x00\x00\x00")                 # BINUNICODE
        + b"|\\x8a" + short_strings(b"")                       # LONG1
        + b"|[N\\x88\\x89)\\]}\\x85\\x86\\x87saRbQ])"           # argument-less
        b"|(.)(?:.*)",                                         # not in the vocabulary: the walker's
    )
    return re.compile(b"(?s)(" + entry + b"|" + b"|".join(singles) + b")"), entry_groups


@dataclass(frozen=True)
class FastWalk:
    """What the walker would have found in the pickle: every GLOBAL opcode (module and name as
    Python 3 names them, offset), the flags each name collected, and where the pickle ends."""

    globals: tuple[tuple[str, str, int], ...]
    flags: dict[str, frozenset[str]]
    end: int
    protocol: int


FIRST_READ = 1 << 20  # bytes read first: most pickles end there (a legacy file's window is the whole file)
GROWTH = 8
MAX_OPCODE = 1024  # more than the longest opcode the lane admits (a GLOBAL of two 255-byte names)


def walk_fast(stream: IO[bytes], base: int, length: int) -> FastWalk | None:
    """The walker's findings for the pickle at ``base`` of ``stream`` (``length`` bytes, which may
    run past its STOP), or None when the lane does not admit it (see the module docstring): the
    walker decides then. Reads 1 MiB first, and more only while a pickle runs on past what was read."""
    size = min(length, FIRST_READ)
    # One pattern for every read: its memo bound is loose; the numbering check is the exact one.
    bits = memo_bits(min(length, MAX_PICKLE_BYTES))
    stream.seek(base)
    data = b""
    while True:
        data += stream.read(size - len(data))  # only the continuation: a remote pickle travels once
        try:
            tokens = _tokens(data, bits)
            break
        except _ReadMore:
            if len(data) < size or size >= min(length, MAX_PICKLE_BYTES):
                return None
            size = min(size * GROWTH, length, MAX_PICKLE_BYTES)
    if tokens is None:
        return None
    globals_, end = tokens
    flags = _run(data[:end], globals_)
    if flags is None:
        return None
    return FastWalk(tuple(globals_), flags, end, data[1])


class _ReadMore(Exception):
    """The bytes read end inside the pickle."""


def _tokens(data: bytes, bits: int) -> tuple[list[tuple[str, str, int]], int] | None:
    """The GLOBALs (module, name, offset) and the offset after STOP, when ``data`` tokenises
    whole in the vocabulary, its memo is numbered in order and its MARKs nest shallowly; None
    when it does not. Raises :class:`_ReadMore` when the tokens run to within an opcode of the
    end of ``data`` without a STOP."""
    if len(data) < 3 or data[0] != 0x80 or data[1] not in (2, 3):
        return None
    pattern, entry_groups = _lane_pattern(bits)
    found = pattern.findall(data, 2)  # after PROTO
    if not found or (not found[-1][entry_groups + 4] and len(found[-1][0]) <= MAX_OPCODE):
        raise _ReadMore  # the last token (a bad byte and the rest, or an opcode) is near the end
    if not found[-1][entry_groups + 4]:  # the last token must be STOP
        return None
    columns = list(zip(*found))
    text, put, glob, marks = (columns[0], columns[entry_groups + 1], columns[entry_groups + 2],
                              columns[entry_groups + 3])
    puts = b"".join(map(b"".join, zip(*columns[1:entry_groups + 1], put)))  # row by row: stream order
    if puts != _numbered_puts(puts):
        return None
    if not tokens_admitted(b"".join(marks) + b".", MARKS_AND_CLOSES[1:], MAX_MARK_DEPTH - ENTRY_DEPTH):
        return None
    offsets = list(itertools.accumulate(map(len, text), initial=2))
    end = offsets[-2] + 1  # the last token is STOP and the bytes after it
    globals_ = []
    for at in itertools.compress(range(len(glob)), glob):
        module, name = glob[at][1:-1].decode("ascii").split("\n")
        globals_.append((*python3_name(module, name), offsets[at]))
    return globals_, end


def _numbered_puts(puts: bytes) -> bytes:
    """The PUT opcodes a pickler writes for memo entries 0, 1, 2... taking ``len(puts)`` bytes
    (``BINPUT i`` below 256, ``LONG_BINPUT i`` from there), or b"" when no count fits."""
    short = min(len(puts) // 2, 256)
    rest, odd = divmod(len(puts) - 2 * short, 5)
    if odd or (rest and short < 256):
        return b""
    head = bytes(itertools.chain.from_iterable(zip(b"q" * short, range(short))))
    if not rest:
        return head
    indices = array(_U32, range(256, 256 + rest))
    if sys.byteorder != "little":
        indices.byteswap()
    wide = bytearray(5 * rest)
    wide[0::5] = b"r" * rest
    raw = indices.tobytes()
    for byte in range(4):
        wide[byte + 1::5] = raw[byte::4]
    return head + bytes(wide)


class _Defer(Exception):
    """Something only the walker reports exactly."""


class _Made(dict):
    """What calling a global returned: a dict, so that SETITEMS fills it in C; remembers its origin."""

    __slots__ = ("origin",)
    origin: set[str]  # the flags of the global that made it

    def __setstate__(self, state: Any) -> None:
        self.origin.add("build")


class _Global:
    """A GLOBAL's stand-in: records being called; BUILD on it is the walker's anomaly."""

    __slots__ = ("flags",)

    def __init__(self, flags: set[str]) -> None:
        self.flags = flags

    def __call__(self, *args: Any) -> _Made:
        self.flags.add("call")
        made = _Made()
        made.origin = self.flags
        return made

    def __setstate__(self, state: Any) -> None:
        raise _Defer


def _run(pickle_bytes: bytes, globals_: list[tuple[str, str, int]]) -> dict[str, frozenset[str]] | None:
    """Run the pickle in the C unpickler over stand-ins; each name's flags, or None (defer)."""
    flags: dict[str, set[str]] = {}
    names = iter(globals_)
    seen = 0

    class Recorder(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            nonlocal seen
            expected = next(names, None)
            seen += 1
            if expected is None or python3_name(module, name) != expected[:2]:
                raise _Defer  # the C unpickler read another GLOBAL than the tokens: never trust it
            full = f"{expected[0]}.{expected[1]}"  # the walker's name for it (Python 3)
            if full in WALKER_ONLY:
                raise _Defer
            return _Global(flags.setdefault(full, set()))

    loader = Recorder(c_unpickler_input(pickle_bytes))
    loader.persistent_load = id  # type: ignore[method-assign]  # a plain int: the walker's opaque value
    with gc_paused():
        try:
            loader.load()
        except Exception:
            return None
        finally:
            loader.memo = {}
    if seen != len(globals_):
        return None
    return {name: frozenset(value) for name, value in flags.items()}
