"""The local storage keeps descriptors open, but never reads a file that was replaced through a stale one."""

from __future__ import annotations

import os
from pathlib import Path

from ckptdoctor.io.storage import LOCAL


def test_replaced_file_is_read_anew(tmp_path: Path) -> None:
    path = tmp_path / "spec.json"
    path.write_bytes(b'{"old": 1}')
    assert LOCAL.read_range(str(path), 0, 10) == b'{"old": 1}'
    replacement = tmp_path / "tmp"
    replacement.write_bytes(b'{"new": 22}')
    os.replace(replacement, path)  # what every atomic writer does
    assert LOCAL.read_range(str(path), 0, 11) == b'{"new": 22}'
    LOCAL.close_all()


def test_offsets_outside_the_file_read_as_nothing(tmp_path: Path) -> None:
    """Zip fields can make an offset negative (far below -2**63 after zip64 arithmetic) or past
    2**63: reading there is reading past the end (the callers report the archive as corrupt), not an
    OverflowError from os.pread escaping as an "unexpected" error."""
    import torch

    from ckptdoctor.io.rangefile import RangeFile

    path = tmp_path / "m.pt"
    torch.save({"w": torch.arange(4.0)}, path)
    f = RangeFile(LOCAL, str(path))
    for offset in (-5, -(2**64), 2**63 + 7, 2**70):
        assert f.read_at(offset, 16) == b""
    assert f.read_at(0, 4) == path.read_bytes()[:4]


def test_the_folder_a_path_sits_in() -> None:
    from ckptdoctor.io.storage import folder_of

    assert folder_of("ckpt/model.safetensors.index.json") == "ckpt"
    assert folder_of(".metadata") == "."
    assert folder_of("/model.safetensors.index.json") == "/"  # the root, not the working directory
    assert folder_of("s3://bucket/run/.metadata") == "s3://bucket/run"
