"""Decode at the start against decode after D tokens of context, the two alternating in one process: this kind
of box drifts by more than the gap between them within minutes, so two separate `launch.py bench` runs (start,
then --depth) do not resolve it. Slot 0 holds a short prompt, slot 1 D tokens (filled once, untimed); each round
decodes --steps greedy tokens from each, back to its own length. Prints each round's tok/s and ratio, and the
medians.

    python bench/bench_depth.py --model M [--depth 4096] [--kv-type q8] [--rounds 5] [--steps 16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from dmoe.engine import KV_TYPES, Engine
from dmoe.packcache import default_dir

_START = 64  # the short prompt's tokens
_FILL = 512  # tokens a step while filling the long slot


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--depth", type=int, default=4096)
    p.add_argument("--kv-type", choices=sorted(KV_TYPES), default="f16")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--nthreads", type=int)
    args = p.parse_args()
    engine = Engine.load(args.model, max_seq_len=args.depth + args.steps + 1, nthreads=args.nthreads, parallel=2,
                         kv_type=args.kv_type, preload=True, pack_cache=default_dir())
    print(f"KV cache {args.kv_type}: {engine.kv_bytes / 2**20:.0f} MB for 2 slots")
    ids = [int(t) for t in np.random.default_rng(0).integers(0, engine.config.vocab_size, args.depth + args.steps)]
    engine.forward(ids[:_START], slot=0)
    for s in range(0, args.depth, _FILL):
        engine.forward(ids[s:min(s + _FILL, args.depth)], slot=1)

    def decode(slot: int, length: int) -> float:
        engine.truncate(length, slot)
        t = time.perf_counter()
        for i in range(args.steps):
            engine.forward(ids[length + i:length + i + 1], slot=slot)
        return args.steps / (time.perf_counter() - t)

    pairs = []
    for _ in range(args.rounds):
        start, deep = decode(0, _START), decode(1, args.depth)
        pairs.append((start, deep))
        print(f"start {start:.2f} tok/s, at {args.depth} {deep:.2f} tok/s: {100 * deep / start:.0f}%", flush=True)
    starts, deeps = (statistics.median(x) for x in zip(*pairs, strict=True))
    ratio = statistics.median(100 * d / s for s, d in pairs)
    print(f"medians: start {starts:.2f}, at {args.depth} {deeps:.2f} tok/s; median ratio {ratio:.0f}%")


if __name__ == "__main__":
    main()
