"""Hydra config groups, installed as `longtrain_conf` (searched as pkg://longtrain_conf)."""
