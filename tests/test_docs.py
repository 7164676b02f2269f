"""Every relative link in the README, the changelog and docs/*.md leads to a file that exists, and a
`#anchor` to a heading of that file (GitHub's anchors: lowercase, spaces to '-', punctuation other than
'-' and '_' removed, repeated headings numbered -1, -2, ...)."""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
COMMENT = re.compile(r"<!--.*?-->", re.S)
CODE_SPAN = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)", re.S)
# [text](target "optional title"); the text may hold one level of brackets and span lines.
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"", re.I)
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def _prose_lines(text: str) -> list[str]:
    """The lines of `text` outside fenced code blocks (a code block's lines become empty)."""
    lines, fence = [], None
    for line in text.splitlines():
        match = FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)
            lines.append("")
        elif fence is not None:
            closing = match and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence)
            if closing and not line.strip().strip(fence[0]).strip():
                fence = None
            lines.append("")
        else:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading anchors by its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: pathlib.Path) -> set[str]:
    text = page.read_text(encoding="utf-8")
    found, seen = set(), {}
    for line in _prose_lines(COMMENT.sub("", text)):
        match = HEADING.match(line)
        if match:
            base = slug(match.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    found.update(HTML_ANCHOR.findall(text))
    return found


def links(page: pathlib.Path) -> list[str]:
    prose = "\n".join(_prose_lines(COMMENT.sub("", page.read_text(encoding="utf-8"))))
    prose = CODE_SPAN.sub("", prose)
    return INLINE_LINK.findall(prose) + REFERENCE_DEF.findall(prose)


def test_slug_follows_githubs_rules():
    assert slug("lm-eval: `--model pruned_moe`") == "lm-eval---model-pruned_moe"
    assert slug("Published checkpoints: FP8, MXFP4, MTP layers, remote code") == \
        "published-checkpoints-fp8-mxfp4-mtp-layers-remote-code"
    assert slug("The overhead of `pruned_moe`") == "the-overhead-of-pruned_moe"
    assert slug("Grid runs: models x methods x ratios") == "grid-runs-models-x-methods-x-ratios"


def test_the_pages_exist():
    assert (ROOT / "docs").is_dir()
    assert len(PAGES) > 3, PAGES


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    problems = []
    for target in links(page):
        if not target or SCHEME.match(target) or target.startswith("//"):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            problems.append(f"{target}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{target}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    assert not problems, f"{page.relative_to(ROOT)}:\n" + "\n".join(problems)


def test_the_readme_links_every_docs_page():
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in links(ROOT / "README.md")
              if target and not SCHEME.match(target)}
    missing = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in linked]
    assert not missing, f"docs pages the README does not link: {missing}"


def test_the_readme_keeps_the_two_commands():
    """CI runs `make test`; a new user starts with `make demo` (tests/test_packaging.py checks CI's side)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for command in ("make demo", "make test"):
        assert re.search(rf"^{command}\b", readme, re.M), f"the README lost the line `{command}`"
