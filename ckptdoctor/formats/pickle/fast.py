"""The C unpickler behind a bounded pre-pass: C speed with the allowlisting unpickler's policy.

Why not just ``pickle.Unpickler``: CPython's C unpickler grows its memo array to the largest
index a ``PUT``/``LONG_BINPUT`` names, so a 4-byte index is a memory bomb, and it applies a few
opcodes (``BUILD``, ``EXT*``) in ways the stand-ins cannot intercept. Why not just the
pure-Python :class:`~.unpickler.SafeUnpickler`: it spends ~1 µs per opcode, and a
200,000-tensor pickle holds millions of opcodes.

So :func:`fast_load` runs the C unpickler only on pickles a pre-pass has proved harmless to it,
and only accepts its result when nothing unusual happened; otherwise it returns
:data:`NOT_FAST` and the caller runs the pure-Python unpickler, which then gives exactly
today's result or error (hostile input therefore behaves exactly as before: it is refused or
reported by the same code, with the same message).

The pre-pass is one ``re.findall`` over the bytes (C speed, no object per opcode). Its pattern
tokenises every opcode ``torch.save`` and DCP emit, with these bounds:

* ``LONG_BINPUT``/``PUT`` indices below a power of two near half the pickle's size (a real
  pickle numbers its memo entries 0, 1, 2...; each entry costs at least two bytes), so the C
  memo can never exceed ~16 bytes per pickle byte: the same order as the pure-Python memo dict;
* no ``EXT*``, ``INST``, out-of-band buffer or 8-byte-length opcodes, no strings of 256 bytes or
  more (all go to the interpreter);
* every ``MARK`` and mark-consuming opcode is returned as a token, so the nesting depth is
  checked against the interpreter's limit before anything runs; the one exception is a whole
  tensor entry as torch.save writes it (:func:`tensor_entry`), matched first for speed, whose
  MARKs are balanced inside it at most :data:`ENTRY_DEPTH` deep (that much is reserved from the limit).

The C unpickler then sees only stand-ins: :func:`.pickle_globals.resolve_global`'s functions,
storage types and dtypes as they are, and for classes (an unknown class, ``OrderedDict``...)
a per-load stand-in class whose ``__new__`` (``NEWOBJ``) and metaclass ``__call__``
(``REDUCE``/``OBJ``) apply the same policy as ``SafeUnpickler._new_object``/``_call``. ``BUILD``
reaches only ``__setstate__`` methods the model defines (``OpaqueObject`` records the state;
records, storage types and stand-in functions refuse); on an ``OrderedDict`` it may set only a
non-None ``_metadata`` (checked after the load, as torch writes it). A stand-in class that ends
up *in* the result (the pickle used the class as a value) is detected by its reference count
and sends the load to the interpreter, which records it as an ``UnknownGlobal``.
"""

from __future__ import annotations

import gc
import io
import itertools
import operator
import pickle
import re
import sys
from collections import OrderedDict
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from ckptdoctor.formats.pickle.stand_ins import (
    RECORDED_VALUE_TYPES,
    UnknownGlobal,
    _rebuild_from_type_v2,
    resolve_global,
)
from ckptdoctor.formats.pickle.tables import python3_name
from ckptdoctor.limits import MAX_MARK_DEPTH  # the interpreter's limit too
from ckptdoctor.model.checkpoint import GlobalRef, OpaqueObject

NOT_FAST = object()  # "run the interpreter instead"

# Opcodes that push or consume a MARK, and STOP: returned by the pre-pass as tokens.
_OPENS = b"("
_CLOSES = b"tldeu\x90\x911o"  # TUPLE LIST DICT APPENDS SETITEMS ADDITEMS FROZENSET POP_MARK OBJ
_STOP = b"."


C_PREFETCH = 1 << 17  # what CPython's C unpickler asks `peek` for (_pickle.c PREFETCH)


def c_unpickler_input(data: bytes) -> io.BufferedReader:
    """``data`` as the C unpickler reads it fastest: a file with ``peek``.

    Given a plain ``BytesIO`` (no ``peek``), the C unpickler calls its ``read`` for every opcode
    (millions of calls for a 200,000-tensor pickle: two thirds of a raw load's time); with ``peek``
    it takes 128 KiB at a time and reads those in C. The bytes are the same object's either way.
    """
    return io.BufferedReader(io.BytesIO(data), buffer_size=C_PREFETCH)


