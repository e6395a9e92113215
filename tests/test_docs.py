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


def _options() -> dict[str, list[str]]:
    """Every option string (``--entry-a``, ``-v``) of every command, from the real CLI."""
    import typer.main

    group = typer.main.get_command(app)
    out: dict[str, list[str]] = {}
    for name, command in group.commands.items():  # type: ignore[attr-defined]
        opts: list[str] = []
        for param in command.params:
            if param.param_type_name == "option" and "--help" not in param.opts:
                opts += [*param.opts, *param.secondary_opts]
        out[name] = opts
    return out


def test_every_option_is_documented() -> None:
    """A flag missing from docs/<command>.md is a flag nobody finds; a documented flag that does not exist lies."""
    undocumented = []
    for name, opts in _options().items():
        text = (ROOT / "docs" / f"{name}.md").read_text()
        undocumented += [f"{name} {opt}" for opt in opts
                         if not re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", text)]
    assert not undocumented, f"options missing from docs/: {undocumented}"


def test_no_documented_option_that_does_not_exist() -> None:
    options = _options()
    invented = []
    for name, opts in options.items():
        text = (ROOT / "docs" / f"{name}.md").read_text()
        for usage in re.findall(rf"ckptdoctor {name}\b[^\n`]*", text):
            invented += [f"{name} {flag}" for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", usage)
                         if flag not in opts and flag != "--help"]
    assert not invented, f"docs/ show options the CLI does not have: {sorted(set(invented))}"
