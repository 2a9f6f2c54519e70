"""The OpenAI-compatible server under `mpirun -n 2`, driven by the official openai client and raw HTTP.

The model is tiny and random: its text is noise, but the tokenizer, chat template, stop tokens, cache
and protocol are the real ones, which is what these tests are about."""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import psutil
import pytest
import soak

from dmoe.modelfile import ModelFile
from dmoe.qwen_tokenizer import qwen3_chat_template
from dmoe.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-test-key"
NAME = "tiny"
CONTEXT = 1024
GREEDY: dict[str, Any] = {"temperature": 0.0}
PARALLEL = 4  # serve's default --parallel
IDLE_S = 5.0  # how long the idle test watches the ranks (bench/soak.py watches 30 s)
STALL_S = 2.0  # the servers' --stall-timeout


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def client(self, **kw: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", KEY), max_retries=0, timeout=120,
                             **kw)

    def request(self, method: str, path: str, body: bytes | dict[str, Any] | None = None,
                key: str | None = KEY) -> tuple[int, Any]:
        """One raw HTTP request: (status, decoded JSON body)."""
        u = urllib.parse.urlparse(self.url)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
        conn.request(method, path, data, headers)
        resp = conn.getresponse()
        out = resp.status, json.loads(resp.read())
        conn.close()
        return out

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


def start_server(model: str, log: Path, ranks: int) -> Server:
    launcher = ["mpirun", "-n", str(ranks)] if ranks > 1 else []
    cmd = [*launcher, sys.executable, str(ROOT / "launch.py"), "serve", "--model", model, "--port", "0",
           "--max-seq-len", str(CONTEXT), "--model-name", NAME, "--api-key", KEY, "--verbose",
           "--stall-timeout", str(STALL_S)]
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT)
    server = Server(proc, "", log)
    deadline = time.monotonic() + 180
    while not (m := re.search(r"at (http://\S+)/v1", server.log_text())):
        if proc.poll() is not None or time.monotonic() > deadline:
            server.stop()
            pytest.fail(f"the server did not start:\n{server.log_text()}")
        time.sleep(0.2)
    server.url = m.group(1)
    assert server.request("GET", "/health", key=None) == (200, {"status": "ok", "ranks": ranks})
    return server


@pytest.fixture(scope="module")
def server(text_model: Callable[..., str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(text_model(), tmp_path_factory.mktemp("server") / "stderr.log", ranks=2)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def tok(text_model: Callable[..., str]) -> Tokenizer:
    t = Tokenizer.from_gguf_fields(ModelFile(text_model()).metadata)
    assert t is not None
    return t


def chat(client: openai.OpenAI, text: str, **kw: Any) -> Any:
    return client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": text}], **kw)


def stream_chat(client: openai.OpenAI, text: str, **kw: Any) -> tuple[str, str, str | None, list[Any]]:
    """(content, reasoning, finish_reason, chunks) of a streamed chat completion."""
    chunks = list(chat(client, text, stream=True, **kw))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    finish = next((c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason), None)
    return content, reasoning, finish, chunks


def test_models_and_health(server: Server) -> None:
    models = server.client().models.list().data
    assert [m.id for m in models] == [NAME]
    assert server.client().models.retrieve(NAME).id == NAME


def test_chat_usage_and_streaming(server: Server, tok: Tokenizer) -> None:
    client = server.client()
    text = "Why is the sky blue?"
    r = chat(client, text, max_tokens=8, **GREEDY)
    prompt = tok.encode(tok.render_chat([{"role": "user", "content": text}]))
    assert r.object == "chat.completion" and r.model == NAME
    assert r.choices[0].finish_reason in ("stop", "length")
    assert isinstance(r.choices[0].message.content, str) and r.choices[0].message.content
    assert r.usage.prompt_tokens == len(prompt)
    assert 1 <= r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    # the same request streamed: the same text, and all but the last prompt token come from the cache
    content, _, finish, chunks = stream_chat(client, text, max_tokens=8, stream_options={"include_usage": True},
                                             **GREEDY)
    assert content == r.choices[0].message.content and finish == r.choices[0].finish_reason
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens == r.usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens == len(prompt) - 1

    # a follow-up turn reuses the cache up to the first answer
    follow = [{"role": "user", "content": text}, {"role": "assistant", "content": r.choices[0].message.content},
              {"role": "user", "content": "And at sunset?"}]
    r2 = client.chat.completions.create(model=NAME, messages=follow, max_tokens=2, **GREEDY)
    assert r2.usage.prompt_tokens_details.cached_tokens >= len(prompt)


def test_completions(server: Server, tok: Tokenizer) -> None:
    client = server.client()
    r = client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=6, **GREEDY)
    assert r.object == "text_completion" and r.choices[0].text
    assert r.usage.prompt_tokens == len(tok.encode("Once upon a time"))
    by_ids = client.completions.create(model=NAME, prompt=tok.encode("Once upon a time"), max_tokens=6, **GREEDY)
    assert by_ids.choices[0].text == r.choices[0].text
    streamed = client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=6, stream=True, **GREEDY)
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text


