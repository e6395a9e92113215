"""DCP's ``.metadata`` as lean records: at C speed when it is plain DCP, else as today.

A large run's ``.metadata`` lists every parameter and optimizer state of every rank (the bench's
200,000 entries: 48 MB, 22 million opcodes, a million dataclass instances). Through the generic
stand-ins every dataclass becomes an :class:`OpaqueObject` holding a state dict; this module reads
the same pickle into slotted stand-ins for exactly the classes DCP pickles
(torch/distributed/checkpoint/metadata.py, filesystem.py) and nothing else:

* a pre-pass (:mod:`.dcp_prepass`) admits only the opcodes DCP writes (the memo filled by
  ``MEMOIZE`` alone: no memo bomb; no ``EXT``; bounded nesting), then CPython's C unpickler runs
  with a ``find_class`` that knows a fixed table: the DCP dataclasses, dtypes, ``torch.Size``,
  ``_get_layout``, the memory-format enum and the ``pathlib`` paths of ``StorageMeta``;
* ``NEWOBJ`` makes a slotted instance in C; ``BUILD`` calls its ``__setstate__``, which checks the
  state's fields (exact types, known keys), keeps the ones the reader uses and empties the state
  dict: the unpickler's memo keeps every dict alive until the load ends, and emptied they cost 64
  bytes instead of ~250 (about 150 MB of the 200,000-entry file);
* nothing here is ever *called* by the pickle except four small functions that check their
  arguments (a stand-in class called through ``REDUCE``/``OBJ`` refuses), so the work per opcode
  stays bounded.

Anything else -- an unknown global, a field of an unexpected type or a key DCP does not write, a
persistent id, a state dict reused or changed after its ``BUILD`` (seen by its reference count
and emptiness once the memo is gone) -- makes :func:`fast_metadata` return ``None``, and the
reader runs today's path (:func:`generic_metadata`: the allowlisting unpickler, then the same
checks with today's messages). Hostile files therefore get exactly today's refusal.
"""

from __future__ import annotations

import pickle
import sys
from collections.abc import Callable
from typing import Any

from ckptdoctor.errors import CorruptCheckpoint
from ckptdoctor.formats.pickle.fast import c_unpickler_input, gc_paused
from ckptdoctor.formats.pickle.stand_ins import SHARED_DIMS, resolve_global
from ckptdoctor.formats.readers.dcp_prepass import admitted
from ckptdoctor.model.checkpoint import DTYPE_ALIASES, DTYPE_BITS, OpaqueObject

DCP_MODULE = "torch.distributed.checkpoint.metadata"
DCP_MODULES = frozenset({DCP_MODULE, "torch.distributed.checkpoint.filesystem"})  # _StorageInfo lives in the latter
MAX_DIMS = 64
MAX_KNOWN_PROPERTIES = 1024  # distinct TensorProperties states remembered (dtypes x requires_grad in practice)


class Fallback(Exception):
    """The fast path met something only the generic unpickler decides exactly."""


# ---- the records the reader consumes (both paths) ----------------------------------------------

class Item:
    """Where one DCP item's bytes lie: ``length`` bytes at ``offset`` of ``relative_path``
    (``_StorageInfo``); ``transform_descriptors`` is non-empty when a transform (compression)
    wrote them."""

    __slots__ = ("length", "offset", "relative_path", "transform_descriptors")

    relative_path: str
    offset: int
    length: int
    transform_descriptors: Any

    @classmethod
    def of(cls, relative_path: str, offset: int, length: int, transformed: bool) -> Item:
        item = object.__new__(cls)
        item.relative_path, item.offset, item.length = relative_path, offset, length
        item.transform_descriptors = transformed
        return item

    @property
    def transformed(self) -> bool:
        return bool(self.transform_descriptors)


# fqn -> (chunk offset, item), or a list of them for a tensor saved in several chunks
StorageIndex = dict[str, Any]


