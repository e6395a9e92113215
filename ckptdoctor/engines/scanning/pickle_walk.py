"""Static pickle analysis: walk the opcodes, simulate the stack symbolically, never import.

:mod:`~ckptdoctor.engines.scanning.opcodes` decodes opcodes and their arguments exactly as
CPython reads them (frames included); everything else (stack, mark stack, memo) is simulated
here with placeholder values, so the walker can tell which globals
are merely *referenced* and which are *called* (REDUCE, NEWOBJ/NEWOBJ_EX, INST, OBJ, BUILD),
follow names assembled on the stack for STACK_GLOBAL (including memo lookups), and recurse into
bytes that are themselves pickles (``torch.storage._load_from_bytes`` runs ``torch.load`` on its
argument with weights_only=False; see torch/storage.py).

Every loop is bounded: opcode count per pickle, mark depth, nested-pickle depth, line length,
and the bytes a single pickle may span, so a crafted file cannot hang or exhaust memory.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from typing import IO, Any

from ckptdoctor.engines.scanning.fast_lane import walk_fast
from ckptdoctor.engines.scanning.opcodes import (
    C_STREAM,
    LINEAR,
    READERS,
    STRICT,
    LongLine,
    PickleReadError,
    Reader,
    Source,
    Span,
    decode,
)
from ckptdoctor.engines.scanning.results import (
    DANGEROUS,
    TORCH_OTHER,
    UNKNOWN_CLASS,
    WEIGHTS_ONLY,
    Anomaly,
    GlobalUse,
)
from ckptdoctor.formats.pickle.tables import (
    DATA_CONSTRUCTORS,
    RECONSTRUCTORS,
    WEIGHTS_ONLY_GLOBALS,
    WEIGHTS_ONLY_OPCODES,
    is_denied,
    python3_name,
)
from ckptdoctor.limits import MAX_MARK_DEPTH

MAX_OPS = 5_000_000  # a 70B-parameter checkpoint's data.pkl has a few hundred thousand opcodes
MAX_NESTED_DEPTH = 4
MAX_ANOMALIES_PER_CODE = 10
HIGHEST_PROTOCOL = 5


@dataclass
class _Use:
    module: str
    qualname: str
    where: str
    count: int = 0
    flags: set[str] = field(default_factory=set)

    @property
    def name(self) -> str:
        return f"{self.module}.{self.qualname}" if self.module else self.qualname

    def verdict(self) -> str:
        name = self.name
        if "unresolved" in self.flags or "extension" in self.flags:
            return DANGEROUS
        if is_denied(self.module, self.qualname):
            return DANGEROUS
        if name in WEIGHTS_ONLY_GLOBALS:
            return WEIGHTS_ONLY
        if "call" in self.flags:
            # torch's unpickler only calls allowlisted functions; anything else called with
            # arguments is code execution unless it is a known plain-data constructor.
            return UNKNOWN_CLASS if name in DATA_CONSTRUCTORS or name in RECONSTRUCTORS else DANGEROUS
        if "instantiate" in self.flags:
            return UNKNOWN_CLASS
        return TORCH_OTHER if name.startswith("torch.") else UNKNOWN_CLASS


class Findings:
    """Mutable accumulator for one file: globals, anomalies, scanned pickles and notes."""

    def __init__(self) -> None:
        self.uses: dict[str, _Use] = {}
        self.anomalies: list[Anomaly] = []
        self.pickles: list[str] = []
        self.notes: list[str] = []
        self._per_code: dict[str, int] = {}

    def use(self, module: str, qualname: str, where: str) -> _Use:
        key = f"{module}.{qualname}" if module else qualname
        u = self.uses.get(key)
        if u is None:
            u = self.uses[key] = _Use(module, qualname, where)
        u.count += 1
        return u

    def anomaly(self, code: str, message: str, where: str) -> None:
        n = self._per_code.get(code, 0) + 1
        self._per_code[code] = n
        if n <= MAX_ANOMALIES_PER_CODE:
            self.anomalies.append(Anomaly(code, message, where))

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def global_uses(self) -> tuple[GlobalUse, ...]:
        return tuple(
            GlobalUse(u.name, u.verdict(), u.where, bool(u.flags & {"call", "instantiate", "build"}), u.count)
            for u in self.uses.values()
        )

    def finish_notes(self) -> tuple[str, ...]:
        extra = [
            f"{n - MAX_ANOMALIES_PER_CODE} more '{code}' anomalies not listed"
            for code, n in self._per_code.items()
            if n > MAX_ANOMALIES_PER_CODE
        ]
        return tuple(self.notes + extra)


@dataclass(eq=False)
class _Glob:
    """A global pushed by GLOBAL/STACK_GLOBAL/INST/EXT: the callable or class itself."""

    use: _Use


@dataclass(eq=False)
class _Made:
    """A value the unpickler would compute: a call result, an instance, a container."""

    kind: str
    origin: _Use | None = None


_UNKNOWN = _Made("unknown")


@dataclass
class PickleResult:
    """How one pickle ended: ``end`` is the offset after STOP, or None if it never stopped."""

    end: int | None
    protocol: int
    frame_violation: bool = False


def is_pickle_start(head: bytes) -> bool:
    """True for bytes that begin with a PROTO opcode of a real protocol (``\\x80\\x02``..``\\x05``)."""
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= HIGHEST_PROTOCOL


_IDENT = re.compile(r"^[A-Za-z_][\w.]*$")
TRIAL_BYTES = 1 << 20


def looks_like_pickle(f: IO[bytes], base: int, length: int) -> bool:
    """Do the bytes at *base* hold a pickle of any protocol, with or without a PROTO opcode?

    A PROTO opcode (``\\x80`` + 0..5) says so. Protocol 0/1 pickles have no header: accept the
    bytes if they parse to STOP, or name a plausible global (a text file parses for a few
    opcodes, then fails; a crafted pickle may fail too, but only after its GLOBAL).
    """
    f.seek(base)
    head = f.read(2)
    if len(head) == 2 and head[0] == 0x80 and head[1] <= HIGHEST_PROTOCOL:
        return True
    trial = Findings()
    res = PickleWalker(trial, "trial").run(READERS[STRICT](Source(f, base, min(length, TRIAL_BYTES))))
    if res.end is not None:
        return True
    return any(_IDENT.match(u.module) and _IDENT.match(u.qualname) for u in trial.uses.values())


def _split_global(arg: str) -> tuple[str, str]:
    module, _, name = arg.partition(" ")
    return python3_name(module, name)


class PickleWalker:
    """Walk one pickle, recording globals and anomalies into a shared :class:`Findings`."""

    def __init__(self, findings: Findings, name: str, depth: int = 0) -> None:
        self.f = findings
        self.name = name
        self.depth = depth
        self.stack: list[Any] = []
        self.metastack: list[list[Any]] = []
        self.memo: dict[int, Any] = {}
        self.protocol = 0
        self.pos = 0
        self.nops = 0
        self.deep_reported = False
        self.non_wo_ops: set[str] = set()
        self.src: Source | None = None
        # the re-walks of a frame-violating pickle report globals, not the refusal again
        self.quiet_weights_only = False

    # -- helpers -------------------------------------------------------------------------
    def where(self) -> str:
        return f"{self.name} @ {self.pos}"

    def anomaly(self, code: str, message: str) -> None:
        self.f.anomaly(code, message, self.where())

    def push(self, v: Any) -> None:
        self.stack.append(v)

    def pop(self) -> Any:
        if self.stack:
            return self.stack.pop()
        self.anomaly("stack-underflow", "an opcode pops a value the stack does not have")
        return _UNKNOWN

    def top(self) -> Any:
        return self.stack[-1] if self.stack else _UNKNOWN

    def pop_mark(self) -> list[Any]:
        items = self.stack
        if not self.metastack:
            self.anomaly("stack-underflow", "an opcode needs a MARK that was never pushed")
            self.stack = []
            return items
        self.stack = self.metastack.pop()
        return items

    def new_global(self, module: str, qualname: str) -> _Glob:
        return _Glob(self.f.use(module, qualname, self.where()))

    def check_bytes(self, data: bytes | Span) -> None:
        """Recurse into bytes that start like a pickle (anywhere in the stream)."""
        src = self.src
        head = data[:2] if not isinstance(data, Span) else src.get(data.start, 2) if src else b""
        if not is_pickle_start(head):
            return
        label = f"nested pickle in {self.name} @ offset {self.pos}"
        if self.depth + 1 > MAX_NESTED_DEPTH:
            self.anomaly("nesting-limit", f"pickle nested more than {MAX_NESTED_DEPTH} levels deep; not scanned")
            return
        if isinstance(data, Span):
            assert src is not None
            walk_source(src.f, src.base + data.start, data.length, self.f, label, self.depth + 1)
        else:
            walk_pickle(io.BytesIO(data), len(data), self.f, label, self.depth + 1)

    def callee(self, target: Any, how: str, flag: str) -> _Use | None:
        """Record that *target* is invoked; anomalies for callables computed by the pickle."""
        if isinstance(target, _Glob):
            target.use.flags.add(flag)
            return target.use
        origin = f" (a value produced by {target.origin.name})" if isinstance(target, _Made) and target.origin else ""
        self.anomaly("computed-callable", f"{how} invokes a callable that is not a plain global{origin}")
        if isinstance(target, _Made) and target.origin:
            target.origin.flags.add("call")
        return None

    # -- the walk ------------------------------------------------------------------------
    def run(self, reader: Reader) -> PickleResult:
        self.f.pickles.append(self.name)
        self.src = reader.src
        end: int | None = None
        violation = False
        try:
            for name, arg, pos in decode(reader):
                self.pos = pos
                self.nops += 1
                if self.nops > MAX_OPS:
                    self.anomaly("opcode-limit", f"more than {MAX_OPS} opcodes; analysis stopped")
                    break
                if name not in WEIGHTS_ONLY_OPCODES:
                    self.non_wo_ops.add(name)
                if name == "STOP":
                    end = reader.pos
                    break
                self.step(name, arg)
        except PickleReadError as e:
            self.pos = e.offset
            violation = e.code == "frame-violation"
            self.anomaly(e.code, e.message)
        if self.non_wo_ops and not self.quiet_weights_only:
            self.f.anomaly(
                "weights-only-refused",
                "torch.load(weights_only=True) refuses this pickle: torch's restricted unpickler does not "
                f"implement its opcodes {', '.join(sorted(self.non_wo_ops))} (pickle protocol "
                f"{max(self.protocol, 2)}); whatever they build, the file cannot be loaded safely as it is",
                self.name,
            )
        if reader.skipped:
            self.f.note(f"{self.name}: skipped {reader.skipped} bytes of frames a linear reader treats as data")
        return PickleResult(end, self.protocol, violation)

    def step(self, name: str, arg: Any) -> None:
        if name == "PROTO":
            self.protocol = arg
            if arg > HIGHEST_PROTOCOL:
                self.anomaly("unsupported-protocol", f"pickle protocol {arg} (Python knows up to 5)")
        elif name == "MARK":
            self.metastack.append(self.stack)
            self.stack = []
            if len(self.metastack) > MAX_MARK_DEPTH and not self.deep_reported:
                self.deep_reported = True
                self.anomaly("deep-nesting", f"more than {MAX_MARK_DEPTH} nested MARKs (a nesting bomb)")
        elif name in ("GLOBAL", "INST"):
            module, qualname = _split_global(arg)
            g = self.new_global(module, qualname)
            if name == "GLOBAL":
                self.push(g)
            else:
                args = self.pop_mark()
                g.use.flags.add("call" if args else "instantiate")
                self.push(_Made("instance", g.use))
        elif name == "STACK_GLOBAL":
            qn, mod = self.pop(), self.pop()
            if isinstance(mod, str) and isinstance(qn, str):
                self.push(self.new_global(*python3_name(mod, qn)))
            else:
                self.anomaly("unresolved-global", "STACK_GLOBAL takes its module or name from a computed value")
                u = self.f.use("", "<unresolved STACK_GLOBAL>", self.where())
                u.flags.add("unresolved")
                self.push(_Glob(u))
        elif name in ("EXT1", "EXT2", "EXT4"):
            self.anomaly(
                "extension-code",
                f"{name} {arg}: the global comes from the loader's copyreg extension registry",
            )
            u = self.f.use("", f"<copyreg extension {arg}>", self.where())
            u.flags.add("extension")
            self.push(_Glob(u))
        elif name == "REDUCE":
            args = self.pop()
            func = self.pop()
            use = self.callee(func, "REDUCE", "call")
            self.push(self.call_result(use, args))
        elif name in ("NEWOBJ", "NEWOBJ_EX"):
            if name == "NEWOBJ_EX":
                self.pop()
            self.pop()
            cls = self.pop()
            use = self.callee(cls, name, "instantiate")
            self.push(_Made("instance", use))
        elif name == "OBJ":
            items = self.pop_mark()
            if not items:
                self.anomaly("stack-underflow", "OBJ without a class")
                self.push(_UNKNOWN)
                return
            use = self.callee(items[0], "OBJ", "call" if len(items) > 1 else "instantiate")
            self.push(_Made("instance", use))
        elif name == "BUILD":
            self.pop()
            inst = self.top()
            if isinstance(inst, _Glob):
                # BUILD on a class or function object sets attributes on it (global state).
                self.anomaly("build-on-global", f"BUILD sets attributes on the global {inst.use.name}")
                inst.use.flags.add("call")
            elif isinstance(inst, _Made) and inst.origin is not None:
                inst.origin.flags.add("build")
        elif name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            idx = len(self.memo) if name == "MEMOIZE" else int(arg)
            if idx > self.nops + 16:
                self.anomaly("memo-index", f"memo index {idx} is far beyond the {self.nops} opcodes read (a memo bomb)")
            if len(self.memo) < MAX_OPS:
                self.memo[idx] = self.top()
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            idx = int(arg)
            if idx not in self.memo:
                self.anomaly("memo-missing", f"memo index {idx} is read but never written")
                self.push(_UNKNOWN)
            else:
                self.push(self.memo[idx])
        else:
            self.step_data(name, arg)

    def call_result(self, use: _Use | None, args: Any) -> Any:
        if use is None:
            return _Made("result")
        if use.name in RECONSTRUCTORS:
            cls = args[0] if isinstance(args, tuple) and args else None
            if isinstance(cls, _Glob):
                cls.use.flags.add("instantiate")
            else:
                self.anomaly("computed-callable", f"{use.name} instantiates a class computed by the pickle")
            return _Made("instance", cls.use if isinstance(cls, _Glob) else None)
        if use.name == "_codecs.encode" and isinstance(args, tuple) and args and isinstance(args[0], str):
            # protocol 2 pickles bytes as _codecs.encode(latin1_text, "latin1")
            try:
                data = args[0].encode("latin-1")
            except UnicodeEncodeError:
                return _Made("result", use)
            self.check_bytes(data)
            return data
        return _Made("result", use)

    def step_data(self, name: str, arg: Any) -> None:
        if name in ("BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8"):
            self.check_bytes(arg)
            self.push(_Made("bytes"))
        elif name in ("STRING", "BINSTRING", "SHORT_BINSTRING"):
            # Python 2 str: loaded as bytes with encoding="bytes" (torch's legacy loader does that)
            if isinstance(arg, str):
                self.check_bytes(arg.encode("latin-1"))
                self.push(arg)
            else:
                self.push(_Made("str"))
        elif name in (
            "UNICODE",
            "SHORT_BINUNICODE",
            "BINUNICODE",
            "BINUNICODE8",
            "INT",
            "BININT",
            "BININT1",
            "BININT2",
            "LONG",
            "LONG1",
            "LONG4",
            "FLOAT",
            "BINFLOAT",
        ):
            if isinstance(arg, LongLine):
                self.anomaly("long-line", f"a {name} argument longer than 1 MiB; its value is not analysed")
                arg = _Made("str")
            self.push(_Made("str") if arg is None else arg)
        elif name in ("NONE", "NEWTRUE", "NEWFALSE"):
            self.push({"NONE": None, "NEWTRUE": True, "NEWFALSE": False}[name])
        elif name in ("EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET", "EMPTY_TUPLE"):
            self.push(() if name == "EMPTY_TUPLE" else _Made(name[6:].lower()))
        elif name in ("LIST", "DICT", "FROZENSET"):
            self.pop_mark()
            self.push(_Made(name.lower()))
        elif name == "TUPLE":
            self.push(tuple(self.pop_mark()))
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            n = int(name[-1])
            items = [self.pop() for _ in range(n)]
            self.push(tuple(reversed(items)))
        elif name in ("APPEND", "SETITEM"):
            self.pop()
            if name == "SETITEM":
                self.pop()
        elif name in ("APPENDS", "SETITEMS", "ADDITEMS", "POP_MARK"):
            self.pop_mark()
        elif name == "POP":
            # pickle.py load_pop: an empty stack means POP discards the topmost MARK
            if self.stack:
                self.stack.pop()
            else:
                self.pop_mark()
        elif name == "DUP":
            self.push(self.top())
        elif name == "PERSID":
            self.push(_Made("persistent"))
        elif name == "BINPERSID":
            self.pop()
            self.push(_Made("persistent"))
        elif name == "NEXT_BUFFER":
            self.anomaly("out-of-band-buffer", "the pickle expects out-of-band buffers from the loader")
            self.push(_Made("buffer"))
        elif name in ("READONLY_BUFFER", "FRAME"):
            pass  # FRAME is followed by the reader (opcodes.py)
        else:  # pragma: no cover - decode only yields opcodes it knows, all handled above
            self.anomaly("unknown-opcode", f"opcode {name} is not simulated")


def walk_pickle(stream: IO[bytes], length: int, findings: Findings, name: str, depth: int = 0) -> PickleResult:
    """Walk the pickle at the current position of *stream* (at most *length* bytes).

    Offsets in ``where`` strings are relative to the start of this pickle.
    """
    return walk_source(stream, stream.tell(), length, findings, name, depth)


_REREADS = (
    (C_STREAM, "as CPython < 3.13.15's C unpickler reads it from a file, e.g. in torch.load"),
    (LINEAR, "read linearly, as pickle.loads on bytes and pickletools do"),
)


def walk_source(
    stream: IO[bytes], base: int, length: int, findings: Findings, name: str, depth: int = 0
) -> PickleResult:
    """Walk the pickle at offset *base* of *stream*, as CPython's strict unpickler reads it.

    If its frames are inconsistent (CPython versions disagree on what it runs), walk it again
    under each other reading so that every global any of them imports is reported.

    A pickle in torch.save's plain vocabulary takes the fast lane (:mod:`.fast_lane`): the same
    findings, from CPython's C unpickler over recording stand-ins.
    """
    fast = walk_fast(stream, base, length)
    if fast is not None:
        findings.pickles.append(name)
        for module, qualname, offset in fast.globals:
            use = findings.use(module, qualname, f"{name} @ {offset}")
            use.flags |= fast.flags.get(use.name, frozenset())
        return PickleResult(fast.end, fast.protocol)
    res = PickleWalker(findings, name, depth).run(READERS[STRICT](Source(stream, base, length)))
    if res.frame_violation:
        for mode, how in _REREADS:
            walker = PickleWalker(findings, f"{name} ({how})", depth)
            walker.quiet_weights_only = True
            walker.run(READERS[mode](Source(stream, base, length)))
    return res
