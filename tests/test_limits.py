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
