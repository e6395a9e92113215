"""Property test through files and the CLI: corrupt a real state dict the ways users do, then
`fix --against REFERENCE` must restore the original keys and values exactly; `fix` on a clean
file changes nothing."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.cli_helpers import run_cli
from tests.test_matcher_property import corruptions, modules


def _distinct_values(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor gets values no other tensor has, so a value landing on the wrong key shows."""
    out = {}
    for i, (key, value) in enumerate(state.items()):
        out[key] = (torch.arange(value.numel(), dtype=torch.float64).reshape(value.shape) + 1000.0 * i).to(value.dtype)
    return out


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_fix_against_reference_restores_keys_and_values(data: st.DataObject) -> None:
    model = data.draw(modules())
    original = _distinct_values(model.state_dict())
    fsrc, ftgt = data.draw(corruptions(list(original)))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        reference = {ftgt(k): v for k, v in original.items()}  # what the model expects
        broken = {fsrc(k): v for k, v in original.items()}  # what the checkpoint holds
        torch.save(reference, root / "reference.pt")
        torch.save(broken, root / "broken.pt")
        result = run_cli("fix", root / "broken.pt", "--against", root / "reference.pt", "-o", root / "out.pt")
        assert result.exit_code == 0, result.stdout + result.stderr
        fixed = torch.load(root / "out.pt", weights_only=True)
        assert list(fixed) == list(reference)
        for key, value in reference.items():
            assert torch.equal(fixed[key], value), key
        # Already clean: fixing again maps every key to itself and writes the same tensors.
        again = run_cli("fix", root / "out.pt", "--against", root / "reference.pt", "-o", root / "again.pt",
                        "--json")
        assert again.exit_code == 0
        assert all(m["from"] == m["to"] for m in again.json()["mapping"])
        assert again.json()["renamed"] == 0
        refixed = torch.load(root / "again.pt", weights_only=True)
        assert list(refixed) == list(reference)
        assert all(torch.equal(refixed[k], v) for k, v in reference.items())
