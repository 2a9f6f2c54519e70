"""Ranks on different hosts talk over TCP: two network namespaces (veth pairs on a bridge, each with its own
hostname) stand in for two machines; MPI is launched into them the way it would be over ssh."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAG = f"dm{os.getpid() % 100000}"  # unique names: parallel runs must not collide
SUBNET = f"10.{77 + os.getpid() % 100}.0"

LAUNCHER = """#!/bin/bash
# hydra calls this like ssh: [options] HOST COMMAND...; run COMMAND in HOST's namespace, as that host
while [[ $1 == -* ]]; do shift; done
host=$1; shift
ns={tag}n$(( ${{host##*.}} - 1 ))
exec ip netns exec $ns unshare --uts bash -c "hostname $ns; $*"
"""


def _sh(cmd: str) -> None:
    subprocess.run(["bash", "-c", cmd], check=True, capture_output=True, text=True)


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory):
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("unshare"):
        pytest.skip("needs root, iproute2 and unshare to create network namespaces")
    try:
        _sh(f"ip link add {TAG}br type bridge && ip addr add {SUBNET}.1/24 dev {TAG}br && ip link set {TAG}br up")
        for i in (1, 2):
            _sh(f"ip netns add {TAG}n{i} && ip link add {TAG}v{i} type veth peer name eth0 netns {TAG}n{i} && "
                f"ip link set {TAG}v{i} master {TAG}br up && ip -n {TAG}n{i} addr add {SUBNET}.{i + 1}/24 dev eth0 && "
                f"ip -n {TAG}n{i} link set eth0 up && ip -n {TAG}n{i} link set lo up")
    except subprocess.CalledProcessError as e:
        _teardown()
        pytest.skip(f"cannot create network namespaces here: {e.stderr.strip()}")
    launcher = tmp_path_factory.mktemp("netns") / "nsexec.sh"
    launcher.write_text(LAUNCHER.format(tag=TAG))
    launcher.chmod(0o755)
    yield str(launcher)
    _teardown()


def _teardown() -> None:
    for i in (1, 2):
        subprocess.run(["ip", "netns", "del", f"{TAG}n{i}"], capture_output=True)
    subprocess.run(["ip", "link", "del", f"{TAG}br"], capture_output=True)


def _veth_bytes() -> int:
    stats = f"/sys/class/net/{TAG}v2/statistics/"
    return sum(int(open(stats + f).read()) for f in ("rx_bytes", "tx_bytes"))


def test_two_hosts_over_tcp_match_one_process(two_hosts, model_file) -> None:
    model = model_file("c", "f32")
    args = ["launch.py", "--model", model, "--prompt-ids", "1,2,3", "--steps", "40", "--temperature", "0",
            "--kv-type", "f32", "--nthreads", "1"]
    alone = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert alone.returncode == 0, alone.stderr
    env = dict(os.environ, UCX_TLS="tcp,self", UCX_NET_DEVICES="eth0", FI_PROVIDER="tcp")
    before = _veth_bytes()
    r = subprocess.run(["mpiexec", "-launcher", "ssh", "-launcher-exec", two_hosts, "-iface", f"{TAG}br",
                        "-hosts", f"{SUBNET}.2,{SUBNET}.3", "-n", "2", sys.executable, *args],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout == alone.stdout
    # 40 tokens x 2 layers x (two all-reduces of 512 B + routing) and the logits: well over 100 kB on the wire
    assert _veth_bytes() - before > 100_000
