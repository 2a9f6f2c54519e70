"""Engine: loads one rank's shard, owns the KV cache, runs forward steps; the root drives, workers follow.

The root (rank 0) owns user I/O: it calls `forward`, `truncate`, `close`. Each call first
broadcasts a small command so that workers, sitting in `serve_forever`, run the same step and
join the same collectives. With a world of one the broadcasts are no-ops and this is a plain
single-process engine.
"""

from __future__ import annotations

import atexit
import os
import resource
import sys
import time
from collections.abc import Sequence

import numba
import numpy as np

from dmoe import ops, quant
from dmoe.comm import SPIN_S, LocalComm, MPIComm, make_comm
from dmoe.model import Layer, RunState
from dmoe.modelfile import ModelFile
from dmoe.packcache import PackStore, StaleCacheError
from dmoe.plan import ShardPlan
from dmoe.supervisor import Supervisor, one_line
from dmoe.tokenizer import Tokenizer
from dmoe.weights import ModelWeights, load_weights

KV_TYPES = {"f32": np.float32, "f16": np.uint16}  # f16 is kept as IEEE half bits (see attention.py)
_FORWARD, _TRUNCATE, _STOP, _REPORT = 1, 2, 3, 4
DECODE_CAPACITY = 1


class ContextFullError(ValueError):
    """The step would pass the KV cache's length."""


