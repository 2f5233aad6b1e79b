"""Every relative link in the README, the manual (docs/) and the record (results/) points at a file that exists,
and a link to a section of a markdown file (``file.md#section``) at a heading that exists there."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def documents() -> list[Path]:
    docs = [ROOT / "README.md", ROOT / "benchmarks" / "README.md"]
    docs += sorted((ROOT / "docs").rglob("*.md")) + sorted((ROOT / "results").rglob("*.md"))
    return [d for d in docs if d.exists()]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(md: Path) -> set[str]:
    text = FENCE.sub("", md.read_text())
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.*)$", text, re.M)}


def broken_links() -> list[str]:
    bad = []
    for doc in documents():
        text = FENCE.sub("", doc.read_text())
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (doc.parent / path).resolve() if path else doc
            where = f"{doc.relative_to(ROOT)}: ({target})"
            if not dest.exists():
                bad.append(f"{where} -> no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                bad.append(f"{where} -> no heading '#{anchor}' in {dest.relative_to(ROOT)}")
    return bad


def test_relative_links_resolve():
    bad = broken_links()
    assert not bad, "broken links:\n" + "\n".join(bad)


def test_slug_matches_github():
    assert slug("What a false-positive claim costs") == "what-a-false-positive-claim-costs"
    assert slug("`awenc serve` and the endpoint client") == "awenc-serve-and-the-endpoint-client"
    assert slug("3. Hand over the evidence: the bundle and its replay") == "3-hand-over-the-evidence-the-bundle-and-its-replay"
