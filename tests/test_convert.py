"""``convert``: every source of the zoo into every container, read back by the real libraries.

Each output is loaded the way its users load it (``torch.load(weights_only=True)``,
``safetensors.torch.load_file``, the index's shards, ``torch.distributed.checkpoint.load``)
and every tensor is compared bit for bit with what torch itself reads from the source.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

from tests import zoo
from tests.cli_helpers import run_cli

SOURCES = ("lightning_like", "timm_like", "plain_loop", "legacy_views", "legacy_training", "cuda_tagged", "views",
           "tied_scalar_empty", "protocol4", "safetensors_dtypes", "hf_single", "hf_sharded_safetensors",
           "hf_sharded_bin", "dcp_training")
OUTPUTS = {"torch": "out.pt", "safetensors": "out.safetensors", "hf": "out_hf/", "dcp": "out_dcp"}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def assert_same(got: torch.Tensor, want: torch.Tensor, key: str) -> None:
    assert got.dtype == want.dtype, key
    assert got.shape == want.shape, key
    assert torch.equal(bits(got), bits(want)), key


def load_torch(path: Path, sd_path: tuple[str, ...]) -> dict[str, torch.Tensor]:
    node: Any = torch.load(path, weights_only=True, map_location="cpu")
    for name in sd_path:
        node = node[name]
    return {k: v for k, v in node.items() if isinstance(v, torch.Tensor)}


def load_hf(directory: Path) -> dict[str, torch.Tensor]:
    index = directory / "model.safetensors.index.json"
    if not index.exists():
        return safetensors.torch.load_file(directory / "model.safetensors")
    weight_map = json.loads(index.read_text())["weight_map"]
    out: dict[str, torch.Tensor] = {}
    for name in sorted(set(weight_map.values())):
        part = safetensors.torch.load_file(directory / name)
        assert all(weight_map[k] == name for k in part)
        out.update(part)
    assert set(out) == set(weight_map)
    return out


def load_dcp(directory: Path, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    import torch.distributed.checkpoint as dcp

    template = {k: torch.zeros_like(v) for k, v in like.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(template, checkpoint_id=directory)
    return template


def _storage_aliases(reference: dict[str, torch.Tensor]) -> dict[str, str]:
    """Keys whose tensor is the same view as an earlier key's (what convert writes once)."""
    first: dict[Any, str] = {}
    aliases = {}
    for key, t in reference.items():
        if not t.numel():
            continue
        view = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if view in first:
            aliases[key] = first[view]
        else:
            first[view] = key
    return aliases


@pytest.mark.parametrize("to", OUTPUTS)
@pytest.mark.parametrize("name", SOURCES)
def test_every_source_into_every_container(tmp_path: Path, name: str, to: str) -> None:
    fixture = zoo.build(name, tmp_path)
    reference = fixture.reference()
    out = tmp_path / OUTPUTS[to]
    args = ["convert", fixture.path, str(tmp_path) + "/" + OUTPUTS[to], "--verify", "--json"]
    if to == "hf":
        args += ["--max-shard-size", "600"]  # bytes: several shards even for tiny models
    if to == "dcp":
        args += ["--to", "dcp"]
    result = run_cli(*args)
    assert result.exit_code == 0, result.stderr
    doc = result.json()
    assert doc["to"] == to and doc["verified"] is True and doc["dtype_changed"] == 0
    assert all(os.path.exists(p) for p in doc["outputs"])
    assert doc["bytes_written"] == sum(os.path.getsize(p) for p in doc["outputs"])
    aliases = {a["key"]: a["shares"] for a in doc["aliases"]}
    if to == "torch":
        got = load_torch(out, fixture.state_dict_path)
        assert not aliases
    elif to == "safetensors":
        got = safetensors.torch.load_file(out)
        assert json.loads(out.read_bytes()[8:8 + int.from_bytes(out.read_bytes()[:8], "little")])[
            "__metadata__"]["format"] == "pt"
    elif to == "hf":
        got = load_hf(out)
    else:
        got = load_dcp(out, reference)  # tied keys point at one record: both load
    if to != "torch":
        assert aliases == _storage_aliases(reference)
    assert set(got) == set(reference) - (set() if to == "dcp" else set(aliases))
    for key, want in reference.items():
        assert_same(got[key if to == "dcp" else aliases.get(key, key)], want, key)


def test_torch_output_keeps_a_training_checkpoint_and_sharing(tmp_path: Path) -> None:
    fixture = zoo.build("lightning_like", tmp_path)
    assert run_cli("convert", fixture.path, tmp_path / "out.ckpt", "--dtype", "bf16").exit_code == 0
    loaded = torch.load(tmp_path / "out.ckpt", weights_only=True)
    source = torch.load(fixture.path, weights_only=True)
    assert loaded.keys() == source.keys() and loaded["epoch"] == 3
    assert loaded["optimizer_states"][0]["param_groups"] == source["optimizer_states"][0]["param_groups"]
    for key, want in source["state_dict"].items():
        got = loaded["state_dict"][key]
        assert_same(got, want.to(torch.bfloat16) if want.is_floating_point() else want, key)
    # --extract: the bare state dict
    assert run_cli("convert", fixture.path, tmp_path / "bare.pt", "--extract").exit_code == 0
    assert set(torch.load(tmp_path / "bare.pt", weights_only=True)) == set(source["state_dict"])

    tied = zoo.build("tied_scalar_empty", tmp_path)
    assert run_cli("convert", tied.path, tmp_path / "tied16.pt", "--dtype", "fp16", "--verify").exit_code == 0
    sd = torch.load(tmp_path / "tied16.pt", weights_only=True)
    assert sd["embed.weight"].data_ptr() == sd["proj.weight"].data_ptr()  # still one storage after the cast
    assert sd["embed.weight"].dtype == torch.float16 and sd["step"].dtype == torch.int64


