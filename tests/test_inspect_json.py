"""`inspect --json`'s lean tensor records, against torch: every fact a record leaves out is one the
header or torch's defaults already say, and every field it does carry is what torch.load sees."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from torch import nn

from ckptdoctor.engines.inspection.overview import overview
from ckptdoctor.formats import open_checkpoint
from ckptdoctor.render.inspect_json import compact_records, inspect_document
from tests import zoo
from tests.cli_helpers import run_cli

CONTRACT = ("key", "shape", "dtype", "numel", "nbytes")
EXTENSIONS = {"stride", "storage_offset", "device", "storage", "parameter", "file_offset"}
SINGLE_FILES = ("views", "tied_scalar_empty", "legacy_views", "all_dtypes", "cuda_tagged", "safetensors_dtypes",
                "lightning_like")


def _storage_groups(reference: dict[str, torch.Tensor]) -> dict[str, int]:
    """key -> how many keys use its storage (torch's own view: the storage's address; empty storages alone)."""
    by_ptr: dict[int, list[str]] = {}
    for key, t in reference.items():
        if t.untyped_storage().nbytes():
            by_ptr.setdefault(t.untyped_storage().data_ptr(), []).append(key)
    return {key: len(keys) for keys in by_ptr.values() for key in keys}


def _first_bytes(t: torch.Tensor) -> bytes:
    """The bytes of the tensor's first element (what lies at its ``file_offset``)."""
    return bytes(t.detach().reshape(-1)[0].reshape(1).view(torch.uint8).tolist())


def _check_records(doc: dict[str, Any], reference: dict[str, torch.Tensor], data: bytes | None) -> None:
    assert [r["key"] for r in doc["tensors"]] == list(reference)
    shared = _storage_groups(reference)
    ids: dict[str, str] = {}
    for record in doc["tensors"]:
        t = reference[record["key"]]
        assert tuple(record)[:5] == CONTRACT and set(record) - set(CONTRACT) <= EXTENSIONS, record
        assert record["shape"] == list(t.shape) and record["numel"] == t.numel()
        row_major = torch.empty(t.shape).stride()
        assert ("stride" in record) == (t.stride() != row_major), record
        assert tuple(record.get("stride", row_major)) == t.stride()
        assert record.get("storage_offset", 0) == t.storage_offset() and record.get("storage_offset") != 0
        assert record.get("parameter", False) == isinstance(t, nn.Parameter) and record.get("parameter") is not False
        assert ("device" in record) == (len(doc["devices"]) > 1)
        assert ("storage" in record) == (shared.get(record["key"], 1) > 1), record
        if "storage" in record:
            ids.setdefault(record["storage"], record["key"])
            assert t.untyped_storage().data_ptr() == reference[ids[record["storage"]]].untyped_storage().data_ptr()
        assert ("file_offset" in record) == (data is not None)
        if data is not None and t.numel():
            offset = record["file_offset"]
            assert data[offset:offset + t.element_size()] == _first_bytes(t), record["key"]


@pytest.mark.parametrize("name", SINGLE_FILES)
def test_records_say_what_torch_sees_and_nothing_the_header_says(tmp_path: Path, name: str) -> None:
    fx = zoo.build(name, tmp_path)
    doc = run_cli("inspect", str(fx.path), "--json").json()
    assert doc["devices"] == [fx.device]
    _check_records(doc, fx.reference(), fx.path.read_bytes())
    if name in ("views", "tied_scalar_empty"):  # the aliases stay visible: ids on the records, groups in the header
        assert any("storage" in r for r in doc["tensors"]) and doc["shared_storages"]


def test_a_directory_of_shards_has_no_file_offsets(tmp_path: Path) -> None:
    """An offset into which shard? The records would need a file name; the fields stay out instead."""
    fx = zoo.build("hf_sharded_safetensors", tmp_path)
    doc = run_cli("inspect", str(fx.path), "--json").json()
    _check_records(doc, fx.reference(), None)


def test_tensors_on_several_devices_each_say_theirs(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    path = tmp_path / "mixed.pt"
    tag = mock.patch("torch.serialization.location_tag",
                     lambda storage: "cuda:1" if storage.nbytes() > 64 else "cpu")
    with tag:
        torch.save(model.state_dict(), path)
    doc = run_cli("inspect", str(path), "--json").json()
    reference = torch.load(path, weights_only=True, map_location="cpu")
    assert sorted(doc["devices"]) == ["cpu", "cuda:1"]
    _check_records(doc, reference, path.read_bytes())
    for record in doc["tensors"]:
        t = reference[record["key"]]
        assert record["device"] == ("cuda:1" if t.untyped_storage().nbytes() > 64 else "cpu")


def test_text_writers_match_json_dumps(tmp_path: Path) -> None:
    """The streamed `--json` text is json.dumps(indent=2) of the document byte for byte (io before tensors),
    and the page's compact records are json.dumps with compact separators of the same records."""
    base = torch.arange(12.0).reshape(3, 4)
    sd = {"plain": torch.ones(2, 3), 'quote"and\\back': base, "ключ.⚙": base.t(), "<b>&amp;": base[1:, ::2],
          "w": nn.Parameter(torch.zeros(1, 4))}
    path = tmp_path / "odd.pt"
    torch.save(sd, path)
    printed = run_cli("inspect", str(path), "--json").stdout
    ov = overview(open_checkpoint(str(path)), tree=False)
    document = inspect_document(ov)
    tensors = document.pop("tensors")
    io = json.loads(printed)["io"]
    assert printed == json.dumps({**document, "io": io, "tensors": tensors}, indent=2, ensure_ascii=False) + "\n"
    assert compact_records(ov) == json.dumps(tensors, ensure_ascii=False, separators=(",", ":"))
    assert compact_records(ov, ascii_only=True) == json.dumps(tensors, separators=(",", ":"))


def test_the_page_embeds_the_lean_document(tmp_path: Path) -> None:
    fx = zoo.build("tied_scalar_empty", tmp_path)
    out = tmp_path / "r.html"
    assert run_cli("report", str(fx.path), "-o", str(out)).exit_code == 0
    match = re.search(r'<script type="application/json" id="ckptdoctor-data">(.*?)</script>', out.read_text(), re.S)
    assert match and "\n" not in match.group(1)  # compact: no indentation in the page
    embedded = json.loads(match.group(1))
    printed = run_cli("inspect", str(fx.path), "--json").json()
    assert {**embedded, "io": None} == {**printed, "io": None}
    _check_records(embedded, fx.reference(), fx.path.read_bytes())
