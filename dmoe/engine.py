"""Engine: loads one rank's shard, owns the KV cache's slots, runs forward steps; the root drives, workers
follow.

The root (rank 0) owns user I/O: it calls `step` (or `forward`, one sequence), `close`. Each step first
sends a small command (see `Command`) so that workers, sitting in `serve_forever`, run the same step and
join the same collectives; the step's sequences (slot, position, count) and tokens follow in one broadcast.
Only the root keeps the tokens in each slot: a worker needs nothing but what the step tells it. With a
world of one the broadcasts are no-ops and this is a plain single-process engine.
"""

from __future__ import annotations

import atexit
import enum
import os
import resource
import sys
import time
from collections.abc import Sequence

import numba
import numpy as np

from dmoe import attention
from dmoe.comm import SPIN_S, LocalComm, MPIComm, make_comm
from dmoe.footprint import fit_slots, weight_bytes
from dmoe.model import Batch, Model
from dmoe.modelfile import ModelFile
from dmoe.packcache import PackStore, StaleCacheError
from dmoe.plan import ShardPlan, parse_shares
from dmoe.supervisor import Supervisor, one_line
from dmoe.tokenizer import Tokenizer
from dmoe.weights import ModelWeights, load_weights


class Command(enum.IntEnum):
    """What the root asks of the workers; the header [command, a, b, c, d] carries the arguments."""

    FORWARD = 1  # a step: a = tokens, b = sequences, c = all logits, d = top; then its sequences and ids
    STOP = 2  # leave serve_forever
    REPORT = 3  # answer an allgather of peak memory and time in collectives


class ContextFullError(ValueError):
    """The step would pass the KV cache's length."""


