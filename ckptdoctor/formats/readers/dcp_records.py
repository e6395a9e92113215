"""Records for DCP's entries, made at the rate a 200,000-entry ``.metadata`` needs.

Every entry of ``.metadata`` becomes a :class:`TensorRecord` and its :class:`StorageInfo`
(400,000 frozen records for the bench's 50,000 parameters plus their Adam state). A frozen
dataclass refuses attribute stores, so its ``__init__`` sets each slot through the slot
descriptor's ``__set__``: a C call per field, about 1.4 us per record here. Each record is
instead made as a *twin*: a plain class with exactly the record's slots, whose ``__init__``
stores them at interpreter speed and then retypes the object to the record class. CPython
allows that assignment only between classes with the same layout (same base, same slots),
and the object is then indistinguishable from one the constructor made: same type, same
values, frozen from there on. It takes about half the time.

Should the model's classes gain, lose or reorder a field, the twins would no longer match; the
check at import (a twin equal to the constructor's record) then turns them off and the plain
constructors are used.
"""

from __future__ import annotations

from typing import Any

from ckptdoctor.model.checkpoint import ByteRange, StorageInfo, TensorRecord


class _RecordTwin:
    """``TensorRecord(dtype, shape, stride, 0, storage, False, requires_grad, "strided")``."""

    __slots__ = TensorRecord.__slots__

    def __init__(self, dtype: str, shape: tuple[int, ...], stride: tuple[int, ...], storage: StorageInfo,
                 requires_grad: bool) -> None:
        self.dtype = dtype
        self.shape = shape
        self.stride = stride
        self.storage_offset = 0
        self.storage = storage
        self.is_parameter = False
        self.requires_grad = requires_grad
        self.layout = "strided"
        self.__class__ = TensorRecord  # type: ignore[assignment]


class _StorageTwin:
    """``StorageInfo(id, dtype, nbytes, "cpu", source, name, None)``."""

    __slots__ = StorageInfo.__slots__

    def __init__(self, id: str, dtype: str, nbytes: int, source: ByteRange | None, name: str) -> None:
        self.id = id
        self.dtype = dtype
        self.nbytes = nbytes
        self.device = "cpu"
        self.source = source
        self.name = name
        self.crc32 = None
        self.__class__ = StorageInfo  # type: ignore[assignment]


def _plain_record(dtype: str, shape: tuple[int, ...], stride: tuple[int, ...], storage: StorageInfo,
                  requires_grad: bool) -> TensorRecord:
    return TensorRecord(dtype, shape, stride, 0, storage, False, requires_grad, "strided")


def _plain_storage(id: str, dtype: str, nbytes: int, source: ByteRange | None, name: str) -> StorageInfo:
    return StorageInfo(id, dtype, nbytes, "cpu", source, name, None)


def _twins_match() -> bool:
    """Whether the twins make exactly what the constructors make (same type, every field)."""
    try:
        storage: Any = _StorageTwin("k@0", "float32", 8, ByteRange("p", 1, 8), "f@1/0")
        record: Any = _RecordTwin("float32", (2,), (1,), storage, True)
    except TypeError:  # the layouts differ: CPython refuses the retyping
        return False
    expected = _plain_record("float32", (2,), (1,), _plain_storage("k@0", "float32", 8, ByteRange("p", 1, 8),
                                                                     "f@1/0"), True)
    return type(record) is TensorRecord and type(storage) is StorageInfo and record == expected


if _twins_match():
    new_record: Any = _RecordTwin
    new_storage: Any = _StorageTwin
else:
    new_record, new_storage = _plain_record, _plain_storage
