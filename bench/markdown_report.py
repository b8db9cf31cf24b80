"""Benchmarks write their latest results into their own section of docs/benchmarks.md.

The page has one "## " section per capability; each bench script owns one "### " subsection inside
it, so re-running a bench rewrites only its own part and keeps the hand-written text around it.
"""

from __future__ import annotations

import re
from pathlib import Path

_HEADING = re.compile(r"(#{1,6}) ")


def _level(line: str) -> int:
    """The heading level of a markdown line (2 for '## x'), 0 when it is not a heading."""
    match = _HEADING.match(line)
    return len(match.group(1)) if match else 0


def replace_section(path: Path | str, heading: str, text: str) -> None:
    """Rewrite the section under `heading`, keeping everything else in the file.

    The section is the line equal to `heading` and what follows it up to the next heading of the
    same or a higher level (a "### " section ends at the next "### ", "## " or "# "), so deeper
    headings inside it are part of it. A missing section is appended at the end. `text` must start
    with `heading`, or the next run would not find the section again.
    """
    if not text.startswith(heading):
        raise ValueError(f"the text for section {heading!r} must start with that heading")
    path = Path(path)
    old = path.read_text() if path.exists() else "# fedcare benchmarks\n"
    lines = old.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == heading), None)
    body = text.rstrip("\n") + "\n"
    if start is None:
        path.write_text(old.rstrip("\n") + "\n\n" + body)
        return
    level = _level(heading) or 6
    end = next((i for i in range(start + 1, len(lines)) if 0 < _level(lines[i]) <= level), len(lines))
    after = "".join(lines[end:])
    path.write_text("".join(lines[:start]) + body + ("\n" + after if after else ""))
