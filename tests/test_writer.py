"""Tests for ckptdoctor.formats.writers.rewrite: real torch.save / safetensors files in, real loads out."""

from __future__ import annotations

import argparse
import os
import zipfile
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckptdoctor.errors import CorruptCheckpoint, OutputError, UsageError
from ckptdoctor.formats import open_checkpoint
from ckptdoctor.formats.writers.rewrite import write_checkpoint
from ckptdoctor.model.checkpoint import ByteRange, Checkpoint, TensorInfo
from tests.cli_helpers import run_cli


class Net(torch.nn.Module):
    """A small model with a conv, a BatchNorm (buffers, versioned metadata) and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.head = torch.nn.Linear(4, 5)


class TiedLM(torch.nn.Module):
    """Embedding and output projection share one Parameter (tied weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(7, 4)
        self.proj = torch.nn.Linear(4, 7, bias=False)
        self.proj.weight = self.embed.weight


def _entries(ckpt: Checkpoint, strip: str = "") -> list[tuple[str, Any]]:
    return [(t.key.removeprefix(strip), t.tensor) for t in ckpt.tensors]


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".ckptdoctor-tmp-"))


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exact equality by bytes, for every dtype (float8 and friends have no torch.equal kernel)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return bytes(a.contiguous().reshape(-1).view(torch.uint8).numpy()) == bytes(
        b.contiguous().reshape(-1).view(torch.uint8).numpy())


@pytest.fixture
def dp_file(tmp_path: Path) -> tuple[Path, Net]:
    torch.manual_seed(0)
    model = Net()
    path = tmp_path / "dp.pth"
    torch.save(torch.nn.DataParallel(model).state_dict(), path)
    return path, model


def test_strip_module_round_trip_loads_strictly(dp_file: tuple[Path, Net], tmp_path: Path) -> None:
    path, model = dp_file
    ckpt = open_checkpoint(path)
    report = write_checkpoint(ckpt, _entries(ckpt, "module."), tmp_path / "fixed.pt")
    loaded = torch.load(tmp_path / "fixed.pt", weights_only=True)
    fresh = Net()
    fresh.load_state_dict(loaded, strict=True)
    original = model.state_dict()
    assert list(loaded) == list(original)
    for key, value in original.items():
        assert torch.equal(loaded[key], value), key
    assert report.format == "torch-zip"
    assert report.tensors == report.storages == len(original)
    assert report.bytes_written == os.path.getsize(tmp_path / "fixed.pt")
    assert _leftovers(tmp_path) == []


def test_archive_layout_matches_torch_save(dp_file: tuple[Path, Net], tmp_path: Path) -> None:
    path, _ = dp_file
    ckpt = open_checkpoint(path)
    out = tmp_path / "my.model.v2.pt"
    # extract: the writer builds the archive (an unchanged tree would be copied as it is, see test_key_rename.py)
    write_checkpoint(ckpt, _entries(ckpt), out, extract=True)
    with zipfile.ZipFile(out) as z:
        assert z.testzip() is None  # every CRC-32 is right
        names = z.namelist()
        assert names[:4] == ["my/data.pkl", "my/.format_version", "my/.storage_alignment", "my/byteorder"]
        assert names[-2:] == ["my/version", "my/.data/serialization_id"]
        assert z.read("my/.storage_alignment") == b"64"
        assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())
    written = open_checkpoint(out)
    for info in written.tensors:
        assert info.tensor.storage is not None and info.tensor.storage.source is not None
        assert info.tensor.storage.source.offset % 64 == 0
    # 64-byte alignment is what lets torch map storages in place.
    mapped = torch.load(out, weights_only=True, mmap=True)
    assert set(mapped) == set(torch.load(path, weights_only=True))


