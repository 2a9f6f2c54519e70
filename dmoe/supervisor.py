"""Supervisor: when one rank fails, every rank stops, and the root says which rank and why.

MPI alone cannot do this: a rank blocked in a collective waits forever for a peer that died,
and the launcher's own clean-up (if any) kills the root before it can say anything useful.
So besides MPI every worker holds a TCP connection to the root, watched by a thread on both
sides. A worker that fails sends its reason and exits; a worker that dies (kill -9, the OOM
killer) closes its socket as the kernel reaps it. Either way the root's watcher prints
"rank R (host) ...: reason" and exits non-zero, which closes every other worker's connection,
and their watchers exit too. The connection carries nothing on the hot path.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import sys
import threading

from dmoe.comm import LocalComm, MPIComm

CONNECT_TIMEOUT_S = 30.0
REPORT_WAIT_S = 3.0  # how long a failing worker waits for the root to report it


def _candidate_addresses() -> list[str]:
    """The root's IPv4 addresses, loopback first (workers on the same host), then the rest."""
    import psutil

    addrs = ["127.0.0.1"]
    for entries in psutil.net_if_addrs().values():
        addrs += [a.address for a in entries if a.family == socket.AF_INET and a.address not in addrs]
    return addrs


class Supervisor:
    """Create on every rank right after MPI starts; `fail` on any rank's error; `close` when done."""

    def __init__(self, comm: LocalComm | MPIComm) -> None:
        self.comm = comm
        self.closing = False
        self._peers: dict[socket.socket, tuple[int, str]] = {}
        self._reasons: dict[int, str] = {}
        self._root: socket.socket | None = None
        if comm.size == 1:
            return
        if comm.rank == 0:
            server = socket.create_server(("0.0.0.0", 0))
            server.settimeout(CONNECT_TIMEOUT_S)
            comm.bcast_obj((_candidate_addresses(), server.getsockname()[1]))
            for _ in range(comm.size - 1):
                conn, _addr = server.accept()
                conn.settimeout(None)
                rank, host = conn.makefile().readline().split(maxsplit=1)
                self._peers[conn] = (int(rank), host.strip())
            server.close()
            threading.Thread(target=self._watch_workers, daemon=True).start()
        else:
            addrs, port = comm.bcast_obj(None)
            self._root = self._connect(addrs, port)
            self._root.settimeout(None)
            self._root.sendall(f"{comm.rank} {comm.host}\n".encode())
            threading.Thread(target=self._watch_root, daemon=True).start()

    @staticmethod
    def _connect(addrs: list[str], port: int) -> socket.socket:
        for addr in addrs:
            try:
                return socket.create_connection((addr, port), timeout=5)
            except OSError:
                continue
        raise ConnectionError(f"cannot reach rank 0 on port {port} at any of {addrs}")

    def _watch_workers(self) -> None:
        """Root: any worker's message or disconnect, unless we are closing, ends the job."""
        open_peers = list(self._peers)
        while open_peers:
            readable, _, _ = select.select(open_peers, [], [])
            for conn in readable:
                rank, host = self._peers[conn]
                try:
                    data = conn.recv(65536)
                except OSError:
                    data = b""
                if data:
                    self._reasons[rank] = self._reasons.get(rank, "") + data.decode(errors="replace")
                    continue
                open_peers.remove(conn)
                if self.closing and rank not in self._reasons:
                    continue
                reason = self._reasons.get(rank, "").strip() or "exited unexpectedly (killed, or out of memory)"
                print(f"dmoe: error: rank {rank} ({host}) failed: {reason}", file=sys.stderr, flush=True)
                os._exit(1)

    def _watch_root(self) -> None:
        """Worker: the root's disconnect means the job is over; leave quietly (the root has spoken)."""
        assert self._root is not None
        with contextlib.suppress(OSError):
            while self._root.recv(4096):
                pass
        if not self.closing:
            os._exit(1)

    def fail(self, reason: str) -> None:
        """This rank cannot go on: tell the root (or, on the root, the user) and exit non-zero. A worker waits
        a little for the root to report it (the root closes the connection when it has), and reports itself
        if the root cannot (busy in a long compile, or already gone)."""
        if self._root is not None:
            reported = False
            with contextlib.suppress(OSError):
                self._root.sendall(reason.encode())
                self._root.shutdown(socket.SHUT_WR)
                self._root.settimeout(REPORT_WAIT_S)
                reported = self._root.recv(1) == b""
            if not reported:
                print(f"dmoe: error: rank {self.comm.rank} ({self.comm.host}) failed: {reason}", file=sys.stderr,
                      flush=True)
        else:
            print(f"dmoe: error: {reason}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)

    def close(self) -> None:
        """Normal end: disconnects from here on are expected."""
        self.closing = True
        if self._root is not None:
            self._root.close()
