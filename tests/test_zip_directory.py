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
from ckptdoctor.formats.readers import zip_directory
from ckptdoctor.formats.readers.torch_zip import TorchZipArchive
from ckptdoctor.formats.readers.zip_directory import BadZip, Member, TooManyMembers, ZipDirectory
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
    _same_as_table(ours)


def _same_as_table(directory: ZipDirectory) -> None:
    """The members as a table (what the torch reader asks for) are the members as tuples."""
    table = directory.table()
    assert [table.member(i) for i in range(len(table.names))] == directory.members


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


def _directory_bytes(path: Path) -> bytes:
    """The central directory's bytes, as the end record places them."""
    fields, _, _ = zip_directory._end_record(RangeFile(storage_for(str(path)), str(path), readahead=False))
    start = _directory(path).start_dir
    return path.read_bytes()[start:start + fields[4]]


def _loop_members(path: Path) -> list[Member]:
    """The directory as the entry-by-entry loop reads it (the column parse switched off)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(zip_directory, "_parse_plain", lambda *args: None)
        return _directory(path).members


def test_column_parse_equals_the_loop_or_steps_aside(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    data = path.read_bytes()
    directory_bytes = _directory_bytes(path)
    assert zip_directory._parse_plain(directory_bytes, 0, 100) == _directory(path).members == _loop_members(path)
    shifted = tmp_path / "shifted.pt"
    shifted.write_bytes(b"x" * 1000 + data)
    assert _directory(shifted).members == _loop_members(shifted)
    _same_as_table(_directory(shifted))
    assert zip_directory._parse_plain(directory_bytes, 1000, 100) == _directory(shifted).members
    # What the column parse cannot vouch for goes to the loop, which gives the same members or error.
    cut = directory_bytes.index(b"PK\x01\x02", 4)
    assert zip_directory._parse_plain(directory_bytes + b"junk", 0, 100) is None  # trailing bytes
    assert zip_directory._parse_plain(directory_bytes[:-3], 0, 100) is None  # truncated entry
    assert zip_directory._parse_plain(directory_bytes[:cut] + b"PK\x01\x02" + b"\x00" * 10, 0, 100) is None
    assert zip_directory._parse_plain(directory_bytes, 0, 2) is None  # too many: the loop raises
    assert zip_directory._parse_plain(b"junk" + directory_bytes, 0, 100) is None


def test_names_holding_the_signature_nul_or_extras_go_to_the_loop(tmp_path: Path) -> None:
    extra = zipfile.ZipInfo("archive/data/with_extra")
    extra.extra = b"\xfe\xca\x02\x00ab"
    for i, odd in enumerate(("archive/data/PK\x01\x02inside", "archive/data/cut#here", extra)):
        path = tmp_path / f"odd{i}.zip"
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("archive/data.pkl", b"x")
            z.writestr(odd, b"y")
            z.writestr("archive/version", b"3")
        path.write_bytes(path.read_bytes().replace(b"cut#here", b"cut\x00here"))  # zipfile cuts NULs itself
        assert zip_directory._parse_plain(_directory_bytes(path), 0, 100) is None
        _same_as_zipfile(path)
        assert _directory(path).members == _loop_members(path)


def _many_storages(tmp_path: Path, n: int = 300) -> Path:
    path = tmp_path / "many.pt"
    torch.save({f"layers.{i}.weight": torch.full((2, 3), float(i)) for i in range(n)}, path)
    return path


def test_local_headers_checked_together_give_what_each_header_gives(tmp_path: Path) -> None:
    path = _many_storages(tmp_path)
    archive = TorchZipArchive(str(path))
    try:
        names = [n for n in archive.members if n.startswith(archive.prefix + "data/")]
        verified = archive.verified_starts(names)
        assert verified == {n: archive.stored_range(archive.members[n])[0] for n in names}
        assert sorted(verified) == sorted(names) and len(names) == 300
    finally:
        archive.close()


def test_one_bad_local_header_among_many_is_reported_as_before(tmp_path: Path) -> None:
    """A damaged header deep in the archive makes the batch check step aside; the member-by-member
    resolution then raises the reader's usual error (the hostile corpus covers small archives)."""
    path = _many_storages(tmp_path)
    archive = TorchZipArchive(str(path))
    try:
        victim = archive.members[archive.prefix + "data/250"]
        names = [n for n in archive.members if n.startswith(archive.prefix + "data/")]
    finally:
        archive.close()
    data = bytearray(path.read_bytes())
    for damage, message in ((slice(0, 4), "no valid local header"), (slice(28, 30), "past the end")):
        broken = bytearray(data)
        broken[victim.header_offset + damage.start:victim.header_offset + damage.stop] = (
            b"XXXX" if damage.start == 0 else b"\xff\xff")
        bad = tmp_path / f"bad{damage.start}.pt"
        bad.write_bytes(bytes(broken))
        archive = TorchZipArchive(str(bad))
        try:
            assert archive.verified_starts(names) == {}
        finally:
            archive.close()
        with pytest.raises(CorruptCheckpoint, match=message):
            open_checkpoint(str(bad))
