"""Input and output paths every command refuses, or takes, the way a user expects.

A one-file output (``fix``, ``convert --to torch|safetensors``, ``report``, ``spec``) never goes
in place of a directory: OUT ending in '/' or naming an existing directory is one ``Error:`` line
with a file name to use inside it, exit 2, with or without ``--force``, and nothing the user had
changes (no file, no temp file, no directory removed). A ``file://`` URL, as any input or output
of any command, behaves exactly like the plain path. Checkpoints are real ``torch.save`` files.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from tests.cli_helpers import Result, run_cli


def _wrapped_checkpoint(directory: Path) -> Path:
    """A DDP-style checkpoint (``module.`` on every key) of a small real module."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    path = directory / "a.pt"
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, path)
    return path


def _snapshot(directory: Path) -> dict[str, bytes | None]:
    """Every entry under ``directory``: file bytes, or None for a directory."""
    return {str(p.relative_to(directory)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(directory.rglob("*"))}


def _assert_refused(r: Result, out: str, suggestion: str) -> None:
    assert r.exit_code == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert lines[0] == f"Error: {out}: the output path is a directory, and the output is one file", r.stderr
    assert lines[1:] == [f"Hint: Name a file inside it, for example {suggestion}"], r.stderr
    assert r.stdout == ""


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory with the checkpoint, an empty directory and one holding a user's file (cwd)."""
    _wrapped_checkpoint(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("the user's file\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


ONE_FILE_COMMANDS = {
    "fix": (["fix", "a.pt", "--strip", "module.", "-o"], "a.fixed.pt"),
    "convert-torch": (["convert", "a.pt", "--to", "torch"], "a.pt"),
    "convert-safetensors": (["convert", "a.pt", "--to", "safetensors"], "a.safetensors"),
    "report": (["report", "a.pt", "-o"], "a.html"),
    "spec": (["spec", "a.pt", "-o"], "a.spec.json"),
}


@pytest.mark.parametrize("command", sorted(ONE_FILE_COMMANDS))
@pytest.mark.parametrize("out", ["new_dir/", "empty", "empty/", "full", "full/"])
@pytest.mark.parametrize("force", [False, True])
def test_a_one_file_output_never_takes_a_directory(workdir: Path, command: str, out: str, force: bool) -> None:
    before = _snapshot(workdir)
    args, name = ONE_FILE_COMMANDS[command]
    r = run_cli(*args, out, *(["--force"] if force else []))
    _assert_refused(r, out, f"{out.rstrip('/')}/{name}")
    assert _snapshot(workdir) == before  # nothing created, replaced or left behind


def test_fix_into_a_file_inside_the_suggested_directory_works(workdir: Path) -> None:
    r = run_cli("fix", "a.pt", "--strip", "module.", "-o", "full/a.fixed.pt")
    assert r.exit_code == 0, r.stderr
    fixed = torch.load(workdir / "full" / "a.fixed.pt", weights_only=True)
    source = torch.load(workdir / "a.pt", weights_only=True)
    assert list(fixed) == [k.removeprefix("module.") for k in source]
    assert all(torch.equal(fixed[k.removeprefix("module.")], v) for k, v in source.items())
    assert (workdir / "full" / "notes.txt").read_text() == "the user's file\n"


# ---------------------------------------------------------------- file:// URLs, inputs and outputs

MODEL_FILE = '''
from torch import nn


def make():
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
'''


def _as_url(path: Path) -> str:
    return "file://" + str(path)


def _run_in(directory: Path, spell: Callable[[Path], str], template: list[str]) -> Result:
    """Run ``template`` with each ``{name}`` spelled by ``spell`` (plain path or file:// URL) in ``directory``."""
    def place(match: re.Match[str]) -> str:
        name = match.group(1)
        return spell(directory / name.rstrip("/")) + ("/" if name.endswith("/") else "")

    return run_cli(*[re.sub(r"\{([^}]+)\}", place, arg) for arg in template])


FILE_URL_COMMANDS = {
    "inspect": (["inspect", "{a.pt}", "--json"], []),
    "diff": (["diff", "{a.pt}", "{b.pt}", "--json"], []),
    "check": (["check", "{a.pt}", "--against", "{m.py}:make", "--json"], []),
    "scan": (["scan", "{a.pt}", "{b.pt}", "--json"], []),
    "fix": (["fix", "{a.pt}", "--strip", "module.", "-o", "{out.pt}", "--json"], ["out.pt"]),
    "fix-against": (["fix", "{a.pt}", "--against", "{m.py}:make", "-o", "{out.safetensors}", "--json"],
                    ["out.safetensors"]),
    "convert-file": (["convert", "{a.pt}", "{out.safetensors}", "--strip", "module.", "--json"], ["out.safetensors"]),
    "convert-dir": (["convert", "{a.pt}", "{outdir/}", "--json"], ["outdir/model.safetensors"]),
    "spec": (["spec", "{a.pt}", "-o", "{out.spec.json}", "--json"], ["out.spec.json"]),
    "report": (["report", "{a.pt}", "--diff", "{b.pt}", "-o", "{out.html}"], ["out.html"]),
}


def _file_url_workspace(directory: Path) -> None:
    directory.mkdir()
    _wrapped_checkpoint(directory)
    plain = torch.load(directory / "a.pt", weights_only=True)
    torch.save({k.removeprefix("module."): v + 1 for k, v in plain.items()}, directory / "b.pt")
    (directory / "m.py").write_text(MODEL_FILE)


@pytest.mark.parametrize("command", sorted(FILE_URL_COMMANDS))
def test_file_urls_work_like_plain_paths(tmp_path: Path, command: str) -> None:
    template, outputs = FILE_URL_COMMANDS[command]
    by_path, by_url = tmp_path / "p", tmp_path / "u"  # same length: spec and report embed the path
    _file_url_workspace(by_path)
    _file_url_workspace(by_url)
    expected = _run_in(by_path, str, template)
    got = _run_in(by_url, _as_url, template)
    assert (got.exit_code, got.stderr) == (expected.exit_code, expected.stderr), got.stderr
    assert expected.exit_code in (0, 1) and "Error" not in got.stderr
    assert got.stdout.replace(str(by_url), "DIR") == expected.stdout.replace(str(by_path), "DIR")
    for name in outputs:
        written, reference = by_url / name, by_path / name
        assert written.is_file()
        if name.endswith((".pt", ".safetensors")):  # the same tensors, bit for bit
            a, b = _load_any(written), _load_any(reference)
            assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not [p for p in by_url.iterdir() if p.name.startswith(".ckptdoctor-tmp")]


def _load_any(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(path)
    loaded = torch.load(path, weights_only=True)
    assert isinstance(loaded, dict)
    return loaded
