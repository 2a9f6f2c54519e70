"""How evenly the MoE work falls on ranks: records the router's choices while decoding a synthetic model
and counts, for each decoded token and layer, the experts each rank would run under `--moe-split experts`
(whole experts per rank); reports the busiest rank's count over the mean (k / N). Under `ffn` every rank
runs 1/N of every chosen expert, a ratio of exactly 1.

    python bench/bench_balance.py models/synth-30b-a3b-q40.m --tokens 64
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from dmoe.engine import Engine
from dmoe.model import Layer
from dmoe.plan import even_ranges


def record_routing(path: str, n_tokens: int) -> tuple[np.ndarray, int]:
    """ids [tokens, layers, k] chosen while greedily decoding n_tokens after a short prompt; experts in all."""
    seen: list[np.ndarray] = []
    moe = Layer.moe

    def recording_moe(self, st, T, comm):  # type: ignore[no-untyped-def]
        moe(self, st, T, comm)
        seen.append(st.routing[:T, :self.cfg.num_experts_per_tok].view(np.int32).copy())

    Layer.moe = recording_moe  # type: ignore[method-assign]
    engine = Engine.load(path, max_seq_len=n_tokens + 16, nthreads=None)
    layers = engine.config.num_hidden_layers
    logits = engine.forward([1, 2, 3, 4])
    seen.clear()
    for _ in range(n_tokens):
        logits = engine.forward([int(logits[-1].argmax())])
    ids = np.stack([np.concatenate(seen[i * layers:(i + 1) * layers]) for i in range(n_tokens)])
    return ids, engine.config.num_experts


def imbalance(ids: np.ndarray, n_experts: int, world: int) -> dict[str, float]:
    owner = np.empty(n_experts, np.int64)
    for r, (a, b) in enumerate(even_ranges(n_experts, world)):
        owner[a:b] = r
    counts = np.stack([(owner[ids] == r).sum(-1) for r in range(world)], -1)  # [tokens, layers, world]
    k = ids.shape[-1]
    return {"busiest_over_mean": float((counts.max(-1) / (k / world)).mean()),
            "busiest_worst": float(counts.max() / (k / world))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--tokens", type=int, default=64)
    args = p.parse_args()
    ids, n_experts = record_routing(args.model, args.tokens)
    uniform = np.random.default_rng(0).random((ids.shape[0], ids.shape[1], n_experts)).argsort(-1)[..., :ids.shape[2]]
    report = {f"N={n}": {"model": imbalance(ids, n_experts, n), "uniform_routing": imbalance(uniform, n_experts, n)}
              for n in (2, 3, 4, 8)}
    json.dump(report, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
