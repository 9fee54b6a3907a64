"""The W&B adapter (the only module that imports wandb): config, per-step metrics, final
results (images, tables), summary.

Secrets never reach W&B: config values whose key looks like a credential are redacted.
"""

from __future__ import annotations

import os
import re
import secrets
import string
from typing import Any, Optional

from longtrain.config.schema import WandbConfig
from longtrain.observability.log import get_logger

_SECRET_KEY = re.compile(r"(api[_-]?key|token|secret|password|passwd|credential)", re.I)
REDACTED = "***redacted***"
# under output_dir: the run id every restart, resume and requeue of the run logs to
RUN_ID_FILE = "wandb_run_id"


def _read_run_id(path: str) -> Optional[str]:
    try:
        with open(path, encoding="utf-8") as f:
            value = f.read().strip()
    except FileNotFoundError:
        return None
    return value or None


def redact(value: Any) -> Any:
    """Copy of a nested dict/list with credential-like keys' values replaced."""
    if isinstance(value, dict):
        return {k: (REDACTED if _SECRET_KEY.search(str(k)) and v is not None else redact(v))
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    return value


class WandbRun:
    """One W&B run for the whole job, owned by the driver."""

    def __init__(self, cfg: WandbConfig, *, config: dict[str, Any], output_dir: str) -> None:
        self.cfg = cfg
        self.run: Optional[Any] = None
        if cfg.mode == "disabled":
            return
        # W&B's own console banner would interleave with the progress bar; the driver prints
        # where the run went in its summary instead.
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        os.makedirs(output_dir, exist_ok=True)
        # One run per output directory: a resumed, restarted or requeued job continues it.
        id_file = os.path.join(output_dir, RUN_ID_FILE)
        run_id = _read_run_id(id_file)
        if run_id is None:
            run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits)
                             for _ in range(8))
            tmp = id_file + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(run_id + "\n")
            os.replace(tmp, id_file)
        self.run = wandb.init(
            project=cfg.project, entity=cfg.entity, name=cfg.name, group=cfg.group,
            tags=list(cfg.tags) or None, mode=cfg.mode, dir=output_dir, config=redact(config),
            id=run_id, resume="allow", settings=wandb.Settings(quiet=True, console="off"),
        )

    @property
    def directory(self) -> Optional[str]:
        return None if self.run is None else os.path.dirname(self.run.dir)

    def log(self, metrics: dict[str, Any], *, step: int) -> None:
        if self.run is not None:
            self.run.log({f"train/{k}": v for k, v in metrics.items() if k != "step"}, step=step)

    def log_results(self, metrics: dict[str, Any], *, images: Optional[dict[str, str]] = None,
                    tables: Optional[dict[str, tuple[list[str], list[list[Any]]]]] = None) -> None:
        """One record of final results: metrics under their own keys (no `train/` prefix),
        PNG files as images and (columns, rows) as tables."""
        if self.run is None:
            return
        import wandb

        record: dict[str, Any] = dict(metrics)
        record.update({k: wandb.Image(path) for k, path in (images or {}).items()})
        record.update({k: wandb.Table(columns=list(cols), data=[list(r) for r in rows])
                       for k, (cols, rows) in (tables or {}).items()})
        self.run.log(record)

    @property
    def run_id(self) -> Optional[str]:
        return None if self.run is None else self.run.id

    def alert(self, title: str, text: str) -> None:
        """A W&B alert (online runs notify; offline ones record it); never fails the run."""
        if self.run is None:
            return
        try:
            self.run.alert(title=title, text=text)
        except Exception as exc:  # alerts are best effort: a failed one must not end training
            get_logger().warning("W&B alert %r not sent: %s", title, exc)

    def finish(self, summary: dict[str, Any], *, exit_code: int = 0,
               preempted: bool = False) -> None:
        if self.run is None:
            return
        for key, value in summary.items():
            self.run.summary[key] = value
        if preempted:
            # marks the run preempted so a requeued job's resume is expected, not an error
            self.run.mark_preempting()
        self.run.finish(exit_code=exit_code)
        get_logger().info("W&B %s run written to %s", self.cfg.mode, self.directory)
