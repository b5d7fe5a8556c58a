"""The serving engine: a bounded queue and one thread that decodes every admitted request together.

Contract:
- `Engine(vlm, max_batch_size=8, max_queue=64)`; `start()` / `stop()` the decoding thread.
- `Job(prompt_ids, images, params, emit, ...)`: `images` is the request's image inputs as `serve.decode.Row`
  takes them (`vlm.image_inputs`: pixel_values plus the per-image keys of the resolution mode).
- `submit(job)` queues a `Job`, or raises `QueueFull` when `max_batch_size` jobs run and `max_queue`
  more wait (the jobs not yet running).
- Each loop iteration admits waiting jobs while fewer than `max_batch_size` run (their prompts are
  prefilled together and join the running batch, `serve.decode.DecodeBatch`), picks one token for every
  running job, and runs one forward step for the jobs still going.
- A job ends with `finish_reason` "stop" (a stop token or stop string), "length" (`max_tokens`),
  "timeout" (its deadline passed), "cancelled" (`job.cancel()`, e.g. the client went away) or "error"
  (the forward failed: the message goes to the job, the traceback to the log, the engine goes on; a
  prefill that fails is retried request by request, so only the request that cannot be prefilled fails).
- Events go to `job.emit(kind, data)` from the engine thread: ("delta", str) as text becomes final,
  then exactly one ("done", job) or ("error", message). `job.text`, `job.tokens`, `job.finish_reason`
  hold the result.
- `stats()`: running, waiting, and counters (admitted, finished, cancelled, timed out, errors, the
  largest batch seen, generated tokens).
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

    @property
    def tokens(self) -> list[int]:
        return self.row.tokens if self.row is not None else []

    def cancel(self) -> None:
        """Ask the engine to drop this job at its next step (any thread)."""
        self.cancelled = True


class Engine:
    def __init__(self, vlm: Any, max_batch_size: int = 8, max_queue: int = 64) -> None:
        if max_batch_size < 1 or max_queue < 0:
            raise ValueError(f"max_batch_size must be >= 1 and max_queue >= 0, got {max_batch_size}, {max_queue}")
        self.vlm = vlm
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.stop_ids = set(vlm.stop_token_ids)
        self.batch = DecodeBatch(vlm)
        self.jobs: list[Job] = []  # running, in batch row order
        self.admitting: list[Job] = []  # taken from the queue, being prefilled (counted as running)
        self.waiting: deque[Job] = deque()
        self.cv = threading.Condition()
        self.counters = dict(admitted=0, finished=0, cancelled=0, timed_out=0, errors=0, max_batch=0,
                             generated_tokens=0)
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ----- outside the engine thread ---------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="serve-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self.cv:
            self._stopping = True
            self.cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def submit(self, job: Job) -> None:
        with self.cv:
            running = len(self.jobs) + len(self.admitting)
            if running + len(self.waiting) >= self.max_batch_size + self.max_queue:
                raise QueueFull(f"{running} requests are running and {len(self.waiting)} waiting "
                                f"(limits {self.max_batch_size} + {self.max_queue})")
            self.waiting.append(job)
            self.cv.notify_all()

    def stats(self) -> dict:
        with self.cv:
            return dict(running=len(self.jobs) + len(self.admitting), waiting=len(self.waiting), **self.counters)

    # ----- the engine thread -----------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self.cv:
                while not self._stopping and not self.waiting and not self.jobs:
                    self.cv.wait()
                if self._stopping:
                    return
                admit = self._take_waiting()
            try:
                self._admit(admit)
            except Exception:  # the new rows' prefill runs before the running batch changes
                for job in admit:  # one by one: only a request that cannot be prefilled fails
                    try:
                        self._admit([job])
                    except Exception as e:
                        self._fail([job], e)
                with self.cv:
                    self.admitting = []
            try:
                if self.jobs:
                    self._step()
            except Exception as e:  # a bug or an impossible input: fail the batch, keep serving
                self._fail(self.jobs, e)
                with self.cv:
                    self.jobs, self.batch = [], DecodeBatch(self.vlm)

    def _fail(self, jobs: list[Job], e: Exception) -> None:
        log.error("decoding failed:\n%s", traceback.format_exc())
        for job in jobs:
            if job.finish_reason is None:
                self._end(job, "error", f"generation failed: {type(e).__name__}: {e}")

    def _take_waiting(self) -> list[Job]:
        """Expire cancelled / timed-out waiting jobs, then take as many as the batch has room for."""
        now = time.monotonic()
        for job in [j for j in self.waiting if j.cancelled or now > j.deadline]:
            self.waiting.remove(job)
            self._end(job, "cancelled" if job.cancelled else "timeout")
        room = self.max_batch_size - len(self.jobs)
        if self.jobs and not self.batch.can_merge:
            room = 0  # this LM's cache cannot take rows mid-batch: wait for the batch to drain
        self.admitting = [self.waiting.popleft() for _ in range(min(room, len(self.waiting)))]
        return self.admitting

    def _admit(self, admit: list[Job]) -> None:
        if not admit:
            return
        for job in admit:
            job.row = Row(job.prompt_ids, job.images, job.params)
            job.stream = TextStream(self.vlm.decode, job.stop)
        self.batch.add([job.row for job in admit])
        with self.cv:
            self.jobs, self.admitting = self.jobs + admit, []
            self.counters["admitted"] += len(admit)
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
                job.row.tokens.append(tok)
                self.counters["generated_tokens"] += 1
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
