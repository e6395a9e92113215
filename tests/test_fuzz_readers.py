"""Byte-level fuzzing of the readers: a mutated checkpoint is read, or refused with a CkptDoctorError.

Small valid files (torch zip, legacy torch.save, safetensors) are made once; hypothesis applies
random mutations (bit flips, truncation, insertion, overwritten and deleted ranges), biased towards
the bytes that steer the parsers: ``data.pkl`` inside the zip (also re-zipped with a correct CRC so
the pickle reader itself sees the damage) and the safetensors header. ``open_checkpoint`` must
succeed or raise :class:`~ckptdoctor.errors.CkptDoctorError`, never anything else; when it succeeds,
reading every tensor's bytes must obey the same rule. ``ckptdoctor inspect`` must exit 0 or 2 without
a traceback.
"""

from __future__ import annotations

import io
import json
import os
import pickletools
import struct
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from ckptdoctor.errors import CkptDoctorError
from ckptdoctor.formats import open_checkpoint
from ckptdoctor.formats.tensor_bytes import iter_tensor_chunks
from tests.cli_helpers import run_cli

# CKPT_FUZZ_N=5000 runs a longer, randomised search; by default a fixed, fast set of examples.
_N = os.environ.get("CKPT_FUZZ_N")
SETTINGS = settings(max_examples=int(_N or 45), deadline=None, derandomize=not _N, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _state() -> dict[str, object]:
    torch.manual_seed(0)
    w = torch.randn(4, 3)
    return {
        "layer.weight": w,
        "layer.tied": w,  # shared storage
        "layer.view": w[1:3, ::2],
        "bn.running_mean": torch.zeros(3, dtype=torch.float16),
        "bn.num_batches_tracked": torch.tensor(5),
        "emb": torch.arange(6, dtype=torch.int32).reshape(2, 3),
    }


def _training() -> dict[str, object]:
    return {"epoch": 2, "state_dict": _state(), "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}}


@dataclass(frozen=True)
class Base:
    name: str
    data: bytes
    focus: tuple[int, int]  # byte range the parsers care most about
    pickle: bytes | None = None  # data.pkl of a zip, for re-zipping


def _zip_focus(data: bytes) -> tuple[bytes, tuple[int, int]]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("data.pkl"))
        pkl = z.read(info)
    start = data.index(pkl)
    return pkl, (start, start + len(pkl))


def _rezip(original: bytes, new_pickle: bytes) -> bytes:
    """The same archive with data.pkl replaced (correct CRC and sizes), members in order."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(original)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            body = new_pickle if info.filename.endswith("data.pkl") else src.read(info)
            dst.writestr(info.filename, body)
    return out.getvalue()


def _make_bases() -> dict[str, Base]:
    bases: dict[str, Base] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, obj in (("zip_state", _state()), ("zip_training", _training())):
            buf = io.BytesIO()
            torch.save(obj, buf)
            data = buf.getvalue()
            pkl, focus = _zip_focus(data)
            bases[name] = Base(name, data, focus, pkl)
        buf = io.BytesIO()
        torch.save(_training(), buf, _use_new_zipfile_serialization=False)
        data = buf.getvalue()
        bases["legacy"] = Base("legacy", data, (0, min(len(data), 1200)))
        tensors = {k: v.contiguous().clone() for k, v in _state().items()}  # type: ignore[union-attr]
        path = Path(__import__("tempfile").mkdtemp()) / "x.safetensors"
        save_file(tensors, str(path), metadata={"format": "pt"})
        data = path.read_bytes()
        path.unlink()
        path.parent.rmdir()
        header = struct.unpack("<Q", data[:8])[0]
        bases["safetensors"] = Base("safetensors", data, (0, 8 + header))
    return bases


BASES = _make_bases()


# ---------------------------------------------------------------- mutations


@st.composite
def mutated(draw: st.DrawFn, base_name: str) -> bytes:
    base = BASES[base_name]
    data = base.data
    if base.pickle is not None:
        how = draw(st.sampled_from(["bytes", "pickle", "pickle-int"]))
        if how == "pickle":
            # damage the pickle itself and re-zip it with a valid CRC: the unpickler sees the damage
            return _rezip(data, _mutate(draw, base.pickle, (0, len(base.pickle))))
        if how == "pickle-int":
            # a well-formed pickle that lies: a shape, stride, storage offset or size replaced
            return _rezip(data, _lie_about_an_int(draw, base.pickle))
    if base.name == "safetensors" and draw(st.booleans()):
        return _lie_in_header(draw, data)
    return _mutate(draw, data, base.focus)


def _lie_in_header(draw: st.DrawFn, data: bytes) -> bytes:
    """Valid JSON, correct length prefix, but a shape, dtype or offset that lies."""
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    names = sorted(k for k in header if k != "__metadata__")
    for _ in range(draw(st.integers(1, 3))):
        entry = header[draw(st.sampled_from(names))]
        field_name = draw(st.sampled_from(["shape", "dtype", "data_offsets", "extra"]))
        if field_name == "dtype":
            entry["dtype"] = draw(st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "F4",
                                                   "C64", "Q4", "", 7, None]))
        elif field_name == "extra":
            entry[draw(st.sampled_from(["shape", "data_offsets"]))] = draw(st.sampled_from(
                [None, "x", [], [[1]], [1.5], {"a": 1}, [True], [-1, 4]]))
        else:
            current = entry.get(field_name)
            values = list(current) if isinstance(current, list) else []
            if values and draw(st.booleans()):
                values[draw(st.integers(0, len(values) - 1))] = draw(st.sampled_from(_EXTREME_INTS))
            else:
                values.append(draw(st.sampled_from(_EXTREME_INTS)))
            entry[field_name] = values
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + data[8 + n:]


_EXTREME_INTS = [0, -1, 1, 3, 7, 255, 2**31 - 1, -(2**31), 2**40, 2**63 - 1, 2**64 + 5, -(2**70)]


def _int_ops(pkl: bytes) -> list[tuple[int, int]]:
    """(position, length) of every integer opcode with its argument."""
    ops = list(pickletools.genops(pkl))
    found = []
    for (op, _arg, pos), nxt in zip(ops, [*ops[1:], None], strict=True):
        if op.name in {"BININT", "BININT1", "BININT2", "LONG1"} and pos is not None:
            end = nxt[2] if nxt is not None and nxt[2] is not None else len(pkl)
            found.append((pos, end - pos))
    return found


def _encode_int(value: int) -> bytes:
    if -(2**31) <= value < 2**31:
        return b"J" + struct.pack("<i", value)
    body = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(body)]) + body


def _lie_about_an_int(draw: st.DrawFn, pkl: bytes) -> bytes:
    ops = _int_ops(pkl)
    out = pkl
    for pos, length in sorted(draw(st.lists(st.sampled_from(ops), min_size=1, max_size=3, unique=True)),
                              reverse=True):
        out = out[:pos] + _encode_int(draw(st.sampled_from(_EXTREME_INTS))) + out[pos + length:]
    return out


def _mutate(draw: st.DrawFn, data: bytes, focus: tuple[int, int]) -> bytes:
    buf = bytearray(data)
    for _ in range(draw(st.sampled_from([1, 1, 1, 2, 3]))):
        size = len(buf)
        lo, hi = (focus[0], min(focus[1], size)) if draw(st.booleans()) and focus[0] < min(focus[1], size) \
            else (0, size)
        pos = draw(st.integers(lo, max(lo, hi - 1))) if size else 0
        op = draw(st.sampled_from(["flip", "truncate", "insert", "overwrite", "delete", "int"]))
        if op == "flip" and size:
            buf[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del buf[pos:]
        elif op == "insert":
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=16))
            buf[pos:pos + len(chunk)] = chunk
        elif op == "delete":
            del buf[pos:pos + draw(st.integers(1, 32))]
        elif op == "int" and size:
            # an extreme little-endian integer: lengths, offsets, sizes, memo indexes
            value = draw(st.sampled_from([0, 1, 0x7F, 0xFF, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 62, (1 << 64) - 1]))
            width = draw(st.sampled_from([1, 2, 4, 8]))
            buf[pos:pos + width] = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
    return bytes(buf)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def read_fully(path: Path) -> None:
    """open_checkpoint, then every tensor's metadata and bytes: only CkptDoctorError may escape."""
    try:
        ckpt = open_checkpoint(path)
        for info in ckpt:
            assert isinstance(info.key, str)
            assert all(isinstance(s, int) and s >= 0 for s in info.shape)
            assert info.nbytes >= 0
            got = sum(len(chunk) for chunk in iter_tensor_chunks(info.tensor))
            assert got == info.nbytes, (info.key, got, info.nbytes)
    except CkptDoctorError as exc:
        assert str(exc)
        assert exc.exit_code in (1, 2)


def _write(work: Path, name: str, data: bytes) -> Path:
    path = work / name
    path.write_bytes(data)
    return path


def test_bases_read_cleanly(work: Path) -> None:
    """The unmutated files are read in full (so every mutation starts from a working reader)."""
    for base in BASES.values():
        suffix = ".safetensors" if base.name == "safetensors" else ".pt"
        ckpt = open_checkpoint(_write(work, base.name + suffix, base.data))
        assert "layer.weight" in ckpt.by_key() or "state_dict" in str(ckpt.state_dict_path)
        assert len(ckpt) == 6
        read_fully(work / (base.name + suffix))
    # re-zipping an unchanged pickle keeps a readable archive
    z = BASES["zip_state"]
    assert z.pickle is not None
    assert len(open_checkpoint(_write(work, "rezip.pt", _rezip(z.data, z.pickle)))) == 6


@SETTINGS
@given(data=mutated("zip_state"))
def test_fuzz_torch_zip(work: Path, data: bytes) -> None:
    read_fully(_write(work, "zip_state.pt", data))


@SETTINGS
@given(data=mutated("zip_training"))
def test_fuzz_torch_zip_training_checkpoint(work: Path, data: bytes) -> None:
    read_fully(_write(work, "zip_training.bin", data))


@SETTINGS
@given(data=mutated("legacy"))
def test_fuzz_legacy(work: Path, data: bytes) -> None:
    read_fully(_write(work, "legacy.pt", data))


@SETTINGS
@given(data=mutated("safetensors"))
def test_fuzz_safetensors(work: Path, data: bytes) -> None:
    read_fully(_write(work, "model.safetensors", data))


@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(which=st.sampled_from(sorted(BASES)), data=st.data())
def test_fuzz_inspect_cli(work: Path, which: str, data: st.DataObject) -> None:
    blob = data.draw(mutated(which))
    suffix = ".safetensors" if which == "safetensors" else ".pth"
    path = _write(work, "cli" + suffix, blob)
    r = run_cli("inspect", str(path))
    assert r.exit_code in (0, 2), (r.exit_code, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout
    if r.exit_code == 2:
        assert r.stderr.startswith("Error:")
        assert "ckptdoctor bug" not in r.stderr, r.stderr


# ---------------------------------------------------------------- cases the fuzzer found, pinned



def _central_version(data: bytes, version: int) -> bytes:
    """Every central directory entry claims it needs zip version ``version`` / 10 to extract."""
    buf = bytearray(data)
    pos = buf.find(b"PK\x01\x02")
    assert pos > 0
    while pos > 0:
        buf[pos + 6:pos + 8] = struct.pack("<H", version)
        pos = buf.find(b"PK\x01\x02", pos + 4)
    return bytes(buf)


def test_zip_declaring_an_unsupported_version_reads_like_torch(work: Path) -> None:
    """Found by the fuzzer: zipfile refuses "version needed to extract" above 6.3 while torch ignores it."""
    data = _central_version(BASES["zip_state"].data, 127)
    path = _write(work, "zip_version.pt", data)
    assert open_checkpoint(path).keys() == list(torch.load(io.BytesIO(data), weights_only=True))


def test_zip_declaring_an_unsupported_version_scans(work: Path) -> None:
    """torch.load (miniz) ignores the version field and loads the file; scan agrees (or flags it), cleanly."""
    data = _central_version(BASES["zip_state"].data, 127)
    assert "layer.weight" in torch.load(io.BytesIO(data), weights_only=True)
    r = run_cli("scan", str(_write(work, "zip_version_scan.pt", data)))
    assert r.exit_code in (0, 1), r.stderr
    assert "Traceback" not in r.stderr and "ckptdoctor bug" not in r.stderr


def test_zip_declaring_an_unsupported_version_through_inspect(work: Path) -> None:
    r = run_cli("inspect", str(_write(work, "zip_version_inspect.pt", _central_version(BASES["zip_state"].data, 127))))
    assert r.exit_code in (0, 2) and "Traceback" not in r.stderr
    assert "ckptdoctor bug" not in r.stderr and "NotImplementedError" not in r.stderr, r.stderr
