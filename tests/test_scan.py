"""Tests for ``ckptdoctor.engines.scanning.scan``: verdicts, anomalies, zero false positives, and a
differential check against ``torch.load(weights_only=True)`` on every benign and hostile sample.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckptdoctor.engines.scanning import archive as scan_archive
from ckptdoctor.engines.scanning.scan import DANGEROUS, UNKNOWN_CLASS, WEIGHTS_ONLY, FileScan, scan
from ckptdoctor.errors import CkptDoctorError, CorruptCheckpoint, InputNotFound, UnsupportedFormat
from tests.hostile import (
    PROTO2,
    PROTO4,
    STOP,
    Sample,
    build_corpus,
    build_zip,
    call,
    glob,
    os_system_pickle,
    short_uni,
    torch_members,
    uni,
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Sample]:
    return {s.name: s for s in build_corpus(tmp_path_factory.mktemp("corpus"))}


def _only(path: Path) -> FileScan:
    files = scan(path).files
    assert len(files) == 1
    return files[0]


def _mentions(files: tuple[FileScan, ...], text: str) -> bool:
    """Is *text* a global name, an anomaly code, a pickle label or part of an anomaly message?"""
    return any(
        text in {g.name for g in f.globals}
        or text in {a.code for a in f.anomalies}
        or text in f.pickles
        or any(text in a.message for a in f.anomalies)
        for f in files
    )


# --------------------------------------------------------------------------------------------
# Hostile samples
# --------------------------------------------------------------------------------------------


def test_every_malicious_sample_is_unsafe_and_names_the_trick(corpus: dict[str, Sample]) -> None:
    malicious = [s for s in corpus.values() if s.kind == "malicious"]
    assert len(malicious) >= 25
    for s in malicious:
        files = scan(s.path).files
        assert not any(f.safe for f in files), s.name
        assert _mentions(files, s.must_mention), (s.name, s.must_mention, files)
        # every payload surfaces as at least one dangerous global (possibly in a nested pickle)
        assert any(g.verdict == DANGEROUS for f in files for g in f.globals), (s.name, files)
        assert s.marker is not None and not s.marker.exists()


def test_archive_tricks_still_find_the_payload(corpus: dict[str, Sample]) -> None:
    for name in (
        "zip_duplicate_data_pkl",
        "zip_name_mismatch",
        "zip_bad_crc",
        "zip_encrypted_flag",
        "zip_polyglot",
        "zip_outside_prefix",
        "zip_deflated",
        "zip_lying_sizes",
        "zip_hidden_pickle",
        "zip_patched_data_pkl",
        "legacy_later_pickle",
    ):
        f = _only(corpus[name].path)
        dangerous = {g.name for g in f.globals if g.verdict == DANGEROUS}
        assert dangerous == {"os.system"}, (name, f)


def test_payload_locations_are_reported(corpus: dict[str, Sample]) -> None:
    where = {g.name: g.where for g in _only(corpus["legacy_later_pickle"].path).globals}
    assert where["os.system"].startswith("legacy pickle #5 (storage keys) @ ")
    assert where["collections.OrderedDict"].startswith("legacy pickle #4 (data) @ ")

    f = _only(corpus["zip_duplicate_data_pkl"].path)
    assert {g.name: g.where for g in f.globals}["os.system"].startswith("archive/data.pkl (copy 2) @ ")

    f = _only(corpus["zip_polyglot"].path)
    assert f.pickles[0] == "leading pickle (bytes before the zip)"
    assert {"prefix-bytes", "polyglot"} <= {a.code for a in f.anomalies}

    f = _only(corpus["nested_load_from_bytes"].path)
    assert any(p.startswith("nested pickle in pickle @ offset") for p in f.pickles)
    by_name = {g.name: g for g in f.globals}
    assert by_name["torch.storage._load_from_bytes"].verdict == DANGEROUS
    assert by_name["os.system"].where.startswith("nested pickle in pickle")


def test_gadget_details(corpus: dict[str, Sample]) -> None:
    f = _only(corpus["getattr_gadget"].path)
    assert {g.name for g in f.globals} == {"builtins.getattr", "builtins.__import__"}
    assert "computed-callable" in {a.code for a in f.anomalies}

    f = _only(corpus["stack_global_dotted"].path)
    (g,) = f.globals
    assert (g.name, g.verdict, g.called) == ("pathlib.os.system", DANGEROUS, True)

    # __builtin__ (Python 2 name) is renamed exactly as pickle's fix_imports does
    assert [g.name for g in _only(corpus["builtins_exec_py2_name"].path).globals] == ["builtins.exec"]

    f = _only(corpus["newobj_partial"].path)
    by_name = {g.name: g for g in f.globals}
    assert by_name["functools.partial"].called and by_name["functools.partial"].verdict == DANGEROUS
    # os.system is only passed as an argument here, but it is still on the deny list
    assert not by_name["os.system"].called and by_name["os.system"].verdict == DANGEROUS

    f = _only(corpus["ext_opcode"].path)
    assert f.globals[0].name == "<copyreg extension 127>" and f.globals[0].verdict == DANGEROUS


def test_broken_samples(corpus: dict[str, Sample]) -> None:
    broken = [s for s in corpus.values() if s.kind == "broken"]
    assert len(broken) >= 15
    for s in broken:
        if s.expect == "error":
            with pytest.raises(CkptDoctorError) as exc:
                scan(s.path)
            assert s.must_mention in str(exc.value), (s.name, str(exc.value))
            assert exc.value.path == str(s.path)
        else:
            files = scan(s.path).files
            assert not all(f.safe for f in files), s.name
            assert _mentions(files, s.must_mention), (s.name, files)


def test_error_types(corpus: dict[str, Sample], tmp_path: Path) -> None:
    with pytest.raises(InputNotFound):
        scan(tmp_path / "nope.pt")
    with pytest.raises(UnsupportedFormat):
        scan(corpus["empty_file"].path)
    with pytest.raises(UnsupportedFormat):
        scan(corpus["text_file"].path)
    with pytest.raises(CorruptCheckpoint):
        scan(corpus["truncated_zip"].path)
    with pytest.raises(CorruptCheckpoint):
        scan(corpus["st_bad_json"].path)
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "empty_dir" / "README.md").write_text("hi")
    with pytest.raises(UnsupportedFormat):
        scan(tmp_path / "empty_dir")


def test_bombs_are_bounded(corpus: dict[str, Sample]) -> None:
    for name in ("deep_nesting", "memo_bomb", "huge_binbytes8"):
        t0 = time.perf_counter()
        f = _only(corpus[name].path)
        assert time.perf_counter() - t0 < 5, name
        assert not f.safe


def test_anomaly_flood_is_capped(tmp_path: Path) -> None:
    p = tmp_path / "flood.pkl"
    p.write_bytes(PROTO2 + b"]" + b"r\xf0\xff\xff\xff" * 5000 + STOP)
    f = _only(p)
    assert sum(a.code == "memo-index" for a in f.anomalies) == 10
    assert any("4990 more 'memo-index'" in n for n in f.notes)


# --------------------------------------------------------------------------------------------
# Benign and not-weights-only files
# --------------------------------------------------------------------------------------------


def test_benign_files_have_zero_false_positives(corpus: dict[str, Sample]) -> None:
    benign = [s for s in corpus.values() if s.kind == "benign"]
    assert len(benign) >= 10
    for s in benign:
        for f in scan(s.path).files:
            assert f.safe, (s.name, f)
            assert f.anomalies == ()
            assert all(g.verdict == WEIGHTS_ONLY for g in f.globals)


def test_benign_formats_and_globals(corpus: dict[str, Sample]) -> None:
    f = _only(corpus["all_dtypes"].path)
    assert f.format == "torch-zip"
    names = {g.name for g in f.globals}
    assert {"torch.float8_e4m3fn", "torch.uint16", "torch.complex32", "torch.storage.UntypedStorage"} <= names
    assert _only(corpus["legacy_format"].path).format == "torch-legacy"
    assert len(_only(corpus["legacy_format"].path).pickles) == 5
    assert _only(corpus["safetensors"].path).format == "safetensors"
    assert _only(corpus["safetensors"].path).globals == ()
    storage = next(g for g in _only(corpus["training_ckpt"].path).globals if g.name == "torch.FloatStorage")
    assert not storage.called  # referenced as the storage type, never called
    rebuild = next(
        g for g in _only(corpus["training_ckpt"].path).globals if g.name == "torch._utils._rebuild_tensor_v2"
    )
    assert rebuild.called and rebuild.count == 1  # memoised: imported once, called many times


def test_protocol4_is_unsafe_because_torch_refuses_it(corpus: dict[str, Sample]) -> None:
    """The verdict rule: a file torch.load(weights_only=True) refuses is never safe."""
    f = _only(corpus["protocol4"].path)
    assert not f.safe
    assert all(g.verdict == WEIGHTS_ONLY for g in f.globals)
    (refusal,) = f.anomalies
    assert refusal.code == "weights-only-refused"
    assert "FRAME" in refusal.message and "STACK_GLOBAL" in refusal.message


def test_not_weights_only_is_unsafe_but_not_dangerous(corpus: dict[str, Sample]) -> None:
    for s in (s for s in corpus.values() if s.kind == "not-weights-only"):
        files = scan(s.path).files
        assert not any(f.safe for f in files), s.name
        assert _mentions(files, s.must_mention), (s.name, files)
        assert not any(g.verdict == DANGEROUS for f in files for g in f.globals), (s.name, files)
    whole = {g.name: g for g in _only(corpus["whole_module"].path).globals}
    assert whole["torch.nn.modules.linear.Linear"].verdict == UNKNOWN_CLASS
    assert whole["torch.nn.modules.container.Sequential"].called
    ns = {g.name: g for g in _only(corpus["argparse_namespace"].path).globals}
    assert ns["argparse.Namespace"].verdict == UNKNOWN_CLASS
    assert _only(corpus["torchscript"].path).format == "torchscript"


def test_directory_scan(corpus: dict[str, Sample]) -> None:
    files = scan(corpus["sharded_dir"].path).files
    assert [Path(f.path).name for f in files] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]
    escape = scan(corpus["sharded_index_escape"].path).files
    index = next(f for f in escape if f.format == "shard-index")
    assert [a.code for a in index.anomalies] == ["shard-outside-directory"]
    assert "../outside.safetensors" in index.anomalies[0].message


def test_unreadable_file_inside_directory_is_reported_not_raised(tmp_path: Path) -> None:
    (tmp_path / "ok.pt").write_bytes(PROTO2 + b"}" + STOP)
    (tmp_path / "bad.pt").write_bytes(b"")
    files = scan(tmp_path).files
    assert {Path(f.path).name: f.safe for f in files} == {"bad.pt": False, "ok.pt": True}
    bad = next(f for f in files if f.path.endswith("bad.pt"))
    assert bad.anomalies[0].code == "unreadable" and "UnsupportedFormat" in bad.anomalies[0].message


# --------------------------------------------------------------------------------------------
# Focused unit cases
# --------------------------------------------------------------------------------------------


def _scan_bytes(tmp_path: Path, data: bytes, name: str = "x.pkl") -> FileScan:
    p = tmp_path / name
    p.write_bytes(data)
    return _only(p)


def test_verdict_rules(tmp_path: Path) -> None:
    # referenced torch global outside the allowlist -> torch-other
    f = _scan_bytes(tmp_path, PROTO2 + glob("torch.nn.modules.linear", "Linear") + STOP)
    assert [(g.name, g.verdict, g.called) for g in f.globals] == [
        ("torch.nn.modules.linear.Linear", "torch-other", False)
    ]
    # the same global *called* -> dangerous (torch only calls allowlisted rebuild functions)
    f = _scan_bytes(tmp_path, PROTO2 + call("torch.nn.modules.linear", "Linear", b"K\x02K\x02") + STOP)
    assert f.globals[0].verdict == DANGEROUS
    # an unknown function called with arguments -> dangerous even if not on the deny list
    f = _scan_bytes(tmp_path, PROTO2 + call("mypkg.utils", "load_everything", uni("x")) + STOP)
    assert f.globals[0].verdict == DANGEROUS
    # copyreg._reconstructor(cls, object, None): instantiation, not an attack
    recon = call("copyreg", "_reconstructor", glob("mypkg.cfg", "Config"), glob("builtins", "object"), b"N")
    f = _scan_bytes(tmp_path, PROTO2 + recon + b"}" + b"b" + STOP)
    verdicts = {g.name: g.verdict for g in f.globals}
    assert verdicts == {
        "copyreg._reconstructor": UNKNOWN_CLASS,
        "mypkg.cfg.Config": UNKNOWN_CLASS,
        "builtins.object": UNKNOWN_CLASS,
    }
    # a module named like a stdlib module deeper in a package is not that module
    f = _scan_bytes(tmp_path, PROTO2 + glob("mymodel.code", "Block") + b")\x81" + STOP)
    assert f.globals[0].verdict == UNKNOWN_CLASS
    # BUILD on a global object monkeypatches it
    f = _scan_bytes(tmp_path, PROTO2 + glob("collections", "OrderedDict") + b"}" + b"b" + STOP)
    assert "build-on-global" in {a.code for a in f.anomalies} and not f.safe


def test_dunder_traversal_and_protocol4_memo(tmp_path: Path) -> None:
    data = PROTO4 + short_uni("builtins") + b"\x94" + short_uni("object.__subclasses__") + b"\x94\x93" + STOP
    f = _scan_bytes(tmp_path, data)
    assert f.globals[0].name == "builtins.object.__subclasses__" and f.globals[0].verdict == DANGEROUS


def test_nested_pickle_via_codecs_encode(tmp_path: Path) -> None:
    inner = os_system_pickle(tmp_path / "never")
    # protocol 2 pickles bytes as _codecs.encode(latin1_text, "latin1")
    blob = call("_codecs", "encode", uni(inner.decode("latin-1")), uni("latin1"))
    f = _scan_bytes(tmp_path, PROTO2 + b"}" + uni("blob") + blob + b"s" + STOP)
    assert {g.name: g.verdict for g in f.globals} == {"_codecs.encode": WEIGHTS_ONLY, "os.system": DANGEROUS}
    assert not f.safe


def test_nested_depth_is_bounded(tmp_path: Path) -> None:
    data = PROTO2 + b"N" + STOP
    for _ in range(8):
        data = PROTO2 + b"B" + len(data).to_bytes(4, "little") + data + STOP
    f = _scan_bytes(tmp_path, data)
    assert "nesting-limit" in {a.code for a in f.anomalies}
    assert len(f.pickles) == 5


def test_data_after_stop_and_second_pickle(tmp_path: Path) -> None:
    f = _scan_bytes(tmp_path, PROTO2 + b"}" + STOP + os_system_pickle(tmp_path / "never"))
    assert "data-after-stop" in {a.code for a in f.anomalies}
    assert [g.name for g in f.globals] == ["os.system"]


def test_large_members_skip_crc_with_a_note(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    p = tmp_path / "m.pt"
    torch.save({"w": torch.zeros(1000)}, p)
    monkeypatch.setattr(scan_archive, "CRC_LIMIT", 100)
    f = _only(p)
    assert f.safe
    assert any(n.startswith("CRC not checked for 1 member(s)") for n in f.notes)


def test_orphan_local_member_is_found(tmp_path: Path) -> None:
    """A local header + pickle that the central directory does not list: zipfile and torch
    never see it, a local-header streaming reader does. Reported and scanned."""
    import struct
    import zlib

    z = build_zip(torch_members({"w": 1}))
    pkl = os_system_pickle(tmp_path / "never")
    name = b"archive/evil.pkl"
    orphan = (
        struct.pack(
            "<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0, 0, 0, 0x21, zlib.crc32(pkl), len(pkl), len(pkl), len(name), 0
        )
        + name
        + pkl
    )
    first_cd = z.index(b"PK\x01\x02")
    eocd = bytearray(z[z.index(b"PK\x05\x06") :])
    eocd[16:20] = (first_cd + len(orphan)).to_bytes(4, "little")  # central directory moved
    data = z[:first_cd] + orphan + z[first_cd : z.index(b"PK\x05\x06")] + bytes(eocd)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert "archive/evil.pkl" not in zf.namelist() and zf.testzip() is None
    f = _scan_bytes(tmp_path, data, "orphan.pt")
    assert {"unaccounted-bytes", "orphan-member"} <= {a.code for a in f.anomalies}
    assert {g.name: g.where for g in f.globals if g.verdict == DANGEROUS} == {
        "os.system": "orphan member archive/evil.pkl @ 2"
    }


def test_json_shape(corpus: dict[str, Sample]) -> None:
    doc: dict[str, Any] = scan(corpus["zip_polyglot"].path).to_json()
    text = json.dumps(doc)
    assert json.loads(text) == doc
    assert doc["schema_version"] == 1 and doc["safe"] is False
    (entry,) = doc["files"]
    assert {"path", "safe", "globals", "anomalies", "format", "pickles", "notes"} <= set(entry)
    assert {"name": "os.system", "verdict": "dangerous"}.items() <= entry["globals"][0].items()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_checkpoints_never_crash(tmp_path: Path, data: st.DataObject) -> None:
    """Flip, drop or insert bytes anywhere in a real torch.save zip: scan returns or raises a
    ckptdoctor error, never anything else, and never calls a payload."""
    base = build_zip(torch_members({"w": 1, "b": [1, 2]}))
    kind = data.draw(st.sampled_from(["flip", "truncate", "insert"]))
    pos = data.draw(st.integers(0, len(base) - 1))
    if kind == "flip":
        mutated = base[:pos] + bytes([base[pos] ^ data.draw(st.integers(1, 255))]) + base[pos + 1 :]
    elif kind == "truncate":
        mutated = base[:pos]
    else:
        mutated = base[:pos] + data.draw(st.binary(min_size=1, max_size=64)) + base[pos:]
    p = tmp_path / "fuzz.pt"
    p.write_bytes(mutated)
    with contextlib.suppress(CkptDoctorError):
        scan(p)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=200))
def test_random_pickle_bodies_never_crash(tmp_path: Path, body: bytes) -> None:
    p = tmp_path / "fuzz.pkl"
    p.write_bytes(PROTO2 + body)
    with contextlib.suppress(CkptDoctorError):
        scan(p)


# --------------------------------------------------------------------------------------------
# Differential: scan's `safe` vs what torch.load(weights_only=True) actually does
# --------------------------------------------------------------------------------------------

_LOADER = textwrap.dedent(
    """
    import json, sys, warnings
    warnings.simplefilter("ignore")
    import torch
    from safetensors.torch import load_file
    out = {}
    for name, path, loader in json.loads(sys.argv[1]):
        try:
            if loader == "safetensors":
                load_file(path)
            else:
                torch.load(path, weights_only=True, map_location="cpu")
            out[name] = True
        except Exception as e:  # noqa: BLE001 - any refusal counts
            out[name] = False
    print(json.dumps(out))
    """
)


@pytest.mark.slow
def test_safe_agrees_with_torch_weights_only(corpus: dict[str, Sample], tmp_path: Path) -> None:
    samples = [s for s in corpus.values() if s.kind != "broken" and s.loader != "none"]
    job = json.dumps([(s.name, str(s.path), s.loader) for s in samples])
    work = tmp_path / "cwd"
    work.mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", _LOADER, job], cwd=work, capture_output=True, text=True, timeout=300, check=True
    )
    loads: dict[str, bool] = json.loads(proc.stdout.strip().splitlines()[-1])
    mismatches = []
    for s in samples:
        safe = all(f.safe for f in scan(s.path).files)
        expected = safe if s.torch_loads_weights_only is None else s.torch_loads_weights_only
        if loads[s.name] != expected:
            mismatches.append((s.name, safe, loads[s.name]))
    assert mismatches == []
    # the documented disagreements really are the ones the scan is stricter (or broader) about
    assert loads["zip_duplicate_data_pkl"] and not _only(corpus["zip_duplicate_data_pkl"].path).safe
    # the verdict rule holds over the whole corpus: what torch refuses is never safe
    assert not any(all(f.safe for f in scan(s.path).files) for s in samples if not loads[s.name])
    assert not loads["protocol4"] and not _only(corpus["protocol4"].path).safe
    assert all(s.marker is None or not s.marker.exists() for s in corpus.values())
    assert list(work.iterdir()) == []


def test_dcp_metadata_says_it_is_dcps_own(corpus: dict[str, Sample], tmp_path: Path) -> None:
    """A torch-written DCP .metadata stays unsafe by the weights_only rule, with a note that it holds
    nothing but DCP's own classes; the same file with any other global gets no such note."""
    (dcp_file,) = scan(corpus["dcp_directory"].path).files
    assert not dcp_file.safe and any("nothing but DCP's own classes" in n for n in dcp_file.notes)
    tampered = tmp_path / "dcp"
    tampered.mkdir()
    data = (corpus["dcp_directory"].path / ".metadata").read_bytes()
    (tampered / ".metadata").write_bytes(data + b"\x80\x02cargparse\nNamespace\n)\x81.")  # a second pickle
    (other,) = scan(tampered).files
    assert not any("DCP's own classes" in n for n in other.notes)


