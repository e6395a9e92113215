"""Floating-point casts on raw little-endian bytes, bit for bit as torch's ``Tensor.to(dtype)`` gives them.

``convert --dtype`` streams tensors chunk by chunk through a :class:`CastKernel` (or
:func:`cast_bytes`, which uses one), so no torch import and no whole tensor in memory. numpy has
no bfloat16, so bfloat16 is handled as the top half of a float32 (uint16/uint32 views):

* widening (bfloat16/float16 → float32) is exact;
* float32 → bfloat16 rounds to nearest, ties to even, as c10's ``round_to_nearest_even``
  (c10/util/BFloat16.h): add ``0x7FFF + lsb`` and keep the top 16 bits, so overflow becomes
  inf and subnormals round like any other value;
* float32 → float16 is IEEE round-to-nearest-even (numpy's ``astype``, as F16C's
  ``vcvtps2ph`` that torch's CPU kernels use), subnormals and overflow to inf included;
* float64 goes through float32 first, as torch does (``c10::BFloat16``/``c10::Half`` are built
  from a ``float``), which is what makes ``float64 → bfloat16`` double-rounded in torch too.

NaNs stay NaNs at the same places. Their bit patterns are not part of the contract: torch itself
writes different ones for the same input depending on the tensor's length (vectorised body or
scalar tail). We write what its vectorised kernels write for long tensors: float32 → bfloat16
gives ``0xFFFF`` (``cvtfp32_bf16`` blends in all-ones), float16/float64 → bfloat16 ``0x7FC0``,
and other NaNs keep sign and top payload bits with the quiet bit set (F16C).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ckptdoctor.model.checkpoint import itemsize

# Elements per numpy pass. The float32 → bfloat16 kernel makes six passes over a block (and a
# NaN probe); 128 Ki elements (512 KiB in, 512 KiB of scratch) stay in one core's L2 cache, so
# only the first pass reads memory. Larger blocks measured up to 2x slower.
BLOCK = 1 << 17


def _to_f32(data: Any, src: str) -> tuple[Any, Any]:
    """(float32 values, NaN mask) of little-endian ``data`` holding ``src`` elements."""
    if src == "float32":
        values = np.frombuffer(data, dtype="<f4")
    elif src == "bfloat16":
        values = (np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    elif src == "float16":
        values = np.frombuffer(data, dtype="<f2").astype(np.float32)
    elif src == "float64":
        with np.errstate(over="ignore", invalid="ignore"):
            values = np.frombuffer(data, dtype="<f8").astype(np.float32)
    else:
        raise ValueError(f"cannot cast {src}")
    return values, np.isnan(values)


def _f32_to_bf16(values: Any, nan: Any, nan_bits: int) -> Any:
    # bits + 0x7FFF + lsb, top half. Only NaNs can wrap around 2**32, and they are overwritten below.
    bits = values.view(np.uint32)
    work = np.right_shift(bits, 16)
    np.bitwise_and(work, 1, out=work)
    np.add(work, 0x7FFF, out=work)
    np.add(work, bits, out=work)
    np.right_shift(work, 16, out=work)
    rounded = work.astype(np.uint16)
    if nan.any():
        rounded[nan] = nan_bits
    return rounded


def _f32_to_f16(values: Any, nan: Any) -> Any:
    with np.errstate(over="ignore", invalid="ignore"):
        half = values.astype(np.float16).view(np.uint16)
    if nan.any():
        bits = values.view(np.uint32)[nan]
        half[nan] = (((bits >> 16) & 0x8000) | 0x7E00 | ((bits >> 13) & 0x3FF)).astype(np.uint16)
    return half


def _generic(data: Any, src: str, dst: str) -> Any:
    """Any supported pair, as a new numpy array of ``dst`` elements (native order, little-endian hosts)."""
    values, nan = _to_f32(data, src)
    if dst == "float32":
        if src == "float16" and nan.any():  # quiet, as F16C's vcvtph2ps makes every NaN
            values = values.copy()
            values.view(np.uint32)[nan] |= 0x00400000
        return np.ascontiguousarray(values, dtype="<f4")
    if dst == "bfloat16":
        return _f32_to_bf16(values, nan, 0xFFFF if src == "float32" else 0x7FC0)
    if dst == "float16":
        return _f32_to_f16(values, nan)
    raise ValueError(f"cannot cast to {dst}")


class CastKernel:
    """Casts ``src`` elements into a caller's buffer, block by block, with reused scratch.

    One kernel per thread (the scratch is not shared). float32 → bfloat16, the cast that
    ``--dtype bf16`` spends its time in, runs on uint32 views with ``out=`` arguments: no
    allocation per block, one pass that reads memory, the result written straight into the
    output buffer. Other pairs go through :func:`_generic` block by block.
    """

    def __init__(self, src: str, dst: str) -> None:
        for name in (src, dst):
            if name not in ("float64", "float32", "float16", "bfloat16"):
                raise ValueError(f"cannot cast {src} to {dst}")
        self.src, self.dst = src, dst
        self.in_size, self.out_size = itemsize(src), itemsize(dst)
        self._fast = (src, dst) == ("float32", "bfloat16")
        self._work = np.empty(BLOCK, dtype=np.uint32) if self._fast else None

    def out_nbytes(self, in_nbytes: int) -> int:
        return in_nbytes // self.in_size * self.out_size

    def cast_into(self, data: Any, out: Any) -> None:
        """Write the cast of ``data`` (whole ``src`` elements) into ``out`` (exactly ``out_nbytes`` bytes)."""
        raw = memoryview(data).cast("B")
        count = raw.nbytes // self.in_size
        target = np.frombuffer(out, dtype=np.uint8, count=count * self.out_size)
        if self._fast:
            bits = np.frombuffer(raw, dtype="<u4", count=count)
            result = target.view(np.uint16)
            for start in range(0, count, BLOCK):
                self._bf16_block(bits[start:start + BLOCK], result[start:start + BLOCK])
            return
        step = BLOCK * self.in_size
        for start in range(0, count * self.in_size, step):
            block = _generic(raw[start:start + step], self.src, self.dst).view(np.uint8)
            begin = start // self.in_size * self.out_size
            target[begin:begin + len(block)] = block

    def _bf16_block(self, bits: Any, out: Any) -> None:
        assert self._work is not None
        work = self._work[:len(bits)]
        np.right_shift(bits, 16, out=work)
        np.bitwise_and(work, 1, out=work)
        np.add(work, 0x7FFF, out=work)
        np.add(work, bits, out=work)
        np.right_shift(work, 16, out=work)
        np.copyto(out, work, casting="unsafe")  # the top halves (measured faster than a strided uint16 view)
        # NaNs wrapped around or rounded to inf above. One read-only pass finds whether there is
        # any (np.maximum propagates NaN); only then is the exact mask computed.
        floats = bits.view("<f4")
        if np.isnan(np.maximum.reduce(floats)):
            out[np.isnan(floats)] = 0xFFFF  # cvtfp32_bf16's NaN


def cast_bytes(data: bytes, src: str, dst: str) -> bytes | memoryview:
    """``data`` (whole little-endian ``src`` elements) as ``dst`` elements, as torch's ``.to(dst)``.

    Returns a buffer over the result (no copy into ``bytes``)."""
    if src == dst:
        return data
    kernel = CastKernel(src, dst)
    out = bytearray(kernel.out_nbytes(len(data)))
    kernel.cast_into(data, out)
    return memoryview(out)
