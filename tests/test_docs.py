"""The docs say what the code does: README's recipe list and command table, docs/production.md's
`describe` table and monitor example, docs/analysis.md's checkpoint file name."""

from __future__ import annotations

import contextlib
import io
import json
import re
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _read(name: str) -> str:
    return (ROOT / name).read_text(encoding="utf-8")


def _block_after(text: str, marker: str) -> str:
    """The body of the first fenced block after ``marker``."""
    rest = text[text.index(marker) :]
    match = re.search(r"```[a-z]*\n(.*?)```", rest, re.S)
    assert match, marker
    return match.group(1)


def test_readme_recipe_list_is_the_code_s():
    from unitscale.precision import RECIPE_NAMES

    text = _read("README.md")
    block = text[text.index("<!-- recipes") : text.index("<!-- /recipes -->")].split("-->", 1)[1]
    expected = "Recipes: " + ", ".join(f"`{name}`" for name in RECIPE_NAMES) + "."
    assert " ".join(block.split()) == expected, f"README recipe list is stale; it should read:\n{expected}"


def test_readme_command_table_lists_every_command():
    from unitscale.cli import _command_modules

    table = [line for line in _read("README.md").splitlines() if line.startswith("| `unitscale ")]
    listed = {name for line in table for name in re.findall(r"`unitscale ([a-z-]+)", line)}
    assert listed == set(_command_modules())


def _run(code: str) -> tuple[str, list[str]]:
    out = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(out):
        warnings.simplefilter("always")
        exec(compile(code, "<docs>", "exec"), {"__name__": "docs"})
    return out.getvalue(), [str(w.message) for w in caught]


def test_production_describe_output_is_the_real_output(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    text = _read("docs/production.md")
    code = next(
        b
        for b in re.findall(r"```python\n(.*?)```", text, re.S)
        if "describe(model, recipe)" in b and "with_overrides" in b
    )
    printed, _ = _run("import unitscale as us\n" + code)
    assert printed == _block_after(text, "<!-- describe-output")


def test_production_monitor_example_shows_what_the_monitor_reports(monkeypatch):
    import torch

    from unitscale.monitor import ScaleMonitor

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    text = _read("docs/production.md")
    code = _block_after(text, "<!-- monitor-example:")
    records: list[dict] = []

    class Log:
        def write(self, record: dict) -> None:
            records.append(record)

    real_init = ScaleMonitor.__init__
    monkeypatch.setattr(
        ScaleMonitor, "__init__", lambda self, *a, **kw: real_init(self, *a, **{**kw, "log": Log()})
    )
    printed, warned = _run(code)
    assert printed == _block_after(text, "<!-- monitor-example-output")
    assert f"after {len(warned)} ScaleWarnings at step 20" in text
    shown = _block_after(text, "<!-- monitor-warning").strip()
    assert shown.removeprefix("unitscale train: ScaleWarning: ") in warned
    record = json.loads(_block_after(text, "<!-- monitor-record"))
    real = [r for r in records if r["event"] == "scales"][-1]
    assert record.keys() == real.keys() and record["step"] == real["step"]
    assert f"the first of {len(real['tensors'])} shown here" in text
    first, real_first = record["tensors"][0], real["tensors"][0]
    assert first.keys() == real_first.keys()
    for key, value in first.items():
        assert value == (
            pytest.approx(real_first[key], rel=2e-2, abs=1e-4)
            if isinstance(value, float)
            else real_first[key]
        ), key
    assert record["worst"]["name"] == real["worst"]["name"]
    assert record["worst"]["reason"] == real["worst"]["reason"]


def test_analysis_doc_names_the_checkpoint_file_train_writes():
    from unitscale.train.checkpoint import CHECKPOINT_NAME

    paths = re.findall(r"--checkpoint (\S+)", _read("docs/analysis.md"))
    assert paths and all(Path(p).name == CHECKPOINT_NAME for p in paths), paths
