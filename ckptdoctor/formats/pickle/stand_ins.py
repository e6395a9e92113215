"""Stand-ins for the globals a checkpoint's pickle names: data, never code.

``torch.save`` pickles tensors as calls of torch's rebuild functions (torch/_utils.py) over
persistent-id storages, plus dtypes, storage classes, ``torch.Size``, ``torch.device`` and
``OrderedDict``. :func:`resolve_global` maps each such name to a stand-in here that builds a
metadata record (``TensorRecord``, a dtype name, a tuple...), and every other name to an
:class:`UnknownGlobal` the unpickler may record as data but never call. Nothing is imported.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from ckptdoctor.errors import CorruptCheckpoint
from ckptdoctor.model.checkpoint import DTYPE_ALIASES, DTYPE_BITS, GlobalRef, OpaqueObject, StorageInfo, TensorRecord

MAX_DIMS = 64

# torch's storage classes, `torch.FloatStorage` ... (torch/storage.py `_dtype_to_storage_type_map`).
STORAGE_TYPES: dict[str, str] = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool", "BFloat16Storage": "bfloat16",
    "ComplexDoubleStorage": "complex128", "ComplexFloatStorage": "complex64",
    "QInt8Storage": "qint8", "QInt32Storage": "qint32", "QUInt8Storage": "quint8",
    "QUInt4x2Storage": "quint4x2", "QUInt2x4Storage": "quint2x4",
}


class StorageType:
    """Stand-in for a storage class such as ``torch.FloatStorage`` (never imported)."""

    __slots__ = ("device", "dtype", "name")

    def __init__(self, name: str, dtype: str, device: str) -> None:
        self.name, self.dtype, self.device = name, dtype, device

    def __setstate__(self, state: Any) -> None:  # a pickle's BUILD must not rewrite it (fast_pickle)
        raise TypeError("a storage type takes no pickled state")


class DtypeRef(str):
    """A dtype named by the pickle (``torch.float32``); a str so it compares as its name."""

    __slots__ = ()


class LayoutRef(str):
    """A tensor layout or quantization scheme named by the pickle (``torch.sparse_coo``)."""

    __slots__ = ()


class UnknownGlobal(GlobalRef):
    """A global outside the allowlist. It may be referenced or instantiated as data, never called."""


# Value types that hyper-parameter dicts routinely carry. Their REDUCE calls are recorded as
# OpaqueObject(via="reduce") with the arguments as data; the constructor is never run.
RECORDED_VALUE_TYPES = frozenset({
    "pathlib.Path", "pathlib.PosixPath", "pathlib.WindowsPath", "pathlib.PurePath",
    "pathlib.PurePosixPath", "pathlib.PureWindowsPath",
    "datetime.datetime", "datetime.date", "datetime.time", "datetime.timedelta", "datetime.timezone",
    "decimal.Decimal", "fractions.Fraction", "uuid.UUID", "argparse.Namespace", "types.SimpleNamespace",
    "numpy.dtype", "numpy.ndarray", "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",
    "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
    "torch.torch_version.TorchVersion",
    # DCP's `.metadata` pickles TensorProperties' memory format as this Enum, called by value
    # (torch/distributed/checkpoint/metadata.py `TensorProperties.__getstate__`).
    "torch.distributed.checkpoint.metadata._MEM_FORMAT_ENCODING",
})

# Validated shapes and strides, shared: 200,000 tensors hold a few dozen distinct shapes, so
# records point at one tuple each instead of 400,000 copies (and a hit skips the checks).
SHARED_DIMS: dict[tuple[int, ...], tuple[int, ...]] = {}
MAXSHARED_DIMS = 1 << 16
_INT_ONLY = frozenset({int})


def _check_dims(values: Any, what: str) -> tuple[int, ...]:
    if type(values) is tuple and len(values) <= MAX_DIMS:  # never hash a hostile million-entry tuple
        try:
            shared = SHARED_DIMS.get(values)
        except TypeError:  # an unhashable element: refused below
            shared = None
        # 1 == 1.0 == True: check types (issuperset walks them without building a set)
        if shared is not None and _INT_ONLY.issuperset(map(type, values)):
            return shared
    if not isinstance(values, (tuple, list)) or len(values) > MAX_DIMS:
        raise CorruptCheckpoint(f"tensor {what} is not a short tuple of integers: {values!r:.80}")
    out = tuple(values)
    for v in out:
        if type(v) is not int or v < 0 or v > 1 << 62:
            raise CorruptCheckpoint(f"tensor {what} holds an invalid value: {v!r:.40}")
    if len(SHARED_DIMS) < MAXSHARED_DIMS:
        return SHARED_DIMS.setdefault(out, out)
    return out


class PendingStorage:
    """A storage whose bytes are located only after the pickle is read (the legacy format)."""

    __slots__ = ("dtype", "numel", "offset", "root_key")

    def __init__(self, root_key: str, dtype: str, offset: int, numel: int) -> None:
        self.root_key, self.dtype, self.offset, self.numel = root_key, dtype, offset, numel


def _storage_parts(storage: Any) -> tuple[Any, str]:
    if isinstance(storage, (StorageInfo, PendingStorage)):
        return storage, storage.dtype
    raise CorruptCheckpoint(f"a tensor refers to something that is not a storage: {type(storage).__name__}")


def _make_tensor(storage: Any, offset: Any, size: Any, stride: Any, dtype: str | None = None,
                 requires_grad: Any = False) -> TensorRecord:
    if type(storage) is StorageInfo:  # the common case, without a call: once per tensor
        info, storage_dtype = storage, storage.dtype
    else:
        info, storage_dtype = _storage_parts(storage)
    if type(offset) is not int or offset < 0:
        raise CorruptCheckpoint(f"tensor storage offset is invalid: {offset!r:.40}")
    shape = _check_dims(size, "shape")
    strides = _check_dims(stride, "stride")
    if len(shape) != len(strides):
        raise CorruptCheckpoint(f"tensor shape {shape} and stride {strides} differ in length")
    return TensorRecord(dtype or storage_dtype, shape, strides, offset, info, False, bool(requires_grad))


def contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Row-major strides for ``shape`` (used by formats that store no strides)."""
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(stride))


