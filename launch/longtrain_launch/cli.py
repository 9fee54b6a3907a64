"""What the console entry points share around their Hydra app: `--version`, unknown keys
caught with a did-you-mean before Hydra composes, one exit code for every bad input (Hydra's
own errors included), Ctrl-C outside a run, and `--check` writing no directory.

Exit codes (also in `--help` and docs/README.md):
  0 done; 1 the run failed; 2 bad input, nothing started; 3 `--check`: the memory estimate does
  not fit; 128 + N stopped by signal N after a checkpoint (130 Ctrl-C, 143 SIGTERM).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import shutil
import sys
import tempfile
import typing
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import longtrain

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

# Arguments Hydra owns; their values are not config keys.
_HYDRA_FLAGS_WITH_VALUE = {"--config-path", "-cp", "--config-name", "-cn", "--config-dir",
                           "-cd", "--experimental-rerun", "--package", "-p", "--info", "-i"}


def version_line(prog: str) -> str:
    return f"{prog} (longtrain {longtrain.__version__})"


def _field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _dataclass_of(tp: Any) -> Optional[type]:
    """The dataclass a field holds (through Optional), or None for a leaf / free-form value."""
    if dataclasses.is_dataclass(tp):
        return tp
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Union and len(args) == 1 and dataclasses.is_dataclass(args[0]):
        return args[0]
    return None


def _override_keys(args: list[str]) -> list[str]:
    keys = []
    skip = False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg.startswith("-"):
            skip = arg in _HYDRA_FLAGS_WITH_VALUE
            continue
        if "=" not in arg or arg.startswith(("+", "~")):
            # `+key=` adds and `~key` deletes on purpose: Hydra reports those itself
            continue
        keys.append(arg.split("=", 1)[0])
    return keys


def unknown_key_problems(args: list[str], *, schema: type, groups: set[str]) -> list[str]:
    """One message per override whose key is neither a config group nor a field of `schema`,
    with the closest valid names."""
    out = []
    for key in _override_keys(args):
        if key.startswith(("hydra.", "hydra/")) or key in groups or "/" in key:
            continue
        cls: Optional[type] = schema
        path: list[str] = []
        for part in key.split("."):
            if cls is None:
                # below a free-form field (a dict or list): anything goes
                break
            names = [f.name for f in dataclasses.fields(cls)]
            if part not in names:
                choices = names if path else sorted(set(names) | groups)
                close = difflib.get_close_matches(part, choices, n=3, cutoff=0.6)
                where = ".".join(path) or "the top level"
                hint = ("; did you mean " + " or ".join(".".join([*path, c]) for c in close) + "?"
                        if close else f"; {where} has: {', '.join(sorted(choices))}")
                out.append(f"{key}: unknown key '{part}' in {where}{hint}")
                break
            path.append(part)
            cls = _dataclass_of(_field_type(cls, part))
    return out


def config_groups(conf_package: str = "longtrain_conf") -> set[str]:
    import importlib

    root = os.path.dirname(importlib.import_module(conf_package).__file__)
    return {name for name in os.listdir(root)
            if os.path.isdir(os.path.join(root, name)) and not name.startswith(("_", "."))
            and name != "hydra"}


@contextmanager
def nothing_written(args: list[str]) -> Iterator[list[str]]:
    """For `--check`: Hydra's run / sweep directories (and the sweep's multirun.yaml) go to a
    temporary directory removed afterwards, so checking writes nothing where the user is."""
    ours = ("hydra.run.dir=", "hydra.sweep.dir=", "hydra.sweep.subdir=", "hydra.output_subdir=")
    scratch = tempfile.mkdtemp(prefix="longtrain-check-")
    try:
        yield [*(a for a in args if not a.startswith(ours)),
               f"hydra.run.dir={scratch}", f"hydra.sweep.dir={scratch}",
               "hydra.output_subdir=null"]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


class AppRun:
    """Runs a Hydra app and maps its endings to the exit codes above: Hydra's composition
    errors (its exit 1 before the task started) become bad input, and a Ctrl-C outside a run
    ends with one line instead of a traceback. The task function calls `started()` first."""

    def __init__(self, prog: str) -> None:
        self.prog = prog
        # a plain flag (no lock): the app's module is pickled into Slurm jobs
        self.task_started = False

    def started(self) -> None:
        self.task_started = True

    def __call__(self, app: Callable[[], Any]) -> None:
        try:
            app()
        except KeyboardInterrupt:
            print(f"\n{self.prog}: interrupted (Ctrl-C); the current step was not saved",
                  file=sys.stderr, flush=True)
            sys.exit(EXIT_INTERRUPTED)
        except SystemExit as exc:
            if exc.code == EXIT_FAILED and not self.task_started:
                # Hydra reported a bad override or config before anything ran
                sys.exit(EXIT_BAD_INPUT)
            raise
