"""The README is a newcomer's page; the measurement tables live in docs/benchmarks.md, where
benchmarks/eval_table.py rewrites the retrieval table between its markers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load_eval_table():
    spec = importlib.util.spec_from_file_location("eval_table", ROOT / "benchmarks" / "eval_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_retrieval_table_lives_in_docs_benchmarks_not_the_readme():
    assert "<!-- eval-table -->" in (ROOT / "docs" / "benchmarks.md").read_text()
    assert "<!-- eval-table -->" not in (ROOT / "README.md").read_text()


def test_eval_table_replaces_only_what_lies_between_the_markers(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("intro\n<!-- eval-table -->\n| old |\n<!-- /eval-table -->\nafter\n")
    load_eval_table().write_table(doc, "| new |")
    assert doc.read_text() == "intro\n<!-- eval-table -->\n| new |\n<!-- /eval-table -->\nafter\n"


def test_the_readme_starts_with_the_two_commands_and_links_the_rest():
    text = (ROOT / "README.md").read_text()
    first_block = text.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert first_block[0].startswith("pip install -e . && delf-es demo")
    assert first_block[1].startswith("scripts/test.sh")
    for linked in ("ARCHITECTURE.md", "docs/benchmarks.md", "docs/design.md", "docs/operations.md"):
        assert f"({linked}" in text and (ROOT / linked).is_file()
