"""ShardPlan: which heads, experts and output rows each rank owns. A pure function of
(model config, number of ranks, options), so every rank computes the same plan by itself.

Attention: query heads are split evenly over ranks; a rank computes every KV head its query
heads read. When ranks outnumber KV heads (or do not divide them), neighbouring ranks each
compute a shared KV head themselves (a little redundant K/V work, no communication), so
any number of ranks works; a rank may own no heads at all when ranks outnumber query heads.

Uneven hosts: with `shares` (one number a rank), heads, experts or FFN slices and output rows are
split in proportion to them instead of evenly, and each rank's KV cache follows its heads.

MoE, two layouts (`moe_split`):
- "experts": each rank owns whole experts (a contiguous range). Under uniform routing the
  busiest rank of 4 runs ~1.7x the mean number of experts per decoded token.
- "ffn": every rank owns a slice of every expert's FFN dimension (gate/up rows, down columns),
  as distributed-llama does: every rank does exactly 1/N of the work of every token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

from dmoe.config import ModelConfig

MOE_SPLITS = ("ffn", "experts")
OUTPUTS = ("split", "root")  # where the output matrix runs
# who runs the router: rank 0, broadcasting its choices each layer, or every rank for itself (one message fewer a
# layer; sound because every rank holds the same x to the bit: see Model)
ROUTINGS = ("root", "every-rank")
FFN_UNIT = 32  # FFN slices are whole quantisation blocks, so down's column slices stay zero-copy


def share_ranges(n: int, shares: Sequence[Fraction], unit: int = 1) -> list[tuple[int, int]]:
    """Split range(n) into contiguous ranges of whole `unit`s in proportion to `shares` (largest remainders
    first, earlier ranges first on a tie: equal shares give sizes that differ by at most one unit, the extra
    ones first); the last range absorbs a remainder that is not a whole unit."""
    units, rem = divmod(n, unit)
    total = sum(shares)
    exact = [units * s / total for s in shares]
    counts = [math.floor(e) for e in exact]
    for p in sorted(range(len(shares)), key=lambda p: (counts[p] - exact[p], p))[:units - sum(counts)]:
        counts[p] += 1
    out, start = [], 0
    for p, c in enumerate(counts):
        size = c * unit + (rem if p == len(counts) - 1 else 0)
        out.append((start, start + size))
        start += size
    return out


def even_ranges(n: int, parts: int, unit: int = 1) -> list[tuple[int, int]]:
    """share_ranges with equal shares."""
    return share_ranges(n, [Fraction(1)] * parts, unit)


def parse_shares(text: str, world_size: int) -> tuple[Fraction, ...]:
    """--shares "3,1" (one positive number a rank) as exact fractions."""
    try:
        shares = tuple(Fraction(v.strip()) for v in text.split(","))
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"--shares must be positive numbers separated by commas, got {text!r}") from None
    if len(shares) != world_size or min(shares) <= 0:
        raise ValueError(f"--shares needs {world_size} positive numbers (one a rank), got {text!r}")
    return shares


@dataclass(frozen=True)
class RankShard:
    """One rank's share. Ranges are half-open [start, stop)."""

    rank: int
    q_heads: tuple[int, int]
    kv_heads: tuple[int, int]
    experts: tuple[int, int]  # whole experts owned (all of them under "ffn")
    ffn: tuple[int, int]  # slice of every owned expert's FFN dimension
    vocab: tuple[int, int]  # rows of the output matrix
    routes: bool  # runs the router

    @property
    def n_q_heads(self) -> int:
        return self.q_heads[1] - self.q_heads[0]

    @property
    def n_kv_heads(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]


@dataclass(frozen=True)
class ShardPlan:
    world_size: int
    moe_split: str
    routing: str  # one of ROUTINGS
    shards: tuple[RankShard, ...]

    def __getitem__(self, rank: int) -> RankShard:
        return self.shards[rank]

    @classmethod
    def make(cls, cfg: ModelConfig, world_size: int, moe_split: str = "ffn", output: str = "split",
             shares: Sequence[Fraction] | None = None, routing: str = "root") -> ShardPlan:
        """output: "split" gives each rank 1/N of the output matrix's rows (rank 0 gathers the logits: 4 bytes a
        vocabulary row a token), "root" all of them to rank 0 (no logits cross the network: for slow links).
        shares: each rank's part of the heads, experts (or FFN slices) and output rows, for hosts of unequal
        speed (see parse_shares); None: equal. routing: see ROUTINGS."""
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
        if world_size < 1:
            raise ValueError(f"world size must be >= 1, got {world_size}")
        if moe_split not in MOE_SPLITS:
            raise ValueError(f"moe_split must be one of {MOE_SPLITS}, got {moe_split!r}")
        shares = list(shares) if shares is not None else [Fraction(1)] * world_size
        if len(shares) != world_size or min(shares) <= 0:
            raise ValueError(f"shares must be {world_size} positive numbers, got {shares}")
        group = cfg.num_attention_heads // cfg.num_key_value_heads
        q_ranges = share_ranges(cfg.num_attention_heads, shares)
        ff = cfg.moe_intermediate_size
        unit = FFN_UNIT if ff % FFN_UNIT == 0 and ff // FFN_UNIT >= world_size else 1
        if moe_split == "ffn":
            expert_ranges = [(0, cfg.num_experts)] * world_size
            ffn_ranges = share_ranges(ff, shares, unit)
        else:
            expert_ranges = share_ranges(cfg.num_experts, shares)
            ffn_ranges = [(0, ff)] * world_size
        vocab_ranges = (share_ranges(cfg.vocab_size, shares) if output == "split"
                        else [(0, cfg.vocab_size)] + [(cfg.vocab_size, cfg.vocab_size)] * (world_size - 1))
        shards = []
        for r in range(world_size):
            qa, qb = q_ranges[r]
            kv = (qa // group, (qb - 1) // group + 1) if qb > qa else (0, 0)
            shards.append(RankShard(r, (qa, qb), kv, expert_ranges[r], ffn_ranges[r], vocab_ranges[r],
                                    r == 0 or routing == "every-rank"))
        return cls(world_size, moe_split, routing, tuple(shards))
