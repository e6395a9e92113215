"""The CRC-32 a copy computes from both ends of the range equals zlib's over the whole range."""

from __future__ import annotations

import os
import random
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ckptdoctor.io import crc as crc_module
from ckptdoctor.io.atomic import SourceFiles, copy_range
from ckptdoctor.io.crc import crc32_combine


def test_combine_matches_zlib_over_any_split() -> None:
    rng = random.Random(7)
    data = rng.randbytes(70_000)
    for cut in [0, 1, 2, 7, 8, 1000, 34_567, 69_999, 70_000]:
        a, b = data[:cut], data[cut:]
        assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(data)


@pytest.mark.parametrize("length", [0, 1, 3 * 1024 + 5, 5 * 4096 + 17, 64 * 1024])
def test_copy_range_crc_from_both_ends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, length: int) -> None:
    """Small windows so that the pool thread and the copying thread each take several, in any order."""
    monkeypatch.setattr(crc_module, "WINDOW", 4096)
    data = random.Random(length).randbytes(length + 100)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    out = tmp_path / "out.bin"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT)
    try:
        with SourceFiles() as sources, ThreadPoolExecutor(max_workers=1) as pool:
            got = copy_range(sources, str(src), 50, length, fd, with_crc=True, pool=pool)
    finally:
        os.close(fd)
    assert out.read_bytes() == data[50:50 + length]
    assert got == zlib.crc32(data[50:50 + length])


@pytest.mark.parametrize("front_first", [0, 1, 3])
def test_split_crc_joins_front_and_back_windows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                front_first: int) -> None:
    """Windows taken from the front, then the rest from the back: the joined CRC is the whole range's."""
    monkeypatch.setattr(crc_module, "WINDOW", 4096)
    data = random.Random(front_first).randbytes(6 * 4096 + 123)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    with SourceFiles() as sources:
        split = crc_module.SplitCrc(sources, str(src), 10, len(data) - 10)
        for _ in range(front_first):  # the pool thread got this far before the copy finished
            index = split._claim(front=True)
            assert index is not None
            split._front = split._window(index, split._front)
        split.run_back()
        split.run_front()  # nothing left to claim
        assert split.value() == zlib.crc32(data[10:])
