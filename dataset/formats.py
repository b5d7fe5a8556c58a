"""Read data files and normalise every supported record shape to one `Sample`.

`read_records(path)` reads a JSON list (`.json`) or JSON Lines (`.jsonl`, one object per line) and returns
`[(position, record), ...]` (1-based line for JSONL, 0-based index for a JSON list). A non-UTF-8 file or an
invalid JSONL line raises `DataFileError` naming the file (and the line).

`normalize(record, index, source, image_folder=None, video_folder=None, allow_absolute_paths=False)` accepts:
- LLaVA: `id`, `image` (str | list), `conversations: [{"from": "human"|"gpt"|"system", "value": str}]`.
  LLaVA convention: a sample with images but NO `<image>` marker gets one marker per image (each followed
  by a newline) at the start of the first user turn. This happens only when the marker count is 0; any
  other mismatch is an error.
- lmms-finetune: like LLaVA plus `system_prompt`, `video` (str | list).
- LLaMA-Factory / ms-swift (and our own JSONL): `messages: [{"role", "content"}]`, `images`, `videos`,
  an optional system message or `system` field.
- OpenAI content blocks: `content` is a list of `{"type": "text", "text"}`, `{"type": "image_url",
  "image_url": {"url": path}}`, `{"type": "image", "image": path}`, `{"type": "video", "video": path}` or
  `{"type": "video_url", "video_url": {"url": path}}`; the blocks are joined with nothing in between,
  images/videos become markers in block order.
- Qwen-VL inline: `Picture 1: <img>path</img>` inside the text. The path goes to `images`, the tag becomes
  `<image>`, and the "Picture N: " label before it is dropped (it is Qwen-VL's own prompt wording; the
  chat template decides how images are introduced).

Every problem raises `BadSampleError` naming the file, the position and the sample id.

Paths: relative paths are joined to `image_folder` / `video_folder` (default: the data file's folder) and
must stay inside it (`../` escapes are refused, error kind "bad_path"). Absolute paths are accepted when
they lie inside the configured folder, or anywhere when no folder is configured;
`allow_absolute_paths=True` accepts any path (use it only for trusted data).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from ..core.errors import UserError
from .sample import IMAGE_MARKER, VIDEO_MARKER, BadSampleError, Sample, describe_source


class DataFileError(UserError, ValueError):
    """A data file that cannot be read at all (encoding, JSON syntax); the message names the file/line."""


# Qwen-VL inline images; the optional "Picture N: " label in front is swallowed with the tag.
_QWENVL_IMG = re.compile(r"(?:Picture \d+:\s?)?<img>(.*?)</img>", re.DOTALL)
_ROLE_ALIASES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}


# ---------------------------------------------------------------------------------------------- reading
def read_records(path: str, bad_lines: list[tuple[int, BadSampleError]] | None = None
                 ) -> list[tuple[int, dict]]:
    """Records of a `.json` list or `.jsonl` file as `(position, record)` pairs.

    When `bad_lines` is a list, an invalid JSONL line is appended to it as `(line, BadSampleError)` and the
    reading goes on (non-strict datasets count it as a skipped sample); otherwise it raises.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise DataFileError(f"{path}: data file not found")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")  # -sig: tolerate a byte-order mark written by some editors
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataFileError(f"{path}: not UTF-8 (byte {e.start}, line {line}); re-encode the file as UTF-8"
                            ) from e

    stripped = text.lstrip()
    if not path.endswith(".jsonl") and stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataFileError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
        return list(enumerate(data))
    if not path.endswith(".jsonl") and stripped.startswith("{") and "\n" not in stripped.rstrip():
        raise DataFileError(f"{path}: a single JSON object; expected a list of records or JSON Lines")

    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((lineno, json.loads(line)))
        except json.JSONDecodeError as e:
            err = BadSampleError(f"{path} line {lineno}: invalid JSON ({e.msg} at column {e.colno})",
                                 "bad_json")
            if bad_lines is None:
                raise DataFileError(str(err)) from e
            bad_lines.append((lineno, err))
    return records