class Metadata:
    """``Metadata``'s fields the reader uses, whichever path read them.

    ``entry(value, fqn)`` turns one ``state_dict_metadata`` value into ``None`` (a
    ``BytesStorageMetadata``: a non-tensor value) or ``(dtype, shape, requires_grad, chunks)``.
    ``fast``: read by the fast path, whose surprises raise :class:`Fallback`, not an error.
    """

    __slots__ = ("entries", "entry", "fast", "planner_data", "storage", "version")

    def __init__(self, entries: dict[Any, Any], storage: StorageIndex, planner_data: Any, version: Any,
                 entry: Callable[[Any, str], tuple[str, tuple[int, ...], bool, int] | None], *, fast: bool) -> None:
        self.entries, self.storage, self.planner_data, self.version, self.entry, self.fast = (
            entries, storage, planner_data, version, entry, fast)


def dims(value: Any, what: str, directory: str) -> tuple[int, ...]:
    """A checked shape (``torch.Size`` arrives checked and shared, see stand_ins._check_dims)."""
    if type(value) is tuple and SHARED_DIMS.get(value) is value:
        return value
    if not isinstance(value, (tuple, list)) or len(value) > MAX_DIMS or not all(
            type(v) is int and 0 <= v < 1 << 62 for v in value):
        raise CorruptCheckpoint(f".metadata: {what} is not a list of sizes: {value!r:.60}", path=directory)
    return tuple(value)


def _add_chunk(storage: StorageIndex, fqn: str, chunk: tuple[int, ...], item: Item) -> None:
    found = storage.get(fqn)
    if found is None:
        storage[fqn] = (chunk, item)
    elif type(found) is tuple:
        storage[fqn] = [found, (chunk, item)]
    else:
        found.append((chunk, item))


# ---- the generic path: today's unpickler and today's checks -------------------------------------

def _fields(node: Any, cls: str, what: str, directory: str) -> dict[str, Any]:
    """The dataclass fields of a pickled DCP object of class ``cls``."""
    if not (isinstance(node, OpaqueObject) and node.cls.module in DCP_MODULES and node.cls.name == cls):
        found = node.cls.dotted if isinstance(node, OpaqueObject) else type(node).__name__
        raise CorruptCheckpoint(f".metadata: {what} is a {found}, expected {cls}", path=directory)
    return dict(node.state_dict_view())


def _properties(node: Any, fqn: str, directory: str) -> tuple[str, bool]:
    """(dtype, requires_grad) of a ``TensorProperties`` (tuple state since torch 2.2, dict before)."""
    if isinstance(node, OpaqueObject) and isinstance(node.state, tuple) and len(node.state) == 5:
        dtype, requires_grad = node.state[0], node.state[2]
    else:
        fields = _fields(node, "TensorProperties", f"the properties of {fqn!r}", directory)
        dtype, requires_grad = fields.get("dtype"), fields.get("requires_grad", False)
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise CorruptCheckpoint(f".metadata: {fqn!r} has an invalid dtype {dtype!r:.40}", path=directory)
    return str(dtype), bool(requires_grad)


def _storage_index(storage_data: Any, directory: str) -> StorageIndex:
    if not isinstance(storage_data, dict):
        raise CorruptCheckpoint(".metadata has no storage_data mapping", path=directory)
    out: StorageIndex = {}
    for key, value in storage_data.items():
        index = _fields(key, "MetadataIndex", "a storage_data key", directory)
        info = _fields(value, "_StorageInfo", "a storage_data value", directory)
        fqn, rel, offset, length = index.get("fqn"), info.get("relative_path"), info.get("offset"), info.get("length")
        if not isinstance(fqn, str) or not isinstance(rel, str) or type(offset) is not int or type(length) is not int:
            raise CorruptCheckpoint(f".metadata: malformed storage entry for {fqn!r:.80}", path=directory)
        chunk = dims(index.get("offset") or (), f"the chunk offset of {fqn!r}", directory)
        _add_chunk(out, fqn, chunk, Item.of(rel, offset, length, bool(info.get("transform_descriptors"))))
    return out


