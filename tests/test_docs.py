"""The documentation stands on its own: no pointers outside the repository, and no broken relative links."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MARKDOWN = ("README.md", "docs/design.md")
# Text a user of the repository cannot follow: files that live beside the checkout, not in it.
OUTSIDE = ("../shared", "project workspace")

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"(?<!!)\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.MULTILINE)


def _scanned_files() -> list[Path]:
    files = [ROOT / "README.md"]
    for folder in ("dstab", "pipelines", "docs"):
        files += sorted(p for p in (ROOT / folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    return files


def _prose(text: str) -> str:
    """Markdown without fenced code blocks and inline code, where link syntax means nothing."""
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_slug(h) for h in _HEADING.findall(_FENCE.sub("", path.read_text(encoding="utf-8")))}


def _relative_links(path: Path) -> list[str]:
    links = _LINK.findall(_prose(path.read_text(encoding="utf-8")))
    return [link for link in links if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", link)]  # http:, mailto:, ...


def test_the_design_document_is_in_the_repository_and_linked():
    assert (ROOT / "docs" / "design.md").is_file()
    assert "docs/design.md" in _relative_links(ROOT / "README.md")


@pytest.mark.parametrize("phrase", OUTSIDE)
def test_nothing_points_outside_the_repository(phrase: str):
    files = _scanned_files()
    assert len(files) > 10  # the folders were found
    found = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in files
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
        if phrase in line
    ]
    assert not found, f"{phrase!r} in {', '.join(found)}: point to docs/design.md instead"


@pytest.mark.parametrize("name", MARKDOWN)
def test_relative_links_point_to_files_in_the_repository(name: str):
    source = ROOT / name
    links = _relative_links(source)
    broken = []
    for link in links:
        target, _, fragment = link.partition("#")
        path = (source.parent / target).resolve() if target else source
        if not path.is_relative_to(ROOT) or not path.exists():
            broken.append(f"{link} (no such file in the repository)")
        elif fragment and path.suffix == ".md" and fragment not in _anchors(path):
            broken.append(f"{link} (no heading with that anchor in {path.relative_to(ROOT)})")
    assert not broken, f"{name}: broken links: {', '.join(broken)}"


def test_link_checker_sees_links_and_ignores_code():
    text = "see [a](docs/x.md#y) and [b](https://example.com)\n```\n[c](not/a/link.md)\n```\n`[d](nor/this.md)`\n"
    assert _LINK.findall(_prose(text)) == ["docs/x.md#y", "https://example.com"]
    assert (
        _slug("5a. Alignment onto the reference: orthogonal Procrustes")
        == "5a-alignment-onto-the-reference-orthogonal-procrustes"
    )
    assert _slug("Computing R: gram and tsqr") == "computing-r-gram-and-tsqr"


def test_ci_runs_exactly_the_readme_test_command():
    """.ci/run's command is the README's test line, so a set-up step the README forgets fails CI too."""
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith("python3 -m venv")]
    readme = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("python3 -m venv")]
    assert len(ci) == 1 and ci[0] in readme, (ci, readme)
    assert ci[0].endswith(".venv/bin/python -m pytest") and "ruff check" in ci[0] and "mypy" in ci[0]
