"""longtrain: distributed long-context training (see README.md and docs/)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("longtrain")
except PackageNotFoundError:
    # a source tree that was never installed
    __version__ = "0+unknown"
