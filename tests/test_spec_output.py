"""What a spec's own code prints never reaches stdout: stdout is the command's data.

Research code prints while it builds a model (at import, in the factory, in ``__init__``, and
sometimes from C or a subprocess straight to file descriptor 1). Every command that loads a
``module:callable`` / ``file.py:callable`` spec sends that to stderr, with ``--json`` (stdout is
exactly one JSON document, cli-contract.md) and without. The commands run as real processes, so
file descriptor 1 is the real pipe; the checkpoints are ``torch.save`` files of a real module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]

NOISY_MODULE = '''
import os
import torch.nn as nn

print("PRINTED-AT-IMPORT")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        print("PRINTED-IN-INIT")
        os.write(1, b"WRITTEN-TO-FD-1\\n")
        self.body = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def make():
    print("PRINTED-IN-FACTORY")
    return Net()
'''
MARKERS = ("PRINTED-AT-IMPORT", "PRINTED-IN-INIT", "WRITTEN-TO-FD-1", "PRINTED-IN-FACTORY")


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = nn.Module()
    model.body = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "a.pt")
    (tmp_path / "noisy.py").write_text(NOISY_MODULE)
    (tmp_path / "noisy_pkg_mod.py").write_text(NOISY_MODULE)  # imported by name from the working directory
    return tmp_path


COMMANDS = {
    "check": ["check", "a.pt", "--against", "{spec}"],
    "fix": ["fix", "a.pt", "--against", "{spec}", "-o", "fixed.pt"],
    "convert": ["convert", "a.pt", "out.safetensors", "--against", "{spec}"],
    "spec": ["spec", "{spec}", "-o", "model.spec.json"],
    "report": ["report", "a.pt", "--against", "{spec}", "-o", "r.html"],
}


def _run(cwd: Path, args: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CKPTDOCTOR_DEBUG": "", "NO_COLOR": "1"}
    return subprocess.run([sys.executable, "-m", "ckptdoctor", *args], check=False, cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


CASES = [(command, "noisy.py:make", True) for command in sorted(COMMANDS)] + [
    ("check", "noisy_pkg_mod:make", True),  # package.module:callable, imported by name
    ("check", "noisy.py:make", False),
    ("fix", "noisy_pkg_mod:make", False),
]


@pytest.mark.parametrize(("command", "spec", "json_out"), CASES)
def test_what_a_spec_prints_goes_to_stderr(workdir: Path, command: str, spec: str, json_out: bool) -> None:
    args = [a.replace("{spec}", spec) for a in COMMANDS[command]] + (["--json"] if json_out else [])
    p = _run(workdir, args)
    assert p.returncode in (0, 1), p.stderr
    for marker in MARKERS:
        assert marker not in p.stdout, p.stdout
        assert marker in p.stderr, p.stderr  # not swallowed: the user still sees it
    if json_out:
        doc = json.loads(p.stdout)  # exactly one JSON document, printed after the spec was built
        assert doc["schema_version"] == 1
    else:
        assert p.stdout.strip(), p.stderr  # the command's own output still reaches stdout