def generic_metadata(root: Any, directory: str) -> Metadata:
    """``Metadata`` from the allowlisting unpickler's object tree, with today's checks and messages."""
    fields = _fields(root, "Metadata", "the .metadata pickle", directory)
    entries = fields.get("state_dict_metadata")
    if not isinstance(entries, dict):
        raise CorruptCheckpoint(".metadata has no state_dict_metadata mapping", path=directory)
    storage = _storage_index(fields.get("storage_data"), directory)

    def entry(md: Any, fqn: str) -> tuple[str, tuple[int, ...], bool, int] | None:
        if isinstance(md, OpaqueObject) and md.cls.name == "BytesStorageMetadata":
            return None
        tensor = _fields(md, "TensorStorageMetadata", f"the entry {fqn!r}", directory)
        dtype, requires_grad = _properties(tensor.get("properties"), fqn, directory)
        shape = dims(tensor.get("size"), f"the size of {fqn!r}", directory)
        chunks = tensor.get("chunks")
        return dtype, shape, requires_grad, len(chunks) if isinstance(chunks, list) else -1

    return Metadata(entries, storage, fields.get("planner_data"), fields.get("version"), entry, fast=False)


# ---- the fast path ------------------------------------------------------------------------------

class _Uncallable(type):
    """Metaclass of the stand-ins: a pickle may instantiate them (``NEWOBJ``), never call them."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        raise Fallback


def _refuse_change(*args: Any) -> None:
    raise Fallback


class _Properties(list):
    """``TensorProperties``: its BUILD only appends the state tuple, in C (a million-entry file
    builds one per tensor); :func:`fast_metadata`'s ``entry`` checks it. ``APPEND``/``SETITEM``
    from the pickle would change what the generic path keeps apart, so they refuse."""

    __slots__ = ()
    __setstate__ = list.append
    append = extend = __setitem__ = _refuse_change


class _Tensor:
    __slots__ = ("chunks", "properties", "size")


class _Bytes:
    __slots__ = ()


class _Chunk:
    """``ChunkStorageMetadata``: the reader uses only how many a tensor has (as the generic path
    does), so BUILD does nothing, in C; its sizes were checked when ``torch.Size`` built them."""

    __slots__ = ()
    __setstate__ = staticmethod(id)


class _Index:
    __slots__ = ("chunk", "fqn")


class _Root:
    __slots__ = ("planner_data", "state_dict_metadata", "storage_data", "version")


class _Ignored:
    """``StorageMeta`` (checkpoint id, save id, modules): the reader does not use it."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        pass


_ROOT_KEYS = frozenset({"state_dict_metadata", "planner_data", "storage_data", "storage_meta", "version"})
_INDEX_KEYS = frozenset({"fqn", "offset", "index"})
_INFO_KEYS = frozenset({"relative_path", "offset", "length", "transform_descriptors"})


def _refuse(state: Any) -> None:
    raise Fallback


def _layout(name: Any) -> Any:
    if type(name) is str and len(name) <= 64:
        return name
    raise Fallback


def _memory_format(value: Any) -> Any:
    if type(value) is int:
        return value
    raise Fallback


def _path(*parts: Any) -> None:
    return None  # StorageMeta.checkpoint_id: unused (the generic path records it, opaque)


_FUNCTIONS: tuple[Any, ...] = (_layout, _memory_format, _path)
for _function in _FUNCTIONS:
    _function.__setstate__ = _refuse  # BUILD on it must not write its __dict__
del _function


