"""Names with Rich markup characters, from paths and from keys, print verbatim through every command.

A path like ``run[best].pt`` once printed as ``run.pt`` and ``ckpt[/x].pt`` crashed with a
MarkupError traceback (exit 1). Whatever comes from a file or a user is data, never markup.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from tests.cli_helpers import run_cli

HOSTILE_NAMES = ["run[best].pt", "ckpt[/x].pt", "[bold red]boom[/].pt", "a[link=file:///etc/passwd]b.pt"]
HOSTILE_KEYS = ["[bold]enc[/bold].weight", "layer[/].bias", "x[link=file:///etc]y.weight", "plain.weight"]


def _save(path: Path, keys: list[str], prefix: str = "") -> Path:
    sd = OrderedDict((prefix + k, torch.full((2, 3), float(i))) for i, k in enumerate(keys))
    torch.save(sd, path)
    return path


@pytest.mark.parametrize("name", HOSTILE_NAMES)
@pytest.mark.parametrize("command", ["inspect", "scan", "spec", "check", "diff", "fix"])
def test_missing_file_with_markup_name(tmp_path: Path, name: str, command: str) -> None:
    missing = tmp_path / name
    args = {
        "inspect": ["inspect", missing],
        "scan": ["scan", missing],
        "spec": ["spec", missing, "-o", tmp_path / "spec.json"],
        "check": ["check", missing, "--against", missing],
        "diff": ["diff", missing, missing],
        "fix": ["fix", missing, "--strip", "module.", "-o", tmp_path / "out.pt"],
    }[command]
    result = run_cli(*args)
    assert result.exit_code == 2, result.stderr
    assert result.stderr.startswith("Error:")
    assert str(missing) in result.stderr.replace("\n", ""), result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("name", ["run[best].pt", "[bold red]x.pt"])
def test_corrupt_file_with_markup_name(tmp_path: Path, name: str) -> None:
    bad = tmp_path / name
    bad.write_bytes(b"\x00\x01garbage\xff" * 10)
    for args in (["inspect", bad], ["scan", bad]):
        result = run_cli(*args)
        assert result.exit_code == 2
        assert str(bad) in result.stderr.replace("\n", "")


def test_markup_keys_through_every_command(tmp_path: Path) -> None:
    src = _save(tmp_path / "run[best].pt", HOSTILE_KEYS, prefix="module.")
    ref = _save(tmp_path / "ref[red].pt", HOSTILE_KEYS)

    inspect = run_cli("inspect", src)
    assert inspect.exit_code == 0
    for key in HOSTILE_KEYS:
        leaf = key.rsplit(".", 1)[0]
        assert leaf in inspect.stdout, (leaf, inspect.stdout)
    assert str(src) in inspect.stdout.replace("\n", "")
    keys = run_cli("inspect", src, "--keys")
    assert keys.stdout.splitlines() == ["module." + k for k in HOSTILE_KEYS]

    diff = run_cli("diff", src, ref)
    assert diff.exit_code == 1
    assert "module." in diff.stdout

    check = run_cli("check", src, "--against", ref)
    assert check.exit_code == 1
    assert "module." in check.stdout
    assert str(src) in check.stdout.replace("\n", "")

    out = tmp_path / "fixed[1].pt"
    fix = run_cli("fix", src, "--against", ref, "-o", out)
    assert fix.exit_code == 0, fix.stderr
    assert str(out) in fix.stdout.replace("\n", "")
    assert "module.[bold]enc[/bold].weight" in fix.stdout.replace("\n", "") or "module.*" in fix.stdout
    assert list(torch.load(out, weights_only=True)) == HOSTILE_KEYS

    again = run_cli("check", out, "--against", ref)
    assert again.exit_code == 0, again.stdout

    scan = run_cli("scan", src, "-v")
    assert scan.exit_code == 0
    assert str(src) in scan.stdout.replace("\n", "")

    spec = run_cli("spec", src, "-o", tmp_path / "spec[x].json")
    assert spec.exit_code == 0, spec.stderr
    assert (tmp_path / "spec[x].json").exists()


def test_human_output_has_no_trailing_spaces(tmp_path: Path) -> None:
    src = _save(tmp_path / "a.pt", ["conv.weight", "bn.weight", "bn.bias"], prefix="module.")
    ref = _save(tmp_path / "b.pt", ["conv.weight", "bn.weight", "bn.bias"])
    for args in (["inspect", src], ["check", src, "--against", ref], ["diff", src, ref], ["scan", src, "-v"]):
        result = run_cli(*args)
        for line in result.stdout.splitlines():
            assert line == line.rstrip(" "), (args, repr(line))
