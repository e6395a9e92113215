"""Tied weights stored once (safetensors, Hugging Face): check explains, fix writes the alias as the same tensor."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_model

from tests.cli_helpers import run_cli

MODEL = '''
from torch import nn


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(20, 8)
        self.block = nn.Linear(8, 8)
        self.lm_head = nn.Linear(8, 20, bias=False)
        self.lm_head.weight = self.wte.weight
'''


def _model(tmp_path: Path) -> tuple[str, type]:
    path = tmp_path / "tied_lm.py"
    path.write_text(MODEL)
    namespace: dict[str, object] = {}
    exec(compile(MODEL, str(path), "exec"), namespace)  # the test's own module text
    return f"{path}:TinyLM", namespace["TinyLM"]  # type: ignore[return-value]


def test_tied_weight_saved_once_is_explained_and_repaired(tmp_path: Path) -> None:
    spec, tiny_lm = _model(tmp_path)
    model = tiny_lm()
    src = tmp_path / "model.safetensors"
    save_model(model, str(src))  # keeps one name of the tied pair
    doc = run_cli("check", src, "--against", spec, "--json").json()
    assert doc["ok"] is False
    assert len(doc["missing_keys"]) == 1
    assert "tied-weight" in [f["code"] for f in doc["findings"]]
    assert doc["suggested_fix"] == ["fix", str(src), "--against", spec]
    out = tmp_path / "fixed.pt"
    fixed = run_cli(*doc["suggested_fix"], "-o", out, "--json")
    assert fixed.exit_code == 0 and len(fixed.json()["tied_aliases"]) == 1
    state = torch.load(out, weights_only=True)
    fresh = tiny_lm()
    fresh.load_state_dict(state, strict=True)
    assert state["lm_head.weight"].data_ptr() == state["wte.weight"].data_ptr()
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value)
    assert run_cli("check", out, "--against", spec).exit_code == 0


def test_tied_weight_under_a_wrapper_prefix(tmp_path: Path) -> None:
    spec, tiny_lm = _model(tmp_path)
    model = tiny_lm()
    state = {f"module.{k}": v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    torch.save(state, tmp_path / "ddp.pt")
    doc = run_cli("check", tmp_path / "ddp.pt", "--against", spec, "--json").json()
    codes = [f["code"] for f in doc["findings"]]
    assert "tied-weight" in codes and "wrapper-prefix" in codes
    out = tmp_path / "fixed.pt"
    assert run_cli("fix", tmp_path / "ddp.pt", "--against", spec, "-o", out).exit_code == 0
    tiny_lm().load_state_dict(torch.load(out, weights_only=True), strict=True)
