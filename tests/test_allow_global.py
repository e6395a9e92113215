"""--allow-global / [tool.ckptdoctor] allow-globals: a Lightning-style checkpoint with an Enum and a
defaultdict in its hyper-parameters, read as data (never imported), checked, diffed and fixed.

The fixture is written by real ``torch.save`` in a subprocess that imports ``allow_sentinel``
(tests/allow_sentinel.py); importing that module writes a marker file, so each test can prove
ckptdoctor never imported it.
"""

from __future__ import annotations

import json
import os
import pickle
import pickletools
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import safetensors.torch
import torch

from ckptdoctor.errors import UnsafeContent
from ckptdoctor.formats.pickle.allowance import allowing
from ckptdoctor.formats.pickle.fast import NOT_FAST, fast_load
from ckptdoctor.formats.pickle.unpickler import FAST_MIN_BYTES, load_pickle
from ckptdoctor.model.checkpoint import OpaqueObject
from tests.cli_helpers import run_cli

TESTS = Path(__file__).parent
MODE = "allow_sentinel.Mode"
ALLOW = ("--allow-global", MODE, "--allow-global", "collections.defaultdict")

BUILD = textwrap.dedent("""
    import collections, sys, torch
    import allow_sentinel
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    hp = {"mode": allow_sentinel.Mode.B, "lr": 0.1}
    if sys.argv[2] == "full":
        hp["counts"] = collections.defaultdict(int, {"a": 1})
    torch.save({"state_dict": {"model." + k: v for k, v in net.state_dict().items()},
                "hyper_parameters": hp, "epoch": 3}, sys.argv[1])
""")

LOAD = textwrap.dedent("""
    import collections, json, sys, torch
    import allow_sentinel
    if sys.argv[2] == "safe":
        with torch.serialization.safe_globals([allow_sentinel.Mode]):
            ckpt = torch.load(sys.argv[1], weights_only=True)
    else:
        ckpt = torch.load(sys.argv[1], weights_only=False)
    hp = ckpt["hyper_parameters"]
    counts = hp.get("counts")
    print(json.dumps({"mode": repr(hp["mode"]), "mode_is_enum": hp["mode"] is allow_sentinel.Mode.B,
                      "counts": None if counts is None else [type(counts).__name__, dict(counts), counts["zzz"]],
                      "epoch": ckpt["epoch"], "keys": sorted(ckpt["state_dict"])}))
""")


def _python(script: str, *args: str, env_marker: Path | None = None) -> str:

    env = {k: v for k, v in os.environ.items() if k != "CKPTDOCTOR_SENTINEL"}  # torch imports it, on purpose
    env["PYTHONPATH"] = str(TESTS)
    if env_marker is not None:
        env["CKPTDOCTOR_SENTINEL"] = str(env_marker)
    done = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
                          check=True, timeout=300)
    return done.stdout


@pytest.fixture(scope="module")
def lightning(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("allow")
    path = folder / "lightning.ckpt"
    marker = folder / "imported.txt"
    _python(BUILD, str(path), "full", env_marker=marker)
    assert marker.exists()  # the sentinel works: importing allow_sentinel writes it
    marker.unlink()
    return path


@pytest.fixture(autouse=True)
def _never_imported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> object:
    marker = tmp_path / "sentinel-imported.txt"
    monkeypatch.setenv("CKPTDOCTOR_SENTINEL", str(marker))
    monkeypatch.syspath_prepend(str(TESTS))  # allow_sentinel *could* be imported: it must not be
    monkeypatch.chdir(tmp_path)  # no pyproject.toml above tmp_path unless a test writes one
    yield
    assert not marker.exists()
    assert "allow_sentinel" not in sys.modules


def _global_call(pickle_bytes: bytes, name: str) -> list[tuple[str, object]]:
    """The opcodes from ``GLOBAL name`` to its REDUCE (memo opcodes left out: numbering may differ)."""
    ops = [(op.name, arg) for op, arg, _ in pickletools.genops(pickle_bytes)
           if op.name not in ("BINPUT", "LONG_BINPUT", "MEMOIZE", "PUT")]
    start = ops.index(("GLOBAL", name))
    return ops[start:ops.index(("REDUCE", None), start) + 1]


def _data_pkl(path: Path) -> bytes:
    with zipfile.ZipFile(path) as archive:
        return archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))


@pytest.mark.parametrize("command", [
    ["inspect", "{ckpt}"], ["check", "{ckpt}", "--against", "{ckpt}"], ["diff", "{ckpt}", "{ckpt}"],
    ["fix", "{ckpt}", "--strip", "model.", "-o", "out.ckpt"], ["spec", "{ckpt}", "-o", "spec.json"],
    ["convert", "{ckpt}", "out.pt", "--to", "torch"], ["report", "{ckpt}", "-o", "page.html"],
])
def test_refused_by_default_naming_the_global_and_the_flag(lightning: Path, command: list[str]) -> None:
    result = run_cli(*(part.format(ckpt=lightning) for part in command))
    assert result.exit_code == 2
    assert f"calls `{MODE}`" in result.stderr
    assert f"--allow-global {MODE}" in result.stderr
    assert not list(Path.cwd().iterdir())  # nothing written


def test_inspect_check_diff_with_the_allowance(lightning: Path) -> None:
    inspected = run_cli("inspect", str(lightning), "--json", *ALLOW)
    assert inspected.exit_code == 0, inspected.stderr
    doc = inspected.json()
    assert doc["tensor_count"] == 4 and doc["state_dict_path"] == ["state_dict"]
    assert {e["name"]: e["summary"] for e in doc["entries"]} == {"hyper_parameters": "dict of 3", "epoch": "3"}

    checked = run_cli("check", str(lightning), "--against", str(lightning), *ALLOW)
    assert checked.exit_code == 0, checked.stderr
    diffed = run_cli("diff", str(lightning), str(lightning), "--values", *ALLOW)
    assert diffed.exit_code == 0, diffed.stderr

    # only one of the two allowed: the other is still refused, by name
    half = run_cli("inspect", str(lightning), "--allow-global", MODE)
    assert half.exit_code == 2 and "collections.defaultdict" in half.stderr


def test_fix_writes_the_calls_back_and_torch_loads_them(lightning: Path, tmp_path: Path) -> None:
    out = tmp_path / "fixed.ckpt"
    fixed = run_cli("fix", str(lightning), "--strip", "model.", "-o", str(out), "--json", *ALLOW)
    assert fixed.exit_code == 0, fixed.stderr
    notes = " ".join(fixed.json()["notes"])
    assert "allowed with --allow-global" in notes and "add_safe_globals" in notes and MODE in notes

    before = json.loads(_python(LOAD, str(lightning), "full"))
    after = json.loads(_python(LOAD, str(out), "full"))
    assert after["mode_is_enum"] and after["mode"] == before["mode"] == "<Mode.B: 'b'>"
    assert after["counts"] == before["counts"] == ["defaultdict", {"a": 1}, 0]  # int factory kept
    assert after["epoch"] == 3
    assert after["keys"] == ["0.bias", "0.weight", "2.bias", "2.weight"]
    # byte-faithful: the same GLOBAL, arguments and REDUCE as torch.save wrote
    for name in ("allow_sentinel Mode", "collections defaultdict"):
        assert _global_call(_data_pkl(out), name) == _global_call(_data_pkl(lightning), name)

    # ckptdoctor reads its own output back with the same allowance, and refuses it without
    assert run_cli("diff", str(lightning), str(out), *ALLOW).exit_code == 1  # keys renamed
    assert run_cli("inspect", str(out)).exit_code == 2


def test_fixed_enum_loads_with_weights_only_and_safe_globals(tmp_path: Path) -> None:
    # torch's weights_only unpickler cannot SETITEM into a defaultdict even when allowed, so
    # this checks the Enum alone: torch.load(weights_only=True) + safe_globals([Mode]).
    src, out = tmp_path / "enum.ckpt", tmp_path / "enum_fixed.ckpt"
    _python(BUILD, str(src), "enum")
    fixed = run_cli("fix", str(src), "--strip", "model.", "-o", str(out), "--allow-global", MODE)
    assert fixed.exit_code == 0, fixed.stderr
    loaded = json.loads(_python(LOAD, str(out), "safe"))
    assert loaded["mode_is_enum"] and loaded["counts"] is None
    assert json.loads(_python(LOAD, str(src), "safe"))["mode"] == loaded["mode"]


def test_convert_to_torch_keeps_the_calls(lightning: Path, tmp_path: Path) -> None:
    out = tmp_path / "converted.pt"
    converted = run_cli("convert", str(lightning), str(out), "--to", "torch", *ALLOW)
    assert converted.exit_code == 0, converted.stderr
    assert "allowed with --allow-global" in " ".join(converted.stdout.split())  # convert's notes
    for name in ("allow_sentinel Mode", "collections defaultdict"):
        assert _global_call(_data_pkl(out), name) == _global_call(_data_pkl(lightning), name)


