"""Every Markdown reference in the code, tests, benchmarks, scripts and docs resolves: the file exists in the
repository, each cited section (``§N``, ``§N.M``) is a numbered heading of it, and in-page anchors name headings."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import pytest

from tests.conftest import REPO

DOCS = REPO / "docs"
# A path ending in .md, not inside a URL or a longer path; optional closing quotes/brackets, then sections.
REFERENCE = re.compile(r"(?<![\w./:<-])((?:[\w-]+/)*[\w-]+\.md)\b[`'\")\]]*((?:\s*(?:,|-|–|and)?\s*§\d+(?:\.\d+)*)*)")
SECTION = re.compile(r"§(\d+(?:\.\d+)*)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*$", re.MULTILINE)
ANCHOR_LINK = re.compile(r"\]\(#([^)\s]+)\)")
CODE_BLOCK = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def scanned_files() -> list[Path]:
    """The package, tests, benchmarks, scripts, configs, top-level scripts and the Markdown documents."""
    files = [REPO / "README.md", REPO / "pyproject.toml", *REPO.glob("*.py"), *REPO.glob("*.sh"), *DOCS.glob("*.md")]
    for folder, patterns in [
        ("torchtitan_hyena", ["*.py"]),
        ("tests", ["*.py"]),
        ("bench", ["*.py"]),
        ("scripts", ["*.py", "*.sh"]),
        ("train_configs", ["*.toml"]),
    ]:
        for pattern in patterns:
            files += (REPO / folder).rglob(pattern)
    return sorted(set(files))


@cache
def sections(doc: Path) -> frozenset[str]:
    """Numbers of the numbered headings (``## 3. Title``, ``### 1.3 Title``)."""
    numbers = (re.match(r"(\d+(?:\.\d+)*)\.?\s", text) for text in headings(doc.read_text()))
    return frozenset(m.group(1) for m in numbers if m)


def headings(markdown: str) -> list[str]:
    """Heading texts, outside fenced code blocks (whose shell comments start with #)."""
    return HEADING.findall(CODE_BLOCK.sub("", markdown))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def resolve(source: Path, reference: str) -> Path | None:
    """The file a reference names: relative to the citing file's folder, else to the repository root."""
    for base in (source.parent, REPO):
        if (base / reference).is_file():
            return (base / reference).resolve()
    return None


def references(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, referenced file, cited section numbers) in ``path``."""
    text = path.read_text(errors="replace")
    return [
        (text.count("\n", 0, m.start()) + 1, m.group(1), SECTION.findall(m.group(2))) for m in REFERENCE.finditer(text)
    ]


def test_docs_exist_and_are_indexed():
    index = (DOCS / "README.md").read_text()
    notes = {p.stem for p in DOCS.glob("*.md")} - {"README"}
    assert {"stripedhyena2", "kernels", "context_parallel", "frontier"} <= notes
    assert all(f"({note}.md)" in index for note in notes), "the docs index must link every note"


def test_every_markdown_reference_resolves_to_a_file_and_section():
    problems, cited = [], 0
    for path in scanned_files():
        for line, reference, numbers in references(path):
            where = f"{path.relative_to(REPO)}:{line}: {reference}"
            target = resolve(path, reference)
            if target is None:
                problems.append(f"{where} does not exist (cite docs as docs/<file>.md)")
                continue
            cited += bool(numbers)
            missing = [n for n in numbers if n not in sections(target)]
            if missing:
                problems.append(f"{where} has no section {', '.join('§' + n for n in missing)}")
    assert not problems, "\n".join(problems)
    assert cited >= 20  # the docstrings' section citations were found at all


def test_section_signs_in_code_name_their_document():
    """Outside docs/, a § must follow a Markdown reference; inside a note, a bare § is a section of that note."""
    problems = []
    for path in scanned_files():
        text = path.read_text(errors="replace")
        attached = {m.start(2) + s.start() for m in REFERENCE.finditer(text) for s in SECTION.finditer(m.group(2))}
        for m in SECTION.finditer(text):
            if m.start() in attached:
                continue
            line = text.count("\n", 0, m.start()) + 1
            if path.parent != DOCS:
                problems.append(f"{path.relative_to(REPO)}:{line}: §{m.group(1)} names no document")
            elif m.group(1) not in sections(path) and path.suffix == ".md":
                problems.append(f"{path.relative_to(REPO)}:{line}: no section §{m.group(1)} in this note")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("doc", sorted(DOCS.glob("*.md")), ids=lambda p: p.name)
def test_in_page_anchors_name_headings(doc):
    text = doc.read_text()
    anchors = {slug(h) for h in headings(text)}
    assert not [a for a in ANCHOR_LINK.findall(text) if a not in anchors]


@pytest.mark.parametrize("doc", sorted(DOCS.glob("*.md")), ids=lambda p: p.name)
def test_docs_are_self_contained(doc):
    """The notes are the project's own: no pointers into the developers' scratch folders."""
    text = doc.read_text()
    assert "shared/docs" not in text and "/work/" not in text