# ---- stand-ins for torch's rebuild functions (signatures follow torch/_utils.py) ----

def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any) -> TensorRecord:
    return _make_tensor(storage, storage_offset, size, stride)


# Validated (shape, stride) pairs, shared: torch.save's one rebuild call per tensor finds its pair
# here with one lookup instead of two _check_dims calls (a 200,000-tensor file has a few dozen).
SHARED_LAYOUTS: dict[tuple[Any, Any], tuple[tuple[int, ...], tuple[int, ...]]] = {}


def _rebuild_tensor_v2(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                       backward_hooks: Any = None, metadata: Any = None) -> TensorRecord:
    # Once per tensor (200,000 calls for a large file): torch's common case in this one frame. Short
    # tuples only are hashed (never a hostile million-entry one), and a hit still has its element
    # types checked (4.0 and True equal 4 and 1); anything else takes _make_tensor's checks.
    if (type(storage) is StorageInfo and type(size) is tuple and type(stride) is tuple
            and len(size) <= MAX_DIMS and len(stride) <= MAX_DIMS and type(storage_offset) is int
            and storage_offset >= 0 and (requires_grad is False or requires_grad is True)):
        try:
            layout = SHARED_LAYOUTS.get((size, stride))
        except TypeError:  # an unhashable element: refused by _make_tensor
            layout = None
        if layout is not None and _INT_ONLY.issuperset(map(type, size)) and _INT_ONLY.issuperset(map(type, stride)):
            return TensorRecord(storage.dtype, layout[0], layout[1], storage_offset, storage, False, requires_grad)
    record = _make_tensor(storage, storage_offset, size, stride, None, requires_grad)  # positional: per tensor
    if type(size) is tuple and type(stride) is tuple and len(SHARED_LAYOUTS) < MAXSHARED_DIMS:
        SHARED_LAYOUTS[size, stride] = (record.shape, record.stride)  # checked: ints within bounds
    return record


def _rebuild_tensor_v3(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any,
                       backward_hooks: Any, dtype: Any, metadata: Any = None) -> TensorRecord:
    return _make_tensor(storage, storage_offset, size, stride, dtype=_dtype_name(dtype),
                        requires_grad=requires_grad)


