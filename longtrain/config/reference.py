"""The configuration reference (docs/config-reference.md), generated from the schema and conf/.

Every field of the training config (`RunConfig`) and the evaluation config (`EvalRunConfig`)
with its dotted path, type, default and description, the description being the `#` comment
lines directly above the field in the source (and each dataclass's docstring); then every
option of every Hydra config group under conf/ with the values it sets.

    python -m longtrain.config.reference [--out docs/config-reference.md] [--check]

`--check` writes nothing and exits 1 when the file differs from what would be generated.
The output depends only on the sources, so it is the same on every machine.

Over 450 lines on purpose: one job (the document), whose readers (the schema's comments, the
conf/ tree, the Markdown writer) are used nowhere else.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import functools
import inspect
import io
import os
import re
import sys
import tokenize
import typing
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from longtrain.config.eval_schema import EvalRunConfig
from longtrain.config.schema import RunConfig

DEFAULT_OUT = os.path.join("docs", "config-reference.md")
REGENERATE = "python -m longtrain.config.reference --out docs/config-reference.md"
# the primary configs of the two Hydra apps, in conf/
PRIMARY = (("config.yaml", "longtrain-train"), ("eval.yaml", "longtrain-eval"))


@dataclass(frozen=True)
class FieldDoc:
    """One row of the reference: a field at its dotted path."""

    path: str
    type: str
    default: str
    description: str
    # the section documenting this field's dataclass (or its list items), when it is one
    section: Optional[str] = None
    section_cls: Optional[type] = None


@dataclass(frozen=True)
class Section:
    """The fields of one dataclass at one place in the config tree."""

    path: str
    cls: type
    fields: tuple[FieldDoc, ...]


def _comment_text(lines: list[str]) -> str:
    """`#` comment lines (without the `#`) as one Markdown paragraph: lines indented beyond
    the comment's own margin are examples and become code spans."""
    parts = []
    for line in lines:
        body = line[1:] if line.startswith(" ") else line
        if body.startswith("  ") and body.strip():
            parts.append(f"`{body.strip()}`")
        elif body.strip():
            parts.append(body.strip())
    return " ".join(parts)


@functools.lru_cache(maxsize=None)
def _parsed(path: str) -> tuple[ast.Module, dict[int, str]]:
    """A source file's syntax tree and {line number: text} of its comment-only lines."""
    with open(path, encoding="utf-8") as f:
        source = f.read()
    own_line: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and tok.line.strip().startswith("#"):
            own_line[tok.start[0]] = tok.string[1:]
    return ast.parse(source), own_line


def _class_comments(cls: type) -> dict[str, str]:
    """{field name: the comment lines directly above it} for a dataclass, read with tokenize
    (comment-only lines) and ast (where each field is declared)."""
    path = inspect.getsourcefile(cls)
    assert path is not None, cls
    tree, own_line = _parsed(path)
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == cls.__name__:
            break
    else:
        raise AssertionError(f"class {cls.__name__} not found in {path}")
    out = {}
    for stmt in node.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            above, line = [], stmt.lineno - 1
            while line in own_line:
                above.append(own_line[line])
                line -= 1
            out[stmt.target.id] = _comment_text(above[::-1])
    return out


def _docstring(cls: type) -> str:
    doc = cls.__doc__ or ""
    # dataclasses invent "Name(field: type, ...)" when the class has no docstring
    if doc.startswith(f"{cls.__name__}("):
        return ""
    return " ".join(doc.split())