def test_seed_reproducible(server: Server) -> None:
    client = server.client()

    def sample(seed: int) -> str:
        r = chat(client, "Tell me a story.", max_tokens=12, temperature=1.0, top_p=0.9, seed=seed,
                 extra_body={"top_k": 50, "min_p": 0.01, "repetition_penalty": 1.1})
        return r.choices[0].message.content

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_stop_strings(server: Server) -> None:
    client = server.client()
    full = client.completions.create(model=NAME, prompt="Count: one two", max_tokens=16, **GREEDY).choices[0].text
    assert len(full) >= 8
    stop = full[len(full) // 2:len(full) // 2 + 3]
    for given in (stop, [stop, "never appears in this text \u2603"]):
        r = client.completions.create(model=NAME, prompt="Count: one two", max_tokens=16, stop=given, **GREEDY)
        assert r.choices[0].text == full[:full.find(stop)] and r.choices[0].finish_reason == "stop"
    content, _, finish, _ = stream_chat(client, "Hello", max_tokens=16, **GREEDY)
    stop = content[len(content) // 2:len(content) // 2 + 2]
    cut, _, finish, _ = stream_chat(client, "Hello", max_tokens=16, stop=stop, **GREEDY)
    assert (cut, finish) == (content[:content.find(stop)], "stop")


def test_thinking_off_leaves_no_reasoning(server: Server) -> None:
    r = chat(server.client(), "Hi", max_tokens=4, extra_body={"chat_template_kwargs": {"enable_thinking": False}},
             **GREEDY)
    assert r.choices[0].message.content and getattr(r.choices[0].message, "reasoning_content", None) is None


def test_concurrent_clients_get_what_each_gets_alone(server: Server) -> None:
    """8 clients on 4 slots: batched in shared steps (and queued for a slot), each gets its text alone."""
    client = server.client()
    prompts = [f"Question number {i}: what is {i} + {i}?" for i in range(4)]

    def ask(i: int) -> str:
        if i % 2:  # half of them streamed
            return stream_chat(client, prompts[i], max_tokens=10, **GREEDY)[0]
        return chat(client, prompts[i], max_tokens=10, **GREEDY).choices[0].message.content

    alone = [ask(i) for i in range(4)]
    assert len(set(alone)) == 4
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, [*range(4), *range(4)]))
    assert together == alone + alone


def test_dropped_streams_free_their_slots(server: Server) -> None:
    """Every slot taken by a long stream whose client then leaves: the next request still gets its answer."""
    u = urllib.parse.urlparse(server.url)
    body = {"model": NAME, "messages": [{"role": "user", "content": "Talk for a long time."}], "stream": True,
            "max_tokens": CONTEXT - 64, **GREEDY}
    before = server.log_text().count("cancelled; ")
    conns = []
    for _ in range(PARALLEL):
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Authorization": f"Bearer {KEY}"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read(200).startswith(b"data: ")
        conns.append((conn, resp))
    for conn, resp in conns:
        resp.close()  # mid-stream
        conn.close()
    t0 = time.perf_counter()
    r = chat(server.client(), "Short one.", max_tokens=3, **GREEDY)
    assert r.choices[0].message.content
    deadline = time.monotonic() + 30
    while len(cancelled := re.findall(r"cancelled; .* generated (\d+) tokens", server.log_text())) < before + PARALLEL:
        assert time.monotonic() < deadline, server.log_text()
        time.sleep(0.1)
    assert all(int(n) < CONTEXT - 64 for n in cancelled)
    print(f"request after {PARALLEL} dropped streams answered in {time.perf_counter() - t0:.2f} s")


