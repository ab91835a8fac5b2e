"""Every document the code cites is in the repository: ``docs/<name>.md §N`` citations name a file under docs/ that
has a heading numbered N, and nothing points at material outside the repository (the research notes the first
sessions worked from)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CITATION = re.compile(r"docs/([\w-]+\.md)\s*\(?§\s*(\d+(?:\.\d+)*)")
OUTSIDE = re.compile(r"\.\./shared|shared/research")
#: Bare names of the old research notes; inside docs/ the same names are relative links between the docs.
BARE = re.compile(r"(?<![/\w])(mgm|vllm_plugin|anchors)\.md")


def _tracked() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "*.py", "*.sh", "*.md", "*.yaml", "*.js", "*.html", "Makefile"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    me = Path(__file__).resolve()  # this file spells the patterns it looks for
    return [ROOT / line for line in out.splitlines() if (ROOT / line).is_file() and (ROOT / line).resolve() != me]


def _sections(doc: Path) -> set[str]:
    return {m.group(1) for m in re.finditer(r"^#{2,4}\s+(\d+(?:\.\d+)*)\.?\s", doc.read_text(), re.M)}


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="needs the git checkout")
def test_citations_resolve_to_docs_in_the_repo():
    files = _tracked()
    assert files, "no tracked files found"
    missing: list[str] = []
    cited = 0
    sections: dict[str, set[str]] = {}
    for path in files:
        text = path.read_text(errors="replace")
        rel = path.relative_to(ROOT)
        outside = list(OUTSIDE.finditer(text)) + ([] if rel.parts[0] == "docs" else list(BARE.finditer(text)))
        for m in outside:
            missing.append(f"{rel}: cites {m.group(0)!r}, which is not in the repository")
        for m in CITATION.finditer(text):
            cited += 1
            doc = ROOT / "docs" / m.group(1)
            if not doc.exists():
                missing.append(f"{rel}: docs/{m.group(1)} does not exist")
                continue
            if m.group(2) not in sections.setdefault(m.group(1), _sections(doc)):
                missing.append(f"{rel}: docs/{m.group(1)} has no section {m.group(2)}")
    assert cited > 20  # the code does cite the docs (the pattern still matches)
    assert not missing, "\n".join(missing)
