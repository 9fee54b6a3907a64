"""BENCHMARKS.md is shared by several benchmarks: each owns one marked section."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Optional


def replace_section(path: str, key: str, title: str, body: str, *, first: bool = False
                    ) -> None:
    """Write `body` under `## title` between `<!-- key:begin -->` / `<!-- key:end -->`,
    replacing that section if present, appending it otherwise (`first`: right after the
    file's `# ` title line); other sections are kept."""
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    section = f"{begin}\n## {title}\n\n{body.rstrip()}\n{end}"
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    elif first:
        head, _, rest = text.partition("\n")
        text = f"{head}\n\n{section}\n\n{rest.lstrip()}".rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def compose_config(overrides: list[str]) -> Any:
    """The typed RunConfig `longtrain-train <overrides>` would run (Hydra composition, then the
    pre-flight validation: a bad override raises naming it)."""
    from hydra import compose, initialize_config_module

    from longtrain.planning.validate import validate
    from longtrain_launch.store import register_configs, to_run_config

    register_configs()
    with initialize_config_module(config_module="longtrain_conf", version_base="1.3"):
        cfg = to_run_config(compose(config_name="config", overrides=overrides))
    validate(cfg)
    return cfg


def command_line(module: str, argv: Optional[list[str]]) -> str:
    """How the section was produced: `python -m <module> <args>` (argv None: this process's)."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python -m " + module, *args])


def argument_parser(doc: str, method: str) -> argparse.ArgumentParser:
    """A benchmark's parser: the module docstring's first paragraph, its METHOD as epilog."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog=method,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def join_section(parts: list[str], verdicts: list[str], method: str) -> str:
    """A section's body: `parts`, the verdict lines in bold, then the method."""
    return "\n\n".join([*parts, "\n".join(f"- **{line}**" for line in verdicts),
                         "Method:\n\n" + method.strip()])


def add_output_args(p: argparse.ArgumentParser) -> None:
    """--out (the markdown file the section goes into) and --json (the rows)."""
    p.add_argument("--out", default="BENCHMARKS.md",
                   help="markdown file to write the section into ('' = none)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")


def publish(result: Any, *, parts: list[str], lines: list[str], method: str, key: str,
            title: str, out: Optional[str], json_path: Optional[str], shown: int = 0) -> None:
    """A benchmark's ending: print `parts[shown:]` and the verdict `lines`, write `result` to
    `json_path` and the section (`parts`, `lines`, `method`) under `key` to `out` (each only
    when given)."""
    for part in parts[shown:]:
        print(part + "\n")
    for line in lines:
        print(line)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)
    if out:
        replace_section(out, key, title, join_section(parts, lines, method))
        print(f"section written to {out}")
