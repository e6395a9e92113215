"""Partially renamed files (issue 7, item 5): a rename applies to the keys that carry the old name.

torchvision renamed DenseNet's ``norm.1``/``conv.1`` children to ``norm1``/``conv1`` and ships a
load hook whose regex renames ``weight``/``bias``/``running_mean``/``running_var`` but not
``num_batches_tracked``. Files in the wild are therefore renamed in part: some blocks carry the
new names, some the old, and some modules have their stats renamed while their counter keeps the
old name. Every fixture here is a real module's ``state_dict()`` saved with ``torch.save``; the
repaired file is loaded with torch, strictly, and compared tensor by tensor.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from tests import test_matcher as tm
from tests.cli_helpers import run_cli

# The regex of torchvision.models.densenet._load_state_dict (it leaves the counters alone).
TORCHVISION_HOOK = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def _old_names(layer: nn.Module) -> None:
    """Register a DenseLayer's children under the pre-2018 names (``norm.1``...)."""
    layer._modules = {re.sub(r"^(norm|relu|conv)([12])$", r"\1.\2", n): m for n, m in layer._modules.items()}


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> str:
    d = tmp_path_factory.mktemp("models")
    source = "\n\n".join(inspect.getsource(o) for o in (tm.DenseLayer, tm.DenseNetLike))
    factory = "\n\ndef densenet():\n    return DenseNetLike()\n"
    (d / "dense.py").write_text("from torch import nn\n\n\n" + source + factory)
    return f"{d / 'dense.py'}:densenet"


def _partially_renamed(old_layers: set[str], hooked_layers: set[str]) -> dict[str, torch.Tensor]:
    """A DenseNet state dict with ``old_layers`` under old names and ``hooked_layers`` run
    through torchvision's hook regex (old names, then the regex: counters stay behind)."""
    model = tm.randomised(tm.DenseNetLike())
    for b, block in (("denseblock1", model.features.denseblock1), ("denseblock2", model.features.denseblock2)):
        for name, layer in block.named_children():
            if f"{b}.{name}" in old_layers | hooked_layers:
                _old_names(layer)
    sd = model.state_dict()
    out = type(sd)()
    for key, value in sd.items():
        hooked = any(f".{layer}." in key for layer in hooked_layers)
        out[TORCHVISION_HOOK.sub(r"\1\2", key) if hooked else key] = value
    out._metadata = sd._metadata  # type: ignore[attr-defined]
    return out


CASES = {
    # whole layers renamed, others not
    "some-blocks": ({"denseblock2.denselayer1", "denseblock2.denselayer3"}, set()),
    # the hook applied everywhere: every counter under the old name, the rest under the new
    "hook-counters": (set(), {f"denseblock{b}.denselayer{n}" for b in (1, 2) for n in (1, 2, 3)}),
    # all three at once: new names, old names, and hooked layers in one file
    "mixed": ({"denseblock1.denselayer2"}, {"denseblock2.denselayer1", "denseblock2.denselayer3"}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_partially_renamed_file_is_repaired_and_loads_strictly(case: str, spec: str, tmp_path: Path) -> None:
    old_layers, hooked_layers = CASES[case]
    sd = _partially_renamed(old_layers, hooked_layers)
    src = tmp_path / "partial.pt"
    torch.save(sd, src)

    check = run_cli("check", str(src), "--against", spec, "--json")
    assert check.exit_code == 1, check.stderr
    doc = check.json()
    codes = {f["code"] for f in doc["findings"]}
    assert "renamed-submodule" in codes
    assert not codes & {"unexpected-keys", "missing-keys", "ambiguous", "harmless-missing"}, doc["findings"]
    assert doc["suggested_fix"], doc
    # Every key a finding names as the file's is one the file holds.
    for f in doc["findings"]:
        if f["code"] == "renamed-submodule":
            for old, _ in f["evidence"]["pairs"]:
                assert any(k == old or k.startswith(old + ".") for k in sd), old

    out = tmp_path / "fixed.pt"
    fix = run_cli("fix", str(src), "--against", spec, "-o", str(out))
    assert fix.exit_code == 0, (fix.stdout, fix.stderr)

    model = tm.DenseNetLike()
    fixed = torch.load(out, weights_only=True)
    model.load_state_dict(fixed, strict=True)
    loaded = model.state_dict()
    expected = tm.randomised(tm.DenseNetLike()).state_dict()  # the same values, under the new names
    assert set(loaded) == set(expected)
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key
    assert run_cli("check", str(out), "--against", spec).exit_code == 0


def test_as_it_is_counts_what_torch_reports(spec: str, tmp_path: Path) -> None:
    """The 'as it is' line still says what load_state_dict reports for the unrepaired file."""
    sd = _partially_renamed(set(), {"denseblock1.denselayer1"})
    src = tmp_path / "partial.pt"
    torch.save(sd, src)
    model = tm.DenseNetLike()
    result = model.load_state_dict(torch.load(src, weights_only=True), strict=False)
    doc = run_cli("check", str(src), "--against", spec, "--json").json()
    assert sorted(doc["missing_keys"]) == sorted(result.missing_keys)
    assert sorted(doc["unexpected_keys"]) == sorted(result.unexpected_keys)
