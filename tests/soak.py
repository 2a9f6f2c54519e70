"""The soak: many requests from concurrent clients through the official `openai` client, a fifth dropped
mid-stream and a tenth malformed, against a running `launch.py serve`. Every well-formed request must get the
answer it gets alone; every malformed one its 4xx; /metrics must count what the clients saw; and the root's
memory, threads and file descriptors must come back to where they were. Used by test_server.py (a short run)
and bench/soak.py (1,000 requests)."""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import openai
import psutil
from prometheus_client.parser import text_string_to_metric_families

PROMPTS = [f"Item {i}: tell me about the number {i}." for i in range(6)]
MAX_TOKENS = 6
MALFORMED = ("bad JSON", "wrong type", "huge max_tokens", "lone surrogate", "40 MB body")


@dataclass
class SoakReport:
    kinds: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    metrics: dict[tuple[str, frozenset[tuple[str, str]]], float] = field(default_factory=dict)  # counted meanwhile
    root: dict[str, tuple[float, float]] = field(default_factory=dict)  # (before, after) RSS MB, threads, fds
    rss_trace: list[float] = field(default_factory=list)  # the root's RSS (MB) after every tenth of the requests
    seconds: float = 0.0


def _kind(i: int) -> str:
    """Request i's kind: 1 in 10 malformed, 2 in 10 dropped mid-stream, the rest well-formed (three shapes)."""
    return {0: "malformed", 1: "dropped", 2: "dropped"}.get(i % 10, ("chat", "stream", "completion")[i % 3])


def _ask(client: openai.OpenAI, name: str, kind: str, prompt: str) -> tuple[str, str | None]:
    """A well-formed request, greedy: (its text, finish_reason)."""
    messages = [{"role": "user", "content": prompt}]
    if kind == "chat":
        r = client.chat.completions.create(model=name, messages=messages, max_tokens=MAX_TOKENS, temperature=0)
        return r.choices[0].message.content or "", r.choices[0].finish_reason
    if kind == "stream":
        text, finish = [], None
        for chunk in client.chat.completions.create(model=name, messages=messages, max_tokens=MAX_TOKENS,
                                                    temperature=0, stream=True):
            if chunk.choices:
                text.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
        return "".join(text), finish
    r = client.completions.create(model=name, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
    return r.choices[0].text, r.choices[0].finish_reason


def _raw_post(url: str, key: str, body: bytes) -> int:
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    try:
        conn.request("POST", "/v1/chat/completions", body, {"Authorization": f"Bearer {key}",
                                                             "Content-Type": "application/json"})
        resp = conn.getresponse()
        answer = json.loads(resp.read())
        assert set(answer["error"]) == {"message", "type", "param", "code"}, answer
        return resp.status
    finally:
        conn.close()


def _malformed(client: openai.OpenAI, url: str, key: str, name: str, which: str) -> tuple[int, int]:
    """(status got, status expected) of one malformed request."""
    messages = [{"role": "user", "content": "Hi"}]
    if which == "bad JSON":
        return _raw_post(url, key, b'{"messages": [{"role": "user", "content": "Hi"}'), 400
    if which == "lone surrogate":
        return _raw_post(url, key, b'{"messages": [{"role": "user", "content": "\\udc80 Hi"}]}'), 400
    if which == "40 MB body":
        return _raw_post(url, key, b'{"messages": "' + b"x" * (40 << 20) + b'"}'), 413
    kw: dict[str, Any] = {"temperature": "hot"} if which == "wrong type" else {"max_tokens": 10**12}
    try:
        client.chat.completions.create(model=name, messages=messages, **kw)
    except openai.BadRequestError as e:
        return e.status_code, 400
    return 200, 400


def _drop(client: openai.OpenAI, name: str, prompt: str) -> None:
    """Stream a long answer and hang up after its first chunk."""
    stream = client.chat.completions.create(model=name, messages=[{"role": "user", "content": prompt}],
                                            max_tokens=400, temperature=0, stream=True)
    next(iter(stream))
    stream.close()


def _metrics(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """/metrics' counters: (sample name, labels) -> value."""
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name.endswith("_total")}


def _root_state(p: psutil.Process) -> tuple[float, float, float]:
    return p.memory_info().rss / 2**20, p.num_threads(), p.num_fds()


def soak(url: str, key: str, name: str, root_pid: int, requests: int, clients: int) -> SoakReport:
    """Run the soak against the server at url (its root rank is root_pid); failures are listed, not raised."""
    report = SoakReport()
    root = psutil.Process(root_pid)
    with openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120) as c:
        expected = {(kind, p): _ask(c, name, kind, p) for kind in ("chat", "stream", "completion") for p in PROMPTS}
    before_metrics, before = _metrics(url), _root_state(root)

    def one(i: int) -> None:
        kind, prompt = _kind(i), PROMPTS[i % len(PROMPTS)]
        with openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120) as c:
            try:
                if kind == "malformed":
                    which = MALFORMED[i // 10 % len(MALFORMED)]
                    got, want = _malformed(c, url, key, name, which)
                    kind = f"malformed {which}"
                    if got != want:
                        report.failures.append(f"request {i} ({which}): status {got}, expected {want}")
                elif kind == "dropped":
                    _drop(c, name, prompt)
                elif (answer := _ask(c, name, kind, prompt)) != expected[kind, prompt]:
                    report.failures.append(f"request {i} ({kind}): {answer} != alone {expected[kind, prompt]}")
            except Exception as e:  # noqa: BLE001 - every failure is reported with its request
                report.failures.append(f"request {i} ({kind}): {type(e).__name__}: {e}")
        with lock:
            report.kinds[kind] += 1
            if sum(report.kinds.values()) % max(1, requests // 10) == 0:
                report.rss_trace.append(round(root.memory_info().rss / 2**20, 1))

    lock = threading.Lock()
    t0 = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(requests)))
    report.seconds = time.monotonic() - t0
    deadline = time.monotonic() + 30  # a dropped stream is counted once the server notices the hang-up
    while True:
        after_metrics = _metrics(url)
        report.metrics = {k: v - before_metrics.get(k, 0.0) for k, v in after_metrics.items()
                          if v != before_metrics.get(k, 0.0)}
        if not check_counts(report) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    deadline = time.monotonic() + 30  # handler threads of closed connections end on their own
    while (after := _root_state(root))[1:] != before[1:] and time.monotonic() < deadline:
        time.sleep(0.2)
    report.root = {k: (b, a) for k, b, a in zip(("rss MB", "threads", "fds"), before, after, strict=True)}
    return report


def check_counts(report: SoakReport) -> list[str]:
    """What /metrics counted against what the clients did."""
    k = report.kinds

    def counted(name: str, **labels: str) -> float:
        return sum(v for (n, ls), v in report.metrics.items() if n == name and set(labels.items()) <= ls)

    def answers(status: str) -> float:
        return sum(counted("dmoe_http_responses_total", endpoint=e, status=status)
                   for e in ("/v1/chat/completions", "/v1/completions"))

    generated = k["chat"] + k["stream"] + k["completion"] + k["dropped"]
    expected = {"200": generated, "413": k["malformed 40 MB body"],
                "400": sum(n for kind, n in k.items() if kind.startswith("malformed")) - k["malformed 40 MB body"]}
    problems = [f"/metrics counted {answers(status)} answers {status}, the clients got {n}"
                for status, n in expected.items() if answers(status) != n]
    if counted("dmoe_generations_total") != generated:
        problems.append(f"/metrics counted {counted('dmoe_generations_total')} generations, expected {generated}")
    return problems
