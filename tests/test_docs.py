"""The documentation stays true to the code: the generated config reference is current and
complete, relative links resolve, and every command line in the docs' bash blocks names
config fields and group options that exist."""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import shlex
import typing
from typing import Any, Iterator, Optional

import pytest
import yaml

from longtrain.config import reference
from longtrain.config.eval_schema import EvalRunConfig
from longtrain.config.schema import RunConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONF = os.path.join(ROOT, "conf", "longtrain_conf")
REFERENCE = os.path.join(ROOT, "docs", "config-reference.md")
DOCS = sorted([os.path.join(ROOT, "README.md"), os.path.join(ROOT, "slurm", "README.md"),
               *glob.glob(os.path.join(ROOT, "docs", "*.md"))])
# the app each command line is checked against (the sbatch template runs longtrain-train)
COMMANDS = {"longtrain-train": RunConfig, "slurm/longtrain.sbatch": RunConfig,
            "longtrain-eval": EvalRunConfig, "longtrain-export": None}
PRIMARY = {RunConfig: "config.yaml", EvalRunConfig: "eval.yaml"}
EXPORT_KEYS = {"checkpoint", "out", "format", "dtype"}
# Hydra's own flags; the ones in _FLAGS_WITH_VALUE take the next argument
_FLAGS = {"-m", "--multirun", "--check", "--help", "-h", "--hydra-help", "--resolve"}
_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-name", "-cn", "--config-dir",
                     "-cd", "--info", "-i"}
_SEPARATORS = {"&&", "||", ";", "|", ">", ">>", "2>&1", "&"}


