"""Attention's decode kernel alone, on a model's shapes: one token against n cached positions (f16 cache, or --kv-type),
milliseconds a layer (best of many runs: this kind of box is noisy) and GFLOP/s, at each depth: with one layer's
cache read again and again (it stays in the CPU's caches: the kernel's compute) and with every layer's cache
read in turn, as a decoded token reads them (from RAM, as in the model).

    python bench/bench_attention.py [--config configs/qwen3-30b-a3b.json] [--depth 512,4096,16384] [--kv-type q8]
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
    p.add_argument("--kv-type", choices=sorted(attention.KV_TYPES), default="f16")
    args = p.parse_args()
    cfg = ModelConfig.from_hf_file(args.config)
    Hkv, D = cfg.num_key_value_heads, cfg.head_dim
    G = cfg.num_attention_heads // Hkv
    threads = numba.get_num_threads()
    rng = np.random.default_rng(0)
    heads = np.array([[i * G, (i + 1) * G] for i in range(Hkv)], np.int32)
    q = rng.standard_normal((1, Hkv * G * D)).astype(np.float32)
    out = np.zeros_like(q)
    print(f"{cfg.num_attention_heads} query heads, {Hkv} KV heads of {D}; {args.kv_type} cache; {threads} thread(s)")
    layers = cfg.num_hidden_layers
    for n in args.depth:
        layout = attention.kv_layout((1,), Hkv, n, D, attention.KV_TYPES[args.kv_type])
        one = [np.zeros(shape, kind) for shape, kind in layout]
        k, v = rng.standard_normal((2, n, Hkv * D)).astype(np.float32)
        attention.store_kv(k, v, *one, np.zeros(n, np.int64), np.arange(n))
        caches = [np.empty((layers, *a.shape), a.dtype) for a in one]  # every layer's: the same values
        for c, a in zip(caches, one, strict=True):
            c[:] = a
        width = attention.scratch_width(G)
        scores = np.zeros((threads, width, attention.padded(n)), np.float32)
        norms = np.zeros((threads, width), np.float32)
        calls = [(q, heads, *(c[i] for c in caches), np.zeros(1, np.int64), np.array([n - 1]), scores, norms, out)
                 for i in range(layers)]
        hot, cold = best_of(calls[:1], 100_000 // n), best_of(calls, 2_000 // n)
        flops, nbytes = 4 * Hkv * G * n * D, sum(c[0].nbytes for c in caches)
        print(f"depth {n}: in cache {hot * 1e3:.3f} ms a layer ({flops / hot / 1e9:.1f} GFLOP/s); every layer's "
              f"cache from RAM {cold * 1e3:.3f} ms a layer ({nbytes / cold / 1e9:.1f} GB/s)")


def best_of(calls: list[tuple], repeats: int) -> float:
    """Seconds a call of attend over each argument tuple in turn takes: the shortest of max(15, repeats) timed
    passes over them all (after one untimed), divided by their number."""
    for call in calls:
        attention.attend(*call)
    best = np.inf
    for _ in range(max(15, repeats)):
        t = time.perf_counter()
        for call in calls:
            attention.attend(*call)
        best = min(best, time.perf_counter() - t)
    return best / len(calls)


if __name__ == "__main__":
    main()
