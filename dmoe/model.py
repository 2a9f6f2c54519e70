"""The Qwen3-MoE layer over one rank's shard: attention block and MoE block, with every sync point
a visible `comm` call. The math, per layer (x is identical on every rank):

    h = rmsnorm(x);  q, k, v = h @ Wqkv[my heads];  q, k = rope(norm(q)), rope(norm(k))
    o_partial = attention(q, cache) @ Wo[:, my heads];  allreduce(o_partial);  x += o
    h = rmsnorm(x);  root: ids, w = topk(softmax(h @ Wrouter));  bcast(ids, w)
    y_partial = sum over my experts e in ids: w_e * down_e(silu(gate_e h) * up_e h);  allreduce(y);  x += y

Shapes: T tokens, d hidden, H/Hkv this rank's query/KV heads, D head_dim, S max sequence, E experts, k top-k.
"""

from __future__ import annotations

import numpy as np

from dmoe import attention, ops
from dmoe.comm import LocalComm, MPIComm
from dmoe.config import ModelConfig
from dmoe.kernels import moe_forward
from dmoe.plan import RankShard
from dmoe.weights import LayerWeights


class RunState:
    """Every buffer one forward step needs, allocated once for up to `capacity` tokens and reused."""

    def __init__(self, cfg: ModelConfig, shard: RankShard, capacity: int, max_seq: int, threads: int,
                 widen_kv: bool = False) -> None:
        d, D, k = cfg.hidden_size, cfg.head_dim, cfg.num_experts_per_tok
        H, Hkv = shard.n_q_heads, shard.n_kv_heads
        self.capacity = capacity
        self.x = np.zeros((capacity, d), np.float32)  # [T, d] residual stream
        self.h = np.zeros((capacity, d), np.float32)  # [T, d] normalised input of a block
        self.qkv = np.zeros((capacity, (H + 2 * Hkv) * D), np.float32)  # [T, (H + 2 Hkv) D]
        # queries and keys apart from qkv, contiguous: attend's loops over a strided slice of qkv do not
        # vectorise (4x slower), and numba would compile the kernels twice (a strided slice of a one-row
        # array is contiguous to numpy: decode and prefill would type them differently)
        self.q = np.zeros((capacity, H * D), np.float32)  # [T, H D]
        self.k = np.zeros((capacity, Hkv * D), np.float32)  # [T, Hkv D]
        self.attn = np.zeros((capacity, H * D), np.float32)  # [T, H D]
        self.o = np.zeros((capacity, d), np.float32)  # [T, d] partial attention output, then summed
        self.router_logits = np.zeros((capacity, cfg.num_experts), np.float32)  # [T, E] (root)
        self.routing = np.zeros((capacity, 2 * k), np.float32)  # [T, 2k]: ids (int32 bits) | weights, as sent
        self.ids = np.zeros((capacity, k), np.int32)  # [T, k] the router's choices, contiguous (as q and k)
        self.weights = np.zeros((capacity, k), np.float32)  # [T, k] their weights
        self.local_ids = np.zeros((capacity, k), np.int32)  # [T, k] index into this rank's experts, -1: not here
        self.y = np.zeros((capacity, d), np.float32)  # [T, d] partial MoE output, then summed
        group = cfg.num_attention_heads // cfg.num_key_value_heads
        q0 = shard.q_heads[0]
        self.heads = np.array([[max(q0, kv * group) - q0, min(shard.q_heads[1], (kv + 1) * group) - q0]
                               for kv in range(*shard.kv_heads)], np.int32).reshape(-1, 2)  # [Hkv, 2] query heads
        self.scores = np.zeros((threads, group, max_seq), np.float32)  # attention scratch per thread [G, S]
        self.bits = np.zeros((threads, D), np.uint32)  # a widened f16 cache row per thread
        # An f16 cache widened once per layer for a prefill (T > 1), which reads every row T times
        self.kv_f32 = np.zeros(2 * Hkv * max_seq * D if widen_kv else 0, np.float32)


class Layer:
    """One decoder layer of one rank: its weights and its part of the KV cache."""

    def __init__(self, cfg: ModelConfig, shard: RankShard, w: LayerWeights, k_cache: np.ndarray,
                 v_cache: np.ndarray) -> None:
        self.cfg, self.shard, self.w = cfg, shard, w
        self.k_cache, self.v_cache = k_cache, v_cache  # [Hkv, S, D] f32, or f16 bits in uint16
        self.expert_offset = shard.experts[0]
        self.n_local_experts = shard.experts[1] - shard.experts[0]

    def attention(self, st: RunState, T: int, pos: int, rope: tuple[np.ndarray, np.ndarray],
                  comm: LocalComm | MPIComm) -> None:
        cfg, w = self.cfg, self.w
        x, h, o = st.x[:T], st.h[:T], st.o[:T]
        ops.rmsnorm(x, w.attn_norm, cfg.rms_norm_eps, h)
        if w.qkv is not None:
            H, Hkv, D = self.shard.n_q_heads, self.shard.n_kv_heads, cfg.head_dim
            qkv, q, k = st.qkv[:T], st.q[:T], st.k[:T]
            w.qkv.matmul(h, qkv)
            q[:], k[:], v = qkv[:, :H * D], qkv[:, H * D:(H + Hkv) * D], qkv[:, (H + Hkv) * D:]
            cos, sin = rope
            ops.qk_norm_rope(q, H, w.q_norm, cfg.rms_norm_eps, cos, sin, pos)
            ops.qk_norm_rope(k, Hkv, w.k_norm, cfg.rms_norm_eps, cos, sin, pos)
            attention.store_kv(k, v, self.k_cache, self.v_cache, pos)
            k_cache, v_cache = self.k_cache, self.v_cache
            if T > 1 and k_cache.dtype == np.uint16:
                k_cache, v_cache = attention.widen(k_cache, v_cache, pos + T, st.kv_f32)
            attention.attend(q, st.heads, k_cache, v_cache, pos, st.scores, st.bits, st.attn[:T])
            w.o.matmul(st.attn[:T], o)
        else:
            o[:] = 0.0
        comm.allreduce_sum(o)
        x += o

    def moe(self, st: RunState, T: int, comm: LocalComm | MPIComm) -> None:
        cfg, w = self.cfg, self.w
        x, h, y = st.x[:T], st.h[:T], st.y[:T]
        k = cfg.num_experts_per_tok
        ops.rmsnorm(x, w.ffn_norm, cfg.rms_norm_eps, h)
        routing, ids, weights = st.routing[:T], st.ids[:T], st.weights[:T]
        if w.router is not None:
            w.router.matmul(h, st.router_logits[:T])
            ops.route(st.router_logits[:T], k, cfg.norm_topk_prob, ids, weights)
            routing[:, :k], routing[:, k:] = ids.view(np.float32), weights
        comm.bcast(routing)
        if w.router is None:  # the other ranks unpack the root's choices
            ids[:], weights[:] = routing[:, :k].view(np.int32), routing[:, k:]
        local = st.local_ids[:T]
        ops.local_expert_ids(ids, self.expert_offset, self.n_local_experts, local)
        if w.gate is not None:
            moe_forward(w.gate, w.up, w.down, h, local, weights, y)
        else:
            y[:] = 0.0
        comm.allreduce_sum(y)
        x += y
