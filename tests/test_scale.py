"""200,000 entries (issue 8): what ckptdoctor reads equals what torch reads. Results only; the
times live in ``make bench`` (bench/run.py: inspect-200k, inspect-200k-json, inspect-dcp-200k,
fix-strip-200k)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from ckptdoctor.formats import open_checkpoint
from ckptdoctor.formats.tensor_bytes import iter_tensor_chunks
from tests.cli_helpers import run_cli

# 200,000-entry files through the real CLI and torch: minutes each, so `make test-scale`, not `make test`.
pytestmark = [pytest.mark.slow, pytest.mark.scale]
N = 200_000


def moe_keys(n: int) -> list[str]:
    names = ("gate_proj", "up_proj", "down_proj")
    return [f"model.layers.{i // 384}.mlp.experts.{i // 3 % 128}.{names[i % 3]}.weight" for i in range(n)]


def _values(record: object) -> torch.Tensor:
    raw = b"".join(iter_tensor_chunks(record))  # type: ignore[arg-type]
    return torch.frombuffer(bytearray(raw), dtype=torch.float32)


def test_200k_torch_zip_reads_as_torch_does(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    shapes = [(4, 8), (8,), (2, 2, 2)]
    sd = {key: torch.randn(shapes[i % 3], generator=gen) for i, key in enumerate(moe_keys(N))}
    path = tmp_path / "many.pt"
    torch.save(sd, path)
    theirs = torch.load(path, mmap=True, weights_only=True)
    ours = open_checkpoint(path)
    assert [(t.key, t.shape, t.dtype) for t in ours] == [
        (k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in theirs.items()]
    by_key = ours.by_key()
    for key in list(theirs)[:: N // 7]:
        assert torch.equal(_values(by_key[key].tensor).reshape(theirs[key].shape), theirs[key])
    keys = run_cli("inspect", path, "--keys")
    assert keys.exit_code == 0 and keys.stdout.splitlines() == list(theirs)
    doc = json.loads(run_cli("inspect", path, "--json").stdout)
    assert doc["tensor_count"] == N and [t["key"] for t in doc["tensors"]] == list(theirs)
    assert [tuple(t["shape"]) for t in doc["tensors"]] == [tuple(v.shape) for v in theirs.values()]
    fixed = tmp_path / "fixed.pt"
    assert run_cli("fix", path, "--strip", "model.", "-o", fixed).exit_code == 0
    assert list(torch.load(fixed, mmap=True, weights_only=True)) == [k.removeprefix("model.") for k in theirs]


def test_200k_dcp_metadata_reads_as_torch_does(tmp_path: Path) -> None:
    """50,000 parameters + Adam state (step, exp_avg, exp_avg_sq): 200,000 DCP entries."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    params = N // 4
    gen = torch.Generator().manual_seed(1)
    model = {key: torch.randn(4, 8, generator=gen) for key in moe_keys(params)}
    state = {i: {"step": torch.tensor(float(i)), "exp_avg": torch.randn(4, 8, generator=gen),
                 "exp_avg_sq": torch.rand(4, 8, generator=gen)} for i in range(params)}
    optim = {"state": state, "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": list(range(params))}]}
    root = tmp_path / "dcp"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": model, "optim": optim}, checkpoint_id=str(root))
    metadata = FileSystemReader(str(root)).read_metadata().state_dict_metadata
    theirs = {k: (tuple(v.size), str(v.properties.dtype).removeprefix("torch."))
              for k, v in metadata.items() if hasattr(v, "size")}
    assert len(theirs) == N

    ours = open_checkpoint(root)
    assert [(f"model.{t.key}", t.shape, t.dtype) for t in ours] == [
        (k, *v) for k, v in theirs.items() if k.startswith("model.")]
    optim_ours = open_checkpoint(root, entry="optim/state/49999")
    assert [(t.key, t.shape, t.dtype) for t in optim_ours] == [
        (k.rsplit(".", 1)[1], *theirs[k]) for k in theirs if k.startswith("optim.state.49999.")]
    # Values: the byte ranges resolved on first use equal what torch loads.
    by_key = ours.by_key()
    for key in list(model)[:: params // 5]:
        assert torch.equal(_values(by_key[key].tensor).reshape(4, 8), model[key])
    assert torch.equal(_values(optim_ours.by_key()["exp_avg_sq"].tensor).reshape(4, 8), state[params - 1]["exp_avg_sq"])
