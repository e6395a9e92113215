"""``scan A B C``: a file that cannot be read is reported, as in a directory; it never hides the others.

A truncated download next to a file that calls ``os.system`` must not turn the report into one
``Error:`` line with nothing on stdout: every file gets its entry (the unreadable one as
``unreadable``) and the command exits 1, exactly as scanning the same files as a directory does.
One PATH that cannot be read is still exit 2 (there is nothing else to report). Files are real
``torch.save`` output; the payload is never run (scan reads bytes only).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.cli_helpers import run_cli


class _SystemCall:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("echo never-run",))


@pytest.fixture
def files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    torch.save({"w": torch.ones(2), "x": _SystemCall()}, tmp_path / "evil.bin")
    torch.save({"w": torch.ones(2)}, tmp_path / "good.bin")
    data = (tmp_path / "good.bin").read_bytes()
    (tmp_path / "partial.bin").write_bytes(data[: len(data) // 2])  # an interrupted download
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _entries(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per file name, what scan says about it (paths differ: bare names or dir/name)."""
    out = {}
    for f in doc["files"]:
        entry = {k: v for k, v in f.items() if k != "path"}
        entry["anomalies"] = [{k: v for k, v in a.items() if k != "where"} for a in entry["anomalies"]]
        entry["globals"] = [{k: v for k, v in g.items() if k != "where"} for g in entry["globals"]]
        out[Path(f["path"]).name] = entry
    return out


def test_an_unreadable_file_among_several_is_reported_like_in_a_directory(files: Path) -> None:
    names = ["evil.bin", "partial.bin", "good.bin"]
    listed = run_cli("scan", *names, "--json")
    assert listed.exit_code == 1, listed.stderr
    doc = listed.json()
    assert [f["path"] for f in doc["files"]] == names and doc["safe"] is False
    entries = _entries(doc)
    system = {"name": "posix.system", "verdict": "dangerous", "called": True, "count": 1}
    assert system in entries["evil.bin"]["globals"]
    assert entries["partial.bin"]["format"] == "unreadable" and not entries["partial.bin"]["safe"]
    assert entries["partial.bin"]["anomalies"][0]["code"] == "unreadable"
    assert "end-of-central-directory" in entries["partial.bin"]["anomalies"][0]["message"]
    assert entries["good.bin"]["safe"] is True

    directory = files / "together"
    directory.mkdir()
    for name in names:
        shutil.copy(files / name, directory / name)
    as_directory = run_cli("scan", str(directory), "--json")
    assert as_directory.exit_code == listed.exit_code
    assert _entries(as_directory.json()) == entries

    human = run_cli("scan", *names)
    assert human.exit_code == 1 and human.stderr == ""
    assert "posix.system" in human.stdout and "partial.bin  (unreadable" in human.stdout
    assert "3 files scanned, 2 unsafe" in human.stdout


def test_a_missing_path_among_several_is_reported_too(files: Path) -> None:
    r = run_cli("scan", "evil.bin", "no-such.bin", "--json")
    assert r.exit_code == 1, r.stderr
    entries = _entries(r.json())
    assert entries["no-such.bin"]["format"] == "unreadable"
    assert entries["no-such.bin"]["anomalies"][0]["message"].startswith("InputNotFound: ")
    assert not entries["evil.bin"]["safe"]


def test_one_unreadable_path_is_still_exit_2(files: Path) -> None:
    r = run_cli("scan", "partial.bin", "--json")
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr.startswith("Error: partial.bin: zip archive without an end-of-central-directory record")


def test_several_safe_files_are_exit_0(files: Path) -> None:
    torch.save({"v": torch.zeros(3)}, files / "good2.bin")
    assert run_cli("scan", "good.bin", "good2.bin").exit_code == 0


def test_scan_json_counts_the_reads_of_a_local_file(tmp_path: Path) -> None:
    # The contract: every --json document carries io, and local files count too.
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.arange(4096.0)}, path)
    result = run_cli("scan", "--json", str(path))
    assert result.exit_code == 0, result.output
    io = result.json()["io"]
    assert io["requests"] >= 2 and io["bytes_written"] == 0  # the head, then the archive
    assert io["bytes_read"] >= path.stat().st_size  # every storage is read for its CRC-32
