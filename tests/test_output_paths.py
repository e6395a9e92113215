"""Input and output paths every command refuses, or takes, the way a user expects.

A one-file output (``fix``, ``convert --to torch|safetensors``, ``report``, ``spec``) never goes
in place of a directory: OUT ending in '/' or naming an existing directory is one ``Error:`` line
with a file name to use inside it, exit 2, with or without ``--force``, and nothing the user had
changes (no file, no temp file, no directory removed). A ``file://`` URL, as any input or output
of any command, behaves exactly like the plain path. Checkpoints are real ``torch.save`` files.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tests.cli_helpers import Result, run_cli
from tests.remote_servers import RangeServer


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


# ---------------------------------------------------------------- http(s): read only; sharded checkpoints by URL

CHECK_MODEL_FILE = '''
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
'''


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, RangeServer]]:
    """A Lightning-style checkpoint, a model file and a sharded safetensors directory, on a real HTTP server."""
    root = tmp_path / "served"
    root.mkdir()
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    torch.save({"state_dict": {f"model.body.{k}": v for k, v in body.state_dict().items()}, "epoch": 3},
               root / "l.ckpt")
    (tmp_path / "m.py").write_text(CHECK_MODEL_FILE)
    hf_dir = root / "sh"
    hf_dir.mkdir()
    weight_map = {}
    for i, (key, value) in enumerate(body.state_dict().items()):
        shard = f"model-0000{i + 1}-of-00004.safetensors"
        save_file({key: value.contiguous()}, hf_dir / shard)
        weight_map[key] = shard
    (hf_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 4 * 26}, "weight_map": weight_map}))
    server = RangeServer(root)
    try:
        yield tmp_path, server
    finally:
        server.stop()


def test_check_of_an_http_source_suggests_a_local_output(served: tuple[Path, RangeServer],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    directory, server = served
    monkeypatch.chdir(directory)
    r = run_cli("check", f"{server.url}/l.ckpt", "--against", "m.py:Net")
    assert r.exit_code == 1, r.stderr
    fix_line = r.stdout.strip().splitlines()[-1]
    assert fix_line.startswith("Fix: ckptdoctor fix ") and fix_line.endswith(" -o l.fixed.ckpt"), fix_line
    done = run_cli(*shlex.split(fix_line.removeprefix("Fix: ckptdoctor ")))  # the suggestion, as printed
    assert done.exit_code == 0, done.stderr
    assert run_cli("check", "l.fixed.ckpt", "--against", "m.py:Net").exit_code == 0


def test_a_local_source_in_a_directory_gets_its_output_beside_it(served: tuple[Path, RangeServer]) -> None:
    directory, _server = served
    source = directory / "served" / "l.ckpt"
    r = run_cli("check", str(source), "--against", str(directory / "m.py") + ":Net")
    assert r.stdout.strip().splitlines()[-1].endswith(f" -o {directory / 'served' / 'l.fixed.ckpt'}")


WRITERS_TO_HTTP = {
    "fix": ["fix", "{url}/l.ckpt", "--strip", "model.", "-o", "{url}/l.fixed.ckpt"],
    "convert-file": ["convert", "{url}/l.ckpt", "{url}/l.safetensors"],
    "convert-dir": ["convert", "{url}/l.ckpt", "{url}/out/"],
    "spec": ["spec", "{url}/l.ckpt", "-o", "{url}/l.spec.json"],
    "report": ["report", "{url}/l.ckpt", "-o", "{url}/l.html"],
}


@pytest.mark.parametrize("command", sorted(WRITERS_TO_HTTP))
@pytest.mark.parametrize("force", [False, True])
def test_an_http_output_is_refused_before_anything_is_read(served: tuple[Path, RangeServer], command: str,
                                                           force: bool) -> None:
    _directory, server = served
    args = [a.replace("{url}", server.url) for a in WRITERS_TO_HTTP[command]]
    server.reset()
    r = run_cli(*args, *(["--force"] if force else []))
    assert r.exit_code == 2 and r.stdout == ""
    out = args[-1] if command.startswith("convert") else args[args.index("-o") + 1]
    assert r.stderr.splitlines() == [
        f"Error: {out}: http(s) URLs are read only; ckptdoctor cannot write there",
        "Hint: Write to a local path, or to an object store (s3://, gs://).",
    ]
    assert server.log == []  # refused up front: not even the source was read


def _inspected(path: str) -> dict[str, Any]:
    r = run_cli("inspect", path, "--json")
    assert r.exit_code == 0, r.stderr
    doc = r.json()
    return {k: v for k, v in doc.items() if k not in ("io", "path")}


@pytest.mark.parametrize("spelling", ["sh", "sh/", "sh/model.safetensors.index.json"])
def test_a_sharded_checkpoint_opens_by_its_directory_or_its_index(served: tuple[Path, RangeServer],
                                                                    spelling: str) -> None:
    directory, server = served
    expected = _inspected(str(directory / "served" / "sh"))
    assert expected["format"] == "hf-sharded-safetensors" and len(expected["tensors"]) == 4
    assert _inspected(f"{server.url}/{spelling}") == expected
    assert _inspected(str(directory / "served" / spelling)) == expected


def test_an_index_path_reads_through_that_index(tmp_path: Path) -> None:
    """A directory with two indexes is ambiguous; a path to one of them is not."""
    torch.manual_seed(1)
    state = nn.Linear(2, 3).state_dict()
    for name, keys in (("a", ["weight"]), ("b", ["weight", "bias"])):
        save_file({k: state[k] for k in keys}, tmp_path / f"{name}.safetensors")
        (tmp_path / f"{name}.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": dict.fromkeys(keys, f"{name}.safetensors")}))
    assert run_cli("inspect", str(tmp_path)).exit_code == 2  # several indexes: which one?
    r = run_cli("inspect", str(tmp_path / "b.safetensors.index.json"), "--keys")
    assert r.exit_code == 0, r.stderr
    assert sorted(r.stdout.split()) == ["bias", "weight"]


class _Payload:
    """Pickles as a call of os.system: what scan must find in a shard (never run: scan reads statically)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("echo never-run",))


