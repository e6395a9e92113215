"""The readers and scan share one set of safety limits (ckptdoctor.limits)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckptdoctor import limits
from ckptdoctor.engines.scanning import archive as scan_archive
from ckptdoctor.engines.scanning import pickle_walk as scan_pickle
from ckptdoctor.engines.scanning.scan import scan
from ckptdoctor.errors import LimitExceeded
from ckptdoctor.formats.pickle import unpickler as safe_pickle
from ckptdoctor.formats.pickle.unpickler import load_pickle
from ckptdoctor.formats.readers import torch_zip


def test_every_copy_is_the_shared_value() -> None:
    assert scan_archive.MAX_MEMBERS == torch_zip.MAX_MEMBERS == limits.MAX_MEMBERS
    assert scan_archive.MAX_PICKLE == torch_zip.MAX_PICKLE_MEMBER == safe_pickle.MAX_PICKLE_BYTES
    assert safe_pickle.MAX_PICKLE_BYTES == limits.MAX_PICKLE_BYTES
    assert scan_pickle.MAX_MARK_DEPTH == safe_pickle.MAX_MARK_DEPTH == limits.MAX_MARK_DEPTH


def _nested_tuples(depth: int) -> bytes:
    return b"\x80\x02" + b"(" * depth + b"t" * depth + b"."


@pytest.mark.parametrize("depth", [limits.MAX_MARK_DEPTH - 1, limits.MAX_MARK_DEPTH + 1])
def test_reader_and_scan_draw_the_mark_depth_line_at_the_same_place(tmp_path: Path, depth: int) -> None:
    data = _nested_tuples(depth)
    p = tmp_path / "deep.pkl"
    p.write_bytes(data)
    (f,) = scan(p).files
    flagged = "deep-nesting" in {a.code for a in f.anomalies}
    if depth < limits.MAX_MARK_DEPTH:
        assert not flagged
        value = load_pickle(data)
        for _ in range(depth - 1):
            (value,) = value
        assert value == ()
    else:
        assert flagged
        with pytest.raises(LimitExceeded):
            load_pickle(data)


DEEP_JSON = "[" * 100_000 + "]" * 100_000  # Python's json recursion limit, not a size limit


def _safetensors_with(header: bytes, data: bytes) -> bytes:
    import struct

    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + data


@pytest.mark.parametrize("where", ["safetensors-header", "shard-index", "spec-file", "spec-bigint", "config-json"])
def test_json_nested_too_deep_is_one_error_line(tmp_path: Path, where: str) -> None:
    """JSON nested past Python's recursion limit (or an integer past its digit limit) in any JSON the
    commands read is "not valid JSON", exit 2 naming the file, never "unexpected RecursionError"."""
    import torch
    from safetensors.torch import load_file, save_file

    from tests.cli_helpers import run_cli

    model = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), model)
    if where == "safetensors-header":
        bad = tmp_path / "deep.safetensors"
        bad.write_bytes(_safetensors_with(
            b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": ' + DEEP_JSON.encode() + b"}}",
            b"\0" * 4))
        result = run_cli("inspect", bad)
    elif where == "shard-index":
        bad = tmp_path / "sharded"
        bad.mkdir()
        save_file({"w": torch.zeros(1)}, str(bad / "model-00001-of-00001.safetensors"))
        (bad / "model.safetensors.index.json").write_text('{"weight_map": ' + DEEP_JSON + "}")
        result = run_cli("inspect", bad)
        scanned = run_cli("scan", bad, "--json")
        assert scanned.exit_code == 1 and "bad-index" in scanned.stdout, scanned.stderr
    elif where.startswith("spec"):
        bad = tmp_path / "spec.json"
        bad.write_text('{"tensors": ' + (DEEP_JSON if where == "spec-file" else "[" + "1" * 5000 + "]") + "}")
        result = run_cli("check", model, "--against", bad)
    else:  # convert --to hf copies config.json with the dtype updated, or unchanged when it is not JSON
        src = tmp_path / "hf_src"
        src.mkdir()
        save_file({"w": torch.ones(2)}, str(src / "model.safetensors"))
        (src / "config.json").write_text('{"torch_dtype": "float32", "x": ' + DEEP_JSON + "}")
        result = run_cli("convert", src, f"{tmp_path}/out/", "--to", "hf", "--dtype", "bf16")
        assert result.exit_code == 0, result.stderr
        assert (tmp_path / "out" / "config.json").read_bytes() == (src / "config.json").read_bytes()
        assert load_file(str(tmp_path / "out" / "model.safetensors"))["w"].dtype == torch.bfloat16
        return
    assert result.exit_code == 2, result.stdout
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("Error: ") and "not valid JSON" in lines[0] and "unexpected" not in lines[0], lines
    assert "Traceback" not in result.stderr
