"""Write an object tree as a torch.save zip archive that ``torch.load(weights_only=True)`` reads.

Two parts, both re-implementations of torch's own so that no torch import is needed:

* :class:`TreePickler` pickles the tree with protocol 2, as torch/serialization.py ``_save``
  does, emitting tensors the way ``Tensor._reduce_ex_internal`` (torch/_tensor.py) and
  ``Parameter.__reduce_ex__`` (torch/nn/parameter.py) reduce them and storages as the persistent
  ids ``_save``'s ``persistent_id`` returns.
* :class:`ZipArchiveWriter` lays the archive out like caffe2's ``PyTorchStreamWriter``
  (caffe2/serialize/inline_container.cc): every member stored uncompressed under one top-level
  folder, each member's data aligned to 64 bytes with a ``FB`` padding extra field, zip64
  end records. Storages are streamed from the source in bounded chunks.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
import zlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from ckptdoctor.errors import CorruptCheckpoint, UnsafeContent, UnsupportedFormat
from ckptdoctor.formats.magic import ZIP_LOCAL_HEADER
from ckptdoctor.formats.pickle.allowance import current as current_allowance
from ckptdoctor.formats.pickle.fast import gc_paused
from ckptdoctor.formats.pickle.stand_ins import STORAGE_TYPES, TENSOR_LAYOUTS, DtypeRef, LayoutRef, StorageType
from ckptdoctor.formats.pickle.tables import is_denied, python2_name
from ckptdoctor.formats.tensor_bytes import iter_tensor_chunks
from ckptdoctor.io.atomic import (
    CHUNK,
    EarlyWriteback,
    SourceFiles,
    copy_range,
    progress_counter,
    read_into,
    write_all,
)
from ckptdoctor.io.storage import COUNTERS, is_url
from ckptdoctor.model.checkpoint import ByteRange, GlobalRef, OpaqueObject, StorageInfo, TensorRecord, itemsize

# dtype -> typed storage class name (torch/storage.py `_dtype_to_storage_type_map`). Every other
# dtype (float8_*, uint16/32/64, bits*, complex32, int1..7 ...) has no typed storage and is saved
# with an UntypedStorage and `_rebuild_tensor_v3` (torch/_tensor.py `_reduce_ex_internal`).
TYPED_STORAGE: dict[str, str] = {dtype: name for name, dtype in STORAGE_TYPES.items()}
QUANTIZED = frozenset({"qint8", "quint8", "qint32", "quint4x2", "quint2x4"})

# -- pickle opcodes (Lib/pickle.py), protocol 2 only -------------------------------------------
PROTO, STOP, MARK = b"\x80", b".", b"("
NONE, NEWTRUE, NEWFALSE = b"N", b"\x88", b"\x89"
BININT, BININT1, BININT2, LONG1, BINFLOAT = b"J", b"K", b"M", b"\x8a", b"G"
BINUNICODE, GLOBAL, REDUCE, NEWOBJ, BUILD, BINPERSID = b"X", b"c", b"R", b"\x81", b"b", b"Q"
EMPTY_TUPLE, TUPLE, TUPLE1, TUPLE2, TUPLE3 = b")", b"t", b"\x85", b"\x86", b"\x87"
EMPTY_LIST, APPEND, APPENDS, EMPTY_DICT, SETITEM, SETITEMS = b"]", b"a", b"e", b"}", b"s", b"u"
BINPUT, LONG_BINPUT, BINGET, LONG_BINGET = b"q", b"r", b"h", b"j"
BATCH = 1000  # items per SETITEMS/APPENDS, as pickle's _batch_setitems
PERSID = TUPLE + BINPERSID
SMALL_INTS = [BININT1 + bytes((i,)) for i in range(256)]
_U32 = struct.Struct("<I").pack


class StorageTable:
    """Storages in the order the pickle first refers to them, keyed "0", "1", ... as ``_save`` does.

    Storages are identified by their :class:`StorageInfo` (same id and same bytes): every
    tensor viewing one storage refers to one archive record, so sharing and views survive.
    A record's value hash walks all its fields in Python, so a storage *object* is looked up
    by identity, and a new object is compared only with the records of the same ``id``.
    """

    def __init__(self) -> None:
        self.order: list[StorageInfo] = []
        self.dtypes: list[str] = []  # the dtype each record of ``order`` is viewed as
        self.keys: list[str] = []  # the archive key of each record of ``order``
        self._by_name: dict[Any, list[int]] = {}  # StorageInfo.id -> indices into order
        # id(object) -> (the object, kept alive so its id stays its own; index; pickled key)
        self._seen: dict[int, tuple[StorageInfo, int, bytes]] = {}

    def _add(self, storage: StorageInfo, dtype: str) -> tuple[StorageInfo, int, bytes]:
        same_name = self._by_name.get(storage.id)
        if same_name is None:  # a new id (nearly every storage): no comparison to make
            same_name = self._by_name[storage.id] = []
            index = None
        else:
            index = next((i for i in same_name if self.order[i] == storage), None)
        if index is None:
            index = len(self.order)
            self.order.append(storage)
            self.dtypes.append(dtype)
            self.keys.append(str(index))
            same_name.append(index)
        seen = self._seen[id(storage)] = (storage, index, _str_bytes(self.keys[index]))
        return seen

    def pickled_key(self, storage: StorageInfo, dtype: str) -> bytes:
        """The storage's key as the pickle's BINUNICODE opcode, registering the storage on first sight."""
        seen = self._seen.get(id(storage)) or self._add(storage, dtype)
        if self.dtypes[seen[1]] != dtype:
            # torch refuses the same ("Cannot save multiple tensors or storages that view the same
            # data as different types", torch/serialization.py `_save`).
            raise UnsupportedFormat(f"storage {storage.id!r} is viewed as both {self.dtypes[seen[1]]} and "
                                    f"{dtype}; torch.save cannot store that")
        return seen[2]


def _encode_long(value: int) -> bytes:
    # pickle.encode_long: two's complement, little-endian, shortest form.
    if value == 0:
        return b""
    data = value.to_bytes((value.bit_length() >> 3) + 1, "little", signed=True)
    if value < 0 and len(data) > 1 and data[-1] == 0xFF and data[-2] & 0x80:
        data = data[:-1]
    return data


def _int_bytes(value: int) -> bytes:
    """``value`` as protocol-2 opcodes (pickle's ``save_long``: the shortest form)."""
    if 0 <= value < 256:
        return BININT1 + bytes((value,))
    if 0 <= value < 65536:
        return BININT2 + struct.pack("<H", value)
    if -(1 << 31) <= value < (1 << 31):
        return BININT + struct.pack("<i", value)
    data = _encode_long(value)
    if len(data) > 255:
        raise UnsupportedFormat("an integer too large for a protocol-2 pickle")
    return LONG1 + bytes((len(data),)) + data


def _str_bytes(value: str) -> bytes:
    data = value.encode("utf-8", "surrogatepass")
    return BINUNICODE + _U32(len(data)) + data


class _TensorTemplate:
    """The constant byte runs of one kind of tensor record (see :meth:`TreePickler.save_tensor`).

    A record is ``head key device numel PERSID offset shape stride tail``: only the storage key,
    numel, offset, shape and stride differ between tensors of one dtype, device, parameter-ness
    and requires_grad, so those are pasted between bytes computed once.
    """

    __slots__ = ("device", "head", "itemsize", "tail")

    def __init__(self, head: bytes, device: bytes, tail: bytes, itemsize: int) -> None:
        self.head, self.device, self.tail, self.itemsize = head, device, tail, itemsize


class TreePickler:
    """Protocol-2 pickler for ckptdoctor's object tree (see the module docstring).

    Containers, opaque objects and tensors are memoized by identity, so an object the source
    pickle referenced twice (one tensor under two keys) is referenced twice here too.
    """

    def __init__(self, storages: StorageTable) -> None:
        self.storages = storages
        self.out = bytearray()
        self.memo: dict[int, int] = {}
        self.globals: dict[tuple[str, str], int] = {}
        self._alive: list[Any] = []  # keeps memoized objects alive so their ids stay unique
        self.depth = 0
        self._templates: dict[tuple[str, bool, bool, str], _TensorTemplate] = {}
        self._int_tuples: dict[tuple[int, ...], bytes] = {}  # shapes and strides repeat: encode each once

    def dump(self, obj: Any) -> bytes:
        with gc_paused():  # nothing made here is garbage; see gc_paused
            self.out += PROTO + b"\x02"
            self.save(obj)
            self.out += STOP
            return bytes(self.out)

    # -- memo ------------------------------------------------------------------------------
    def _put(self, index: int) -> None:
        self.out += BINPUT + bytes([index]) if index < 256 else LONG_BINPUT + struct.pack("<I", index)

    def _get(self, index: int) -> None:
        self.out += BINGET + bytes([index]) if index < 256 else LONG_BINGET + struct.pack("<I", index)

    def _memoize(self, obj: Any) -> None:
        index = len(self.memo) + len(self.globals)
        self.memo[id(obj)] = index
        self._alive.append(obj)
        self._put(index)

    def _memoized(self, obj: Any) -> bool:
        index = self.memo.get(id(obj))
        if index is None:
            return False
        self._get(index)
        return True

    # -- scalars ---------------------------------------------------------------------------
    def save_global(self, module: str, name: str) -> None:
        key = (module, name)
        if key in self.globals:
            self._get(self.globals[key])
            return
        if "\n" in module or "\n" in name:
            raise UnsupportedFormat(f"cannot write the global {module}.{name!r}")
        # Named as pickle's protocol 2 names it (fix_imports): the readers resolve it back.
        written_module, written_name = python2_name(module, name)
        self.out += GLOBAL + f"{written_module}\n{written_name}\n".encode()
        index = len(self.memo) + len(self.globals)
        self.globals[key] = index
        self._put(index)

    def save_int(self, value: int) -> None:
        self.out += _int_bytes(value)

    def save_str(self, value: str) -> None:
        self.out += _str_bytes(value)

    def save_bytes(self, value: bytes) -> None:
        # Protocol 2 has no bytes opcode: Python pickles bytes as _codecs.encode(text, "latin1").
        self.save_global("_codecs", "encode")
        self.save_str(value.decode("latin1"))
        self.save_str("latin1")
        self.out += TUPLE2 + REDUCE

    def save_layout(self, name: str) -> None:
        # torch.layout pickles as torch.serialization._get_layout("torch.<name>") (torch/csrc/Layout.cpp);
        # quantization schemes, also LayoutRef here, are plain globals.
        self.save_global("torch.serialization", "_get_layout")
        self.save_str(f"torch.{name}")
        self.out += TUPLE1 + REDUCE

    # -- containers ------------------------------------------------------------------------
    def save_tuple(self, values: Sequence[Any]) -> None:
        if not values:
            self.out += EMPTY_TUPLE
            return
        if len(values) <= 3:
            for v in values:
                self.save(v)
            self.out += (TUPLE1, TUPLE2, TUPLE3)[len(values) - 1]
            return
        self.out += MARK
        for v in values:
            self.save(v)
        self.out += TUPLE

    def _save_items(self, items: Sequence[tuple[Any, Any]]) -> None:
        for start in range(0, len(items), BATCH):
            batch = items[start:start + BATCH]
            if len(batch) == 1:
                self.save(batch[0][0])
                self.save(batch[0][1])
                self.out += SETITEM
                continue
            self.out += MARK
            self._save_pairs(batch)
            self.out += SETITEMS

    def _save_pairs(self, pairs: Sequence[tuple[Any, Any]]) -> None:
        """``key value`` for each pair: what ``save(k); save(v)`` emits, with the common case of
        a state dict (a text key, then a tensor of a kind already seen) pasted inline.

        That case is nearly every entry of a big checkpoint, so it costs a few dictionary
        lookups and one join per tensor; everything else takes the general path.
        """
        memo, templates, pickled_key, int_tuple = self.memo, self._templates, self.storages.pickled_key, self._int_tuple
        for k, v in pairs:
            if type(k) is str:
                data = k.encode("utf-8", "surrogatepass")
                self.out += BINUNICODE + _U32(len(data)) + data
            else:
                self.save(k)
            storage = v.storage if type(v) is TensorRecord else None
            template = None if storage is None else templates.get(
                (v.dtype, v.is_parameter, v.requires_grad, storage.device))
            if (storage is None or template is None or v.layout != "strided" or id(v) in memo
                    or storage.nbytes % template.itemsize):
                self.save(v)  # and the general path raises what needs raising
                continue
            index = len(memo) + len(self.globals)
            memo[id(v)] = index  # v stays alive: ``pairs`` holds it
            numel, offset = storage.nbytes // template.itemsize, v.storage_offset
            self.out += b"".join((
                template.head, pickled_key(storage, v.dtype), template.device,
                SMALL_INTS[numel] if numel < 256 else _int_bytes(numel), PERSID,
                SMALL_INTS[offset] if 0 <= offset < 256 else _int_bytes(offset),
                int_tuple(v.shape), int_tuple(v.stride), template.tail,
                BINPUT + bytes((index,)) if index < 256 else LONG_BINPUT + _U32(index)))

    def _save_appends(self, values: Sequence[Any]) -> None:
        for start in range(0, len(values), BATCH):
            batch = values[start:start + BATCH]
            if len(batch) == 1:
                self.save(batch[0])
                self.out += APPEND
                continue
            self.out += MARK
            for v in batch:
                self.save(v)
            self.out += APPENDS

    def save_dict(self, value: dict[Any, Any]) -> None:
        self.out += EMPTY_DICT
        self._memoize(value)
        self._save_items(list(value.items()))

    def save_ordered_dict(self, value: OrderedDict[Any, Any]) -> None:
        # OrderedDict.__reduce__: (OrderedDict, (), state, None, items). torch state dicts carry
        # `_metadata` (module versions) as an attribute, pickled as the BUILD state.
        self.save_global("collections", "OrderedDict")
        self.out += EMPTY_TUPLE + REDUCE
        self._memoize(value)
        self._save_items(list(value.items()))
        metadata = getattr(value, "_metadata", None)
        if metadata is not None:
            self.out += EMPTY_DICT
            self.save_str("_metadata")
            self.save(metadata)
            self.out += SETITEM + BUILD

    def save_list(self, value: list[Any]) -> None:
        self.out += EMPTY_LIST
        self._memoize(value)
        self._save_appends(value)

    def _save_builtin_call(self, name: str, args: tuple[Any, ...], obj: Any) -> None:
        # set/frozenset/bytearray/complex/slice reduce to builtins calls that torch's
        # weights_only unpickler allows (torch/_weights_only_unpickler.py `_get_allowed_globals`).
        self.save_global("builtins", name)
        self.save_tuple(args)
        self.out += REDUCE
        self._memoize(obj)

    # -- records ---------------------------------------------------------------------------
    def save_opaque(self, obj: OpaqueObject) -> None:
        """Re-emit an instance exactly as recorded: class, args, items, state.

        ``newobj`` and ``reconstructor`` objects become NEWOBJ (what protocol 2 writes for a
        plain instance via ``copyreg.__newobj__``); ``reduce`` objects call the class with the
        recorded args. Items and state follow in pickle's ``save_reduce`` order.
        """
        cls = obj.cls
        if cls.module == "torch" and cls.name.startswith(("sparse_tensor[", "nested_tensor")):
            raise UnsupportedFormat(f"cannot re-write a {cls.name.split('[')[0].replace('_', ' ')}; "
                                    "only strided tensors can be written")
        if is_denied(cls.module, cls.name):
            # Read as a record (allowed, never run), but written back it would run on torch.load.
            raise UnsafeContent(f"the output would keep {cls.dotted}, which runs code or reaches the "
                                "system when torch.load(weights_only=False) reads it; nothing was written",
                                hint="Write the tensors only: `fix ... --extract`, or convert to .safetensors.")
        self.save_global(cls.module, cls.name)
        self.save_tuple(obj.args)
        self.out += REDUCE if obj.via == "reduce" else NEWOBJ
        if obj.via == "reduce" and cls.dotted in (allowance := current_allowance()).names:
            allowance.written.add(cls.dotted)  # the command tells the user the output needs it too
        self._memoize(obj)
        if obj.list_items:
            self._save_appends(obj.list_items)
        if obj.items:
            self._save_items(list(obj.items.items()))
        if obj.state is not None:
            self.save(obj.state)
            self.out += BUILD

    def _save_empty_ordered_dict(self) -> None:
        # The backward_hooks argument: torch passes a fresh OrderedDict() (Note [Don't serialize hooks]).
        self.save_global("collections", "OrderedDict")
        self.out += EMPTY_TUPLE + REDUCE

    def _fragment(self, emit: Callable[[], Any]) -> bytes:
        """The bytes ``emit`` appends (memo side effects happen as if they were appended now)."""
        saved, self.out = self.out, bytearray()
        try:
            emit()
            return bytes(self.out)
        finally:
            self.out = saved

    def _tensor_template(self, dtype: str, is_parameter: bool, requires_grad: bool, device: str) -> _TensorTemplate:
        """The constant parts of a tensor record (the first call memoizes the globals it names).

        ``_rebuild_tensor_v2/v3(storage, offset, size, stride, requires_grad, OrderedDict()[, dtype])``,
        the storage being the persistent id ``('storage', type, key, location, numel)``. A Parameter
        wraps that in ``_rebuild_parameter(data, requires_grad, OrderedDict())``, its data having
        requires_grad=False, as ``Parameter.__reduce_ex__`` passes ``self.data``.
        """
        typed = TYPED_STORAGE.get(dtype)

        def head() -> None:
            if is_parameter:
                self.save_global("torch._utils", "_rebuild_parameter")
            self.save_global("torch._utils", "_rebuild_tensor_v3" if typed is None else "_rebuild_tensor_v2")
            self.out += MARK + MARK
            self.save_str("storage")
            if typed is None:
                self.save_global("torch.storage", "UntypedStorage")
            else:
                self.save_global("torch", typed)

        def tail() -> None:
            self.save_bool(requires_grad and not is_parameter)
            self._save_empty_ordered_dict()
            if typed is None:
                self.save_global("torch", dtype)
            self.out += TUPLE + REDUCE
            if is_parameter:
                self.save_bool(requires_grad)
                self._save_empty_ordered_dict()
                self.out += TUPLE3 + REDUCE

        # Parts are built in stream order, so globals memoized here get the indices a
        # record-by-record pickler would give them.
        head_bytes = self._fragment(head)
        return _TensorTemplate(head_bytes, _str_bytes(device), self._fragment(tail),
                               1 if typed is None else itemsize(dtype))

    def _int_tuple(self, values: tuple[int, ...]) -> bytes:
        encoded = self._int_tuples.get(values)
        if encoded is None:
            encoded = self._fragment(lambda: self.save_tuple(values))
            if all(type(v) is int for v in values):
                self._int_tuples[values] = encoded
        return encoded

    def save_tensor(self, tensor: TensorRecord) -> None:
        """A strided tensor as its rebuild call (:meth:`_tensor_template`), pasted from a template.

        200,000 tensors make 200,000 records that differ only in a few fields: assembling each
        from precomputed bytes instead of opcode by opcode makes the pickle ~10x cheaper.
        """
        if tensor.layout.startswith("subclass:"):
            raise UnsupportedFormat(
                f"cannot re-write a {tensor.layout.removeprefix('subclass:')} value: a tensor subclass keeps its "
                "data in its own state (a DTensor holds only this rank's shard)",
                hint="Save a full, plain state dict first (torch.distributed.checkpoint.state_dict."
                     "get_model_state_dict with full_state_dict=True), then fix that.")
        storage = tensor.storage
        if tensor.layout == "meta" or storage is None:
            self._save_meta_tensor(tensor)
            return
        if tensor.layout != "strided" or tensor.dtype in QUANTIZED:
            raise UnsupportedFormat(f"cannot re-write a {tensor.layout} {tensor.dtype} tensor; only strided "
                                    "tensors can be written",
                                    hint="Quantized, sparse and tensor-subclass (DTensor) values cannot be copied "
                                         "key by key; rename them in Python with ckptdoctor.adapt(path, model) or "
                                         "save a plain full state dict first.")
        kind = (tensor.dtype, tensor.is_parameter, tensor.requires_grad, storage.device)
        template = self._templates.get(kind)
        first = template is None
        if template is None:
            template = self._tensor_template(*kind)
        key = self.storages.pickled_key(storage, tensor.dtype)
        if storage.nbytes % template.itemsize:
            raise CorruptCheckpoint(f"storage {storage.id!r} of {storage.nbytes} bytes is not a whole "
                                    f"number of {tensor.dtype} elements")
        self.out += b"".join((template.head, key, template.device,
                              _int_bytes(storage.nbytes // template.itemsize), TUPLE + BINPERSID,
                              _int_bytes(tensor.storage_offset), self._int_tuple(tensor.shape),
                              self._int_tuple(tensor.stride), template.tail))
        self._memoize(tensor)
        if first:  # the globals are memoized now: later records refer to them
            self._templates[kind] = self._tensor_template(*kind)

    def _save_meta_tensor(self, tensor: TensorRecord) -> None:
        # Meta tensors have no storage: torch/_tensor.py reduces them to this call.
        self.save_global("torch._utils", "_rebuild_meta_tensor_no_storage")
        self.save_tuple((DtypeRef(tensor.dtype), tensor.shape, tensor.stride, tensor.requires_grad))
        self.out += REDUCE
        self._memoize(tensor)

    def save_bool(self, value: bool) -> None:
        self.out += NEWTRUE if value else NEWFALSE

    def save_float(self, value: float) -> None:
        self.out += BINFLOAT + struct.pack(">d", value)

    # -- dispatch --------------------------------------------------------------------------
    def save(self, obj: Any) -> None:
        kind = type(obj)
        if kind is str:  # state-dict keys and tensors: most of a checkpoint, neither nests
            self.out += _str_bytes(obj)
            return
        if kind is TensorRecord:
            index = self.memo.get(id(obj))
            if index is None:
                self.save_tensor(obj)
            else:
                self._get(index)
            return
        self.depth += 1
        if self.depth > 500:
            raise UnsupportedFormat("the object tree nests too deeply to write")
        try:
            self._dispatch(obj)
        finally:
            self.depth -= 1

    def _dispatch(self, obj: Any) -> None:
        kind = type(obj)
        if obj is None:
            self.out += NONE
        elif kind is bool:
            self.save_bool(obj)
        elif kind is int:
            self.save_int(obj)
        elif kind is float:
            self.save_float(obj)
        elif kind is str:
            self.save_str(obj)
        elif kind is bytes:
            self.save_bytes(obj)
        elif kind is tuple:
            self.save_tuple(obj)
        elif isinstance(obj, LayoutRef) and str(obj) in TENSOR_LAYOUTS:
            self.save_layout(str(obj))
        elif isinstance(obj, (DtypeRef, LayoutRef)):
            self.save_global("torch", str(obj))
        elif isinstance(obj, StorageType):
            module = "torch.storage" if obj.name in ("UntypedStorage", "TypedStorage") else (
                "torch.cuda" if obj.device == "cuda" else "torch")
            self.save_global(module, obj.name)
        elif isinstance(obj, GlobalRef):
            self.save_global(obj.module, obj.name)
        elif self._memoized(obj):
            return
        else:
            self._dispatch_object(obj)

    def _dispatch_object(self, obj: Any) -> None:
        if isinstance(obj, TensorRecord):
            self.save_tensor(obj)
        elif isinstance(obj, OpaqueObject):
            self.save_opaque(obj)
        elif isinstance(obj, OrderedDict):
            self.save_ordered_dict(obj)
        elif isinstance(obj, dict):
            self.save_dict(obj)
        elif isinstance(obj, list):
            self.save_list(obj)
        elif isinstance(obj, (set, frozenset)):
            self._save_builtin_call(type(obj).__name__, (list(obj),), obj)
        elif isinstance(obj, bytearray):
            self._save_builtin_call("bytearray", (bytes(obj),), obj)
        elif isinstance(obj, complex):
            self._save_builtin_call("complex", (obj.real, obj.imag), obj)
        elif isinstance(obj, slice):
            self._save_builtin_call("slice", (obj.start, obj.stop, obj.step), obj)
        elif isinstance(obj, str):  # str subclasses the reader made (none expected): as plain text
            self.save_str(str(obj))
        elif isinstance(obj, int):
            self.save_int(int(obj))
        elif isinstance(obj, float):
            self.save_float(float(obj))
        else:
            raise UnsupportedFormat(f"cannot write a value of type {type(obj).__name__}")


# -- zip layout (caffe2/serialize/inline_container.cc, miniz) ----------------------------------
ALIGNMENT = 64  # torch.serialization._get_storage_alignment(); storages can be mmapped in place
LOCAL = struct.Struct("<4sHHHHHIIIHH")
CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")
ZIP64_END = struct.Struct("<4sQHHIIQQQQ")
ZIP64_LOCATOR = struct.Struct("<4sIQI")
END = struct.Struct("<4sHHHHIIH")
U32_MAX = 0xFFFFFFFF
UTF8_FLAG = 0x0800
CRC_FIELD = 14  # offset of the CRC-32 in a local header
CRC_SIZE = struct.Struct("<IQ")
PENDING = 1 << 20  # small records are gathered into writes of about this size
SMALL_STORAGE = 64 << 10  # storages up to this size are read into memory, not copied by the kernel
# The "FB" extra field for each padding length: 200,000 small records share these 64 byte strings.
FB_FIELDS = [b"FB" + struct.pack("<H", pad) + b"Z" * pad for pad in range(ALIGNMENT)]


def archive_name(out: str) -> str:
    """The archive's top-level folder: OUT's name up to its first dot, as ``PyTorchStreamWriter``
    does, restricted to characters every zip tool accepts."""
    stem = os.path.basename(out).split(".", 1)[0]
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", stem)
    return stem or "archive"


class ZipArchiveWriter:
    """Appends stored (uncompressed) members to ``fd``, data aligned to 64 bytes, then the directory.

    Sizes are known before a member is written; its CRC-32 is computed while streaming and
    patched into the local header afterwards (``os.pwrite``), so nothing is buffered.
    """

    def __init__(self, fd: int, prefix: str) -> None:
        self.fd = fd
        self.prefix = prefix
        self.pos = 0
        # Where the archive starts in the file: 0, or further on when it is one record of a
        # container (a DCP ``.distcp`` file holds one torch.save archive per tensor).
        self.base = os.lseek(fd, 0, os.SEEK_CUR)
        self.entries: list[tuple[bytes, int, int, int]] = []  # (name, crc, size, header offset)
        self.writeback = EarlyWriteback(fd)
        self.pending = bytearray()  # small records not yet written: one write per ~PENDING bytes

    def _local_header(self, name: bytes, size: int, crc: int = 0) -> bytes:
        zip64 = size >= U32_MAX
        if not zip64:  # nearly every record: the padding field is one of FB_FIELDS
            pad = -(self.pos + LOCAL.size + len(name) + 4) % ALIGNMENT
            return LOCAL.pack(ZIP_LOCAL_HEADER, 20, UTF8_FLAG, 0, 0, 0, crc, size, size, len(name),
                              4 + pad) + name + FB_FIELDS[pad]
        extra = struct.pack("<HHQQ", 1, 16, size, size) if zip64 else b""
        # The "FB" field pads the header so the data starts on a 64-byte boundary (getPadding()).
        start = self.pos + LOCAL.size + len(name) + len(extra) + 4
        pad = -start % ALIGNMENT
        extra += b"FB" + struct.pack("<H", pad) + b"Z" * pad
        stored = U32_MAX if zip64 else size
        header = LOCAL.pack(ZIP_LOCAL_HEADER, 45 if zip64 else 20, UTF8_FLAG, 0, 0, 0, crc, stored, stored,
                            len(name), len(extra))
        return header + name + extra

    def _flush(self) -> None:
        if self.pending:
            write_all(self.fd, self.pending)
            self.pending.clear()
        self.writeback.advance(self.pos)

    def _begin(self, member: str, size: int) -> tuple[bytes, int]:
        self._flush()
        name = f"{self.prefix}/{member}".encode()
        offset = self.pos
        header = self._local_header(name, size)
        write_all(self.fd, header)
        self.pos += len(header)
        return name, offset

    def _end(self, name: bytes, offset: int, crc: int, size: int) -> None:
        os.pwrite(self.fd, struct.pack("<I", crc), self.base + offset + CRC_FIELD)
        self._record(name, offset, crc, size)
        self.writeback.advance(self.pos)

    def _record(self, name: bytes, offset: int, crc: int, size: int) -> None:
        self.entries.append((name, crc, size, offset))
        self.pos += size

    def add_bytes(self, member: str, data: bytes | memoryview) -> None:
        """A record whose bytes are in memory: its CRC goes into the header, small ones are batched."""
        name = f"{self.prefix}/{member}".encode()
        offset, crc = self.pos, zlib.crc32(data)
        header = self._local_header(name, len(data), crc)
        self.pos += len(header)
        if len(data) < PENDING:
            self.pending += header
            self.pending += data
            if len(self.pending) >= PENDING:
                self._flush()
        else:
            self._flush()
            write_all(self.fd, header)
            write_all(self.fd, data)
        self._record(name, offset, crc, len(data))

    def add_copy(self, member: str, sources: SourceFiles, storage: StorageInfo, copy: StorageCopy) -> None:
        """A ``data/<key>`` record: the storage's bytes streamed from the source file."""
        name, offset = self._begin(member, storage.nbytes)
        crc = 0
        if storage.nbytes:
            source = storage.source
            if source is None:
                raise UnsupportedFormat(f"storage {storage.id!r} has no data in the file (a meta storage)")
            crc = copy(sources, storage, self.fd)
        self._end(name, offset, crc, storage.nbytes)

    def serialization_id(self) -> str:
        # torch writes a 40-digit id into `.data/serialization_id`; derived from the content here
        # (not random) so writing the same checkpoint twice gives identical bytes.
        digest = hashlib.blake2b(b"".join(CRC_SIZE.pack(crc, size) for _, crc, size, _ in self.entries),
                                 digest_size=16)
        return str(int.from_bytes(digest.digest(), "little")).zfill(40)

    def _central_entry(self, name: bytes, crc: int, size: int, offset: int) -> bytes:
        if size < U32_MAX and offset < U32_MAX:  # no zip64 field: nearly every entry, so packed directly
            return CENTRAL.pack(b"PK\x01\x02", 20, 20, UTF8_FLAG, 0, 0, 0, crc, size, size, len(name), 0, 0, 0, 0, 0,
                                offset) + name
        fields = [v for v in (size, size) if v >= U32_MAX] + ([offset] if offset >= U32_MAX else [])
        extra = struct.pack(f"<HH{len(fields)}Q", 1, 8 * len(fields), *fields) if fields else b""
        version = 45 if fields else 20
        return CENTRAL.pack(b"PK\x01\x02", version, version, UTF8_FLAG, 0, 0, 0, crc, min(size, U32_MAX),
                            min(size, U32_MAX), len(name), len(extra), 0, 0, 0, 0,
                            min(offset, U32_MAX)) + name + extra

    def finish(self) -> int:
        """Write the central directory and the (zip64) end records; return the archive size."""
        directory = b"".join(self._central_entry(*entry) for entry in self.entries)
        start, count = self.pos, len(self.entries)
        end64 = self.pos + len(directory)
        tail = ZIP64_END.pack(b"PK\x06\x06", 44, 45, 45, 0, 0, count, count, len(directory), start)
        tail += ZIP64_LOCATOR.pack(b"PK\x06\x07", 0, end64, 1)
        tail += END.pack(b"PK\x05\x06", 0, 0, min(count, 0xFFFF), min(count, 0xFFFF),
                         min(len(directory), U32_MAX), min(start, U32_MAX), 0)
        self._flush()
        write_all(self.fd, directory + tail)
        self.pos += len(directory) + len(tail)
        return self.pos


StorageCopy = Callable[[SourceFiles, StorageInfo, int], int]


def recorded_crc(storage: StorageInfo) -> int | None:
    """The CRC-32 the source archive lists for a storage copied byte for byte, or None (compute it).

    A whole member of a torch zip (or of a DCP item's archive) is copied as it is, so the CRC its
    archive recorded for it is the CRC of what is written: no need to read the bytes again. Only
    a CRC the reader parsed for exactly these bytes counts (``source.length == nbytes``; a view
    into a larger member has none), and never 0: ``torch.serialization.set_crc32_options(False)``
    makes torch.save record 0 for every member (torch.load does not check), and copying that
    would write a wrong CRC. (A nonempty record whose true CRC is 0 is merely checksummed.)
    """
    source = storage.source
    if source is None or source.length != storage.nbytes or not storage.nbytes:
        return None
    crc = storage.crc32 if storage.crc32 is not None else source.recorded_crc32()
    return crc or None


def _swapping_copy(dtype: str, progress: Callable[[int], None] | None) -> StorageCopy:
    """Copy a big-endian storage as little-endian: swap each element of the dtype it is viewed as."""
    def copy(sources: SourceFiles, storage: StorageInfo, fd: int) -> int:
        flat = TensorRecord(dtype=dtype, shape=(storage.nbytes // itemsize(dtype),), stride=(1,), storage=storage)
        crc = 0
        for chunk in iter_tensor_chunks(flat, CHUNK, byteorder="big", progress=progress):
            crc = zlib.crc32(chunk, crc)
            write_all(fd, chunk)
        return crc
    return copy


class _SourceWindow:
    """Small storages read from their source through one window: a torch zip lays its records
    out one after the other, so 200,000 small storages cost a few dozen reads, not 200,000.

    A window spans only the run of small storages that follow one another in the source
    (``read``'s ``end``), so a small bias between two large weights costs its own bytes only.
    """

    SIZE = 4 << 20

    def __init__(self, sources: SourceFiles) -> None:
        self.sources = sources
        self.path, self.start, self.data = "", 0, b""

    def covers(self, path: str, offset: int, length: int) -> bool:
        return path == self.path and self.start <= offset and offset + length <= self.start + len(self.data)

    def read(self, path: str, offset: int, length: int, end: int) -> bytes | memoryview:
        """``length`` bytes at ``offset``; on a miss the window is refilled with ``offset..end``."""
        if not self.covers(path, offset, length):
            self.path, self.start = path, offset
            self.data = os.pread(self.sources.fd(path), max(length, end - offset), offset)
            COUNTERS.read(len(self.data))
            if len(self.data) < length:  # truncated source: the exact read says where
                buffer = bytearray(length)
                read_into(self.sources, path, offset, memoryview(buffer))
                self.data = bytes(buffer)
        at = offset - self.start
        return memoryview(self.data)[at:at + length]


@lru_cache(maxsize=64)
def _remote(path: str) -> bool:
    """``is_url``, asked once per source file rather than once per storage."""
    return is_url(path)


def _small_source(storage: StorageInfo) -> ByteRange | None:
    """Where a storage small enough to be read into memory lies, or None (copied by the kernel)."""
    source = storage.source
    if source is None or not 0 < storage.nbytes <= SMALL_STORAGE or _remote(source.path):
        return None
    return source


def _run_end(storages: Sequence[StorageInfo], first: int) -> int:
    """Where the run of small storages from ``storages[first]`` ends in its source file: the
    storages that follow it, in order, in the same file, within one window."""
    source = _small_source(storages[first])
    assert source is not None
    end = source.offset + storages[first].nbytes
    for storage in storages[first + 1:first + 4096]:
        after = _small_source(storage)
        if after is None or after.path != source.path or not end <= after.offset <= source.offset + _SourceWindow.SIZE:
            break
        end = max(end, after.offset + storage.nbytes)
    return end


@dataclass(frozen=True)
class WrittenArchive:
    """What :func:`write_torch_archive` wrote: enough to read the archive back and check it."""

    size: int  # bytes of the archive
    storages: list[StorageInfo]  # the storages written, in key order
    prefix: str  # the archive's top-level folder
    base: int  # where the archive starts in the file
    entries: list[tuple[bytes, int, int, int]]  # (name, crc, size, header offset) of every record


def write_torch_zip(fd: int, out: str, root: Any, *, byteorder: str = "little",
                    progress: Callable[[int, int], None] | None = None,
                    storage_copy: Callable[[StorageInfo], StorageCopy | None] | None = None
                    ) -> tuple[int, list[StorageInfo]]:
    """Write ``root`` as a torch.save archive to ``fd``; return (file size, storages written)."""
    written = write_torch_archive(fd, out, root, byteorder=byteorder, progress=progress, storage_copy=storage_copy)
    return written.size, written.storages


def write_torch_archive(fd: int, out: str, root: Any, *, byteorder: str = "little",
                        progress: Callable[[int, int], None] | None = None,
                        storage_copy: Callable[[StorageInfo], StorageCopy | None] | None = None
                        ) -> WrittenArchive:
    """Write ``root`` as a torch.save archive to ``fd``.

    Records in ``_save``'s order: ``data.pkl``, ``.format_version``, ``.storage_alignment``,
    ``byteorder``, ``data/<key>`` per storage, then ``version`` and ``.data/serialization_id``
    (``PyTorchStreamWriter::writeEndOfFile``). The output is always little-endian; storages
    of a big-endian source are byte-swapped element by element. ``storage_copy(storage)`` may
    supply the copier of a storage whose bytes are not its source's bytes (``convert --dtype``
    casts); such a copier returns the CRC-32 of what it wrote.
    """

    with gc_paused():  # 200,000 records allocate millions of objects, none of them garbage
        return _write_torch_zip(fd, out, root, byteorder, progress, storage_copy)


def _write_torch_zip(fd: int, out: str, root: Any, byteorder: str, progress: Callable[[int, int], None] | None,
                     storage_copy: Callable[[StorageInfo], StorageCopy | None] | None) -> WrittenArchive:
    table = StorageTable()
    pickle_bytes = TreePickler(table).dump(root)
    step = progress_counter(progress, sum(s.nbytes for s in table.order))
    archive = ZipArchiveWriter(fd, archive_name(out))
    archive.add_bytes("data.pkl", pickle_bytes)
    archive.add_bytes(".format_version", b"1")
    archive.add_bytes(".storage_alignment", str(ALIGNMENT).encode())
    archive.add_bytes("byteorder", b"little")
    with SourceFiles() as sources, ThreadPoolExecutor(max_workers=1) as pool:
        def exact(sources: SourceFiles, storage: StorageInfo, fd: int) -> int:
            assert storage.source is not None
            known = recorded_crc(storage)
            crc = copy_range(sources, storage.source.path, storage.source.offset, storage.nbytes, fd,
                             with_crc=known is None, progress=step, pool=pool)
            return crc if known is None else known

        window = _SourceWindow(sources)
        for index, (storage, key, dtype) in enumerate(zip(table.order, table.keys, table.dtypes)):
            own = storage_copy(storage) if storage_copy is not None else None
            source = _small_source(storage)
            if own is None and byteorder != "big" and source is not None:
                end = 0 if window.covers(source.path, source.offset, storage.nbytes) else _run_end(table.order, index)
                archive.add_bytes(f"data/{key}", window.read(source.path, source.offset, storage.nbytes, end))
                if step:
                    step(storage.nbytes)
                continue
            copy = own or (_swapping_copy(dtype, step) if byteorder == "big" else exact)
            archive.add_copy(f"data/{key}", sources, storage, copy)
    archive.add_bytes("version", b"3\n")
    archive.add_bytes(".data/serialization_id", archive.serialization_id().encode())
    size = archive.finish()
    return WrittenArchive(size, table.order, archive.prefix, archive.base, archive.entries)