# ------------------------------------------------------------------------------------------- normalising
def _normalize_message(m: Any, i: int, key: str, fail, inline_images: list[str], block_images: list[str],
                       block_videos: list[str]) -> dict:
    """`record[key][i]` -> `{"role", "content"}`; the media of `<img>` tags and content blocks are appended to
    the given lists and replaced by markers."""
    if not isinstance(m, dict):
        raise fail(f"{key}[{i}] must be an object, got {type(m).__name__}")
    role_key = "role" if "role" in m else "from"
    content_key = "content" if "content" in m else "value"
    if role_key not in m:
        raise fail(f"{key}[{i}] is missing 'role' / 'from'")
    if content_key not in m:
        raise fail(f"{key}[{i}] is missing 'content' / 'value'")
    role = _ROLE_ALIASES.get(m[role_key]) if isinstance(m[role_key], str) else None
    if role is None:
        raise fail(f"{key}[{i}] has unknown role {m[role_key]!r} "
                   f"(expected one of {sorted(_ROLE_ALIASES)})")
    content = m[content_key]
    if isinstance(content, list):
        content = _join_blocks(content, block_images, block_videos,
                               lambda msg, i=i: fail(f"{key}[{i}]: {msg}"))
    elif not isinstance(content, str):
        raise fail(f"{key}[{i}] content must be a string (or a list of content blocks), "
                   f"got {type(content).__name__}")
    if "<img>" in content:
        content = _QWENVL_IMG.sub(lambda mt: inline_images.append(mt.group(1).strip()) or IMAGE_MARKER,
                                  content)
    return {"role": role, "content": content}


def _add_system_field(record: dict, messages: list[dict], fail) -> None:
    """A record's `system` / `system_prompt` field, when given and not empty, as the first message."""
    system = record.get("system", record.get("system_prompt"))
    if system is not None:
        if not isinstance(system, str):
            raise fail(f"system prompt must be a string, got {type(system).__name__}")
        if messages and messages[0]["role"] == "system":
            raise fail("has both a system message and a 'system'/'system_prompt' field")
        if system:
            messages.insert(0, {"role": "system", "content": system})


def _check_markers(messages: list[dict], images: list[str], videos: list[str], key: str, fail) -> None:
    """One `<image>` / `<video>` marker per listed image / video; LLaVA records without image markers get
    them before the first question."""
    n_img = sum(m["content"].count(IMAGE_MARKER) for m in messages)
    if n_img == 0 and images and key == "conversations":
        # LLaVA convention: no marker means "the image(s) go before the first question".
        first_user = next(m for m in messages if m["role"] == "user")
        first_user["content"] = (IMAGE_MARKER + "\n") * len(images) + first_user["content"]
        n_img = len(images)
    if n_img != len(images):
        raise fail(f"{n_img} <image> marker(s) in the text but {len(images)} image(s) listed")
    n_vid = sum(m["content"].count(VIDEO_MARKER) for m in messages)
    if n_vid != len(videos):
        raise fail(f"{n_vid} <video> marker(s) in the text but {len(videos)} video(s) listed")


def normalize(
    record: Any,
    index: int = 0,
    source: str = "<memory>",
    *,
    image_folder: str | None = None,
    video_folder: str | None = None,
    allow_absolute_paths: bool = False,
) -> Sample:
    """One record of any supported format -> `Sample` (see the module docstring)."""
    where = (str(source), index)
    if not isinstance(record, dict):
        raise BadSampleError(f"{describe_source(where)}: record must be a JSON object, "
                             f"got {type(record).__name__}")
    sid = str(record["id"]) if record.get("id") is not None else f"{os.path.basename(str(source))}#{index}"

    def fail(msg: str) -> BadSampleError:
        return BadSampleError(f"{describe_source(where)} (id {sid!r}): {msg}")

    if "messages" in record:
        raw_msgs, key = record["messages"], "messages"
    elif "conversations" in record:
        raw_msgs, key = record["conversations"], "conversations"
    else:
        raise fail("missing field 'conversations' (LLaVA) or 'messages' (LLaMA-Factory / OpenAI)")
    if not isinstance(raw_msgs, list):
        raise fail(f"'{key}' must be a list, got {type(raw_msgs).__name__}")

    images = _path_list(record, ("images", "image"), fail)
    videos = _path_list(record, ("videos", "video"), fail)
    inline_images: list[str] = []
    block_images: list[str] = []
    block_videos: list[str] = []
    messages = [_normalize_message(m, i, key, fail, inline_images, block_images, block_videos)
                for i, m in enumerate(raw_msgs)]

    # Media paths may come from one place only, otherwise their relative order would be ambiguous.
    for inline, field_value, what in ((inline_images + block_images, images, "images"),
                                      (block_videos, videos, "videos")):
        if inline and field_value:
            raise fail(f"has {what} both in the text (<img> tags / content blocks) and in a field; use one")
    images = images or inline_images + block_images
    if inline_images and block_images:
        raise fail("mixes inline <img> tags and image content blocks; use one")
    videos = videos or block_videos

    _add_system_field(record, messages, fail)
    _check_order(messages, fail)
    _check_markers(messages, images, videos, key, fail)

    base = os.path.dirname(os.path.abspath(str(source)))  # the data file's folder
    images = [resolve_path(p, image_folder, base, allow_absolute_paths, fail) for p in images]
    videos = [resolve_path(p, video_folder, base, allow_absolute_paths, fail) for p in videos]
    return Sample(id=sid, messages=messages, images=images, videos=videos, source=where)


