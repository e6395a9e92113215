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