def value_text(value: Any) -> str:
    """A value as it is written in a Hydra override."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and "\n" in value.strip():
        # a block of text (a help page): its first line stands for it in a table row
        return f"{value.strip().splitlines()[0]} ... ({len(value.strip().splitlines())} lines)"
    if isinstance(value, str):
        return value.strip("\n") if value else '""'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(value_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {value_text(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _type_text(f: dataclasses.Field) -> str:
    # the schema modules use postponed annotations: the type is its source text
    return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))


def _item_dataclass(hint: Any) -> Optional[type]:
    """X for a field annotated List[X] with X a dataclass."""
    if typing.get_origin(hint) in (list, tuple):
        args = typing.get_args(hint)
        if args and dataclasses.is_dataclass(args[0]):
            return args[0]
    return None


def sections(root: type, prefix: str = "") -> Iterator[Section]:
    """The dataclasses reachable from `root`, depth first in declaration order; a list of
    dataclasses (train.schedule) is documented at `<path>[]`."""
    hints = typing.get_type_hints(root)
    comments = _class_comments(root)
    rows, children = [], []
    for f in dataclasses.fields(root):
        path = f"{prefix}{f.name}"
        hint = hints[f.name]
        default = _default(f)
        description = comments.get(f.name, "")
        if dataclasses.is_dataclass(hint):
            rows.append(FieldDoc(path, _type_text(f), "", description, section=path,
                                 section_cls=hint))
            children.append((hint, path))
            continue
        item = _item_dataclass(hint)
        if item is not None:
            rows.append(FieldDoc(path, _type_text(f), value_text(default), description,
                                 section=f"{path}[]", section_cls=item))
            children.append((item, f"{path}[]"))
            continue
        rows.append(FieldDoc(path, _type_text(f), value_text(default), description))
        if isinstance(default, dict):
            # a dict with fixed keys (init): each key is a field of its own
            for key, value in default.items():
                rows.append(FieldDoc(f"{path}.{key}", type(value).__name__ if value is not None
                                     else "Any", value_text(value), f"key of `{path}`"))
    yield Section(prefix.rstrip(".") or "", root, tuple(rows))
    for cls, path in children:
        yield from sections(cls, f"{path}.")


def conf_dir() -> str:
    import longtrain_conf

    return os.path.dirname(os.path.abspath(longtrain_conf.__file__))


def _yaml(path: str) -> tuple[str, Optional[str], Any]:
    """(the header comment as text, its `@package` if any, the parsed content)."""
    import yaml

    with open(path, encoding="utf-8") as f:
        text = f.read()
    header, package = [], None
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        match = re.match(r"#\s*@package\s+(\S+)", line)
        if match:
            package = match.group(1)
        else:
            header.append(line[1:])
    return _comment_text(header), package, yaml.safe_load(text) or {}


def flatten(node: Any, prefix: str) -> list[tuple[str, Any]]:
    """Nested mappings -> (dotted key, value), in file order."""
    if isinstance(node, dict) and node:
        out = []
        for key, value in node.items():
            out += flatten(value, f"{prefix}.{key}" if prefix else str(key))
        return out
    return [(prefix, node)] if prefix else []


def _defaults_entries(defaults: list[Any]) -> list[str]:
    """A defaults list as `group=option` / `extends name` entries (`_self_` left out)."""
    out = []
    for item in defaults:
        if isinstance(item, str):
            if item != "_self_":
                out.append(f"extends `{item}`")
        elif isinstance(item, dict):
            for key, value in item.items():
                group = str(key).replace("override ", "").strip().lstrip("/")
                out.append(f"`{group}={value_text(value)}`")
    return out


@dataclass(frozen=True)
class Option:
    name: str
    description: str
    # (dotted key relative to the config root, value)
    sets: tuple[tuple[str, Any], ...]
    defaults: tuple[str, ...]


def group_options(root: str) -> dict[str, list[Option]]:
    """{group (e.g. "attention", "hydra/launcher"): its options}, both sorted by name."""
    out: dict[str, list[Option]] = {}
    for here, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(("_", ".")))
        group = os.path.relpath(here, root).replace(os.sep, "/")
        if group == ".":
            continue
        options = []
        for name in sorted(f for f in files if f.endswith(".yaml")):
            description, package, content = _yaml(os.path.join(here, name))
            defaults = content.pop("defaults", []) if isinstance(content, dict) else []
            if package == "_global_":
                prefix = ""
            elif package in (None, "_group_"):
                prefix = group.replace("/", ".")
            else:
                prefix = package
            options.append(Option(name[:-len(".yaml")], description,
                                  tuple(flatten(content, prefix) if content else ()),
                                  tuple(_defaults_entries(defaults))))
        if options:
            out[group] = options
    return dict(sorted(out.items()))


def _primary_defaults(root: str) -> dict[str, dict[str, Any]]:
    """{app: {group: its default option}} from the primary configs' defaults lists."""
    out = {}
    for name, app in PRIMARY:
        _, _, content = _yaml(os.path.join(root, name))
        choices = {}
        for item in content.get("defaults", []):
            if isinstance(item, dict):
                choices.update({str(k): v for k, v in item.items()})
        out[app] = choices
    return out


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _inline(text: str) -> str:
    """Text for Markdown: `<` outside code spans escaped (it would open an HTML tag)."""
    parts = text.split("`")
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("<", "&lt;")
    return "`".join(parts)


