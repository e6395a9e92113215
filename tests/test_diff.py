"""Value streaming (``formats.tensor_bytes``) and ``engines.diff`` on real files.

Every fixture is written by ``torch.save`` (zip and legacy) or ``safetensors`` from small real
modules or tensors, read back through ``open_checkpoint`` and compared with what torch itself
holds: chunked bytes must equal ``tensor.contiguous()``'s bytes for every dtype and view, and
diff results are checked field by field (exact differing counts and max differences).
"""

from __future__ import annotations

import math
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

from ckptdoctor.engines.diff import diff
from ckptdoctor.errors import CorruptCheckpoint
from ckptdoctor.formats import open_checkpoint
from ckptdoctor.formats import tensor_bytes as tb
from ckptdoctor.model.checkpoint import ByteRange, StorageInfo, TensorRecord
from tests.cli_helpers import run_cli


def small_net() -> nn.Module:
    """Linear → BatchNorm → Linear: float weights plus an int64 buffer (num_batches_tracked)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))
    net[1].running_mean.uniform_()
    return net


def float_net() -> nn.Module:
    """Only float32 parameters, so a dtype conversion touches every tensor."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2))


def save(obj: Any, path: Path, *, legacy: bool = False) -> Any:
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return open_checkpoint(path)


def logical_bytes(t: torch.Tensor) -> bytes:
    flat = t.contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


# ---------------------------------------------------------------- tensor_bytes

FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64, torch.complex128,
                torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz]
INT_DTYPES = [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.uint16, torch.uint32,
              torch.uint64, torch.bool]


def sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    if dtype == torch.bool:
        return torch.randn(shape, generator=g) > 0
    if dtype in INT_DTYPES:
        return torch.randint(0, 120, shape, generator=g).to(dtype)
    if dtype.is_complex:
        return torch.randn(shape, dtype=torch.complex128, generator=g).to(dtype)
    return (torch.randn(shape, generator=g) * 4).to(dtype)


def views(base: torch.Tensor) -> dict[str, torch.Tensor]:
    """Contiguous, transposed, strided-slice, permuted, expanded (stride 0), 0-d and empty views."""
    cube = base.reshape(3, 4, 5)
    return {
        "contiguous": base,
        "transpose": base.t(),
        "slice": base[1:5, ::3],
        "permute": cube.permute(2, 0, 1)[1:, :, ::2],
        "column": base[:, 2],
        "expand": base[0:1, :].expand(4, 15),
        "scalar": base[2, 3],
        "empty": base[:, 3:3],
    }


