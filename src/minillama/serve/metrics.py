"""What the server exposes at /metrics, in Prometheus' text format (prometheus_client), named as vLLM names its
own where they mean the same: completions running and waiting, tokens in and out, finished requests by reason,
and latency histograms (time to first token, time per output token, whole request)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    """One server's metrics, in a registry of its own (several servers may share a process, as in tests)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.running = Gauge("minillama_num_requests_running", "Completions decoding now (one cache row each).", registry=r)
        self.waiting = Gauge("minillama_num_requests_waiting", "Completions waiting for a free row.", registry=r)
        self.prompt_tokens = Counter("minillama_prompt_tokens", "Prompt tokens run through the model.", registry=r)
        self.generation_tokens = Counter("minillama_generation_tokens", "Tokens generated.", registry=r)
        self.finished = Counter("minillama_request_success", "Finished completions, by finish reason.", ["finished_reason"], registry=r)
        self.rejected = Counter("minillama_request_rejected", "Requests refused with 429: the queue was full.", registry=r)
        self.time_to_first_token = Histogram("minillama_time_to_first_token_seconds", "From arrival to a completion's first token.",
                                             buckets=_LATENCY_BUCKETS, registry=r)
        self.time_per_output_token = Histogram("minillama_time_per_output_token_seconds", "Between a completion's successive tokens.",
                                               buckets=_PER_TOKEN_BUCKETS, registry=r)
        self.request_latency = Histogram("minillama_e2e_request_latency_seconds", "From arrival to a completion's last token.",
                                         buckets=_LATENCY_BUCKETS, registry=r)
