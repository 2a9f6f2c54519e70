"""The serving benchmark of `launch.py bench --clients N`: N concurrent streams of random prompts through
the scheduler (the server's batching, without HTTP), all submitted at once; aggregate tok/s (every stream's
generated tokens over the wall time from submission to the last token, prompts included), aggregate decode
tok/s (the sum of the streams' rates after their first token: they decode side by side) and per-stream
latency: time to first token from submission, and the gaps between a stream's tokens (p50, p99)."""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

import numpy as np

from dmoe.engine import Engine
from dmoe.generation import GenerationStats
from dmoe.sampling import SamplingParams
from dmoe.scheduler import Job, Scheduler


def latency_figures(first_token_s: list[float], gaps_s: list[float]) -> dict[str, float]:
    """Median time to first token and the inter-token gaps' p50 and p99, in ms."""
    return {"ttft_p50_ms": 1e3 * float(np.median(first_token_s)),
            "itl_p50_ms": 1e3 * float(np.percentile(gaps_s, 50)) if gaps_s else 0.0,
            "itl_p99_ms": 1e3 * float(np.percentile(gaps_s, 99)) if gaps_s else 0.0}


def run_streams(engine: Engine, clients: int, prompt_len: int, steps: int, rng: np.random.Generator,
                max_pause: float | None = None) -> dict[str, Any]:
    """One run of `clients` greedy streams of `steps` tokens each (through end-of-turn tokens); max_pause: the
    scheduler's (None: its default)."""
    jobs: queue.Queue[Job] = queue.Queue()
    stopping = threading.Event()
    done: list[tuple[Job, GenerationStats]] = []

    def ended(job: Job, end: str, stats: GenerationStats) -> None:
        done.append((job, stats))
        if len(done) == clients:
            stopping.set()

    vocab = min(engine.config.vocab_size, 100_000)
    t0 = time.perf_counter()
    for _ in range(clients):
        prompt = [int(t) for t in rng.integers(0, vocab, prompt_len)]
        jobs.put(Job(False, prompt, SamplingParams(temperature=0.0), steps, [], None, ignore_eos=True))
    Scheduler(engine, ended, max_pause=max_pause).run(jobs, stopping)
    wall = max(stats.token_times[-1] for _, stats in done) - t0
    generated = sum(stats.generated_tokens for _, stats in done)
    first = [stats.token_times[0] - job.submitted for job, stats in done]
    gaps = [b - a for _, stats in done for a, b in zip(stats.token_times, stats.token_times[1:], strict=False)]
    decode = sum((len(t) - 1) / (t[-1] - t[0]) for t in (stats.token_times for _, stats in done) if len(t) > 1)
    return {"clients": clients, "aggregate_tok_s": generated / wall, "decode_tok_s": decode,
            "generated_tokens": generated, **latency_figures(first, gaps)}
