"""The docs render and point at files that exist.

Control characters in a Markdown file are almost always LaTeX written through a non-raw Python
string (``"\\rVert"`` is a CR, ``"\\approx"`` a BEL, ``"\\text"`` a TAB); they break the formula
silently. Links: every relative Markdown link in docs/ and README.md, and every ``docs/...md`` that
a page or a code docstring names, must resolve to a file in the repository.
"""
from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
CODE = sorted(p for folder in ("npdiffusion", "tools", "tests") for p in (ROOT / folder).rglob("*.py")
              if p.name != "test_docs.py")

# Any C0 control character but the line feed, and DEL.
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f]")
# [text](target) and ![alt](target); the target ends at the first space or closing parenthesis.
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
# A path from the repository root to a Markdown page under docs/, as code and prose name them.
_DOCS_PATH = re.compile(r"(?<![\w/.-])(docs/(?:[\w-]+/)*\w[\w.-]*\.md)\b")
# Fenced code blocks and inline code spans: what looks like a link there is code, not a link.
_CODE = re.compile(r"^(`{3,}|~{3,}).*?^\1|`+[^`\n]*`+", re.MULTILINE | re.DOTALL)


def _read(path: pathlib.Path) -> str:
    """The file's text as stored: no newline translation, so a lone CR stays visible."""
    return path.read_bytes().decode("utf-8")


def _rel(path: pathlib.Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _line(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _without_code(text: str) -> str:
    """``text`` with its code blocks and code spans blanked out (newlines kept, so lines count)."""
    return _CODE.sub(lambda m: re.sub(r"[^\n]", " ", m.group()), text)


def _broken_links(page: pathlib.Path) -> list[tuple[int, str]]:
    """(line, target) of each relative link in ``page`` whose file does not exist."""
    text = _without_code(_read(page))
    broken = []
    for m in _LINK.finditer(text):
        target = m.group(1)
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("#"):
            continue                                         # URL, mailto:, or an anchor on this page
        if not (page.parent / target.split("#", 1)[0]).exists():
            broken.append((_line(text, m.start()), target))
    return broken


def _missing_docs_mentions(path: pathlib.Path) -> list[str]:
    text = _read(path)
    return [f"{_rel(path)}:{_line(text, m.start())}: {m.group(1)}" for m in _DOCS_PATH.finditer(text)
            if not (ROOT / m.group(1)).is_file()]


def test_the_pages_are_found():
    assert ROOT / "README.md" in PAGES and len(PAGES) > 10, PAGES


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_no_control_characters(page):
    text = _read(page)
    found = [f"{_rel(page)}:{_line(text, m.start())}: {m.group()!r}" for m in _CONTROL.finditer(text)]
    assert not found, "control characters (LaTeX through a non-raw string?):\n" + "\n".join(found)


def test_relative_links_resolve():
    missing = [f"{_rel(page)}:{line}: {target}" for page in PAGES for line, target in _broken_links(page)]
    assert not missing, "links to missing files:\n" + "\n".join(missing)


def test_docs_paths_named_in_code_and_pages_exist():
    missing = [entry for path in [*CODE, *PAGES] for entry in _missing_docs_mentions(path)]
    assert not missing, "docs/...md named but missing:\n" + "\n".join(missing)


def test_the_checks_catch_what_they_are_for(tmp_path):
    """The patterns find a CR, a BEL and a TAB, a broken link and a missing docs path."""
    assert len(_CONTROL.findall("\\lVert q\rVert, e \x07pprox 1, $\text{cols}$\n")) == 3
    page = tmp_path / "page.md"
    page.write_text("[here](page.md) [gone](nowhere.md#x) ![img](images/none.png) "
                    "[web](https://example.org/a.md) [anchor](#top) `f[0](x)`\n"
                    "```\ng[1](y)\n```\nh[2](z)\n", encoding="utf-8")
    assert _broken_links(page) == [(1, "nowhere.md#x"), (1, "images/none.png"), (5, "z")]
    assert _DOCS_PATH.findall("see docs/ops/linear.md, and docs/benchmarks.md; docs/...md") == \
        ["docs/ops/linear.md", "docs/benchmarks.md"]