RELEASE_PIECE = 1 << 20  # bytes per piece of a pickle let go while it is read (consumed_input)


class _Pieces(io.RawIOBase):
    """Bytes served in order from pieces, each piece let go as soon as it has been read."""

    def __init__(self, pieces: list[bytes]) -> None:
        super().__init__()
        self.pieces = pieces[::-1]  # popped from the end, first piece last
        self.at = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while self.pieces and self.at >= len(self.pieces[-1]):
            self.pieces.pop()
            self.at = 0
        if not self.pieces:
            return 0
        piece = self.pieces[-1]
        n = min(len(buffer), len(piece) - self.at)
        buffer[:n] = piece[self.at:self.at + n]
        self.at += n
        return n


def consumed_input(holder: list[bytes]) -> io.BufferedReader:
    """:func:`c_unpickler_input` of the bytes in ``holder`` (taken out of it), which are let go as
    the unpickler reads them.

    Why: the C unpickler's peak is at the end of the load, with every memoised object alive; the
    pickle's bytes are no longer needed by then (a 200,000-tensor data.pkl holds 27 MB). They are
    copied into pieces of :data:`RELEASE_PIECE` bytes, each freed once read past (the copy is made
    before anything is unpickled, far below the peak).
    """
    data = holder.pop()
    pieces = [data[at:at + RELEASE_PIECE] for at in range(0, len(data), RELEASE_PIECE)]
    del data
    return io.BufferedReader(_Pieces(pieces), buffer_size=C_PREFETCH)


class _Fallback(Exception):
    """The C path met something only the interpreter handles exactly."""


class _StandInType(type):
    """Metaclass of every per-load stand-in class; ``global_ref`` is what the interpreter would hold."""

    global_ref: UnknownGlobal | None


def _refuse_state(state: Any) -> None:
    raise _Fallback


def _no_persistent_ids(pid: Any) -> Any:
    raise _Fallback  # a pickle without storages names none; the interpreter says what is wrong


def short_strings(lead: bytes) -> bytes:
    """A length byte 0..255 (then zero padding ``lead``) followed by that many bytes."""
    return b"(?:" + b"|".join(re.escape(bytes([n]) + lead) + (b".{%d}" % n) for n in range(256)) + b")"


def below(bits: int) -> bytes:
    """Four little-endian bytes whose value is below ``2 ** bits``."""
    if bits >= 32:
        return b".{4}"
    whole, rest = divmod(bits, 8)
    high = b"[\\x00-" + re.escape(bytes([(1 << rest) - 1])) + b"]"
    return b".{%d}" % whole + high + b"\\x00" * (3 - whole)


def prepass_alternatives(bits: int) -> tuple[tuple[bytes, bytes], ...]:
    """The pre-pass's opcodes as (leading byte class, argument pattern) pairs, in the order tried.

    Most frequent first (torch.save: 8 LONG_BINPUTs, 6 BININT1s, 5 BINGETs per tensor): the
    engine tries the alternatives in order, and no two leading classes share a byte, so the order
    changes the time only, never what matches (test_fast_pickle checks the classes are disjoint).
    """
    return (
        (b"r", below(bits)),                                  # LONG_BINPUT, bounded
        (b"[Khq\\x80]", b"."),                                # BININT1 BINGET BINPUT PROTO
        (b"[02NRbas})\\]Q\\x81\\x85\\x86\\x87\\x88\\x89\\x8f\\x92\\x93\\x94]", b""),  # argument-less
        (b"[XTB\\x8b]", short_strings(b"\x00\x00\x00")),     # BINUNICODE BINSTRING BINBYTES LONG4
        (b"[\\x8cCU\\x8a]", short_strings(b"")),             # SHORT_BINUNICODE ... LONG1
        (b"[Jj]", b".{4}"),                                    # BININT LONG_BINGET
        (b"M", b".."),                                         # BININT2
        (b"[G\\x95]", b".{8}"),                                # BINFLOAT FRAME
        (b"p", b"[0-9]{1,6}\\n"),                              # PUT (text), bounded
        (b"[ILFSVPg]", b"[^\\n]*\\n"),                         # text arguments
        (b"c", b"[^\\n]*\\n[^\\n]*\\n"),                     # GLOBAL module\nname\n
    )


ENTRY_DEPTH = 3  # MARKs the tensor entry nests inside itself (its arguments, the pid, a 4-d or larger size)


