"""The server's Prometheus metrics (GET /metrics): what it answered, and what it generated."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/tokenize",
             "/detokenize")
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

    def response(self, path: str, status: int | None) -> None:
        """Count one request's answer (unknown paths as 'other', so that scanners cannot grow the labels)."""
        path = "/v1/models" if path.startswith("/v1/models/") else path
        self._responses.labels(path if path in ENDPOINTS else "other", str(status) if status else "none").inc()

    def generation(self, end: str, prompt_tokens: int, completion_tokens: int) -> None:
        assert end in ENDS, end
        self._generations.labels(end).inc()
        self._prompt_tokens.inc(prompt_tokens)
        self._completion_tokens.inc(completion_tokens)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