@pytest.mark.parametrize("dtype", FLOAT_DTYPES + INT_DTYPES, ids=str)
def test_chunks_equal_contiguous_bytes_for_every_dtype_and_view(tmp_path: Path,
                                                               dtype: torch.dtype) -> None:
    base = sample(dtype, (4, 15))
    tensors = views(base)
    ckpt = save(tensors, tmp_path / "v.pt")
    assert {t.key for t in ckpt} == set(tensors)
    for info in ckpt:
        expected = logical_bytes(tensors[info.key])
        for chunk_bytes in (1, 3, 7, 64, 1 << 20):
            chunks = list(tb.iter_tensor_chunks(info.tensor, chunk_bytes))
            assert b"".join(chunks) == expected, (info.key, chunk_bytes)
            isz = base.element_size()
            assert all(len(c) == max(isz, chunk_bytes // isz * isz) for c in chunks[:-1])


def test_chunks_of_a_large_transpose_stay_bounded(tmp_path: Path) -> None:
    base = torch.randn(300, 200)
    ckpt = save({"w": base.t()}, tmp_path / "t.pt")
    seen = []
    chunks = tb.iter_tensor_chunks(ckpt.tensors[0].tensor, 4096, progress=seen.append)
    out = b"".join(c for c in chunks if len(c) <= 4096)
    assert out == logical_bytes(base.t())
    assert sum(seen) == base.numel() * 4 and max(seen) == 4096


def test_legacy_and_safetensors_offsets(tmp_path: Path) -> None:
    base = torch.randn(6, 7)
    legacy = save({"v": base[2:, 1::2], "w": base}, tmp_path / "l.pth", legacy=True)
    for info in legacy:
        assert b"".join(tb.iter_tensor_chunks(info.tensor, 5)) == logical_bytes({"v": base[2:, 1::2], "w": base}[
            info.key])
    save_file({"a": base, "b": base[1:].clone()}, tmp_path / "s.safetensors")
    safe = open_checkpoint(tmp_path / "s.safetensors")
    assert b"".join(tb.iter_tensor_chunks(safe.by_key()["b"].tensor, 9)) == logical_bytes(base[1:])


def test_digest_is_stride_independent(tmp_path: Path) -> None:
    base = torch.randn(5, 9)
    ckpt = save({"view": base.t(), "copy": base.t().contiguous(), "other": base}, tmp_path / "d.pt")
    d = {t.key: tb.tensor_digest(t.tensor, chunk_bytes=8) for t in ckpt}
    assert d["view"] == d["copy"] != d["other"]
    import hashlib

    assert d["other"] == hashlib.sha256(logical_bytes(base)).hexdigest()


def test_big_endian_storage_is_swapped(tmp_path: Path) -> None:
    values = [1.5, -2.25, 3.0e10, 0.0, -7.0, 8.5]
    raw = tmp_path / "be.bin"
    raw.write_bytes(b"HEAD" + struct.pack(">6f", *values))
    storage = StorageInfo("0", "float32", 24, source=ByteRange(str(raw), 4, 24))
    record = TensorRecord("float32", (3, 2), (1, 3), storage=storage)  # a transpose of a 2x3
    got = b"".join(tb.iter_tensor_chunks(record, 4, byteorder="big"))
    expected = torch.tensor(values).reshape(2, 3).t()
    assert got == logical_bytes(expected)


def test_truncated_file_and_meta_tensor_are_typed_errors(tmp_path: Path) -> None:
    raw = tmp_path / "short.bin"
    raw.write_bytes(b"\0" * 10)
    record = TensorRecord("float32", (4,), (1,), storage=StorageInfo("0", "float32", 16,
                                                                     source=ByteRange(str(raw), 0, 16)))
    with pytest.raises(CorruptCheckpoint, match="truncated"):
        b"".join(tb.iter_tensor_chunks(record))
    outside = TensorRecord("float32", (5,), (1,), storage=record.storage)
    with pytest.raises(CorruptCheckpoint, match="reaches byte 20"):
        list(tb.iter_tensor_chunks(outside))
    with pytest.raises(tb.TensorBytesUnavailable):
        list(tb.iter_tensor_chunks(TensorRecord("float32", (4,), (1,))))


@pytest.mark.parametrize("name", sorted(tb.FLOAT8_TABLES))
def test_float8_tables_match_torch(name: str) -> None:
    expected = torch.arange(256, dtype=torch.uint8).view(getattr(torch, name)).to(torch.float64).tolist()
    for code, (mine, theirs) in enumerate(zip(tb.FLOAT8_TABLES[name], expected)):
        assert (math.isnan(mine) and math.isnan(theirs)) or mine == theirs, (name, hex(code), mine, theirs)


def test_compare_counts_and_max_exactly(tmp_path: Path) -> None:
    a = torch.randn(50, 40)
    b = a.clone()
    b[3, 7] += 0.5
    b[10, 0] -= 2.0
    b[20, 5] = float("nan")
    a[1, 1] = b[1, 1] = float("nan")  # NaN against NaN is equal
    ca = save({"w": a, "i": torch.arange(10)}, tmp_path / "a.pt")
    cb = save({"w": b, "i": torch.arange(10) * 2}, tmp_path / "b.pt")
    r = tb.compare_tensors(ca.by_key()["w"].tensor, cb.by_key()["w"].tensor, chunk_bytes=256)
    assert (r.equal, r.differing, r.max_abs_diff) == (False, 3, math.inf)
    r = tb.compare_tensors(ca.by_key()["i"].tensor, cb.by_key()["i"].tensor, chunk_bytes=16)
    assert (r.equal, r.differing, r.max_abs_diff) == (False, 9, 9.0)
    same = tb.compare_tensors(ca.by_key()["w"].tensor, ca.by_key()["w"].tensor)
    assert same == tb.ValueDiff(True, 0.0, 0)


def test_compare_across_dtypes_with_tolerance(tmp_path: Path) -> None:
    a = torch.randn(64, 33)
    ckpt = save({"f32": a, "bf16": a.to(torch.bfloat16), "f64": a.double(), "c": a.to(torch.complex64)},
                tmp_path / "x.pt")
    t = {i.key: i.tensor for i in ckpt}
    exact = tb.compare_tensors(t["f32"], t["f64"])
    assert exact.equal and exact.max_abs_diff == 0.0
    assert tb.compare_tensors(t["f32"], t["c"]).equal
    rounded = tb.compare_tensors(t["f32"], t["bf16"])
    expected_max = (a - a.to(torch.bfloat16).float()).abs().max().item()
    expected_count = int((a != a.to(torch.bfloat16).float()).sum())
    assert not rounded.equal and rounded.differing == expected_count
    assert rounded.max_abs_diff == pytest.approx(expected_max, rel=1e-12)
    assert tb.compare_tensors(t["f32"], t["bf16"], rtol=1e-2, atol=1e-6).equal
    assert not tb.compare_tensors(t["f32"], t["bf16"], rtol=1e-4).equal


# ---------------------------------------------------------------- diff


def test_identical_files(tmp_path: Path) -> None:
    sd = small_net().state_dict()
    a, b = save(sd, tmp_path / "a.pt"), save(sd, tmp_path / "b.pt")
    r = diff(a, b, values=True)
    assert r.identical and not (r.only_in_a or r.only_in_b or r.shape_changed or r.dtype_changed
                                or r.value_changed or r.explanations)
    doc = r.to_json_dict()
    assert doc["schema_version"] == 1 and doc["identical"] is True
    assert {"only_in_a", "only_in_b", "shape_changed", "dtype_changed", "value_changed"} <= set(doc)


def test_one_value_changed(tmp_path: Path) -> None:
    sd = small_net().state_dict()
    a = save(sd, tmp_path / "a.pt")
    changed = {k: v.clone() for k, v in sd.items()}
    changed["3.weight"][1, 2] += 0.75
    b = save(changed, tmp_path / "b.pt")
    assert diff(a, b).identical  # keys, shapes and dtypes agree; values not asked for
    r = diff(a, b, values=True)
    assert not r.identical
    assert [(c.key, c.differing_elements, c.numel) for c in r.value_changed] == [("3.weight", 1, 15)]
    assert r.value_changed[0].max_abs_diff == pytest.approx(0.75, abs=1e-6)
    assert r.to_json_dict()["value_changed"][0]["key"] == "3.weight"
    assert any("1 of 9 compared tensors differ in value" in e for e in r.explanations)


def test_half_precision_copy(tmp_path: Path) -> None:
    sd = float_net().state_dict()
    a = save(sd, tmp_path / "a.pt")
    b = save({k: v.half() for k, v in sd.items()}, tmp_path / "b.pt")
    r = diff(a, b)
    assert not r.identical and len(r.dtype_changed) == len(sd) == 6
    assert {(c.dtype_a, c.dtype_b) for c in r.dtype_changed} == {("float32", "float16")}
    assert "all 6 tensors changed dtype float32 → float16" in r.explanations
    assert diff(a, b, values=True, atol=1e-3).value_changed == ()
    strict = diff(a, b, values=True, atol=1e-7)
    assert {c.key for c in strict.value_changed} == set(sd)

    mixed = small_net().state_dict()  # num_batches_tracked stays int64
    c = save(mixed, tmp_path / "c.pt")
    d = save({k: v.half() if v.is_floating_point() else v for k, v in mixed.items()}, tmp_path / "d.pt")
    assert "all 8 float32 tensors changed dtype to float16 (1 other tensor kept its dtype)" in diff(c, d).explanations


def test_data_parallel_prefix_is_explained(tmp_path: Path) -> None:
    net = small_net()
    a = save(net.state_dict(), tmp_path / "plain.pt")
    b = save(nn.DataParallel(net).state_dict(), tmp_path / "wrapped.pt")
    r = diff(a, b, values=True)
    assert not r.identical and not r.only_in_a and not r.only_in_b
    assert r.renamed == tuple((k, "module." + k) for k in net.state_dict())
    assert r.explanations[:2] == ("every key of B is A's key with `module.` prepended",
                                  "after that, the files are identical")
    back = diff(b, a)
    assert back.explanations[0] == "every key of B is A's key without the leading `module.`"


def test_keys_and_shapes_that_really_differ(tmp_path: Path) -> None:
    sd = small_net().state_dict()
    a = save(sd, tmp_path / "a.pt")
    other = dict(sd)
    other["3.weight"] = torch.zeros(4, 5)
    other["3.bias"] = torch.zeros(4)
    del other["1.running_var"]
    other["extra.scale"] = torch.ones(2, 2, 2)
    r = diff(a, save(other, tmp_path / "b.pt"))
    assert not r.identical
    assert r.only_in_a == ("1.running_var",) and r.only_in_b == ("extra.scale",)
    assert [(c.key, c.shape_a, c.shape_b) for c in r.shape_changed] == [("3.weight", (3, 5), (4, 5)),
                                                                       ("3.bias", (3,), (4,))]


def test_every_format_of_the_same_weights_is_identical(tmp_path: Path) -> None:
    sd = small_net().state_dict()
    zipped = save(sd, tmp_path / "z.pt")
    legacy = save(sd, tmp_path / "l.pth", legacy=True)
    save_file(dict(sd), tmp_path / "s.safetensors")
    safe = open_checkpoint(tmp_path / "s.safetensors")
    assert (zipped.format, legacy.format, safe.format) == ("torch-zip", "torch-legacy", "safetensors")
    for x, y in ((zipped, legacy), (legacy, safe), (safe, zipped)):
        assert diff(x, y, values=True).identical


def test_views_and_tied_weights_compare_by_value(tmp_path: Path) -> None:
    base = torch.randn(6, 10)
    a = save({"t": base.t(), "s": base[::2, 1:], "tied": base, "tied2": base}, tmp_path / "views.pt")
    b = save({"t": base.t().contiguous(), "s": base[::2, 1:].contiguous(), "tied": base.clone(),
              "tied2": base.clone()}, tmp_path / "copies.pt")
    r = diff(a, b, values=True)
    assert r.identical
    assert any(line.startswith("A stores `s`, `t`, `tied`") for line in r.explanations)


def test_diff_with_itself_is_empty(tmp_path: Path) -> None:
    a = save(small_net().state_dict(), tmp_path / "a.pt")
    r = diff(a, a, values=True)
    assert r.identical and r.explanations == () and r.tensors_a == r.tensors_b == 9


DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool])


