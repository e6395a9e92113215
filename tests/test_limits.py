"""The readers and scan share one set of safety limits (ckptdoctor.limits)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckptdoctor import limits
from ckptdoctor.engines import scan_archive, scan_pickle
from ckptdoctor.engines.scan import scan
from ckptdoctor.errors import LimitExceeded
from ckptdoctor.formats import safe_pickle, torch_zip
from ckptdoctor.formats.safe_pickle import load_pickle


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
