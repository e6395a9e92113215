"""One safetensors dtype table: the reader, the writer and scan accept the same dtypes.

scan once had its own copy without F8_E4M3FNUZ / F8_E5M2FNUZ and flagged files ``fix`` writes.
Each dtype is checked with a real file: hand-built for every name the format defines, and
written by ckptdoctor's own writer for every torch dtype it can store.
"""

from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path

import pytest
import torch

from ckptdoctor.engines.scanning.scan import scan
from ckptdoctor.errors import UnsupportedFormat
from ckptdoctor.formats import open_checkpoint
from ckptdoctor.formats.readers.safetensors import SAFETENSORS_DTYPES, UNREPRESENTABLE_DTYPES, safetensors_bits
from ckptdoctor.formats.writers.rewrite import write_checkpoint
from ckptdoctor.formats.writers.safetensors import TORCH_TO_SAFETENSORS

ALL_FORMAT_DTYPES = sorted(set(SAFETENSORS_DTYPES) | UNREPRESENTABLE_DTYPES)


def _safetensors(st_dtype: str, n: int = 4) -> bytes:
    bits = safetensors_bits(st_dtype)
    assert bits is not None
    nbytes = n * bits // 8
    header = json.dumps({"t": {"dtype": st_dtype, "shape": [n], "data_offsets": [0, nbytes]}}).encode()
    return struct.pack("<Q", len(header)) + header + b"\0" * nbytes


def test_fnuz_float8_are_in_the_one_table() -> None:
    assert {"F8_E4M3FNUZ", "F8_E5M2FNUZ"} <= set(SAFETENSORS_DTYPES)
    assert safetensors_bits("F8_E4M3FNUZ") == 8 and safetensors_bits("F4") == 4 and safetensors_bits("XX") is None


@pytest.mark.parametrize("st_dtype", ALL_FORMAT_DTYPES)
def test_scan_and_reader_agree_on_every_format_dtype(tmp_path: Path, st_dtype: str) -> None:
    p = tmp_path / "t.safetensors"
    p.write_bytes(_safetensors(st_dtype))
    (f,) = scan(p).files
    assert f.safe and f.anomalies == (), f.anomalies
    if st_dtype in UNREPRESENTABLE_DTYPES:
        with pytest.raises(UnsupportedFormat, match="no dtype for"):
            open_checkpoint(p)
    else:
        (t,) = open_checkpoint(p).tensors
        assert t.tensor.dtype == SAFETENSORS_DTYPES[st_dtype]


def test_scan_rejects_what_the_reader_rejects(tmp_path: Path) -> None:
    header = json.dumps({"t": {"dtype": "F12", "shape": [1], "data_offsets": [0, 2]}}).encode()
    p = tmp_path / "bad.safetensors"
    p.write_bytes(struct.pack("<Q", len(header)) + header + b"\0\0")
    (f,) = scan(p).files
    assert "bad-dtype" in {a.code for a in f.anomalies}
    with pytest.raises(Exception, match="unknown dtype"):
        open_checkpoint(p)


@pytest.mark.parametrize("torch_dtype", sorted(TORCH_TO_SAFETENSORS))
def test_every_dtype_the_writer_writes_is_read_back_and_scanned_safe(tmp_path: Path, torch_dtype: str) -> None:
    src = tmp_path / "in.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save({"t": torch.zeros(4, dtype=getattr(torch, torch_dtype))}, src)
    ckpt = open_checkpoint(src)
    out = tmp_path / "out.safetensors"
    write_checkpoint(ckpt, [(t.key, t.tensor) for t in ckpt.tensors], out)
    (f,) = scan(out).files
    assert f.safe and f.anomalies == (), f.anomalies
    (t,) = open_checkpoint(out).tensors
    assert t.tensor.dtype == torch_dtype
    data = out.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    assert json.loads(data[8 : 8 + n])["t"]["dtype"] == TORCH_TO_SAFETENSORS[torch_dtype]
