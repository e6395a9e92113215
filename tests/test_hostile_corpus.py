"""The hostile corpus itself: well-formed, really hostile, and never crashing or hanging scan.

A corpus whose payloads do not work would make every "scan flags it" test meaningless, so one
payload is executed here under plain ``pickle`` -- in a subprocess, in a temp dir -- to prove the
generator builds working payloads; the archive tricks are checked with ``zipfile`` to prove each
archive really reads the way its name claims.
"""

from __future__ import annotations

import io
import pickletools
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from ckptdoctor.engines.scanning.scan import scan
from ckptdoctor.errors import CkptDoctorError
from tests.hostile import Sample, build_corpus, split_pickles


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Sample]:
    return {s.name: s for s in build_corpus(tmp_path_factory.mktemp("corpus"))}


def test_corpus_is_well_formed(corpus: dict[str, Sample]) -> None:
    kinds = {s.kind for s in corpus.values()}
    assert kinds == {"malicious", "broken", "benign", "not-weights-only"}
    for s in corpus.values():
        assert s.path.exists(), s.name
        assert s.expect in {"safe", "unsafe", "error"}
        assert s.exit_code in {0, 1, 2}
        if s.kind == "malicious":
            assert s.marker is not None and s.must_mention, s.name
            assert not s.marker.exists()
        if s.kind == "benign":
            assert s.expect == "safe"
    assert len({s.path for s in corpus.values()}) == len(corpus)


def test_one_payload_really_executes_under_plain_pickle(corpus: dict[str, Sample], tmp_path: Path) -> None:
    """Prove the generator builds working payloads (plain pickle, subprocess, temp cwd)."""
    sample = corpus["os_system_reduce"]
    assert sample.marker is not None
    script = "import pickle, sys; pickle.loads(open(sys.argv[1], 'rb').read())"
    subprocess.run([sys.executable, "-c", script, str(sample.path)], cwd=tmp_path, check=True, timeout=60)
    try:
        assert sample.marker.exists()
    finally:
        sample.marker.unlink(missing_ok=True)
    assert not sample.marker.exists()


def test_archive_tricks_read_as_claimed(corpus: dict[str, Sample]) -> None:
    def zf(name: str) -> zipfile.ZipFile:
        return zipfile.ZipFile(io.BytesIO(corpus[name].path.read_bytes()))

    # polyglot: zipfile sees a clean archive, while the file starts with a pickle
    with zf("zip_polyglot") as z:
        assert z.testzip() is None
        assert b"os\nsystem" not in z.read("archive/data.pkl")
    assert corpus["zip_polyglot"].path.read_bytes()[:2] == b"\x80\x02"
    # duplicate: zipfile resolves the name to the last (malicious) copy
    with zf("zip_duplicate_data_pkl") as z:
        assert [i.filename for i in z.infolist()].count("archive/data.pkl") == 2
        assert b"os\nsystem" in z.read("archive/data.pkl")
    # bad CRC: zipfile refuses the member
    with zf("zip_bad_crc") as z, pytest.raises(zipfile.BadZipFile):
        z.read("archive/data.pkl")
    # deflated / encrypted / name mismatch: zipfile reports what the header says
    with zf("zip_deflated") as z:
        assert z.getinfo("archive/data.pkl").compress_type == zipfile.ZIP_DEFLATED
    with zf("zip_encrypted_flag") as z:
        assert z.getinfo("archive/data.pkl").flag_bits & 1
    with zf("zip_name_mismatch") as z, pytest.raises(zipfile.BadZipFile):
        z.read("archive/data.pkl")  # zipfile checks the local name
    # legacy: the payload sits in the fifth pickle
    parts, _ = split_pickles(corpus["legacy_later_pickle"].path.read_bytes(), 5)
    assert b"os\nsystem" in parts[4] and not any(b"os\nsystem" in p for p in parts[:4])
    # memo bomb really asks for index 0xFFFFFFF0
    ops = list(pickletools.genops(corpus["memo_bomb"].path.read_bytes()))
    assert any(op.name == "LONG_BINPUT" and arg == 0xFFFFFFF0 for op, arg, _ in ops)


def test_scan_never_raises_foreign_errors_and_is_bounded(corpus: dict[str, Sample]) -> None:
    for s in corpus.values():
        t0 = time.perf_counter()
        try:
            report = scan(s.path)
        except CkptDoctorError as e:
            assert s.expect == "error", (s.name, e)
        else:
            assert s.expect != "error", s.name
            assert report.safe == (s.expect == "safe"), s.name
        assert time.perf_counter() - t0 < 10, s.name
    assert all(s.marker is None or not s.marker.exists() for s in corpus.values())