@pytest.mark.parametrize("far", [2**62, 2**64 - 16])
def test_zip64_offsets_no_file_can_hold_are_corruption_not_a_crash(tmp_path: Path, far: int) -> None:
    """A zip64 locator, or a member's zip64 extra field, naming an offset far past the end
    (2**62: ext4 refuses to seek there with EINVAL; past 2**63 Python refuses with ValueError)
    reads as nothing: a corrupt-archive error or an anomaly, never an OSError or ValueError
    escaping as an "unexpected" error; the readers say the same of the file."""
    import struct

    import torch

    from ckptdoctor.formats import open_checkpoint

    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf)
    z = buf.getvalue()
    eocd = z.rfind(b"PK\x05\x06")
    locator = struct.pack("<4sIQI", b"PK\x06\x07", 0, far, 1)
    with pytest.raises(CorruptCheckpoint, match="zip64 end-of-central-directory locator"):
        _scan_bytes(tmp_path, z[:eocd] + locator + z[eocd:], "locator.pt")
    with pytest.raises(CkptDoctorError):
        open_checkpoint(str(tmp_path / "locator.pt"))

    # The first central entry's offset moved into a zip64 extra field that says 2**62 (torch's own
    # zip64 end record and locator are left out: the plain end record describes the archive).
    cd_size, cd_offset = struct.unpack_from("<II", z, eocd + 12)
    nlen, xlen, clen = struct.unpack_from("<HHH", z, cd_offset + 28)
    first = bytearray(z[cd_offset : cd_offset + 46 + nlen])
    struct.pack_into("<H", first, 30, 12)
    struct.pack_into("<I", first, 42, 0xFFFFFFFF)
    first += struct.pack("<HHQ", 1, 8, far)
    rest = z[cd_offset + 46 + nlen + xlen + clen : cd_offset + cd_size]
    end = bytearray(z[eocd:])
    struct.pack_into("<I", end, 12, len(first) + len(rest))
    f = _scan_bytes(tmp_path, z[:cd_offset] + bytes(first) + rest + bytes(end), "member.pt")
    assert not f.safe
    assert "bad-local-header" in {a.code for a in f.anomalies}
    with pytest.raises(CkptDoctorError):
        open_checkpoint(str(tmp_path / "member.pt"))


