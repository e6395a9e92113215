"""`ckptdoctor inspect` on real torch.save files: seed key lists, JSON contract, folding, errors."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from ckptdoctor.engines.inspection.tree import build_tree
from ckptdoctor.formats import open_checkpoint
from examples.seed_models import CNN, CNNWithStage, wrapped_example3
from tests.cli_helpers import run_cli

BN = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]


def _bn(prefix: str) -> list[str]:
    return [f"{prefix}.{s}" for s in BN]


def _wb(prefix: str) -> list[str]:
    return [f"{prefix}.weight", f"{prefix}.bias"]


# The key lists printed in the seed write-up, in order.
SEED_1 = [*_wb("conv1"), *_bn("bn1"), *_wb("conv2"), *_bn("bn2"), *_wb("fc1"), *_wb("fc2")]
SEED_2 = [*_wb("conv1"), *_bn("bn1"), *_wb("stage1.0"), *_bn("stage1.1"), *_wb("conv2"), *_bn("bn2"),
          *_wb("fc1"), *_wb("fc2")]
SEED_3 = [*_wb("module.stage1.0"), *_bn("module.stage1.1"), *_wb("module.stage2.module.0"),
          *_bn("module.stage2.module.1"), *_wb("module.conv2"), *_bn("module.bn2"), *_wb("module.fc1"),
          *_wb("module.fc2")]


@pytest.mark.parametrize(("factory", "expected"), [(CNN, SEED_1), (CNNWithStage, SEED_2),
                                                   (wrapped_example3, SEED_3)])
def test_seed_examples_keys_exactly(tmp_path: Path, factory, expected) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "seed.pth"
    torch.save(factory().state_dict(), path)
    result = run_cli("inspect", path, "--keys")
    assert result.exit_code == 0
    assert result.stdout.splitlines() == expected
    assert result.stderr == ""


def test_seed_example2_shares_storage_like_torch(tmp_path: Path) -> None:
    path = tmp_path / "ex2.pth"
    torch.save(CNNWithStage().state_dict(), path)
    doc = run_cli("inspect", path, "--json").json()
    storages = {t["key"]: t.get("storage") for t in doc["tensors"]}  # named only where a storage is shared
    assert storages["conv1.weight"] == storages["stage1.0.weight"] is not None
    assert storages["conv1.weight"] != storages["conv2.weight"]
    assert ["conv1.weight", "stage1.0.weight"] in doc["shared_storages"]


def test_json_contract_fields(tmp_path: Path) -> None:
    path = tmp_path / "train.ckpt"
    model = CNN()
    torch.save({"epoch": 7, "global_step": 1400, "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "optimizer_states": [torch.optim.SGD(model.parameters(), lr=0.1).state_dict()],
                "hyper_parameters": {"lr": 0.1, "depth": 18}}, path)
    doc = run_cli("inspect", path, "--json").json()
    assert doc["schema_version"] == 1
    assert doc["format"] == "torch-zip"
    assert doc["path"] == str(path)
    assert doc["state_dict_path"] == ["state_dict"]
    loaded = torch.load(path, weights_only=True)["state_dict"]
    assert [t["key"] for t in doc["tensors"]] == list(loaded)
    for record, (key, tensor) in zip(doc["tensors"], loaded.items()):
        assert record["key"] == key
        assert record["shape"] == list(tensor.shape)
        assert record["dtype"] == str(tensor.dtype).removeprefix("torch.")
        assert record["numel"] == tensor.numel()
        assert record["nbytes"] == tensor.numel() * tensor.element_size()
    entries = {e["name"]: e for e in doc["entries"]}
    assert entries["epoch"]["value"] == 7
    assert entries["hyper_parameters"]["value"] == {"lr": 0.1, "depth": 18}
    assert "optimizer" not in entries


def test_human_view_shows_where_and_entries(tmp_path: Path) -> None:
    path = tmp_path / "train.pt"
    torch.save({"epoch": 3, "model_state_dict": CNN().state_dict()}, path)
    result = run_cli("inspect", path)
    assert result.exit_code == 0
    assert "model_state_dict" in result.stdout
    assert "epoch" in result.stdout and "3" in result.stdout
    assert "fc1" in result.stdout and "[128, 600]" in result.stdout


class Block(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)


def test_fold_is_honest(tmp_path: Path) -> None:
    """Identical numbered blocks fold into one node; a block that differs stays on its own."""
    blocks = nn.Sequential(*[Block() for _ in range(6)], Block(16), *[Block() for _ in range(2)])
    path = tmp_path / "blocks.pt"
    torch.save(blocks.state_dict(), path)
    tree = build_tree(open_checkpoint(path).tensors)
    names = [(c.name, c.repeat) for c in tree.children]
    assert names == [("{0..5,7..8}", 8), ("6", 1)]
    assert tree.params == sum(p.numel() for p in blocks.state_dict().values())
    result = run_cli("inspect", path)
    assert "×8" in result.stdout


def test_fold_respects_dtype(tmp_path: Path) -> None:
    blocks = nn.Sequential(Block(), Block(), Block())
    sd = blocks.state_dict()
    sd["1.fc.weight"] = sd["1.fc.weight"].half()
    path = tmp_path / "mixed.pt"
    torch.save(sd, path)
    tree = build_tree(open_checkpoint(path).tensors)
    assert [(c.name, c.repeat) for c in tree.children] == [("{0,2}", 2), ("1", 1)]


def test_depth_filter_and_entry(tmp_path: Path) -> None:
    path = tmp_path / "nested.pt"
    torch.save({"a": {"b": CNN().state_dict()}, "note": "x"}, path)
    keys = run_cli("inspect", path, "--keys", "--filter", "bn1.*", "--entry", "a/b")
    assert keys.stdout.splitlines() == _bn("bn1")
    missing = run_cli("inspect", path, "--entry", "a/zzz")
    assert missing.exit_code == 2
    assert missing.stderr.startswith("Error:")
    shallow = run_cli("inspect", path, "--depth", "1")
    assert shallow.exit_code == 0
    assert "running_var" not in shallow.stdout


@pytest.mark.parametrize("content", [b"", b"hello, this is text\n", os.urandom(4096), b"PK\x03\x04garbage",
                                     b"\x80\x02}q\x00."])
def test_bad_input_is_one_error_line(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    result = run_cli("inspect", path)
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("Error:")
    assert lines[1].startswith("Hint:")
    assert "Traceback" not in result.stderr


def test_truncated_file_and_missing_path(tmp_path: Path) -> None:
    path = tmp_path / "full.pt"
    torch.save(CNN().state_dict(), path)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    for target in (cut, tmp_path / "nope.pt", tmp_path):
        result = run_cli("inspect", target)
        assert result.exit_code == 2, target
        assert result.stderr.startswith("Error:")


class _SystemCall:
    """Pickles as os.system(COMMAND): the classic malicious checkpoint."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (self.command,))


