"""An allowlisting unpickler that turns a checkpoint's pickle into plain data.

``torch.save`` pickles tensors as calls of a few rebuild functions
(``torch._utils._rebuild_tensor_v2`` and friends, see torch/_utils.py) over storages that
are *persistent ids* pointing into the archive. This unpickler replaces every global the
pickle names by a stand-in that only builds metadata records, so nothing from the file is
ever imported or called:

* torch rebuild functions, storage types, dtypes, ``torch.Size``/``torch.device``,
  ``OrderedDict`` and plain containers become records (:class:`TensorRecord`, strings,
  tuples, dicts);
* an unknown class that the pickle merely instantiates and fills with state (``NEWOBJ`` +
  ``BUILD``, or ``copyreg._reconstructor``, as ``torch.save(model)`` or argparse do) becomes
  an :class:`OpaqueObject` (class name + state as data);
* a handful of value types that show up in hyper-parameters (paths, dates, numpy scalars)
  are recorded as opaque values too, never constructed;
* a call of any other global (``os.system``, ``builtins.eval``, gadgets) raises
  :class:`UnsafeContent` naming it. EXT opcodes are refused likewise.

The stand-ins live in :mod:`.pickle_globals`. The unpickler is built on the pure-Python
``pickle._Unpickler`` because its memo is a dict (the C
unpickler preallocates an array up to the largest memo index: a 4-byte index is a memory
bomb) and its opcode table can be overridden one entry at a time.
"""

from __future__ import annotations

import io
import pickle
import struct
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, ClassVar

from ckptdoctor.errors import CorruptCheckpoint, LimitExceeded, UnsafeContent
from ckptdoctor.formats.pickle.allowance import current as current_allowance
from ckptdoctor.formats.pickle.fast import NOT_FAST, fast_load, gc_paused
from ckptdoctor.formats.pickle.stand_ins import (
    CALLABLE_STAND_INS,
    RECORDED_VALUE_TYPES,
    STAND_INS,
    StorageType,
    UnknownGlobal,
    resolve_global,
)
from ckptdoctor.formats.pickle.tables import is_denied, python3_name
from ckptdoctor.limits import MAX_MARK_DEPTH, MAX_PICKLE_BYTES
from ckptdoctor.model.checkpoint import GlobalRef, OpaqueObject, TensorRecord

FAST_MIN_BYTES = 1 << 16  # below this the interpreter takes milliseconds: no C path needed
# The pure-Python unpickler is private API; typed as Any so its internals (pop_mark, memo,
# dispatch) need no stubs. It exists unchanged from Python 3.8 to 3.14.
PersistentLoad = Callable[[Any], Any]

_PyUnpickler: Any = pickle._Unpickler