@pytest.mark.parametrize("evil_first", [True, False])
def test_members_that_differ_only_in_case_are_duplicates(tmp_path: Path, evil_first: bool) -> None:
    """torch's zip reader (miniz, case-insensitive lookup) and zipfile (exact names) can read
    different bytes for `archive/data.pkl` when `archive/DATA.pkl` is also there: scan calls it a
    duplicate member, and the readers refuse the file as they refuse an exact duplicate."""
    import torch

    from ckptdoctor.errors import UnsafeContent
    from ckptdoctor.formats import open_checkpoint
    from tests.hostile import inject

    members = torch_members({"w": torch.ones(2)})
    evil = type(members[0])("archive/DATA.pkl", inject(members[0].data, call("os", "system", uni("true"))))
    assert members[0].name == "archive/data.pkl"
    path = tmp_path / "case.pt"
    path.write_bytes(build_zip([evil, *members] if evil_first else [*members, evil]))
    f = _only(path)
    assert not f.safe
    assert any(a.code == "duplicate-member" and "differ only in case" in a.message for a in f.anomalies)
    with pytest.raises(UnsafeContent, match="differ only in case"):
        open_checkpoint(str(path))


def test_hugging_face_cache_snapshots_are_scanned_through_their_blob_links(tmp_path: Path) -> None:
    """huggingface_hub keeps ``snapshots/<rev>/<file>`` as symlinks into ``../../blobs``, as every
    loader (and the readers) follow: scan reads the blobs' content instead of calling every file of
    a cached download "outside the directory"; a link out of the cache is still flagged."""
    import hashlib
    import os

    import torch
    from safetensors.torch import save_file

    repo = tmp_path / "models--org--tiny"
    snapshot = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)

    def cache(name: str, data: bytes) -> None:
        digest = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / digest).write_bytes(data)
        os.symlink(f"../../blobs/{digest}", snapshot / name)

    state = torch.nn.Linear(4, 2).state_dict()
    save_file({"weight": state["weight"]}, str(tmp_path / "shard"))
    cache("model-00001-of-00002.safetensors", (tmp_path / "shard").read_bytes())
    buf = io.BytesIO()
    torch.save({"bias": state["bias"]}, buf)
    cache("pytorch_model-00002-of-00002.bin", buf.getvalue())
    cache("model.safetensors.index.json", json.dumps({"metadata": {}, "weight_map": {
        "weight": "model-00001-of-00002.safetensors", "bias": "pytorch_model-00002-of-00002.bin"}}).encode())
    files = scan(snapshot).files
    assert [(Path(f.path).name, f.format, f.safe) for f in files] == [
        ("model-00001-of-00002.safetensors", "safetensors", True),
        ("model.safetensors.index.json", "shard-index", True),
        ("pytorch_model-00002-of-00002.bin", "torch-zip", True)]

    cache("evil.pkl", os_system_pickle(tmp_path / "never"))  # a payload in the blob store is found
    (tmp_path / "outside.pt").write_bytes(buf.getvalue())
    os.symlink(tmp_path / "outside.pt", snapshot / "escape.pt")  # not the cache's own layout
    got = {Path(f.path).name: f for f in scan(snapshot).files}
    assert "os.system" in {g.name for g in got["evil.pkl"].globals} and not got["evil.pkl"].safe
    assert [a.code for a in got["escape.pt"].anomalies] == ["outside-directory"]


@pytest.mark.parametrize("shape", [[True], [0, 2**63], [1.0]])
def test_safetensors_shapes_no_loader_accepts_are_bad_shapes(tmp_path: Path, shape: list[Any]) -> None:
    """JSON ``true`` is a Python int, and a dimension of 2**63 fits safetensors' u64 but not torch's
    int64 sizes: scan used to call such a file safe while every reader refused it."""
    import struct

    from ckptdoctor.formats import open_checkpoint

    header = json.dumps({"w": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}}).encode()
    header += b" " * (-len(header) % 8)
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    f = _only(path)
    assert not f.safe and "bad-shape" in {a.code for a in f.anomalies}
    with pytest.raises(CorruptCheckpoint, match="invalid dimension"):
        open_checkpoint(str(path))
