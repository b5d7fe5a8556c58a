"""The serving engine: a bounded queue and one thread that decodes every admitted request together.

Contract:
- `EngineBase(vlm, max_queue)`: the queue, the thread's `start()` / `stop()`, `submit`, `stats()`, the counters
  and the latency histograms, shared with serve/generate_engine.py's `GenerateEngine`.
- `Engine(vlm, max_batch_size=8, max_queue=64, image_cache_bytes=256 MiB, prefix_cache_bytes=1 GiB,
  prefill_chunk=2048)`; `start()` / `stop()` the decoding thread. The caches (`serve.imagecache.ImageCache`,
  `serve.prefixcache.PrefixCache`; 0 bytes turns one off) keep each image's placeholder rows by content and
  finished requests' KV, so a repeated image skips the towers and a request that starts like a recent one
  (the next turn of a chat) prefills only the tokens after the match; `job.cached_tokens` says how many
  prompt tokens came from the prefix cache. Where greedy tokens come from the screened head
  (`qwen.generation.ScreenedHead`), its screen for batches is chosen here, for `max_batch_size` rows.
- `Job(prompt_ids, images, params, emit, ...)`: `images` is the request's image inputs as `serve.decode.Row`
  takes them (`vlm.image_inputs`: pixel_values plus the per-image keys of the resolution mode).
- `submit(job)` queues a `Job`, or raises `QueueFull` when `max_batch_size` jobs run and `max_queue`
  more wait (the jobs not yet running).
- Each loop iteration admits waiting jobs while fewer than `max_batch_size` run or are being prefilled,
  runs one piece of prefill work of at most about `prefill_chunk` tokens (new short prompts together, or the
  next chunk of a long one; `serve.decode.DecodeBatch.prefill`; None = whole prompts), so a long prompt
  is prefilled across several iterations while the running jobs go on decoding; prefilled jobs join the
  running batch; then it picks one token for every running job and runs one forward step for the jobs
  still going.
- A job ends with `finish_reason` "stop" (a stop token or stop string), "length" (`max_tokens`),
  "timeout" (its deadline passed), "cancelled" (`job.cancel()`, e.g. the client went away) or "error"
  (the forward failed: the message goes to the job, the traceback to the log, the engine goes on; a
  prefill that fails is retried request by request, so only the request that cannot be prefilled fails).
- Events go to `job.emit(kind, data)` from the engine thread: ("delta", str) as text becomes final,
  then exactly one ("done", job) or ("error", message). `job.text`, `job.tokens`, `job.finish_reason`
  hold the result.
- `stats()`: running, waiting, and counters (admitted, finished, cancelled, timed out, errors, the
  largest batch seen, generated tokens). `cache_stats()`: the two caches' `stats()`. `ttft` and `itl`
  (`serve.metrics.Histogram`): each job's time from `submit` to its first token, and between its tokens.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .decode import DecodeBatch, ImageInputs, Row, SamplingParams
from .imagecache import ImageCache
from .metrics import LATENCY_BUCKETS_S, Histogram
from .prefixcache import PrefixCache
from .text import TextStream

log = logging.getLogger("qwenvl_lab.serve.engine")


class QueueFull(Exception):
    """The waiting queue is full: the caller answers 503 with Retry-After."""


@dataclass(eq=False)
class Job:
    prompt_ids: list[int]
    images: ImageInputs | torch.Tensor | None  # `vlm.image_inputs(images)` (serve.decode.Row); {} / None: none
    params: SamplingParams
    emit: Callable[[str, Any], None]
    stop: list[str] = field(default_factory=list)
    deadline: float = float("inf")  # time.monotonic() after which the job ends with "timeout"
    finish_reason: str | None = None
    text: str = ""
    cancelled: bool = False
    row: Row | None = None
    stream: TextStream | None = None
    submitted: float = 0.0  # time.monotonic() at submit
    last_token: float = 0.0  # time.monotonic() of its latest token

    @property
    def cached_tokens(self) -> int:
        return self.row.cached_tokens if self.row is not None else 0

    @property
    def tokens(self) -> list[int]:
        return self.row.tokens if self.row is not None else []

    def cancel(self) -> None:
        """Ask the engine to drop this job at its next step (any thread)."""
        self.cancelled = True


class EngineBase:
    """What every engine shares: the waiting queue under one condition, the decoding thread's start / stop, the
    counters `stats()` reports and the latency histograms `/metrics` reads. A subclass names its thread
    (`thread_name`), says how many jobs run now (`_running`) and runs `_run` on the thread."""

    thread_name = "serve-engine"
    max_batch_size = 1

    def __init__(self, vlm: Any, max_queue: int) -> None:
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.vlm, self.max_queue = vlm, max_queue
        self.stop_ids = set(vlm.stop_token_ids)
        self.waiting: deque[Job] = deque()
        self.cv = threading.Condition()
        self.counters = dict(admitted=0, finished=0, cancelled=0, timed_out=0, errors=0, max_batch=0,
                             generated_tokens=0)
        self.ttft = Histogram(LATENCY_BUCKETS_S)
        self.itl = Histogram(LATENCY_BUCKETS_S)
        self._thread: threading.Thread | None = None
        self._stopping = False

    def _running(self) -> int:
        raise NotImplementedError

    def _run(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self.cv:
            self._stopping = True
            self.cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def submit(self, job: Job) -> None:
        with self.cv:
            running = self._running()
            if running + len(self.waiting) >= self.max_batch_size + self.max_queue:
                raise QueueFull(f"{running} request(s) running and {len(self.waiting)} waiting "
                                f"(limits {self.max_batch_size} + {self.max_queue})")
            job.submitted = time.monotonic()
            self.waiting.append(job)
            self.cv.notify_all()

    def stats(self) -> dict:
        with self.cv:
            return dict(running=self._running(), waiting=len(self.waiting), **self.counters)

    def _accept(self, job: Job, tok: int, now: float) -> None:
        """One generated token kept for `job`: counted, and its latency observed (first token or the gap)."""
        job.row.tokens.append(tok)
        self.counters["generated_tokens"] += 1
        if len(job.row.tokens) == 1:
            self.ttft.observe(now - job.submitted)
        else:
            self.itl.observe(now - job.last_token)
        job.last_token = now


PREFILL_CHUNK = 2048  # tokens of prefill work per engine iteration while requests are decoding (the default)


class Engine(EngineBase):
    def __init__(self, vlm: Any, max_batch_size: int = 8, max_queue: int = 64, image_cache_bytes: int = 256 << 20,
                 prefix_cache_bytes: int = 1 << 30, prefill_chunk: int | None = PREFILL_CHUNK) -> None:
        if max_batch_size < 1 or max_queue < 0:
            raise ValueError(f"max_batch_size must be >= 1 and max_queue >= 0, got {max_batch_size}, {max_queue}")
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1 or None, got {prefill_chunk}")
        super().__init__(vlm, max_queue)
        self.max_batch_size = max_batch_size
        self.prefill_chunk = prefill_chunk
        self.image_cache = ImageCache(image_cache_bytes)
        self.prefix_cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        self.batch = self._new_batch()
        if self.batch.screen is not None:
            self.batch.screen.prepare(max_batch_size)  # the batch screen timed now, not in the first busy moment
        self.jobs: list[Job] = []  # running, in batch row order
        self.admitting: list[Job] = []  # taken from the queue, being prefilled (counted as running)

    def _new_batch(self) -> DecodeBatch:
        return DecodeBatch(self.vlm, self.image_cache, self.prefix_cache)

    # ----- outside the engine thread ---------------------------------------------------------------
    def _running(self) -> int:
        return len(self.jobs) + len(self.admitting)

    def cache_stats(self) -> dict:
        with self.cv:
            prefix = self.prefix_cache.stats() if self.prefix_cache is not None else PrefixCache(0).stats()
            return {"image_cache": self.image_cache.stats(), "prefix_cache": prefix}

    # ----- the engine thread -----------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self.cv:
                while not self._stopping and not self.waiting and not self.jobs and not self.admitting:
                    self.cv.wait()
                if self._stopping:
                    return
                admit = self._take_waiting()
            self._start_jobs(admit)
            self._prefill()
            try:
                if self.jobs:
                    self._step()
            except Exception as e:  # a bug or an impossible input: fail the batch, keep serving
                self._fail(self.jobs, e)
                with self.cv:
                    pending, self.jobs = self.batch.pending, []
                    self.batch = self._new_batch()
                    self.batch.pending = pending  # prompts being prefilled keep their own caches

    def _fail(self, jobs: list[Job], e: Exception) -> None:
        log.error("decoding failed:\n%s", "".join(traceback.format_exception(e)))
        for job in jobs:
            if job.finish_reason is None:
                self._end(job, "error", f"generation failed: {type(e).__name__}: {e}")

    def _take_waiting(self) -> list[Job]:
        """Expire cancelled / timed-out waiting and prefilling jobs, then take as many waiting jobs as the
        batch has room for."""
        now = time.monotonic()
        for job in [j for j in self.waiting if j.cancelled or now > j.deadline]:
            self.waiting.remove(job)
            self._end(job, "cancelled" if job.cancelled else "timeout")
        for job in [j for j in self.admitting if j.cancelled or now > j.deadline]:
            self.admitting.remove(job)
            if job.row in self.batch.pending:
                self.batch.drop_pending(job.row)
            self._end(job, "cancelled" if job.cancelled else "timeout")
        room = self.max_batch_size - len(self.jobs) - len(self.admitting)
        if (self.jobs or self.admitting) and not self.batch.can_merge:
            room = 0  # this LM's cache cannot take rows mid-batch: wait for the batch to drain
        new = [self.waiting.popleft() for _ in range(max(0, min(room, len(self.waiting))))]
        self.admitting += new
        return new

    def _start_jobs(self, admit: list[Job]) -> None:
        for job in admit:
            job.row = Row(job.prompt_ids, job.images, job.params)
            job.stream = TextStream(self.vlm.decode, job.stop)
            try:
                self.batch.start([job.row])
            except Exception as e:  # e.g. image inputs that do not match the prompt's placeholders
                with self.cv:
                    self.admitting.remove(job)
                self._fail([job], e)

    def _prefill(self) -> None:
        """One piece of prefill work; the jobs whose prompt is done join the running jobs."""
        budget = self.prefill_chunk if self.jobs else None  # nobody waits on decode steps: no need to chunk
        joined, failed = self.batch.prefill(budget)
        by_row = {id(j.row): j for j in self.admitting}
        for row, e in failed:
            job = by_row[id(row)]
            with self.cv:
                self.admitting.remove(job)
            self._fail([job], e)
        if not joined:
            return
        new = [by_row[id(r)] for r in joined]
        with self.cv:
            self.admitting = [j for j in self.admitting if j not in new]
            self.jobs = self.jobs + new  # the batch appends joined rows in this order
            self.counters["admitted"] += len(new)
            self.counters["max_batch"] = max(self.counters["max_batch"], len(self.jobs))

    def _step(self) -> None:
        tokens = self.batch.next_tokens()
        now = time.monotonic()
        keep = []
        for job, tok in zip(self.jobs, tokens):
            reason = None
            if job.cancelled:
                reason = "cancelled"
            elif now > job.deadline:
                reason = "timeout"
            elif tok in self.stop_ids and not job.params.ignore_eos:
                reason = "stop"
            else:
                self._accept(job, tok, now)
                delta, hit_stop = job.stream.push(tok)
                if delta:
                    job.emit("delta", delta)
                if hit_stop:
                    reason = "stop"
                elif len(job.row.tokens) >= job.params.max_tokens:
                    reason = "length"
            if reason is not None:
                self._end(job, reason)
            keep.append(reason is None)
        self.batch.advance(tokens, keep)
        with self.cv:
            self.jobs = [j for j, k in zip(self.jobs, keep) if k]

    def _end(self, job: Job, reason: str, message: str | None = None) -> None:
        job.finish_reason = reason
        key = {"cancelled": "cancelled", "timeout": "timed_out", "error": "errors"}.get(reason, "finished")
        self.counters[key] += 1
        if reason == "error":
            job.emit("error", message)
            return
        if job.stream is not None:
            tail = job.stream.finish()
            if tail:
                job.emit("delta", tail)
            job.text = job.stream.text
        job.emit("done", job)
