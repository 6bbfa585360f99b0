"""Artifacts for devices: lowering, writing, loading back with the real runtime."""
from .executorch import Delegation, Lowered, delegation_of, lower, write_pte
from .runtime import PteModel, latency_ms, set_runtime_threads

__all__ = ["Delegation", "Lowered", "PteModel", "delegation_of", "latency_ms", "lower", "set_runtime_threads", "write_pte"]
