"""What a newcomer reads: folded labels in numeric order, mapping rows per rule, messages that say what to do."""

from __future__ import annotations

import json
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ckptdoctor.engines.doctor.check_fix import group_mapping
from tests.cli_helpers import run_cli


def test_fold_label_sorts_indices_as_numbers(tmp_path: Path) -> None:
    """A sharded safetensors LLaMA stores keys in text order (layers.10 before layers.9)."""
    keys = sorted(f"model.layers.{i}.{p}.weight" for i in range(12) for p in ("q_proj", "mlp"))
    shards = [keys[:12], keys[12:]]
    root = tmp_path / "llama"
    root.mkdir()
    weight_map = {}
    for n, shard in enumerate(shards, 1):
        name = f"model-{n:05d}-of-00002.safetensors"
        save_file({k: torch.zeros(2, 2) for k in shard}, str(root / name))
        weight_map.update(dict.fromkeys(shard, name))
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    result = run_cli("inspect", root)
    assert result.exit_code == 0, result.stderr
    assert "{0..11}" in result.stdout and "×12" in result.stdout, result.stdout
    assert "{0..8,10,9,11}" not in result.stdout


def test_mapping_table_one_row_per_rule() -> None:
    """DenseNet's `norm.1 → norm1` rename over every layer is one row, not one per layer."""
    pairs = [(f"features.denseblock{b}.denselayer{i}.norm.{n}.{w}", f"features.denseblock{b}.denselayer{i}.norm{n}.{w}")
             for b in range(1, 5) for i in range(1, 7) for n in (1, 2) for w in ("weight", "bias")]
    groups = group_mapping(pairs)
    assert [(g.old, g.new, g.count) for g in groups] == [("*.norm.1.*", "*.norm1.*", 48),
                                                         ("*.norm.2.*", "*.norm2.*", 48)]
    # a wrapper in front stays literal, and a shared prefix is shown rather than starred
    assert [(g.old, g.new) for g in group_mapping([("module.a.w", "a.w"), ("module.b.w", "b.w")])] == [
        ("module.*", "*")]
    assert [(g.old, g.new) for g in group_mapping([("stage2.module.0.w", "stage2.0.w"),
                                                   ("stage2.module.1.w", "stage2.1.w")])] == [
        ("stage2.module.*", "stage2.*")]


def test_one_prefix_rule_reads_as_the_per_key_grouping() -> None:
    """A strip or prefix over every key (one check over all keys) gives the rows the per-key walk gives."""
    keys = [f"layers.{i}.mlp.experts.{j}.w" for i in range(3) for j in range(4)]
    stripped = [(f"model.decoder.{k}", k) for k in keys]
    assert [(g.old, g.new, g.count, g.example) for g in group_mapping(stripped)] == [
        ("model.decoder.*", "*", 12, stripped[0])]
    added = [(k, f"module.{k}") for k in keys]
    assert [(g.old, g.new, g.count) for g in group_mapping(added)] == [("*", "module.*", 12)]
    mixed = [*stripped[:-1], ("model.encoder.x.w", "x.w")]  # one key under another prefix: two rows
    assert [(g.old, g.new, g.count) for g in group_mapping(mixed)] == [("model.decoder.*", "*", 11),
                                                                       ("model.encoder.*", "*", 1)]


def test_fix_prints_folded_mapping(tmp_path: Path) -> None:
    layers = [torch.nn.Sequential(OrderedDict(norm=torch.nn.Sequential(torch.nn.BatchNorm1d(2), torch.nn.ReLU(),
                                                                    torch.nn.BatchNorm1d(2)))) for _ in range(30)]
    model = torch.nn.Sequential(*layers)
    src = tmp_path / "old.pt"
    torch.save(model.state_dict(), src)
    result = run_cli("fix", src, "--rename", r"\.norm\.(\d)\.=>.norm\1.", "-o", tmp_path / "new.pt")
    assert result.exit_code == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if "→" in line]
    assert len(rows) == 2, result.stdout
    assert "*.norm.0.* → *.norm0.*" in rows[0] and "×150" in rows[0]


def test_git_lfs_pointer_is_named(tmp_path: Path) -> None:
    pointer = tmp_path / "model.safetensors"
    pointer.write_text("version https://git-lfs.github.com/spec/v1\n"
                       "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 1234567\n")
    for args in (["inspect", pointer], ["scan", pointer], ["check", pointer, "--against", pointer]):
        result = run_cli(*args)
        assert result.exit_code == 2
        assert "Git LFS pointer" in result.stderr and "git lfs pull" in result.stderr, result.stderr


def test_spec_without_torch_says_install_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    models = tmp_path / "models.py"
    models.write_text("import torch\n\nclass Net(torch.nn.Module):\n    pass\n")
    ckpt = tmp_path / "a.pt"
    torch.save({"w": torch.zeros(1)}, ckpt)
    monkeypatch.setitem(sys.modules, "torch", None)  # what `import torch` does on a machine without it
    result = run_cli("check", ckpt, "--against", f"{models}:Net")
    assert result.exit_code == 2
    assert "needs torch" in result.stderr
    assert 'pip install "ckptdoctor[torch]"' in result.stderr


def test_width_follows_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    from ckptdoctor.render import console

    monkeypatch.delenv("CKPTDOCTOR_WIDTH", raising=False)
    monkeypatch.setenv("COLUMNS", "63")
    assert console.stdout_console().width == 63
    monkeypatch.delenv("COLUMNS")
    assert console.stdout_console().width == console.PIPE_WIDTH


@pytest.mark.parametrize("flag", ["--json", "--keys"])
def test_output_into_a_closed_pipe_is_not_an_error(tmp_path: Path, flag: str) -> None:
    """`ckptdoctor inspect --json big.pt | head`: the reader leaves early; exit 0, nothing on stderr."""
    import subprocess

    ckpt = tmp_path / "many.pt"
    torch.save({f"blocks.{i}.weight": torch.zeros(1) for i in range(4000)}, ckpt)
    proc = subprocess.Popen([sys.executable, "-m", "ckptdoctor", "inspect", str(ckpt), flag],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.read(100)
    proc.stdout.close()
    code = proc.wait(timeout=60)
    with proc.stderr:
        stderr = proc.stderr.read()
    assert code == 0, stderr
    assert stderr == b""