def _cell(text: str) -> str:
    """Text for a table cell: `_inline` with `|` escaped (also inside code spans)."""
    return _inline(text).replace("|", "\\|")


def _code(text: str) -> str:
    return _cell(f"`{text}`") if text else ""


def _section_heading(section: Section) -> str:
    return section.path or ("run" if section.cls is RunConfig else "evaluation run")


def _field_table(section: Section, shared: dict[type, str]) -> list[str]:
    lines = ["| field | type | default | description |", "| --- | --- | --- | --- |"]
    for row in section.fields:
        default = _code(row.default)
        if row.section_cls in shared:
            default = f"as in training: [{shared[row.section_cls]}]" \
                      f"(#{slug(shared[row.section_cls])})"
        elif row.section is not None and not row.section.endswith("[]"):
            default = f"[{row.section}](#{slug(row.section)})"
        lines.append(f"| {_code(row.path)} | {_code(row.type)} | {default} | "
                     f"{_cell(row.description)} |")
    return lines


def _schema_part(title: str, intro: str, root: type, shared: dict[type, str]) -> list[str]:
    """The sections of one app's config; a dataclass already documented in `shared`
    ({class: its heading}) is linked to instead of repeated."""
    lines = [f"## {title}", "", intro, ""]
    for section in sections(root):
        if section.path and section.cls in shared:
            continue
        lines += [f"### {_section_heading(section)}", ""]
        doc = _docstring(section.cls)
        if doc:
            lines += [_inline(doc), ""]
        lines += _field_table(section, shared) + [""]
    return lines


def _conf_part(root: str) -> list[str]:
    groups = group_options(root)
    defaults = _primary_defaults(root)
    lines = ["## Config groups (conf/)", "",
             "A group is a directory of conf/ and an option is one of its YAML files: "
             "`attention=ring` loads conf/longtrain_conf/attention/ring.yaml, which sets the values listed "
             "beside it. Overrides given after it on the command line win. Groups under "
             "`hydra/` configure Hydra itself and act in multirun mode (`-m`).", ""]
    lines += ["### Primary configs", "",
              "| file | app | defaults list | sets |", "| --- | --- | --- | --- |"]
    for name, app in PRIMARY:
        _, _, content = _yaml(os.path.join(root, name))
        entries = _defaults_entries(content.pop("defaults", []))
        sets = "<br>".join(_code(f"{k}={value_text(v)}") for k, v in flatten(content, ""))
        lines.append(f"| {_code(name)} | {_code(app)} | {', '.join(entries)} | {sets} |")
    lines.append("")
    for group, options in groups.items():
        lines += [f"### Group {group}", ""]
        used = [app for app, choices in defaults.items() if group in choices]
        chosen = {app: choices[group] for app, choices in defaults.items()
                  if choices.get(group) is not None}
        if group == "hydra/launcher":
            default = "a Hydra group, acting in multirun mode (`-m`) only"
        elif group.startswith("hydra/"):
            default = "a Hydra group, selected by the primary config"
        elif not chosen:
            default = "none selected by default"
        elif len(set(chosen.values())) == 1 and len(chosen) == len(used):
            default = f"default `{next(iter(chosen.values()))}`"
        else:
            default = "default " + ", ".join(f"`{v}` in `{a}`" for a, v in chosen.items())
        apps = " and ".join(f"`{a}`" for a in used)
        lines += [f"Select with `{group}=<option>`" + (f" in {apps}" if apps else "")
                  + f"; {default}.", "",
                  "| option | sets | description |", "| --- | --- | --- |"]
        for opt in options:
            entries = list(opt.defaults) + [_code(f"{k}={value_text(v)}") for k, v in opt.sets]
            sets = "<br>".join(entries) if entries else "nothing (the schema's defaults)"
            lines.append(f"| {_code(opt.name)} | {sets} | {_cell(opt.description)} |")
        lines.append("")
    return lines


