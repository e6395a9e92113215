"""fix's in-place key rename of torch zips (formats/writers/key_rename.py).

Every output is loaded back by torch itself. Each test also says which writer it expects: a
spy records whether the in-place rename took the file (it declines whatever it cannot prove,
and the general writer then writes the file as before).
"""

from __future__ import annotations

import struct
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from ckptdoctor.formats.writers import key_rename
from tests.cli_helpers import run_cli
from tests.zoo import TinyNet, _seeded, _trained_optimizer

ALIGNMENT = 64


@pytest.fixture
def in_place(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Whether each write went through the in-place rename (True) or was declined (False)."""
    taken: list[bool] = []
    real = key_rename.rename_in_place

    def spy(*args: Any, **kwargs: Any) -> Any:
        result = real(*args, **kwargs)
        taken.append(result is not None)
        return result

    monkeypatch.setattr(key_rename, "rename_in_place", spy)
    return taken


class Wrapped(nn.Module):
    """What DataParallel / DDP put around a model: its keys and module prefixes gain ``module.``."""

    def __init__(self) -> None:
        super().__init__()
        self.module = _seeded(TinyNet)


def _fix(src: Path, out: Path, *flags: str) -> None:
    result = run_cli("fix", src, *flags, "-o", out)
    assert result.exit_code == 0, result.stderr
    assert "re-read and verified" in result.stdout


def _same_values(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride() \
            and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same_values(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same_values, a, b))
    return bool(a == b)


def _records(path: Path) -> list[tuple[str, int, int]]:
    with zipfile.ZipFile(path) as z:
        return [(i.filename, i.CRC, i.file_size) for i in z.infolist() if not i.filename.endswith("data.pkl")]


def _data_offsets(path: Path) -> list[int]:
    """Where each storage's bytes start (after its local header)."""
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        starts = []
        for info in z.infolist():
            if "/data/" in info.filename:
                f.seek(info.header_offset)
                header = f.read(30)
                name_len, extra_len = struct.unpack_from("<HH", header, 26)
                starts.append(info.header_offset + 30 + name_len + extra_len)
        return starts


def test_strip_renames_in_place_and_keeps_every_record(tmp_path: Path, in_place: list[bool]) -> None:
    state = {f"model.{k}": v for k, v in _seeded(TinyNet).state_dict().items()}
    src, out = tmp_path / "prefixed.pt", tmp_path / "fixed.pt"
    torch.save(state, src)
    _fix(src, out, "--strip", "model.")
    assert in_place == [True]
    loaded = torch.load(out, weights_only=True)
    assert type(loaded) is dict
    assert _same_values(loaded, {k.removeprefix("model."): v for k, v in state.items()})
    assert _records(out) == _records(src)  # every storage record as it was: same names, sizes, CRC-32s
    assert all(start % ALIGNMENT == 0 for start in _data_offsets(out))
    model = TinyNet()
    model.load_state_dict(loaded, strict=True)


def test_add_prefix_moves_module_versions_too(tmp_path: Path, in_place: list[bool]) -> None:
    model = _seeded(TinyNet)
    src, out = tmp_path / "plain.pt", tmp_path / "wrapped.pt"
    torch.save(model.state_dict(), src)
    _fix(src, out, "--add-prefix", "module.")
    assert in_place == [True]
    loaded = torch.load(out, weights_only=True)
    versions = model.state_dict()._metadata  # type: ignore[attr-defined]
    assert loaded._metadata == OrderedDict((f"module.{k}" if k else "module", v) for k, v in versions.items())
    wrapped = Wrapped()
    wrapped.load_state_dict(loaded, strict=True)
    assert _same_values(dict(loaded), dict(Wrapped().state_dict()))


def test_a_merging_module_prefix_goes_to_the_general_writer(tmp_path: Path, in_place: list[bool]) -> None:
    """DDP's `module` prefix becomes the root's "" entry: _metadata loses an entry, which a rename cannot express."""
    wrapped = Wrapped()
    src, out = tmp_path / "ddp.pt", tmp_path / "fixed.pt"
    torch.save(wrapped.state_dict(), src)
    _fix(src, out, "--strip", "module.")
    assert in_place == [False]
    loaded = torch.load(out, weights_only=True)
    assert loaded._metadata == TinyNet().state_dict()._metadata
    TinyNet().load_state_dict(loaded, strict=True)


def test_a_training_checkpoint_keeps_everything_else(tmp_path: Path, in_place: list[bool]) -> None:
    model = _seeded(TinyNet)
    optimizer = _trained_optimizer(model)
    checkpoint = {"epoch": 7, "model": OrderedDict((f"net.{k}", v) for k, v in model.state_dict().items()),
                  "optimizer": optimizer.state_dict(), "config": {"lr": 1e-3, "betas": (0.9, 0.999), "tag": "run-1"}}
    src, out = tmp_path / "train.pt", tmp_path / "fixed.pt"
    torch.save(checkpoint, src)
    _fix(src, out, "--strip", "net.")
    assert in_place == [True]
    loaded = torch.load(out, weights_only=True)
    expected = torch.load(src, weights_only=True)
    expected["model"] = OrderedDict((k.removeprefix("net."), v) for k, v in expected["model"].items())
    assert _same_values(loaded, expected)


def test_key_strings_shared_with_another_dict_are_not_renamed_there(tmp_path: Path, in_place: list[bool]) -> None:
    """An EMA copy built from the same key objects: the pickle's memo shares the strings, so renaming the
    opcode would rename the EMA's keys too. The general writer renames only the model's."""
    state = {f"model.{k}": v for k, v in _seeded(TinyNet).state_dict().items()}
    checkpoint = {"model": state, "ema": {k: v.clone() for k, v in state.items()}}
    src, out = tmp_path / "ema.pt", tmp_path / "fixed.pt"
    torch.save(checkpoint, src)
    _fix(src, out, "--entry", "model", "--strip", "model.")
    assert in_place == [False]
    loaded = torch.load(out, weights_only=True)
    assert list(loaded["model"]) == [k.removeprefix("model.") for k in state]
    assert list(loaded["ema"]) == list(state)


def test_equal_text_in_another_string_is_not_renamed(tmp_path: Path, in_place: list[bool]) -> None:
    """A list of parameter names with the same texts (other string objects): two opcodes per key text."""
    state = {f"model.{k}": v for k, v in _seeded(TinyNet).state_dict().items()}
    names = [(k + "!")[:-1] for k in state]  # equal texts, distinct objects
    src, out = tmp_path / "names.pt", tmp_path / "fixed.pt"
    torch.save({"model": state, "names": names}, src)
    _fix(src, out, "--entry", "model", "--strip", "model.")
    assert in_place == [False]
    loaded = torch.load(out, weights_only=True)
    assert list(loaded["model"]) == [k.removeprefix("model.") for k in state]
    assert loaded["names"] == list(state)


def test_protocol_4_frames_go_to_the_general_writer(tmp_path: Path, in_place: list[bool]) -> None:
    state = {f"model.{k}": v for k, v in _seeded(TinyNet).state_dict().items()}
    src, out = tmp_path / "p4.pt", tmp_path / "fixed.pt"
    torch.save(state, src, pickle_protocol=4)
    _fix(src, out, "--strip", "model.")
    assert in_place == [False]
    stripped = {k.removeprefix("model."): v for k, v in state.items()}
    assert _same_values(dict(torch.load(out, weights_only=True)), stripped)


def test_a_longer_pickle_moves_the_records_by_whole_alignment_units(tmp_path: Path, in_place: list[bool]) -> None:
    """Many keys growing by an odd length: the records after data.pkl move, their storages stay aligned."""
    state = {f"block.{i}.weight": torch.full((3,), float(i)) for i in range(500)}
    src, out = tmp_path / "many.pt", tmp_path / "fixed.pt"
    torch.save(state, src)
    _fix(src, out, "--add-prefix", "backbone.trunk.")
    assert in_place == [True]
    assert _records(out) == _records(src)
    assert all(start % ALIGNMENT == 0 for start in _data_offsets(out))
    loaded = torch.load(out, weights_only=True, mmap=True)
    assert _same_values(dict(loaded), {f"backbone.trunk.{k}": v for k, v in state.items()})


def _with_zip64_offsets(src: Path, dst: Path) -> None:
    """``src`` with every central-directory entry keeping its header offset in a zip64 extra field
    (as in archives over 4 GiB), and zip64 end records: the form the rename must patch in place."""
    data = src.read_bytes()
    end = data.rindex(b"PK\x05\x06")
    dir_size, dir_offset = struct.unpack_from("<II", data, end + 12)
    count = struct.unpack_from("<H", data, end + 10)[0]
    directory, at, entries = data[dir_offset:dir_offset + dir_size], 0, []
    while at < len(directory):
        fixed = bytearray(directory[at:at + 46])
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", fixed, 28)
        (offset,) = struct.unpack_from("<I", fixed, 42)
        name = directory[at + 46:at + 46 + name_len]
        extra = directory[at + 46 + name_len:at + 46 + name_len + extra_len]
        extra += struct.pack("<HHQ", 1, 8, offset)
        struct.pack_into("<HI", fixed, 30, len(extra), 0)
        struct.pack_into("<I", fixed, 42, 0xFFFFFFFF)
        entries.append(bytes(fixed) + name + extra + directory[at + 46 + name_len + extra_len:
                                                                at + 46 + name_len + extra_len + comment_len])
        at += 46 + name_len + extra_len + comment_len
    new_dir = b"".join(entries)
    body = data[:dir_offset]
    zip64_at = len(body) + len(new_dir)
    record = struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count, len(new_dir), len(body))
    locator = struct.pack("<4sIQI", b"PK\x06\x07", 0, zip64_at, 1)
    end_record = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    dst.write_bytes(body + new_dir + record + locator + end_record)


def test_zip64_offsets_are_moved(tmp_path: Path, in_place: list[bool]) -> None:
    state = {f"model.{k}": v for k, v in _seeded(TinyNet).state_dict().items()}
    torch.save(state, tmp_path / "small.pt")
    src, out = tmp_path / "zip64.pt", tmp_path / "fixed.pt"
    _with_zip64_offsets(tmp_path / "small.pt", src)
    assert _same_values(torch.load(src, weights_only=True), state)  # torch reads the zip64 form
    _fix(src, out, "--strip", "model.")
    assert in_place == [True]
    assert _same_values(torch.load(out, weights_only=True), {k.removeprefix("model."): v for k, v in state.items()})
    with zipfile.ZipFile(out) as z:
        assert z.testzip() is None
    assert all(start % ALIGNMENT == 0 for start in _data_offsets(out))
