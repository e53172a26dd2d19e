"""Docs stay navigable: relative links resolve, the README stays short, every module is documented (issue 21)."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").rglob("*.md"))
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def _links(md: Path) -> list[str]:
    text = FENCE.sub("", md.read_text(encoding="utf-8"))
    text = re.sub(r"`[^`\n]*`", "", text)  # inline code is not a link
    return [t for t in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to '-'."""
    h = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", h))


def anchors(md: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", md.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"#{1,6}\s+(.*)", line)
        if m:
            s = slug(m.group(1))
            n = seen.get(s, 0)
            seen[s] = n + 1
            out.add(s if n == 0 else f"{s}-{n}")
    return out


@pytest.mark.parametrize("md", [README, *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(md: Path) -> None:
    bad = []
    for target in _links(md):
        path, _, anchor = target.partition("#")
        dest = (md.parent / path).resolve() if path else md
        if not dest.exists():
            bad.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target} (no such heading)")
    assert not bad, f"{md.relative_to(ROOT)}: broken links: {bad}"


def test_slug_matches_github() -> None:
    assert slug("Input formats (`prepare --format`)") == "input-formats-prepare---format"
    assert slug("Evaluate and compare (`eval`, `report`)") == "evaluate-and-compare-eval-report"


def test_readme_is_short_with_contents() -> None:
    size = len(README.read_bytes())
    assert size < 20_000, f"README.md is {size} bytes; move detail to docs/"
    text = README.read_text(encoding="utf-8")
    assert re.search(r"^## Contents$", text, re.M), "README.md has no table of contents"
    toc = text.split("## Contents", 1)[1].split("\n## ", 1)[0]
    assert len(re.findall(r"\]\(#", toc)) >= 5


def test_architecture_names_every_module() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    pkg = ROOT / "negalign"
    names = [p.name for p in sorted(pkg.glob("*.py"))]
    names += [p.relative_to(pkg).as_posix() for p in sorted(pkg.glob("*/*.py"))]  # pipeline/graph.py, ...
    missing = [n for n in names if f"`{n}`" not in text]
    assert not missing, f"docs/architecture.md does not describe: {missing}"


def test_linked_files_are_committed() -> None:
    """A committed report may not link a file that a fresh clone lacks (e.g. an uncommitted plot)."""
    try:
        tracked = set(subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                                     check=True).stdout.splitlines())
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    bad = []
    for md in [README, *DOCS]:
        rel_md = md.relative_to(ROOT).as_posix()
        if rel_md not in tracked:
            continue
        for target in _links(md):
            path = target.partition("#")[0]
            if not path:
                continue
            dest = (md.parent / path).resolve()
            if dest.is_file() and dest.relative_to(ROOT).as_posix() not in tracked:
                bad.append(f"{rel_md} -> {target}")
    assert not bad, f"links to uncommitted files: {bad}"
