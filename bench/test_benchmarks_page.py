"""docs/benchmarks.md is a user's page: one section per capability, each bench owning one part of it.

The bench scripts are read with `ast`, not imported: several import torch or Flower at import time.
Only `bench.markdown_report` (standard library only) is imported, to test the section rewrite.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from bench.markdown_report import replace_section

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "benchmarks.md"
BENCH = ROOT / "bench"
CAPABILITIES = ("Accuracy", "DP cost", "Secure aggregation", "Deployment", "Scale", "Data throughput")


def heading_constants(script: Path) -> dict[str, str]:
    """Module-level string constants named *HEADING in one bench script."""
    tree = ast.parse(script.read_text())
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            for target in node.targets:
                if isinstance(target, ast.Name) and target.id.endswith("HEADING"):
                    found[target.id] = node.value.value
    return found


def replace_section_calls(script: Path) -> list[ast.Call]:
    tree = ast.parse(script.read_text())
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and getattr(node.func, "id", getattr(node.func, "attr", None)) == "replace_section"
    ]


def writing_scripts() -> list[Path]:
    return [p for p in sorted(BENCH.glob("bench_*.py")) if p.name != "markdown_report.py" and replace_section_calls(p)]


def bench_headings() -> list[str]:
    return [h for script in writing_scripts() for h in heading_constants(script).values()]


def heading_lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.splitlines() if re.match(r"#{1,6} ", line)]


def test_the_page_cites_no_issue_numbers() -> None:
    text = PAGE.read_text()
    assert not re.findall(r"\bissues?\s*#?\s*\d+", text, flags=re.IGNORECASE)
    assert not [h for h in heading_lines(text) if "issue" in h.lower()]


def test_the_page_has_one_section_per_capability() -> None:
    sections = [h[3:] for h in heading_lines(PAGE.read_text()) if h.startswith("## ")]
    assert sections == list(CAPABILITIES)


def test_every_bench_writes_through_a_module_level_heading() -> None:
    scripts = writing_scripts()
    assert len(scripts) >= 9
    for script in scripts:
        names = heading_constants(script)
        assert names, f"{script.name} has no module-level *HEADING constant"
        for call in replace_section_calls(script):
            heading = call.args[1] if len(call.args) > 1 else None
            assert (isinstance(heading, ast.Name) and heading.id in names) or (
                isinstance(heading, ast.IfExp)
                and all(isinstance(side, ast.Name) and side.id in names for side in (heading.body, heading.orelse))
            ), f"{script.name}:{call.lineno} writes under a heading that is not one of its *HEADING constants"


def test_every_bench_heading_is_in_the_page_exactly_once() -> None:
    headings = bench_headings()
    lines = heading_lines(PAGE.read_text())
    assert len(set(headings)) == len(headings)
    for heading in headings:
        assert not re.search(r"issue", heading, flags=re.IGNORECASE), heading
        assert heading.startswith("### "), f"{heading!r}: a bench owns a subsection of a capability"
        assert lines.count(heading) == 1, heading


def sections_by_reference(text: str, heading: str) -> tuple[list[str], list[str], list[str]]:
    """The page's lines before, inside and after one section, found independently of replace_section."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.rstrip() == heading)
    level = len(heading) - len(heading.lstrip("#"))
    end = next(
        (
            i
            for i in range(start + 1, len(lines))
            if (m := re.match(r"(#{1,6}) ", lines[i])) and len(m.group(1)) <= level
        ),
        len(lines),
    )
    return lines[:start], lines[start:end], lines[end:]


@pytest.mark.parametrize("heading", bench_headings())
def test_rewriting_one_bench_section_of_the_page_keeps_the_rest(tmp_path: Path, heading: str) -> None:
    page = tmp_path / "benchmarks.md"
    page.write_text(PAGE.read_text())
    before, _inside, after = sections_by_reference(page.read_text(), heading)
    replace_section(page, heading, f"{heading}\n\nnew figures\n")
    new = page.read_text().splitlines()
    assert new[: len(before)] == before
    assert new[len(before) : len(before) + 3] == [heading, "", "new figures"]
    rest = new[len(before) + 3 :]
    assert [line for line in rest if line] == [line for line in after if line]
    assert heading_lines(page.read_text()) == heading_lines("\n".join([*before, heading, *after]))


def test_replace_section_stops_at_the_next_heading_of_its_level_or_above(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n\n## A\n\nintro\n\n### A1\n\nold\n\n#### A1 detail\n\nold detail\n\n"
        "### A2\n\nkept\n\n## B\n\nkept too\n"
    )
    replace_section(page, "### A1", "### A1\n\nnew\n")
    assert page.read_text() == ("# Title\n\n## A\n\nintro\n\n### A1\n\nnew\n\n### A2\n\nkept\n\n## B\n\nkept too\n")
    replace_section(page, "## B", "## B\n\nnew B")
    assert page.read_text().endswith("### A2\n\nkept\n\n## B\n\nnew B\n")


def test_replace_section_matches_the_whole_heading_line(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("## A\n\n### Tasks: targets\n\nhand-written\n\n### Tasks\n\nold\n")
    replace_section(page, "### Tasks", "### Tasks\n\nnew\n")
    assert page.read_text() == "## A\n\n### Tasks: targets\n\nhand-written\n\n### Tasks\n\nnew\n"


def test_replace_section_appends_a_missing_section(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("## A\n\nkept\n")
    replace_section(page, "### New", "### New\n\nfigures\n")
    assert page.read_text() == "## A\n\nkept\n\n### New\n\nfigures\n"


def test_replace_section_refuses_text_that_does_not_start_with_its_heading(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("## A\n\nkept\n")
    with pytest.raises(ValueError, match="### New"):
        replace_section(page, "### New", "## Old title\n\nfigures\n")
    assert page.read_text() == "## A\n\nkept\n"