def _walk(cls: type, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted path, default) of every leaf of a config dataclass: a nested dataclass is
    walked, a list of dataclasses (train.schedule) is a leaf and its items' fields are at
    `<path>[].<field>`, a dict default with fixed keys (init) gives one leaf per key."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path, hint = prefix + f.name, hints[f.name]
        if dataclasses.is_dataclass(hint):
            yield from _walk(hint, path + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        yield path, default
        args = typing.get_args(hint)
        if typing.get_origin(hint) is list and args and dataclasses.is_dataclass(args[0]):
            yield from _walk(args[0], path + "[].")
        if isinstance(default, dict):
            yield from ((f"{path}.{k}", v) for k, v in default.items())


def _field_problem(cls: type, path: str) -> Optional[str]:
    """Why `path=value` would not set a field of `cls`; None when it does."""
    node: Any = cls
    parts = path.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(node):
            return f"{'.'.join(parts[:i])} has no field {part!r}"
        fields = {f.name: f for f in dataclasses.fields(node)}
        if part not in fields:
            return f"{'.'.join(parts[:i + 1])} is not a field of {node.__name__}"
        f, hint = fields[part], typing.get_type_hints(node)[part]
        if f.default_factory is not dataclasses.MISSING and not dataclasses.is_dataclass(hint):
            default = f.default_factory()
            if isinstance(default, dict) and i + 1 < len(parts):
                # a dict with fixed keys (init): its keys are the fields
                key = parts[i + 1]
                if key not in default or i + 2 < len(parts):
                    return f"{part} has no key {key!r} (keys: {sorted(default)})"
                return None
        node = hint
    if dataclasses.is_dataclass(node):
        return f"{path} is a group of fields, not a value"
    return None


def _groups(cls: type) -> set[str]:
    """The config groups an app selects in its primary config's defaults list."""
    with open(os.path.join(CONF, PRIMARY[cls]), encoding="utf-8") as f:
        defaults = yaml.safe_load(f)["defaults"]
    return {str(k) for item in defaults if isinstance(item, dict) for k in item}


def _override_problems(command: str, args: list[str]) -> list[str]:
    """What is wrong with the arguments of one doc command line."""
    cls = COMMANDS[command]
    out = []
    if cls is None:
        for arg in args:
            key, sep, value = arg.partition("=")
            if not sep or key not in EXPORT_KEYS:
                out.append(f"{command}: {arg!r} is not one of {sorted(EXPORT_KEYS)}=...")
            elif key == "format" and value not in ("hf", "native"):
                out.append(f"{command}: format={value!r} is not hf or native")
        return out
    groups = _groups(cls)
    skip_next = False
    for arg in args:
        if skip_next:
            skip_next = False
            continue
        if arg in _FLAGS:
            continue
        if arg in _FLAGS_WITH_VALUE:
            skip_next = True
            continue
        if arg.startswith(("+", "~", "hydra.")):
            continue
        key, sep, value = arg.partition("=")
        if not sep:
            out.append(f"{command}: {arg!r} is neither a known flag nor key=value")
            continue
        if "/" in key or os.path.isdir(os.path.join(CONF, key)):
            if "/" not in key and key not in groups:
                out.append(f"{command}: {key} is not a config group of this command")
                continue
            for option in value.split(","):
                if not os.path.isfile(os.path.join(CONF, key, f"{option}.yaml")):
                    out.append(f"{command}: {key}={option}: there is no conf/longtrain_conf/{key}/{option}.yaml")
            continue
        problem = _field_problem(cls, key)
        if problem:
            out.append(f"{command}: {arg!r}: {problem}")
    return out


def _bash_blocks(text: str) -> Iterator[str]:
    for match in re.finditer(r"^```(?:bash|sh|shell)\n(.*?)^```", text, flags=re.M | re.S):
        yield match.group(1)


def _command_lines(block: str) -> Iterator[tuple[str, list[str]]]:
    """(command, its arguments) for every longtrain command in a bash block."""
    for line in block.replace("\\\n", " ").splitlines():
        tokens = shlex.split(line, comments=True)
        for i, token in enumerate(tokens):
            command = next((c for c in COMMANDS if token == c or token.endswith("/" + c)), None)
            if command is None:
                continue
            args = []
            for arg in tokens[i + 1:]:
                if arg in _SEPARATORS:
                    break
                args.append(arg)
            yield command, args


def _doc_commands() -> list[tuple[str, str, list[str]]]:
    out = []
    for path in DOCS:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for block in _bash_blocks(text):
            out += [(os.path.relpath(path, ROOT), c, a) for c, a in _command_lines(block)]
    return out


def _links(text: str) -> Iterator[str]:
    # inline Markdown links outside code spans and fenced blocks
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    yield from re.findall(r"\[[^\]\n]*\]\(([^)\s]+)\)", text)


def _anchors(path: str) -> set[str]:
    with open(path, encoding="utf-8") as f:
        text = re.sub(r"^```.*?^```", "", f.read(), flags=re.M | re.S)
    return {reference.slug(h) for h in re.findall(r"^#+ (.*)$", text, flags=re.M)}


def test_reference_is_current(tmp_path, capsys) -> None:
    with open(REFERENCE, encoding="utf-8") as f:
        committed = f.read()
    assert committed == reference.generate(), (
        f"docs/config-reference.md is out of date; regenerate it: {reference.REGENERATE}")
    assert reference.main(["--check", "--out", REFERENCE]) == 0
    stale = tmp_path / "ref.md"
    stale.write_text(committed.replace("`parallel.tp`", "`parallel.tpp`"), encoding="utf-8")
    assert reference.main(["--check", "--out", str(stale)]) == 1
    err = capsys.readouterr().err
    assert "out of date" in err and "parallel.tpp" in err
    assert reference.main(["--check", "--out", str(tmp_path / "missing.md")]) == 1
    # --out writes exactly the text --check compares with
    assert reference.main(["--out", str(tmp_path / "new.md")]) == 0
    assert (tmp_path / "new.md").read_text(encoding="utf-8") == committed


def test_reference_documents_every_field() -> None:
    with open(REFERENCE, encoding="utf-8") as f:
        text = f.read()
    train_part, rest = text.split("\n## longtrain-eval\n")
    eval_part = rest.split("\n## Config groups")[0]

    def rows(part: str) -> dict[str, str]:
        return {m.group(1): m.group(0).replace("\\|", "|") for m in
                re.finditer(r"^\| `([^`]+)` \| `[^`]+` \| [^|]* \|", part, flags=re.M)}

    train_rows, eval_rows = rows(train_part), rows(eval_part)
    # the groups eval shares with training are documented once, in the training part
    for cls, table in ((RunConfig, train_rows), (EvalRunConfig, {**train_rows, **eval_rows})):
        leaves = list(_walk(cls))
        assert len(leaves) > 60, cls
        missing = sorted({p for p, _ in leaves} - set(table))
        assert not missing, f"{cls.__name__} fields missing from the reference: {missing}"
        for path, default in leaves:
            shown = reference.value_text(default)
            assert f"| `{shown}` |" in table[path], (path, shown, table[path])
    # descriptions are the comment lines above each field, joined, pipes escaped
    line = next(ln for ln in text.splitlines() if ln.startswith("| `attention.s2.vert_stride`"))
    assert line.endswith("| ... and beyond them every `vert_stride`-th block, at a phase that "
                         "depends on the head |"), line
    line = next(ln for ln in text.splitlines() if ln.startswith("| `logging.wandb.mode`"))
    assert line.endswith("| online \\| offline \\| disabled |"), line


def test_reference_lists_every_conf_option() -> None:
    with open(REFERENCE, encoding="utf-8") as f:
        text = f.read()
    options = glob.glob(os.path.join(CONF, "**", "*.yaml"), recursive=True)
    assert len(options) > 30
    for path in options:
        rel = os.path.relpath(path, CONF)
        group, option = os.path.split(rel)
        if not group:
            assert f"| `{option}` |" in text, f"primary config {option} not listed"
            continue
        section = text.split(f"\n### Group {group}\n", 1)
        assert len(section) == 2, f"no section for group {group}"
        body = section[1].split("\n### ", 1)[0]
        name = option[:-len(".yaml")]
        row = next((ln for ln in body.splitlines() if ln.startswith(f"| `{name}` |")), None)
        assert row is not None, f"conf/longtrain_conf/{rel} is not listed under group {group}"
        _, package, content = reference._yaml(path)
        content.pop("defaults", None)
        prefix = "" if package == "_global_" else group.replace("/", ".")
        for key, value in reference.flatten(content, prefix) if content else []:
            assert f"`{key}={reference.value_text(value)}`" in row, (rel, key, row)


def test_conf_options_set_existing_fields() -> None:
    """A typo in a conf/ option's keys would only surface when someone selects it."""
    checked = 0
    for group, options in reference.group_options(CONF).items():
        if group.startswith("hydra/"):
            continue
        for opt in options:
            for key, _ in opt.sets:
                assert _field_problem(RunConfig, key) is None, (group, opt.name, key)
                checked += 1
    assert checked > 40


def test_relative_links_resolve() -> None:
    checked = 0
    for path in DOCS:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for target in _links(text):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            dest = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
            where = f"{os.path.relpath(path, ROOT)}: link {target!r}"
            assert os.path.exists(dest), f"{where}: {dest} does not exist"
            if anchor and dest.endswith(".md"):
                assert anchor in _anchors(dest), f"{where}: no heading with anchor #{anchor}"
            checked += 1
    assert checked > 20


def test_doc_commands_name_existing_config() -> None:
    commands = _doc_commands()
    found = [f"{doc}: {p}" for doc, c, args in commands for p in _override_problems(c, args)]
    assert not found, "\n".join(found)
    docs = {doc for doc, _, _ in commands}
    assert {"docs/slurm.md", "docs/extend.md", "docs/monitoring.md", "README.md"} <= docs
    assert sum(len(args) for _, _, args in commands) > 150


@pytest.mark.parametrize("line,expected", [
    ("longtrain-train parallel.tpp=2", "parallel.tpp is not a field"),
    ("longtrain-train attention=rng", "no conf/longtrain_conf/attention/rng.yaml"),
    ("longtrain-train -m attention=ring,ulyses", "no conf/longtrain_conf/attention/ulyses.yaml"),
    ("longtrain-train hydra/launcher=slurmm", "no conf/longtrain_conf/hydra/launcher/slurmm.yaml"),
    ("longtrain-train init.form=/x", "init has no key 'form'"),
    ("longtrain-train logging.wandb=online", "is a group of fields"),
    ("longtrain-train data.seq_len.x=1", "data.seq_len has no field 'x'"),
    ("longtrain-train --chek", "neither a known flag"),
    ("longtrain-eval rope=yarn", "rope is not a config group of this command"),
    ("longtrain-eval eval.length=[1]", "eval.length is not a field"),
    ("longtrain-eval train.steps=1", "train is not a field"),
    ("longtrain-export checkpoint=a out=b format=safetensors", "format='safetensors'"),
    ("sbatch slurm/longtrain.sbatch modle=1b", "modle is not a field"),
])
def test_command_checker_catches_typos(line: str, expected: str) -> None:
    (command, args), = _command_lines(line)
    problems = _override_problems(command, args)
    assert any(expected in p for p in problems), problems


def test_command_checker_accepts_valid_lines() -> None:
    block = ("longtrain-train -m hydra/launcher=slurm hydra.launcher.nodes=2 \\\n"
             "    attention=ring,ulysses 'train.schedule=[{seq_len:4096,steps:2}]' "
             "init.from=/x +foo=1 ~bar  # a comment\n"
             "longtrain-eval checkpoint=c 'eval.lengths=[1,2]' --cfg job && echo done\n")
    lines = list(_command_lines(block))
    assert [c for c, _ in lines] == ["longtrain-train", "longtrain-eval"]
    assert lines[1][1] == ["checkpoint=c", "eval.lengths=[1,2]", "--cfg", "job"]
    assert all(not _override_problems(c, a) for c, a in lines)
