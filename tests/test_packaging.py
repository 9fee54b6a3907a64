"""The install lists every package folder (the list is explicit because kernels/, launch/ and
conf/ hold their packages one level down), and config YAML ships with the package."""

from __future__ import annotations

import os
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_package_folder_is_installed():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        tool = tomllib.load(f)["tool"]["setuptools"]
    listed = set(tool["packages"])
    mapping = {folder: name for name, folder in tool["package-dir"].items()}
    found = set()
    for top in ("longtrain", *mapping):
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            if "__init__.py" in files and "__pycache__" not in dirpath:
                rel = os.path.relpath(dirpath, os.path.join(ROOT, top)).split(os.sep)
                name = mapping.get(top, top)
                found.add(".".join([name, *[p for p in rel if p != "."]]))
    assert found == listed, f"missing from pyproject: {sorted(found - listed)}, " \
                            f"listed but absent: {sorted(listed - found)}"
    assert any("*.yaml" in p for p in tool["package-data"]["longtrain_conf"])


# the project's own import names; every other top-level folder must import as nothing of ours
PROJECT_PACKAGES = {"longtrain", "longtrain_kernels", "longtrain_launch", "longtrain_conf"}


def _top_level_folders() -> list[str]:
    return sorted(name for name in os.listdir(ROOT)
                  if name.isidentifier() and os.path.isdir(os.path.join(ROOT, name)))


def test_no_top_level_folder_is_a_regular_package():
    """`python -m pytest` puts the repository root first on sys.path: a top-level folder with an
    __init__.py there would shadow any installed package of the same name."""
    packaged = [name for name in _top_level_folders()
                if name not in PROJECT_PACKAGES
                and os.path.isfile(os.path.join(ROOT, name, "__init__.py"))]
    assert packaged == [], f"top-level folders with an __init__.py (they shadow any installed " \
                           f"package of that name; put the package one level down): {packaged}"


_PROBE = r"""
import importlib.metadata, importlib.util, json, os, sys
root = os.path.realpath(sys.argv[1])
names = json.loads(sys.argv[2])
providers = {}
for dist in importlib.metadata.distributions():
    top = (dist.read_text("top_level.txt") or "").split()
    for name in top:
        providers.setdefault(name, set()).add(dist.metadata["Name"])
out = {}
for name in names:
    spec = importlib.util.find_spec(name)
    origin = spec.origin if spec is not None else None
    out[name] = {
        "origin": origin and os.path.realpath(origin),
        # our folder itself, not a virtual environment that happens to live in the checkout
        "in_repo": bool(origin) and os.path.realpath(origin).startswith(
            os.path.join(root, name) + os.sep),
        "providers": sorted(providers.get(name, ())),
    }
import transformers
transformers.LlamaConfig()
# the model classes import transformers.activations, which imports Hugging Face's `kernels`
from transformers import LlamaForCausalLM
out["_transformers"] = transformers.__version__
print(json.dumps(out))
"""


def test_repository_root_shadows_no_dependency():
    """From the repository root (the first sys.path entry of `python -m pytest` and `python -c`),
    every top-level folder name resolves to the installed package of that name or to nothing of
    ours, and transformers' model classes import (they import Hugging Face's `kernels`)."""
    import json
    import subprocess
    import sys

    names = [n for n in _top_level_folders() if n not in PROJECT_PACKAGES]
    proc = subprocess.run([sys.executable, "-c", _PROBE, ROOT, json.dumps(names)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    shadowing = {n: found[n]["origin"] for n in names if found[n]["in_repo"]}
    assert shadowing == {}, f"top-level folders importable from the repository root: {shadowing}"
    for name in names:
        if found[name]["providers"]:
            assert found[name]["origin"] is not None, \
                f"{name} is installed by {found[name]['providers']} but does not import from there"
    # the project's own import names belong to no other distribution
    taken = {n: found_by for n in PROJECT_PACKAGES
             if (found_by := _other_providers(n))}
    assert taken == {}, f"import names of ours also installed by: {taken}"


def _other_providers(name: str) -> list[str]:
    import importlib.metadata

    return sorted(d.metadata["Name"] for d in importlib.metadata.distributions()
                  if d.metadata["Name"] != "longtrain"
                  and name in (d.read_text("top_level.txt") or "").split())


def _constraints_tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("ci_constraints",
                                                  os.path.join(ROOT, ".ci", "constraints.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pinned_set_satisfies_pyproject_ranges():
    tool = _constraints_tool()
    assert tool.problems() == []
    pins = tool.read()
    # the set is complete: every direct dependency that applies here is pinned exactly
    assert {"transformers", "megatron-core", "deepspeed", "ray", "hydra-core", "pytest"} <= set(pins)
    assert "torch" not in pins


def test_constraints_check_catches_a_pin_outside_its_range(tmp_path):
    tool = _constraints_tool()
    good = open(tool.CONSTRAINTS, encoding="utf-8").read()
    cases = {
        "transformers==6.0.0": "outside pyproject's range",
        "transformers>=5": "not an exact pin",
        "": "transformers (pyproject",
    }
    for replacement, expected in cases.items():
        text = "\n".join(replacement if line.startswith("transformers==") else line
                         for line in good.splitlines())
        path = tmp_path / "constraints.txt"
        path.write_text(text + "\n")
        found = tool.problems(str(path))
        assert any(expected in p for p in found), (replacement, found)
    (tmp_path / "torch.txt").write_text(good + 'torch==2.13.0 ; python_version == "3.11"\n')
    assert any("left to the installer" in p for p in tool.problems(str(tmp_path / "torch.txt")))


def test_install_commands_use_the_pinned_set():
    """Both README commands and .ci/run install with the constraints file, and .ci/run runs
    exactly the README's test command."""
    import re

    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    commands = re.findall(r"^python -m venv .*$", readme, flags=re.M)
    assert len(commands) >= 2, commands
    for command in commands:
        assert "pip install -c constraints.txt -e " in command, command
    test_command = next(c for c in commands if c.endswith("python -m pytest -q"))
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    assert test_command in ci.splitlines()
