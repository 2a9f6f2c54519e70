"""Ranks on separate hosts over slow links, rerunnable on one machine: network namespaces stand in for
hosts (tests/netns.py), `tc ... tbf` limits each host's outgoing link, MPI runs over TCP. For each number of
hosts, link rate and --comm-type (and one --output): decode and prefill tok/s, communication ms per token
and kB sent per token per rank, beside the same ranks on shared memory; --routings root every-rank
compares broadcasting the router's choices with every rank routing for itself. Needs root and iproute2.
Writes JSON, prints a table.

    python bench/bench_network.py --model models/synth-4l-q40.m --hosts 2 4 --rates unlimited 1gbit 100mbit
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import netns  # noqa: E402


def bench(launch: list[str], args: argparse.Namespace, comm_type: str, routing: str,
          env: dict[str, str]) -> dict[str, float]:
    cmd = [*launch, sys.executable, "launch.py", "bench", "--model", args.model, "--nthreads", "1", "--prompt-len",
           "64", "--steps", str(args.steps), "--comm-type", comm_type, "--output", args.output, "--routing", routing,
           "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=1800)
    if r.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    return {k: out[k] for k in ("decode_tok_s", "prefill64_tok_s", "comm_ms_per_token", "comm_kb_per_token_per_rank")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--hosts", type=int, nargs="+", default=[2])
    p.add_argument("--rates", nargs="+", default=["unlimited", "1gbit", "100mbit"], help="tc rates, or unlimited")
    p.add_argument("--comm-types", nargs="+", default=["f32", "bf16", "q8_0"])
    p.add_argument("--routings", nargs="+", default=["root"], choices=["root", "every-rank"],
                   help="launch.py's --routing")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--output", choices=["split", "root"], default="split", help="launch.py's --output")
    p.add_argument("--out", default=os.path.join(HERE, "results", "network.json"))
    args = p.parse_args()
    if why := netns.missing():
        sys.exit(f"cannot run: {why}")
    rows = []
    variants = [(c, r) for c in args.comm_types for r in args.routings]
    for n in args.hosts:
        for comm_type, routing in variants:
            rows.append({"hosts": n, "link": "shared memory (one host)", "comm_type": comm_type, "routing": routing,
                         **bench(["mpirun", "-n", str(n)], args, comm_type, routing, dict(os.environ))})
            print(json.dumps(rows[-1]), flush=True)
        with netns.Hosts(n) as hosts:
            for rate in args.rates:
                hosts.limit(None if rate == "unlimited" else rate)
                for comm_type, routing in variants:
                    rows.append({"hosts": n, "link": f"TCP, {rate}", "comm_type": comm_type, "routing": routing,
                                 **bench(hosts.mpiexec(n), args, comm_type, routing,
                                         dict(os.environ, **netns.ENV))})
                    print(json.dumps(rows[-1]), flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"model": args.model, "steps": args.steps, "output": args.output, "rows": rows}, f, indent=1)
    print("| hosts | link | comm type | routing | decode tok/s | prefill 64 tok/s | comm ms/token | kB/token/rank |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['hosts']} | {r['link']} | {r['comm_type']} | {r['routing']} | {r['decode_tok_s']:.1f} "
              f"| {r['prefill64_tok_s']:.0f} "
              f"| {r['comm_ms_per_token']:.1f} | {r['comm_kb_per_token_per_rank']:.1f} |")


if __name__ == "__main__":
    main()
