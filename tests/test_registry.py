"""The reader registry: every reader declares itself, detection order and messages stay as the contract says."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from ckptdoctor.errors import UnsupportedFormat
from ckptdoctor.formats import detect_format
from ckptdoctor.formats.registry import directory_layouts, file_formats


def test_every_reader_registers() -> None:
    assert [f.name for f in file_formats()] == ["torch-zip", "safetensors", "torch-legacy"]
    assert [d.name for d in directory_layouts()] == ["hf-sharded", "dcp", "hf-single"]


def test_tar_refusal_comes_before_the_safetensors_sniff(tmp_path: Path) -> None:
    # 8-byte length + "{" would pass the safetensors sniff; "ustar" at 257 marks a pre-0.4 torch tar.
    data = bytearray(struct.pack("<Q", 300) + b"{" + b" " * 600)
    data[257:262] = b"ustar"
    path = tmp_path / "old.tar"
    path.write_bytes(bytes(data))
    with pytest.raises(UnsupportedFormat, match="a tar archive"):
        detect_format(str(path))


def test_directory_and_file_detection(tmp_path: Path) -> None:
    assert detect_format(str(tmp_path)) == "directory"
    (tmp_path / "x.bin").write_bytes(b"\x80\x02K\x01.")
    assert detect_format(str(tmp_path / "x.bin")) == "torch-legacy"
