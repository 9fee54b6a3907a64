"""BENCHMARKS.md is shared by several benchmarks: each owns one marked section."""

from __future__ import annotations

import os
import sys
from typing import Optional


def replace_section(path: str, key: str, title: str, body: str) -> None:
    """Write `body` under `## title` between `<!-- key:begin -->` / `<!-- key:end -->`,
    replacing that section if present, appending it otherwise; other sections are kept."""
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    section = f"{begin}\n## {title}\n\n{body.rstrip()}\n{end}"
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def command_line(module: str, argv: Optional[list[str]]) -> str:
    """How the section was produced: `python -m <module> <args>` (argv None: this process's)."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python -m " + module, *args])
