"""The box's streaming-read bandwidth: what decode, which reads every weight once a token, can at best reach.

A numba `prange` sum over a buffer far larger than the caches (4 GB by default), 1 thread and all of them, best
of several passes. Decode's GB/s (weight bytes a token x tok/s) over this is the share of the ceiling it uses.

    python bench/bench_bandwidth.py [--gb 4] [--passes 5]
"""

from __future__ import annotations

import argparse
import time

import numba
import numpy as np


@numba.njit(parallel=True, cache=True)
def _sum(a: np.ndarray) -> int:
    total = 0
    for i in numba.prange(a.shape[0]):
        total += a[i]
    return total


def read_gbs(buf: np.ndarray, threads: int, passes: int) -> float:
    numba.set_num_threads(threads)
    _sum(buf[:1024])
    best = np.inf
    for _ in range(passes):
        t = time.perf_counter()
        _sum(buf)
        best = min(best, time.perf_counter() - t)
    return buf.nbytes / best / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gb", type=float, default=4.0, help="buffer size in GB (default 4)")
    p.add_argument("--passes", type=int, default=5)
    args = p.parse_args()
    buf = np.ones(int(args.gb * 1e9) // 8, np.int64)
    for threads in sorted({1, numba.config.NUMBA_NUM_THREADS}):
        print(f"streaming read, {threads} thread(s): {read_gbs(buf, threads, args.passes):.1f} GB/s")


if __name__ == "__main__":
    main()