class Engine:
    """One rank's part of the model. Build with `Engine.load`."""

    def __init__(self, mf: ModelFile, comm: LocalComm | MPIComm, max_seq_len: int, nthreads: int, kv_type: str,
                 moe_split: str, progress: bool = False, pack_cache: str | None = None, preload: bool = False) -> None:
        cfg = mf.config
        if kv_type not in KV_TYPES:
            raise ValueError(f"kv_type must be one of {sorted(KV_TYPES)}, got {kv_type!r}")
        if max_seq_len < 1:
            raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
        self.config, self.comm, self.file = cfg, comm, mf
        self.max_seq_len = min(max_seq_len, cfg.max_position_embeddings)
        self.nthreads = nthreads
        numba.set_num_threads(nthreads)
        self.plan = ShardPlan.make(cfg, comm.size, moe_split)
        self.shard = self.plan[comm.rank]
        self.is_root = comm.rank == 0
        self.weights = self._load_weights(mf, progress, pack_cache, preload)
        kv_shape = (cfg.num_hidden_layers, self.shard.n_kv_heads, self.max_seq_len, cfg.head_dim)
        self.k_cache = np.zeros(kv_shape, KV_TYPES[kv_type])  # [L, Hkv, S, D]
        self.v_cache = np.zeros(kv_shape, KV_TYPES[kv_type])
        self.kv_bytes = self.k_cache.nbytes + self.v_cache.nbytes
        self.layers = [Layer(cfg, self.shard, w, self.k_cache[i], self.v_cache[i])
                       for i, w in enumerate(self.weights.layers)]
        self.rope = ops.rope_tables(cfg.head_dim, cfg.rope_theta, self.max_seq_len)
        self._states: dict[int, RunState] = {}
        self._header = np.zeros(4, np.int64)  # [command, T, position, all_logits]
        self.tokens: list[int] = []  # the ids whose keys and values are in the cache
        self.tokenizer = Tokenizer.from_gguf_fields(mf.metadata) if self.is_root else None
        self.load_seconds = 0.0
        self.supervisor: Supervisor | None = None
        self._done_at = 0.0  # when the root last sent a command or ended a step (see _command)
        # where this rank's forward time went (--verbose prints the root's); the collectives are inside
        self.phase_seconds = dict.fromkeys(("embedding", "attention", "experts", "output"), 0.0)

    def _load_weights(self, mf: ModelFile, progress: bool, pack_cache: str | None, preload: bool) -> ModelWeights:
        """This rank's weights, mapped from the pack cache when it has them (read in whole first with
        `preload`), else packed (and saved there)."""
        slot = f"{self.plan.world_size}|{self.plan.moe_split}|{self.shard.rank}"
        tag = f"{self.shard}|{self.is_root}"
        store = PackStore(mf.path, slot, tag, pack_cache)
        self.pack_cache_hit = store.mode == "read"
        if preload:
            store.preload()

        def report(message: str) -> None:
            if self.is_root:
                print(f"dmoe: {message}", file=sys.stderr)

        try:
            weights = load_weights(mf, self.shard, self.is_root, store, progress)
            store.finish(report)
        except StaleCacheError:
            store.discard()
            self.pack_cache_hit = False
            store = PackStore(mf.path, slot, tag, pack_cache)
            weights = load_weights(mf, self.shard, self.is_root, store, progress)
            store.finish(report)
        return weights

    @classmethod
    def load(cls, path: str, max_seq_len: int = 4096, nthreads: int | None = None, kv_type: str = "f16",
             moe_split: str = "ffn", comm: LocalComm | MPIComm | None = None, supervisor: Supervisor | None = None,
             progress: bool = False, pack_cache: str | None = None, preload: bool = False) -> Engine:
        """Open `path` and load this rank's shard (call on every rank). nthreads defaults to this host's cores
        divided by the ranks on it; supervisor: the job's (see supervisor.py; made here when there are several
        ranks and none is given), so that a failure on any rank, here or in `serve_forever`, stops every rank
        with rank 0 naming it; progress shows a bar over the layers; pack_cache is a directory for the pack
        cache (see packcache.py), None for none; preload reads a mapped pack cache in whole before the first
        token (else its pages arrive as the experts are first used)."""
        comm = comm or make_comm()
        if supervisor is None and comm.size > 1:
            supervisor = Supervisor(comm)
        try:
            if nthreads is None:
                on_host = comm.allgather_obj(comm.host).count(comm.host)
                nthreads = max(1, (os.cpu_count() or 1) // on_host)
            nthreads = min(nthreads, numba.config.NUMBA_NUM_THREADS)
            t0 = time.perf_counter()
            engine = cls(ModelFile(path), comm, max_seq_len, nthreads, kv_type, moe_split, progress, pack_cache,
                         preload)
        except Exception as e:
            if supervisor is not None:
                if comm.rank != 0:
                    supervisor.fail(one_line(e))  # does not return: the root reports it and every rank stops
                supervisor.abort()  # the root's own failure: the workers go now, not at an exit MPI may block
            raise
        engine.supervisor = supervisor
        if supervisor is not None and comm.rank == 0:
            atexit.register(supervisor.abort)  # a library user's root that ends (or raises) without close()
        engine.load_seconds = time.perf_counter() - t0
        return engine

    def _command(self, command: int, T: int, position: int, all_logits: int) -> None:
        """Send the workers a command. After a pause long enough for them to have gone to sleep between polls
        (comm.SPIN_S), wake them first, so that the first token after a pause does not wait for a poll."""
        self._header[:] = (command, T, position, all_logits)
        paused = time.perf_counter() - self._done_at > SPIN_S / 2
        wake = self.supervisor.wake if paused and self.supervisor is not None else None
        self.comm.send_command(self._header, wake)
        self._done_at = time.perf_counter()  # the workers are busy, or hot again

    @property
    def position(self) -> int:
        return len(self.tokens)

    # ---- the root's API -------------------------------------------------------------------------

    def forward(self, ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Run `ids` at the end of the cached sequence; returns float32 logits [T, vocab] for every
        position (all_logits) or [1, vocab] for the last."""
        T = len(ids)
        if T == 0:
            raise ValueError("forward needs at least one token")
        if self.position + T > self.max_seq_len:
            raise ContextFullError(
                f"{self.position + T} tokens do not fit the context of {self.max_seq_len} (--max-seq-len)")
        bad = [i for i in ids if not 0 <= i < self.config.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        self._command(_FORWARD, T, self.position, int(all_logits))
        logits = self._step(np.asarray(ids, np.int32), all_logits)
        self._done_at = time.perf_counter()
        assert logits is not None
        return logits

    def truncate(self, length: int) -> None:
        """Keep only the first `length` cached tokens (to reuse a shared prefix)."""
        length = max(0, min(length, self.position))
        self._command(_TRUNCATE, 0, length, 0)
        del self.tokens[length:]

    def reset(self) -> None:
        self.truncate(0)

    def peak_rss_per_rank(self) -> list[float]:
        """Every rank's peak resident memory so far, in GB (a collective: workers answer too)."""
        self._command(_REPORT, 0, 0, 0)
        return self.comm.allgather_obj(_peak_rss_gb())

    def close(self) -> None:
        """Release the workers (they return from `serve_forever`)."""
        if self.is_root and self.comm.size > 1:
            if self.supervisor is not None:
                self.supervisor.close()
            self._command(_STOP, 0, 0, 0)

    # ---- workers --------------------------------------------------------------------------------

    def serve_forever(self) -> None:
        """A worker's loop: follow the root's commands until it says stop. A failure here stops every rank."""
        try:
            self._follow()
        except Exception as e:
            if self.supervisor is not None:
                self.supervisor.fail(one_line(e))
            raise
        if self.supervisor is not None:
            self.supervisor.close()

    def _follow(self) -> None:
        while True:
            self.comm.wait_command(self._header, self.supervisor.woken if self.supervisor else None)
            command, T, position, all_logits = (int(v) for v in self._header)
            if command == _STOP:
                return
            if command == _TRUNCATE:
                del self.tokens[position:]
            elif command == _REPORT:
                self.comm.allgather_obj(_peak_rss_gb())
            elif command == _FORWARD:
                if position != self.position:
                    raise RuntimeError(f"worker at position {self.position}, root at {position}")
                self._step(np.zeros(T, np.int32), bool(all_logits))

    # ---- one step, on every rank ----------------------------------------------------------------

    def _state(self, T: int) -> RunState:
        capacity = DECODE_CAPACITY if T <= DECODE_CAPACITY else max(T, max(self._states, default=0))
        st = self._states.get(capacity)
        if st is None:
            if capacity > DECODE_CAPACITY:  # keep one prefill state: the largest seen
                self._states = {c: s for c, s in self._states.items() if c <= DECODE_CAPACITY}
            st = RunState(self.config, self.shard, capacity, self.max_seq_len, self.nthreads,
                          widen_kv=capacity > 1 and self.k_cache.dtype == np.uint16)
            self._states[capacity] = st
        return st

    def _step(self, ids: np.ndarray, all_logits: bool) -> np.ndarray | None:
        T, pos = len(ids), self.position
        # numba's thread count is per OS thread and the kernels' per-thread scratch is sized for ours: set it
        # on whichever thread runs this step (a web server's worker, a thread pool), not only the loading one
        numba.set_num_threads(self.nthreads)
        self.comm.bcast(ids)
        st = self._state(T)
        w, phase, clock = self.weights, self.phase_seconds, time.perf_counter
        t0 = clock()
        st.x[:T] = quant.dequantize(w.embedding[ids], w.embedding_type, self.config.hidden_size)
        phase["embedding"] += clock() - t0
        for layer in self.layers:
            t0 = clock()
            layer.attention(st, T, pos, self.rope, self.comm)
            t1 = clock()
            layer.moe(st, T, self.comm)
            phase["attention"] += t1 - t0
            phase["experts"] += clock() - t1
        self.tokens.extend(int(i) for i in ids)
        t0 = clock()
        rows = st.x[:T] if all_logits else st.x[T - 1:T]
        h = st.h[:rows.shape[0]]
        ops.rmsnorm(rows, w.output_norm, self.config.rms_norm_eps, h)
        local = np.empty((h.shape[0], self.shard.vocab[1] - self.shard.vocab[0]), np.float32)
        if w.output is not None:
            w.output.matmul(h, local)
        logits = np.empty((h.shape[0], self.config.vocab_size), np.float32) if self.is_root else local
        self.comm.gather_rows(local, logits, [s.vocab[1] - s.vocab[0] for s in self.plan.shards])
        phase["output"] += clock() - t0
        return logits if self.is_root else None



def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
