"""Prometheus metrics, per model, in vLLM's names with the `mlxd_` prefix.

Request metrics are observed in the daemon from each request's `done` event (the worker
measures its timings), so they survive worker restarts by construction. Gauges and the
cache's own counters come from each worker's latest stats snapshot at scrape time; the
counters of a worker that died are folded into a per-model base, so nothing goes backwards.
"""

from __future__ import annotations

import json
import logging
import time

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .events import CACHE_MISS_REASONS
from .recent import RecentRequests

log = logging.getLogger("mlxd.requests")
disable_created_metrics()   # one `_created` twin per series only doubles what Prometheus stores

P = "mlxd_"
STATES = ("loading", "ready", "restarting", "draining", "stopping", "stopped", "failed")
COMPONENTS = ("supervisor", "handle", "poll_stats", "reaper", "reload", "watch")
# Local LLM latencies: milliseconds for a cached short prompt, minutes for a cold long one.
LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0,
           60.0, 90.0, 120.0, 180.0, 300.0, 600.0)
ITL = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
TOKENS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


class Metrics:
    def __init__(self, supervisor=None, json_logs: bool = False):
        self.registry = r = CollectorRegistry()
        self.json_logs = json_logs
        self.recent = RecentRequests()      # what the web console lists, beside the series
        m = ["model"]
        self.ttft = Histogram(P + "time_to_first_token_seconds", "Time to first token.", m, buckets=LATENCY, registry=r)
        self.itl = Histogram(P + "inter_token_latency_seconds", "Time between generated tokens.", m, buckets=ITL, registry=r)
        self.e2e = Histogram(P + "e2e_request_latency_seconds", "Request latency, submit to last token.", m,
                             buckets=LATENCY, registry=r)
        self.queue = Histogram(P + "request_queue_time_seconds", "Time waiting before prefill starts.", m,
                               buckets=LATENCY, registry=r)
        self.prefill = Histogram(P + "request_prefill_time_seconds", "Prefill time of the uncached prompt.", m,
                                 buckets=LATENCY, registry=r)
        self.req_prompt = Histogram(P + "request_prompt_tokens", "Prompt tokens per request.", m, buckets=TOKENS, registry=r)
        self.req_gen = Histogram(P + "request_generation_tokens", "Generated tokens per request.", m,
                                 buckets=TOKENS, registry=r)
        self.prompt_tokens = Counter(P + "prompt_tokens", "Prompt tokens processed (cached or not).", m, registry=r)
        self.generation_tokens = Counter(P + "generation_tokens", "Tokens generated.", m, registry=r)
        self.success = Counter(P + "request_success", "Requests finished.", ["model", "finished_reason"], registry=r)
        self.errors = Counter(P + "request_errors", "Requests failed or abandoned.", ["model", "reason"], registry=r)
        self.cache_queries = Counter(P + "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", m,
                                     registry=r)
        self.cache_hits = Counter(P + "prefix_cache_hits", "Prompt tokens served from the prefix cache.",
                                  ["model", "tier"], registry=r)
        self.cache_misses = Counter(P + "prefix_cache_misses", "Requests served less than the longest prefix the "
                                    "prefix cache shares with them, or nothing, by reason.", ["model", "reason"],
                                    registry=r)
        self.worker_start = Histogram(P + "worker_start_seconds", "Worker spawn until its model is loaded and ready.",
                                      m, buckets=LATENCY, registry=r)
        self.restarts = Counter(P + "worker_restarts", "Worker processes restarted after an exit.", m, registry=r)
        self.reloads = Counter(P + "config_reloads", "Config reloads.", ["result"], registry=r)
        self.write_timeouts = Counter(P + "stream_write_timeouts", "Responses cut off because the client took "
                                      "nothing for server.stream_write_timeout (their requests cancelled).", m,
                                      registry=r)
        for result in ("success", "error"):   # present from the start, so increase() sees the first one
            self.reloads.labels(result)
        self.internal_errors = Counter(P + "internal_errors", "Unexpected errors caught in the daemon's own tasks "
                                       "(a bug: see the log); the task goes on.", ["component"], registry=r)
        for c in COMPONENTS:
            self.internal_errors.labels(c)
        self.refused = Counter(P + "http_refused", "Requests refused before any route ran: a foreign Host (DNS "
                               "rebinding), an Origin not allowed, a cross-site action, a body not JSON.",
                               ["reason"], registry=r)
        for reason in ("host_not_allowed", "origin_not_allowed", "unsupported_media_type"):
            self.refused.labels(reason)
        if supervisor is not None:
            r.register(_WorkerCollector(supervisor))

    def model_added(self, model: str) -> None:
        """Series that alerts use with increase() must exist before their first event."""
        self.restarts.labels(model)
        self.write_timeouts.labels(model)
        for reason in ("cancelled", "worker_died"):
            self.errors.labels(model, reason)
        for reason in CACHE_MISS_REASONS:
            self.cache_misses.labels(model, reason)

    def request_done(self, model: str, ev: dict, cache_enabled: bool) -> None:
        u, t = ev["usage"], ev["timings"]
        self.ttft.labels(model).observe(t["ttft"])
        self.e2e.labels(model).observe(t["total"])
        self.queue.labels(model).observe(t["queue"])
        self.prefill.labels(model).observe(t["prefill"])
        itl = self.itl.labels(model)
        for gap in ev.get("itl", ()):
            itl.observe(gap)
        self.req_prompt.labels(model).observe(u["prompt_tokens"])
        self.req_gen.labels(model).observe(u["completion_tokens"])
        self.prompt_tokens.labels(model).inc(u["prompt_tokens"])
        self.generation_tokens.labels(model).inc(u["completion_tokens"])
        if cache_enabled:
            self.cache_queries.labels(model).inc(u["prompt_tokens"])
            self.cache_hits.labels(model, ev.get("cache_tier") or "memory").inc(u["cached_tokens"])
            reason = (ev.get("cache") or {}).get("reason")
            if reason in CACHE_MISS_REASONS:
                self.cache_misses.labels(model, reason).inc()
        if ev["finish_reason"] == "cancelled":
            self.errors.labels(model, "cancelled").inc()
        else:
            self.success.labels(model, ev["finish_reason"]).inc()
        self.log_request(model, ev)

    def internal_error(self, component: str) -> None:
        self.internal_errors.labels(component).inc()

    def request_failed(self, model: str, reason: str) -> None:
        self.errors.labels(model, reason).inc()

    def log_request(self, model: str, ev: dict) -> None:
        u, t = ev["usage"], ev["timings"]
        rec = {"model": model, "prompt_tokens": u["prompt_tokens"], "cached_tokens": u["cached_tokens"],
               "generated_tokens": u["completion_tokens"], "ttft_s": round(t["ttft"], 4),
               "total_s": round(t["total"], 4), "finish_reason": ev["finish_reason"]}
        cache = ev.get("cache") or {}
        if cache.get("reason"):
            rec["cache_miss"] = cache["reason"]
        if cache:
            log.debug("%s: prefix cache: %s", model, cache.get("detail"))
        if self.json_logs:
            log.info(json.dumps({"ts": time.time(), **rec}))
        else:
            log.info("%s: %d prompt tokens (%d cached), %d generated, TTFT %.3fs, total %.3fs, %s",
                     model, rec["prompt_tokens"], rec["cached_tokens"], rec["generated_tokens"],
                     rec["ttft_s"], rec["total_s"], rec["finish_reason"])