def test_dtype_policy_matches_torch(tmp_path: Path) -> None:
    fixture = zoo.build("plain_loop", tmp_path)
    want = fixture.reference()
    result = run_cli("convert", fixture.path, tmp_path / "o.safetensors", "--dtype", "bf16", "--keep-dtype", "bn.*",
                     "--verify", "--json")
    assert result.exit_code == 0, result.stderr
    got = safetensors.torch.load_file(tmp_path / "o.safetensors")
    cast = 0
    for key, tensor in want.items():
        if key.startswith("bn.") or not tensor.is_floating_point():
            assert_same(got[key], tensor, key)  # kept: the glob, and integers (num_batches_tracked)
        else:
            assert_same(got[key], tensor.to(torch.bfloat16), key)
            cast += 1
    assert result.json()["dtype_changed"] == cast > 0


def test_dcp_source_with_entry_into_torch_zip(tmp_path: Path) -> None:
    fixture = zoo.build("dcp_training", tmp_path)
    result = run_cli("convert", fixture.path, tmp_path / "m.pt", "--entry", "model", "--extract", "--verify")
    assert result.exit_code == 0, result.stderr
    got = torch.load(tmp_path / "m.pt", weights_only=True)
    for key, want in fixture.reference().items():
        assert_same(got[key], want, key)


def test_hf_resharding_follows_huggingface_hub(tmp_path: Path) -> None:
    from huggingface_hub import split_torch_state_dict_into_shards

    fixture = zoo.build("hf_sharded_safetensors", tmp_path)
    reference = fixture.reference()
    out = tmp_path / "resharded"
    assert run_cli("convert", fixture.path, f"{out}/", "--max-shard-size", "0.0001MB").exit_code == 0
    split = split_torch_state_dict_into_shards(reference, max_shard_size=100)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == split.tensor_to_filename
    assert index["metadata"]["total_size"] == split.metadata["total_size"]
    assert (out / "config.json").read_text() == "{not json"  # companions copied as they are


def test_max_shard_size_parsed_as_huggingface_hub(tmp_path: Path) -> None:
    from huggingface_hub.serialization._base import parse_size_to_int

    from ckptdoctor.formats.writers.hf_shards import parse_size

    for text in ("5GB", "500MB", "1.5GB", "10KB", "2TB", " 7 mb"):
        assert parse_size(text) == parse_size_to_int(text)
    result = run_cli("convert", zoo.build("plain_loop", tmp_path).path, f"{tmp_path}/x/", "--max-shard-size", "5XB")
    assert result.exit_code == 2 and "Error:" in result.stderr


def test_workers_write_the_same_shards(tmp_path: Path) -> None:
    fixture = zoo.build("timm_like", tmp_path)
    for n in ("1", "2"):
        assert run_cli("convert", fixture.path, f"{tmp_path}/w{n}/", "--max-shard-size", "20", "--workers", n,
                       "--dtype", "fp16").exit_code == 0
    names = sorted(os.listdir(tmp_path / "w1"))
    assert len(names) > 3 and names == sorted(os.listdir(tmp_path / "w2"))
    for name in names:
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes()


def test_key_edits_are_fix_edits(tmp_path: Path) -> None:
    fixture = zoo.build("seed_dataparallel", tmp_path)
    spec = f"{Path(zoo.__file__)}:CNNWithWrappedStage"
    result = run_cli("convert", fixture.path, tmp_path / "o.safetensors", "--against", spec, "--json")
    assert result.exit_code == 0, result.stderr
    model = zoo.CNNWithWrappedStage()
    sd = safetensors.torch.load_file(tmp_path / "o.safetensors")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    # the model shares stage1 with stage2.module: the file stores each tensor once
    assert not unexpected and all(k.startswith("stage2.module.") for k in missing)
    assert result.json()["renamed"] > 0


def test_refuses_existing_out_and_leaves_nothing_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fixture = zoo.build("plain_loop", tmp_path)
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"old")
    result = run_cli("convert", fixture.path, out)
    assert result.exit_code == 2 and "already exists" in result.stderr and out.read_bytes() == b"old"
    assert run_cli("convert", fixture.path, out, "--force").exit_code == 0
    assert safetensors.torch.load_file(out)
    same = run_cli("convert", fixture.path, fixture.path, "--force")
    assert same.exit_code == 2 and fixture.path.exists()

    from ckptdoctor.formats.writers import stream

    def interrupted(*args: Any, **kwargs: Any) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(stream, "stream_item", interrupted)
    before = set(os.listdir(tmp_path))
    result = run_cli("convert", fixture.path, f"{tmp_path}/shards/", "--max-shard-size", "300")
    assert result.exit_code == 130
    assert set(os.listdir(tmp_path)) == before  # no OUT, no temp directory