def _rebuild_parameter(data: Any, requires_grad: Any = True, backward_hooks: Any = None,
                       state: Any = None) -> TensorRecord:
    if not isinstance(data, TensorRecord):
        raise CorruptCheckpoint("a Parameter wraps something that is not a tensor")
    return replace(data, is_parameter=True, requires_grad=bool(requires_grad))


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    # Tensor subclasses and tensors with Python attributes (torch/_tensor.py). `func` is one of
    # our stand-ins (anything else was refused by find_class before it reached the stack).
    if not callable(func) or func not in STAND_INS or not isinstance(args, tuple):
        raise CorruptCheckpoint("_rebuild_from_type_v2 with an unexpected rebuild function")
    result = func(*args)
    if isinstance(result, TensorRecord) and isinstance(new_type, GlobalRef):
        if new_type.dotted in ("torch.nn.parameter.Parameter", "torch.nn.Parameter"):
            return replace(result, is_parameter=True)
        if new_type.dotted not in ("torch.Tensor", "torch._tensor.Tensor"):
            # A tensor subclass (DTensor, a quantization wrapper...): its values live in the
            # subclass's state, which a plain rebuild would lose; the layout says so.
            return replace(result, layout=f"subclass:{new_type.dotted}")
    return result


def _rebuild_meta_tensor_no_storage(dtype: Any, size: Any, stride: Any, requires_grad: Any = False) -> TensorRecord:
    return TensorRecord(dtype=_dtype_name(dtype), shape=_check_dims(size, "shape"),
                        stride=_check_dims(stride, "stride"), layout="meta", requires_grad=bool(requires_grad))


def _rebuild_wrapper_subclass(cls: Any, dtype: Any, size: Any, stride: Any, storage_offset: Any, layout: Any,
                              device: Any, requires_grad: Any) -> TensorRecord:
    return TensorRecord(dtype=_dtype_name(dtype), shape=_check_dims(size, "shape"),
                        stride=_check_dims(stride, "stride"), layout="meta", requires_grad=bool(requires_grad))


def _rebuild_device_tensor_from_cpu_tensor(data: Any, dtype: Any, device: Any, requires_grad: Any) -> Any:
    return data


def _rebuild_qtensor(storage: Any, storage_offset: Any, size: Any, stride: Any, quantizer_params: Any,
                     requires_grad: Any, backward_hooks: Any) -> TensorRecord:
    record = _make_tensor(storage, storage_offset, size, stride, requires_grad=requires_grad)
    return replace(record, layout="quantized")


def _rebuild_sparse_tensor(layout: Any, data: Any) -> OpaqueObject:
    # Recorded as the call itself, so a writer can re-emit it exactly (its parts are tensors).
    return OpaqueObject(GlobalRef("torch._utils", "_rebuild_sparse_tensor"), args=(layout, data), via="reduce")


def _rebuild_nested_tensor(buffer: Any, sizes: Any, strides: Any, storage_offsets: Any) -> OpaqueObject:
    return OpaqueObject(GlobalRef("torch._utils", "_rebuild_nested_tensor"),
                        args=(buffer, sizes, strides, storage_offsets), via="reduce")


def _torch_size(dims: Any = ()) -> tuple[int, ...]:
    return _check_dims(dims, "size")


def _torch_device(kind: Any, index: Any = None) -> str:
    if not isinstance(kind, str):
        raise CorruptCheckpoint("torch.device with a non-string type")
    return f"{kind}:{index}" if index is not None else kind


def _get_layout(name: Any) -> LayoutRef:
    # torch pickles the layout's name ("torch.strided"); anything else is not a layout (and
    # str() of an arbitrary stand-in could be as large as the pickle).
    if not isinstance(name, str) or len(name) > 64:
        raise CorruptCheckpoint(f"torch.serialization._get_layout with a non-layout argument: {name!r:.40}")
    return LayoutRef(name.replace("torch.", ""))


def _codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    # Protocol-2 pickles store bytes as _codecs.encode(str, "latin1").
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
        raise CorruptCheckpoint("_codecs.encode with unexpected arguments")
    return text.encode(encoding)


def _identity(value: Any, *_: Any) -> Any:
    return value


def _reconstructor(cls: Any, base: Any, state: Any = None) -> OpaqueObject:
    # copyreg._reconstructor is how protocols 0/1 pickle plain objects: record, never construct.
    if not isinstance(cls, GlobalRef):
        raise CorruptCheckpoint("copyreg._reconstructor with a non-class argument")
    return OpaqueObject(cls, args=(), state=None, via="reconstructor")