@st.composite
def state_dicts(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    n = draw(st.integers(1, 5))
    keys = draw(st.lists(st.from_regex(r"[a-z]{1,4}(\.[a-z0-9]{1,3}){0,2}", fullmatch=True), min_size=n,
                         max_size=n, unique=True))
    out = {}
    for key in keys:
        shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
        out[key] = sample(draw(DTYPES), shape)
        if len(shape) == 2 and draw(st.booleans()):
            out[key] = out[key].t()
    return out


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sd=state_dicts())
def test_roundtrip_diff_is_empty(sd: dict[str, torch.Tensor]) -> None:
    with tempfile.TemporaryDirectory() as d:
        a = save(sd, Path(d) / "a.pt")
        assert diff(a, a, values=True).identical
        save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(d, "b.safetensors"))
        r = diff(a, open_checkpoint(os.path.join(d, "b.safetensors")), values=True)
        assert r.identical, r


def test_fast_byte_path_agrees_with_the_general_path(tmp_path):  # type: ignore[no-untyped-def]
    """Mapped-window equality (contiguous, same dtype) and the chunked decoder give the same answer."""
    import torch

    from ckptdoctor.formats import open_checkpoint, tensor_bytes

    base = torch.arange(3 * 1024 * 1024 + 3, dtype=torch.float32)  # spans several windows, odd length
    other = base.clone()
    other[-1] += 1
    torch.save({"t": base}, tmp_path / "a.pt")
    torch.save({"t": base.clone()}, tmp_path / "same.pt")
    torch.save({"t": other}, tmp_path / "b.pt")
    a, same, b = (open_checkpoint(tmp_path / n).tensors[0].tensor for n in ("a.pt", "same.pt", "b.pt"))
    old_window = tensor_bytes._WINDOW
    tensor_bytes._WINDOW = 1 << 20
    try:
        assert tensor_bytes.bytes_equal(a, same) is True
        assert tensor_bytes.bytes_equal(a, b) is False
        diff = tensor_bytes.compare_tensors(a, b)
        assert (diff.equal, diff.differing, diff.max_abs_diff) == (False, 1, 1.0)
        assert tensor_bytes.compare_tensors(a, same).equal
    finally:
        tensor_bytes._WINDOW = old_window


def test_a_tied_weight_stored_once_is_explained(tmp_path: Path) -> None:
    """torch.save keeps a tied lm_head as a second name of the embedding; safetensors stores it once:
    diff says the key only A has is the same tensor as one both have."""
    embed = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = embed.weight
    sd = {"wte.weight": embed.weight.detach(), "lm_head.weight": head.weight.detach(), "ln.weight": torch.ones(4)}
    torch.save(sd, tmp_path / "a.pt")
    save_file({"wte.weight": sd["wte.weight"].clone(), "ln.weight": sd["ln.weight"]}, tmp_path / "b.safetensors")
    doc = run_cli("diff", tmp_path / "a.pt", tmp_path / "b.safetensors", "--json").json()
    assert doc["only_in_a"] == ["lm_head.weight"]
    assert any("lm_head.weight` in A is the same tensor as `wte.weight" in line for line in doc["explanations"])
