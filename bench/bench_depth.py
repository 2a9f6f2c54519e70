"""Decode at the start against decode after D tokens of context, the two alternating in one process: this kind
of box drifts by more than the gap between them within minutes, so two separate `launch.py bench` runs (start,
then --depth) do not resolve it. For each --kv-type an engine (they share the mapped weights of the pack cache)
whose slot 0 holds a short prompt and slot 1 D tokens (filled once, untimed); each round decodes --steps greedy
tokens from each slot of each engine in turn, back to its own length. Prints each round's tok/s and ratio, and
the medians.

    python bench/bench_depth.py --model M [--depth 4096] [--kv-type f16 q8] [--rounds 5] [--steps 16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from dmoe.attention import KV_TYPES
from dmoe.engine import Engine
from dmoe.packcache import default_dir

_START = 64  # the short prompt's tokens
_FILL = 512  # tokens a step while filling the long slot


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--depth", type=int, default=4096)
    p.add_argument("--kv-type", nargs="+", choices=sorted(KV_TYPES), default=["f16"])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--nthreads", type=int)
    args = p.parse_args()
    engines: dict[str, Engine] = {}
    ids: list[int] = []
    for kv in args.kv_type:
        engines[kv] = engine = Engine.load(args.model, max_seq_len=args.depth + args.steps + 1, nthreads=args.nthreads,
                                           parallel=2, kv_type=kv, preload=True, pack_cache=default_dir())
        print(f"KV cache {kv}: {engine.kv_bytes / 2**20:.0f} MB for 2 slots", flush=True)
        if not ids:  # the same tokens for every engine
            rng = np.random.default_rng(0)
            ids = [int(t) for t in rng.integers(0, engine.config.vocab_size, args.depth + args.steps)]
        engine.forward(ids[:_START], slot=0)
        for s in range(0, args.depth, _FILL):
            engine.forward(ids[s:min(s + _FILL, args.depth)], slot=1)

    def decode(engine: Engine, slot: int, length: int) -> float:
        engine.truncate(length, slot)
        t = time.perf_counter()
        for i in range(args.steps):
            engine.forward(ids[length + i:length + i + 1], slot=slot)
        return args.steps / (time.perf_counter() - t)

    pairs: dict[str, list[tuple[float, float]]] = {kv: [] for kv in engines}
    for _ in range(args.rounds):
        for kv, engine in engines.items():
            start, deep = decode(engine, 0, _START), decode(engine, 1, args.depth)
            pairs[kv].append((start, deep))
            print(f"{kv}: start {start:.2f} tok/s, at {args.depth} {deep:.2f} tok/s: {100 * deep / start:.0f}%",
                  flush=True)
    for kv, rounds in pairs.items():
        starts, deeps = (statistics.median(x) for x in zip(*rounds, strict=True))
        ratio = statistics.median(100 * d / s for s, d in rounds)
        print(f"{kv} medians: start {starts:.2f}, at {args.depth} {deeps:.2f} tok/s; median ratio {ratio:.0f}%")


if __name__ == "__main__":
    main()
