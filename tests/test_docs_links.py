"""The README and docs/*.md: every relative link and image points to a file or folder that exists (and
every #anchor to a heading of its Markdown file, as GitHub names them); the README names the test
command CI runs (`make test`, see .ci/run)."""
import glob
import os
import re

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
PAGES = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _prose(text: str) -> str:
    """The text without fenced code blocks and inline code (no links live there)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower()
    return "".join(c for c in text if c.isalnum() or c in "-_ ").replace(" ", "-")


def anchors(path: str) -> set[str]:
    text = re.sub(r"^```.*?^```", "", open(path, encoding="utf-8").read(), flags=re.S | re.M)
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6}\s+(.*?)\s*#*\s*$", text, flags=re.M):
        slug = _slug(heading)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def relative_links(path: str) -> list[str]:
    links = LINK.findall(_prose(open(path, encoding="utf-8").read()))
    return [u for u in links if not re.match(r"^[a-z][a-z0-9+.-]*:", u, flags=re.I)]  # http:, mailto:, ...


@pytest.mark.parametrize("page", PAGES, ids=[os.path.relpath(p, ROOT) for p in PAGES])
def test_relative_links_resolve(page):
    bad = []
    for url in relative_links(page):
        target, _, anchor = url.partition("#")
        full = os.path.normpath(os.path.join(os.path.dirname(page), target)) if target else page
        if not os.path.exists(full):
            bad.append(f"{url} (no such file)")
        elif anchor and full.endswith(".md") and anchor not in anchors(full):
            bad.append(f"{url} (no heading #{anchor} in {os.path.relpath(full, ROOT)})")
    assert not bad, f"{os.path.relpath(page, ROOT)}: broken links:\n  " + "\n  ".join(bad)


def test_pages_have_links():
    assert relative_links(PAGES[0]), "the README links to nothing"


def test_readme_names_the_ci_test_command():
    readme = open(PAGES[0], encoding="utf-8").read()
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    assert "make test" in ci
    assert re.search(r"^make test\s+#", readme, flags=re.M), "the README must name `make test` as the test command"
