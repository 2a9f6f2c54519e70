"""The root's watchdog: a small process of its own that holds the workers' supervisor connections (see
supervisor.py) and, when one breaks, says which rank failed and why, then ends the root.

Why a process and not a thread of the root: when a rank dies, the MPI launcher kills every other rank within
a millisecond or two. A thread in the root must first get the GIL, and lost that race about one time in two:
the job ended with no word of which rank failed. This process is blocked in select(), so the kernel wakes it
as soon as the worker's socket closes, at the same moment it wakes the launcher; it runs in its own session, so
the launcher's clean-up of the ranks does not kill it before it has spoken; and it imports nothing but the
standard library (it starts in milliseconds, and is run by path, not through the dmoe package).

    python watchdog.py ROOT_PID CONTROL_FD FD:RANK:HOST ...

CONTROL_FD is a pipe from the root: a byte on it means the job is ending normally (disconnects from here
on are expected); its end of file means the root is gone, and so the watchdog goes, which closes the
workers' connections and ends them too.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import sys


def watch(root_pid: int, control: int, peers: dict[socket.socket, tuple[int, str]]) -> int:
    closing = False
    reasons: dict[int, bytes] = {}
    while True:
        readable = select.select([control, *peers], [], [])[0]
        if control in readable:
            if not os.read(control, 64):
                return 0  # the root has ended (and reported whatever it had to)
            closing = True
        for conn in readable:
            if conn == control:
                continue
            rank, host = peers[conn]
            try:
                data = conn.recv(65536)
            except OSError:
                data = b""
            if data:
                reasons[rank] = reasons.get(rank, b"") + data
                continue
            del peers[conn]
            if closing and rank not in reasons:
                conn.close()
                continue
            reason = reasons.get(rank, b"").decode(errors="replace").strip() or \
                "exited unexpectedly (killed, or out of memory)"
            os.write(2, f"dmoe: error: rank {rank} ({host}) failed: {reason}\n".encode())
            conn.close()  # tells a failing worker that its reason is reported
            os.kill(root_pid, signal.SIGKILL)  # the root may be deep in a collective with the dead rank
            return 1


def main(argv: list[str]) -> int:
    root_pid, control = int(argv[0]), int(argv[1])
    peers = {}
    for spec in argv[2:]:
        fd, rank, host = spec.split(":", 2)
        peers[socket.socket(fileno=int(fd))] = (int(rank), host)
    return watch(root_pid, control, peers)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
