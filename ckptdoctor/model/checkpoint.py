"""The checkpoint model every reader returns and every engine consumes.

A checkpoint is an *object tree* (what ``torch.load`` would return, but made of plain data:
dicts, lists, numbers, strings and the records below) plus the location of its state dict
inside that tree. Tensors are :class:`TensorRecord` leaves carrying only metadata: dtype,
shape, stride, storage offset and a :class:`StorageInfo` that says where the bytes lie.
No tensor bytes are ever read to build this model (see design.md, "Metadata never touches
tensor bytes"); engines that need values read them through ``ckptdoctor.formats.tensor_bytes``.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, cast

# Element sizes in bits for every dtype torch knows, by torch's name without the `torch.` prefix.
# Sub-byte dtypes (uint1..7, int1..7, bits1x8 ...) are stored packed by the user; torch itself
# gives them an element size of 1 byte, as does float4_e2m1fn_x2 (two values per byte).
DTYPE_BITS: dict[str, int] = {
    "float64": 64, "float32": 32, "float16": 16, "bfloat16": 16,
    "complex128": 128, "complex64": 64, "complex32": 32,
    "int64": 64, "int32": 32, "int16": 16, "int8": 8,
    "uint64": 64, "uint32": 32, "uint16": 16, "uint8": 8, "bool": 8,
    "qint8": 8, "quint8": 8, "qint32": 32, "quint4x2": 8, "quint2x4": 8,
    "float8_e5m2": 8, "float8_e4m3fn": 8, "float8_e5m2fnuz": 8, "float8_e4m3fnuz": 8,
    "float8_e8m0fnu": 8, "float4_e2m1fn_x2": 8,
    "bits1x8": 8, "bits2x4": 8, "bits4x2": 8, "bits8": 8, "bits16": 16,
    **{f"uint{n}": 8 for n in range(1, 8)},
    **{f"int{n}": 8 for n in range(1, 8)},
}

# Aliases torch accepts for the same dtype (torch.float is torch.float32, ...).
DTYPE_ALIASES: dict[str, str] = {
    "float": "float32", "double": "float64", "half": "float16", "long": "int64", "int": "int32",
    "short": "int16", "cfloat": "complex64", "cdouble": "complex128", "chalf": "complex32",
}


def itemsize(dtype: str) -> int:
    """Bytes per element of ``dtype`` as torch stores it."""
    return DTYPE_BITS[dtype] // 8


@dataclass(frozen=True, slots=True, init=False)
class ByteRange:
    """Where a storage's bytes lie: ``length`` bytes from ``offset`` in the file ``path``."""

    path: str
    offset: int
    length: int
    # True when `offset` is found only on first use (DCP items): metadata views skip it.
    deferred: ClassVar[bool] = False

    def __init__(self, path: str, offset: int, length: int) -> None:
        # One per storage (200,000 in a large file): slots set directly, as in StorageInfo.
        _b_path(self, path)
        _b_offset(self, offset)
        _b_length(self, length)

    def recorded_crc32(self) -> int | None:
        """The CRC-32 the container lists for exactly these bytes when it is found only with the
        offset (DCP items); None here. Formats that know it up front set ``StorageInfo.crc32``."""
        return None


@dataclass(frozen=True, slots=True, init=False)
class StorageInfo:
    """One storage (a flat buffer several tensors may view).

    ``id`` is unique within a checkpoint; tensors sharing storage (tied weights, views) have
    the same ``id``. ``source`` is ``None`` when the bytes are not in the file (meta tensors).
    """

    id: str
    dtype: str
    nbytes: int
    device: str = "cpu"
    source: ByteRange | None = None
    name: str = ""  # the name the format gives it (zip record key, safetensors tensor name...)
    crc32: int | None = None  # the archive's CRC-32 of exactly these bytes, when the format records one

    def __init__(self, id: str, dtype: str, nbytes: int, device: str = "cpu",
                 source: ByteRange | None = None, name: str = "", crc32: int | None = None) -> None:
        # Slots set directly: the generated frozen __init__ costs twice as much (see _slot_setters).
        _s_id(self, id)
        _s_dtype(self, dtype)
        _s_nbytes(self, nbytes)
        _s_device(self, device)
        _s_source(self, source)
        _s_name(self, name)
        _s_crc32(self, crc32)

    # Like TensorRecord: a pickle's BUILD must never rewrite it.
    def __setstate__(self, state: Any) -> None:
        raise TypeError("a StorageInfo takes no pickled state")

    def __reduce__(self) -> tuple[Any, ...]:
        return (StorageInfo, (self.id, self.dtype, self.nbytes, self.device, self.source, self.name, self.crc32))


