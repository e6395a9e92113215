"""The lean central-directory reader against ``zipfile`` on real torch.save archives and variants.

``formats/readers/zip_directory.py`` replaces ``zipfile`` in the torch reader; it must list the
same members at the same offsets, read the same bytes, and refuse what ``zipfile`` refuses.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
import torch

from ckptdoctor.errors import CorruptCheckpoint
from ckptdoctor.formats import open_checkpoint
from ckptdoctor.formats.readers.zip_directory import BadZip, TooManyMembers, ZipDirectory
from ckptdoctor.io.rangefile import RangeFile
from ckptdoctor.io.storage import storage_for


def _directory(path: Path, max_members: int = 1_000_000) -> ZipDirectory:
    return ZipDirectory(RangeFile(storage_for(str(path)), str(path), readahead=False), max_members)


def _saved(tmp_path: Path) -> Path:
    path = tmp_path / "model.pt"
    torch.save(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4)).state_dict(), path)
    return path


def _same_as_zipfile(path: Path) -> None:
    ours = _directory(path)
    with zipfile.ZipFile(path) as z:
        theirs = z.infolist()
        assert [(m.name, m.header_offset, m.compress_type, m.flag_bits, m.crc, m.compress_size, m.file_size)
                for m in ours.members] == [
            (i.filename, i.header_offset, i.compress_type, i.flag_bits, i.CRC, i.compress_size, i.file_size)
            for i in theirs]
        assert ours.start_dir == z.start_dir
        for member, info in zip(ours.members, theirs):
            assert ours.read(member) == z.read(info)


def test_members_offsets_and_bytes_equal_zipfiles(tmp_path: Path) -> None:
    _same_as_zipfile(_saved(tmp_path))


def test_archive_comment_and_bytes_before_the_archive(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    with zipfile.ZipFile(path, "a") as z:
        z.comment = b"written after torch.save"
    _same_as_zipfile(path)
    shifted = tmp_path / "shifted.pt"
    shifted.write_bytes(b"x" * 1000 + path.read_bytes())  # `cat prefix model.pt`: offsets shift by 1000
    _same_as_zipfile(shifted)
    with zipfile.ZipFile(path) as z:
        expected = torch.load(io.BytesIO(path.read_bytes()), weights_only=True)
        assert [t.key for t in open_checkpoint(str(path))] == list(expected) and z.comment


def test_deflated_member_is_inflated_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "deflated.zip"
    payload = b"0123456789" * 1000
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", payload)
    _same_as_zipfile(path)
    assert _directory(path).read(_directory(path).members[0]) == payload


def test_zip64_records_are_honoured(tmp_path: Path) -> None:
    path = tmp_path / "zip64.zip"
    with zipfile.ZipFile(path, "w") as z:
        for name in ("archive/data.pkl", "archive/byteorder"):
            with z.open(name, "w", force_zip64=True) as f:
                f.write(b"little")
    _same_as_zipfile(path)


def test_broken_archives_are_refused(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadZip):
        _directory(truncated)
    with pytest.raises(TooManyMembers):
        _directory(path, max_members=2)
    directory = _directory(path)
    pickle_member = next(m for m in directory.members if m.name.endswith("data.pkl"))
    start = directory.data_start(pickle_member)
    flipped = bytearray(data)
    flipped[start + 3] ^= 0xFF
    bad_crc = tmp_path / "bad_crc.pt"
    bad_crc.write_bytes(bytes(flipped))
    with pytest.raises(BadZip, match="CRC"):
        _directory(bad_crc).read(pickle_member)
    with pytest.raises(CorruptCheckpoint, match="CRC"):
        open_checkpoint(str(bad_crc))
    with zipfile.ZipFile(io.BytesIO(bytes(flipped))) as z, pytest.raises(zipfile.BadZipFile, match="CRC"):
        z.read(pickle_member.name)
