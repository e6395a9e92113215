"""The CRC-32s of a torch zip output are those of its bytes, whatever the source recorded.

``convert`` and ``fix`` reuse the CRC-32 a source archive lists for a storage they copy byte for
byte (a torch zip's record, the storage member of a DCP item's archive) instead of reading the
bytes a second time. These tests hold every output record's CRC to its bytes (``zipfile``'s
``testzip`` re-reads them all), including a DCP checkpoint whose recorded CRCs are all 0
because torch.save was told not to compute them (``torch.serialization.set_crc32_options(False)``).
"""

from __future__ import annotations

import warnings
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ckptdoctor.formats import open_checkpoint
from tests import zoo
from tests.cli_helpers import run_cli


def _source_bytes(path: str, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def _assert_crcs_match_bytes(archive: Path) -> None:
    with zipfile.ZipFile(archive) as z:
        assert z.testzip() is None  # every member read back and checked against its CRC-32
        assert any(info.filename.split("/", 1)[1].startswith("data/") and info.file_size
                   for info in z.infolist())


@pytest.fixture
def crc_off() -> Iterator[None]:
    """torch.save records 0 as every member's CRC-32 while this is active."""
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(True)


def _dcp_save(state: dict[str, object], root: Path) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # "torch.distributed is disabled ... assuming a single process"
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=root)


def test_dcp_reader_knows_each_storage_members_crc(tmp_path: Path) -> None:
    fixture = zoo.build("dcp_training", tmp_path)
    ckpt = open_checkpoint(str(fixture.path), "model")
    for info in ckpt.tensors:
        source = info.tensor.storage.source
        assert source is not None
        crc = source.recorded_crc32()
        assert crc is not None, info.key  # dcp.save writes each tensor whole: its member's CRC applies
        assert crc == zlib.crc32(_source_bytes(source.path, source.offset, source.length)), info.key


def test_dcp_into_torch_zip_has_the_crcs_of_its_bytes(tmp_path: Path) -> None:
    fixture = zoo.build("dcp_training", tmp_path)
    out = tmp_path / "m.pt"
    result = run_cli("convert", fixture.path, out, "--entry", "model")
    assert result.exit_code == 0, result.stderr
    _assert_crcs_match_bytes(out)
    got = torch.load(out, weights_only=True)["model"]
    for key, want in fixture.reference().items():
        assert torch.equal(got[key], want), key


def test_dcp_saved_without_crcs_converts_to_correct_crcs(tmp_path: Path, crc_off: None) -> None:
    # w is larger than the storages the writer reads into memory (and checksums there anyway)
    weights = {"w": torch.randn(256, 128), "b": torch.randn(8), "steps": torch.tensor(3)}
    _dcp_save({"model": weights}, tmp_path / "dcp")
    ckpt = open_checkpoint(str(tmp_path / "dcp"), "model")
    assert {info.tensor.storage.source.recorded_crc32() for info in ckpt.tensors} == {0}  # what torch recorded
    out = tmp_path / "m.pt"
    result = run_cli("convert", tmp_path / "dcp", out, "--entry", "model", "--extract")
    assert result.exit_code == 0, result.stderr
    _assert_crcs_match_bytes(out)
    got = torch.load(out, weights_only=True)
    for key, want in weights.items():
        assert torch.equal(got[key], want), key


def test_torch_zip_saved_without_crcs_reads_and_fixes_to_correct_crcs(tmp_path: Path, crc_off: None) -> None:
    """torch.load reads a file whose every CRC-32 is 0 (not computed); so does ckptdoctor, and what
    it writes from it carries the true CRC-32s."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    source = tmp_path / "nocrc.pt"
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, source)
    with zipfile.ZipFile(source) as z:
        assert {info.CRC for info in z.infolist()} == {0}
    expected = torch.load(source, weights_only=True)
    ckpt = open_checkpoint(source)
    assert ckpt.keys() == list(expected)
    assert [tuple(t.shape) for t in ckpt] == [tuple(v.shape) for v in expected.values()]
    out = tmp_path / "fixed.pt"
    result = run_cli("fix", str(source), "--strip", "module.", "-o", str(out))
    assert result.exit_code == 0, result.stderr
    _assert_crcs_match_bytes(out)
    fixed = torch.load(out, weights_only=True)
    assert list(fixed) == list(model.state_dict())
    assert all(torch.equal(fixed[k], v) for k, v in model.state_dict().items())


def test_scan_notes_crcs_not_recorded_without_calling_them_mismatches(tmp_path: Path, crc_off: None) -> None:
    """A recorded 0 is "not computed" (torch.load reads such files): a note, not a crc-mismatch anomaly."""
    source = tmp_path / "nocrc.pt"
    torch.save({"w": torch.arange(6.0)}, source)
    report = run_cli("scan", str(source), "--json")
    assert report.exit_code == 0, report.stdout
    found = report.json()["files"][0]
    assert found["safe"] is True
    assert not [a for a in found["anomalies"] if a["code"] == "crc-mismatch"]
    assert any("CRC-32 not recorded" in note for note in found["notes"])
