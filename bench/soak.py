"""The long soak and the idle check of `launch.py serve` under mpirun (issue 15): 1,000 requests from 8
concurrent clients (tests/soak.py: a fifth dropped mid-stream, a tenth malformed), then each rank's CPU over 30 s
of idle, and the time to first token of a request after that idle against one right after another request.

    python bench/soak.py --model models/x.m [--ranks 2] [--requests 1000] [--clients 8] [--idle 30]

Without --model it uses a tiny random model with Qwen3's tokenizer (made in a temporary directory).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import openai  # noqa: E402
import soak  # noqa: E402
from test_server import KEY, NAME, rank_processes, start_server  # noqa: E402


def tiny_model(directory: str) -> str:
    """conftest.text_model's model: random weights, Qwen3's tokenizer and template."""
    from dmoe.config import ModelConfig
    from dmoe.qwen_tokenizer import QWEN3_VOCAB_SIZE, build_qwen3_tokenizer_json, qwen3_chat_template
    from dmoe.synthetic import write_synthetic

    cfg = ModelConfig(vocab_size=QWEN3_VOCAB_SIZE, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, moe_intermediate_size=32, num_experts=8,
                      num_experts_per_tok=2)
    path = os.path.join(directory, "tiny-qwen3.m")
    write_synthetic(cfg, "q80", path, progress=False, tokenizer_json=build_qwen3_tokenizer_json(),
                    chat_template=qwen3_chat_template())
    return path


def ttft(client: openai.OpenAI) -> float:
    t0 = time.perf_counter()
    stream = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hello"}],
                                            max_tokens=2, temperature=0, stream=True)
    next(c for c in stream if c.choices and c.choices[0].delta.content is not None)
    elapsed = time.perf_counter() - t0
    stream.close()
    return elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--idle", type=float, default=30.0, help="seconds of idle to watch the ranks' CPU")
    p.add_argument("--out", default=str(HERE / "results" / "soak.json"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or tiny_model(tmp)
        server = start_server(model, Path(tmp) / "stderr.log", args.ranks)
        try:
            ranks = rank_processes(server)
            report = soak.soak(server.url, KEY, NAME, ranks[0].pid, args.requests, args.clients)
            client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
            warm = sorted(ttft(client) for _ in range(9))
            time.sleep(0.5)
            before = {r: q.cpu_times() for r, q in ranks.items()}
            time.sleep(args.idle)
            idle = {r: (sum(q.cpu_times()[:2]) - sum(before[r][:2])) / args.idle for r, q in ranks.items()}
            after_idle = [ttft(client)]
            for _ in range(4):  # a few more, each after a pause long enough for every rank to be asleep
                time.sleep(3)
                after_idle.append(ttft(client))
            after_idle.sort()
            rss = {r: round(q.memory_info().rss / 2**20) for r, q in ranks.items()}
        finally:
            code = server.stop()
    result = {
        "cpu": sorted({f for f in Path("/proc/cpuinfo").read_text().split() if f in ("avx2", "avx512_vnni")}),
        "requests": args.requests, "clients": args.clients, "ranks": args.ranks, "seconds": round(report.seconds, 1),
        "kinds": dict(report.kinds), "failures": report.failures, "count_problems": soak.check_counts(report),
        "metrics": {f"{n}{dict(sorted(ls))}": v for (n, ls), v in report.metrics.items()},
        "root_before_after": report.root, "root_rss_mb_every_tenth": report.rss_trace,
        "idle_cpu_fraction_by_rank": idle,
        "ttft_warm_s_median": round(warm[len(warm) // 2], 4),
        "ttft_after_idle_s_median": round(after_idle[len(after_idle) // 2], 4), "server_exit": code,
        "rss_mb_by_rank_at_end": rss,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))
    sys.exit(1 if report.failures or result["count_problems"] or code else 0)


if __name__ == "__main__":
    main()
