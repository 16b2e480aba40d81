"""Every citation of a documentation section in the repository (`docs/math.md#anchor`,
`benchmarks/RESULTS.md#anchor`) names a heading that exists, so a renamed section cannot leave
dangling references behind."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CITATION = re.compile(r"((?:docs/math|benchmarks/RESULTS)\.md)#([a-z0-9-]+)")


def anchors(markdown: Path) -> set[str]:
    """GitHub's anchors of the headings: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", markdown.read_text(), flags=re.MULTILINE)
    return {re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def citations() -> list[tuple[str, str, str]]:
    files = [ROOT / "README.md"] + [p for folder in ("mom_compile", "tests", "benchmarks", "examples", "docs")
                                    for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".md")]
    files.remove(Path(__file__).resolve())  # its docstring shows the pattern
    return [(str(p.relative_to(ROOT)), doc, anchor) for p in files
            for doc, anchor in CITATION.findall(p.read_text())]


def test_the_code_cites_the_docs():
    cited = {doc for _, doc, _ in citations()}
    assert cited == {"docs/math.md", "benchmarks/RESULTS.md"}


@pytest.mark.parametrize("where, doc, anchor", citations())
def test_cited_section_exists(where, doc, anchor):
    assert anchor in anchors(ROOT / doc), f"{where} cites {doc}#{anchor}, which has no such heading"
