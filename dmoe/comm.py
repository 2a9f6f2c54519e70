"""Comm: the collectives the engine uses, over MPI (mpi4py's buffer API: no pickling on the hot
path) or in a world of one process (every collective is a no-op), with the same interface.

Each hot-path call is one named sync point of the forward pass; time spent in them is summed
in `seconds` so that the timing line can show communication per token.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from dmoe.wire import BLOCK, check_type, decode, encode, wire_bytes

# A worker waiting for the root's next command: hot for SPIN_S (a generation's next token comes that soon),
# then asleep between polls that back off from POLL_MIN_S to POLL_MAX_S. A root that sends a command after a
# pause first wakes the workers (through the supervisor's connections), so the back-off costs no latency.
SPIN_S, POLL_MIN_S, POLL_MAX_S = 0.05, 50e-6, 0.02
COMPACT_PLANS = 16  # buffer sizes whose compact all-reduce scratch is kept (decode batches: 1-8 tokens)

# Variables that MPI launchers (MPICH's hydra, Open MPI, Slurm's PMI) set in every rank.
_LAUNCHER_VARS = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")
_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")  # how many ranks the launcher started


def launched_by_mpi() -> bool:
    return any(v in os.environ for v in _LAUNCHER_VARS)


class LocalComm:
    """A world of one: the engine's single-process mode, with no MPI imported at all."""

    rank = 0
    size = 1
    host = "localhost"

    def __init__(self) -> None:
        self.seconds = 0.0
        self.bytes_sent = 0

    def allreduce_sum(self, buf: np.ndarray) -> None:
        pass

    def bcast(self, buf: np.ndarray) -> None:
        pass

    def set_reduce_type(self, kind: str) -> None:
        check_type(kind)  # a world of one reduces nothing

    def send_command(self, buf: np.ndarray, wake: Callable[[], None] | None = None) -> None:
        pass

    def wait_command(self, buf: np.ndarray, woken: threading.Event | None = None) -> None:
        pass

    def gather_rows(self, local: np.ndarray, out: np.ndarray, counts: list[int]) -> None:
        out[...] = local

    def bcast_obj(self, obj: Any) -> Any:
        return obj

    def allgather_obj(self, obj: Any) -> list[Any]:
        return [obj]

    def abort(self, code: int) -> None:
        os._exit(code)


