"""When one rank fails or dies, every rank stops within seconds, non-zero, and rank 0 says which and why."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import pytest
from processes import wait_for_output
from test_server import CONTEXT, NAME, rank_processes, start_server

from dmoe import supervisor
from dmoe.config import ModelConfig
from dmoe.supervisor import Supervisor
from dmoe.synthetic import write_synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = [sys.executable, os.path.join(ROOT, "launch.py")]


def _rank_pids(marker: str) -> dict[int, int]:
    """pid of every rank of our job, by PMI_RANK from its environment."""
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() not in f.read():
                    continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        if b"PMI_RANK" in env:
            out[int(env[b"PMI_RANK"])] = int(pid)
    return out


def _wait_all_gone(marker: str, proc: subprocess.Popen, seconds: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        if proc.poll() is not None and not _rank_pids(marker):
            return time.monotonic() - t0
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"ranks still running {seconds} s after the failure: {_rank_pids(marker)}")


def _start(cmd: list[str], marker: str, n: int) -> subprocess.Popen:
    """Start an mpirun job and wait until its n ranks run (stdout and stderr piped)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while len(_rank_pids(marker)) < n:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the job did not start: {proc.stderr.read()}")
        time.sleep(0.2)
    return proc


def test_killed_worker_stops_every_rank(long_model) -> None:
    marker = long_model
    proc = _start(["mpirun", "-n", "3", *LAUNCH, "--model", long_model, "--prompt-ids", "1,2,3", "--steps",
                   "1000000", "--max-seq-len", "200000", "--moe-split", "experts"], marker, 3)
    try:
        wait_for_output(proc)  # generating
        os.kill(_rank_pids(marker)[2], signal.SIGKILL)
        _wait_all_gone(marker, proc, 10)
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert "rank 2 (" in err and "failed" in err, err


def test_killed_root_stops_the_workers(long_model) -> None:
    marker = long_model
    proc = _start(["mpirun", "-n", "2", *LAUNCH, "--model", long_model, "--prompt-ids", "1,2,3", "--steps",
                   "1000000", "--max-seq-len", "200000"], marker, 2)
    try:
        wait_for_output(proc)
        os.kill(_rank_pids(marker)[0], signal.SIGKILL)
        _wait_all_gone(marker, proc, 10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0


def _mpmd(rank0: list[str], rank1: list[str], timeout: int = 120) -> subprocess.CompletedProcess:
    cmd = ["mpirun", "-n", "1", *rank0, ":", "-n", "1", *rank1]
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    r.elapsed = time.monotonic() - t0  # type: ignore[attr-defined]
    return r


def test_worker_that_cannot_open_the_file(long_model) -> None:
    args = ["--prompt-ids", "1,2", "--steps", "4"]
    r = _mpmd([*LAUNCH, "--model", long_model, *args], [*LAUNCH, "--model", "/nonexistent/model.m", *args])
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if "error" in ln]
    assert lines and "rank 1 (" in lines[0] and "/nonexistent/model.m: no such file" in lines[0], r.stderr


def test_worker_out_of_memory(tmp_path) -> None:
    # rank 1 may use 3 GB of address space; its KV cache needs 4 GB (the root's is allocated lazily), which the
    # host has: the engine's own check (footprint.fit_slots) lets it through
    cfg = ModelConfig(vocab_size=256, hidden_size=64, num_hidden_layers=8, num_attention_heads=4,
                      num_key_value_heads=4, head_dim=128, moe_intermediate_size=32, num_experts=4,
                      num_experts_per_tok=2, max_position_embeddings=1 << 20)
    model = str(tmp_path / "wide-kv.m")
    write_synthetic(cfg, "q80", model, progress=False)
    args = ["--model", model, "--prompt-ids", "1,2", "--steps", "4", "--max-seq-len", str(1 << 18), "--kv-type", "f32"]
    limited = ["bash", "-c", 'ulimit -v 3000000 && exec "$@"', "rank1", *LAUNCH, *args]
    r = _mpmd([*LAUNCH, *args], limited)
    assert r.returncode != 0
    assert "rank 1 (" in r.stderr and "out of memory" in r.stderr, r.stderr


