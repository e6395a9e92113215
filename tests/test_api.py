"""The Python API: adapt() returns a state dict that loads strictly; diagnose() explains."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import ckptdoctor
from examples.seed_models import CNN, CNNWithStage


def _wrapped_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"module.{k}": v for k, v in model.state_dict().items()}


def test_adapt_in_memory_state_dict() -> None:
    src = CNN()
    target = CNN()
    adapted = ckptdoctor.adapt(_wrapped_state(src), target)
    target.load_state_dict(adapted, strict=True)
    for key, value in src.state_dict().items():
        assert torch.equal(target.state_dict()[key], value)
    assert list(adapted) == list(target.state_dict())


def test_adapt_from_path_keeps_sharing_and_values(tmp_path: Path) -> None:
    src = CNNWithStage()
    path = tmp_path / "ddp.pth"
    torch.save({"epoch": 2, "model_state_dict": _wrapped_state(src)}, path)
    target = CNNWithStage()
    adapted = ckptdoctor.adapt(path, target)
    target.load_state_dict(adapted, strict=True)
    for key, value in src.state_dict().items():
        assert torch.equal(adapted[key], value), key
    assert adapted["conv1.weight"].data_ptr() == adapted["stage1.0.weight"].data_ptr()


def test_adapt_drops_profiler_buffers_and_refuses_head_change() -> None:
    state = CNN().state_dict()
    state["fc1.total_ops"] = torch.zeros(1)
    ckptdoctor.adapt(state, CNN())  # harmless extra dropped
    head = CNN()
    head.fc2 = nn.Linear(128, 3)
    with pytest.raises(ckptdoctor.AdaptError) as info:
        ckptdoctor.adapt(CNN().state_dict(), head)
    codes = {f.code for f in info.value.diagnosis.findings}
    assert "head-size-changed" in codes


def test_diagnose_reports_the_rule() -> None:
    diagnosis = ckptdoctor.diagnose(_wrapped_state(CNN()), CNN())
    assert not diagnosis.ok
    assert [f.code for f in diagnosis.findings if f.severity == "error"] == ["wrapper-prefix"]
    assert diagnosis.plan.loads_strictly
