"""The install lists every package folder (the list is explicit because of the import-name
mapping of kernels/, launch/ and conf/), and config YAML ships with the package."""

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
    for top in ("longtrain", "kernels", "launch", "conf"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            if "__init__.py" in files and "__pycache__" not in dirpath:
                rel = os.path.relpath(dirpath, ROOT).split(os.sep)
                found.add(".".join([mapping.get(rel[0], rel[0]), *rel[1:]]))
    assert found == listed, f"missing from pyproject: {sorted(found - listed)}, " \
                            f"listed but absent: {sorted(listed - found)}"
    assert any("*.yaml" in p for p in tool["package-data"]["longtrain_conf"])