class SafeUnpickler(_PyUnpickler):
    """Interprets a pickle as data. See the module docstring for the policy."""

    dispatch: ClassVar[dict[int, Any]] = dict(_PyUnpickler.dispatch)

    def __init__(self, stream: Any, persistent_load: PersistentLoad | None = None, *, where: str = "") -> None:
        super().__init__(stream, encoding="latin1")
        self._persistent = persistent_load
        self.where = where
        self.globals_seen: list[str] = []
        self.allowance = current_allowance()  # --allow-global: calls recorded, never run

    # -- globals ---------------------------------------------------------------------------
    def find_class(self, module: str, name: str) -> Any:
        if not isinstance(module, str) or not isinstance(name, str) or len(module) + len(name) > 1000:
            raise CorruptCheckpoint("a pickle global with an invalid name")
        module, name = python3_name(module, name)  # refusals and allowances use the Python 3 name
        self.globals_seen.append(f"{module}.{name}")
        return resolve_global(module, name)

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent is None:
            raise CorruptCheckpoint("the pickle refers to external storage, but this format has none")
        return self._persistent(pid)

    def _refuse_call(self, func: Any) -> None:
        name = func.dotted if isinstance(func, GlobalRef) else type(func).__name__
        hint, what = None, "which is not a tensor rebuild function or a plain data type"
        if isinstance(func, GlobalRef) and is_denied(func.module, func.name):
            # Never "if you trust it": nobody should trust a call that runs code.
            what = "which runs code or reaches the system: the file is hostile or damaged"
            hint = ("Never load it with torch.load(weights_only=False). `ckptdoctor scan PATH` shows every such "
                    "call. To keep its tensors only, write them out without the call: ckptdoctor convert PATH "
                    f"OUT.safetensors --allow-global {name} (the call is read as a record, never run, and left out).")
        elif isinstance(func, GlobalRef):
            hint = (f"If you trust `{name}`, pass --allow-global {name} (or list it under allow-globals in "
                    "[tool.ckptdoctor] of pyproject.toml): its calls are then read as opaque records, never "
                    "imported or run. Run `ckptdoctor scan PATH` for the full safety report.")
        raise UnsafeContent(f"refused to read: the pickle{' in ' + self.where if self.where else ''} calls "
                            f"`{name}`, {what}", hint=hint)

    def _call(self, func: Any, args: Any) -> Any:
        if not isinstance(args, tuple):
            raise CorruptCheckpoint("a pickle call with non-tuple arguments")
        if isinstance(func, UnknownGlobal):
            if func.dotted in RECORDED_VALUE_TYPES:
                return OpaqueObject(GlobalRef(func.module, func.name), args=args, via="reduce")
            if func.dotted in self.allowance.names:
                self.allowance.used.add(func.dotted)
                return OpaqueObject(GlobalRef(func.module, func.name), args=args, via="reduce")
            self._refuse_call(func)
        if func in CALLABLE_STAND_INS:
            try:
                return func(*args)
            except (TypeError, ValueError) as exc:
                raise CorruptCheckpoint(f"malformed arguments in the pickle: {exc}") from None
        self._refuse_call(func)
        return None  # unreachable

    def load_reduce(self) -> None:
        stack = self.stack
        args = stack.pop()
        stack[-1] = self._call(stack[-1], args)

    def _instantiate(self, klass: Any, args: Any) -> None:  # INST and OBJ
        if isinstance(klass, UnknownGlobal) and not args:
            self.append(OpaqueObject(GlobalRef(klass.module, klass.name), via="newobj"))
            return
        self.append(self._call(klass, tuple(args)))

    def _new_object(self, cls: Any, args: Any) -> Any:
        if isinstance(cls, UnknownGlobal):
            return OpaqueObject(GlobalRef(cls.module, cls.name), args=tuple(args), via="newobj")
        if cls is OrderedDict or cls in (set, frozenset, bytearray):
            return cls(*args)
        if isinstance(cls, StorageType) or cls in STAND_INS:
            raise CorruptCheckpoint("NEWOBJ on a torch function or storage type")
        self._refuse_call(cls)
        return None

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._new_object(cls, args))

    def load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        obj = self._new_object(cls, args)
        if isinstance(obj, OpaqueObject) and kwargs:
            obj.args = (*obj.args, dict(kwargs))
        self.append(obj)

    def load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, OpaqueObject):
            inst.state = state
        elif isinstance(inst, OrderedDict) and isinstance(state, dict):
            # torch state dicts carry `_metadata` (module versions) as an attribute.
            metadata = state.get("_metadata")
            if metadata is not None:
                inst._metadata = metadata  # type: ignore[attr-defined]
        elif isinstance(inst, TensorRecord):
            pass  # Python attributes on a tensor (torch/_tensor.py state); metadata only
        else:
            raise CorruptCheckpoint(f"BUILD on an object of type {type(inst).__name__}")

    def get_extension(self, code: int) -> None:
        raise UnsafeContent(f"refused to read: the pickle uses extension code {code} (EXT opcode), "
                            "which resolves to a global chosen by the loading process")

    # -- containers: only on real containers or records, never attribute lookups on others --
    def load_appends(self) -> None:
        items = self.pop_mark()
        target = self.stack[-1]
        if not isinstance(target, (list, OpaqueObject)):
            raise CorruptCheckpoint(f"APPENDS on a {type(target).__name__}")
        target.extend(items)

    def load_append(self) -> None:
        value = self.stack.pop()
        target = self.stack[-1]
        if not isinstance(target, (list, OpaqueObject)):
            raise CorruptCheckpoint(f"APPEND on a {type(target).__name__}")
        target.append(value)

    def load_setitems(self) -> None:
        items = self.pop_mark()
        target = self.stack[-1]
        if not isinstance(target, (dict, OpaqueObject)):
            raise CorruptCheckpoint(f"SETITEMS on a {type(target).__name__}")
        for i in range(0, len(items) - 1, 2):
            target[items[i]] = items[i + 1]

    def load_setitem(self) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        target = self.stack[-1]
        if not isinstance(target, (dict, OpaqueObject)):
            raise CorruptCheckpoint(f"SETITEM on a {type(target).__name__}")
        target[key] = value

    def load_additems(self) -> None:
        items = self.pop_mark()
        target = self.stack[-1]
        if not isinstance(target, set):
            raise CorruptCheckpoint(f"ADDITEMS on a {type(target).__name__}")
        target.update(items)

    def load(self) -> Any:
        """Run the opcode loop reading straight from the stream.

        ``pickle._Unpickler`` routes every read through its frame buffer, which costs a
        third of the time on a 20,000-tensor pickle; frames only delimit bytes that follow
        anyway, so FRAME opcodes are skipped instead (``load_frame`` below).
        """
        self.read = self._file_read
        self.readline = self._file_readline
        self.readinto = getattr(self, "_file_readinto", None)
        self.metastack: list[list[Any]] = []
        self.stack: list[Any] = []
        self.append = self.stack.append
        self.proto = 0
        read = self.read
        dispatch = self.dispatch
        try:
            while True:
                key = read(1)
                if not key:
                    raise EOFError("the pickle ends before its STOP opcode")
                dispatch[key[0]](self)
        except pickle._Stop as stop:  # type: ignore[attr-defined]
            return stop.value

    def load_bytes(self, data: bytes) -> Any:
        """The opcode loop over an in-memory pickle, with torch's hot opcodes inlined.

        A 20,000-tensor state dict is ~650,000 opcodes; going through ``dispatch`` costs a
        method call and a stream read per opcode. The opcodes ``torch.save`` emits (protocol
        2: BINPUT/BINGET, MARK/TUPLE*, BINUNICODE, BININT*, REDUCE, BINPERSID, GLOBAL,
        SETITEMS...) are handled inline here with identical semantics; any other opcode
        falls back to the table, which reads from the same position.
        """
        stream = io.BytesIO(data)
        self._file_read = stream.read
        self._file_readline = stream.readline
        self.read = stream.read
        self.readline = stream.readline
        self.readinto = stream.readinto
        self.proto = 0
        memo = self.memo
        metastack: list[list[Any]] = []
        stack: list[Any] = []
        append = stack.append
        unpack_from = struct.unpack_from
        dispatch = self.dispatch
        call = self._call
        pos = 0
        end = len(data)
        try:
            while True:
                op = data[pos]
                pos += 1
                if op == 0x72:  # LONG_BINPUT
                    (index,) = unpack_from("<I", data, pos)
                    memo[index] = stack[-1]
                    pos += 4
                elif op == 0x4B:  # BININT1
                    append(data[pos])
                    pos += 1
                elif op == 0x68:  # BINGET
                    append(memo[data[pos]])
                    pos += 1
                elif op == 0x28:  # MARK
                    if len(metastack) >= MAX_MARK_DEPTH:
                        raise LimitExceeded(f"pickle nests deeper than {MAX_MARK_DEPTH} levels")
                    metastack.append(stack)
                    stack = []
                    append = stack.append
                elif op in (0x58, 0x8C):  # BINUNICODE, SHORT_BINUNICODE
                    if op == 0x58:
                        (size,) = unpack_from("<I", data, pos)
                        pos += 4
                    else:
                        size = data[pos]
                        pos += 1
                    if pos + size > end:
                        raise EOFError("string runs past the end of the pickle")
                    append(str(data[pos:pos + size], "utf-8", "surrogatepass"))
                    pos += size
                elif op == 0x74:  # TUPLE
                    items = tuple(stack)
                    stack = metastack.pop()
                    append = stack.append
                    append(items)
                elif op == 0x86:  # TUPLE2
                    stack[-2:] = [(stack[-2], stack[-1])]
                elif op == 0x52:  # REDUCE
                    args = stack.pop()
                    stack[-1] = call(stack[-1], args)
                elif op == 0x51:  # BINPERSID
                    stack[-1] = self.persistent_load(stack[-1])
                elif op == 0x89:  # NEWFALSE
                    append(False)
                elif op == 0x29:  # EMPTY_TUPLE
                    append(())
                elif op == 0x6A:  # LONG_BINGET
                    (index,) = unpack_from("<I", data, pos)
                    append(memo[index])
                    pos += 4
                elif op == 0x71:  # BINPUT
                    memo[data[pos]] = stack[-1]
                    pos += 1
                elif op == 0x94:  # MEMOIZE
                    memo[len(memo)] = stack[-1]
                elif op == 0x88:  # NEWTRUE
                    append(True)
                elif op == 0x4E:  # NONE
                    append(None)
                elif op == 0x85:  # TUPLE1
                    stack[-1] = (stack[-1],)
                elif op == 0x87:  # TUPLE3
                    stack[-3:] = [(stack[-3], stack[-2], stack[-1])]
                elif op == 0x7D:  # EMPTY_DICT
                    append({})
                elif op == 0x75:  # SETITEMS
                    pairs = stack
                    stack = metastack.pop()
                    append = stack.append
                    target = stack[-1]
                    if not isinstance(target, (dict, OpaqueObject)):
                        raise CorruptCheckpoint(f"SETITEMS on a {type(target).__name__}")
                    for i in range(0, len(pairs) - 1, 2):
                        target[pairs[i]] = pairs[i + 1]
                elif op == 0x4D:  # BININT2
                    (value,) = unpack_from("<H", data, pos)
                    append(value)
                    pos += 2
                elif op == 0x4A:  # BININT
                    (value,) = unpack_from("<i", data, pos)
                    append(value)
                    pos += 4
                elif op == 0x2E:  # STOP
                    self.stop_offset = pos
                    return stack.pop()
                else:  # everything else through the opcode table, from the same position
                    self.stack, self.metastack, self.append = stack, metastack, append
                    stream.seek(pos)
                    dispatch[op](self)
                    stack, metastack = self.stack, self.metastack
                    append = stack.append
                    pos = stream.tell()
        except pickle._Stop as stop:  # type: ignore[attr-defined]
            self.stop_offset = stream.tell()
            return stop.value
        except IndexError:
            if pos >= end:
                raise EOFError("the pickle ends before its STOP opcode") from None
            raise

    def load_frame(self) -> None:
        if len(self.read(8)) != 8:
            raise EOFError("truncated FRAME opcode")

    def load_mark(self) -> None:
        if len(self.metastack) >= MAX_MARK_DEPTH:
            raise LimitExceeded(f"pickle nests deeper than {MAX_MARK_DEPTH} levels")
        super().load_mark()

    for _opcode, _method in (
        (pickle.REDUCE, load_reduce), (pickle.NEWOBJ, load_newobj), (pickle.NEWOBJ_EX, load_newobj_ex),
        (pickle.BUILD, load_build), (pickle.APPENDS, load_appends), (pickle.APPEND, load_append),
        (pickle.SETITEMS, load_setitems), (pickle.SETITEM, load_setitem), (pickle.ADDITEMS, load_additems),
        (pickle.MARK, load_mark), (pickle.FRAME, load_frame),
    ):
        dispatch[_opcode[0]] = _method
    del _opcode, _method