def test_prefix_reuse_from_any_slot(server: Server, tok: Tokenizer) -> None:
    """A prompt seen two requests ago (another prompt between) still comes from the cache."""
    client = server.client()
    first = "Tell me about the history of tea in great detail."
    prompt = tok.encode(tok.render_chat([{"role": "user", "content": first}]))
    chat(client, first, max_tokens=2, **GREEDY)
    chat(client, "Something else entirely, about rivers.", max_tokens=2, **GREEDY)
    again = chat(client, first, max_tokens=2, **GREEDY)
    assert again.usage.prompt_tokens_details.cached_tokens == len(prompt) - 1


def test_bad_requests_get_openai_errors(server: Server) -> None:
    msgs = [{"role": "user", "content": "Hi"}]
    cases: list[tuple[str, bytes | dict[str, Any], int, str | None]] = [
        ("/v1/chat/completions", b"{not json", 400, None),
        ("/v1/chat/completions", b"[1, 2]", 400, None),
        ("/v1/chat/completions", {"model": NAME}, 400, "messages"),
        ("/v1/chat/completions", {"messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
        ("/v1/chat/completions", {"messages": msgs, "temperature": "hot"}, 400, "temperature"),
        ("/v1/chat/completions", {"messages": msgs, "max_tokens": 1.5}, 400, "max_tokens"),
        ("/v1/chat/completions", {"messages": msgs, "max_tokens": 0}, 400, "max_tokens"),
        ("/v1/chat/completions", {"messages": msgs, "max_tokens": CONTEXT}, 400, "max_tokens"),
        ("/v1/chat/completions", {"messages": msgs, "top_p": 1.5}, 400, "top_p"),
        ("/v1/chat/completions", {"messages": msgs, "stop": [1]}, 400, "stop"),
        ("/v1/chat/completions", {"messages": msgs, "stream": "yes"}, 400, "stream"),
        ("/v1/chat/completions", {"messages": msgs, "n": 2}, 400, "n"),
        ("/v1/completions", {"prompt": [1] * CONTEXT}, 400, "prompt"),
        ("/v1/completions", {"prompt": [10**9]}, 400, "prompt"),
        ("/v1/completions", {"prompt": {"text": "x"}}, 400, "prompt"),
        ("/v1/embeddings", {"input": "x"}, 404, None),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a \\ud800 b"}]}', 400,
         "messages[0].content"),
        ("/v1/chat/completions", b"[" * 100_000 + b"]" * 100_000, 400, None),
    ]
    for path, body, status, param in cases:
        got, answer = server.request("POST", path, body)
        assert (got, answer["error"]["param"]) == (status, param), (path, body, answer)
        assert set(answer["error"]) == {"message", "type", "param", "code"} and answer["error"]["message"]
    deep = b'{"messages": ' + b"[" * 1200 + b"]" * 1200 + b"}"  # json parses it on Python 3.12+, not on 3.11
    assert server.request("POST", "/v1/chat/completions", deep)[0] == 400
    got, answer = server.request("POST", "/v1/completions", {"prompt": [1] * CONTEXT})
    assert answer["error"]["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        chat(server.client(), "Hi", max_tokens=CONTEXT * 2)
    assert e.value.status_code == 400 and e.value.body["code"] == "context_length_exceeded"
    # still serving, and lenient with fields it does not know
    r = chat(server.client(), "Hi", max_tokens=2, extra_body={"some_new_field": {"x": 1}}, user="u1", **GREEDY)
    assert r.usage.completion_tokens >= 1


def raw_post(server: Server, head: bytes, body: bytes = b"") -> tuple[int, dict[str, Any]]:
    """Send a request as raw bytes (any Content-Length, any body) and read the answer: (status, JSON)."""
    u = urllib.parse.urlparse(server.url)
    with socket.create_connection((u.hostname, u.port), timeout=60) as s:
        s.sendall(head + b"\r\n\r\n")
        s.sendall(body)
        resp = http.client.HTTPResponse(s)
        resp.begin()
        return resp.status, json.loads(resp.read())


def test_a_body_too_large_is_answered(server: Server) -> None:
    """40 MB: refused with a 413 the client reads (the body is drained, not reset under its sender)."""
    body = b'{"messages": "' + b"x" * (40 << 20) + b'"}'
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n" \
           f"Content-Length: {len(body)}"
    status, answer = raw_post(server, head.encode(), body)
    assert status == 413 and "larger than" in answer["error"]["message"]


def test_api_key_is_checked_before_the_body(server: Server) -> None:
    """A wrong key announcing 32 MB and sending none is refused after a brief drain, not waited for."""
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\n" \
           b"Content-Length: 33554432"
    assert raw_post(server, head)[0] == 401


def test_api_key(server: Server) -> None:
    for key in ("wrong", None):
        status, answer = server.request("GET", "/v1/models", key=key)
        assert status == 401 and answer["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        chat(server.client(api_key="wrong"), "Hi", max_tokens=2)
    assert server.request("GET", "/health", key=None)[0] == 200


def scrape(server: Server) -> dict[str, float]:
    """/metrics through prometheus_client's own parser: sample name (with its labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(server.url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    return {s.name + "".join(f"|{k}={v}" for k, v in sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_count_latency_and_kv_use(server: Server) -> None:
    before = scrape(server)
    r = chat(server.client(), "Count to five.", max_tokens=6, extra_body={"ignore_eos": True}, **GREEDY)
    again = chat(server.client(), "Count to five.", max_tokens=6, extra_body={"ignore_eos": True}, **GREEDY)
    with urllib.request.urlopen(server.url + "/", timeout=30) as page:  # the chat page, counted as itself
        assert page.status == 200
    after = scrape(server)

    def moved(name: str) -> float:
        return after[name] - before.get(name, 0.0)

    assert r.usage.completion_tokens == again.usage.completion_tokens == 6  # ignore_eos: no early stop
    assert moved("dmoe_time_to_first_token_seconds_count") == 2
    assert moved("dmoe_inter_token_latency_seconds_count") == 2 * 5
    assert moved("dmoe_completion_tokens_total") == 12
    cached = [x.usage.prompt_tokens_details.cached_tokens for x in (r, again)]
    assert moved("dmoe_cached_prompt_tokens_total") == sum(cached) and cached[1] == again.usage.prompt_tokens - 1
    assert moved("dmoe_http_responses_total|endpoint=/|status=200") == 1
    assert after["dmoe_requests_running"] == after["dmoe_requests_waiting"] == 0
    assert after["dmoe_kv_cache_capacity_tokens"] == PARALLEL * CONTEXT
    assert r.usage.total_tokens - 1 <= after["dmoe_kv_cache_tokens"] <= PARALLEL * CONTEXT  # the last is not run
    assert after["dmoe_root_comm_seconds"] > 0  # two ranks
    # every rank's own figures, gathered while serving (the first step's report at least)
    for rank in ("0", "1"):
        assert after[f"dmoe_rank_comm_seconds|rank={rank}"] > 0
        assert 0.05 < after[f"dmoe_rank_peak_rss_gigabytes|rank={rank}"] < 64


def test_tokenize_and_detokenize(server: Server, tok: Tokenizer) -> None:
    """vLLM's /tokenize and /detokenize against the model's own tokenizer and template."""
    status, r = server.request("POST", "/tokenize", {"model": NAME, "prompt": "Hello there, world"})
    assert status == 200 and r["tokens"] == tok.encode("Hello there, world") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == CONTEXT
    msgs = [{"role": "user", "content": "Hi"}]
    status, r = server.request("POST", "/tokenize", {"messages": msgs})
    assert status == 200 and r["tokens"] == tok.encode(tok.render_chat(msgs, enable_thinking=True))
    status, back = server.request("POST", "/detokenize", {"tokens": r["tokens"]})
    assert status == 200 and back["prompt"] == tok.render_chat(msgs, enable_thinking=True)
    for path, body, param in (("/tokenize", {"prompt": 5}, "prompt"), ("/tokenize", {"messages": []}, "messages"),
                              ("/detokenize", {"tokens": [10**9]}, "tokens"), ("/detokenize", {}, "tokens")):
        status, answer = server.request("POST", path, body)
        assert (status, answer["error"]["param"]) == (400, param), (path, body, answer)
    assert server.request("POST", "/tokenize", {"prompt": "x"}, key="wrong")[0] == 401


def rank_processes(server: Server) -> dict[int, psutil.Process]:
    """The job's rank processes (mpirun's descendants running launch.py; not rank 0's watchdog), by PMI_RANK."""
    ranks = {}
    for p in psutil.Process(server.proc.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "PMI_RANK" in (env := p.environ()) and any(a.endswith("launch.py") for a in p.cmdline()):
                ranks[int(env["PMI_RANK"])] = p
    return ranks


def test_idle_ranks_sleep(server: Server) -> None:
    """Between requests no rank spins: the worker polls the root's next command asleep (MPI's own wait spins a
    core at 100%), and answers the next request as before."""
    assert chat(server.client(), "Wake up.", max_tokens=2, **GREEDY).choices
    ranks = rank_processes(server)
    assert sorted(ranks) == [0, 1]
    time.sleep(0.5)  # past the worker's hot spin after a command (comm.SPIN_S): what follows is idle
    before = {r: p.cpu_times() for r, p in ranks.items()}
    t0 = time.monotonic()
    time.sleep(IDLE_S)  # the measurement is of this wait
    elapsed = time.monotonic() - t0
    for r, p in ranks.items():
        after = p.cpu_times()
        busy = (after.user + after.system - before[r].user - before[r].system) / elapsed
        assert busy < 0.05, f"rank {r} used {busy:.1%} of a core while idle"  # spinning: 100%
    assert chat(server.client(), "Still there?", max_tokens=2, **GREEDY).choices


def test_health_reports_a_stopped_rank(server: Server) -> None:
    """A worker that stops (SIGSTOP) hangs the forward step in a collective: /health turns 503 and says so, and
    once the worker runs again the request completes and /health is 200 again."""
    worker = rank_processes(server)[1]
    with ThreadPoolExecutor(1) as pool:
        worker.suspend()
        try:
            answer = pool.submit(chat, server.client(), "Hi", max_tokens=4, **GREEDY)
            deadline = time.monotonic() + 60
            while (health := server.request("GET", "/health", key=None))[0] == 200:
                assert time.monotonic() < deadline, "the stall was never reported"
                time.sleep(0.1)
        finally:
            worker.resume()
        assert answer.result(timeout=60).usage.completion_tokens >= 1
    assert health[0] == 503 and health[1]["status"] == "stalled" and "rank" in health[1]["message"], health
    assert server.request("GET", "/health", key=None) == (200, {"status": "ok", "ranks": 2})


def test_soak(server: Server) -> None:
    """A short soak (bench/soak.py runs 1,000 requests): 8 clients, 60 requests, a fifth dropped mid-stream,
    a tenth malformed; every answer right, /metrics in step, the root's threads and descriptors back."""
    report = soak.soak(server.url, KEY, NAME, rank_processes(server)[0].pid, requests=60, clients=8)
    assert not report.failures, report.failures
    assert not soak.check_counts(report), soak.check_counts(report)
    for what, (before, after) in report.root.items():
        assert after <= before + (64 if what == "rss MB" else 0), (what, before, after)


WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                   "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                  "required": ["city", "days"], "additionalProperties": False}
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                                 "parameters": WEATHER_SCHEMA}}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["zone"]}}}
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}


