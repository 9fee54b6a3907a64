"""The pinned dependency set (constraints.txt): write it from an environment, check it against
pyproject.toml.

    python .ci/constraints.py write [--out constraints.txt]   # pin what this interpreter has
    python .ci/constraints.py check                           # pins satisfy pyproject's ranges

`.ci/refresh-constraints` calls `write` in a fresh venv after the suite passed there; the test
suite calls `problems()` (tests/test_packaging.py).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import re
import sys
import tomllib

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONSTRAINTS = os.path.join(ROOT, "constraints.txt")
# torch: the README pins the CPU build and GPU users bring their CUDA build. The installer's own
# tools are not the project's dependencies.
UNPINNED = {"torch", "longtrain", "pip", "setuptools", "wheel"}
# pins apply on the interpreter they were tested with; elsewhere pyproject's ranges resolve
MARKER = 'python_version == "{major}.{minor}"'


def _pin_line(name: str, version: str) -> str:
    marker = MARKER.format(major=sys.version_info.major, minor=sys.version_info.minor)
    return f"{name}=={version} ; {marker}"


def installed() -> dict[str, str]:
    """Canonical name -> version of every distribution this interpreter sees, less UNPINNED."""
    out: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        if name not in UNPINNED:
            out[name] = dist.version
    return out


def render(pins: dict[str, str], *, torch_version: str) -> str:
    today = datetime.date.today().isoformat()
    head = [
        "# longtrain's tested dependency set: what `pip install -e \".[test]\"` resolved beside",
        f"# torch=={torch_version} on {platform.system()} {platform.machine()}, "
        f"CPython {platform.python_version()}, on {today}, and the suite passed with it.",
        "# Used by both README commands and .ci/run as `pip install -c constraints.txt ...`.",
        "# Refresh (newest versions the pyproject ranges allow, run the tests, rewrite this file):",
        "#     .ci/refresh-constraints",
        "# torch is not pinned here (the README pins the CPU build; GPU users bring their CUDA",
        "# build). The pins apply on the tested Python only; elsewhere pyproject's ranges resolve.",
    ]
    body = [_pin_line(name, pins[name]) for name in sorted(pins)]
    return "\n".join(head + body) + "\n"


def read(path: str = CONSTRAINTS) -> dict[str, Requirement]:
    out: dict[str, Requirement] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            req = Requirement(line)
            name = canonicalize_name(req.name)
            if name in out:
                raise ValueError(f"{path}:{number}: {req.name} is pinned twice")
            out[name] = req
    return out


def declared(pyproject: str = os.path.join(ROOT, "pyproject.toml")) -> list[Requirement]:
    """The direct dependencies, test extra included."""
    with open(pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    reqs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        reqs.extend(extra)
    return [Requirement(r) for r in reqs]


def _pinned_version(req: Requirement) -> Version | None:
    specs = list(req.specifier)
    if len(specs) == 1 and specs[0].operator == "==" and "*" not in specs[0].version:
        return Version(specs[0].version)
    return None


def problems(constraints: str = CONSTRAINTS,
             pyproject: str = os.path.join(ROOT, "pyproject.toml")) -> list[str]:
    """Every way the pinned set fails pyproject.toml: a direct dependency left unpinned, a pin
    outside its range, a pin that is not `==`, torch pinned."""
    pins = read(constraints)
    out: list[str] = []
    for name, req in pins.items():
        if name in UNPINNED:
            out.append(f"{req.name} is pinned, but it is left to the installer ({sorted(UNPINNED)})")
        if _pinned_version(req) is None:
            out.append(f"{req} is not an exact pin (==X.Y.Z)")
    env = default_environment()
    for dep in declared(pyproject):
        name = canonicalize_name(dep.name)
        if name in UNPINNED or (dep.marker is not None and not dep.marker.evaluate(env)):
            continue
        pin = pins.get(name)
        if pin is None:
            out.append(f"{dep.name} (pyproject: {dep}) is not pinned in {os.path.basename(constraints)}")
            continue
        version = _pinned_version(pin)
        if version is not None and not dep.specifier.contains(version, prereleases=True):
            out.append(f"{dep.name}=={version} is outside pyproject's range {dep.specifier}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    write = sub.add_parser("write", help="pin what this interpreter has installed")
    write.add_argument("--out", default=CONSTRAINTS)
    sub.add_parser("check", help="the pins satisfy pyproject.toml's ranges")
    args = parser.parse_args(argv)
    if args.cmd == "write":
        text = render(installed(), torch_version=importlib.metadata.version("torch"))
        tmp = args.out + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, args.out)
        bad = problems(args.out)
        print(f"wrote {args.out}: {len(read(args.out))} pins")
    else:
        bad = problems()
    for line in bad:
        print(f"  - {line}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