def _stand_ins(emptied: list[dict[str, Any]]) -> dict[tuple[str, str], Any]:
    """``find_class``'s table for one load; ``emptied`` collects the state dicts BUILD emptied."""
    keep = emptied.append
    check_size = resolve_global("torch", "Size")  # the generic stand-in: checks, shares, raises on anything else
    shared_get = SHARED_DIMS.get

    def shape(dims: Any = ()) -> tuple[int, ...]:
        # torch.Size(dims): the stand-in's answer, with its common case (a shape seen before) inline
        if type(dims) is tuple and len(dims) <= MAX_DIMS:
            shared = shared_get(dims)
            if shared is not None:
                for value in dims:  # 1 == 1.0 == True: the types are checked (a loop is the cheapest way)
                    if type(value) is not int:
                        break
                else:
                    return shared
        return check_size(dims)

    def tensor_state(self: Any, state: Any) -> None:
        if type(state) is not dict or len(state) != 3:
            raise Fallback
        properties, size, chunks = state["properties"], state["size"], state["chunks"]  # KeyError: fallback too
        if type(properties) is not properties_cls or type(chunks) is not list or type(size) is not tuple \
                or shared_get(size) is not size:
            raise Fallback
        self.properties = properties
        self.size = size
        self.chunks = chunks
        keep(state)
        state.clear()

    # index_state and info_state: any exception (KeyError, TypeError on a state that is not a
    # dict) sends the load back too; the key set is checked by its size once the required keys
    # are found (a keys-view comparison per state cost as much as the rest)
    def index_state(self: Any, state: Any) -> None:
        fqn = state["fqn"]
        if type(state) is not dict or type(fqn) is not str or not (
                len(state) == 1 or (len(state) == 3 and "offset" in state and "index" in state)
                or state.keys() <= _INDEX_KEYS):
            raise Fallback
        offset = state.get("offset")
        if offset is None:
            offset = ()
        elif type(offset) is not tuple or shared_get(offset) is not offset:
            raise Fallback
        self.fqn = fqn
        self.chunk = offset
        keep(state)
        state.clear()

    def info_state(self: Any, state: Any) -> None:
        relative_path, offset, length = state["relative_path"], state["offset"], state["length"]
        if type(state) is not dict or type(relative_path) is not str or type(offset) is not int \
                or type(length) is not int or not (len(state) == 3 or (
                    len(state) == 4 and "transform_descriptors" in state)):
            raise Fallback
        self.relative_path = relative_path
        self.offset = offset
        self.length = length
        self.transform_descriptors = state.get("transform_descriptors")
        keep(state)
        state.clear()

    def root_state(self: Any, state: Any) -> None:
        if type(state) is not dict or not state.keys() <= _ROOT_KEYS:
            raise Fallback
        self.state_dict_metadata, self.storage_data = state.get("state_dict_metadata"), state.get("storage_data")
        self.planner_data, self.version = state.get("planner_data"), state.get("version")
        keep(state)
        state.clear()

    def make(name: str, base: type, setstate: Callable[[Any, Any], None] | None) -> type:
        namespace: dict[str, Any] = {"__slots__": ()}
        if setstate is not None:
            namespace["__setstate__"] = setstate
        return _Uncallable(name, (base,), namespace)

    properties_cls = make("TensorProperties", _Properties, None)
    classes = {
        "Metadata": make("Metadata", _Root, root_state),
        "TensorStorageMetadata": make("TensorStorageMetadata", _Tensor, tensor_state),
        "TensorProperties": properties_cls,
        "ChunkStorageMetadata": make("ChunkStorageMetadata", _Chunk, None),
        "BytesStorageMetadata": make("BytesStorageMetadata", _Bytes, None),
        "MetadataIndex": make("MetadataIndex", _Index, index_state),
        "_StorageInfo": make("_StorageInfo", Item, info_state),
        "StorageMeta": make("StorageMeta", _Ignored, None),
    }
    table: dict[tuple[str, str], Any] = {(module, name): cls for module in DCP_MODULES for name, cls in classes.items()}
    table[(DCP_MODULE, "_MEM_FORMAT_ENCODING")] = _memory_format
    table[("torch", "Size")] = shape
    table[("torch.serialization", "_get_layout")] = _layout
    for name in (*DTYPE_BITS, *DTYPE_ALIASES):
        table[("torch", name)] = DTYPE_ALIASES.get(name, name)
    for name in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"):
        table[("pathlib", name)] = _path
    return table


