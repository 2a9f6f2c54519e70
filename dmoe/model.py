"""The forward pass of one rank's shard of Qwen3-MoE over a batch of sequences: token embedding, the
layers (attention block, MoE block), final norm, output matrix and the gather of the logits, with every
sync point a visible `comm` call. The math, per layer (x is identical on every rank):

    h = rmsnorm(x);  q, k, v = h @ Wqkv[my heads];  q, k = rope(norm(q)), rope(norm(k))
    o_partial = attention(q, cache) @ Wo[:, my heads];  allreduce(o_partial);  x += o
    h = rmsnorm(x);  root: ids, w = topk(softmax(h @ Wrouter));  bcast(ids, w)
    y_partial = sum over my experts e in ids: w_e * down_e(silu(gate_e h) * up_e h);  allreduce(y);  x += y

x is identical on every rank to the bit (MPI's all-reduces give every rank the same sums, and the compact
wire types decode the same bytes everywhere), so with routing "every-rank" each rank makes the root's choices
itself and the broadcast goes.

A step's T tokens are the concatenated tokens of its sequences, each at its own KV cache slot and
positions: every matrix product, the MoE's grouping by expert and every collective take all T at once,
so B sequences decoding together read the weights once.

Shapes: T tokens, d hidden, H/Hkv this rank's query/KV heads, D head_dim, S max sequence, P sequence slots,
E experts, k top-k.
"""

from __future__ import annotations

import time

import numpy as np

from dmoe import attention, ops, quant
from dmoe.comm import LocalComm, MPIComm
from dmoe.config import ModelConfig
from dmoe.kernels import moe_forward
from dmoe.plan import RankShard, ShardPlan
from dmoe.weights import LayerWeights, ModelWeights

DECODE_CAPACITY = 8  # steps of up to this many tokens (a batch of decoding sequences) share one RunState
# The most tokens a step that several sequences share holds (the scheduler's budget). Longer steps, one long
# prompt on its own (launch.py, bench, chat), attend by tiles of tokens (attention.attend_tiles); the rest token by
# token. The kernels round differently, and this way what a served request computes never depends on which
# neighbours share its steps.
SHARED_STEP_TOKENS = 256


class Batch:
    """The sequences of one step: seqs int64 [n, 3] (cache slot, position of the first token, token count),
    ids [T] their tokens concatenated; logits for every token (all_logits) or each sequence's last."""

    def __init__(self, seqs: np.ndarray, ids: np.ndarray, all_logits: bool) -> None:
        self.seqs, self.ids, self.all_logits = seqs, ids.astype(np.int32), all_logits
        counts = seqs[:, 2]
        self.slots = np.repeat(seqs[:, 0], counts)  # [T] each token's slot
        self.positions = np.concatenate([np.arange(p, p + c) for _, p, c in seqs])  # a step has >= 1 (Engine.step)
        self.ends = np.cumsum(counts) - 1  # [n] each sequence's last token
        self.T = int(counts.sum())

    def logit_rows(self) -> np.ndarray:
        return np.arange(self.T) if self.all_logits else self.ends


class RunState:
    """Every buffer one forward step needs, allocated once for up to `capacity` tokens and reused."""

    def __init__(self, cfg: ModelConfig, shard: RankShard, capacity: int, max_seq: int, threads: int) -> None:
        d, D, k = cfg.hidden_size, cfg.head_dim, cfg.num_experts_per_tok
        H, Hkv = shard.n_q_heads, shard.n_kv_heads
        self.capacity = capacity
        self.x = np.zeros((capacity, d), np.float32)  # [T, d] residual stream
        self.h = np.zeros((capacity, d), np.float32)  # [T, d] normalised input of a block
        self.qkv = np.zeros((capacity, (H + 2 * Hkv) * D), np.float32)  # [T, (H + 2 Hkv) D]
        # queries and keys apart from qkv, contiguous: else numba would compile the norm/RoPE and attention
        # kernels twice (a strided slice of a one-row array is contiguous to numpy: decode and prefill would
        # type them differently)
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
        width = attention.scratch_width(group)
        self.scores = np.zeros((threads, width, attention.padded(max_seq)), np.float32)  # per thread [Gp, S]
        self.norms = np.zeros((threads, width), np.float32)  # each head's softmax normaliser, per thread
        # a long prompt's tiles (see SHARED_STEP_TOKENS): tokens a tile, and per thread the tile's scores, queries and
        # outputs (by head dimension) and cache rows widened to f32
        self.tile = attention.tile_tokens(group) if capacity > SHARED_STEP_TOKENS else 0
        if self.tile:
            lanes = attention.TILE_LANES
            self.tile_scores = attention.aligned_zeros((threads, max_seq, lanes))
            self.tile_norms = np.zeros((threads, lanes), np.float32)
            self.tile_q = attention.aligned_zeros((threads, D, lanes))
            self.tile_out = attention.aligned_zeros((threads, D, lanes))
            self.tile_rows = attention.aligned_zeros((threads, attention.TILE_ROWS * D))


class Layer:
    """One decoder layer of one rank: its weights and its part of the KV cache."""

    def __init__(self, cfg: ModelConfig, shard: RankShard, w: LayerWeights, caches: list[np.ndarray],
                 broadcast_routing: bool) -> None:
        self.cfg, self.shard, self.w = cfg, shard, w
        # keys, values (attention.cache_shapes: f32, f16 bits in uint16 or int8) and an int8 cache's scales
        self.caches = caches
        self.expert_offset = shard.experts[0]
        self.broadcast_routing = broadcast_routing  # the root's choices travel; else every rank routes
        self.n_local_experts = shard.experts[1] - shard.experts[0]

    def attention(self, st: RunState, batch: Batch, tiles: np.ndarray | None, rope: tuple[np.ndarray, np.ndarray],
                  comm: LocalComm | MPIComm) -> None:
        """The attention block; tiles: the step's tokens as attention.tiles_of gives them, for a long prompt."""
        cfg, w, T = self.cfg, self.w, batch.T
        x, h, o = st.x[:T], st.h[:T], st.o[:T]
        ops.rmsnorm(x, w.attn_norm, cfg.rms_norm_eps, h)
        if w.qkv is not None:
            H, Hkv, D = self.shard.n_q_heads, self.shard.n_kv_heads, cfg.head_dim
            qkv, q, k = st.qkv[:T], st.q[:T], st.k[:T]
            w.qkv.matmul(h, qkv)
            q[:], k[:], v = qkv[:, :H * D], qkv[:, H * D:(H + Hkv) * D], qkv[:, (H + Hkv) * D:]
            cos, sin = rope
            ops.qk_norm_rope(q, H, w.q_norm, cfg.rms_norm_eps, cos, sin, batch.positions)
            ops.qk_norm_rope(k, Hkv, w.k_norm, cfg.rms_norm_eps, cos, sin, batch.positions)
            attention.store_kv(k, v, *self.caches, batch.slots, batch.positions)
            if tiles is not None:
                attention.attend_tiles(q, st.heads, *self.caches, batch.slots, batch.positions, tiles,
                                       st.tile_scores, st.tile_norms, st.tile_q, st.tile_out, st.tile_rows,
                                       st.attn[:T])
            else:
                attention.attend(q, st.heads, *self.caches, batch.slots, batch.positions, st.scores, st.norms,
                                 st.attn[:T])
            w.o.matmul(st.attn[:T], o)
        else:
            o[:] = 0.0
        comm.allreduce_sum(o)
        x += o

    def moe(self, st: RunState, T: int, comm: LocalComm | MPIComm) -> None:
        """The MoE block of the step's T tokens (whatever their sequences)."""
        cfg, w = self.cfg, self.w
        x, h, y = st.x[:T], st.h[:T], st.y[:T]
        k = cfg.num_experts_per_tok
        ops.rmsnorm(x, w.ffn_norm, cfg.rms_norm_eps, h)
        routing, ids, weights = st.routing[:T], st.ids[:T], st.weights[:T]
        if w.router is not None:
            w.router.matmul(h, st.router_logits[:T])
            ops.route(st.router_logits[:T], k, cfg.norm_topk_prob, ids, weights)
        if self.broadcast_routing:
            if w.router is not None:
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