def tensor_entry(bits: int) -> bytes:
    """One tensor as ``torch.save`` pickles it after the first (whose globals it names): the key, then
    ``_rebuild_tensor_v2((pid...), offset, size, stride, requires_grad, OrderedDict())``, every
    global and shared string by memo reference, every new object followed by its (bounded) PUT.

    The same opcodes, with the same bounds, as :func:`prepass_alternatives` admits one by one, and
    its MARKs balanced inside (at most :data:`ENTRY_DEPTH` deep): matching a whole entry costs a
    fraction of tokenising its ~35 opcodes one at a time. An entry written otherwise is simply
    tokenised opcode by opcode: the entry decides the speed, never what is admitted.
    """
    return b"X" + short_strings(b"\x00\x00\x00") + entry_after_key(bits)  # the key, then the rest


def entry_after_key(bits: int, *, capture_puts: bool = False) -> bytes:
    """:func:`tensor_entry` after its key: the key's PUT and the tensor (``fix``'s key rename cuts
    ``data.pkl`` at the keys and matches these whole in between). ``capture_puts``: each PUT (or
    its absence) is a group, in stream order (``scan``'s fast lane checks the memo's numbering)."""
    put = b"(?:r" + below(bits) + b"|q.)?"
    if capture_puts:
        put = b"(" + put + b")"
    get = b"(?:h.|j.{4})"
    integer = b"(?:K.|M..|J.{4})"
    dims = (b"(?:\\)|" + integer + b"\\x85|" + integer + b"{2}\\x86|" + integer + b"{3}\\x87|\\(" + integer
            + b"{4,64}t)" + put)  # (), 1-3 dims by TUPLE1-3, more by MARK ... TUPLE
    return (put  # the key's
            + get + b"\\(\\(" + get + get  # _rebuild_tensor_v2, MARK, MARK, 'storage', the storage type
            + b"X" + short_strings(b"\x00\x00\x00") + put + get + integer + b"t" + put + b"Q"  # key, location, numel
            + integer + dims + dims + b"[\\x88\\x89]"  # offset, size, stride, requires_grad
            + get + b"\\)R" + put + b"t" + put + b"R" + put)  # OrderedDict(), the arguments, the call


