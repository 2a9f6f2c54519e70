"""The root's watchdog: a small process of its own that holds the workers' supervisor connections (see
supervisor.py) and, when one breaks, says which rank failed and why, then ends the root.

Why a process and not a thread of the root: when a rank dies, the MPI launcher kills every other rank within
a millisecond or two. A thread in the root must first get the GIL, and lost that race about one time in two:
the job ended with no word of which rank failed. This process is blocked in poll(), so the kernel wakes it
as soon as the worker's socket closes, at the same moment it wakes the launcher (and when it finds the root
already gone, it still reads what the workers sent before it says nothing); it runs in its own session, so
the launcher's clean-up of the ranks does not kill it before it has spoken; and it imports nothing but the
standard library (it starts in milliseconds, and is run by path, not through the dmoe package).

    python watchdog.py ROOT_PID CONTROL_FD FD:RANK:HOST ...

CONTROL_FD is a pipe from the root: "c" on it means the job is ending normally (disconnects from here on
are expected); "w" asks to wake the workers (a byte to each: the root is about to send a command, and they
may be asleep between polls for it); its end of file means the root is gone, and so the watchdog goes,
which closes the workers' connections and ends them too.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import sys


def watch(root_pid: int, control: int, peers: dict[int, tuple[socket.socket, int, str]]) -> int:
    """peers: fd -> (connection, rank, host). Returns the exit status."""
    closing = root_gone = False
    reasons: dict[int, bytes] = {}
    poller = select.poll()
    for fd in (control, *peers):
        poller.register(fd, select.POLLIN)
    while peers:
        ready = [fd for fd, _ in poller.poll(0 if root_gone else None)]
        if not ready:
            return 0  # the root ended and no worker broke with it
        for fd in ready:
            if fd == control:
                data = os.read(control, 64)
                if not data:  # the root has ended; first look at what the workers sent meanwhile
                    root_gone = True
                    poller.unregister(control)
                closing = closing or b"c" in data
                if b"w" in data:  # wake the workers: a command follows
                    for conn, _, _ in peers.values():
                        with contextlib.suppress(OSError):
                            conn.send(b"w")
                continue
            conn, rank, host = peers[fd]
            try:
                data = conn.recv(65536)
            except TimeoutError:  # keepalive probes went unanswered (supervisor.py set them)
                data = b""
                reasons[rank] = b"lost: no answer from its host (powered off, or the network between is cut)"
            except OSError:
                data = b""
            if data:
                reasons[rank] = reasons.get(rank, b"") + data
                continue
            del peers[fd]
            poller.unregister(fd)
            if closing and rank not in reasons:
                conn.close()
                continue
            reason = reasons.get(rank, b"").decode(errors="replace").strip() or \
                "exited unexpectedly (killed, or out of memory)"
            with contextlib.suppress(OSError):
                os.write(2, f"dmoe: error: rank {rank} ({host}) failed: {reason}\n".encode())
            conn.close()  # tells a failing worker that its reason is reported
            with contextlib.suppress(ProcessLookupError):
                os.kill(root_pid, signal.SIGKILL)  # the root may be deep in a collective with the dead rank
            return 1
    while os.read(control, 64):  # every worker is done: wait for the root
        pass
    return 0


def main(argv: list[str]) -> int:
    root_pid, control = int(argv[0]), int(argv[1])
    peers = {}
    for spec in argv[2:]:
        fd, rank, host = spec.split(":", 2)
        peers[int(fd)] = (socket.socket(fileno=int(fd)), int(rank), host)
    return watch(root_pid, control, peers)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
