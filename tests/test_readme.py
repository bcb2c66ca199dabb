"""The README keeps up with the code: every table of the schema, every command, the CI's test command."""
from __future__ import annotations

from pathlib import Path

import typer.main

from atlasgen.cli import app
from atlasgen.store import SCHEMA_SQL

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
STORE_DOC = (REPO / "docs" / "STORE.md").read_text()


def test_store_reference_holds_the_schema_as_in_the_code():
    missing = [line.strip() for line in SCHEMA_SQL.strip().splitlines() if line.strip() not in STORE_DOC]
    assert not missing, f"docs/STORE.md is out of date; missing lines: {missing[:5]}"


def test_readme_links_every_docs_page():
    pages = sorted(p.name for p in (REPO / "docs").glob("*.md"))
    missing = [name for name in pages if f"docs/{name}" not in README]
    assert not missing, f"docs pages the README does not link: {missing}"


def test_readme_lists_every_command():
    commands = typer.main.get_command(app).commands
    missing = [name for name in commands if f"`atlasgen {name}" not in README]
    assert not missing, f"commands not in the README: {missing}"


def test_ci_runs_the_readme_set_up_and_test_commands():
    """README starts with the two set-up commands; CI runs the second, which runs the README's test command."""
    ci_lines = [l.strip() for l in (REPO / ".ci" / "run").read_text().splitlines() if not l.strip().startswith("#")]
    makefile = (REPO / "Makefile").read_text()
    test_recipe = makefile.split("\ntest:", 1)[1].split("\n\n", 1)[0]
    test_command = "python -m pytest -q tests"
    assert "make test" in ci_lines
    assert test_command in test_recipe and test_command in README
    quick_start = README.split("\n## ", 2)[1]
    assert "make tiny" in quick_start and "make test" in quick_start, "README must start with the two commands"
