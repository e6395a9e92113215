"""Casts against torch, element by element: every float dtype pair, every bit pattern (16-bit) or
a large random sample of them (32/64-bit), plus the specials: ±0, ±inf, NaN, subnormals, overflow."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from ckptdoctor.formats.writers.cast import cast_bytes
from tests.cli_helpers import run_cli

NAMES = {torch.float64: "float64", torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
INT = {8: torch.int64, 4: torch.int32, 2: torch.int16}
SPECIALS = [0.0, -0.0, float("inf"), -float("inf"), float("nan"), -float("nan"), 1e-45, -1e-45, 1e-40, 6e-8, 5.9e-8,
            6.1e-5, 65504.0, 65519.0, 65520.0, 3.3895e38, 3.4028e38, 1e39, 1.0 + 2**-8, 1.0 + 3 * 2**-8,
            1.0 + 2**-11, 1.0 + 3 * 2**-11, 1.0 + 2**-9 + 2**-30]


def every_pattern(dtype: torch.dtype, seed: int) -> torch.Tensor:
    size = torch.empty((), dtype=dtype).element_size()
    if size == 2:
        raw = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    else:
        gen = np.random.default_rng(seed)
        raw = torch.from_numpy(gen.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, size=300_000,
                                            dtype=np.int64).astype(np.int32 if size == 4 else np.int64))
    values = raw.view(dtype)
    return torch.cat([values, torch.tensor(SPECIALS, dtype=torch.float64).to(dtype)])


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.view(INT[t.element_size()]).numpy().tobytes()


@pytest.mark.parametrize(("src", "dst"), [p for p in itertools.permutations(NAMES, 2) if p[1] is not torch.float64])
def test_cast_matches_torch_bit_for_bit(src: torch.dtype, dst: torch.dtype) -> None:
    x = every_pattern(src, seed=hash((str(src), str(dst))) % 1000)
    want = x.to(dst)
    got = torch.frombuffer(bytearray(cast_bytes(raw_bytes(x), NAMES[src], NAMES[dst])), dtype=dst)
    assert got.shape == want.shape
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)  # NaN stays NaN, exactly where torch has one
    int_view = INT[want.element_size()]
    assert torch.equal(got.view(int_view)[~nan], want.view(int_view)[~nan])  # every other value bit for bit


def test_large_cast_streams_across_chunks(tmp_path: Path) -> None:
    """A tensor larger than the copy chunk (16 MiB), and a transposed view, cast through the CLI."""
    big = torch.randn(4100, 1100)  # 18 MB of float32
    sd = {"big": big, "t": torch.randn(300, 200).t(), "ids": torch.arange(10)}
    torch.save(sd, tmp_path / "src.pt")
    result = run_cli("convert", tmp_path / "src.pt", tmp_path / "o.safetensors", "--dtype", "bf16", "--verify")
    assert result.exit_code == 0, result.stderr
    got = safetensors.torch.load_file(tmp_path / "o.safetensors")
    assert torch.equal(got["big"], big.to(torch.bfloat16))
    assert torch.equal(got["t"], sd["t"].to(torch.bfloat16))
    assert torch.equal(got["ids"], sd["ids"])


def test_bf16_nan_alone_in_a_long_tensor() -> None:
    """One NaN (either sign) anywhere in a long float32 tensor, and +inf beside -inf, cast as torch does.

    The float32 → bfloat16 kernel looks for NaNs once per block of elements; a NaN at a block's
    first or last element, or in the short tail, must still be found."""
    x = torch.randn(3 * 131072 + 5, generator=torch.Generator().manual_seed(3))
    for i, value in [(0, float("nan")), (131071, -float("nan")), (131072 * 3 + 4, float("nan")),
                     (200000, float("inf")), (200001, -float("inf"))]:
        x[i] = value
    x.view(torch.int32)[300000] = 0x7F800001  # the smallest NaN payload: rounds to inf without the fix
    want = x.to(torch.bfloat16)
    got = torch.frombuffer(bytearray(cast_bytes(raw_bytes(x), "float32", "bfloat16")), dtype=torch.bfloat16)
    nan = torch.isnan(want)
    assert int(nan.sum()) == 4
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(got.view(torch.int16)[~nan], want.view(torch.int16)[~nan])


@pytest.mark.parametrize("mapped", [True, False])
def test_cast_pieces_by_position(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mapped: bool) -> None:
    """Tensors cut into several pieces, cast by two threads and written by position, read from a
    mapping or (where mapping fails) through the read buffer: every tensor as torch's ``.to``."""
    from ckptdoctor.formats.writers import cast_pipeline

    monkeypatch.setattr(cast_pipeline, "PIECE", 64 << 10)
    if not mapped:
        def refuse(*_args: object) -> None:
            raise OSError("no mapping here")
        monkeypatch.setattr(cast_pipeline, "_map", refuse)
    gen = torch.Generator().manual_seed(5)
    sd = {"a": torch.randn(300, 257, generator=gen), "ids": torch.arange(1000), "b": torch.randn(70_001, generator=gen),
          "h": torch.randn(999, generator=gen).half(), "d": torch.randn(40_000, generator=gen, dtype=torch.float64)}
    sd["b"][12345] = float("nan")
    torch.save(sd, tmp_path / "src.pt")
    result = run_cli("convert", tmp_path / "src.pt", tmp_path / "o.safetensors", "--dtype", "bf16", "--verify")
    assert result.exit_code == 0, result.stderr
    got = safetensors.torch.load_file(tmp_path / "o.safetensors")
    assert torch.equal(got["ids"], sd["ids"])
    for key in ("a", "b", "h", "d"):
        want = sd[key].to(torch.bfloat16)
        nan = torch.isnan(want)
        assert torch.equal(torch.isnan(got[key]), nan), key
        assert torch.equal(got[key].view(torch.int16)[~nan], want.view(torch.int16)[~nan]), key
