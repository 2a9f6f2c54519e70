"""Supervisor: when one rank fails, every rank stops, and the root says which rank and why.

MPI alone cannot do this: a rank blocked in a collective waits forever for a peer that died,
and the launcher's own clean-up (if any) kills the root before it can say anything useful.
So besides MPI every worker holds a TCP connection to the root, watched on the root's side by its
watchdog process (watchdog.py: a thread of the root lost the race against the launcher's clean-up)
and on a worker's by a thread. A worker that fails sends its reason and exits; a worker that dies
(kill -9, the OOM killer) closes its socket as the kernel reaps it. Either way the watchdog prints
"rank R (host) ...: reason" and ends the root, which closes every other worker's connection, and
their watchers exit too. The connection carries nothing on the hot path.

The handshake is authenticated: the root broadcasts a random nonce over MPI, and only a connection that
presents it (within HANDSHAKE_TIMEOUT_S, one line) counts as a worker; anything else (a port scanner, a
stray client) is closed. With every rank on one host the root listens on loopback only.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import secrets
import selectors
import socket
import subprocess
import sys
import threading
import time

from dmoe.comm import LocalComm, MPIComm

HANDSHAKE_TIMEOUT_S = 60.0  # for every worker to connect and introduce itself (workers start at once)
LINE_TIMEOUT_S = 5.0  # for one connection to send its introduction line
REPORT_WAIT_S = 3.0  # how long a failing worker waits for the root to report it
# A host that loses power or its network closes nothing: TCP keepalive probes find it. Silent this long, then
# probed every KEEPALIVE_INTERVAL_S, KEEPALIVE_PROBES times unanswered: the rank is lost (about 11 s in all).
KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_PROBES = 5, 2, 3


def _candidate_addresses() -> list[str]:
    """The root's IPv4 addresses, loopback first (workers on the same host), then the rest."""
    import psutil

    addrs = ["127.0.0.1"]
    for entries in psutil.net_if_addrs().values():
        addrs += [a.address for a in entries if a.family == socket.AF_INET and a.address not in addrs]
    return addrs


