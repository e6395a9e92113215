"""scan reads pickles as CPython does: FRAME boundaries and per-read argument sizes.

The reference is CPython itself. A recording unpickler -- the real C ``pickle.Unpickler`` (or
the pure-Python ``pickle._Unpickler``) with ``find_class`` overridden to return a harmless
recorder -- shows which globals CPython imports and calls for a given byte string; scan must
report every one of them. Nothing from a pickle is ever executed for real.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckptdoctor.engines.scanning.scan import DANGEROUS, FileScan, scan
from tests.hostile import (
    REDUCE,
    TUPLE1,
    ZipEntry,
    build_zip,
    frame_divergence_pickle,
    glob,
    torch_members,
    touch_cmd,
    unicode_line,
)


class _Recorded(Exception):
    pass


def _recorders() -> dict[str, type]:
    """Unpicklers whose globals are recorders: {"C": ..., "Python": ...}."""

    def find_class(self: Any, module: str, name: str) -> Any:
        self.imported.append(f"{module}.{name}")

        def recorder(*args: object) -> str:
            self.called.append(f"{module}.{name}")
            return "recorded"

        return recorder

    out = {}
    for label, base in (("C", pickle.Unpickler), ("Python", pickle._Unpickler)):  # type: ignore[attr-defined]
        out[label] = type(f"Recording{label}", (base,), {"find_class": find_class})
    return out


def cpython_imports(data: bytes) -> dict[str, tuple[list[str], list[str], bool]]:
    """{unpickler: (imported, called, finished)} for *data* read from an io.BytesIO, as torch.load does."""
    out = {}
    for label, cls in _recorders().items():
        u = cls(io.BytesIO(data))
        u.imported, u.called = [], []
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                u.load()
            finished = True
        except Exception:
            finished = False
        out[label] = (u.imported, u.called, finished)
    return out


def _scan_bytes(tmp_path: Path, data: bytes, name: str = "x.pkl") -> FileScan:
    p = tmp_path / name
    p.write_bytes(data)
    (f,) = scan(p).files
    return f


def _hidden(marker: Path) -> bytes:
    return glob("os", "system") + unicode_line(touch_cmd(marker)) + TUPLE1 + REDUCE


def test_fickling_frame_divergence_raw_pickle(tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    data = frame_divergence_pickle(_hidden(marker))
    # the trick: a linear reader sees no global at all ...
    assert not any(op.name == "GLOBAL" for op, _a, _p in pickletools.genops(data))
    # ... while CPython's C unpickler reading a file imports and calls os.system (before
    # 3.13.15; newer ones refuse the frame, like the pure-Python unpickler always did)
    ran = cpython_imports(data)
    assert not ran["Python"][2]
    c_imported, c_called, c_finished = ran["C"]
    if c_finished:
        assert c_called == ["os.system"]
    f = _scan_bytes(tmp_path, data)
    assert not f.safe
    codes = {a.code for a in f.anomalies}
    assert {"frame-violation", "weights-only-refused"} <= codes
    by_name = {g.name: g for g in f.globals}
    assert by_name["os.system"].verdict == DANGEROUS and by_name["os.system"].called
    assert "C unpickler" in by_name["os.system"].where
    assert set(c_imported) <= set(by_name)
    assert not marker.exists()


def test_fickling_frame_divergence_in_a_torch_zip(tmp_path: Path) -> None:
    import torch

    marker = tmp_path / "MARKER"
    torch.manual_seed(0)
    members = torch_members({"w": torch.randn(2, 3)})
    assert members[0].name == "archive/data.pkl"
    members[0] = ZipEntry("archive/data.pkl", frame_divergence_pickle(_hidden(marker)))
    p = tmp_path / "model.pt"
    p.write_bytes(build_zip(members))
    # torch.load(weights_only=True) refuses it (its unpickler lacks UNICODE, FRAME...) and runs nothing
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Detected pickle protocol 5"
        with pytest.raises(pickle.UnpicklingError, match="Unsupported operand"):
            torch.load(p, weights_only=True)
    assert not marker.exists()
    # torch.load(weights_only=False) hands data.pkl to the C unpickler through io.BytesIO
    with zipfile.ZipFile(p) as z:
        c_imported, c_called, c_finished = cpython_imports(z.read("archive/data.pkl"))["C"]
    assert c_called == (["os.system"] if c_finished else c_called)
    (f,) = scan(p).files
    assert f.format == "torch-zip" and not f.safe
    assert "frame-violation" in {a.code for a in f.anomalies}
    dangerous = {g.name for g in f.globals if g.verdict == DANGEROUS}
    assert dangerous == {"os.system"}
    assert set(c_imported) <= {g.name for g in f.globals}


def _framed(body: bytes, declared: int) -> bytes:
    return b"\x80\x05\x95" + struct.pack("<Q", declared) + body


@pytest.mark.parametrize(
    "data",
    [
        _framed(b"B" + struct.pack("<I", 20) + b"A" * 20, 3),
        _framed(b"B" + struct.pack("<I", 20) + b"A" * 20, 9),
        _framed(b"\x8c\x14" + b"A" * 20, 3),
        _framed(b"cmacos\nsystem\n", 4),
        _framed(b"cos\nsystem\n", 7),
        _framed(b"Vhello world\n", 5),
        _framed(b"J" + struct.pack("<i", 7), 2),
        _framed(b"N\x95" + struct.pack("<Q", 2) + b"N", 30),  # a frame opening inside another
    ],
    ids=[
        "BINBYTES size",
        "BINBYTES data",
        "SHORT_BINUNICODE",
        "GLOBAL module",
        "GLOBAL name",
        "UNICODE",
        "BININT",
        "FRAME in FRAME",
    ],
)
def test_frame_straddles_are_flagged(tmp_path: Path, data: bytes) -> None:
    """fickling's test_frame_boundary_straddle_variants: every one is a frame violation."""
    data += b"."
    with pytest.raises(pickle.UnpicklingError):
        _recorders()["Python"](io.BytesIO(data)).load()
    f = _scan_bytes(tmp_path, data)
    assert not f.safe
    assert "frame-violation" in {a.code for a in f.anomalies}


