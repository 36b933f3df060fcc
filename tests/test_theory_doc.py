"""docs/theory.md is what the code cites: every "docs/theory.md, <Heading>" in the sources names a heading
that exists, headings are unique, the contents table lists every one, and its internal links resolve."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
THEORY = ROOT / "docs" / "theory.md"
CITING = [ROOT / "src", ROOT / "bench", ROOT / "docs", ROOT / "README.md"]

# A citation ends at one of ( ) [ ] , ; : " ' ` or a full stop that closes a sentence (not the one in "5.1").
_CITATION = re.compile(r"docs/theory\.md, (.+?)(?=[()\[\],;:\"'`]|\.(?:\s|$)|$)")
# Docstrings and comments break long lines: a line break, its indentation and a comment marker are a space.
_BREAK = re.compile(r"\s*\n\s*(?:#\s*)?")


def headings(text: str) -> list[str]:
    """The ## and ### headings of a markdown text, outside fenced code blocks."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"#{2,3} (.+)", line)):
            out.append(m.group(1).strip())
    return out


def citations(text: str) -> list[str]:
    """Section names cited as "docs/theory.md, <Heading>" in ``text`` (a citation may wrap a line)."""
    return [m.group(1).strip() for m in _CITATION.finditer(_BREAK.sub(" ", text))]


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation other than - dropped, spaces to -."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def cited_in_repository() -> dict[str, list[str]]:
    """{section: [files citing it]} over the sources and docs (docs/theory.md's own example excluded)."""
    found: dict[str, list[str]] = {}
    for base in CITING:
        files = [base] if base.is_file() else sorted(base.rglob("*.py")) + sorted(base.rglob("*.md"))
        for path in files:
            if path == THEORY:
                continue
            for name in citations(path.read_text(encoding="utf-8")):
                found.setdefault(name, []).append(str(path.relative_to(ROOT)))
    return found


def test_citation_parser_on_known_text():
    text = (
        '"""Linear layer (docs/theory.md, Linear); see docs/theory.md, Cut edges and\n'
        "    constraints. Also docs/theory.md, Proposition 5.1 and Theorem 5.2, and\n"
        "    # docs/theory.md, Attention probability scale\n"
        '    (docs/theory.md, No such section)"""'
    )
    assert citations(text) == [
        "Linear",
        "Cut edges and constraints",
        "Proposition 5.1 and Theorem 5.2",
        "Attention probability scale",
        "No such section",
    ]
    assert "No such section" not in headings(THEORY.read_text(encoding="utf-8"))


def test_every_citation_names_a_heading():
    known = set(headings(THEORY.read_text(encoding="utf-8")))
    missing = {name: files for name, files in cited_in_repository().items() if name not in known}
    assert not missing, f"citations of docs/theory.md sections that do not exist: {missing}"


def test_headings_are_unique_and_citable():
    names = headings(THEORY.read_text(encoding="utf-8"))
    assert len(names) > 40
    assert len(names) == len(set(names)), [n for n in names if names.count(n) > 1]
    for name in names:  # a heading must survive the citation grammar unchanged
        assert citations(f"(docs/theory.md, {name})") == [name], name


def test_contents_table_lists_every_section():
    text = THEORY.read_text(encoding="utf-8")
    table = text.split("\n## ", 1)[0]
    for name in headings(text):
        mentioned = re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", table)
        assert mentioned, f"the contents table of docs/theory.md does not mention {name!r}"


@pytest.mark.parametrize("doc", [THEORY, ROOT / "README.md"])
def test_theory_links_resolve(doc):
    anchors = {slug(h) for h in headings(THEORY.read_text(encoding="utf-8"))}
    text = doc.read_text(encoding="utf-8")
    pattern = r"\]\(#([^)]+)\)" if doc == THEORY else r"\]\(docs/theory\.md(?:#([^)]+))?\)"
    links = re.findall(pattern, text)
    assert links, f"{doc.name} has no link to docs/theory.md sections"
    assert all(a in anchors for a in links if a), [a for a in links if a and a not in anchors]


def test_no_source_cites_reference():
    """The sources cite docs/theory.md, never a document outside the repository ("REFERENCE §…")."""
    pattern = re.compile(r"REFERENCE(?:\.md|\s*§)")
    offenders = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in sorted((ROOT / "src").rglob("*.py"))
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []
