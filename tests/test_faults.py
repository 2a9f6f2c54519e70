"""When one rank fails or dies, every rank stops within seconds, non-zero, and rank 0 says which and why."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from dmoe.config import ModelConfig
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


def test_killed_worker_stops_every_rank(long_model) -> None:
    marker = long_model
    proc = subprocess.Popen(["mpirun", "-n", "3", *LAUNCH, "--model", long_model, "--prompt-ids", "1,2,3",
                             "--steps", "1000000", "--max-seq-len", "200000", "--moe-split", "experts"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(_rank_pids(marker)) < 3:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"the job did not start: {proc.stderr.read()}")
            time.sleep(0.2)
        time.sleep(8)  # loaded (a few seconds) and well into generating
        assert proc.poll() is None, proc.stderr.read()
        os.kill(_rank_pids(marker)[2], signal.SIGKILL)
        _wait_all_gone(marker, proc, 10)
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert "rank 2 (" in err and "failed" in err, err


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
    # rank 1 may use 3 GB of address space; its KV cache needs 16 GB (the root's is allocated lazily)
    cfg = ModelConfig(vocab_size=256, hidden_size=64, num_hidden_layers=8, num_attention_heads=4,
                      num_key_value_heads=4, head_dim=128, moe_intermediate_size=32, num_experts=4,
                      num_experts_per_tok=2, max_position_embeddings=1 << 20)
    model = str(tmp_path / "wide-kv.m")
    write_synthetic(cfg, "q80", model, progress=False)
    args = ["--model", model, "--prompt-ids", "1,2", "--steps", "4", "--max-seq-len", str(1 << 20), "--kv-type", "f32"]
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