class _Loader(pickle.Unpickler):
    """The C unpickler over :func:`_stand_ins`; every other global sends the load back."""

    def __init__(self, data: bytes, table: dict[tuple[str, str], Any]) -> None:
        super().__init__(c_unpickler_input(data))
        self._table = table

    def find_class(self, module: str, name: str) -> Any:
        found = self._table.get((module, name))
        if found is None:
            raise Fallback
        return found


def fast_metadata(data: bytes, directory: str) -> Metadata | None:
    """``Metadata`` at C speed, or ``None`` when the generic unpickler must decide."""
    if not admitted(data):
        return None
    emptied: list[dict[str, Any]] = []
    table = _stand_ins(emptied)
    loader = _Loader(data, table)
    with gc_paused():
        try:
            root = loader.load()
        except Exception:  # every failure is decided again by the generic path
            return None
        finally:
            loader.memo = {}  # the memo's references go before the counts below
            del loader
    # A state dict BUILD emptied must not be referenced from the result or changed afterwards
    # (a legitimate pickle never names a dataclass's state dict twice): only ``emptied`` and
    # getrefcount's argument hold it.
    if emptied and (max(map(sys.getrefcount, emptied)) > 2 or any(emptied)):
        return None
    del emptied
    root_cls = table[(DCP_MODULE, "Metadata")]
    if type(root) is not root_cls:
        return None
    try:
        entries, storage_data = root.state_dict_metadata, root.storage_data
    except AttributeError:  # never built
        return None
    if type(entries) is not dict or type(storage_data) is not dict:
        return None
    storage = _fast_index(storage_data, table[(DCP_MODULE, "MetadataIndex")],
                          table[("torch.distributed.checkpoint.filesystem", "_StorageInfo")])
    if storage is None:
        return None
    if root.version is not None and type(root.version) is not str:
        return None
    tensor_cls = table[(DCP_MODULE, "TensorStorageMetadata")]
    bytes_cls = table[(DCP_MODULE, "BytesStorageMetadata")]
    known: dict[tuple[Any, ...], tuple[str, bool]] = {}  # TensorProperties states checked, by value

    def entry(md: Any, fqn: str) -> tuple[str, tuple[int, ...], bool, int] | None:
        kind = type(md)
        if kind is tensor_cls:
            try:
                properties = md.properties
                if len(properties) != 1:  # never built, or built twice: the generic path decides
                    raise Fallback
                found = known.get(properties[0])
                if found is None:
                    found = _properties_state(properties[0])
                    if len(known) < MAX_KNOWN_PROPERTIES:
                        known[properties[0]] = found
                return found[0], md.size, found[1], len(md.chunks)
            except (AttributeError, TypeError):  # never built; an unhashable state
                raise Fallback from None
        if kind is bytes_cls:
            return None
        raise Fallback

    return Metadata(entries, storage, root.planner_data, root.version, entry, fast=True)


def _properties_state(state: Any) -> tuple[str, bool]:
    """(dtype, requires_grad) of a ``TensorProperties`` state: ``(dtype, layout, requires_grad,
    memory format, pin_memory)`` (``TensorProperties.__getstate__``). Equal states give equal
    answers here and on the generic path (``bool(requires_grad)``), so they are checked once."""
    if type(state) is not tuple or len(state) != 5 or type(state[0]) is not str or state[0] not in DTYPE_BITS \
            or type(state[2]) is not bool:
        raise Fallback
    return state[0], state[2]


def _fast_index(storage_data: dict[Any, Any], index_cls: Any, info_cls: Any) -> StorageIndex | None:
    """fqn -> (chunk offset, item) from the stand-ins, or None when one is not as DCP writes it."""
    out: StorageIndex = {}
    try:
        key: Any
        info: Any
        for key, info in storage_data.items():
            if type(key) is not index_cls or type(info) is not info_cls:
                return None
            fqn = key.fqn
            if fqn in out:
                _add_chunk(out, fqn, key.chunk, info)
            else:
                out[fqn] = (key.chunk, info)
            info.offset  # noqa: B018  # built (its BUILD ran): AttributeError otherwise
    except AttributeError:
        return None
    return out
