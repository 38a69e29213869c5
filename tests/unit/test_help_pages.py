"""The node help pages (web/docs/*.md) quote error messages under "## Errors you may see"; every quoted fragment
must still occur in the code that raises it (nodes/, models/), so a reworded message cannot leave a stale quote.

A quote is a bold backticked span, **`...`** (or **Warning `...`**). It is split on "…" (the elided or variable
parts); each remaining piece of 6 characters or more must occur verbatim in the text of some .py file under
nodes/ or models/. Pieces are whitespace-collapsed (a quote may wrap over lines in the page); in the code a
message may be split over adjacent string literals, so a quote's pieces must each sit inside one literal. Plain
file reading only: nothing here imports ComfyUI or the package.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted((ROOT / "web" / "docs").glob("*.md"))
SECTION = "## Errors you may see"
QUOTE = re.compile(r"\*\*(?:Warning\s+)?`([^`]+)`\*\*")
MIN_LEN = 6


def _errors_section(text: str) -> str:
    """The body of the page's "Errors you may see" section, up to the next heading ("" when there is none)."""
    start = text.find(SECTION)
    if start < 0:
        return ""
    body = text[start + len(SECTION):]
    nxt = re.search(r"^#{1,2} ", body, flags=re.M)
    return body[:nxt.start()] if nxt else body


def quotes_in(text: str) -> list[str]:
    """The bold-backtick quotes of the errors section of a page's text, whitespace collapsed."""
    return [" ".join(q.split()) for q in QUOTE.findall(_errors_section(text))]


def quotes(page: Path) -> list[str]:
    return quotes_in(page.read_text(encoding="utf-8"))


def fragments(quote: str) -> list[str]:
    """The literal pieces of a quote that must occur in the code: split on "…", stripped, 6 characters or more."""
    return [p for p in (piece.strip() for piece in quote.split("…")) if len(p) >= MIN_LEN]


def _source() -> str:
    files = sorted((ROOT / "nodes").rglob("*.py")) + sorted((ROOT / "models").rglob("*.py"))
    assert files, "no sources under nodes/ or models/"
    return "\n".join(f.read_text(encoding="utf-8") for f in files)


SOURCE = _source()


def test_pages_are_found():
    assert DOCS, "no help pages under web/docs"
    assert any(quotes(p) for p in DOCS), "no page quotes an error: the quote pattern no longer matches the pages"


def test_splitting():
    assert fragments("expected … got an empty mask (batch item …)") == ["expected", "got an empty mask (batch item"]
    assert fragments("… is not a readable torch checkpoint") == ["is not a readable torch checkpoint"]
    page = ("# Node\n\n- **`not an error`**\n\n## Errors you may see\n\n- **`a quote that\n  wraps`**: advice,"
            " `not bold`.\n- **Warning `a warning`**: advice.\n\n## Next\n\n- **`not in the section`**\n")
    assert quotes_in(page) == ["a quote that wraps", "a warning"]
    assert quotes_in("# Node\n\n- **`no section`**\n") == []


@pytest.mark.parametrize("page", DOCS, ids=[p.stem for p in DOCS])
def test_quoted_errors_occur_in_the_code(page: Path):
    stale = []
    for quote in quotes(page):
        for frag in fragments(quote):
            if "{" in frag or "}" in frag:
                stale.append(f"{frag!r} (from {quote!r}): an f-string placeholder; quote it with … instead")
            elif frag not in SOURCE:
                stale.append(f"{frag!r} (from {quote!r})")
    assert not stale, f"{page.name}: quoted error text not found in nodes/ or models/:\n  " + "\n  ".join(stale)
