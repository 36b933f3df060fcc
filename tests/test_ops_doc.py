"""docs/ops.md is the table generated from unitscale.rules; the ops-doc command writes and checks it."""

from __future__ import annotations

from pathlib import Path

from unitscale.cli import main
from unitscale.rules import TABLE_DOC_PATH, render_ops_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_committed_docs_match_rendered_table():
    committed = (ROOT / TABLE_DOC_PATH).read_text(encoding="utf-8")
    assert committed == render_ops_markdown(), "docs/ops.md is stale: run `unitscale ops-doc`"


def test_table_contains_derived_constants():
    text = render_ops_markdown()
    for value in [
        "α=1.713, β_input=1.414",
        "α=1.701, β_input=1.481",
        "α=1.787, β_input=1.623",
        "α=1.593, β_input=1.467",
        "α=4.801, β_input=4.723",
        "α=0.0221, β_input=0.0221",
    ]:
        assert value in text, value
    assert text.count("\n| ") == 22  # header + one row per rule


def test_cli_writes_and_checks(tmp_path, capsys):
    out = tmp_path / "ops.md"
    assert main(["ops-doc", "--output", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == render_ops_markdown()
    assert main(["ops-doc", "--output", str(out), "--check"]) == 0
    out.write_text("stale", encoding="utf-8")
    assert main(["ops-doc", "--output", str(out), "--check"]) == 1
    assert "stale" in capsys.readouterr().err
    assert main(["ops-doc", "--output", str(tmp_path / "missing.md"), "--check"]) == 2