def memo_bits(size: int) -> int:
    """Memo indices of a pickle of ``size`` bytes must be below ``2 ** memo_bits(size)``."""
    return max(16, (size // 2 + 256).bit_length())


@lru_cache(maxsize=8)
def _prepass(bits: int) -> re.Pattern[bytes]:
    ops = b"|".join((tensor_entry(bits), *(lead + argument for lead, argument in prepass_alternatives(bits))))
    return re.compile(b"(?s)(?:" + ops + b")*+(.)")


def _harmless(data: bytes) -> bool:
    """True when every opcode is tokenised, memo indices are bounded and nesting is shallow."""
    tokens = b"".join(_prepass(memo_bits(len(data))).findall(data))
    return tokens_admitted(tokens, _CLOSES, MAX_MARK_DEPTH - ENTRY_DEPTH)


@lru_cache(maxsize=8)
def _key_pattern(bits: int) -> re.Pattern[bytes]:
    """Runs of admitted opcodes (a whole tensor entry after its key first), each ended by a
    BINUNICODE or STOP; BINUNICODE and FRAME are not in the runs (a text may change length)."""
    single = []
    for lead, argument in prepass_alternatives(bits):
        if lead == b"[XTB\\x8b]":
            lead = b"[TB\\x8b]"
        elif lead == b"[G\\x95]":
            lead = b"G"
        single.append(lead + argument)
    marks = b"[" + re.escape(_OPENS + _CLOSES) + b"]"
    ops = b"|".join((entry_after_key(bits), *single, marks))
    return re.compile(b"(?s)((?:" + ops + b")*+)(X" + short_strings(b"\x00\x00\x00") + b"|\\.)")


def key_tokens(data: bytes) -> list[tuple[bytes, bytes]] | None:
    """``data`` cut before and after each BINUNICODE opcode: (the opcodes before one, the
    BINUNICODE opcode) pairs, the last pair ending with STOP; joined, they give ``data`` back.

    The pre-pass's bounded tokenisation (memo indices, admitted opcodes; no FRAME, so a text may
    change length) from the first byte to the only STOP, so every string returned is a whole
    opcode. None when ``data`` does not tokenise that way. For ``fix``'s key rename.
    """
    tokens = _key_pattern(memo_bits(len(data))).findall(data)
    if not tokens or tokens[-1][1] != _STOP or sum(map(len, itertools.chain.from_iterable(tokens))) != len(data):
        return None
    _, ops = zip(*tokens)
    return tokens if ops.count(_STOP) == 1 else None


def tokens_admitted(tokens: bytes, closes: bytes, depth: int) -> bool:
    """The verdict of a pre-pass on its tokens: one byte per MARK (``(``), per opcode in ``closes``
    that pops one, and per ``STOP``, plus the byte where the pattern stopped matching.

    True when a ``STOP`` is reached with no unadmitted opcode before it and MARKs never nest
    deeper than ``depth``. Shared by the generic pre-pass here and DCP's (``readers/dcp_prepass.py``).
    """
    stop = tokens.find(_STOP)
    if stop < 0:
        return False
    head = tokens[:stop]
    if head.translate(None, _OPENS + closes):
        return False  # an opcode the pattern does not admit
    if head.count(_OPENS) <= depth:
        return True
    # depth after the k-th token = (2 x MARKs so far) - k; all in C: no Python step per token
    steps = head.translate(bytes.maketrans(_OPENS + closes, b"\x02" + b"\x00" * len(closes)))
    return max(map(operator.sub, itertools.accumulate(steps), itertools.count(1))) <= depth


def _make_from_type_v2() -> Any:
    def from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
        if isinstance(new_type, _StandInType) and new_type.global_ref is not None:
            new_type = new_type.global_ref
        return _rebuild_from_type_v2(func, new_type, args, state)

    from_type_v2.__setstate__ = _refuse_state  # type: ignore[attr-defined]
    return from_type_v2


class _Loader(pickle.Unpickler):
    """The C unpickler with every global replaced by a stand-in (see the module docstring)."""

    def __init__(self, source: io.BufferedReader, persistent: Callable[[Any], Any] | None) -> None:
        super().__init__(source, encoding="latin1")
        # Set through the C unpickler's own attribute, not a method override: it then calls the
        # reader's function directly, without a Python frame in between (once per tensor).
        self.persistent_load = persistent if persistent is not None else _no_persistent_ids  # type: ignore[method-assign]
        self.classes: dict[str, tuple[Any, int]] = {}
        self.ordered: list[OrderedDict[Any, Any]] = []

    def find_class(self, module: str, name: str) -> Any:
        if not isinstance(module, str) or not isinstance(name, str) or len(module) + len(name) > 1000:
            raise _Fallback
        module, name = python3_name(module, name)  # a stand-in class is named as refusals and allowances name it
        target = resolve_global(module, name)
        if isinstance(target, (UnknownGlobal, type)):
            return self._stand_in(module, name, None if isinstance(target, UnknownGlobal) else target)
        if target is _rebuild_from_type_v2:
            return self._from_type_v2()
        return target

    def _track(self, key: str, make: Callable[[], Any]) -> Any:
        """Make a stand-in and remember its reference count: a higher count after the load means
        it escaped into the result. Counted with no local variable holding it, as in :meth:`escaped`."""
        self.classes[key] = (make(), 0)
        count = sys.getrefcount(self.classes[key][0])  # the entry and the argument (+ cls.__mro__)
        self.classes[key] = (self.classes[key][0], count)
        return self.classes[key][0]

    def _from_type_v2(self) -> Any:
        """``_rebuild_from_type_v2`` seeing the tensor subclass as the interpreter would: an
        ``UnknownGlobal`` (here it arrives as a stand-in class), so DTensor & co. are named."""
        key = "torch._tensor._rebuild_from_type_v2"
        if key in self.classes:
            return self.classes[key][0]
        return self._track(key, _make_from_type_v2)

    def ordered_dicts_ok(self) -> bool:
        """Whether every OrderedDict holds at most what ``SafeUnpickler.load_build`` would set.

        The C ``BUILD`` writes every key of a dict state into the instance's ``__dict__``; the
        interpreter keeps only a non-None ``_metadata`` (what torch writes). Anything else
        (a hostile ``keys`` attribute shadowing the method...) sends the load to the interpreter.
        Calls made meanwhile through such attributes could only reach stand-ins.
        """
        referents = gc.get_referents
        for made in self.ordered:
            # An empty OrderedDict (torch pickles one per tensor, its backward hooks) refers to
            # nothing unless it has an instance dict: asking `made.__dict__` would create one
            # (200,000 dicts); the collector's view of its references creates none.
            if not made and not referents(made):
                continue
            attributes = made.__dict__
            if attributes and (len(attributes) != 1 or attributes.get("_metadata") is None):
                return False
        return True

    def _stand_in(self, module: str, name: str, real: type | None) -> type:
        dotted = f"{module}.{name}"
        if dotted in self.classes:
            return self.classes[dotted][0]
        recorded = dotted in RECORDED_VALUE_TYPES
        # The closures below hold the list, never the loader: a class is a reference cycle, and
        # through it the loader would keep the reader's archive (200,000 members) until a collection.
        ordered = self.ordered

        def construct(args: tuple[Any, ...]) -> Any:
            if real is OrderedDict:
                made: OrderedDict[Any, Any] = OrderedDict(*args)
                ordered.append(made)  # its attributes are checked after the load (ordered_dicts_ok)
                return made
            return real(*args)  # type: ignore[misc]

        class StandInMeta(_StandInType):
            def __call__(cls, *args: Any, **kwargs: Any) -> Any:  # REDUCE, OBJ with arguments
                if kwargs:
                    raise _Fallback
                if real is OrderedDict:  # once per tensor (its backward hooks): no further call
                    made: OrderedDict[Any, Any] = OrderedDict(*args)
                    ordered.append(made)  # its attributes are checked after the load (ordered_dicts_ok)
                    return made
                if real is not None:
                    return construct(args)
                if recorded and args:
                    return OpaqueObject(GlobalRef(module, name), args=args, via="reduce")
                raise _Fallback  # refused (or recorded without arguments): the interpreter says which

        def new(cls: type, *args: Any, **kwargs: Any) -> Any:  # NEWOBJ, NEWOBJ_EX, OBJ without arguments
            if real is None:
                made = OpaqueObject(GlobalRef(module, name), args=args, via="newobj")
                if kwargs:
                    made.args = (*args, dict(kwargs))
                return made
            if real is OrderedDict or real in (set, frozenset, bytearray):
                return construct(args)
            raise _Fallback

        def make() -> type:
            cls = StandInMeta("StandIn", (), {"__new__": new, "__setstate__": staticmethod(_refuse_state),
                                              "__slots__": ()})
            cls.global_ref = UnknownGlobal(module, name) if real is None else None
            return cls

        return self._track(dotted, make)

    def release(self) -> None:
        """Let go of what the stand-in classes would keep alive until a cyclic collection: the
        OrderedDicts made during the load (torch pickles one per tensor and drops it)."""
        self.ordered.clear()
        self.classes.clear()

    def escaped(self) -> bool:
        """True when a stand-in is referenced from the result (used as a value)."""
        return any(sys.getrefcount(self.classes[key][0]) > self.classes[key][1] for key in self.classes)


def fast_load(data: bytes | list[bytes], persistent_load: Callable[[Any], Any] | None, *,
              prepass: bool = True) -> Any:
    """The unpickled object tree, or :data:`NOT_FAST` when the interpreter must decide.

    ``data`` as a one-item list: once the pre-pass has admitted them, the bytes are taken out of
    the list and let go as they are read (:func:`consumed_input`); the list is then empty, and a
    caller that still needs them (NOT_FAST) reads them again.

    ``prepass=False`` only for a pickle ckptdoctor's own writer has just produced: the pre-pass
    bounds what a file's author chose (memo indices, EXT, depth), and that writer numbers its
    memo 0, 1, 2... and emits none of the rest; the checks after the load still apply.
    """
    if prepass and not _harmless(data[0] if isinstance(data, list) else data):
        return NOT_FAST
    loader = _Loader(consumed_input(data) if isinstance(data, list) else c_unpickler_input(data), persistent_load)
    try:
        try:
            result = loader.load()
        except Exception:  # every failure is re-judged by the interpreter
            return NOT_FAST
        finally:
            loader.memo = {}  # drop the memo's references before counting them
        if loader.escaped() or not loader.ordered_dicts_ok():
            return NOT_FAST
        return result
    finally:
        loader.release()


class gc_paused:
    """Pause the cyclic garbage collector while millions of containers are allocated.

    Unpickling creates objects that all stay alive; every 700 allocations the collector would
    walk young objects, and older generations ever more often: about half of a 200,000-tensor
    load. Nothing made here is garbage, so pausing is pure saving.
    """

    def __enter__(self) -> None:
        self.was_enabled = gc.isenabled()
        gc.disable()

    def __exit__(self, *exc: object) -> None:
        if self.was_enabled:
            gc.enable()