def load_pickle(data: bytes, persistent_load: PersistentLoad | None = None, *, where: str = "",
                path: str | None = None, own_writer: bool = False) -> Any:
    """Interpret one pickle as data; every failure becomes a ckptdoctor error naming ``where``.

    ``own_writer``: the bytes are exactly what ``writers.torch_zip.TreePickler`` produced (a
    read-back that has checked their CRC-32), so the C path needs no pre-pass (see ``fast_load``).
    """
    return _load_pickle(data, lambda: data, persistent_load, where, path, own_writer)


def load_pickle_read(read: Callable[[], bytes], persistent_load: PersistentLoad | None = None, *,
                     where: str = "", path: str | None = None) -> Any:
    """:func:`load_pickle` of the bytes ``read()`` returns, which the C path lets go of while it
    reads them (no caller holds them: a 200,000-tensor data.pkl is 27 MB alive at the load's
    peak otherwise). ``read`` is called again when the interpreter must decide."""
    return _load_pickle([read()], read, persistent_load, where, path, False)


def _load_pickle(data: bytes | list[bytes], read: Callable[[], bytes], persistent_load: PersistentLoad | None,
                 where: str, path: str | None, own_writer: bool) -> Any:
    """``data`` as bytes, or as a one-item list the C path may empty (then ``read`` gives them again)."""
    size = len(data[0]) if isinstance(data, list) else len(data)
    if size > MAX_PICKLE_BYTES:
        raise LimitExceeded(f"pickle of {size} bytes is beyond the {MAX_PICKLE_BYTES}-byte limit", path=path)
    with gc_paused():
        # The C unpickler when a bounded pre-pass allows it (fast_pickle); this interpreter
        # for everything else, and to give the exact error whenever the C path fails.
        # An allowance (--allow-global) is applied by the interpreter only.
        fast = size >= FAST_MIN_BYTES and not current_allowance().names
        result = fast_load(data, persistent_load, prepass=not own_writer) if fast else NOT_FAST
        if result is not NOT_FAST:
            return result
        whole = read() if data == [] else data[0] if isinstance(data, list) else data
        return _run(SafeUnpickler(io.BytesIO(whole), persistent_load, where=where), lambda u: u.load_bytes(whole),
                    where, path)


def read_pickle_stream(stream: Any, persistent_load: PersistentLoad | None = None, *,
                       where: str = "", path: str | None = None) -> Any:
    """Interpret the next pickle in ``stream`` (the legacy format stores several in a row)."""
    return _run(SafeUnpickler(stream, persistent_load, where=where), SafeUnpickler.load, where, path)


def _run(unpickler: SafeUnpickler, method: Callable[[SafeUnpickler], Any], where: str, path: str | None) -> Any:
    """Run one unpickling and turn every failure into a ckptdoctor error naming ``where``."""
    try:
        return method(unpickler)
    except (UnsafeContent, CorruptCheckpoint) as exc:
        if exc.path is None:
            exc.path = path
        raise
    except RecursionError:
        raise LimitExceeded(f"{where or 'pickle'} nests too deeply", path=path) from None
    except MemoryError:
        raise LimitExceeded(f"{where or 'pickle'} asks for more memory than any checkpoint needs",
                            path=path) from None
    except Exception as exc:  # the pure-Python unpickler raises many types on corrupt input
        raise CorruptCheckpoint(f"{where or 'pickle'} is corrupt ({type(exc).__name__}: {exc})"[:300],
                                path=path) from None
