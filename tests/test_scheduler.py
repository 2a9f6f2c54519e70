"""The scheduler's step budget: a prompt that arrives while another request decodes is read in chunks sized by
--max-pause, and each request's tokens stay what it gets alone, whatever the chunks."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence

import numpy as np

from dmoe.engine import Engine
from dmoe.generation import GenerationStats
from dmoe.sampling import SamplingParams
from dmoe.scheduler import MIN_CHUNK, STEP_TOKENS, Delta, Job, Scheduler

SHORT, LONG = 8, 600  # prompt tokens: the first decodes while most of the second is still to read


def serve(engine: Engine, prompts: list[list[int]], max_pause: float | None) -> tuple[list[str], list[list[int]]]:
    """Run greedy requests for the prompts (queued together) to the end; each one's text, and every step's
    sequence lengths in order."""
    steps: list[list[int]] = []
    step = engine.step

    def recorded(batch: Sequence[tuple[int, Sequence[int]]], *args: object, **kwargs: object) -> list[np.ndarray]:
        steps.append([len(ids) for _, ids in batch])
        return step(batch, *args, **kwargs)

    engine.step = recorded  # type: ignore[method-assign]
    jobs: queue.Queue[Job] = queue.Queue()
    stopping = threading.Event()
    ended: list[Job] = []

    def end(job: Job, how: str, stats: GenerationStats) -> None:
        ended.append(job)
        if len(ended) == len(prompts):
            stopping.set()

    queued = [Job(False, p, SamplingParams(temperature=0.0), 12, [], None, ignore_eos=True) for p in prompts]
    for job in queued:
        jobs.put(job)
    Scheduler(engine, end, max_pause=max_pause).run(jobs, stopping)
    engine.step = step  # type: ignore[method-assign]
    engine.reset()
    texts = []
    for job in queued:
        events = []
        while not job.events.empty():
            events.append(job.events.get())
        texts.append("".join(e.content for e in events if isinstance(e, Delta)))
    return texts, steps


def test_a_prompt_beside_a_decoding_stream_is_read_in_chunks_of_the_pause(text_model: Callable[..., str]) -> None:
    engine = Engine.load(text_model(), max_seq_len=1024, kv_type="f32", nthreads=1, parallel=2)
    rng = np.random.default_rng(3)
    short, long = ([int(t) for t in rng.integers(0, 100_000, n)] for n in (SHORT, LONG))
    alone = [serve(engine, [p], None)[0][0] for p in (short, long)]

    # No rate a step could reach meets a pause of 1 ns: beside the decoding stream, chunks of MIN_CHUNK
    texts, steps = serve(engine, [short, long], 1e-9)
    assert texts == alone
    first = STEP_TOKENS - SHORT  # the first step: nobody decodes yet, the whole budget
    assert steps[0] == [SHORT, first]
    chunks = [s[1] for s in steps[1:] if len(s) == 2 and s[1] > 1]  # then both decode: [1, 1]
    assert all(s[0] == 1 for s in steps[1:])  # the short request decodes every step (the long one once alone)
    assert sum(chunks) == LONG - first and chunks[:-1] == [MIN_CHUNK] * (len(chunks) - 1)

    # A pause no step takes: the whole budget beside the decoding stream
    texts, steps = serve(engine, [short, long], 1e9)
    assert texts == alone
    assert steps[0] == [SHORT, first] and steps[1] == [1, STEP_TOKENS - 1]
