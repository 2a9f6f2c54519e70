"""Ranks on different hosts talk over TCP: two network namespaces (veth pairs on a bridge, each with its own
hostname) stand in for two machines; MPI is launched into them the way it would be over ssh."""

from __future__ import annotations

import os
import subprocess
import sys

import netns
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def two_hosts():
    if why := netns.missing():
        pytest.skip(why)
    try:
        with netns.Hosts(2) as hosts:
            yield hosts
    except OSError as e:
        pytest.skip(str(e))


def test_two_hosts_over_tcp_match_one_process(two_hosts, model_file) -> None:
    model = model_file("c", "f32")
    args = ["launch.py", "--model", model, "--prompt-ids", "1,2,3", "--steps", "40", "--temperature", "0",
            "--kv-type", "f32", "--nthreads", "1"]
    alone = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert alone.returncode == 0, alone.stderr
    before = two_hosts.veth_bytes(2)
    r = subprocess.run([*two_hosts.mpiexec(2), sys.executable, *args], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, **netns.ENV), timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout == alone.stdout
    # 40 tokens x 2 layers x (two all-reduces of 512 B + routing) and the logits: well over 100 kB on the wire
    assert two_hosts.veth_bytes(2) - before > 100_000


def test_compact_sums_cross_a_slow_link_in_fewer_bytes(two_hosts, model_file) -> None:
    """The short version of bench/bench_network.py: 2 hosts on a 100 Mbit/s link; with --comm-type q8_0 the
    per-layer sums put fewer bytes on the wire than f32 (the rest: routing, logits, TCP's own)."""
    model = model_file("k", "f32")
    sent = {}
    two_hosts.limit("100mbit")
    try:
        for comm_type in ("f32", "q8_0"):
            before = two_hosts.veth_bytes(2)
            r = subprocess.run([*two_hosts.mpiexec(2), sys.executable, "launch.py", "--model", model, "--prompt-ids",
                                "1,2,3", "--steps", "30", "--temperature", "0", "--nthreads", "1", "--comm-type",
                                comm_type], capture_output=True, text=True, cwd=ROOT,
                               env=dict(os.environ, **netns.ENV), timeout=180)
            assert r.returncode == 0, r.stderr[-2000:]
            sent[comm_type] = two_hosts.veth_bytes(2) - before
    finally:
        two_hosts.limit(None)
    assert sent["q8_0"] < 0.7 * sent["f32"], sent


def test_a_host_cut_off_the_network_ends_the_job(two_hosts) -> None:
    """A host that vanishes (its link down: no FIN, no RST, as when it loses power) is found by the supervisor's
    keepalive probes: the root names the lost rank and the whole job ends, instead of waiting forever."""
    proc = subprocess.Popen([*two_hosts.mpiexec(2), sys.executable, "launch.py", "serve",
                             "--port", "0", "--nthreads", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, env=dict(os.environ, **netns.ENV))
    try:
        assert proc.stderr is not None
        said = []
        for line in proc.stderr:
            said.append(line)
            if "serving" in line:
                break
        else:
            pytest.fail(f"the server did not start (exit {proc.wait()}):\n{''.join(said)}")
        two_hosts.link(2, up=False)
        _, err = proc.communicate(timeout=60)
    finally:
        two_hosts.link(2, up=True)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert "rank 1" in err and "lost: no answer from its host" in err, err[-2000:]
