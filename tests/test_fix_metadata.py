"""fix carries torch's `_metadata` (module versions) over the renaming, so BatchNorm loads as torch expects."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ckptdoctor.engines.doctor import remap_metadata
from examples.seed_models import CNN
from tests.cli_helpers import run_cli


def test_remap_metadata_moves_prefixes_with_their_keys() -> None:
    wrapped = nn.DataParallel(CNN())
    state = wrapped.state_dict()
    mapping = [(k, k.removeprefix("module.")) for k in state]
    moved = remap_metadata(state._metadata, mapping)  # type: ignore[attr-defined]
    assert moved == CNN().state_dict()._metadata  # type: ignore[attr-defined]


def test_fixed_file_keeps_versions_and_old_bn_files_still_load(tmp_path: Path) -> None:
    state = nn.DataParallel(CNN()).state_dict()
    src = tmp_path / "ddp.pth"
    torch.save(state, src)
    out = tmp_path / "fixed.pth"
    assert run_cli("fix", src, "--strip", "module.", "-o", out).exit_code == 0
    loaded = torch.load(out, weights_only=True)
    assert loaded._metadata == CNN().state_dict()._metadata
    CNN().load_state_dict(loaded, strict=True)


def test_check_agrees_with_torch_on_missing_counters(tmp_path: Path) -> None:
    """Without a saved module version torch fills num_batches_tracked in; with version 2 it does not."""
    spec = "examples/seed_models.py:CNN"
    state = CNN().state_dict()
    for key in [k for k in state if k.endswith("num_batches_tracked")]:
        del state[key]
    versioned, plain = tmp_path / "versioned.pth", tmp_path / "plain.pth"
    torch.save(state, versioned)  # OrderedDict with _metadata: BatchNorm version 2
    torch.save(dict(state), plain)  # no _metadata at all, like files from before torch 0.4.1
    for path in (versioned, plain):
        try:
            CNN().load_state_dict(torch.load(path, weights_only=True), strict=True)
            torch_loads = True
        except RuntimeError:
            torch_loads = False
        result = run_cli("check", path, "--against", spec, "--json")
        assert result.json()["ok"] is torch_loads, path
    assert run_cli("check", plain, "--against", spec).exit_code == 0
    assert run_cli("check", versioned, "--against", spec).exit_code == 1