@pytest.mark.parametrize("served_too", [False, True])
def test_scan_of_an_index_path_scans_the_checkpoint_it_indexes(served: tuple[Path, RangeServer],
                                                               served_too: bool) -> None:
    directory, server = served
    shards = directory / "served" / "bins"
    shards.mkdir()
    torch.save({"w": torch.ones(2)}, shards / "pytorch_model-00001-of-00002.bin")
    torch.save({"v": torch.ones(2), "x": _Payload()}, shards / "pytorch_model-00002-of-00002.bin")
    (shards / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        "w": "pytorch_model-00001-of-00002.bin", "v": "pytorch_model-00002-of-00002.bin"}}))
    base = f"{server.url}/bins" if served_too else str(shards)
    by_dir = run_cli("scan", base + "/", "--json")
    by_index = run_cli("scan", f"{base}/pytorch_model.bin.index.json", "--json")
    assert by_index.exit_code == by_dir.exit_code == 1, by_index.stderr
    assert _without_io(by_index.json()) == _without_io(by_dir.json())
    unsafe = [f for f in by_index.json()["files"] if not f["safe"]]
    assert [f["path"].rsplit("/", 1)[-1] for f in unsafe] == ["pytorch_model-00002-of-00002.bin"]
    assert {"name": "posix.system", "verdict": "dangerous"} in [
        {k: g[k] for k in ("name", "verdict")} for g in unsafe[0]["globals"]]


def _without_io(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k != "io"}


def test_a_dcp_checkpoint_opens_by_its_metadata_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`.metadata` is DCP's index of its shards, as model.safetensors.index.json is of Hugging Face's."""
    import warnings

    import torch.distributed.checkpoint as dcp

    torch.manual_seed(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save({"model": nn.Linear(3, 2).state_dict()}, checkpoint_id=str(tmp_path / "run"))
    expected = _inspected(str(tmp_path / "run"))
    assert expected["format"] == "dcp"
    assert _inspected(str(tmp_path / "run" / ".metadata")) == expected
    monkeypatch.chdir(tmp_path / "run")
    assert _inspected(".metadata") == expected


def test_a_metadata_file_outside_a_dcp_checkpoint_is_one_error(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(2)}, tmp_path / "w.pt")
    (tmp_path / "w.pt").rename(tmp_path / ".metadata")  # torch.save refuses that name itself
    r = run_cli("inspect", str(tmp_path / ".metadata"))
    assert r.exit_code == 2
    assert r.stderr.startswith("Error: ") and "Traceback" not in r.stderr
