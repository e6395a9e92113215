"""Every hostile / broken / benign corpus sample through every command of the real CLI.

The bar (field-notes.md, cli-contract.md): nothing from the file is ever imported or called (the
payload markers never appear), a bad input exits 1 or 2 with one ``Error:`` line and never a
traceback, and no output or temp file is left behind when a command fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.cli_helpers import Result, run_cli
from tests.hostile import Sample, build_corpus

ROOT = Path(__file__).resolve().parent.parent

# Hostile samples whose trick does not touch what a reader uses: the state dict is read from
# archive/data.pkl exactly as torch.load(weights_only=True) reads it, and only `scan` must
# object. Reading commands may succeed on these; their outputs must then be clean.
READABLE = {
    "zip_hidden_pickle": "a pickle under a non-.pkl member name that torch never unpickles",
    "overlapping_members": "an alias member pointing at data.pkl's local header",
    "zip_trailing_bytes": "bytes after the end-of-central-directory record",
}
# Samples whose read errors are classified precisely (not "unexpected ..."): checked one by one
# (was a bug: zipfile's RuntimeError for the encryption flag escaped as an unexpected error).
PRECISE_ERRORS = ("zip_encrypted_flag",)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hostile")


_CORPUS: list[Sample] = []


def corpus(directory: Path) -> list[Sample]:
    if not _CORPUS:
        _CORPUS.extend(build_corpus(directory))
    return _CORPUS


# The sample names, known without building (parametrize ids are needed at collection time).
def _names() -> list[str]:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        return [s.name for s in build_corpus(Path(d))]


NAMES = _names()


@pytest.fixture(scope="module")
def samples(corpus_dir: Path) -> dict[str, Sample]:
    return {s.name: s for s in corpus(corpus_dir / "corpus")}


@pytest.fixture(scope="module")
def benign_ckpt(corpus_dir: Path) -> Path:
    path = corpus_dir / "reference" / "benign.pt"
    path.parent.mkdir()
    torch.manual_seed(0)
    torch.save({"conv.weight": torch.randn(4, 3, 3, 3), "conv.bias": torch.randn(4)}, path)
    return path


def commands(sample: Path, benign: Path, out_dir: Path) -> dict[str, list[str]]:
    s, b = str(sample), str(benign)
    return {
        "inspect": ["inspect", s],
        "inspect-json": ["inspect", "--json", s],
        "inspect-keys": ["inspect", "--keys", s],
        "check": ["check", s, "--against", b],
        "check-json": ["check", s, "--against", b, "--json"],
        "check-as-spec": ["check", b, "--against", s],
        "diff": ["diff", s, b],
        "diff-values": ["diff", b, s, "--values"],
        "fix": ["fix", s, "--strip", "module.", "-o", str(out_dir / "fixed.pt")],
        "fix-against": ["fix", s, "--against", b, "-o", str(out_dir / "fixed2.safetensors")],
        "scan": ["scan", s],
        "scan-json": ["scan", s, "--json"],
        "spec": ["spec", s, "-o", str(out_dir / "spec.json")],
    }


def assert_error_shape(r: Result, what: str) -> None:
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, what
    if r.exit_code == 2:
        lines = r.stderr.splitlines()
        assert lines and lines[0].startswith("Error:"), (what, r.stderr[:300])


def assert_no_payload(sample: Sample, corpus_dir: Path) -> None:
    if sample.marker is not None:
        assert not sample.marker.exists(), f"{sample.name}: the payload ran"
    assert not list(corpus_dir.rglob("MARKER_*")), "a payload ran"


@pytest.mark.parametrize("name", NAMES)
def test_every_command_on_every_sample(name: str, samples: dict[str, Sample], benign_ckpt: Path,
                                       corpus_dir: Path, tmp_path: Path) -> None:
    sample = samples[name]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    hostile = sample.kind in {"malicious", "broken"}
    results: dict[str, Result] = {}
    for what, args in commands(sample.path, benign_ckpt, out_dir).items():
        r = run_cli(*args)
        results[what] = r
        assert_error_shape(r, f"{name}: {what}")
        assert_no_payload(sample, corpus_dir)
        written = sorted(os.listdir(out_dir))
        if r.exit_code != 0:
            assert written == [], f"{name}: {what} exit {r.exit_code} left {written}"
        for f in written:  # a successful writer leaves exactly its output, no temp file
            assert f in {"fixed.pt", "fixed2.safetensors", "spec.json"} and not f.startswith("."), (what, f)
            (out_dir / f).unlink()
        if what in {"scan", "scan-json"}:
            assert r.exit_code == sample.exit_code, (name, what, r.exit_code, r.stderr[:300])
        if r.exit_code == 2:
            assert "ckptdoctor bug" not in r.stderr, (name, what, r.stderr[:300])
    if sample.kind == "benign":
        assert results["inspect"].exit_code == 0, results["inspect"].stderr
        assert results["inspect-json"].exit_code == 0
        assert results["inspect-json"].json()["schema_version"] == 1
        assert results["spec"].exit_code == 0
    if hostile and name not in READABLE:
        for what, r in results.items():
            if what.startswith(("diff", "check", "fix")):
                assert r.exit_code in (1, 2), (name, what, r.exit_code)
            elif what.startswith("scan"):
                continue
            else:
                assert r.exit_code == 2, (name, what, r.exit_code, r.stdout[:200])
    assert not [p for p in sample.path.parent.iterdir() if ".ckptdoctor-tmp" in p.name or p.suffix == ".tmp"]


@pytest.mark.parametrize("name", PRECISE_ERRORS)
def test_errors_are_classified(name: str, samples: dict[str, Sample]) -> None:
    """The reader names what is wrong instead of reporting an unexpected exception."""
    r = run_cli("inspect", str(samples[name].path))
    assert r.exit_code == 2 and r.stderr.startswith("Error:")
    assert "ckptdoctor bug" not in r.stderr and "unexpected" not in r.stderr.splitlines()[0], r.stderr


@pytest.mark.parametrize("name", sorted(READABLE))
def test_readable_hostile_files_fix_into_clean_output(name: str, samples: dict[str, Sample], tmp_path: Path) -> None:
    """What fix writes from a file with a hidden or aliased member holds only the state dict: scan is clean."""
    sample = samples[name]
    out = tmp_path / "clean.pt"
    r = run_cli("fix", str(sample.path), "--add-prefix", "x.", "-o", str(out))
    assert r.exit_code == 0, r.stderr
    scan = run_cli("scan", str(out), "--json")
    assert scan.exit_code == 0, scan.stdout[:500]
    assert scan.json()["files"][0]["safe"] is True
    assert sample.exit_code == 1 and run_cli("scan", str(sample.path)).exit_code == 1


# A handful of samples as a real process: `python -m ckptdoctor` with cwd in the test's directory.
SUBPROCESS_SAMPLES = ["os_system_reduce", "stack_global_dotted", "zip_polyglot", "deep_nesting", "st_bad_json",
                      "legacy_later_pickle"]


@pytest.mark.parametrize("name", SUBPROCESS_SAMPLES)
def test_as_a_real_process(name: str, samples: dict[str, Sample], benign_ckpt: Path, corpus_dir: Path,
                           tmp_path: Path) -> None:
    sample = samples[name]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CKPTDOCTOR_DEBUG": "", "NO_COLOR": "1"}
    for args in (["inspect", str(sample.path)], ["scan", str(sample.path)],
                 ["fix", str(sample.path), "--strip", "module.", "-o", "out.pt"]):
        p = subprocess.run([sys.executable, "-m", "ckptdoctor", *args], check=False, cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)
        assert "Traceback" not in p.stderr, p.stderr
        if args[0] == "scan":
            assert p.returncode == sample.exit_code, p.stdout
        else:
            assert p.returncode in (1, 2)
            if p.returncode == 2:
                assert p.stderr.splitlines()[0].startswith("Error:"), p.stderr
        assert_no_payload(sample, corpus_dir)
        assert os.listdir(tmp_path) == [], os.listdir(tmp_path)
