"""Every command has a docs page with an example, and every finding code is documented."""

from __future__ import annotations

import re
from pathlib import Path

from ckptdoctor.cli.app import app

ROOT = Path(__file__).resolve().parent.parent


def _commands() -> list[str]:
    return sorted(c.name for c in app.registered_commands if c.name)


def test_every_command_has_a_page_with_real_output() -> None:
    readme = (ROOT / "README.md").read_text()
    for name in _commands():
        page = ROOT / "docs" / f"{name}.md"
        assert page.exists(), f"docs/{name}.md is missing"
        text = page.read_text()
        assert f"ckptdoctor {name}" in text
        assert "```" in text, f"docs/{name}.md has no example"
        assert f"docs/{name}.md" in readme, f"README does not link docs/{name}.md"


def test_every_finding_code_is_documented() -> None:
    source = "\n".join(p.read_text() for p in (ROOT / "ckptdoctor" / "engines").glob("*.py"))
    codes = set(re.findall(r'Finding\(\s*"([a-z-]+)"', source))
    codes |= {"wrapper-prefix", "missing-wrapper-prefix", "container-prefix", "missing-container-prefix",
              "sequential-renumbered", "renamed-submodule"}
    findings = (ROOT / "docs" / "findings.md").read_text()
    missing = sorted(code for code in codes if f"`{code}`" not in findings)
    assert not missing, f"docs/findings.md lacks {missing}"


def test_readme_starts_with_the_two_commands() -> None:
    head = (ROOT / "README.md").read_text().split("\n\n")[1]
    assert "make demo" in head and "make test" in head
    assert "make test" in (ROOT / ".ci" / "run").read_text()
