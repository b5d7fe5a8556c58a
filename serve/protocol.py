"""OpenAI chat-completions requests: parsing, limits and images, with one clear error per mistake.

Contract:
- `ApiError(status, message, param=None, code=None)`: what the routes answer as OpenAI's error JSON
  `{"error": {"message", "type", "param", "code"}}` (4xx: `invalid_request_error`).
- `Limits`: `max_images` per request, `max_pixels` per image (the training loader's guard,
  `dataset.images.MAX_PIXELS`, by default), `max_tokens` (the largest a request may ask for),
  `default_max_tokens`, `max_model_len` (prompt + max_tokens; None = unchecked), `image_folder` (local
  paths are refused without it and must stay inside it), `allow_remote_images` (http(s) URLs),
  `remote_max_bytes`, `remote_timeout_s`.
- `parse_chat(body, served_model, limits) -> ChatRequest`: messages become `{"role", "content": str}`
  with one `<image>` marker per `image_url` part, in order. A content list is joined in order: text parts
  back to back, an image part as `<image>`, and a newline between an image and a neighbouring text part
  (so `[image, "What is it?"]` is `"<image>\\nWhat is it?"`, the usual LLaVA prompt that test.py writes).
  Text that already holds `<image>` is refused (images come only as image_url parts).
  Sampling: `max_tokens` (or `max_completion_tokens`), `temperature` (OpenAI's default 1.0; 0 is greedy),
  `top_p`, `top_k`, `seed`, `stop` (a string or up to 4), `stream`, `stream_options.include_usage`,
  and vLLM's `ignore_eos`. `n` > 1, tools, logprobs and non-text response formats are refused.
- `load_images(sources, limits) -> [PIL.Image]` (blocking: run it off the event loop): `data:` base64
  URLs, paths under the image folder, http(s) when allowed; every image goes through
  `dataset.images.load_image` (header-checked pixel limit, EXIF orientation, RGB).
"""

from __future__ import annotations

import base64
import binascii
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..dataset.images import MAX_PIXELS, load_image
from ..dataset.sample import IMAGE_MARKER, BadSampleError
from .decode import SamplingParams

REFUSED = {  # parameters whose meaning we cannot honour: refused rather than silently ignored
    "tools": "tool calling is not supported",
    "functions": "function calling is not supported",
    "tool_choice": "tool calling is not supported",
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass
class Limits:
    max_images: int = 8
    max_pixels: int = MAX_PIXELS
    max_tokens: int = 2048
    default_max_tokens: int = 256
    max_model_len: int | None = None
    image_folder: str | None = None
    allow_remote_images: bool = False
    remote_max_bytes: int = 20 * 1024 * 1024
    remote_timeout_s: float = 10.0


@dataclass
class ImageSource:
    where: str  # e.g. "messages[0].content[1]": named in every error about this image
    url: str


@dataclass
class ChatRequest:
    model: str
    messages: list[dict]
    images: list[ImageSource]
    params: SamplingParams
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


def _bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param)


def _number(body: dict, key: str, default: float, lo: float, hi: float, kind: type = float) -> Any:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise _bad(f"'{key}' must be {'an integer' if kind is int else 'a number'}, got {value!r}", key)
    if not lo <= value <= hi:
        raise _bad(f"'{key}' must be between {lo} and {hi}, got {value}", key)
    return kind(value)


def _content(msg: dict, i: int, images: list[ImageSource]) -> str:
    content = msg.get("content")
    where = f"messages[{i}].content"
    if isinstance(content, str):
        parts: list = [{"type": "text", "text": content}]
    elif isinstance(content, list):
        parts = content
    else:
        raise _bad(f"{where} must be a string or a list of content parts, got {type(content).__name__}", where)
    pieces: list[tuple[str, str]] = []  # (kind, text)
    for j, part in enumerate(parts):
        pwhere = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise _bad(f"{pwhere}.text must be a string", pwhere)
            if IMAGE_MARKER in text:
                raise _bad(f"{pwhere}: text may not contain {IMAGE_MARKER}; send images as image_url parts", pwhere)
            pieces.append(("text", text))
        elif kind == "image_url":
            if msg.get("role") != "user":
                raise _bad(f"{pwhere}: images go in user messages only", pwhere)
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str) or not url:
                raise _bad(f"{pwhere}.image_url needs a 'url' string", pwhere)
            images.append(ImageSource(pwhere, url))
            pieces.append(("image", IMAGE_MARKER))
        else:
            raise _bad(f"{pwhere}: unsupported content part type {kind!r} (use 'text' or 'image_url')", pwhere)
    out = ""
    for k, (kind, text) in enumerate(pieces):
        if k and kind != pieces[k - 1][0]:
            out += "\n"  # between an image and a neighbouring text part
        out += text
    return out


