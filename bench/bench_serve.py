"""Serving through HTTP: N concurrent streaming clients against an OpenAI-compatible server (dmoe's
`launch.py serve`, started here, or any server at --url, such as llama-server), each asking for --tokens
tokens of a /v1/completions stream (greedy, ignore_eos). Reports aggregate tok/s (every client's tokens over
the wall time from the first request to the last token), time to first token from the request, and the
gaps between a stream's chunks (p50, p99), per number of clients. Writes JSON.

    python bench/bench_serve.py --model models/synth-4l-q40.m --clients 1 4 8 --tokens 64
    python bench/bench_serve.py --url http://127.0.0.1:8081 --clients 1 4 8      # e.g. llama-server -np 8
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
import urllib.parse
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from dmoe.servebench import latency_figures  # noqa: E402

WORDS = """time year people way day man thing woman life child world school state family student group country
problem hand part place case week company system program question work government number night point home water
room mother area money story fact month lot right study book eye job word business issue side kind head house
service friend father power hour game line end member law car city community name president team minute idea kid
body information back parent face others level office door health person art war history party result change
morning reason research girl guy moment air teacher force education"""


def prompt(i: int) -> str:
    """Client i's prompt: 48 words drawn with seed i (distinct prompts route to distinct experts, as real
    users' do; one prompt for all would let the batch share its experts)."""
    rng = random.Random(i)
    words = WORDS.split()
    return "Tell a story with these words: " + " ".join(rng.choice(words) for _ in range(48))


def stream(url: str, i: int, tokens: int, out: dict[str, Any]) -> None:
    """One streaming completion: the request's start, each chunk's arrival, the usage's token count."""
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    body = {"prompt": prompt(i), "max_tokens": tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    out["start"] = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    out["chunks"], out["tokens"] = [], 0
    for line in resp:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        event = json.loads(line[6:])
        if event.get("choices") and event["choices"][0].get("text"):
            out["chunks"].append(time.perf_counter())
        if event.get("usage"):
            out["tokens"] = event["usage"]["completion_tokens"]
    conn.close()


def measure(url: str, clients: int, tokens: int) -> dict[str, Any]:
    results: list[dict[str, Any]] = [{} for _ in range(clients)]
    threads = [threading.Thread(target=stream, args=(url, i, tokens, results[i])) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    t0 = min(r["start"] for r in results)
    wall = max(r["chunks"][-1] for r in results) - t0
    gaps = [b - a for r in results for a, b in zip(r["chunks"], r["chunks"][1:], strict=False)]
    generated = sum(r["tokens"] or len(r["chunks"]) for r in results)
    return {"clients": clients, "aggregate_tok_s": generated / wall, "generated_tokens": generated,
            **latency_figures([r["chunks"][0] - r["start"] for r in results], gaps)}


def start_dmoe(args: argparse.Namespace) -> tuple[subprocess.Popen[bytes], str]:
    launcher = ["mpirun", "-n", str(args.ranks)] if args.ranks > 1 else []
    cmd = [*launcher, sys.executable, os.path.join(ROOT, "launch.py"), "serve", "--model", args.model, "--port", "0",
           "--parallel", str(max(args.clients)), "--max-seq-len", str(args.max_seq_len)]
    log = open(os.path.join(args.out + ".server.log"), "wb")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, cwd=ROOT)
    deadline = time.monotonic() + 900
    while True:
        with open(log.name, errors="replace") as f:
            text = f.read()
        if m := re.search(r"at (http://\S+)/v1", text):
            return proc, m.group(1)
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            sys.exit(f"the server did not start:\n{text[-2000:]}")
        time.sleep(0.5)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--model", help="start dmoe's server on this file")
    target.add_argument("--url", help="an OpenAI-compatible server already running")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--tokens", type=int, default=64, help="tokens per request")
    p.add_argument("--ranks", type=int, default=1, help="dmoe's ranks (mpirun -n)")
    p.add_argument("--max-seq-len", type=int, default=1024, help="dmoe's context per slot")
    p.add_argument("--out", default=os.path.join(HERE, "results", "serve"))
    args = p.parse_args()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    proc, url = start_dmoe(args) if args.model else (None, args.url)
    try:
        measure(url, 1, 4)  # warm-up, untimed
        runs = []
        for n in args.clients:
            runs.append(measure(url, n, args.tokens))
            print(json.dumps(runs[-1]), flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    with open(args.out + ".json", "w") as f:
        json.dump({"target": args.model or args.url, "tokens": args.tokens, "runs": runs}, f, indent=1)
    print(f"wrote {args.out}.json")


if __name__ == "__main__":
    main()
