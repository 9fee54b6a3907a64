"""Registers the typed schemas with Hydra's ConfigStore (the only Hydra import besides the apps)."""

from __future__ import annotations

from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from longtrain.config.eval_schema import EvalRunConfig
from longtrain.config.schema import RunConfig

SCHEMA_NAME = "longtrain_schema"
EVAL_SCHEMA_NAME = "longtrain_eval_schema"


def register_configs() -> None:
    store = ConfigStore.instance()
    store.store(name=SCHEMA_NAME, node=RunConfig)
    store.store(name=EVAL_SCHEMA_NAME, node=EvalRunConfig)


def _typed(dcfg: DictConfig, cls: type) -> Any:
    obj: Any = OmegaConf.to_object(dcfg)
    if not isinstance(obj, cls):
        raise TypeError(f"composed config is {type(obj).__name__}, expected {cls.__name__}")
    return obj


def to_run_config(dcfg: DictConfig) -> RunConfig:
    """Composed Hydra config -> the typed RunConfig the library uses (interpolations resolved)."""
    return _typed(dcfg, RunConfig)


def to_eval_config(dcfg: DictConfig) -> EvalRunConfig:
    """Composed `eval` config -> the typed EvalRunConfig (interpolations resolved)."""
    return _typed(dcfg, EvalRunConfig)