def _path_list(record: dict, keys: tuple[str, ...], fail) -> list[str]:
    present = [k for k in keys if record.get(k) not in (None, "", [])]
    if len(present) > 1:
        raise fail(f"has both '{present[0]}' and '{present[1]}'")
    if not present:
        return []
    value = record[present[0]]
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
        raise fail(f"'{present[0]}' must be a path or a list of paths")
    return list(value)


def _block_path(block: dict, kind: str, fail) -> str:
    """The file path of an OpenAI-style image/video block; local files only."""
    value = block.get(kind)
    if isinstance(value, dict):  # {"type": "image_url", "image_url": {"url": ...}}
        value = value.get("url")
    if not isinstance(value, str) or not value:
        raise fail(f"content block of type {block.get('type')!r} has no path")
    if value.startswith("file://"):
        value = value[len("file://"):]
    if re.match(r"^(https?|data):", value):
        raise fail(f"remote / inline media {value[:40]!r} is not supported; download it to a file first")
    return value


def _join_blocks(blocks: list, images: list[str], videos: list[str], fail) -> str:
    """OpenAI content blocks -> one string with markers; appends the block paths to images/videos."""
    parts = []
    for j, b in enumerate(blocks):
        if not isinstance(b, dict) or "type" not in b:
            raise fail(f"content block {j} must be an object with a 'type'")
        t = b["type"]
        if t == "text":
            if not isinstance(b.get("text"), str):
                raise fail(f"content block {j}: 'text' must be a string")
            parts.append(b["text"])
        elif t in ("image_url", "image"):
            images.append(_block_path(b, t, fail))
            parts.append(IMAGE_MARKER)
        elif t in ("video_url", "video"):
            videos.append(_block_path(b, t, fail))
            parts.append(VIDEO_MARKER)
        else:
            raise fail(f"content block {j} has unknown type {t!r}")
    return "".join(parts)


def _check_order(messages: list[dict], fail) -> None:
    """Optional system first, then user/assistant alternating starting with user."""
    if not messages or all(m["role"] == "system" for m in messages):
        raise fail("empty conversation")
    body = messages[1:] if messages[0]["role"] == "system" else messages
    if body[0]["role"] != "user":
        raise fail(f"conversation starts with {body[0]['role']!r}; "
                   f"the first turn (after system) must be user")
    for i, m in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            what = ("a system message after the first turn" if m["role"] == "system"
                    else f"two {m['role']} turns")
            raise fail(f"{what} at turn {i}; turns must alternate user/assistant")


def resolve_path(path: str, folder: str | None, base: str, allow_absolute_paths: bool, fail=None) -> str:
    """A media path made absolute and checked against its folder (see the module docstring)."""
    fail = fail or BadSampleError
    root = os.path.abspath(folder if folder is not None else base)
    full = os.path.normpath(os.path.join(root, os.path.expanduser(path)))
    if allow_absolute_paths:
        return full
    if os.path.isabs(path) and folder is None:
        return full
    if os.path.commonpath([root, full]) != root:
        err = fail(f"path {path!r} is outside the media folder {root}; pass allow_absolute_paths=True "
                   f"to allow it")
        err.kind = "bad_path"
        raise err
    return full