class _WorkerCollector:
    """Gauges and cache counters read from each model's latest worker stats at scrape time."""

    def __init__(self, supervisor):
        self.sup = supervisor

    def collect(self):
        g = {name: GaugeMetricFamily(P + name, doc, labels=labels) for name, doc, labels in (
            ("num_requests_running", "Requests decoding now.", ["model"]),
            ("num_requests_waiting", "Requests queued or prefilling.", ["model"]),
            ("model_state", "1 for the model's current state.", ["model", "state"]),
            ("model_memory_bytes", "MLX memory in use by the model's worker.", ["model"]),
            ("prefix_cache_bytes", "Prefix-cache bytes per tier.", ["model", "tier"]),
            ("prefix_cache_unique_bytes", "Prefix-cache bytes per tier, each shared block once.", ["model", "tier"]),
            ("prefix_cache_logical_bytes", "Prefix-cache bytes per tier if every entry were a whole snapshot.",
             ["model", "tier"]),
            ("prefix_cache_running_bytes", "KV bytes the running requests hold, counted in the memory budget.",
             ["model"]),
            ("prefix_cache_write_queue_bytes", "KV bytes waiting for the prefix cache's disk writer.", ["model"]),
        )}
        c = {name: CounterMetricFamily(P + name, doc, labels=["model"]) for name, doc in (
            ("prefix_cache_evictions", "Prefix-cache entries evicted (memory and disk)."),
            ("prefix_cache_corrupt", "Prefix-cache files found corrupt and discarded."),
            ("prefix_cache_disk_errors", "Prefix-cache entries not written (disk full, unwritable directory)."),
            ("prefix_cache_dropped_writes", "Prefix-cache entries not written because the write queue was full."),
            ("worker_internal_errors", "Requests failed by a bug inside the model's worker (see its log); the "
                                       "worker goes on serving the others."),
            ("batch_resets", "Times a whole decode batch failed and was restarted (its requests failed)."),
            ("spec_draft_tokens", "Draft tokens proposed by speculative decoding (models with it on)."),
            ("spec_accepted_tokens", "Draft tokens the model accepted."),
        )}
        for h in self.sup.handles.values():
            s = h.stats if h.state == "ready" else {}
            cache = s.get("cache") or {}
            g["num_requests_running"].add_metric([h.name], s.get("running", 0))
            g["num_requests_waiting"].add_metric([h.name], s.get("waiting", 0))
            for state in STATES:
                g["model_state"].add_metric([h.name, state], 1.0 if h.state == state else 0.0)
            g["model_memory_bytes"].add_metric([h.name], s.get("memory_bytes", 0))
            g["prefix_cache_bytes"].add_metric([h.name, "memory"], (cache.get("memory") or {}).get("bytes", 0))
            g["prefix_cache_bytes"].add_metric([h.name, "disk"], (cache.get("disk") or {}).get("bytes", 0))
            for tier in ("memory", "disk"):
                t = cache.get(tier) or {}
                g["prefix_cache_unique_bytes"].add_metric([h.name, tier], t.get("unique_bytes", t.get("bytes", 0)))
                g["prefix_cache_logical_bytes"].add_metric([h.name, tier], t.get("logical_bytes", t.get("bytes", 0)))
            g["prefix_cache_running_bytes"].add_metric([h.name], (cache.get("memory") or {}).get("running_bytes", 0))
            g["prefix_cache_write_queue_bytes"].add_metric([h.name], (cache.get("disk") or {}).get("queue_bytes", 0))
            totals = h.counters()
            c["prefix_cache_evictions"].add_metric([h.name], totals["evictions"])
            c["prefix_cache_corrupt"].add_metric([h.name], totals["corrupt"])
            c["prefix_cache_disk_errors"].add_metric([h.name], totals["disk_errors"])
            c["prefix_cache_dropped_writes"].add_metric([h.name], totals["dropped_writes"])
            c["worker_internal_errors"].add_metric([h.name], totals["internal_errors"])
            c["batch_resets"].add_metric([h.name], totals["batch_resets"])
            if (spec := h.spec_counters()) is not None:
                c["spec_draft_tokens"].add_metric([h.name], spec["draft_tokens"])
                c["spec_accepted_tokens"].add_metric([h.name], spec["accepted_tokens"])
        yield from g.values()
        yield from c.values()


def worker_counter_values(stats: dict) -> dict:
    """The cumulative counters of one worker's stats snapshot, as the collector names them."""
    cache = stats.get("cache") or {}
    disk = cache.get("disk") or {}
    spec = stats.get("spec") or {}
    return {"internal_errors": stats.get("internal_errors", 0), "batch_resets": stats.get("batch_resets", 0),
            "spec_draft_tokens": spec.get("draft_tokens", 0), "spec_accepted_tokens": spec.get("accepted_tokens", 0),
            "evictions": cache.get("memory_evictions", 0) + disk.get("evictions", 0),
            "corrupt": disk.get("corrupt", 0), "disk_errors": disk.get("write_errors", 0),
            "dropped_writes": disk.get("dropped_writes", 0)}
