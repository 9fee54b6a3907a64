"""The directory an export is written to: which of its files the export owns, when it may
write there, and how the finished files are moved in.

The rule is transformers' `save_pretrained` convention plus a guard. An export owns
config.json, generation_config.json, the weights (`model.safetensors`, or numbered shards and
`model.safetensors.index.json`) and the tokenizer files it carries; nothing else in the
directory is ever touched. A directory that is not empty and not an earlier longtrain export
(recognised by its marker file) is refused unless the caller passes `overwrite`, and even then
only the files an export owns are replaced.

Files are written in a hidden staging directory beside the target. A new target is that
directory renamed into place (atomic); into an existing one the files are moved one at a time,
config.json last, so an interrupted export leaves at worst a mix of old and new export files,
recorded in the marker so the next export removes them; the user's files are never involved.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Optional

__all__ = ["MARKER_NAME", "commit_export_dir", "export_dir_problems", "make_staging_dir"]

# Hidden, so a tokenizer fingerprint of the directory (which skips dot files) ignores it.
MARKER_NAME = ".longtrain-export.json"
_MARKER_KIND = "longtrain-hf-export"
# Weight files `save_pretrained` owns: a stale one would be loaded instead of (or mixed with)
# the new weights, so an export removes those it did not write this time.
_WEIGHT_FILE = re.compile(r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?")
# What the exporter wrote before it had a marker: only these names, and a config.json with
# both dtype keys and null token ids (transformers writes one dtype key and real ids).
_LEGACY_NAMES = re.compile(r"config\.json|model(-\d+-of-\d+)?\.safetensors(\.index\.json)?")


def _read_marker(out_dir: str) -> Optional[set[str]]:
    """The files an earlier export recorded as its own, or None if there is no valid marker."""
    try:
        with open(os.path.join(out_dir, MARKER_NAME), encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("kind") != _MARKER_KIND:
        return None
    files = data.get("files")
    if not isinstance(files, list) or not all(isinstance(n, str) and os.sep not in n
                                              for n in files):
        return None
    return set(files)


def _legacy_export_files(out_dir: str, entries: list[str]) -> Optional[set[str]]:
    if "config.json" not in entries or not all(_LEGACY_NAMES.fullmatch(n) for n in entries):
        return None
    try:
        with open(os.path.join(out_dir, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    ours = (isinstance(config, dict) and "dtype" in config and "torch_dtype" in config
            and config.get("bos_token_id", 0) is None and config.get("eos_token_id", 0) is None)
    return set(entries) if ours else None


def _earlier_export_files(out_dir: str) -> Optional[set[str]]:
    """The files of an earlier longtrain export at `out_dir`; None if it is not one."""
    found = _read_marker(out_dir)
    if found is not None:
        return found
    return _legacy_export_files(out_dir, sorted(os.listdir(out_dir)))


def _describe(entries: list[str]) -> str:
    shown = ", ".join(entries[:5])
    return shown + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")


def export_dir_problems(out_dir: str, *, overwrite: bool = False, field: str = "out") -> list[str]:
    """What stops an export to `out_dir`, as messages naming `field` (nothing is written)."""
    if not os.path.lexists(out_dir):
        return []
    if not os.path.isdir(out_dir):
        return [f"{field}={out_dir!r} exists and is not a directory"]
    entries = sorted(os.listdir(out_dir))
    if not entries or overwrite or _earlier_export_files(out_dir) is not None:
        return []
    return [f"{field}={out_dir!r} is not empty and is not an earlier longtrain export (it holds "
            f"{_describe(entries)}); choose another directory, or pass overwrite=true to "
            f"replace only the files an export owns (config.json, generation_config.json, "
            f"model*.safetensors and its index, tokenizer files) and keep every other file"]


def make_staging_dir(out_dir: str, *, overwrite: bool = False, field: str = "out") -> str:
    """A fresh hidden sibling of `out_dir` (the final renames stay on one filesystem), after
    checking that the export may write to `out_dir` (ValueError naming it if not)."""
    found = export_dir_problems(out_dir, overwrite=overwrite, field=field)
    if found:
        raise ValueError(found[0])
    parent, base = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)


def _write_marker(directory: str, files: set[str]) -> None:
    tmp = os.path.join(directory, MARKER_NAME + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"kind": _MARKER_KIND, "files": sorted(files)}, f, indent=2)
        f.write("\n")
    os.replace(tmp, os.path.join(directory, MARKER_NAME))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def commit_export_dir(staging: str, out_dir: str, *, overwrite: bool = False,
                      field: str = "out") -> None:
    """Move the complete export in `staging` to `out_dir` (see the module docstring).

    The files become readable by everyone the umask allows (safetensors and mkdtemp create
    private files); `staging` is gone afterwards unless an error is raised.
    """
    mask = _umask()
    new = set(os.listdir(staging))
    for name in new:
        os.chmod(os.path.join(staging, name), 0o666 & ~mask)
    os.chmod(staging, 0o777 & ~mask)
    # Checked again: the directory may have changed while the weights were written.
    found = export_dir_problems(out_dir, overwrite=overwrite, field=field)
    if found:
        raise ValueError(found[0])
    if not os.path.lexists(out_dir):
        _write_marker(staging, new)
        os.rename(staging, out_dir)
        return
    earlier = _earlier_export_files(out_dir) or set()
    stale = {name for name in os.listdir(out_dir)
             if name in earlier or _WEIGHT_FILE.fullmatch(name)} - new - {MARKER_NAME}
    # Recorded first: if the moves below are interrupted, the next export knows every file
    # that may be ours and removes what it does not write again.
    _write_marker(out_dir, earlier | new | stale)
    # config.json last: until it is replaced the directory still describes its old weights.
    for name in sorted(new, key=lambda n: n == "config.json"):
        os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
    for name in sorted(stale):
        path = os.path.join(out_dir, name)
        if os.path.isfile(path) or os.path.islink(path):
            os.remove(path)
    _write_marker(out_dir, new)
    shutil.rmtree(staging, ignore_errors=True)

