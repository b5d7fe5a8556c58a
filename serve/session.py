"""From a chat to a running engine job: the steps that the API (`serve.app`) and the web chat (`serve.chat_page`)
share, so that both check the same limits and hand events back to their event loop the same way.

Contract:
- `RequestError(message, param=None)`: the client's mistake; the API answers it with 400, the web chat
  shows it as one message.
- `prepare(vlm, messages, images, max_tokens, limits) -> (ids, image_inputs)` (blocking: run it off the
  event loop): the prompt ids (the chat template with each image's span as long as the model's resolution
  rule makes it for that image's size, `vlm.image_tokens`; a malformed conversation is a `RequestError` on
  "messages", an image the rule cannot take one on "messages" too, since images arrive in them), the
  `limits.max_model_len` check (prompt with those spans + max_tokens, on "max_tokens"), and the images'
  model inputs `vlm.image_inputs(images)` (`pixel_values` plus the per-image keys of the mode; `{}`
  without images).
- `submit(engine, ids, images, params, stop, timeout_s) -> (job, events)`, called on the event
  loop: queues one `Job` whose events arrive in the asyncio queue `events`; once that loop has closed,
  an event cancels the job instead of raising in the engine thread (which would fail the whole batch).
  Raises `QueueFull` as `Engine.submit` does.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from .decode import SamplingParams
from .engine import Engine, Job
from .protocol import Limits


class RequestError(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param = message, param


def prepare(vlm: Any, messages: list[dict], images: list, max_tokens: int,
            limits: Limits) -> tuple[list[int], dict[str, Any]]:
    try:
        counts = vlm.image_tokens(images)  # None in fixed mode: every image tokens_per_image
    except ValueError as e:  # e.g. an aspect ratio the native rule refuses
        raise RequestError(f"messages: an image cannot be used: {e}", "messages") from e
    try:
        ids = vlm.chat_ids(messages, len(images), counts)
    except ValueError as e:
        raise RequestError(f"messages: {e}", "messages") from e
    if limits.max_model_len is not None and len(ids) + max_tokens > limits.max_model_len:
        raise RequestError(f"the prompt has {len(ids)} tokens and max_tokens is {max_tokens}: over the model "
                           f"length {limits.max_model_len}; ask for fewer tokens", "max_tokens")
    return ids, vlm.image_inputs(images)  # {} without images; pixel_values [n_crops or patches, 3, s, s], ...


def submit(engine: Engine, ids: list[int], images: Any, params: SamplingParams, stop: list[str],
           timeout_s: float) -> tuple[Job, asyncio.Queue]:
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def emit(kind: str, data: Any) -> None:  # called from the engine thread
        try:
            loop.call_soon_threadsafe(events.put_nowait, (kind, data))
        except RuntimeError:  # the loop is closed (shutting down): nobody waits for this job any more
            job.cancel()

    job = Job(ids, images, params, emit, stop=stop, deadline=time.monotonic() + timeout_s)
    engine.submit(job)
    return job, events