class _CompactPlan:
    """How MPIComm's compact all-reduce cuts a buffer of `size` floats over n ranks (part k: floats
    bounds[k]:bounds[k + 1], sizes[k] bytes on the wire at offsets[k]), and its scratch, kept between calls."""

    def __init__(self, kind: str, size: int, n: int, me: int) -> None:
        blocks = size // BLOCK
        self.bounds = [k * blocks // n * BLOCK for k in range(n + 1)]
        self.sizes = [wire_bytes(kind, self.bounds[k + 1] - self.bounds[k]) for k in range(n)]
        self.offsets = [sum(self.sizes[:k]) for k in range(n)]
        self.send = np.empty(sum(self.sizes), np.uint8)
        self.gathered = np.empty_like(self.send)
        self.recv = np.empty(self.sizes[me] * n, np.uint8)
        self.total = np.empty(self.bounds[me + 1] - self.bounds[me], np.float32)
        self.other = np.empty_like(self.total)


class MPIComm:
    """COMM_WORLD through mpi4py. Import is deferred so that a plain `python launch.py` never loads MPI."""

    def __init__(self) -> None:
        local_ranks = int(os.environ.get("MPI_LOCALNRANKS", "1"))
        if local_ranks > (os.cpu_count() or 1):
            # More ranks than cores: MPICH's busy-waiting would starve the rank that has work (decode ran 100x
            # slower at 8 ranks on 2 cores); let waiting ranks yield the core instead. Read at MPI_Init.
            os.environ.setdefault("MPIR_CVAR_ENABLE_HEAVY_YIELD", "1")
            os.environ.setdefault("MPIR_CVAR_POLLS_BEFORE_YIELD", "1")
        from mpi4py import MPI

        self._mpi = MPI
        self._comm = MPI.COMM_WORLD
        self.rank = self._comm.Get_rank()
        self.size = self._comm.Get_size()
        self.host = MPI.Get_processor_name()
        self.seconds = 0.0
        self.bytes_sent = 0
        self.reduce_type = "f32"  # the all-reduces' wire form (wire.py); every rank must set the same
        self._compact: dict[tuple[str, int], _CompactPlan] = {}  # per wire type and buffer size

    def set_reduce_type(self, kind: str) -> None:
        self.reduce_type = check_type(kind)

    def allreduce_sum(self, buf: np.ndarray) -> None:
        """Sum buf (C-contiguous f32) over the ranks, in place: every rank ends with the same values."""
        t0 = time.perf_counter()
        if self.reduce_type == "f32" or buf.size % BLOCK:
            self._comm.Allreduce(self._mpi.IN_PLACE, buf, op=self._mpi.SUM)
            self.bytes_sent += 2 * (self.size - 1) * buf.nbytes // self.size  # MPI's reduce-scatter + all-gather
        else:
            self._compact_allreduce(buf.reshape(-1))
        self.seconds += time.perf_counter() - t0

    def _compact_allreduce(self, flat: np.ndarray) -> None:
        """A reduce-scatter, then an all-gather, each part on the wire in the compact form: rank r sums part r
        (its own copy in f32, the others' decoded) and encodes the sum; every rank decodes every part's sum,
        its own too, so all hold the same values. On the wire: 2 (N-1) / N of the buffer, compact."""
        kind, n, me = self.reduce_type, self.size, self.rank
        plan = self._compact.get((kind, flat.size))
        if plan is None:
            if len(self._compact) >= COMPACT_PLANS:  # prefill chunks come in many sizes: keep a few
                self._compact.clear()
            plan = self._compact[kind, flat.size] = _CompactPlan(kind, flat.size, n, me)
        bounds, sizes, offsets, send = plan.bounds, plan.sizes, plan.offsets, plan.send
        for k in range(n):
            encode(kind, flat[bounds[k]:bounds[k + 1]], send[offsets[k]:offsets[k] + sizes[k]])
        mine = sizes[me]
        byte = self._mpi.BYTE
        self._comm.Alltoallv([send, sizes, offsets, byte], [plan.recv, [mine] * n, [mine * k for k in range(n)], byte])
        total, other = plan.total, plan.other
        total[:] = flat[bounds[me]:bounds[me + 1]]
        for k in range(n):
            if k != me:
                decode(kind, plan.recv[mine * k:mine * (k + 1)], other)
                total += other
        encode(kind, total, send[offsets[me]:offsets[me] + mine])
        gathered = plan.gathered
        self._comm.Allgatherv([send[offsets[me]:offsets[me] + mine], byte], [gathered, sizes, offsets, byte])
        for k in range(n):
            decode(kind, gathered[offsets[k]:offsets[k] + sizes[k]], flat[bounds[k]:bounds[k + 1]])
        self.bytes_sent += sum(sizes) - mine + mine * (n - 1)

    def bcast(self, buf: np.ndarray) -> None:
        t0 = time.perf_counter()
        self._comm.Bcast(buf, root=0)
        self.seconds += time.perf_counter() - t0
        if self.rank == 0:
            self.bytes_sent += buf.nbytes

    def send_command(self, buf: np.ndarray, wake: Callable[[], None] | None = None) -> None:
        """The root's next command to the workers, a broadcast they receive with `wait_command` (a non-blocking
        broadcast on both sides: MPI matches a blocking one only with a blocking one). `wake`, if given, first
        wakes workers that may be asleep between polls."""
        t0 = time.perf_counter()
        if wake is not None:
            wake()
        self._comm.Ibcast(buf, root=0).Wait()
        self.seconds += time.perf_counter() - t0
        self.bytes_sent += buf.nbytes

    def wait_command(self, buf: np.ndarray, woken: threading.Event | None = None) -> None:
        """Worker: the root's next command, polled rather than waited for in MPI, whose blocking wait spins a
        core at 100% for as long as the server is idle; see SPIN_S. `woken` is set when the root wakes us."""
        request = self._comm.Ibcast(buf, root=0)
        start, nap = time.perf_counter(), POLL_MIN_S
        while not request.Test():
            if time.perf_counter() - start <= SPIN_S:
                continue
            if woken is None:
                time.sleep(nap)
            elif woken.wait(nap):
                woken.clear()
                start, nap = time.perf_counter(), POLL_MIN_S  # hot again: the command is on its way
                continue
            nap = min(2 * nap, POLL_MAX_S)

    def gather_rows(self, local: np.ndarray, out: np.ndarray, counts: list[int]) -> None:
        """Gather each rank's rows [T, counts[r]] into out [T, sum(counts)] on the root."""
        t0 = time.perf_counter()
        T = local.shape[0]
        sizes = [c * T for c in counts]
        if self.rank == 0:
            flat = np.empty(sum(sizes), np.float32)
            self._comm.Gatherv(np.ascontiguousarray(local), [flat, sizes, None, self._mpi.FLOAT], root=0)
            col = 0
            offset = 0
            for c in counts:
                out[:, col:col + c] = flat[offset:offset + c * T].reshape(T, c)
                col += c
                offset += c * T
        else:
            self._comm.Gatherv(np.ascontiguousarray(local), None, root=0)
            self.bytes_sent += local.nbytes
        self.seconds += time.perf_counter() - t0

    def bcast_obj(self, obj: Any) -> Any:
        return self._comm.bcast(obj, root=0)

    def allgather_obj(self, obj: Any) -> list[Any]:
        return self._comm.allgather(obj)

    def abort(self, code: int) -> None:
        self._comm.Abort(code)


def make_comm() -> LocalComm | MPIComm:
    """MPI when started by an MPI launcher with more than one rank, else a world of one. A launcher that
    started several ranks which MPI sees as worlds of one (mpi4py built for another MPI than that mpirun)
    is refused: each would run the whole model alone."""
    if launched_by_mpi():
        comm = MPIComm()
        if comm.size > 1:
            return comm
        started = max((int(os.environ[v]) for v in _SIZE_VARS if os.environ.get(v, "").isdigit()), default=1)
        if started > 1:
            library = " ".join(comm._mpi.Get_library_version().split("\n")[0].split())
            raise RuntimeError(f"the launcher started {started} ranks but MPI sees a world of one: mpi4py runs "
                               f"on {library}, another MPI than this mpirun's; use the mpirun of mpi4py's MPI "
                               "(with pip's mpich, the one installed beside it)")
    return LocalComm()
