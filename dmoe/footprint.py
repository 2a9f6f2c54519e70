"""What each rank holds in memory: its packed weights, its KV cache and its step buffers, computed from a
config, the ggml type of every tensor and the ShardPlan the engine loads by, without the file or any
weights, so that a cluster can be sized before a model is downloaded (`launch.py plan`).

Counted: the packed arrays a rank's kernels read (the layouts of kernels.py, padding included), the
norms, the KV cache, and the buffers of a decode step and of one prefill of `prompt_len` tokens (model.py's
RunState). Not counted: the token embedding (rank 0 reads the rows it needs from the mapped file, a few
pages), Python, numba and MPI themselves (about 0.4 GB a rank), and the page cache.

The engine checks its KV cache against the host before it allocates one (`fit_slots`): numpy reserves it lazily,
so a cache too large for the host would start, fill as requests come, and get the ranks killed mid-serving.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as QT

from dmoe import attention
from dmoe.config import ModelConfig
from dmoe.kernels import ExpertWeights, layout_runs, packed_format
from dmoe.model import DECODE_CAPACITY, RunState
from dmoe.plan import RankShard, ShardPlan, parse_shares
from dmoe.weights import sliced_type

DEFAULT_SLOTS = 4  # KV cache slots when --parallel is not given: as many as fit each host, up to this many
RUNTIME_BYTES = 400_000_000  # a rank's Python, numba and MPI, beside what RankFootprint counts


@dataclass(frozen=True)
class RankFootprint:
    rank: int
    weights: int  # bytes
    kv_cache: int
    buffers: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.buffers


def _packed(n: int, rows: int, cols: int, qtypes: list[QT], col0: int = 0) -> int:
    shape, dtype = ExpertWeights.layout(n, rows, cols, packed_format(qtypes), col0)
    return int(np.prod(shape)) * dtype.itemsize


def weight_bytes(cfg: ModelConfig, types: dict[str, QT], shard: RankShard) -> int:
    """The bytes of one rank's packed weights, as weights.load_weights packs them."""
    d, D = cfg.hidden_size, cfg.head_dim
    (qa, qb), (ka, kb) = shard.q_heads, shard.kv_heads
    (e0, e1), (f0, f1) = shard.experts, shard.ffn
    total = 4 * (2 * d + 2 * D) * cfg.num_hidden_layers + 4 * d  # the norms, as f32
    for i in range(cfg.num_hidden_layers):
        b = f"blk.{i}."
        if qb > qa:
            rows = [(qb - qa) * D, (kb - ka) * D, (kb - ka) * D]
            qkv = [types[b + n] for n in ("attn_q.weight", "attn_k.weight", "attn_v.weight")]
            total += sum(_packed(1, sum(rows[i:j]), d, qkv[i:j]) for i, j in layout_runs(qkv))
            qt, c0 = sliced_type(types[b + "attn_output.weight"], qa * D, qb * D)
            total += _packed(1, d, (qb - qa) * D, [qt], c0)
        if shard.routes:
            total += _packed(1, cfg.num_experts, d, [types[b + "ffn_gate_inp.weight"]])
        if e1 > e0 and f1 > f0:
            total += 2 * _packed(e1 - e0, f1 - f0, d, [types[b + "ffn_gate_exps.weight"]])
            qt, c0 = sliced_type(types[b + "ffn_down_exps.weight"], f0, f1)
            total += _packed(e1 - e0, d, f1 - f0, [qt], c0)
    v0, v1 = shard.vocab
    if v1 > v0:
        total += _packed(1, v1 - v0, d, [types["token_embd.weight" if cfg.tie_word_embeddings else "output.weight"]])
    return total


def footprint(cfg: ModelConfig, types: dict[str, QT], plan: ShardPlan, max_seq_len: int, kv_type: str = "f16",
              prompt_len: int = 512, threads: int = 1, parallel: int = 1) -> list[RankFootprint]:
    """Every rank's footprint under `plan`, with a KV cache of `parallel` slots of max_seq_len tokens."""
    out = []
    seq = min(max_seq_len, cfg.max_position_embeddings)
    for shard in plan.shards:
        layout = attention.kv_layout((cfg.num_hidden_layers, parallel), shard.n_kv_heads, seq, cfg.head_dim,
                                     attention.KV_TYPES[kv_type])
        kv = sum(int(np.prod(shape)) * kind.itemsize for shape, kind in layout)
        states = [RunState(cfg, shard, capacity, seq, threads)  # sized, never touched
                  for capacity in (DECODE_CAPACITY, max(DECODE_CAPACITY, prompt_len))]
        buffers = sum(a.nbytes for st in states for a in vars(st).values() if isinstance(a, np.ndarray))
        out.append(RankFootprint(shard.rank, weight_bytes(cfg, types, shard), kv, buffers))
    return out


