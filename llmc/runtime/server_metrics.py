"""Prometheus metrics of the HTTP server: request latencies observed on the event loop, and the
engine's own state (queue, KV pages, prefix cache, preemptions, speculative decoding) collected at
scrape time."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .async_engine import Observer

# ---- metrics -------------------------------------------------------------------------------------

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ServerMetrics(Observer):
    """Prometheus metrics in a registry of their own (the process-global one belongs to the host app).

    Latencies are observed as outputs reach the event loop; engine state (queue, KV, prefix cache,
    preemptions, token counts) is read from the engine thread's latest ``stats`` at scrape time.
    """

    def __init__(self, read_stats: Callable[[], dict]) -> None:
        self.registry = CollectorRegistry()
        self.ttft = Histogram("llmc_time_to_first_token_seconds", "Time from arrival to the first generated token.",
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("llmc_inter_token_latency_seconds", "Time between generated tokens of a request.",
                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.e2e = Histogram("llmc_e2e_request_latency_seconds", "Time from arrival to the last token.",
                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.requests = Counter("llmc_requests_finished", "Engine requests finished, by finish reason.",
                                ["finish_reason"], registry=self.registry)
        for reason in ("stop", "length", "abort", "error"):
            self.requests.labels(reason)
        self.rejected = Counter("llmc_requests_rejected", "Requests refused with 429 (queue full).",
                                registry=self.registry)
        self.registry.register(_EngineStatsCollector(read_stats))

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def next_tokens(self, seconds_per_token: float, count: int) -> None:
        for _ in range(count):
            self.itl.observe(seconds_per_token)

    def finished(self, reason: str, seconds: float) -> None:
        self.requests.labels(reason).inc()
        self.e2e.observe(seconds)


class _EngineStatsCollector:
    def __init__(self, read_stats: Callable[[], dict]) -> None:
        self.read_stats = read_stats

    def collect(self):
        s = self.read_stats()
        queries, hits = s.get("prefix_cache_queries", 0), s.get("prefix_cache_hits", 0)
        gauges = [
            ("llmc_num_requests_waiting", "Requests waiting to be scheduled.", s.get("num_waiting", 0)),
            ("llmc_num_requests_running", "Sequences in the running batch.", s.get("num_running", 0)),
            ("llmc_kv_cache_usage_ratio", "Fraction of KV cache blocks in use (0..1).", s.get("kv_usage", 0.0)),
            ("llmc_kv_cache_free_blocks", "KV cache blocks free.", s.get("num_free_blocks", 0)),
            ("llmc_kv_cache_blocks", "KV cache blocks in all.", s.get("num_blocks", 0)),
            ("llmc_prefix_cache_hit_rate", "Prompt tokens found in the prefix cache / prompt tokens looked up.",
             hits / queries if queries else 0.0),
        ]
        if "spec_draft_tokens" in s:  # speculative decoding is on
            gauges += [
                ("llmc_spec_acceptance_rate", "Speculative tokens accepted / proposed tokens the model scored.",
                 s["spec_acceptance_rate"]),
                ("llmc_spec_mean_accepted_tokens_per_step", "Tokens a verifying step gives a sequence on average: "
                 "its accepted proposals plus the corrected or bonus token.", s["spec_mean_accepted_tokens_per_step"]),
            ]
        if "bucket_padding_waste" in s:  # steps are padded to shape buckets
            gauges.append(("llmc_bucket_padding_waste_ratio", "Padded token rows / all rows run, over the "
                           "server's life (shape bucketing).", s["bucket_padding_waste"]))
        counters = [
            ("llmc_preemptions", "Sequences preempted (their KV freed, recomputed later).", s.get("preemptions", 0)),
            ("llmc_prompt_tokens", "Prompt tokens processed.", s.get("prompt_tokens", 0)),
            ("llmc_generation_tokens", "Tokens generated.", s.get("generation_tokens", 0)),
            ("llmc_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", queries),
            ("llmc_prefix_cache_hits", "Prompt tokens found in the prefix cache.", hits),
        ]
        if "spec_draft_tokens" in s:
            counters += [
                ("llmc_spec_draft_tokens", "Speculative tokens proposed and scored by the model.", s["spec_draft_tokens"]),
                ("llmc_spec_accepted_tokens", "Speculative tokens accepted.", s["spec_accepted_tokens"]),
                ("llmc_spec_verifications", "Steps x sequences that verified proposals.", s["spec_verifications"]),
            ]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=float(value))
        for name, doc, value in counters:
            yield CounterMetricFamily(name, doc, value=float(value))