class Engine:
    """One rank's part of the model. Build with `Engine.load`."""

    def __init__(self, mf: ModelFile, comm: LocalComm | MPIComm, max_seq_len: int, nthreads: int, kv_type: str,
                 moe_split: str, progress: bool = False, pack_cache: str | None = None, preload: bool = False,
                 parallel: int | None = 1, output: str = "split", shares: str | None = None,
                 routing: str = "root") -> None:
        cfg = mf.config
        if kv_type not in attention.KV_TYPES:
            raise ValueError(f"kv_type must be one of {sorted(attention.KV_TYPES)}, got {kv_type!r}")
        if max_seq_len < 1:
            raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
        if parallel is not None and parallel < 1:
            raise ValueError(f"parallel must be >= 1, got {parallel}")
        self.config, self.comm, self.file = cfg, comm, mf
        self.max_seq_len = min(max_seq_len, cfg.max_position_embeddings)
        self.nthreads = nthreads
        numba.set_num_threads(nthreads)
        self.plan = ShardPlan.make(cfg, comm.size, moe_split, output,
                                   parse_shares(shares, comm.size) if shares else None, routing)
        self.shard = self.plan[comm.rank]
        self.is_root = comm.rank == 0
        one = attention.kv_layout((cfg.num_hidden_layers, 1), self.shard.n_kv_heads, self.max_seq_len, cfg.head_dim,
                                  attention.KV_TYPES[kv_type])  # before the weights: it may refuse q8
        packed = weight_bytes(cfg, {name: t.qtype for name, t in mf.tensors.items()}, self.shard)
        parallel = fit_slots(comm, packed, sum(int(np.prod(shape)) * kind.itemsize for shape, kind in one), parallel,
                             f"{self.max_seq_len:,} tokens ({kv_type})")
        layout = attention.kv_layout((cfg.num_hidden_layers, parallel), self.shard.n_kv_heads, self.max_seq_len,
                                     cfg.head_dim, attention.KV_TYPES[kv_type])
        self.weights = self._load_weights(mf, progress, pack_cache, preload)
        caches = [np.zeros(shape, kind) for shape, kind in layout]
        self.kv_bytes = sum(a.nbytes for a in caches)
        self.model = Model(cfg, self.plan, self.shard, self.weights, caches, nthreads, self.is_root)
        self.phase_seconds = self.model.phase_seconds
        self.slots: list[list[int]] = [[] for _ in range(parallel)]  # root: the ids whose keys and values are cached
        self._header = np.zeros(5, np.int64)
        self.tokenizer = Tokenizer.from_gguf_fields(mf.metadata) if self.is_root else None
        self.load_seconds = 0.0
        self.supervisor: Supervisor | None = None
        self._done_at = 0.0  # when the root last sent a command or ended a step (see _command)

    def _load_weights(self, mf: ModelFile, progress: bool, pack_cache: str | None, preload: bool) -> ModelWeights:
        """This rank's weights, mapped from the pack cache when it has them (read in whole first with
        `preload`), else packed (and saved there)."""
        slot = f"{self.plan.world_size}|{self.plan.moe_split}|{self.shard.rank}"
        tag = str(self.shard)
        store = PackStore(mf.path, slot, tag, pack_cache)
        self.pack_cache_hit = store.mode == "read"
        if preload:
            store.preload()

        def report(message: str) -> None:
            if self.is_root:
                print(f"dmoe: {message}", file=sys.stderr)

        try:
            weights = load_weights(mf, self.shard, store, progress)
            store.finish(report)
        except StaleCacheError:
            store.discard()
            self.pack_cache_hit = False
            store = PackStore(mf.path, slot, tag, pack_cache)
            weights = load_weights(mf, self.shard, store, progress)
            store.finish(report)
        return weights

    @classmethod
    def load(cls, path: str, max_seq_len: int = 4096, nthreads: int | None = None, kv_type: str = "f16",
             moe_split: str = "ffn", comm: LocalComm | MPIComm | None = None, supervisor: Supervisor | None = None,
             progress: bool = False, pack_cache: str | None = None, preload: bool = False,
             parallel: int | None = 1, comm_type: str = "f32", output: str = "split", shares: str | None = None,
             routing: str = "root") -> Engine:
        """Open `path` and load this rank's shard (call on every rank). nthreads defaults to this host's cores
        divided by the ranks on it; supervisor: the job's (see supervisor.py; made here when there are several
        ranks and none is given), so that a failure on any rank, here or in `serve_forever`, stops every rank
        with rank 0 naming it; progress shows a bar over the layers; pack_cache is a directory for the pack
        cache (see packcache.py), None for none; preload reads a mapped pack cache in whole before the first
        token (else its pages arrive as the experts are first used); parallel: KV cache slots, None for as many as
        fit each host up to footprint.DEFAULT_SLOTS (a number that does not fit is refused: footprint.fit_slots)."""
        comm = comm or make_comm()
        if supervisor is None and comm.size > 1:
            supervisor = Supervisor(comm)
        try:
            if nthreads is None:
                on_host = comm.allgather_obj(comm.host).count(comm.host)
                nthreads = max(1, (os.cpu_count() or 1) // on_host)
            nthreads = min(nthreads, numba.config.NUMBA_NUM_THREADS)
            comm.set_reduce_type(comm_type)
            t0 = time.perf_counter()
            engine = cls(ModelFile(path), comm, max_seq_len, nthreads, kv_type, moe_split, progress, pack_cache,
                         preload, parallel, output, shares, routing)
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

    def _command(self, command: Command, a: int = 0, b: int = 0, c: int = 0, d: int = 0) -> None:
        """Send the workers a command. After a pause long enough for them to have gone to sleep between polls
        (comm.SPIN_S), wake them first, so that the first token after a pause does not wait for a poll."""
        self._header[:] = (command, a, b, c, d)
        paused = time.perf_counter() - self._done_at > SPIN_S / 2
        wake = self.supervisor.wake if paused and self.supervisor is not None else None
        self.comm.send_command(self._header, wake)
        self._done_at = time.perf_counter()  # the workers are busy, or hot again

    @property
    def parallel(self) -> int:
        return len(self.slots)

    @property
    def tokens(self) -> list[int]:
        """The ids cached in slot 0 (the single-sequence API's slot)."""
        return self.slots[0]

    @property
    def position(self) -> int:
        return len(self.slots[0])

    # ---- the root's API -------------------------------------------------------------------------

    def step(self, batch: Sequence[tuple[int, Sequence[int]]], all_logits: bool = False,
             top: int = 0) -> list[np.ndarray]:
        """Run each (slot, ids) of the batch at the end of its slot's cached sequence, all in one forward step;
        returns per sequence float32 logits [len(ids), vocab] (all_logits) or [1, vocab] (its last token).
        top > 0: only each row's `top` largest logits are needed (sampling.candidates): with the output matrix
        split over ranks, only those cross the network, and the rest of the row is -inf."""
        if not batch:
            raise ValueError("a step needs at least one sequence")
        seqs = np.zeros((len(batch), 3), np.int64)
        for i, (slot, ids) in enumerate(batch):
            if not 0 <= slot < self.parallel:
                raise ValueError(f"slot {slot} is outside 0..{self.parallel - 1} (--parallel)")
            if not ids:
                raise ValueError("forward needs at least one token")
            pos = len(self.slots[slot])
            if pos + len(ids) > self.max_seq_len:
                raise ContextFullError(
                    f"{pos + len(ids)} tokens do not fit the context of {self.max_seq_len} (--max-seq-len)")
            bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
            if bad:
                raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{self.config.vocab_size - 1})")
            seqs[i] = slot, pos, len(ids)
        if len(set(seqs[:, 0].tolist())) < len(batch):
            raise ValueError("a step takes each slot at most once")
        ids = np.concatenate([np.asarray(ids, np.int64) for _, ids in batch])
        top = 0 if all_logits else max(0, top)
        self._command(Command.FORWARD, len(ids), len(batch), int(all_logits), top)
        logits = self._step(seqs, ids, all_logits, top)
        self._done_at = time.perf_counter()
        for slot, ids in batch:
            self.slots[slot].extend(int(t) for t in ids)
        assert logits is not None
        return np.split(logits, np.cumsum(seqs[:-1, 2])) if all_logits else list(logits[:, None])

    def forward(self, ids: Sequence[int], all_logits: bool = False, slot: int = 0, top: int = 0) -> np.ndarray:
        """Run `ids` at the end of the slot's cached sequence; returns float32 logits [T, vocab] for every
        position (all_logits) or [1, vocab] for the last (top: see step)."""
        return self.step([(slot, ids)], all_logits, top)[0]

    def truncate(self, length: int, slot: int = 0) -> None:
        """Keep only the first `length` cached tokens of a slot (to reuse a shared prefix). The root's bookkeeping
        alone: every step tells the workers where its tokens go."""
        del self.slots[slot][max(0, length):]

    def reset(self) -> None:
        for slot in range(self.parallel):
            self.truncate(0, slot)

    def rank_report(self) -> list[tuple[float, float]]:
        """Every rank's (peak resident memory so far in GB, seconds in collectives): a collective, workers
        answer too."""
        self._command(Command.REPORT)
        return self.comm.allgather_obj(self._report())

    def _report(self) -> tuple[float, float]:
        return _peak_rss_gb(), self.comm.seconds

    def close(self) -> None:
        """Release the workers (they return from `serve_forever`)."""
        if self.is_root and self.comm.size > 1:
            if self.supervisor is not None:
                self.supervisor.close()
            self._command(Command.STOP)

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
            command, a, b, c, d = (int(v) for v in self._header)
            if command == Command.STOP:
                return
            if command == Command.REPORT:
                self.comm.allgather_obj(self._report())
            elif command == Command.FORWARD:
                self._step(np.zeros((b, 3), np.int64), np.zeros(a, np.int64), bool(c), d)
            else:
                raise RuntimeError(f"unknown command {command} from rank 0")

    # ---- one step, on every rank ----------------------------------------------------------------

    def _step(self, seqs: np.ndarray, ids: np.ndarray, all_logits: bool, top: int) -> np.ndarray | None:
        # numba's thread count is per OS thread and the kernels' per-thread scratch is sized for ours: set it
        # on whichever thread runs this step (a web server's worker, a thread pool), not only the loading one
        numba.set_num_threads(self.nthreads)
        message = np.concatenate([seqs.ravel(), ids])  # one broadcast: the root's values, the workers' room
        self.comm.bcast(message)
        n = len(seqs)
        return self.model.forward(Batch(message[:3 * n].reshape(n, 3), message[3 * n:], all_logits), self.comm, top)


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
