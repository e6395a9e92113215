"""fix carries torch's `_metadata` (module versions) over the renaming, so BatchNorm loads as torch expects."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ckptdoctor.engines.doctor.check_fix import remap_metadata
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


GPT_LIKE = '''
import torch
from torch import nn


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_attn = nn.Linear(8, 24)
        # A causal mask: saved by old code, non-persistent in today's (like GPT-2's attn.bias).
        self.register_buffer("bias", torch.tril(torch.ones(1, 1, 4, 4)), persistent=False)


class GPTLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.h = nn.ModuleList(Attention() for _ in range(2))
'''


def test_saved_non_persistent_buffers_are_harmless_and_dropped(tmp_path: Path) -> None:
    """An old file that saved a buffer the model no longer persists: named harmless, fix drops it."""
    (tmp_path / "gpt_like.py").write_text(GPT_LIKE)
    spec = f"{tmp_path / 'gpt_like.py'}:GPTLike"
    state: dict[str, torch.Tensor] = {}
    for i in range(2):
        state[f"h.{i}.c_attn.weight"] = torch.randn(24, 8)
        state[f"h.{i}.c_attn.bias"] = torch.randn(24)
        state[f"h.{i}.bias"] = torch.tril(torch.ones(1, 1, 4, 4))
    torch.save(state, tmp_path / "old.pt")
    doc = run_cli("check", tmp_path / "old.pt", "--against", spec, "--json").json()
    assert not doc["ok"]
    assert [f["code"] for f in doc["findings"]] == ["harmless-missing"]
    assert doc["suggested_fix"] == ["fix", str(tmp_path / "old.pt"), "--against", spec, "--drop-unexpected"]
    out = tmp_path / "new.pt"
    assert run_cli(*doc["suggested_fix"], "-o", out).exit_code == 0
    assert sorted(torch.load(out, weights_only=True)) == sorted(k for k in state if not k.endswith(".bias")
                                                                or "c_attn" in k)


def test_leftover_flags_need_a_spec(tmp_path: Path) -> None:
    torch.save(CNN().state_dict(), tmp_path / "a.pt")
    result = run_cli("fix", tmp_path / "a.pt", "--strip", "module.", "--drop-unexpected", "-o", tmp_path / "b.pt")
    assert result.exit_code == 2
    assert "need --against" in result.stderr
    assert not (tmp_path / "b.pt").exists()


def test_fix_says_when_the_output_needs_full_unpickling(tmp_path: Path) -> None:
    import argparse

    src = tmp_path / "timm_like.pth"
    torch.save({"state_dict": {"module.w": torch.zeros(2)}, "args": argparse.Namespace(lr=0.1), "epoch": 1}, src)
    kept = run_cli("fix", src, "--strip", "module.", "-o", tmp_path / "kept.pth", "--json").json()
    assert any("argparse.Namespace" in note and "weights_only" in note for note in kept["notes"])
    bare = run_cli("fix", src, "--strip", "module.", "--extract", "-o", tmp_path / "bare.pth", "--json").json()
    assert not any("weights_only" in note for note in bare["notes"])
    assert list(torch.load(tmp_path / "bare.pth", weights_only=True)) == ["w"]


def test_torch_export_archive_is_named(tmp_path: Path) -> None:
    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x)

    path = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(Tiny(), (torch.randn(1, 2),)), path)
    result = run_cli("inspect", path)
    assert result.exit_code == 2
    assert "torch.export archive" in result.stderr


def test_fix_refuses_an_absurdly_deep_object_tree(tmp_path: Path) -> None:
    """A pickle nesting 200,000 tuples reads fine (iteratively) but cannot be re-pickled: one clear error."""
    import struct
    import zipfile

    torch.save({"w": torch.zeros(2)}, tmp_path / "base.pt")
    with zipfile.ZipFile(tmp_path / "base.pt") as src, zipfile.ZipFile(tmp_path / "deep.pt", "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("data.pkl"):  # dict['x'] = ((((...)))): TUPLE1 repeated, then SETITEM
                data = data[:-1] + b"X" + struct.pack("<I", 1) + b"x)" + b"\x85" * 200_000 + b"s."
            dst.writestr(info.filename, data)
    assert run_cli("inspect", tmp_path / "deep.pt").exit_code == 0
    # --extract rebuilds the pickle from the tree (a rename in place would keep it as it is)
    result = run_cli("fix", tmp_path / "deep.pt", "--add-prefix", "a.", "--extract", "-o", tmp_path / "out.pt")
    assert result.exit_code == 2
    assert "nests too deeply" in result.stderr and "bug" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.pt", "deep.pt"]


def test_a_pure_rename_keeps_even_an_absurdly_deep_tree(tmp_path: Path) -> None:
    """The same file renamed in place: only the key strings change, so the deep tuple is written as it was read."""
    import struct
    import zipfile

    torch.save({"w": torch.zeros(2)}, tmp_path / "base.pt")
    with zipfile.ZipFile(tmp_path / "base.pt") as src, zipfile.ZipFile(tmp_path / "deep.pt", "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("data.pkl"):
                data = data[:-1] + b"X" + struct.pack("<I", 1) + b"x)" + b"\x85" * 200_000 + b"s."
            dst.writestr(info.filename, data)
    result = run_cli("fix", tmp_path / "deep.pt", "--add-prefix", "a.", "-o", tmp_path / "out.pt")
    assert result.exit_code == 0, result.stderr
    loaded = torch.load(tmp_path / "out.pt", weights_only=True)
    assert list(loaded) == ["a.w", "a.x"] and torch.equal(loaded["a.w"], torch.zeros(2))
    depth, node = 0, loaded["a.x"]
    while node != ():
        depth, node = depth + 1, node[0]
    assert depth == 200_000
