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
