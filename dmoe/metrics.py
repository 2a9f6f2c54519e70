"""The server's Prometheus metrics (GET /metrics): what it answered, what it generated and how fast (time to
first token, gaps between tokens), and what it holds now (requests running and waiting, KV cache use)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/tokenize",
             "/detokenize", "/", "/index.html")
ENDS = ("stop", "length", "cancelled", "error", "shutdown")  # how a generation ends


class ServerMetrics:
    """One server's counters, in a registry of its own (several servers in one process do not mix)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._responses = Counter("dmoe_http_responses", "HTTP responses by endpoint and status ('none': the "
                                  "client left before any)", ["endpoint", "status"], registry=self.registry)
        self._generations = Counter("dmoe_generations", "Generations by how they ended", ["end"],
                                    registry=self.registry)
        self._prompt_tokens = Counter("dmoe_prompt_tokens", "Prompt tokens of the generations (the cached ones "
                                      "too)", registry=self.registry)
        self._completion_tokens = Counter("dmoe_completion_tokens", "Tokens generated", registry=self.registry)
        self._cached_tokens = Counter("dmoe_cached_prompt_tokens", "Prompt tokens taken from the KV cache (prefix "
                                      "reuse)", registry=self.registry)
        self._ttft = Histogram("dmoe_time_to_first_token_seconds", "From a request's arrival to its first token",
                               buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
                               registry=self.registry)
        self._rank_comm = Gauge("dmoe_rank_comm_seconds", "Each rank's time in collectives since it started (read "
                                "every few seconds while serving)", ["rank"], registry=self.registry)
        self._rank_rss = Gauge("dmoe_rank_peak_rss_gigabytes", "Each rank's peak resident memory", ["rank"],
                               registry=self.registry)
        self._itl = Histogram("dmoe_inter_token_latency_seconds", "Between a stream's consecutive tokens",
                              buckets=(0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56),
                              registry=self.registry)

    def watch(self, running: Callable[[], int], waiting: Callable[[], int], kv_tokens: Callable[[], int],
              kv_capacity: int, comm_seconds: Callable[[], float]) -> None:
        """Gauges read at each scrape from the scheduler and the engine."""
        for name, doc, read in (
            ("dmoe_requests_running", "Requests in the running batch", running),
            ("dmoe_requests_waiting", "Requests queued for a free slot", waiting),
            ("dmoe_kv_cache_tokens", "Tokens held in the KV cache's slots (running or kept for prefix reuse)",
             kv_tokens),
            ("dmoe_kv_cache_capacity_tokens", "Tokens the KV cache's slots hold in all", lambda: kv_capacity),
            ("dmoe_root_comm_seconds", "Rank 0's time in collectives since it started", comm_seconds),
        ):
            Gauge(name, doc, registry=self.registry).set_function(read)

    def ranks(self, report: Sequence[tuple[float, float]]) -> None:
        """Every rank's (peak resident GB, seconds in collectives), from Engine.rank_report."""
        for rank, (rss, comm) in enumerate(report):
            self._rank_rss.labels(str(rank)).set(rss)
            self._rank_comm.labels(str(rank)).set(comm)

    def response(self, path: str, status: int | None) -> None:
        """Count one request's answer (unknown paths as 'other', so that scanners cannot grow the labels)."""
        path = "/v1/models" if path.startswith("/v1/models/") else path
        self._responses.labels(path if path in ENDPOINTS else "other", str(status) if status else "none").inc()

    def generation(self, end: str, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0,
                   first_token_s: float | None = None, token_gaps_s: Sequence[float] = ()) -> None:
        assert end in ENDS, end
        self._generations.labels(end).inc()
        self._prompt_tokens.inc(prompt_tokens)
        self._completion_tokens.inc(completion_tokens)
        self._cached_tokens.inc(cached_tokens)
        if first_token_s is not None:
            self._ttft.observe(first_token_s)
        for gap in token_gaps_s:
            self._itl.observe(gap)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