@pytest.mark.parametrize("choice", [{"type": "function", "function": {"name": "get_weather"}}, "required"])
def test_forced_tool_calls_are_valid_and_stream_the_same(server: Server, choice: Any) -> None:
    """Even a random model, made to call a tool, gives a call to a given tool with arguments valid for its schema
    (the grammar holds it); streamed, the deltas reassemble to the same call."""
    import jsonschema

    client = server.client()
    kw: dict[str, Any] = dict(tools=[WEATHER_TOOL, TIME_TOOL], tool_choice=choice, max_tokens=96,
                              extra_body=NO_THINKING, **GREEDY)
    r = chat(client, "What is the weather in Paris?", **kw)
    assert r.choices[0].finish_reason == "tool_calls", r
    calls = r.choices[0].message.tool_calls
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER_TOOL, TIME_TOOL)}
    for call in calls:
        assert call.id.startswith("call_") and call.type == "function"
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    if isinstance(choice, dict):
        assert {c.function.name for c in calls} == {"get_weather"}
    streamed: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in chat(client, "What is the weather in Paris?", stream=True, **kw):
        for d in chunk.choices[0].delta.tool_calls or []:
            got = streamed.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
            got["id"] += d.id or ""
            got["name"] += d.function.name or ""
            got["arguments"] += d.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert [(s["name"], s["arguments"]) for _, s in sorted(streamed.items())] == \
        [(c.function.name, c.function.arguments) for c in calls]
    assert all(s["id"].startswith("call_") for s in streamed.values())