class Model:
    """The forward pass over this rank's shard: its layers, their part of the KV cache (keys, values and an int8
    cache's scales: attention.cache_shapes and scale_shapes with leading axes [L, P]), and
    the step buffers (one RunState for decode batches, one for the largest prefill seen)."""

    def __init__(self, cfg: ModelConfig, plan: ShardPlan, shard: RankShard, weights: ModelWeights,
                 caches: list[np.ndarray], nthreads: int, is_root: bool) -> None:
        self.cfg, self.plan, self.shard, self.weights, self.is_root = cfg, plan, shard, weights, is_root
        self.nthreads = nthreads
        self.max_seq_len = caches[1].shape[3]
        self.layers = [Layer(cfg, shard, w, [c[i] for c in caches], plan.routing == "root")
                       for i, w in enumerate(weights.layers)]
        self.rope = ops.rope_tables(cfg.head_dim, cfg.rope_theta, self.max_seq_len)
        self._states: dict[int, RunState] = {}
        # where this rank's forward time went (--verbose prints the root's); the collectives are inside
        self.phase_seconds = dict.fromkeys(("embedding", "attention", "experts", "output"), 0.0)

    def _state(self, T: int) -> RunState:
        capacity = DECODE_CAPACITY if T <= DECODE_CAPACITY else max(T, max(self._states, default=0))
        st = self._states.get(capacity)
        if st is None:
            if capacity > DECODE_CAPACITY:  # keep one prefill state: the largest seen
                self._states = {c: s for c, s in self._states.items() if c <= DECODE_CAPACITY}
            st = RunState(self.cfg, self.shard, capacity, self.max_seq_len, self.nthreads)
            self._states[capacity] = st
        return st

    def forward(self, batch: Batch, comm: LocalComm | MPIComm, top: int = 0) -> np.ndarray | None:
        """Run the step on this rank (every rank at once); the root gets the logits [rows, vocab] of
        batch.logit_rows(), the others None. top > 0: see Engine.step."""
        T, cfg, w = batch.T, self.cfg, self.weights
        st = self._state(T)
        phase, clock = self.phase_seconds, time.perf_counter
        t0 = clock()
        st.x[:T] = quant.dequantize(w.embedding[batch.ids], w.embedding_type, cfg.hidden_size)
        phase["embedding"] += clock() - t0
        tiles = (attention.tiles_of(batch.slots, batch.positions, st.tile) if st.tile and T > SHARED_STEP_TOKENS
                 else None)
        for layer in self.layers:
            t0 = clock()
            layer.attention(st, batch, tiles, self.rope, comm)
            t1 = clock()
            layer.moe(st, T, comm)
            phase["attention"] += t1 - t0
            phase["experts"] += clock() - t1
        t0 = clock()
        rows = st.x[batch.logit_rows()]
        h = st.h[:rows.shape[0]]
        ops.rmsnorm(rows, w.output_norm, cfg.rms_norm_eps, h)
        local = np.empty((h.shape[0], self.shard.vocab[1] - self.shard.vocab[0]), np.float32)
        if w.output is not None:
            w.output.matmul(h, local)
        widths = [s.vocab[1] - s.vocab[0] for s in self.plan.shards]
        if top and sum(width > 0 for width in widths) > 1:
            logits = self._gather_top(local, top, widths, comm)
        else:
            logits = np.empty((h.shape[0], cfg.vocab_size), np.float32) if self.is_root else local
            comm.gather_rows(local, logits, widths)
        phase["output"] += clock() - t0
        return logits if self.is_root else None

    def _gather_top(self, local: np.ndarray, top: int, widths: list[int], comm: LocalComm | MPIComm) -> np.ndarray:
        """Each rank's `top` largest logits of every row (values, and global ids as int32 bits), gathered; the
        root scatters them into rows of -inf. The rows' top `top` overall are among them."""
        n = local.shape[0]
        counts = [min(top, width) for width in widths]
        k = counts[self.shard.rank]
        part = np.empty((n, 2 * k), np.float32)
        if k:
            idx = np.argpartition(local, local.shape[1] - k, axis=1)[:, -k:]
            part[:, :k] = np.take_along_axis(local, idx, axis=1)
            part[:, k:] = (idx + self.shard.vocab[0]).astype(np.int32).view(np.float32)
        got = np.empty((n, 2 * sum(counts)), np.float32) if self.is_root else part
        comm.gather_rows(part, got, [2 * c for c in counts])
        if not self.is_root:
            return part
        logits = np.full((n, self.cfg.vocab_size), -np.inf, np.float32)
        at = 0
        for c in counts:
            np.put_along_axis(logits, got[:, at + c:at + 2 * c].view(np.int32).astype(np.intp), got[:, at:at + c],
                              axis=1)
            at += 2 * c
        return logits