@pytest.mark.parametrize(
    "obj",
    [[1, 2, 3], b"x" * 100_000, [1, b"y" * 100_000, 2], list(range(200_000)), {"a": [1, {"b": (3, 4)}], "c": "é"}],
    ids=["small", "large unframed bytes", "framed/unframed/framed", "several frames", "nested"],
)
@pytest.mark.parametrize("protocol", [4, 5])
def test_well_formed_frames_are_not_violations(tmp_path: Path, obj: object, protocol: int) -> None:
    """CPython writes large objects outside any frame; that is not a violation."""
    f = _scan_bytes(tmp_path, pickle.dumps(obj, protocol=protocol))
    assert [a.code for a in f.anomalies] == ["weights-only-refused"]  # FRAME etc., nothing else
    assert f.globals == () and f.notes == ()


def test_frame_ending_between_header_and_payload_is_what_cpython_accepts(tmp_path: Path) -> None:
    """CPython checks frames per read, not per opcode: a frame may end right after a BINBYTES
    size field; the payload read then falls through to the file, and every reader agrees."""
    data = _framed(b"B" + struct.pack("<I", 20) + b"A" * 20, 5) + b"."
    assert _recorders()["Python"](io.BytesIO(data)).load() == b"A" * 20
    f = _scan_bytes(tmp_path, data)
    assert "frame-violation" not in {a.code for a in f.anomalies}


# -- differential: random framed pickles, scan vs the real unpicklers ----------------------------

_TOKENS = [b"N", b"N0", b"(1", b")", b"]", b"}", b"\x88", b"K\x07"]


@st.composite
def _framed_pickles(draw: st.DrawFn) -> bytes:
    """Small pickles with FRAMEs of arbitrary (often wrong) lengths and globals hidden in
    bytes and strings, so that readers that disagree on frames see different opcodes."""

    def call(k: int) -> bytes:
        return f"cm{k}\nf{k}\n".encode() + b")R0"

    def body(depth: int) -> bytes:
        parts = []
        for _ in range(draw(st.integers(1, 6))):
            kind = draw(st.sampled_from(["token", "call", "bytes", "text", "line", "frame"] if depth else ["token"]))
            if kind == "token":
                parts.append(draw(st.sampled_from(_TOKENS)))
            elif kind == "call":
                parts.append(call(draw(st.integers(0, 99))))
            elif kind == "frame":
                parts.append(b"\x95" + struct.pack("<Q", draw(st.integers(0, 40))))
            else:
                inner = body(depth - 1) + draw(st.sampled_from([b"", b"N", b"\n"]))
                if kind == "bytes":
                    parts.append(b"C" + bytes([len(inner) % 256]) + inner + b"0")
                elif kind == "text":
                    parts.append(b"\x8c" + bytes([len(inner) % 256]) + inner + b"0")
                else:
                    parts.append(b"V" + inner.replace(b"\n", b"") + b"\n0")
        return b"".join(parts)

    return b"\x80\x04" + body(2) + b"N."


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=_framed_pickles())
def test_scan_reports_every_global_cpython_imports(tmp_path: Path, data: bytes) -> None:
    """Whatever the frames say, every global the C or the pure-Python unpickler imports (before
    finishing or failing) is among scan's globals, and a frame violation is never safe."""
    ran = cpython_imports(data)
    f = _scan_bytes(tmp_path, data)
    reported = {g.name for g in f.globals}
    for label, (imported, _called, _finished) in ran.items():
        assert set(imported) <= reported, (label, imported, reported)
    if ran["C"][0] != ran["Python"][0]:  # the readings disagree: scan must have noticed why
        assert not f.safe


def test_cli_exits_1_and_names_the_divergence(tmp_path: Path) -> None:
    from tests.cli_helpers import run_cli

    p = tmp_path / "model.pt"
    members = torch_members({"w": 1})
    members[0] = ZipEntry("archive/data.pkl", frame_divergence_pickle(_hidden(tmp_path / "MARKER")))
    p.write_bytes(build_zip(members))
    r = run_cli("scan", str(p))
    assert r.exit_code == 1
    assert "✗ unsafe" in r.stdout and "frame-violation" in r.stdout and "os.system" in r.stdout
    doc = run_cli("scan", str(p), "--json").json()
    (entry,) = doc["files"]
    assert doc["safe"] is False and "frame-violation" in {a["code"] for a in entry["anomalies"]}
    assert not (tmp_path / "MARKER").exists()


@pytest.mark.parametrize("op", [b"g", b"p", b"I", b"V", b"S", b"P"])
def test_protocol0_lines_longer_than_the_cap_never_crash(tmp_path: Path, op: bytes) -> None:
    from ckptdoctor.engines.scanning.opcodes import MAX_LINE

    data = b"\x80\x02N" + op + b"1" * (MAX_LINE + 10) + b"\n."
    f = _scan_bytes(tmp_path, data)
    assert not f.safe
    assert {a.code for a in f.anomalies} & {"malformed-pickle", "long-line", "weights-only-refused"}
