"""The docs hold together: README front page <= 200 lines, every relative link and image resolves (anchors
included), every path in docs/architecture.md exists, and docs/speed.md carries benchmarks/table.py's output.

Each check is a small function over markdown text, and each has a negative test: a snippet with the fault is
reported. Reads files only (no model, no torch of its own)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 200

_FENCE = re.compile(r"^\s*(```|~~~)")
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_CODE_SPAN = re.compile(r"`([^`]+)`")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (a heading or link inside a fence is code, not markdown)."""
    out, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link syntax dropped, lower case, punctuation removed, spaces -> '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading anchor of a markdown text, with GitHub's -1, -2 suffixes for repeated headings."""
    seen: dict[str, int] = {}
    out = set()
    for line in prose_lines(text):
        m = _HEADING.match(line)
        if not m:
            continue
        s = slug(m.group(2))
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


def links(text: str) -> list[str]:
    """Targets of markdown links and images in prose (inline code spans and fenced blocks are skipped)."""
    found = []
    for line in prose_lines(text):
        found += _LINK.findall(re.sub(r"`[^`]*`", "", line))
    return found


def broken_links(text: str, base: Path) -> list[str]:
    """The relative links of a markdown text (its file's folder = `base`) whose file or #anchor is missing."""
    bad = []
    for target in links(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:, file: ...
            continue
        path_part, _, anchor = target.partition("#")
        path = (base / path_part).resolve() if path_part else None
        if path is not None and not path.exists():
            bad.append(f"{target} (no such file)")
            continue
        if anchor:
            doc = path.read_text() if path is not None else text
            if (path is None or path.suffix == ".md") and anchor not in anchors(doc):
                bad.append(f"{target} (no heading #{anchor})")
    return bad


def table_rows(text: str, section: str | None = None) -> list[list[str]]:
    """Body rows of the markdown tables in a text (or under one heading), as lists of cells; headers dropped."""
    rows, current, kept = [], None, False
    for line in prose_lines(text):
        m = _HEADING.match(line)
        if m:
            current = m.group(2)
        elif re.match(r"^\|[\s:|-]+\|$", line.strip()):  # the separator: the row above it was the header
            if kept:
                rows.pop()
        elif line.startswith("|") and (section is None or current == section):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
            kept = True
            continue
        kept = False
    return rows


def cell_paths(cell: str, base: Path) -> list[Path]:
    """The paths a table cell names: link targets (relative to `base`) and code spans holding a '/' (to the root)."""
    out = [(base / t.partition("#")[0]).resolve() for t in links(cell) if not re.match(r"^[a-z]+:", t)]
    out += [(ROOT / c).resolve() for c in _CODE_SPAN.findall(cell) if "/" in c and " " not in c]
    return out


def missing_paths(text: str, base: Path) -> list[str]:
    """Paths named in the text's tables that do not exist, relative to the repository root."""
    missing = []
    for row in table_rows(text):
        for path in cell_paths(" | ".join(row), base):
            if not path.exists():
                missing.append(str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path))
    return missing


def doc_files() -> list[Path]:
    return [ROOT / "README.md", ROOT / "DEVELOPERS.md", *sorted((ROOT / "docs").rglob("*.md"))]


# --- the checks -------------------------------------------------------------------------------------------------


def test_readme_front_page_is_short():
    n = len((ROOT / "README.md").read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}): move manuals to docs/"


def test_every_relative_link_resolves():
    bad = {str(f.relative_to(ROOT)): broken_links(f.read_text(), f.parent) for f in doc_files()}
    bad = {f: b for f, b in bad.items() if b}
    assert not bad, f"broken links: {bad}"


def test_architecture_paths_exist():
    text = (ROOT / "docs" / "architecture.md").read_text()
    missing = missing_paths(text, ROOT / "docs")
    assert not missing, f"docs/architecture.md names paths that do not exist: {missing}"


def test_architecture_table_covers_the_concepts():
    """The concept -> file table names the ideas of issue 26, and every row points at a file or folder."""
    rows = table_rows((ROOT / "docs" / "architecture.md").read_text(), section="Concept -> file")
    concepts = " ".join(r[0].lower() for r in rows)
    wanted = [
        "exact patching",
        "attribution patching",
        "path patching",
        "label-position patching",
        "integrated gradients",
        "attattr",
        "path ig",
        "the finder",
        "the grid",
        "ablation",
        "re-run engine",
        "statistics",
        "the report",
        "behaviour curves",
        "organisms",
        "hook vocabulary",
        "promptbatch",
    ]
    assert not [w for w in wanted if w not in concepts], f"concepts missing from the table: {wanted}"
    empty = [r[0] for r in rows if not cell_paths(" | ".join(r[1:]), ROOT / "docs")]
    assert not empty, f"rows without a path: {empty}"


def test_speed_doc_carries_the_benchmark_table():
    """docs/speed.md holds benchmarks/table.py's output verbatim (table + numbered commands)."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "table.py")], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out.count("\n") > 10
    assert out in (ROOT / "docs" / "speed.md").read_text(), (
        "regenerate: python benchmarks/table.py > paste into docs/speed.md"
    )


# --- the checks can fail ----------------------------------------------------------------------------------------


def test_broken_links_are_reported(tmp_path):
    (tmp_path / "there.md").write_text("# A heading: `with code`\n\n## Twice\n\n## Twice\n")
    (tmp_path / "img.png").write_bytes(b"")
    text = (
        "# Top\n"
        "[ok](there.md) [ok](there.md#a-heading-with-code) [ok](there.md#twice-1) ![ok](img.png) [ok](#top)\n"
        "[gone](missing.md) ![gone](nope.png) [bad anchor](there.md#no-such) [bad local](#nowhere)\n"
        "[web](https://example.org/x) `[in code](missing2.md)`\n"
        "```\n[in a fence](missing3.md)\n```\n"
    )
    bad = broken_links(text, tmp_path)
    assert bad == [
        "missing.md (no such file)",
        "nope.png (no such file)",
        "there.md#no-such (no heading #no-such)",
        "#nowhere (no heading #nowhere)",
    ]


def test_missing_table_paths_are_reported():
    text = (
        "## Concept -> file\n\n| concept | where |\n|---|---|\n"
        "| here | [mechicl/errors.py](../mechicl/errors.py), `mechicl/data/prompts.py` |\n"
        "| gone | [mechicl/nope.py](../mechicl/nope.py), `mechicl/analysis/gone/` |\n"
    )
    assert missing_paths(text, ROOT / "docs") == ["mechicl/nope.py", "mechicl/analysis/gone"]
    assert [r[0] for r in table_rows(text, section="Concept -> file")] == ["here", "gone"]


def test_slugs_follow_github():
    assert slug("The mechanism on one page: `mechicl report`") == "the-mechanism-on-one-page-mechicl-report"
    assert slug("Behaviour (NH1–NH3), [see](x.md)") == "behaviour-nh1nh3-see"
    assert anchors("# A\n```\n# not a heading\n```\n# A\n") == {"a", "a-1"}