def test_pyproject_allow_globals(lightning: Path, tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "x"\n\n[tool.ckptdoctor]\nallow-globals = ["allow_sentinel.Mode"]\n')
    nested = tmp_path / "sub" / "dir"
    nested.mkdir(parents=True)

    os.chdir(nested)  # found in a parent directory; the flag adds to the file's list
    assert run_cli("inspect", str(lightning)).exit_code == 2  # defaultdict still refused
    result = run_cli("inspect", str(lightning), "--allow-global", "collections.defaultdict")
    assert result.exit_code == 0, result.stderr


@pytest.mark.parametrize("value", ["Mode", "allow_sentinel.", "os.system; rm", ".x", "a..b"])
def test_bad_values_are_usage_errors(lightning: Path, value: str) -> None:
    result = run_cli("inspect", str(lightning), "--allow-global", value)
    assert result.exit_code == 2 and "MODULE.NAME" in result.stderr


def test_bad_pyproject_is_a_usage_error(lightning: Path, tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[tool.ckptdoctor]\nallow-globals = "allow_sentinel.Mode"\n')
    result = run_cli("inspect", str(lightning))
    assert result.exit_code == 2 and "allow-globals" in result.stderr


def test_allowed_call_is_still_never_executed(tmp_path: Path) -> None:
    # An allowed `os.system` is read as a record holding its argument: nothing runs.

    marker = tmp_path / "ran.txt"
    payload = b"cos\nsystem\n(V" + f"touch {marker}".encode() + b"\ntR."
    with allowing({"os.system"}):
        record = load_pickle(payload)
    assert isinstance(record, OpaqueObject) and record.cls.dotted == "os.system"
    assert record.args == (f"touch {marker}",)
    assert not marker.exists()
    with pytest.raises(UnsafeContent) as refused:
        load_pickle(payload)
    assert "--allow-global os.system" in (refused.value.hint or "")


def test_large_pickle_goes_through_the_interpreter() -> None:
    # Past FAST_MIN_BYTES the C path runs first: on a call of a non-stand-in global it must give
    # way to the interpreter, which refuses it by default and records it when allowed.


    pad = pickle.dumps(list(range(30000)), protocol=2)[2:-1]
    payload = b"\x80\x02(" + pad + b"callow_sentinel\nMode\nX\x01\x00\x00\x00b\x85Rt."
    assert len(payload) > FAST_MIN_BYTES
    assert fast_load(payload, None) is NOT_FAST
    with pytest.raises(UnsafeContent, match=MODE):
        load_pickle(payload)
    with allowing({MODE}) as allowance:
        numbers, record = load_pickle(payload)
    assert numbers == list(range(30000)) and record.cls.dotted == MODE and record.args == ("b",)
    assert allowance.used == {MODE}


def test_python2_names_are_read_and_allowed_by_their_python3_names(tmp_path: Path) -> None:
    """torch.save (protocol 2) writes `range` as `__builtin__.xrange`; ckptdoctor names and allows it as
    `builtins.range`, as scan and torch.serialization.add_safe_globals do (the old name still works),
    and fix writes it back the way torch.save wrote it."""
    path = tmp_path / "h.ckpt"
    torch.save({"state_dict": {"model.w": torch.ones(2)}, "hyper_parameters": {"epochs": range(3)}}, path)
    assert b"__builtin__\nxrange" in _data_pkl(path)
    refused = run_cli("inspect", str(path))
    assert refused.exit_code == 2 and "`builtins.range`" in refused.stderr
    assert "--allow-global builtins.range" in refused.stderr
    for name in ("builtins.range", "__builtin__.xrange"):
        assert run_cli("inspect", str(path), "--allow-global", name).exit_code == 0
    out = tmp_path / "fixed.ckpt"
    fixed = run_cli("fix", str(path), "--strip", "model.", "-o", str(out), "--allow-global", "builtins.range")
    assert fixed.exit_code == 0, fixed.stderr
    assert _global_call(_data_pkl(out), "__builtin__ xrange") == _global_call(_data_pkl(path), "__builtin__ xrange")
    loaded = torch.load(out, weights_only=False)
    assert loaded["hyper_parameters"]["epochs"] == range(3) and list(loaded["state_dict"]) == ["w"]


class _Payload:
    """Pickles as a call of os.system (run only by an unpickler that imports and calls it)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def test_a_call_that_runs_code_is_never_invited_and_never_written_back(tmp_path: Path) -> None:
    """The refusal of `posix.system` does not say "if you trust it"; allowed to salvage the tensors,
    it is read as a record, never run, and never written into a torch output."""
    marker = tmp_path / "ran.txt"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"module.w": torch.arange(3.0)}, "x": _Payload(marker)}, path)
    name = "posix.system" if os.name == "posix" else "nt.system"
    refused = run_cli("inspect", str(path))
    assert refused.exit_code == 2 and f"`{name}`, which runs code" in refused.stderr
    assert "If you trust" not in refused.stderr
    out = tmp_path / "fixed.pt"
    written_back = run_cli("fix", str(path), "--strip", "module.", "-o", str(out), "--allow-global", name)
    assert written_back.exit_code == 2 and "nothing was written" in written_back.stderr
    assert not out.exists()
    extracted = run_cli("fix", str(path), "--strip", "module.", "--extract", "-o", str(out), "--allow-global", name)
    assert extracted.exit_code == 0, extracted.stderr
    assert run_cli("scan", str(out)).exit_code == 0
    salvaged = tmp_path / "salvaged.safetensors"
    assert run_cli("convert", str(path), str(salvaged), "--allow-global", name).exit_code == 0
    assert torch.equal(safetensors.torch.load_file(salvaged)["module.w"], torch.arange(3.0))
    assert not marker.exists()