@dataclass(frozen=True, slots=True, init=False)
class TensorRecord:
    """A tensor as metadata: everything ``torch.load`` would know about it except the values.

    Slotted (a 200,000-tensor checkpoint holds 200,000 of these): no per-record ``__dict__``.
    """

    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int = 0
    storage: StorageInfo | None = None
    is_parameter: bool = False
    requires_grad: bool = False
    layout: str = "strided"  # "strided", "sparse_coo", "quantized", "meta", "nested", ...

    def __init__(self, dtype: str, shape: tuple[int, ...], stride: tuple[int, ...], storage_offset: int = 0,
                 storage: StorageInfo | None = None, is_parameter: bool = False, requires_grad: bool = False,
                 layout: str = "strided") -> None:
        _r_dtype(self, dtype)
        _r_shape(self, shape)
        _r_stride(self, stride)
        _r_storage_offset(self, storage_offset)
        _r_storage(self, storage)
        _r_is_parameter(self, is_parameter)
        _r_requires_grad(self, requires_grad)
        _r_layout(self, layout)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * (DTYPE_BITS[self.dtype] // 8)

    # A pickle's BUILD must never rewrite a record (the C unpickler would call __setstate__,
    # see formats/pickle/fast.py); copies and pickles of records go through __reduce__.
    def __setstate__(self, state: Any) -> None:
        raise TypeError("a TensorRecord takes no pickled state")

    def __reduce__(self) -> tuple[Any, ...]:
        return (TensorRecord, (self.dtype, self.shape, self.stride, self.storage_offset, self.storage,
                               self.is_parameter, self.requires_grad, self.layout))

    @property
    def device(self) -> str:
        return self.storage.device if self.storage else "meta"

    def is_contiguous(self) -> bool:
        """True when the elements are laid out densely in row-major order."""
        expected = 1
        for size, stride in zip(reversed(self.shape), reversed(self.stride)):
            if size != 1 and stride != expected:
                return False
            expected *= size
        return True

    def view_identity(self) -> tuple[Any, ...] | None:
        """What makes two records the same tensor (tied weights: one view of one storage under
        two keys): storage, offset, shape, stride, dtype. None without a storage (meta tensors)."""
        if self.storage is None:
            return None
        return (self.storage.id, self.storage_offset, self.shape, self.stride, self.dtype)

    def byte_span(self) -> tuple[int, int]:
        """(first byte, one past last byte) this view touches inside its storage."""
        size = DTYPE_BITS[self.dtype] // 8
        if math.prod(self.shape) == 0:
            return (self.storage_offset * size, self.storage_offset * size)
        # sum((n - 1) * s) over the dimensions, in C: sum(n * s) - sum(s)
        last = self.storage_offset + sum(map(operator.mul, self.shape, self.stride)) - sum(self.stride)
        return (self.storage_offset * size, (last + 1) * size)


@dataclass(frozen=True, slots=True, init=False)
class TensorInfo:
    """A state-dict entry: its key plus the tensor record."""

    key: str
    tensor: TensorRecord

    def __init__(self, key: str, tensor: TensorRecord) -> None:
        _i_key(self, key)
        _i_tensor(self, tensor)

    # Convenience views so engines can treat TensorInfo like the record.
    @property
    def dtype(self) -> str:
        return self.tensor.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.tensor.shape

    @property
    def numel(self) -> int:
        return self.tensor.numel

    @property
    def nbytes(self) -> int:
        return self.tensor.nbytes

    @property
    def storage_id(self) -> str | None:
        return self.tensor.storage.id if self.tensor.storage else None


def _slot_setters(cls: type) -> tuple[Any, ...]:
    """The slot descriptors' setters of a frozen slotted dataclass, in field order.

    A reader makes three records per tensor (200,000 tensors: 600,000 records). The ``__init__``
    dataclasses generate for frozen classes goes through ``object.__setattr__`` by name for every
    field, twice the cost of these setters; the records stay frozen (assignment still raises).
    """
    return tuple(cls.__dict__[f.name].__set__ for f in fields(cls))


(_b_path, _b_offset, _b_length) = _slot_setters(ByteRange)
(_s_id, _s_dtype, _s_nbytes, _s_device, _s_source, _s_name, _s_crc32) = _slot_setters(StorageInfo)
(_r_dtype, _r_shape, _r_stride, _r_storage_offset, _r_storage, _r_is_parameter, _r_requires_grad,
 _r_layout) = _slot_setters(TensorRecord)
(_i_key, _i_tensor) = _slot_setters(TensorInfo)


@dataclass(frozen=True)
class GlobalRef:
    """A global the pickle names (``module.qualname``) that was recorded, never imported."""

    module: str
    name: str

    @property
    def dotted(self) -> str:
        return f"{self.module}.{self.name}"


# Shared read-only empties: most opaque objects (DCP's 1,000,000 dataclass records) never get
# SETITEM/APPEND, so they need no dict and list of their own; the methods below make them on demand.
class _SharedEmptyDict(dict[Any, Any]):
    """The one empty ``items`` all opaque objects share until they get their own: read-only."""

    __slots__ = ()

    def __hash__(self) -> int:  # type: ignore[override]  # dataclasses refuse unhashable defaults
        return 0

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("the shared empty items of an OpaqueObject cannot change; use obj[key] = value")

    __setitem__ = __delitem__ = update = setdefault = pop = popitem = clear = __ior__ = _refuse


_NO_ITEMS: dict[Any, Any] = _SharedEmptyDict()
_NO_LIST_ITEMS: list[Any] = cast("list[Any]", ())


@dataclass(eq=False, slots=True)
class OpaqueObject:
    """An instance of a class ckptdoctor did not import: class name plus its state as data.

    Compared and hashed by identity (``eq=False``), like the plain objects it stands for, so it
    can be a dict key: DCP's ``.metadata`` keys ``storage_data`` by frozen ``MetadataIndex``
    dataclasses (torch/distributed/checkpoint/metadata.py).

    Made when a pickle instantiates an unknown class without calling anything else
    (NEWOBJ + BUILD, or ``copyreg._reconstructor``), as ``torch.save(model)``, argparse
    Namespaces and Lightning's AttributeDict do. ``items``/``list_items`` hold what
    SETITEM(S)/APPEND(S) put into dict or list subclasses.
    """

    cls: GlobalRef
    args: tuple[Any, ...] = ()
    state: Any = None
    items: dict[Any, Any] = _NO_ITEMS
    list_items: list[Any] = _NO_LIST_ITEMS
    via: str = "newobj"  # "newobj", "reconstructor" or "reduce" (allowed constructor call)

    # Pickle's SETITEM(S)/APPEND(S) call these on whatever object is on the stack.
    def __setitem__(self, key: Any, value: Any) -> None:
        if self.items is _NO_ITEMS:
            self.items = {}
        self.items[key] = value

    def append(self, value: Any) -> None:
        if self.list_items is _NO_LIST_ITEMS:
            self.list_items = []
        self.list_items.append(value)

    def extend(self, values: Any) -> None:
        if self.list_items is _NO_LIST_ITEMS:
            self.list_items = []
        self.list_items.extend(values)

    # BUILD records the state (the C unpickler calls this; SafeUnpickler.load_build does the same).
    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __reduce__(self) -> tuple[Any, ...]:
        return (_opaque, (self.cls, self.args, self.state, self.items, self.list_items, self.via))

    def state_dict_view(self) -> Mapping[str, Any]:
        """Attributes of the object, whether pickled as a dict state or (dict, slots) pair."""
        state = self.state
        if isinstance(state, tuple) and len(state) == 2:
            merged: dict[str, Any] = {}
            for part in state:
                if isinstance(part, dict):
                    merged.update(part)
            return merged
        return state if isinstance(state, dict) else {}


def _opaque(cls: GlobalRef, args: tuple[Any, ...], state: Any, items: dict[Any, Any], list_items: list[Any],
            via: str) -> OpaqueObject:
    return OpaqueObject(cls, args, state, items, list_items, via)


@dataclass(frozen=True)
class Checkpoint:
    """A read checkpoint: the object tree, where the state dict sits, and its tensors in order.

    ``tensors`` are the state dict's entries in file order, keyed by state-dict key.
    ``state_dict_path`` lists the keys from the root to the state dict (``()`` when the
    root is the state dict). ``extra`` holds format-level facts for display
    (safetensors ``__metadata__``, TorchScript, DCP planner info, byte order...).
    """

    path: str
    format: str
    file_size: int
    root: Any
    state_dict_path: tuple[str, ...]
    tensors: tuple[TensorInfo, ...]
    extra: Mapping[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    # State-dict keys whose values are not plain tensors (``_extra_state``, quantized packed
    # parameters, sparse tensors): torch's strict load counts them as keys too.
    extra_keys: tuple[str, ...] = ()

    def __iter__(self) -> Iterator[TensorInfo]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def keys(self) -> list[str]:
        return [t.key for t in self.tensors]

    def by_key(self) -> dict[str, TensorInfo]:
        return {t.key: t for t in self.tensors}

    @property
    def parameter_count(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)
