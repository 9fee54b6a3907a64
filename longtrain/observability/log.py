"""The one rank-aware logger of the library: records carry `[rank N]` and go to stderr
(and to a per-rank file when one is configured)."""

from __future__ import annotations

import logging
import os
import sys

_NAME = "longtrain"


def get_logger() -> logging.Logger:
    return logging.getLogger(_NAME)


def configure_logging(*, rank: int | None = None, log_file: str | None = None,
                      level: int = logging.INFO, console: bool = True) -> logging.Logger:
    """Set the format and sinks of the library logger in this process (idempotent)."""
    logger = get_logger()
    logger.setLevel(level)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    prefix = f"[rank {rank}] " if rank is not None else ""
    fmt = logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(message)s", "%H:%M:%S")
    if console:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(fmt)
        logger.addHandler(stream)
    if log_file:
        os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
        file_handler = logging.FileHandler(log_file)
        file_handler.setFormatter(fmt)
        logger.addHandler(file_handler)
    return logger
