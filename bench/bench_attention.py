"""Attention's decode kernel alone, on a model's shapes: one token against n cached positions (f16 cache),
milliseconds a layer (best of many runs: this kind of box is noisy) and GFLOP/s, at each depth.

    python bench/bench_attention.py [--config configs/qwen3-30b-a3b.json] [--depth 512,4096,16384]
"""

from __future__ import annotations

import argparse
import time

import numba
import numpy as np

from dmoe import attention
from dmoe.config import ModelConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/qwen3-30b-a3b.json")
    p.add_argument("--depth", type=lambda v: [int(x) for x in v.split(",")], default=[512, 4096, 16384])
    args = p.parse_args()
    cfg = ModelConfig.from_hf_file(args.config)
    Hkv, D = cfg.num_key_value_heads, cfg.head_dim
    G = cfg.num_attention_heads // Hkv
    threads = numba.get_num_threads()
    rng = np.random.default_rng(0)
    heads = np.array([[i * G, (i + 1) * G] for i in range(Hkv)], np.int32)
    q = rng.standard_normal((1, Hkv * G * D)).astype(np.float32)
    out = np.zeros_like(q)
    print(f"{cfg.num_attention_heads} query heads, {Hkv} KV heads of {D}; {threads} thread(s)")
    for n in args.depth:
        k, v = (rng.standard_normal((1, Hkv, n, D)).astype(np.float16).view(np.uint16) for _ in range(2))
        width = attention.scratch_width(G)
        scores, norms = np.zeros((threads, n, width), np.float32), np.zeros((threads, width), np.float32)
        call = (q, heads, k, v, np.zeros(1, np.int64), np.array([n - 1]), scores, norms, out)
        attention.attend(*call)
        best = np.inf
        for _ in range(max(15, 100_000 // n)):
            t = time.perf_counter()
            attention.attend(*call)
            best = min(best, time.perf_counter() - t)
        flops = 4 * Hkv * G * n * D
        print(f"depth {n}: {best * 1e3:.3f} ms a layer, {flops / best / 1e9:.1f} GFLOP/s, "
              f"{2 * k.nbytes / best / 1e9:.1f} GB/s of cache")


if __name__ == "__main__":
    main()