def report(cfg: ModelConfig, types: dict[str, QT], what: str, ranks: list[int], moe_split: str, max_seq_len: int,
           kv_type: str, prompt_len: int, threads: int, parallel: int = 1, output: str = "split",
           shares: str | None = None, routing: str = "root") -> str:
    """The `launch.py plan` table: per rank of each world size, GB of weights, KV cache, buffers and in all."""
    gb = 1e9
    slots = f"{parallel} slots of " if parallel > 1 else ""
    lines = [f"{what}: {cfg.num_hidden_layers} layers, {cfg.num_experts} experts; KV cache {kv_type} for {slots}"
             f"{min(max_seq_len, cfg.max_position_embeddings)} tokens; buffers for a {prompt_len}-token prefill, "
             f"{threads} thread(s)",
             f"{'ranks':>5} {'rank':>4} {'weights GB':>10} {'KV GB':>7} {'buffers GB':>10} {'total GB':>8}"]
    for n in ranks:
        plan = ShardPlan.make(cfg, n, moe_split, output, parse_shares(shares, n) if shares else None, routing)
        rows = footprint(cfg, types, plan, max_seq_len, kv_type, prompt_len, threads, parallel)
        for r in rows:
            lines.append(f"{n:>5} {r.rank:>4} {r.weights / gb:>10.2f} {r.kv_cache / gb:>7.2f} {r.buffers / gb:>10.2f} "
                         f"{r.total / gb:>8.2f}")
        lines.append(f"{n:>5} {'all':>4} {sum(r.weights for r in rows) / gb:>10.2f} "
                     f"{sum(r.kv_cache for r in rows) / gb:>7.2f} {sum(r.buffers for r in rows) / gb:>10.2f} "
                     f"{sum(r.total for r in rows) / gb:>8.2f}")
    lines.append("Not counted: about 0.4 GB a rank of Python, numba and MPI; rank 0 also maps the token embedding.")
    return "\n".join(lines)


def host_memory() -> int:
    """This host's memory in bytes: its physical pages, or a container's cgroup (v2) limit where lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
    except OSError:
        return total
    return min(total, int(limit)) if limit.isdigit() else total


def fit_slots(comm: Any, fixed: int, slot: int, parallel: int | None, what: str) -> int:
    """The KV cache slots of `what` (e.g. "4,096 tokens (f16)") that every rank allocates: `parallel`, or for None
    as many as fit every host, up to DEFAULT_SLOTS. A rank needs `fixed` bytes (its weights) and `slot` bytes a
    slot, besides RUNTIME_BYTES; the ranks on one host share its memory. A collective (every rank calls it, and
    all get the same answer or the same ValueError)."""
    hosts: dict[str, tuple[int, int, int]] = {}
    for host, memory, need, per_slot in comm.allgather_obj((comm.host, host_memory(), fixed + RUNTIME_BYTES, slot)):
        _, need0, slot0 = hosts.get(host, (memory, 0, 0))
        hosts[host] = (memory, need0 + need, slot0 + per_slot)
    room = {host: (memory - need) // per_slot if per_slot else (math.inf if need <= memory else 0)  # no KV heads
            for host, (memory, need, per_slot) in hosts.items()}
    host = min(room, key=room.__getitem__)
    slots = min(DEFAULT_SLOTS, room[host]) if parallel is None else parallel
    if slots < 1 or slots > room[host]:
        memory, need, per_slot = hosts[host]
        raise ValueError(f"{max(slots, 1)} KV cache slot(s) of {what} and the weights need "
                         f"{(need + max(slots, 1) * per_slot) / 1e9:.1f} GB on {host}, which has {memory / 1e9:.1f} GB "
                         f"({per_slot / 1e6:,.0f} MB a slot): lower --parallel or --max-seq-len, or use --kv-type q8")
    return slots