def test_every_rank_rejects_a_foreign_file(tmp_path) -> None:
    bad = tmp_path / "not-a-model.m"
    bad.write_bytes(b"PK\x03\x04" + bytes(4096))
    r = subprocess.run(["mpirun", "-n", "2", *LAUNCH, "--model", str(bad), "--prompt-ids", "1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "not a GGUF/.m file" in r.stderr
    assert "Traceback" not in r.stderr


class _RootComm:
    """Rank 0 of a world of `size` on one host, for the supervisor's handshake without MPI: bcast_obj keeps
    what the root would send the workers."""

    rank, host = 0, "here"

    def __init__(self, size: int) -> None:
        self.size, self.sent, self.ready = size, None, threading.Event()

    def allgather_obj(self, obj: object) -> list[object]:
        return [obj] * self.size

    def bcast_obj(self, obj: object) -> object:
        self.sent = obj
        self.ready.set()
        return obj


def _handshake(size: int, clients: Callable[[list[str], int, str], None]) -> Supervisor:
    """Run rank 0's handshake while `clients(addrs, port, nonce)` connects to it (from another thread)."""
    comm = _RootComm(size)
    box: dict[str, object] = {}
    t = threading.Thread(target=lambda: box.update(sup=_catch(lambda: Supervisor(comm))))
    t.start()
    assert comm.ready.wait(30)
    clients(*comm.sent)
    t.join(30)
    result = box["sup"]
    if isinstance(result, BaseException):
        raise result
    return result


def _catch(fn: Callable[[], object]) -> object:
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - handed to the test's thread
        return e


def test_handshake_takes_only_workers_with_the_nonce(monkeypatch) -> None:
    """Silent connections, a trickling one, garbage, a wrong nonce and a duplicate rank are closed; the two
    workers count. Strangers are handled all at once: ten silent ones at 0.5 s each, one by one, would
    outlast the 3 s handshake. (No watchdog: its root would be this test process.)"""
    monkeypatch.setattr(supervisor, "LINE_TIMEOUT_S", 0.5)
    monkeypatch.setattr(supervisor, "HANDSHAKE_TIMEOUT_S", 3.0)
    monkeypatch.setattr(Supervisor, "_start_watchdog", lambda self: None)
    kept = []

    def clients(addrs: list[str], port: int, nonce: str) -> None:
        assert addrs == ["127.0.0.1"]  # one host: loopback only
        kept.extend(socket.create_connection((addrs[0], port)) for _ in range(10))  # silent
        trickle = socket.create_connection((addrs[0], port))
        kept.append(trickle)
        for _ in range(4):  # a byte every 0.2 s: each recv is in time, the line is not
            trickle.sendall(b"x")
            time.sleep(0.2)
        for line in (None, b"GET / HTTP/1.1\r\n\r\n", b"0123456789abcdef 1 x\n", f"{nonce} 1 host-a\n".encode(),
                     f"{nonce} 1 again\n".encode(), f"{nonce} 9 nobody\n".encode(), f"{nonce} 2 host-b\n".encode()):
            s = socket.create_connection((addrs[0], port))
            if line is not None:
                s.sendall(line)
            kept.append(s)

    sup = _handshake(3, clients)
    assert sorted(sup._peers.values()) == [(1, "host-a"), (2, "host-b")]
    sup.close()
    for s in kept:
        s.close()


def test_handshake_times_out_naming_the_missing_rank(monkeypatch) -> None:
    monkeypatch.setattr(supervisor, "HANDSHAKE_TIMEOUT_S", 1.0)
    monkeypatch.setattr(Supervisor, "_start_watchdog", lambda self: None)
    kept = []

    def clients(addrs: list[str], port: int, nonce: str) -> None:
        kept.append(socket.create_connection((addrs[0], port)))
        kept[-1].sendall(f"{nonce} 1 host-a\n".encode())

    with pytest.raises(TimeoutError, match=r"rank\(s\) \[2\] did not connect"):
        _handshake(3, clients)
    for s in kept:
        s.close()


LIBRARY_SCRIPT = """
import sys
from dmoe import Engine
from dmoe.comm import make_comm

comm = make_comm()
engine = Engine.load(sys.argv[1] if comm.rank == 0 else sys.argv[2], max_seq_len=64, comm=comm)
if engine.is_root:
    engine.forward([1, 2, 3])
    engine.close()
else:
    engine.serve_forever()
"""


def test_library_use_under_mpirun_stops_every_rank(long_model, tmp_path) -> None:
    """The README's Python use, run on 2 ranks. Rank 1 cannot open its file: no hang, rank 0 names rank 1 and
    its reason, non-zero. Rank 0 cannot (its exception is the user's to see): no hang either, non-zero.
    Both files good: it runs and ends cleanly."""
    script = tmp_path / "use.py"
    script.write_text(LIBRARY_SCRIPT)
    env = {**os.environ, "PYTHONPATH": ROOT}  # the checkout's dmoe, installed or not

    def run(rank0: str, rank1: str) -> subprocess.CompletedProcess:
        return subprocess.run(["mpirun", "-n", "2", sys.executable, str(script), rank0, rank1], capture_output=True,
                              text=True, timeout=120, env=env)

    r = run(long_model, "/nonexistent/model.m")
    assert r.returncode != 0 and "rank 1 (" in r.stderr and "no such file" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    r = run("/nonexistent/model.m", long_model)
    assert r.returncode != 0 and "no such file" in r.stderr, r.stderr
    r = run(long_model, long_model)
    assert r.returncode == 0, r.stderr


def test_killed_worker_while_serving(text_model, tmp_path) -> None:
    """kill -9 a worker in the middle of a stream: the client gets an error, not a hang; every rank exits
    within 10 s, non-zero, and rank 0 names the rank."""
    server = start_server(text_model(), tmp_path / "stderr.log", ranks=2)
    try:
        ranks = rank_processes(server)
        stream = iter(server.client().chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "Talk."}], max_tokens=CONTEXT - 64, temperature=0,
            stream=True))
        next(stream)
        ranks[1].kill()
        with pytest.raises(Exception) as e:  # the stream breaks off  # noqa: B017 - httpx's or openai's error
            for _ in stream:
                pass
        print(f"the client got {type(e.value).__name__}: {e.value}")
        t0 = time.monotonic()
        code = server.proc.wait(10)
        for p in ranks.values():
            p.wait(max(0.1, 10 - (time.monotonic() - t0)))
    finally:
        server.stop()
    assert code != 0
    assert "rank 1 (" in server.log_text() and "failed" in server.log_text(), server.log_text()


def test_killed_root_while_serving_stops_the_workers(text_model, tmp_path) -> None:
    """kill -9 of rank 0 of `serve` between requests: the worker (polling for a command, asleep) exits within
    10 s, and so does mpirun."""
    server = start_server(text_model(), tmp_path / "stderr.log", ranks=2)
    try:
        ranks = rank_processes(server)
        ranks[0].kill()
        t0 = time.monotonic()
        ranks[1].wait(10)
        server.proc.wait(max(0.1, 10 - (time.monotonic() - t0)))
    finally:
        server.stop()
    assert server.proc.returncode != 0
