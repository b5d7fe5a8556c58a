"""From a chat to a running engine job: the steps that the API (`serve.app`) and the web chat (`serve.chat_page`)
share, so that both check the same limits and hand events back to their event loop the same way.

Contract:
- `RequestError(message, param=None)`: the client's mistake; the API answers it with 400, the web chat
  shows it as one message.
- `prepare(vlm, messages, images, max_tokens, limits) -> (ids, pixel_values)` (blocking: run it off the
  event loop): the prompt ids (the chat template with image spans; a malformed conversation is a
  `RequestError` on "messages"), the `limits.max_model_len` check (prompt + max_tokens, on "max_tokens"),
  and the images' pixel values `[n_images, 3, H, W]` (None without images).
- `submit(engine, ids, pixel_values, params, stop, timeout_s) -> (job, events)`, called on the event
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


def prepare(vlm: Any, messages: list[dict], images: list, max_tokens: int, limits: Limits) -> tuple[list[int], Any]:
    try:
        ids = vlm.chat_ids(messages, len(images))
    except ValueError as e:
        raise RequestError(f"messages: {e}", "messages") from e
    if limits.max_model_len is not None and len(ids) + max_tokens > limits.max_model_len:
        raise RequestError(f"the prompt has {len(ids)} tokens and max_tokens is {max_tokens}: over the model "
                           f"length {limits.max_model_len}; ask for fewer tokens", "max_tokens")
    pixel_values = vlm.image_processor(images) if images else None  # [n_images, 3, H, W]
    return ids, pixel_values


def submit(engine: Engine, ids: list[int], pixel_values: Any, params: SamplingParams, stop: list[str],
           timeout_s: float) -> tuple[Job, asyncio.Queue]:
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def emit(kind: str, data: Any) -> None:  # called from the engine thread
        try:
            loop.call_soon_threadsafe(events.put_nowait, (kind, data))
        except RuntimeError:  # the loop is closed (shutting down): nobody waits for this job any more
            job.cancel()

    job = Job(ids, pixel_values, params, emit, stop=stop, deadline=time.monotonic() + timeout_s)
    engine.submit(job)
    return job, events
