"""Registers the typed schema with Hydra's ConfigStore (the only Hydra import besides the app)."""

from __future__ import annotations

from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from longtrain.config.schema import RunConfig

SCHEMA_NAME = "longtrain_schema"


def register_configs() -> None:
    ConfigStore.instance().store(name=SCHEMA_NAME, node=RunConfig)


def to_run_config(dcfg: DictConfig) -> RunConfig:
    """Composed Hydra config -> the typed RunConfig the library uses (interpolations resolved)."""
    obj: Any = OmegaConf.to_object(dcfg)
    if not isinstance(obj, RunConfig):
        raise TypeError(f"composed config is {type(obj).__name__}, expected RunConfig")
    return obj