def generate(root: Optional[str] = None) -> str:
    """The whole reference as Markdown."""
    root = root or conf_dir()
    lines = [
        "# Configuration reference",
        "",
        f"<!-- Generated by `{REGENERATE}` from longtrain/config/schema.py, "
        "longtrain/config/eval_schema.py and conf/. Do not edit by hand. -->",
        "",
        "Every field below can be set on the command line as `path=value` "
        "(`parallel.tp=2`, `rope.theta=500000`, `checkpoint.dir=null`, "
        "`'eval.lengths=[1024,4096]'`); an unknown path is refused. A config group is "
        "selected with `group=option` (`attention=ring`) and sets the values listed under "
        "[Config groups](#config-groups-conf). Defaults are the schema's; a group option, "
        "the primary config or an experiment may set other values before your overrides.",
        "",
        "Contents: [longtrain-train](#longtrain-train), [longtrain-eval](#longtrain-eval), "
        "[Config groups](#config-groups-conf).",
        "",
    ]
    train_sections = {s.cls: _section_heading(s) for s in sections(RunConfig) if s.path}
    lines += _schema_part(
        "longtrain-train", "The training config (`RunConfig` in longtrain/config/schema.py).",
        RunConfig, {})
    lines += _schema_part(
        "longtrain-eval", "The evaluation config (`EvalRunConfig` in "
        "longtrain/config/eval_schema.py). Its groups shared with training are the same "
        "dataclasses, with the same fields and defaults; the model and RoPE come from the "
        "checkpoint.", EvalRunConfig, train_sections)
    lines += _conf_part(root)
    text = "\n".join(lines).rstrip("\n") + "\n"
    anchors = [slug(h) for h in re.findall(r"^#+ (.*)$", text, flags=re.M)]
    assert len(anchors) == len(set(anchors)), "duplicate headings in the reference"
    return text


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m longtrain.config.reference",
        description="Generate the configuration reference (Markdown) from the schema and conf/.")
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help=f"the file to write, '-' for stdout (default: {DEFAULT_OUT})")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if the file differs from the generated text")
    args = parser.parse_args(argv)
    text = generate()
    if args.check:
        try:
            with open(args.out, encoding="utf-8") as f:
                current = f.read()
        except FileNotFoundError:
            print(f"{args.out} does not exist; generate it: {REGENERATE}", file=sys.stderr)
            return 1
        if current != text:
            diff = list(difflib.unified_diff(current.splitlines(), text.splitlines(),
                                             f"{args.out} (on disk)", "generated", lineterm="",
                                             n=1))
            shown = "\n".join(diff[:40]) + ("\n..." if len(diff) > 40 else "")
            print(f"{args.out} is out of date with the schema and conf/; regenerate it: "
                  f"{REGENERATE}\n{shown}", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date")
        return 0
    if args.out == "-":
        sys.stdout.write(text)
        return 0
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
