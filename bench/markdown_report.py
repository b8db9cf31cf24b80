"""Benchmarks write their latest results into one section of docs/benchmarks.md."""

from __future__ import annotations

from pathlib import Path


def replace_section(path: Path | str, heading: str, text: str) -> None:
    """Rewrite one '## ' section of a markdown file, keeping the others."""
    path = Path(path)
    old = path.read_text() if path.exists() else "# fedcare benchmarks\n\n"
    start = old.find(heading)
    if start < 0:
        new = old.rstrip() + "\n\n" + text + "\n"
    else:
        end = old.find("\n## ", start + len(heading))
        new = old[:start] + text + ("\n" + old[end + 1:] if end >= 0 else "\n")
    path.write_text(new)