TORCH_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
    "torch._utils._rebuild_meta_tensor_no_storage": _rebuild_meta_tensor_no_storage,
    "torch._utils._rebuild_wrapper_subclass": _rebuild_wrapper_subclass,
    "torch._utils._rebuild_device_tensor_from_cpu_tensor": _rebuild_device_tensor_from_cpu_tensor,
    "torch._utils._rebuild_qtensor": _rebuild_qtensor,
    "torch._utils._rebuild_sparse_tensor": _rebuild_sparse_tensor,
    "torch._utils._rebuild_nested_tensor": _rebuild_nested_tensor,
    "torch.Size": _torch_size,
    "torch.device": _torch_device,
    "torch.serialization._get_layout": _get_layout,
    "_codecs.encode": _codecs_encode,
    "copyreg._reconstructor": _reconstructor,
    # TorchScript's data.pkl wraps typed lists and tagged values (torch/jit/_pickle.py).
    **{f"torch.jit._pickle.{name}": _identity for name in (
        "build_intlist", "build_tensorlist", "build_doublelist", "build_boollist", "restore_type_tag")},
}

DATA_TYPES: dict[str, Any] = {
    "collections.OrderedDict": OrderedDict,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "builtins.bytearray": bytearray,
    "builtins.complex": complex,
    "builtins.slice": slice,
}

# Membership sets for the per-call checks (a 20,000-tensor pickle makes 40,000 calls).
STAND_INS = frozenset(TORCH_FUNCTIONS.values())


def _refuse_state(state: Any) -> None:
    raise TypeError("a stand-in function takes no pickled state")


# The C unpickler's BUILD calls an object's `__setstate__` if it has one, else writes into its
# `__dict__`: a pickle must never rewrite these shared functions (fast.py), so each
# refuses. SafeUnpickler never looks this attribute up.
for _function in STAND_INS:
    _function.__setstate__ = _refuse_state  # type: ignore[attr-defined]
del _function
CALLABLE_STAND_INS = STAND_INS | frozenset(DATA_TYPES.values())

TENSOR_LAYOUTS = frozenset({"strided", "sparse_coo", "sparse_csr", "sparse_csc", "sparse_bsr", "sparse_bsc",
                            "_mkldnn", "jagged"})
_LAYOUTS = {"strided", "sparse_coo", "sparse_csr", "sparse_csc", "sparse_bsr", "sparse_bsc", "_mkldnn", "jagged",
            "per_tensor_affine", "per_channel_affine", "per_channel_affine_float_qparams",
            "per_tensor_symmetric", "per_channel_symmetric"}


def _dtype_name(value: Any) -> str:
    if isinstance(value, str) and value in DTYPE_BITS:
        return str(value)
    raise CorruptCheckpoint(f"not a dtype: {value!r:.40}")


def resolve_global(module: str, name: str) -> Any:
    """The stand-in for ``module.name``, by its Python 3 name (the unpicklers' ``find_class`` map
    ``__builtin__.set`` to ``builtins.set`` first, as refusals and allowances name it); never
    imports anything."""
    dotted = f"{module}.{name}"
    if dotted in TORCH_FUNCTIONS:
        return TORCH_FUNCTIONS[dotted]
    if dotted in DATA_TYPES:
        return DATA_TYPES[dotted]
    if module == "torch" or module.startswith("torch.cuda"):
        device = "cuda" if module.startswith("torch.cuda") else "cpu"
        if name in STORAGE_TYPES:
            return StorageType(name, STORAGE_TYPES[name], device)
        canonical = DTYPE_ALIASES.get(name, name)
        if module == "torch" and canonical in DTYPE_BITS:
            return DtypeRef(canonical)
        if module == "torch" and name in _LAYOUTS:
            return LayoutRef(name)
    if dotted in ("torch.storage.UntypedStorage", "torch.UntypedStorage", "torch.storage._UntypedStorage"):
        return StorageType("UntypedStorage", "uint8", "cpu")
    if dotted == "torch.storage.TypedStorage":
        return StorageType("TypedStorage", "uint8", "cpu")
    return UnknownGlobal(module, name)
