"""The W&B adapter (the only module that imports wandb): config, per-step metrics, final
results (images, tables), summary.

Where the run goes follows one order per setting: `logging.wandb.*` when set, else W&B's
environment variable (WANDB_MODE, WANDB_PROJECT, ...), else longtrain's default
(`resolve_settings`). Secrets never reach W&B: config values whose key names a credential
are redacted.
"""

from __future__ import annotations

import os
import re
import secrets
import string
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from longtrain.config.schema import WandbConfig
from longtrain.observability.log import get_logger

# A key is a credential when its last word names one (`hf_token`, `access_token`, `token`,
# `client_secret`, `password`) or its last two do (`api_key`, `aws_secret_access_key`);
# words, not substrings, so `tokenizer`, `max_tokens` and `token_budget` stay visible.
_SECRET_LAST = {"token", "secret", "password", "passwd", "pwd", "passphrase", "credential",
                "credentials", "apikey", "auth"}
_SECRET_LAST_TWO = {("api", "key"), ("secret", "key"), ("private", "key"), ("access", "key"),
                    ("auth", "key")}
_WORD = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")
REDACTED = "***redacted***"
# under output_dir: the run id every restart, resume and requeue of the run logs to
RUN_ID_FILE = "wandb_run_id"
# longtrain's defaults, used when neither the config nor W&B's environment says
DEFAULT_MODE = "offline"
DEFAULT_PROJECT = "longtrain"
MODES = ("online", "offline", "disabled")
# W&B's older names of its modes, still accepted in WANDB_MODE
_MODE_ALIASES = {"dryrun": "offline", "run": "online"}
# field of WandbConfig -> W&B's environment variable for it
ENV_VARS = {"mode": "WANDB_MODE", "project": "WANDB_PROJECT", "entity": "WANDB_ENTITY",
            "name": "WANDB_NAME", "group": "WANDB_RUN_GROUP", "tags": "WANDB_TAGS",
            "dir": "WANDB_DIR"}


@dataclass(frozen=True)
class WandbSettings:
    """The resolved W&B settings of a run; `sources[field]` says where each came from:
    "config", the environment variable's name, or "default"."""

    mode: str
    project: str
    entity: Optional[str]
    name: Optional[str]
    group: Optional[str]
    tags: tuple[str, ...]
    dir: str
    sources: dict[str, str]


def resolve_settings(cfg: WandbConfig, environ: Mapping[str, str], *, output_dir: str
                     ) -> WandbSettings:
    """Each setting from `cfg` when set (not None), else from W&B's environment variable in
    `environ` when set (non-empty), else longtrain's default (mode offline, project
    longtrain, files under `output_dir`, the rest left to W&B). Raises ValueError for a mode
    that is not one of MODES."""
    defaults: dict[str, Any] = {"mode": DEFAULT_MODE, "project": DEFAULT_PROJECT,
                                "entity": None, "name": None, "group": None, "tags": (),
                                "dir": output_dir}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for field_name, var in ENV_VARS.items():
        configured = getattr(cfg, field_name)
        from_env = environ.get(var, "").strip()
        if configured is not None:
            values[field_name], sources[field_name] = configured, "config"
        elif from_env:
            if field_name == "tags":
                value: Any = tuple(t.strip() for t in from_env.split(",") if t.strip())
            elif field_name == "mode":
                value = _MODE_ALIASES.get(from_env.lower(), from_env.lower())
            else:
                value = from_env
            values[field_name], sources[field_name] = value, var
        else:
            values[field_name], sources[field_name] = defaults[field_name], "default"
    values["tags"] = tuple(values["tags"])
    if values["mode"] not in MODES:
        where = ("logging.wandb.mode" if sources["mode"] == "config"
                 else f"the environment variable {sources['mode']}")
        raise ValueError(f"W&B mode {values['mode']!r} (from {where}) is not one of "
                         f"{list(MODES)}")
    return WandbSettings(**values, sources=sources)


def _read_run_id(path: str) -> Optional[str]:
    try:
        with open(path, encoding="utf-8") as f:
            value = f.read().strip()
    except FileNotFoundError:
        return None
    return value or None


def is_secret_key(key: str) -> bool:
    """True for a config key that names a credential (by its words: `_`, `-`, `.` and
    camelCase split them)."""
    words = [w.lower() for w in _WORD.findall(str(key))]
    return bool(words) and (words[-1] in _SECRET_LAST or tuple(words[-2:]) in _SECRET_LAST_TWO)


def redact(value: Any) -> Any:
    """Copy of a nested dict/list with credential keys' values replaced."""
    if isinstance(value, dict):
        return {k: (REDACTED if is_secret_key(k) and v is not None else redact(v))
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    return value


class WandbRun:
    """One W&B run for the whole job, owned by the driver."""

    def __init__(self, cfg: WandbConfig, *, config: dict[str, Any], output_dir: str,
                 environ: Optional[Mapping[str, str]] = None) -> None:
        """`environ`: W&B's environment variables (the entry point passes `os.environ`;
        None: none are consulted). See `resolve_settings` for the order."""
        self.settings = resolve_settings(cfg, environ or {}, output_dir=output_dir)
        self.run: Optional[Any] = None
        s = self.settings
        if s.mode == "disabled":
            return
        # W&B's own console banner would interleave with the progress bar; the driver prints
        # where the run went in its summary instead.
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        os.makedirs(output_dir, exist_ok=True)
        os.makedirs(s.dir, exist_ok=True)
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
            project=s.project, entity=s.entity, name=s.name, group=s.group,
            tags=list(s.tags) or None, mode=s.mode, dir=s.dir, config=redact(config),
            id=run_id, resume="allow", settings=wandb.Settings(quiet=True, console="off"),
        )

    @property
    def mode(self) -> str:
        return self.settings.mode

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
        import wandb

        # W&B's service writes an offline run's file after finish() returns (the file can still
        # be its 7-byte header); shutting the service down waits for it, so the run's files are
        # complete here, for `wandb sync` or a reader (a later run starts a new service)
        wandb.teardown(exit_code=exit_code)
        get_logger().info("W&B %s run written to %s", self.settings.mode, self.directory)