def parse_chat(body: Any, served_model: str, limits: Limits) -> ChatRequest:
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    model = body.get("model", served_model)
    if model != served_model:
        raise ApiError(404, f"model {model!r} is not served here; GET /v1/models lists {served_model!r}",
                       "model", "model_not_found")
    for key, why in REFUSED.items():
        if body.get(key):
            raise _bad(f"'{key}': {why}", key)
    if body.get("n", 1) != 1:
        raise _bad("'n' must be 1 (one answer per request)", "n")
    if body.get("logprobs"):
        raise _bad("'logprobs' is not supported", "logprobs")
    fmt = body.get("response_format")
    if fmt and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise _bad("'response_format' supports only {'type': 'text'}", "response_format")

    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise _bad("'messages' must be a non-empty list", "messages")
    images: list[ImageSource] = []
    messages = []
    for i, msg in enumerate(raw):
        role = msg.get("role") if isinstance(msg, dict) else None
        if role not in ("system", "user", "assistant"):
            raise _bad(f"messages[{i}].role must be system, user or assistant, got {role!r}", f"messages[{i}].role")
        messages.append({"role": role, "content": _content(msg, i, images)})
    if messages[-1]["role"] != "user":
        raise _bad("the last message must be the user's (the model answers it)", "messages")
    if len(images) > limits.max_images:
        raise _bad(f"{len(images)} images in the request; the limit is {limits.max_images}", "messages")

    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, key, limits.default_max_tokens, 1, limits.max_tokens, int)
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        top_k=_number(body, "top_k", 0, -1, 1_000_000, int),
        seed=_number(body, "seed", None, -(2 ** 63), 2 ** 63 - 1, int),
        ignore_eos=bool(body.get("ignore_eos", False)),
    )
    if params.top_k < 0:
        params.top_k = 0  # vLLM's -1 = no top-k
    if params.temperature > 0 and params.top_p <= 0:
        raise _bad("'top_p' must be > 0 when sampling", "top_p")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
        raise _bad("'stop' must be a string or a list of at most 4 strings", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("'stream' must be true or false", "stream")
    opts = body.get("stream_options") or {}
    return ChatRequest(model=served_model, messages=messages, images=images, params=params, stop=stop,
                       stream=stream, include_usage=bool(isinstance(opts, dict) and opts.get("include_usage")))


# ----- images ----------------------------------------------------------------------------------------
def _decode_data_url(src: ImageSource) -> bytes:
    header, sep, payload = src.url.partition(",")
    if not sep or ";base64" not in header:
        raise _bad(f"{src.where}: a data URL must look like data:image/png;base64,<data>", src.where)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise _bad(f"{src.where}: the data URL is not valid base64 ({e})", src.where) from e


def _fetch(src: ImageSource, limits: Limits) -> bytes:
    if not limits.allow_remote_images:
        raise _bad(f"{src.where}: remote image URLs are refused; send the image as a data: URL (or start "
                   f"the server with --allow-remote-images)", src.where)
    try:
        with urllib.request.urlopen(src.url, timeout=limits.remote_timeout_s) as r:  # noqa: S310 (http(s) only)
            data = r.read(limits.remote_max_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise _bad(f"{src.where}: could not fetch {src.url}: {e}", src.where) from e
    if len(data) > limits.remote_max_bytes:
        raise ApiError(413, f"{src.where}: {src.url} is over {limits.remote_max_bytes} bytes", src.where)
    return data


def _local_path(src: ImageSource, limits: Limits) -> str:
    raw = src.url[len("file://"):] if src.url.startswith("file://") else src.url
    if limits.image_folder is None:
        raise _bad(f"{src.where}: local image paths are refused; send a data: URL (or start the server "
                   f"with --image-folder DIR)", src.where)
    folder = Path(limits.image_folder).resolve()
    path = (folder / raw).resolve()
    if not path.is_relative_to(folder):
        raise _bad(f"{src.where}: {raw} is outside the image folder", src.where)
    return str(path)


def _load(src: ImageSource, source: str | bytes, limits: Limits, name: str):
    try:
        return load_image(source, max_pixels=limits.max_pixels, name=name)
    except BadSampleError as e:
        status = 413 if e.kind == "too_large" else 400
        raise ApiError(status, f"{src.where}: {e}", src.where) from e


def load_image_source(src: ImageSource, limits: Limits):
    """One RGB PIL image (see the module docstring)."""
    url = src.url
    scheme = url.split(":", 1)[0].lower() if ":" in url[:12] else ""
    if scheme == "data":
        return _load(src, _decode_data_url(src), limits, name="the image")
    if scheme in ("http", "https"):
        return _load(src, _fetch(src, limits), limits, name="the image")
    if scheme in ("", "file"):
        return _load(src, _local_path(src, limits), limits, name=url)
    raise _bad(f"{src.where}: unsupported image URL scheme {scheme!r} (data:, a path, or http(s))", src.where)


def load_images(sources: list[ImageSource], limits: Limits) -> list:
    return [load_image_source(s, limits) for s in sources]
