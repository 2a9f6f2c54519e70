"""dmoe: Qwen3 Mixture-of-Experts inference on CPUs, one process or many MPI ranks."""

from __future__ import annotations

from typing import Any

__all__ = ["Engine"]


def __getattr__(name: str) -> Any:
    """`from dmoe import Engine`, imported on first use (the engine pulls in numba and MPI)."""
    if name == "Engine":
        from dmoe.engine import Engine

        return Engine
    raise AttributeError(f"module 'dmoe' has no attribute {name!r}")
