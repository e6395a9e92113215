"""Run the real ckptdoctor CLI in-process (Typer's runner) with stdout and stderr apart."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from typer.testing import CliRunner

from ckptdoctor.cli.app import app


@dataclass
class Result:
    exit_code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


def run_cli(*args: str) -> Result:
    runner = CliRunner(env={"CKPTDOCTOR_WIDTH": "100", "NO_COLOR": "1", "CKPTDOCTOR_DEBUG": ""})
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    return Result(result.exit_code, result.stdout, result.stderr)
