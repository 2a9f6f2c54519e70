"""numba's on-disk cache checks only the file that defines a jitted function, but our drivers compile in code
(intrinsics, overloads) from sibling files: after one of those changes, a stale machine-code cache would run
the old code. `drop_stale` flushes a driver's cache when any of its sources is newer than the cache's index."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

__all__ = ["drop_stale"]


def drop_stale(drivers: Iterable[object], sources: Iterable[Path]) -> None:
    newest = max(p.stat().st_mtime for p in sources)
    for driver in drivers:
        index = Path(getattr(driver._cache._cache_file, "_index_path", ""))  # type: ignore[attr-defined]  # numba internals
        if index.is_file() and index.stat().st_mtime < newest:
            driver._cache.flush()  # type: ignore[attr-defined]