def test_unknown_output_name_and_bad_flags(tmp_path: Path) -> None:
    fixture = zoo.build("plain_loop", tmp_path)
    for args in (["noext"], ["o.pt", "--dtype", "int8"], ["o.pt", "--to", "onnx"], ["x/", "--extract"],
                 ["o.pt", "--drop-unexpected"], ["o.pt", "--workers", "0"]):
        result = run_cli("convert", fixture.path, f"{tmp_path}/{args[0]}", *args[1:])
        assert result.exit_code == 2, args
        assert result.stderr.startswith("Error:"), args


def test_convert_never_imports_torch(tmp_path: Path) -> None:
    """Every container, casts included, is written with torch unimportable (the .metadata pickle of DCP too)."""
    import subprocess
    import sys

    fixture = zoo.build("tied_scalar_empty", tmp_path)
    script = (
        "import sys; sys.modules['torch'] = None\n"
        "from ckptdoctor.cli.app import main\n"
        "source = sys.argv[1]\n"
        "for out, extra in (('a.pt', []), ('b.safetensors', []), ('c/', ['--max-shard-size', '50']),"
        " ('d', ['--to', 'dcp'])):\n"
        "    sys.argv = ['ckptdoctor', 'convert', source, out, '--dtype', 'bf16', '--verify', *extra]\n"
        "    try:\n"
        "        main()\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code == 0, exc.code\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(fixture.path)], cwd=tmp_path, capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    sd = load_dcp(tmp_path / "d", {k: v.to(torch.bfloat16) if v.is_floating_point() else v
                                   for k, v in fixture.reference().items()})
    for key, want in fixture.reference().items():
        assert_same(sd[key], want.to(torch.bfloat16) if want.is_floating_point() else want, key)


def test_dcp_with_workers_writes_several_files_dcp_load_reads(tmp_path: Path) -> None:
    fixture = zoo.build("tied_scalar_empty", tmp_path)
    reference = fixture.reference()
    result = run_cli("convert", fixture.path, tmp_path / "d", "--to", "dcp", "--workers", "2", "--verify", "--json")
    assert result.exit_code == 0, result.stderr
    assert sorted(os.listdir(tmp_path / "d")) == [".metadata", "__0_0.distcp", "__0_1.distcp"]
    got = load_dcp(tmp_path / "d", reference)
    for key, want in reference.items():
        assert_same(got[key], want, key)


def test_markup_names_and_keys_print_verbatim(tmp_path: Path) -> None:
    """Paths and keys with Rich markup characters are data: printed as they are, never a traceback."""
    from collections import OrderedDict

    weight = torch.randn(2, 3)
    sd = OrderedDict([("module.[bold]enc[/bold].weight", weight), ("module.layer[/].weight", weight),
                      ("module.x[link=file:///etc]y.bias", torch.zeros(3))])
    src = tmp_path / "run[best].pt"
    torch.save(sd, src)
    out = f"{tmp_path}/out[red]/"
    result = run_cli("convert", src, out, "--strip", "module.")
    assert result.exit_code == 0, result.stderr
    text = result.stdout.replace("\n", "")
    assert "layer[/].weight is [bold]enc[/bold].weight" in text and "out[red]" in text
    assert set(safetensors.torch.load_file(tmp_path / "out[red]" / "model.safetensors")) == {
        "[bold]enc[/bold].weight", "x[link=file:///etc]y.bias"}
    missing = run_cli("convert", tmp_path / "gone[/x].pt", f"{tmp_path}/o/")
    assert missing.exit_code == 2 and str(tmp_path / "gone[/x].pt") in missing.stderr.replace("\n", "")
    assert "Traceback" not in missing.stderr


def test_a_peft_adapter_directory_stays_an_adapter(tmp_path: Path) -> None:
    """PEFT's save_pretrained(safe_serialization=False) directory converted into the hf layout is what
    PEFT writes itself: one adapter_model.safetensors (never sharded) beside adapter_config.json."""
    source = tmp_path / "adapter"
    source.mkdir()
    config = {"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"], "base_model_name_or_path": None}
    (source / "adapter_config.json").write_text(json.dumps(config))
    state = {f"base_model.model.layers.{i}.q_proj.lora_{ab}.weight": torch.randn(2, 8) if ab == "A" else
             torch.randn(8, 2) for i in range(3) for ab in "AB"}
    torch.save(state, source / "adapter_model.bin")
    result = run_cli("convert", source, f"{tmp_path}/out/", "--max-shard-size", "100", "--verify")
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text()) == config
    written = safetensors.torch.load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert written.keys() == state.keys() and all(torch.equal(written[k], v) for k, v in state.items())
    assert "one adapter_model.safetensors" in " ".join((result.stdout + result.stderr).split())
