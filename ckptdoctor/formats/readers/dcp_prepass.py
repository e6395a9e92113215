"""The pre-pass that lets DCP's ``.metadata`` reach the C unpickler: what DCP writes, and no more.

CPython's C unpickler grows its memo to the largest index a ``PUT``/``LONG_BINPUT`` names (a
4-byte index is a memory bomb), so no pickle reaches it before a pre-pass has read every opcode
(formats/pickle/fast.py does the same for ``torch.save`` pickles). This one admits only the
opcodes DCP's ``pickle.dump`` of a ``Metadata`` emits (protocol 4 and 5): the memo is filled by
``MEMOIZE`` alone, so no memo index is admitted at all; no ``EXT``, ``INST``, ``GLOBAL``,
out-of-band buffer, float, or string of 256 bytes or more (all go to the generic path). As in
fast.py, one ``re.findall`` tokenises the bytes in C: ``MARK`` and the opcodes that consume one
come back as tokens, so the nesting depth is checked against the interpreter's limit.

Tokenising 22 million opcodes one at a time costs more than the load itself, so the pattern
first tries three *entries* as DCP writes them, each a fixed sequence of the same admitted
opcodes with its ``MARK``\\s balanced inside (at most :data:`ENTRY_DEPTH` deep):

* a ``state_dict_metadata`` item: the key, then ``TensorStorageMetadata(TensorProperties(...),
  torch.Size(...), [ChunkStorageMetadata(offsets, sizes)])``;
* a ``storage_data`` item: ``MetadataIndex`` -> ``_StorageInfo``, their fields by memo reference;
* a ``planner_data`` item: the key by memo reference, then its path tuple.

Matching a whole entry costs about a quarter of tokenising its 20-75 opcodes one by one. An entry
written otherwise (another torch version, a frame boundary inside it, a sharded tensor's chunk
list) is simply tokenised opcode by opcode: the entry patterns decide the speed, never what is
admitted.
"""

from __future__ import annotations

import re
from functools import lru_cache

from ckptdoctor.formats.pickle.fast import tokens_admitted
from ckptdoctor.limits import MAX_MARK_DEPTH

ENTRY_DEPTH = 3  # MARKs an entry pattern nests inside itself (TensorStorageMetadata's state, a chunk's, a 4-d size)

_CLOSES = b"tue"  # TUPLE SETITEMS APPENDS: the MARK-popping opcodes DCP's pickles use


def _counted(opcode: bytes, width: int) -> bytes:
    """``opcode``, a ``width``-byte little-endian length below 256, then that many bytes."""
    pad = b"\x00" * (width - 1)
    return opcode + b"(?:" + b"|".join(re.escape(bytes([n]) + pad) + b".{%d}" % n for n in range(256)) + b")"


# One opcode each (argument included), as pickle.py's Pickler writes them.
_STRING = _counted(b"\\x8c", 1)  # SHORT_BINUNICODE
_MEMO_REF = b"(?:h.|j.{4})"  # BINGET, LONG_BINGET
_INT = b"(?:K.|M.{2}|J.{4})"  # BININT1, BININT2, BININT
_MEMOIZE = b"\\x94?"  # the Pickler memoizes (almost) every object it writes
_BOOL = b"[\\x88\\x89]"  # NEWTRUE, NEWFALSE
_OPCODES = b"|".join((
    b"[\\x94\\x81)}\\]NRbsa\\x85\\x86\\x87\\x88\\x89\\x93]",  # MEMOIZE NEWOBJ EMPTY_* NONE REDUCE BUILD
    #                                                   SETITEM APPEND TUPLE1-3 NEWTRUE NEWFALSE STACK_GLOBAL
    _MEMO_REF,
    _INT,
    _counted(b"[\\x8cC\\x8a]", 1),  # SHORT_BINUNICODE SHORT_BINBYTES LONG1
    _counted(b"X", 4),  # BINUNICODE (short)
    b"\\x80.",  # PROTO
    b"\\x95.{8}",  # FRAME
))

# ---- whole entries, as the Pickler writes them after the first (whose classes it names) ----
_NEW = _MEMO_REF + b"\\)\\x81" + _MEMOIZE  # a class by memo reference, (), NEWOBJ
_DIMS = (b"(?:\\)|" + _INT + b"\\x85|" + _INT + b"{2}\\x86|" + _INT + b"{3}\\x87|\\(" + _INT + b"{4,64}t)")
_SIZE = _MEMO_REF + _DIMS + _MEMOIZE + b"\\x85" + _MEMOIZE + b"R" + _MEMOIZE  # torch.Size((d, ...))
_VALUE = b"(?:" + _SIZE + b"|" + _MEMO_REF + b"|" + _INT + b"|N)"
_FIELDS = b"\\}" + _MEMOIZE + b"\\((?:" + _MEMO_REF + _VALUE + b"){1,4}ub"  # {}, MARK, key value..., SETITEMS, BUILD
_TENSOR_ENTRY = (
    _STRING + _MEMOIZE + _NEW + b"\\}" + _MEMOIZE + b"\\("  # fqn: TensorStorageMetadata, its state:
    + _MEMO_REF + _NEW + b"\\(" + _MEMO_REF * 2 + _BOOL + _MEMO_REF + _BOOL + b"t" + _MEMOIZE + b"b"  # properties
    + _MEMO_REF + _SIZE  # size
    + _MEMO_REF + b"\\]" + _MEMOIZE + _NEW + _FIELDS + b"a"  # chunks: [ChunkStorageMetadata(offsets, sizes)]
    + b"ub"
)
_STORAGE_ENTRY = _NEW + _FIELDS + _NEW + _FIELDS  # MetadataIndex(...): _StorageInfo(...)
_PART = b"(?:" + _MEMO_REF + b"|" + _INT + b"|" + _STRING + _MEMOIZE + b")"
# (the count of parts need not match TUPLE1-3 here: a wrong one is a corrupt pickle, not an unsafe one)
_PLANNER_ENTRY = (_MEMO_REF + b"(?:" + _PART + b"{1,3}[\\x85\\x86\\x87]|\\(" + _PART + b"{4,100}t)"
                  + _MEMOIZE)  # fqn: (key, key, ...)


@lru_cache(maxsize=1)
def _pattern() -> re.Pattern[bytes]:
    entries = b"|".join((_TENSOR_ENTRY, _STORAGE_ENTRY, _PLANNER_ENTRY))
    return re.compile(b"(?s)(?:" + entries + b"|" + _OPCODES + b")*+(.)")


def admitted(data: bytes) -> bool:
    """True when every opcode up to ``STOP`` is one DCP writes and nesting stays within the limit."""
    tokens = b"".join(_pattern().findall(data))
    return tokens_admitted(tokens, _CLOSES, MAX_MARK_DEPTH - ENTRY_DEPTH)