def test_response_format_json_schema_and_object(server: Server) -> None:
    """json_schema (strict) output validates against the schema, at temperature 0 and sampled; json_object is a
    JSON object; and the usual answer comes back when thinking is on and the model never closes it."""
    import jsonschema

    schema = {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 10}, "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["red", "green"]}, "maxItems": 3}},
        "required": ["name", "ok", "tags"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "thing", "schema": schema, "strict": True}}
    for sampling in (GREEDY, {"temperature": 1.0, "seed": 7}):
        r = chat(server.client(), "Describe a thing.", response_format=fmt, max_tokens=96, extra_body=NO_THINKING,
                 **sampling)
        assert r.choices[0].finish_reason == "stop", r
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    # any object: a random model's keys can run on to max_tokens; this prompt's greedy answer ends (a fixed model)
    r = chat(server.client(), "Hi", response_format={"type": "json_object"}, max_tokens=96,
             extra_body=NO_THINKING, **GREEDY)
    assert r.choices[0].finish_reason == "stop" and isinstance(json.loads(r.choices[0].message.content), dict)


def test_bad_tools_and_schemas_get_400s(server: Server) -> None:
    msgs = [{"role": "user", "content": "Hi"}]
    cases: list[tuple[dict[str, Any], str]] = [
        ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
         "response_format.json_schema.schema"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "not json"}}]},
            {"role": "user", "content": "Hi"}]}, "messages[0].tool_calls[0].function.arguments"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
    ]
    for extra, param in cases:
        status, answer = server.request("POST", "/v1/chat/completions", {"messages": msgs, **extra})
        assert (status, answer["error"]["param"]) == (400, param), (extra, answer)


