"""Tests for ckptdoctor.formats.writers.read_back: the check every torch zip output passes before it
replaces OUT. Real torch.save files are rewritten; the read-back must agree with the general reader
on a good file and must refuse a file whose bytes differ from what the writer meant to write."""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from ckptdoctor.formats import open_checkpoint
from ckptdoctor.formats.writers.read_back import ReadBackError, read_back_torch_zip
from ckptdoctor.formats.writers.torch_zip import LOCAL, WrittenArchive, write_torch_archive
from ckptdoctor.model.checkpoint import TensorRecord


class Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(9, 4)
        self.proj = torch.nn.Linear(4, 9, bias=False)
        self.proj.weight = self.embed.weight
        self.norm = torch.nn.BatchNorm1d(4)


def _rewrite(tmp_path: Path) -> tuple[Path, WrittenArchive]:
    src, out = tmp_path / "src.pt", tmp_path / "out.pt"
    state = Tied().state_dict()
    state["view"] = state["embed.weight"][2:5]  # a view: same storage, another offset
    torch.save(state, src)
    ckpt = open_checkpoint(str(src))
    fd = os.open(out, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    try:
        archive = write_torch_archive(fd, str(out), ckpt.root)
    finally:
        os.close(fd)
    return out, archive


def _read_back(out: Path, archive: WrittenArchive) -> tuple[object, int]:
    return read_back_torch_zip(str(out), archive.prefix, archive.base, archive.size, archive.entries)


def test_read_back_agrees_with_the_reader_and_torch(tmp_path: Path) -> None:
    out, archive = _rewrite(tmp_path)
    root, storages = _read_back(out, archive)
    reader = open_checkpoint(str(out))
    assert isinstance(root, OrderedDict)
    ours = {k: v for k, v in root.items() if isinstance(v, TensorRecord)}
    theirs = {t.key: t.tensor for t in reader.tensors}
    assert list(ours) == list(theirs)
    for key, tensor in ours.items():
        other = theirs[key]
        assert (tensor.dtype, tensor.shape, tensor.stride, tensor.storage_offset) == (
            other.dtype, other.shape, other.stride, other.storage_offset)
        assert tensor.storage is not None and other.storage is not None
        assert tensor.storage.source == other.storage.source  # the same bytes of the file
    loaded = torch.load(out, weights_only=True)
    assert storages == len({t.untyped_storage().data_ptr() for t in loaded.values()})
    assert storages == len(archive.storages)


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def test_a_changed_pickle_byte_is_refused(tmp_path: Path) -> None:
    out, archive = _rewrite(tmp_path)
    name, _, _, offset = archive.entries[0]
    assert name.endswith(b"/data.pkl")
    header = out.read_bytes()[offset:offset + LOCAL.size]
    start = offset + LOCAL.size + LOCAL.unpack(header)[9] + LOCAL.unpack(header)[10]
    _flip(out, start + 10)
    with pytest.raises(ReadBackError, match=r"data\.pkl reads back"):
        _read_back(out, archive)


def test_a_changed_local_header_is_refused(tmp_path: Path) -> None:
    out, archive = _rewrite(tmp_path)
    name, _, _, offset = archive.entries[-3]  # a data/<key> record
    _flip(out, offset + 14)  # its CRC-32
    with pytest.raises(ReadBackError, match=re.escape(f"local header of {name.decode()}")):
        _read_back(out, archive)


def test_a_changed_directory_entry_is_refused(tmp_path: Path) -> None:
    out, archive = _rewrite(tmp_path)
    data = out.read_bytes()
    directory = data.rindex(b"PK\x01\x02")  # the last directory entry
    _flip(out, directory + 16)  # its CRC-32
    with pytest.raises(ReadBackError, match="directory entry of"):
        _read_back(out, archive)


def test_a_cut_file_is_refused(tmp_path: Path) -> None:
    out, archive = _rewrite(tmp_path)
    os.truncate(out, archive.size - 1)
    with pytest.raises(ReadBackError):
        _read_back(out, archive)
