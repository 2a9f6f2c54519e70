"""Hosts for multi-host tests and benchmarks on one machine: network namespaces (a veth pair each, on a
bridge, each with its own hostname), optionally rate-limited with `tc ... tbf`, and an ssh-like launcher so
that MPI starts ranks in them as it would on other machines (MPI over TCP: FI_PROVIDER=tcp, else MPICH
would use shared memory between the namespaces). Needs root, iproute2 and unshare."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

LAUNCHER = """#!/bin/bash
# hydra calls this like ssh: [options] HOST COMMAND...; run COMMAND in HOST's namespace, as that host
while [[ $1 == -* ]]; do shift; done
host=$1; shift
ns={tag}n$(( ${{host##*.}} - 1 ))
exec ip netns exec $ns unshare --uts bash -c "hostname $ns; $*"
"""
ENV = {"UCX_TLS": "tcp,self", "UCX_NET_DEVICES": "eth0", "FI_PROVIDER": "tcp"}


def missing() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("unshare"):
        return "needs root, iproute2 and unshare to create network namespaces"
    return None


def _sh(cmd: str) -> None:
    subprocess.run(["bash", "-c", cmd], check=True, capture_output=True, text=True)


class Hosts:
    """n namespaces named TAGn1.. at SUBNET.2.. on bridge TAGbr; a context manager that removes them."""

    def __init__(self, n: int) -> None:
        self.n, self.tag, self.subnet = n, f"dm{os.getpid() % 100000}", f"10.{77 + os.getpid() % 100}.0"
        self.launcher = ""

    def __enter__(self) -> Hosts:
        tag, net = self.tag, self.subnet
        try:
            _sh(f"ip link add {tag}br type bridge && ip addr add {net}.1/24 dev {tag}br && ip link set {tag}br up")
            for i in range(1, self.n + 1):
                _sh(f"ip netns add {tag}n{i} && ip link add {tag}v{i} type veth peer name eth0 netns {tag}n{i} && "
                    f"ip link set {tag}v{i} master {tag}br up && ip -n {tag}n{i} addr add {net}.{i + 1}/24 dev eth0 "
                    f"&& ip -n {tag}n{i} link set eth0 up && ip -n {tag}n{i} link set lo up")
        except subprocess.CalledProcessError as e:
            self.__exit__()
            raise OSError(f"cannot create network namespaces here: {e.stderr.strip()}") from None
        self._forward("-I")
        fd, self.launcher = tempfile.mkstemp(suffix="-nsexec.sh")
        with os.fdopen(fd, "w") as f:
            f.write(LAUNCHER.format(tag=tag))
        os.chmod(self.launcher, 0o755)
        return self

    def _forward(self, action: str) -> None:
        """Insert (-I) or delete (-D) the rule that lets the bridge's packets through a host running Docker (its
        iptables FORWARD policy drops them); a host without iptables has no such policy."""
        if shutil.which("iptables"):
            bridge = f"{self.tag}br"
            rule = ["FORWARD", "-i", bridge, "-o", bridge, "-j", "ACCEPT"]
            subprocess.run(["iptables", action, *rule], capture_output=True)

    def limit(self, rate: str | None) -> None:
        """Every host's outgoing traffic at `rate` (tc's units: 1gbit, 100mbit), or unlimited (None)."""
        for i in range(1, self.n + 1):
            subprocess.run(["ip", "netns", "exec", f"{self.tag}n{i}", "tc", "qdisc", "del", "dev", "eth0", "root"],
                           capture_output=True)
            if rate:
                _sh(f"ip netns exec {self.tag}n{i} tc qdisc add dev eth0 root tbf rate {rate} burst 64kb latency 50ms")

    def link(self, i: int, up: bool) -> None:
        """Host i's link (1-based) up or down: down, its packets go nowhere and nothing tells its peers."""
        _sh(f"ip link set {self.tag}v{i} {'up' if up else 'down'}")

    def mpiexec(self, ranks: int) -> list[str]:
        """The launch of `ranks` ranks spread over the hosts (round robin)."""
        hosts = ",".join(f"{self.subnet}.{i + 2}" for i in range(self.n))
        return ["mpiexec", "-launcher", "ssh", "-launcher-exec", self.launcher, "-iface", f"{self.tag}br",
                "-hosts", hosts, "-n", str(ranks)]

    def veth_bytes(self, i: int) -> int:
        """Bytes through host i's link (1-based), both ways."""
        stats = f"/sys/class/net/{self.tag}v{i}/statistics/"
        return sum(int(open(stats + f).read()) for f in ("rx_bytes", "tx_bytes"))

    def __exit__(self, *_: object) -> None:
        for i in range(1, self.n + 1):
            subprocess.run(["ip", "netns", "del", f"{self.tag}n{i}"], capture_output=True)
        subprocess.run(["ip", "link", "del", f"{self.tag}br"], capture_output=True)
        self._forward("-D")
        if self.launcher:
            os.unlink(self.launcher)
            self.launcher = ""