def test_tied_weights_and_views_keep_sharing(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = TiedLM()
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = OrderedDict(model.state_dict())
    state["base"] = base
    state["row"] = base[1]  # a view with a storage offset
    state["cols"] = base[:, 1:5:2]  # non-contiguous
    state["t"] = base.t()
    torch.save(state, tmp_path / "tied.pt")
    ckpt = open_checkpoint(tmp_path / "tied.pt")
    report = write_checkpoint(ckpt, _entries(ckpt), tmp_path / "out.pt")
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    for key, value in state.items():
        assert torch.equal(out[key], value), key
        assert out[key].stride() == value.stride() and out[key].storage_offset() == value.storage_offset()
    ptr = out["embed.weight"].untyped_storage().data_ptr()
    assert out["proj.weight"].untyped_storage().data_ptr() == ptr
    base_ptr = out["base"].untyped_storage().data_ptr()
    assert {out[k].untyped_storage().data_ptr() for k in ("row", "cols", "t")} == {base_ptr}
    assert report.storages == 2 and report.tensors == 6


def test_parameters_stay_parameters(tmp_path: Path) -> None:
    model = Net()
    model.head.bias.requires_grad_(False)
    torch.save(model.state_dict(keep_vars=True), tmp_path / "vars.pt")
    ckpt = open_checkpoint(tmp_path / "vars.pt")
    write_checkpoint(ckpt, _entries(ckpt), tmp_path / "out.pt")
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    assert isinstance(out["conv.weight"], torch.nn.Parameter) and out["conv.weight"].requires_grad
    assert isinstance(out["head.bias"], torch.nn.Parameter) and not out["head.bias"].requires_grad
    assert not isinstance(out["bn.running_mean"], torch.nn.Parameter)


ALL_DTYPES = [
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.complex128, torch.complex64,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
    torch.uint16, torch.uint32, torch.uint64,
    torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz, torch.float8_e8m0fnu,
]


def _dtype_tensor(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    raw = torch.randint(0, 120, shape, dtype=torch.int64)
    if dtype == torch.bool:
        return raw % 2 == 1
    if dtype.is_complex:
        return torch.complex(raw.double(), -raw.double()).to(dtype)
    return raw.to(dtype)


def test_every_dtype_and_odd_shapes_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(2)
    state: dict[str, torch.Tensor] = {}
    for dtype in ALL_DTYPES:
        name = str(dtype).removeprefix("torch.")
        state[name] = _dtype_tensor(dtype, (3, 5))
        state[name + ".scalar"] = _dtype_tensor(dtype, ())
        state[name + ".empty"] = _dtype_tensor(dtype, (0, 4))
    torch.save(state, tmp_path / "dtypes.pt")
    ckpt = open_checkpoint(tmp_path / "dtypes.pt")
    write_checkpoint(ckpt, _entries(ckpt), tmp_path / "out.pt")
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    assert list(out) == list(state)
    for key, value in state.items():
        assert _same_bytes(out[key], value), key


def _training_checkpoint(tmp_path: Path) -> tuple[Path, Net, dict[str, Any]]:
    torch.manual_seed(3)
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    ckpt = {
        "epoch": 7,
        "state_dict": torch.nn.DataParallel(model).state_dict(),
        "optimizer": opt.state_dict(),
        "args": argparse.Namespace(lr=1e-3, model="net", layers=[1, 2], size=(224, 224)),
        "extra": {"tags": {"a", "b"}, "blob": b"\x00\xff\x10", 1: 2.5, "big": 2**70, "neg": -5, "none": None,
                  "t4": (1, 2, 3, 4), "inf": float("inf")},
    }
    path = tmp_path / "train.ckpt"
    torch.save(ckpt, path)
    return path, model, ckpt


def test_training_checkpoint_keeps_other_entries(tmp_path: Path) -> None:
    path, model, source = _training_checkpoint(tmp_path)
    ckpt = open_checkpoint(path)
    assert ckpt.state_dict_path == ("state_dict",)
    report = write_checkpoint(ckpt, _entries(ckpt, "module."), tmp_path / "fixed.ckpt")
    out = torch.load(tmp_path / "fixed.ckpt", weights_only=False)  # the Namespace needs the full unpickler
    assert list(out) == list(source)
    Net().load_state_dict(out["state_dict"], strict=True)
    assert out["epoch"] == 7 and out["args"] == source["args"] and out["extra"] == source["extra"]
    assert out["optimizer"]["param_groups"] == source["optimizer"]["param_groups"]
    for index, state in source["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(out["optimizer"]["state"][index][name], value), (index, name)
    assert report.notes == ()
    # storages: the model's tensors plus Adam's step/exp_avg/exp_avg_sq per parameter
    assert report.storages == len(model.state_dict()) + 3 * len(list(model.parameters()))


def test_extract_writes_only_the_state_dict(tmp_path: Path) -> None:
    path, model, _ = _training_checkpoint(tmp_path)
    ckpt = open_checkpoint(path)
    report = write_checkpoint(ckpt, _entries(ckpt, "module."), tmp_path / "weights.pt", extract=True)
    out = torch.load(tmp_path / "weights.pt", weights_only=True)
    assert isinstance(out, OrderedDict)
    for key, value in model.state_dict().items():
        assert torch.equal(out[key], value)
    assert any("`optimizer`" in note and "`epoch`" in note for note in report.notes)
    assert report.storages == len(model.state_dict())


def test_metadata_is_kept_or_replaced(dp_file: tuple[Path, Net], tmp_path: Path) -> None:
    path, _ = dp_file
    ckpt = open_checkpoint(path)
    write_checkpoint(ckpt, _entries(ckpt), tmp_path / "kept.pt")
    source_meta = torch.load(path, weights_only=True)._metadata
    assert torch.load(tmp_path / "kept.pt", weights_only=True)._metadata == source_meta
    write_checkpoint(ckpt, _entries(ckpt), tmp_path / "none.pt", metadata=None)
    assert not hasattr(torch.load(tmp_path / "none.pt", weights_only=True), "_metadata")
    new_meta = OrderedDict([("", {"version": 1}), ("bn", {"version": 2})])
    write_checkpoint(ckpt, _entries(ckpt), tmp_path / "new.pt", metadata=new_meta)
    assert torch.load(tmp_path / "new.pt", weights_only=True)._metadata == new_meta


def test_legacy_input_becomes_zip(tmp_path: Path) -> None:
    torch.manual_seed(4)
    base = torch.randn(5, 4)
    state = {"w": base, "row": base[2], "t": base.t(), "i": torch.arange(3, dtype=torch.int16)}
    torch.save(state, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    ckpt = open_checkpoint(tmp_path / "old.pt")
    assert ckpt.format == "torch-legacy"
    write_checkpoint(ckpt, _entries(ckpt), tmp_path / "new.pt")
    assert zipfile.is_zipfile(tmp_path / "new.pt")
    out = torch.load(tmp_path / "new.pt", weights_only=True)
    for key, value in state.items():
        assert torch.equal(out[key], value), key
    assert out["row"].untyped_storage().data_ptr() == out["w"].untyped_storage().data_ptr()


def test_safetensors_output_equals_source_and_reports_sharing(tmp_path: Path) -> None:
    torch.manual_seed(5)
    model = TiedLM()
    base = torch.randn(6, 4)
    state = OrderedDict(model.state_dict())
    state.update(base=base, t=base.t(), cols=base[:, 1:4:2], half=torch.randn(3, dtype=torch.float16),
                 f8=torch.randn(5).to(torch.float8_e4m3fn), flags=torch.tensor([True, False]),
                 scalar=torch.tensor(3.5), empty=torch.zeros(0, 3))
    torch.save(state, tmp_path / "src.pt")
    ckpt = open_checkpoint(tmp_path / "src.pt")
    report = write_checkpoint(ckpt, _entries(ckpt), tmp_path / "out.safetensors")
    out = load_file(tmp_path / "out.safetensors")
    assert set(out) == set(state)
    for key, value in state.items():
        assert _same_bytes(out[key], value.contiguous()), key
    assert report.format == "safetensors"
    assert any("`embed.weight` and `proj.weight` shared storage" in n for n in report.notes)
    assert any("`base` and `t` and `cols` shared storage" in n for n in report.notes)


def test_safetensors_to_safetensors_keeps_metadata(tmp_path: Path) -> None:
    tensors = {"model.w": torch.randn(3, 2), "model.b": torch.arange(4, dtype=torch.int32)}
    save_file(tensors, tmp_path / "in.safetensors", metadata={"format": "pt", "origin": "unit-test"})
    ckpt = open_checkpoint(tmp_path / "in.safetensors")
    write_checkpoint(ckpt, _entries(ckpt, "model."), tmp_path / "out.safetensors")
    from safetensors import safe_open

    with safe_open(tmp_path / "out.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt", "origin": "unit-test"}
        assert set(f.keys()) == {"w", "b"}
        assert torch.equal(f.get_tensor("w"), tensors["model.w"])
    # and into a torch.save archive
    write_checkpoint(ckpt, _entries(ckpt, "model."), tmp_path / "out.pt")
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    assert torch.equal(out["b"], tensors["model.b"])


def test_safetensors_output_of_training_checkpoint_notes_dropped_entries(tmp_path: Path) -> None:
    path, _, _ = _training_checkpoint(tmp_path)
    ckpt = open_checkpoint(path)
    report = write_checkpoint(ckpt, _entries(ckpt, "module."), tmp_path / "w.safetensors")
    Net().load_state_dict(load_file(tmp_path / "w.safetensors"), strict=True)
    assert any("`optimizer`" in n for n in report.notes)


def test_cuda_tags_are_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = Net()
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(torch.nn.DataParallel(model).state_dict(), tmp_path / "gpu.pt")
    ckpt = open_checkpoint(tmp_path / "gpu.pt")
    assert {t.tensor.device for t in ckpt.tensors} == {"cuda:0"}
    write_checkpoint(ckpt, _entries(ckpt, "module."), tmp_path / "out.pt")
    assert {t.tensor.device for t in open_checkpoint(tmp_path / "out.pt").tensors} == {"cuda:0"}
    out = torch.load(tmp_path / "out.pt", map_location="cpu", weights_only=True)
    Net().load_state_dict(out, strict=True)


def test_whole_pickled_module_becomes_state_dict(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1))
    torch.save(model, tmp_path / "model.pt")
    ckpt = open_checkpoint(tmp_path / "model.pt")
    report = write_checkpoint(ckpt, _entries(ckpt), tmp_path / "sd.pt")
    out = torch.load(tmp_path / "sd.pt", weights_only=True)
    fresh = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1))
    fresh.load_state_dict(out, strict=True)
    assert all(torch.equal(out[k], v) for k, v in model.state_dict().items())
    assert any("torch.nn.modules.container.Sequential" in n for n in report.notes)


def test_torchscript_becomes_state_dict(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    torch.jit.save(torch.jit.script(model), tmp_path / "scripted.pt")
    ckpt = open_checkpoint(tmp_path / "scripted.pt")
    report = write_checkpoint(ckpt, _entries(ckpt), tmp_path / "sd.pt")
    out = torch.load(tmp_path / "sd.pt", weights_only=True)
    assert all(torch.equal(out[k], v) for k, v in model.state_dict().items())
    assert any("TorchScript" in n for n in report.notes)


def _big_endian_copy(src: Path, dst: Path, itemsizes: dict[str, int]) -> None:
    """Rewrite a torch zip as a big-endian machine would have saved it (byteorder "big")."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            tail = info.filename.split("/", 1)[1]
            if tail == "byteorder":
                data = b"big"
            elif tail.startswith("data/"):
                size = itemsizes[tail[5:]]
                data = b"".join(data[i:i + size][::-1] for i in range(0, len(data), size))
            zout.writestr(info.filename, data)


def test_big_endian_source_is_swapped(tmp_path: Path) -> None:
    state = {"f": torch.randn(4, 3), "h": torch.randn(5).half(), "l": torch.arange(6), "c": torch.randn(2).to(
        torch.complex64), "u": torch.arange(300, 303, dtype=torch.int32).to(torch.uint16)}
    torch.save(state, tmp_path / "le.pt")
    _big_endian_copy(tmp_path / "le.pt", tmp_path / "be.pt", {"0": 4, "1": 2, "2": 8, "3": 4, "4": 2})
    ckpt = open_checkpoint(tmp_path / "be.pt")
    assert ckpt.extra["byteorder"] == "big"
    report = write_checkpoint(ckpt, _entries(ckpt), tmp_path / "out.pt")
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    for key, value in state.items():
        assert _same_bytes(out[key], value), key
    assert any("big-endian" in n for n in report.notes)
    write_checkpoint(ckpt, _entries(ckpt), tmp_path / "out.safetensors")
    st = load_file(tmp_path / "out.safetensors")
    assert all(_same_bytes(st[k], v) for k, v in state.items())


def test_existing_output_needs_force(dp_file: tuple[Path, Net], tmp_path: Path) -> None:
    path, _ = dp_file
    ckpt = open_checkpoint(path)
    out = tmp_path / "exists.pt"
    out.write_bytes(b"precious")
    with pytest.raises(OutputError, match="already exists"):
        write_checkpoint(ckpt, _entries(ckpt), out)
    assert out.read_bytes() == b"precious"
    write_checkpoint(ckpt, _entries(ckpt), out, force=True)
    assert set(torch.load(out, weights_only=True)) == {t.key for t in ckpt.tensors}
    assert _leftovers(tmp_path) == []


def test_output_is_never_the_input(dp_file: tuple[Path, Net], tmp_path: Path) -> None:
    path, _ = dp_file
    before = path.read_bytes()
    ckpt = open_checkpoint(path)
    with pytest.raises(OutputError, match="is the input"):
        write_checkpoint(ckpt, _entries(ckpt), path, force=True)
    os.link(path, tmp_path / "hardlink.pt")
    with pytest.raises(OutputError, match="is the input"):
        write_checkpoint(ckpt, _entries(ckpt), tmp_path / "hardlink.pt", force=True)
    assert path.read_bytes() == before


def test_missing_output_directory_and_bad_entries(dp_file: tuple[Path, Net], tmp_path: Path) -> None:
    path, _ = dp_file
    ckpt = open_checkpoint(path)
    with pytest.raises(OutputError, match="does not exist"):
        write_checkpoint(ckpt, _entries(ckpt), tmp_path / "nope" / "out.pt")
    with pytest.raises(UsageError, match="twice"):
        write_checkpoint(ckpt, _entries(ckpt) + _entries(ckpt)[:1], tmp_path / "out.pt")
    with pytest.raises(UsageError, match="empty"):
        write_checkpoint(ckpt, [], tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()


def _with_broken_source(ckpt: Checkpoint) -> Checkpoint:
    """The checkpoint with its last tensor's bytes pointing past the end of the file."""
    *rest, last = ckpt.tensors
    storage = last.tensor.storage
    assert storage is not None and storage.source is not None
    broken = replace(storage, source=ByteRange(storage.source.path, ckpt.file_size + 10, storage.nbytes))
    tensors = (*rest, TensorInfo(last.key, replace(last.tensor, storage=broken)))
    return replace(ckpt, tensors=tensors, root=OrderedDict((t.key, t.tensor) for t in tensors))


@pytest.mark.parametrize("name", ["out.pt", "out.safetensors"])
def test_failure_mid_write_leaves_nothing(dp_file: tuple[Path, Net], tmp_path: Path, name: str) -> None:
    path, _ = dp_file
    ckpt = _with_broken_source(open_checkpoint(path))
    with pytest.raises(CorruptCheckpoint, match="past the end"):
        write_checkpoint(ckpt, _entries(ckpt), tmp_path / name)
    assert not (tmp_path / name).exists()
    assert _leftovers(tmp_path) == []


def test_interrupt_leaves_nothing_and_keeps_old_output(dp_file: tuple[Path, Net], tmp_path: Path) -> None:
    path, _ = dp_file
    ckpt = open_checkpoint(path)
    out = tmp_path / "out.pt"
    out.write_bytes(b"old")
    calls: list[tuple[int, int]] = []

    def interrupt(done: int, total: int) -> None:
        calls.append((done, total))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(ckpt, _entries(ckpt), out, force=True, progress=interrupt)
    assert calls and out.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


def test_progress_reaches_total(dp_file: tuple[Path, Net], tmp_path: Path) -> None:
    path, _ = dp_file
    ckpt = open_checkpoint(path)
    seen: list[tuple[int, int]] = []
    write_checkpoint(ckpt, _entries(ckpt), tmp_path / "out.pt", progress=lambda d, t: seen.append((d, t)))
    total = sum(t.tensor.storage.nbytes for t in ckpt.tensors if t.tensor.storage)
    assert seen[-1] == (total, total)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


@pytest.mark.parametrize("name", ["out.pt", "out.safetensors"])
def test_writing_twice_is_byte_identical(tmp_path: Path, name: str) -> None:
    path, _, _ = _training_checkpoint(tmp_path)
    ckpt = open_checkpoint(path)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_checkpoint(ckpt, _entries(ckpt, "module."), tmp_path / "a" / name)
    write_checkpoint(open_checkpoint(path), _entries(ckpt, "module."), tmp_path / "b" / name)
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_rewriting_own_output_is_a_fixed_point(dp_file: tuple[Path, Net], tmp_path: Path) -> None:
    path, _ = dp_file
    ckpt = open_checkpoint(path)
    write_checkpoint(ckpt, _entries(ckpt, "module."), tmp_path / "one.pt")
    again = open_checkpoint(tmp_path / "one.pt")
    (tmp_path / "x").mkdir()
    write_checkpoint(again, _entries(again), tmp_path / "x" / "one.pt")
    assert (tmp_path / "one.pt").read_bytes() == (tmp_path / "x" / "one.pt").read_bytes()


def test_fixing_a_whole_pickled_module_says_what_the_output_is(tmp_path: Path) -> None:
    """fix of torch.save(model) writes a plain state dict: its notes say so, and do not claim the
    output needs weights_only=False (the input did; the output loads with weights_only=True)."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1))
    torch.save(model, tmp_path / "model.pt")
    out = tmp_path / "sd.pt"
    result = run_cli("fix", tmp_path / "model.pt", "--add-prefix", "net.", "-o", out)
    assert result.exit_code == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "a plain state dict was written in its place" in text and "weights_only" not in text
    loaded = torch.load(out, weights_only=True)
    assert all(torch.equal(loaded["net." + k], v) for k, v in model.state_dict().items())


def test_left_out_entries_are_counted_past_the_listed_ones(tmp_path: Path) -> None:
    """A note that lists the first six entries left out says how many more there are."""
    names = ("epoch", "global_step", "version", "loops", "callbacks", "optimizer_states", "lr_schedulers",
             "hparams_name", "hyper_parameters")
    others = dict.fromkeys(names, 1)
    torch.save({"state_dict": {"w": torch.ones(2)}, **others}, tmp_path / "train.ckpt")
    result = run_cli("convert", tmp_path / "train.ckpt", tmp_path / "w.safetensors")
    assert result.exit_code == 0, result.stderr
    assert "`optimizer_states` and 3 more" in " ".join((result.stdout + result.stderr).split())