def test_no_code_runs(tmp_path: Path) -> None:
    """A checkpoint whose pickle calls os.system: the marker never appears, exit 2, global named."""
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(2), "payload": _SystemCall(f"touch {marker}")}, path)
    result = subprocess.run([sys.executable, "-m", "ckptdoctor", "inspect", str(path)], capture_output=True,
                            text=True, cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert not marker.exists()
    assert "posix.system" in result.stderr or "os.system" in result.stderr
    assert "Traceback" not in result.stderr
    # The same payload in a legacy-format file and at pickle protocol 4.
    for kwargs in ({"_use_new_zipfile_serialization": False}, {"pickle_protocol": 4}):
        torch.save({"payload": _SystemCall(f"touch {marker}")}, path, **kwargs)
        assert run_cli("inspect", path).exit_code == 2
        assert not marker.exists()


def test_plain_pickle_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    result = run_cli("inspect", path)
    assert result.exit_code == 2
    assert "not a torch.save checkpoint" in result.stderr


def test_whole_pickled_module(tmp_path: Path) -> None:
    """torch.save(model) with a class that cannot be imported still lists the state dict."""
    path = tmp_path / "model.pt"
    model = CNNWithStage()
    torch.save(model, path)
    result = run_cli("inspect", path, "--keys")
    assert result.exit_code == 0
    assert result.stdout.splitlines() == list(model.state_dict())


def test_version_and_help() -> None:
    assert run_cli("--version").stdout.startswith("ckptdoctor ")
    help_text = run_cli("--help").stdout
    for command in ("inspect",):
        assert command in help_text


def test_pre_04_tar_checkpoint_is_named(tmp_path: Path) -> None:
    import tarfile

    member = tmp_path / "pickle"
    member.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with tarfile.open(tmp_path / "old.pth", "w") as tar:
        tar.add(member, arcname="pickle")
    result = run_cli("inspect", tmp_path / "old.pth")
    assert result.exit_code == 2
    assert "before torch 0.4" in result.stderr


def test_overview_totals_devices_and_aliases_equal_a_walk_over_the_tensors(tmp_path: Path) -> None:
    """The overview's totals come from passes over (shape, dtype) kinds; a tensor-by-tensor walk
    (the definition) must give the same numbers, device order ("meta" where it first appears) and
    alias groups, on a file mixing dtypes, views of one storage and storage-less meta tensors."""
    from ckptdoctor.engines.inspection.overview import overview

    base = torch.arange(24.0).reshape(4, 6)
    sd = {"a": torch.ones(2, 3, dtype=torch.float16), "view": base[1:], "meta": torch.empty(5, 2, device="meta"),
          "base": base, "b": torch.zeros(7, dtype=torch.int64), "t": base.t(), "meta2": torch.empty(3, device="meta")}
    path = tmp_path / "mixed.pt"
    torch.save(sd, path)
    ckpt = open_checkpoint(str(path))
    ov = overview(ckpt)
    reference = torch.load(path, weights_only=True)
    assert ov.parameters == sum(t.numel() for t in reference.values())
    assert ov.total_bytes == sum(t.numel() * t.element_size() for t in reference.values())
    by_dtype: dict[str, int] = {}
    for t in reference.values():
        name = str(t.dtype).removeprefix("torch.")
        by_dtype[name] = by_dtype.get(name, 0) + t.numel() * t.element_size()
    assert dict(ov.bytes_by_dtype) == by_dtype and [n for n, _ in ov.bytes_by_dtype] == sorted(
        by_dtype, key=lambda n: -by_dtype[n])
    assert ov.devices == ("cpu", "meta")
    assert ov.shared == (("view", "base", "t"),)
    assert ov.storage_bytes == 2 * 3 * 2 + 24 * 4 + 7 * 8


def test_tree_groups_interleaved_modules_in_first_seen_order(tmp_path: Path) -> None:
    """Keys of one module need not be contiguous (a dict's order is the saver's): every key lands
    under its module, modules and tensors in the order they first appear, numbered blocks fold."""
    sd = {"x.a.weight": torch.ones(2), "y.b.weight": torch.ones(3), "x.c.weight": torch.ones(4),
          "blocks.0.w": torch.ones(5), "top": torch.ones(1), "blocks.1.w": torch.ones(5), "y.b.bias": torch.ones(3)}
    path = tmp_path / "interleaved.pt"
    torch.save(sd, path)
    tree = build_tree(open_checkpoint(str(path)).tensors)

    def shape(node):  # type: ignore[no-untyped-def]
        return (node.name, node.tensors, [shape(c) for c in node.children])

    assert shape(tree) == ("", 7, [
        ("x", 2, [("a", 1, [("weight", 1, [])]), ("c", 1, [("weight", 1, [])])]),
        ("y", 2, [("b", 2, [("weight", 1, []), ("bias", 1, [])])]),
        ("blocks", 2, [("{0..1}", 2, [("w", 1, [])])]),
        ("top", 1, []),
    ])
    assert shape(build_tree(open_checkpoint(str(path)).tensors, pattern="*")) == shape(tree)


def test_tree_of_keys_that_all_share_modules(tmp_path: Path) -> None:
    """Keys that all start with the same modules (``module.model.``) keep every level of the tree;
    a tensor named like a module (``module.model.blocks``) sits beside that module's children,
    and the first and last keys sharing more than the rest does not mislead the tree."""
    sd = {"module.model.blocks.0.w": torch.ones(2), "module.model.blocks": torch.ones(1),
          "module.model.blocks.1.w": torch.ones(2), "module.model.head.w": torch.ones(3),
          "module.model.blocks.2.w": torch.ones(2)}
    path = tmp_path / "shared.pt"
    torch.save(sd, path)
    tree = build_tree(open_checkpoint(str(path)).tensors)

    def shape(node):  # type: ignore[no-untyped-def]
        return (node.name, node.path, node.tensors, node.tensor is not None, [shape(c) for c in node.children])

    assert shape(tree) == ("", "", 5, False, [
        ("module", "module", 5, False, [
            ("model", "module.model", 5, False, [
                ("blocks", "module.model.blocks", 4, True, [
                    ("{0..2}", "module.model.blocks.0", 3, False, [("w", "module.model.blocks.0.w", 1, True, [])])]),
                ("head", "module.model.head", 1, False, [("w", "module.model.head.w", 1, True, [])]),
            ])])])
    assert tree.params == 1 + 3 * 2 + 3


def test_files_without_a_model_state_dict_say_what_they_hold(tmp_path: Path) -> None:
    """A file of training metadata names its entries (not "run inspect", the command that failed);
    an optimizer's state dict is called what it is, not read as the first parameter's moments."""
    torch.save({"epoch": 3, "best_acc": 0.9, "cpu": torch.random.get_rng_state()}, tmp_path / "meta.pt")
    result = run_cli("inspect", tmp_path / "meta.pt")
    assert result.exit_code == 2
    assert "its root holds `epoch`, `best_acc`, `cpu`" in " ".join(result.stderr.split())
    assert "ckptdoctor inspect PATH" not in result.stderr
    model = nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(2)).sum().backward()
    optimizer.step()
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    result = run_cli("inspect", tmp_path / "optimizer.pt")
    assert result.exit_code == 2 and "optimizer's state dict" in result.stderr
    moments = run_cli("inspect", tmp_path / "optimizer.pt", "--entry", "state/0", "--keys")
    assert moments.exit_code == 0 and moments.stdout.split() == ["step", "exp_avg", "exp_avg_sq"]