def test_tool_history_renders_as_transformers(server: Server, tok: Tokenizer) -> None:
    """A conversation with tool calls and tool results, as an OpenAI client sends it, is the prompt that
    transformers' apply_chat_template makes of it (read back through /tokenize)."""
    import tokenizers
    from test_toolcalls import HF_CHAT, HF_MORE, OPENAI_CHAT, OPENAI_MORE, TOOLS
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer.from_str(tok.to_json()))
    expected = hf.apply_chat_template(HF_CHAT + HF_MORE, tools=TOOLS, chat_template=qwen3_chat_template(),
                                      tokenize=False, add_generation_prompt=True)
    status, answer = server.request("POST", "/tokenize", {"messages": OPENAI_CHAT + OPENAI_MORE, "tools": TOOLS})
    assert status == 200, answer
    assert tok.decode(answer["tokens"], skip_special_tokens=False) == expected


def test_sigterm_ends_streams_with_an_error_and_stops_cleanly(server: Server) -> None:
    """SIGTERM mid-stream: the stream ends with a 503 error event (the openai client raises it), not a reset
    connection; the server exits 0."""
    stream = iter(chat(server.client(), "Talk for a long time.", max_tokens=CONTEXT - 64, stream=True, **GREEDY))
    next(stream)
    server.proc.send_signal(signal.SIGTERM)
    with pytest.raises(openai.APIError, match="shutting down"):
        for _ in stream:
            pass
    assert server.proc.wait(30) == 0  # a second signal (stop) could land after the handlers are put back
    assert "server stopped" in server.log_text()


def thinking_template() -> str:
    """Qwen3's template as the thinking-only Qwen3 models have it: the prompt opens <think> for the model."""
    plain = "{{- '<|im_start|>assistant\\n' }}"
    template = qwen3_chat_template()
    assert template.count(plain) == 1
    return template.replace(plain, "{{- '<|im_start|>assistant\\n<think>\\n' }}")


def test_reasoning_content_apart(text_model: Callable[..., str], tmp_path: Path) -> None:
    """With a template that opens <think>, the random model's whole output is thinking (it never closes it):
    it must come as reasoning_content, never as content, streamed or not."""
    s = start_server(text_model(thinking_template()), tmp_path / "stderr.log", ranks=1)
    try:
        client = s.client()
        r = chat(client, "Think about it.", max_tokens=8, **GREEDY)
        assert r.choices[0].message.reasoning_content and r.choices[0].message.content == ""
        content, reasoning, _, _ = stream_chat(client, "Think about it.", max_tokens=8, **GREEDY)
        assert (content, reasoning) == ("", r.choices[0].message.reasoning_content)
    finally:
        assert s.stop() == 0