def _keep_alive(conn: socket.socket) -> None:
    """Probe a quiet connection, so that a peer whose host vanished is found (its recv fails: TimeoutError)."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE_S), ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_S),
                        ("TCP_KEEPCNT", KEEPALIVE_PROBES)):
        if hasattr(socket, name):  # Linux has them all; elsewhere the system's defaults (hours) apply
            conn.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def one_line(e: BaseException) -> str:
    """An exception as the one line a user reads."""
    if isinstance(e, MemoryError):
        return "out of memory" + (f": {e}" if str(e) else "")
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


class Supervisor:
    """Create on every rank right after MPI starts; `fail` on any rank's error; `close` when done."""

    def __init__(self, comm: LocalComm | MPIComm) -> None:
        self.comm = comm
        self.closing = False
        self._peers: dict[socket.socket, tuple[int, str]] = {}
        self._root: socket.socket | None = None
        self._watchdog: int | None = None  # the root's end of the pipe to its watchdog
        self._watchdog_process: subprocess.Popen[bytes] | None = None
        self.woken = threading.Event()  # worker: set when the root wakes us for its next command
        if comm.size == 1:
            return
        one_host = len(set(comm.allgather_obj(comm.host))) == 1
        if comm.rank == 0:
            nonce = secrets.token_hex(16)
            with socket.create_server(("127.0.0.1" if one_host else "0.0.0.0", 0)) as server:
                addrs = ["127.0.0.1"] if one_host else _candidate_addresses()
                comm.bcast_obj((addrs, server.getsockname()[1], nonce))
                self._accept_workers(server, nonce)
            self._start_watchdog()
        else:
            addrs, port, nonce = comm.bcast_obj(None)
            self._root = self._connect(addrs, port)
            self._root.settimeout(None)
            _keep_alive(self._root)
            self._root.sendall(f"{nonce} {comm.rank} {comm.host}\n".encode())
            threading.Thread(target=self._watch_root, daemon=True).start()

    def _accept_workers(self, server: socket.socket, nonce: str) -> None:
        """Take connections until every worker has introduced itself with the nonce, all at once (a silent
        or trickling stranger holds up nobody): each gets LINE_TIMEOUT_S for its line, the whole
        HANDSHAKE_TIMEOUT_S; strangers and garbage are closed."""
        deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S
        pending: dict[socket.socket, tuple[float, bytes]] = {}  # connection -> (its deadline, what it sent)
        with selectors.DefaultSelector() as sel:
            sel.register(server, selectors.EVENT_READ)
            try:
                while len(self._peers) < self.comm.size - 1:
                    now = time.monotonic()
                    if now >= deadline:
                        known = {rank for rank, _ in self._peers.values()}
                        missing = [r for r in range(1, self.comm.size) if r not in known]
                        raise TimeoutError(f"rank(s) {missing} did not connect to rank 0 within "
                                           f"{HANDSHAKE_TIMEOUT_S:.0f} s")
                    for conn, (until, _) in list(pending.items()):
                        if now >= until:
                            self._drop(sel, pending, conn)
                    wait = min([deadline, *(until for until, _ in pending.values())]) - now
                    for key, _ in sel.select(max(0.0, wait)):
                        if key.fileobj is server:
                            conn, _addr = server.accept()
                            conn.setblocking(False)
                            pending[conn] = (time.monotonic() + LINE_TIMEOUT_S, b"")
                            sel.register(conn, selectors.EVENT_READ)
                        else:
                            assert isinstance(key.fileobj, socket.socket)
                            self._read_introduction(key.fileobj, sel, pending, nonce)
            finally:
                for conn in pending:  # strangers, and whoever was still silent
                    conn.close()

    def _read_introduction(self, conn: socket.socket, sel: selectors.BaseSelector,
                           pending: dict[socket.socket, tuple[float, bytes]], nonce: str) -> None:
        """Read what a pending connection sent; once its line is whole, keep it as a worker or drop it."""
        until, line = pending[conn]
        try:
            chunk = conn.recv(512 - len(line))
        except OSError:
            chunk = b""
        line += chunk
        if chunk and not line.endswith(b"\n") and len(line) < 512:
            pending[conn] = (until, line)
            return
        introduced = self._introduction(line, nonce)
        if introduced is None:
            self._drop(sel, pending, conn)
            return
        sel.unregister(conn)
        del pending[conn]
        conn.setblocking(True)
        _keep_alive(conn)
        self._peers[conn] = introduced

    def _introduction(self, line: bytes, nonce: str) -> tuple[int, str] | None:
        """A worker's (rank, host) from its line, if it holds the nonce and a rank not yet taken."""
        try:
            token, rank_text, host = line.decode().split(maxsplit=2)
            rank = int(rank_text)
        except ValueError:  # garbled, or not utf-8
            return None
        known = {r for r, _ in self._peers.values()}
        if hmac.compare_digest(token.encode(), nonce.encode()) and 0 < rank < self.comm.size and rank not in known:
            return rank, host.strip()
        return None

    @staticmethod
    def _drop(sel: selectors.BaseSelector, pending: dict[socket.socket, tuple[float, bytes]],
              conn: socket.socket) -> None:
        sel.unregister(conn)
        del pending[conn]
        conn.close()

    @staticmethod
    def _connect(addrs: list[str], port: int) -> socket.socket:
        for addr in addrs:
            try:
                return socket.create_connection((addr, port), timeout=LINE_TIMEOUT_S)
            except OSError:
                continue
        raise ConnectionError(f"cannot reach rank 0 on port {port} at any of {addrs}")

    def _start_watchdog(self) -> None:
        """Hand the workers' connections to the watchdog process (watchdog.py), keeping a pipe to it."""
        control, self._watchdog = os.pipe()
        fds = [conn.fileno() for conn in self._peers]
        sys.stderr.flush()
        script = os.path.join(os.path.dirname(__file__), "watchdog.py")
        peers = [f"{conn.fileno()}:{rank}:{host}" for conn, (rank, host) in self._peers.items()]
        self._watchdog_process = subprocess.Popen(
            [sys.executable, "-I", script, str(os.getpid()), str(control), *peers], pass_fds=[control, *fds],
            start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        os.close(control)
        for conn in self._peers:
            conn.close()  # the watchdog's copies are the ones that count

    def _watch_root(self) -> None:
        """Worker: the root's disconnect means the job is over; leave quietly (the root has spoken)."""
        assert self._root is not None
        with contextlib.suppress(OSError):
            while self._root.recv(4096):  # a wake-up: the root is about to send a command
                self.woken.set()
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
                while self._root.recv(64):  # a wake-up byte may come first: the close is the answer
                    pass
                reported = True
            if not reported:
                print(f"dmoe: error: rank {self.comm.rank} ({self.comm.host}) failed: {reason}", file=sys.stderr,
                      flush=True)
        else:
            print(f"dmoe: error: {reason}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)

    def wake(self) -> None:
        """Root: wake the workers (asleep between polls for the next command) through the watchdog."""
        if self._watchdog is not None:
            with contextlib.suppress(OSError):
                os.write(self._watchdog, b"w")

    def abort(self) -> None:
        """The root is failing on its own (an exception in a library user's code): end the workers now, through
        the watchdog, rather than leave them in a collective while this process waits in MPI's finalize."""
        if self._watchdog is not None and not self.closing:
            os.close(self._watchdog)
            self._watchdog = None

    def close(self) -> None:
        """Normal end: disconnects from here on are expected."""
        self.closing = True
        if self._watchdog is not None:
            with contextlib.suppress(OSError):
                os.write(self._watchdog, b"c")
        if self._root is not None:
            self._root.close()
