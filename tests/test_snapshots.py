"""Human output, pinned: width 100, no colour, the seed's DataParallel example through every command.

The snapshots in tests/snapshots/ are what a user sees; a change to them is a change to the product,
reviewed as such. Regenerate with ``UPDATE_SNAPSHOTS=1 make test`` and read the diff.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from examples.seed_models import CNN, CNNWithWrappedStage, wrapped_example3
from tests.cli_helpers import run_cli

SNAPSHOTS = Path(__file__).resolve().parent / "snapshots"
SEED_MODELS = Path(__file__).resolve().parent.parent / "examples" / "seed_models.py"


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    torch.manual_seed(0)
    torch.save(wrapped_example3().state_dict(), tmp_path / "ddp.pth")
    torch.save(CNNWithWrappedStage().state_dict(), tmp_path / "ref.pth")
    torch.save({"epoch": 3, "model": CNN().state_dict()}, tmp_path / "train.pth")
    monkeypatch.chdir(tmp_path)
    return tmp_path


CASES = {
    "inspect": ["inspect", "ddp.pth"],
    "inspect_training": ["inspect", "train.pth"],
    "check": ["check", "ddp.pth", "--against", "ref.pth"],
    "fix_dry_run": ["fix", "ddp.pth", "--against", "ref.pth", "--dry-run"],
    "diff": ["diff", "ddp.pth", "ref.pth"],
    "scan": ["scan", "ddp.pth", "-v"],
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_human_output_snapshot(workdir: Path, name: str) -> None:
    result = run_cli(*CASES[name])
    assert result.exit_code in (0, 1), result.stderr
    text = f"$ ckptdoctor {' '.join(CASES[name])}\n{result.stdout}"
    snapshot = SNAPSHOTS / f"{name}.txt"
    if os.environ.get("UPDATE_SNAPSHOTS") == "1" or not snapshot.exists():
        if os.environ.get("CI") and not snapshot.exists():
            pytest.fail(f"snapshot {snapshot.name} is missing (run UPDATE_SNAPSHOTS=1 locally)")
        snapshot.write_text(text, encoding="utf-8")
    assert text == snapshot.read_text(encoding="utf-8")
