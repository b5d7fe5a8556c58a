"""The server's figures in the Prometheus text format (version 0.0.4), for `GET /metrics`.

Contract:
- `Histogram(buckets)`: `observe(seconds)` from any thread; `snapshot() -> (bucket counts (cumulative, one
  per bound, then +Inf), sum, count)`.
- `render(engine) -> str`: every family with `# HELP` / `# TYPE` lines, names prefixed `qwenvl_serve_`:
  counters `requests_admitted_total`, `requests_finished_total`, `requests_cancelled_total`,
  `requests_timed_out_total`, `requests_failed_total`, `generated_tokens_total`,
  `image_cache_hits_total`, `image_cache_misses_total`, `image_cache_evictions_total`,
  `prefix_cache_hits_total`, `prefix_cache_misses_total`, `prefix_cache_evictions_total`,
  `prefix_cache_cached_tokens_total`; gauges `requests_running`, `requests_waiting`,
  `image_cache_bytes`, `image_cache_entries`, `image_cache_max_bytes`, `prefix_cache_bytes`,
  `prefix_cache_entries`, `prefix_cache_max_bytes`; histograms `time_to_first_token_seconds` (submit to a
  request's first token) and `inter_token_latency_seconds` (between a request's consecutive tokens).
"""

from __future__ import annotations

import math
import threading
from typing import Any

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
PREFIX = "qwenvl_serve_"


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS_S) -> None:
        self.bounds = tuple(sorted(buckets))
        self.counts = [0] * (len(self.bounds) + 1)  # per bucket (not cumulative); the last is +Inf
        self.sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        i = next((k for k, b in enumerate(self.bounds) if value <= b), len(self.bounds))
        with self._lock:
            self.counts[i] += 1
            self.sum += value

    def snapshot(self) -> tuple[list[int], float, int]:
        with self._lock:
            counts, total = list(self.counts), self.sum
        cumulative, running = [], 0
        for c in counts:
            running += c
            cumulative.append(running)
        return cumulative, total, running


def _number(v: float) -> str:
    if math.isinf(v):
        return "+Inf"
    return repr(float(v)) if isinstance(v, float) else str(v)


def _family(lines: list[str], name: str, kind: str, help_: str, value: float) -> None:
    lines += [f"# HELP {PREFIX}{name} {help_}", f"# TYPE {PREFIX}{name} {kind}", f"{PREFIX}{name} {_number(value)}"]


def _histogram(lines: list[str], name: str, help_: str, h: Histogram) -> None:
    cumulative, total, count = h.snapshot()
    lines += [f"# HELP {PREFIX}{name} {help_}", f"# TYPE {PREFIX}{name} histogram"]
    for bound, c in zip([*h.bounds, math.inf], cumulative):
        lines.append(f'{PREFIX}{name}_bucket{{le="{_number(bound)}"}} {c}')
    lines += [f"{PREFIX}{name}_sum {_number(float(total))}", f"{PREFIX}{name}_count {count}"]


COUNTERS = (("requests_admitted_total", "admitted", "requests admitted into the running batch"),
            ("requests_finished_total", "finished", "requests that ended with stop or length"),
            ("requests_cancelled_total", "cancelled", "requests cancelled (the client went away)"),
            ("requests_timed_out_total", "timed_out", "requests that passed their deadline"),
            ("requests_failed_total", "errors", "requests that failed"),
            ("generated_tokens_total", "generated_tokens", "tokens generated"))


def render(engine: Any) -> str:
    stats, caches = engine.stats(), engine.cache_stats()
    lines: list[str] = []
    for name, key, help_ in COUNTERS:
        _family(lines, name, "counter", help_, stats[key])
    _family(lines, "requests_running", "gauge", "requests being prefilled or decoded", stats["running"])
    _family(lines, "requests_waiting", "gauge", "requests in the queue", stats["waiting"])
    for cache, what in (("image_cache", "images' placeholder rows by content"),
                        ("prefix_cache", "finished requests' KV by prompt prefix")):
        s = caches[cache]
        for key in ("hits", "misses", "evictions"):
            _family(lines, f"{cache}_{key}_total", "counter", f"{cache.replace('_', ' ')} {key} ({what})", s[key])
        for key in ("bytes", "entries", "max_bytes"):
            _family(lines, f"{cache}_{key}", "gauge", f"{cache.replace('_', ' ')} {key.replace('_', ' ')}", s[key])
    _family(lines, "prefix_cache_cached_tokens_total", "counter", "prompt tokens taken from the prefix cache",
            caches["prefix_cache"]["cached_tokens"])
    _histogram(lines, "time_to_first_token_seconds", "time from submit to a request's first token", engine.ttft)
    _histogram(lines, "inter_token_latency_seconds", "time between a request's consecutive tokens", engine.itl)
    return "\n".join(lines) + "\n"
