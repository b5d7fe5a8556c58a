"""Serving a model our decode loop cannot drive, through the model's OWN `generate`.

A released wrapper family whose family entry says `serving="generate: ..."` (Qwen2-VL / Qwen2.5-VL: M-RoPE
positions, three rows per token from `image_grid_thw`, are not what `serve.decode.DecodeBatch` computes;
Idefics3 / SmolVLM: no KV-cache step for our engine) is served by `GenerateEngine` instead of
`serve.engine.Engine`; `uses_own_generate(vlm)` tells which.

Contract (the surface `serve.app` / `serve.session` use, as `Engine`'s):
- `GenerateEngine(vlm, max_queue=64)`; `start()` / `stop()` the decoding thread; `submit(job)` queues a
  `serve.engine.Job` or raises `QueueFull` past one running + `max_queue` waiting; `stats()`.
- One request at a time (`max_batch_size` is 1: the model's generate takes no rows mid-batch; the CLI says so
  in one line at start). Each job runs `vlm.generate(prompt [1, T], mask, **image inputs, ...)`: greedy at
  temperature 0 (so an answer equals transformers' generate on the processor's inputs), else sampling with
  temperature / top_p / top_k, seeded by `seed`. Streaming is token by token: a transformers streamer
  pushes each new id through the job's `TextStream`, which emits ("delta", text) as text becomes final.
- A job ends with "stop" (a stop id or stop string), "length" (`max_tokens`), "timeout", "cancelled"
  (checked between tokens by a stopping criterion) or "error" (the message to the job, the traceback to
  the log, the engine goes on), then exactly one ("done", job) or ("error", message).
"""

from __future__ import annotations

import logging
import time
import traceback
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from .decode import Row
from .engine import EngineBase, Job
from .imagecache import ImageCache
from .prefixcache import PrefixCache
from .text import TextStream

log = logging.getLogger("qwenvl_lab.serve.generate_engine")


def uses_own_generate(vlm: Any) -> bool:
    """True for a model whose family is served through its own generate (`Family.serving` "generate...")."""
    family = getattr(vlm, "family", None)
    return family is not None and str(family.serving).startswith("generate")


class _Halt(StoppingCriteria):
    """Ends generate once the job has a finish reason (stop string, length, cancel, deadline)."""

    def __init__(self, job: Job):
        self.job = job

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kw: Any) -> torch.Tensor:
        if self.job.finish_reason is None and (self.job.cancelled or time.monotonic() > self.job.deadline):
            self.job.finish_reason = "cancelled" if self.job.cancelled else "timeout"
        done = self.job.finish_reason is not None
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class _Streamer(BaseStreamer):
    """transformers' streamer protocol: `put(prompt)` once, then `put(new ids [1])` per step, then `end()`."""

    def __init__(self, engine: GenerateEngine, job: Job):
        self.engine, self.job, self.prompt_seen = engine, job, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for tok in value.view(-1).tolist():
            self.engine._token(self.job, int(tok))

    def end(self) -> None:
        pass


class GenerateEngine(EngineBase):
    thread_name = "serve-generate"
    max_batch_size = 1  # the model's generate takes no rows mid-batch

    def __init__(self, vlm: Any, max_queue: int = 64) -> None:
        super().__init__(vlm, max_queue)
        self.running: Job | None = None

    def _running(self) -> int:
        return int(self.running is not None)

    def cache_stats(self) -> dict:
        """No image or prefix cache here (the model's generate re-reads the whole prompt): empty, for /metrics."""
        return {"image_cache": ImageCache(0).stats(), "prefix_cache": PrefixCache(0).stats()}

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self.cv:
                while not self._stopping and not self.waiting:
                    self.cv.wait()
                if self._stopping:
                    return
                job = self.running = self.waiting.popleft()
            try:
                self._decode(job)
            except Exception as e:  # a bug or an impossible input: fail this request, keep serving
                log.error("generation failed:\n%s", traceback.format_exc())
                self._end(job, "error", f"generation failed: {type(e).__name__}: {e}")
            with self.cv:
                self.running = None

    def _decode(self, job: Job) -> None:
        if job.cancelled or time.monotonic() > job.deadline:
            self._end(job, "cancelled" if job.cancelled else "timeout")
            return
        job.row = Row(job.prompt_ids, job.images, job.params)
        job.stream = TextStream(self.vlm.decode, job.stop)
        self.counters["admitted"] += 1
        self.counters["max_batch"] = 1
        device = next(self.vlm.parameters()).device
        ids = torch.tensor([job.prompt_ids], device=device)  # [1, T]
        images = {k: v.to(device) for k, v in (job.images or {}).items()}
        p = job.params
        kw: dict[str, Any] = dict(max_new_tokens=p.max_tokens, streamer=_Streamer(self, job),
                                  stopping_criteria=StoppingCriteriaList([_Halt(job)]))
        if p.temperature > 0:
            kw.update(do_sample=True, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k)  # 0 = off, as ours
            if p.seed is not None:
                torch.manual_seed(p.seed)  # one request at a time: the global generator is this job's
        if p.ignore_eos:
            kw["min_new_tokens"] = p.max_tokens
        self.vlm.generate(ids, torch.ones_like(ids), **images, **kw)
        self._end(job, job.finish_reason or "length")

    def _token(self, job: Job, tok: int) -> None:
        """One generated id (from the streamer): a stop, or text for the stream."""
        if job.finish_reason is not None:
            return
        if tok in self.stop_ids and not job.params.ignore_eos:
            job.finish_reason = "stop"
            return
        self._accept(job, tok, time.monotonic())
        delta, hit_stop = job.stream.push(tok)
        if delta:
            job.emit("delta", delta)
        if hit_stop:
            job.finish_reason = "stop"
        elif len(job.row.tokens) >= job.params.max_tokens:
            job.finish_reason = "length"

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
