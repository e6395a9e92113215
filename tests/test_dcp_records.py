"""DCP records made by same-layout twins (formats/readers/dcp_records.py, dcp._DeferredTwin) are the
model's records in every respect: exact type, equal to what the constructors make, frozen, copyable,
and their byte ranges resolve to the tensors' real bytes."""

from __future__ import annotations

import copy
import dataclasses
import warnings
from pathlib import Path

import pytest
import torch

from ckptdoctor.formats import open_checkpoint
from ckptdoctor.formats.readers import dcp, dcp_records
from ckptdoctor.formats.tensor_bytes import iter_tensor_chunks
from ckptdoctor.model.checkpoint import ByteRange, StorageInfo, TensorRecord


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    import torch.distributed.checkpoint as dcp_api

    root = tmp_path_factory.mktemp("dcp") / "ckpt"
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_api.save({"model": state}, checkpoint_id=root)
    return root, state


def test_the_twins_are_in_use() -> None:
    # the import-time check found the layouts equal: records are made by the twins, not the constructors
    assert dcp_records.new_record is dcp_records._RecordTwin
    assert dcp_records.new_storage is dcp_records._StorageTwin
    assert dcp.new_deferred is dcp._DeferredTwin


def test_twin_records_equal_constructed_ones_and_stay_frozen() -> None:
    source = ByteRange("f.distcp", 64, 24)
    storage = dcp_records.new_storage("w@0", "float32", 24, source, "f.distcp@0/0")
    record = dcp_records.new_record("float32", (2, 3), (3, 1), storage, True)
    assert type(storage) is StorageInfo and type(record) is TensorRecord
    assert storage == StorageInfo("w@0", "float32", 24, "cpu", source, "f.distcp@0/0", None)
    assert record == TensorRecord("float32", (2, 3), (3, 1), 0, storage, False, True, "strided")
    assert copy.deepcopy(record) == record and dataclasses.replace(record, dtype="float16").dtype == "float16"
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.dtype = "int8"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        storage.nbytes = 0  # type: ignore[misc]


def test_dcp_records_hold_the_tensors_real_bytes(saved: tuple[Path, dict[str, torch.Tensor]]) -> None:
    root, state = saved
    ckpt = open_checkpoint(root)
    assert [t.key for t in ckpt] == list(state)
    for info in ckpt:
        tensor, source = info.tensor, info.tensor.storage.source  # type: ignore[union-attr]
        assert type(tensor) is TensorRecord and type(source) is dcp.DeferredRange
        assert (tensor.dtype, tensor.shape) == (str(state[info.key].dtype).removeprefix("torch."),
                                                tuple(state[info.key].shape))
        with pytest.raises(dataclasses.FrozenInstanceError):
            source.length = 0  # type: ignore[misc]
        assert b"".join(iter_tensor_chunks(tensor)) == state[info.key].numpy().tobytes()
