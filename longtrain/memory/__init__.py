"""Memory policies: what the forward keeps for the backward (see storage.py, recompute.py,
functions.py) and the activation-memory model that chooses among them (planner.py)."""

from longtrain.memory.storage import ActivationStore, StoreStats, null_store, store_for

__all__ = ["ActivationStore", "StoreStats", "null_store", "store_for"]
