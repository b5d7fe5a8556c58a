"""Helpers shared by the converters: reading source files, building and writing our JSONL samples.

Our JSONL (one sample per line, UTF-8, `ensure_ascii=False`):
    {"id": str, "messages": [{"role": "user"|"assistant"|"system", "content": str}],
     "images": [relative paths], "videos": []}
with one `<image>` marker in the content where each image stands, in order. `make_sample` asserts
that contract so no converter can write a sample the dataset reader would reject.

A converter returns a `Converted(samples, skipped)`: `skipped` is a list of `(sample id, reason)`
for source records that were reported and left out (never silently dropped).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import UserError
from ..dataset.sample import IMAGE_MARKER, ROLES

# English brief-caption prompts for stage-1 alignment (one is drawn per sample, deterministically).
BRIEF_PROMPTS_EN = [
    "Describe the image briefly.",
    "Give a short caption for this picture.",
    "Write a one-sentence description of the photo.",
    "Summarize what the image shows in a few words.",
    "Provide a concise caption for the image.",
    "What does this picture show? Answer in one sentence.",
]

# Chinese brief-caption prompts (AI Challenger and the image_map layout with --lang zh).
BRIEF_PROMPTS_ZH = [
    "请用一句话描述这张图片。",
    "简要描述这张图片的内容。",
    "这张图片里有什么？请用一句话回答。",
    "用一句简短的话概括图片内容。",
]


class SourceError(UserError, ValueError):
    """A source file (or an option) a converter cannot use; the message names it and says what is wrong.
    Every `python -m qwenvl_lab.dataprocess.NAME` answers it with one line `error: ...` (exit status 2)."""


@dataclass
class Converted:
    samples: list[dict] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def skip(self, sample_id: str, reason: str) -> None:
        self.skipped.append((sample_id, reason))


def pick(options: list[str], seed: int, key: str) -> str:
    """Choose one option from a hash of (seed, key): stable across runs, machines and record order."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return options[int.from_bytes(digest[:8], "big") % len(options)]


def clean_spaces(text: str) -> str:
    """Collapse runs of whitespace (newlines included) to one space and strip the ends."""
    return re.sub(r"\s+", " ", text).strip()


def join_path(prefix: str, name: str) -> str:
    """`prefix` + `name` as a forward-slash relative path ('' prefix leaves `name` unchanged)."""
    name = name.replace("\\", "/")
    if not prefix:
        return name
    return prefix.rstrip("/") + "/" + name.lstrip("/")


def make_sample(sample_id: str, messages: list[dict], images: list[str], **extra: Any) -> dict:
    """One sample of our JSONL; asserts roles, string contents and marker count == image count."""
    assert isinstance(sample_id, str) and sample_id, f"sample id must be a non-empty str, got {sample_id!r}"
    assert messages, f"sample {sample_id}: no messages"
    for m in messages:
        assert m["role"] in ROLES, f"sample {sample_id}: unknown role {m['role']!r}"
        assert isinstance(m["content"], str), f"sample {sample_id}: content is not a str"
    n_markers = sum(m["content"].count(IMAGE_MARKER) for m in messages)
    assert n_markers == len(images), (
        f"sample {sample_id}: {n_markers} {IMAGE_MARKER} markers but {len(images)} images"
    )
    return {"id": sample_id, "messages": messages, "images": list(images), "videos": [], **extra}


def caption_sample(sample_id: str, prompt: str, caption: str, image: str) -> dict:
    """A single-turn caption sample: user `<image>\\n{prompt}`, assistant `{caption}`."""
    return make_sample(
        sample_id,
        [
            {"role": "user", "content": f"{IMAGE_MARKER}\n{prompt}"},
            {"role": "assistant", "content": caption},
        ],
        [image],
    )


def read_text(path: str | Path) -> str:
    """A whole UTF-8 file (a BOM is tolerated); a non-UTF-8 file is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"{path}: no such file")
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SourceError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start}); re-encode it as UTF-8") from None


def read_json(path: str | Path) -> Any:
    """Parse a JSON file; a syntax error names the file, line and column."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise SourceError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def write_jsonl(path: str | Path, samples: list[dict]) -> None:
    """Write samples one per line (UTF-8, non-ASCII kept as is); parent folders are created."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            for s in samples:
                f.write(json.dumps(s, ensure_ascii=False) + "\n")
    except OSError as e:
        raise SourceError(f"{path}: cannot be written ({e.strerror or e}); choose another output path") from None


def report(result: Converted, out: str | Path, max_listed: int = 20) -> str:
    """A human-readable summary: samples written, skips counted by reason, the first few listed."""
    lines = [f"wrote {len(result.samples)} samples to {out}"]
    if result.skipped:
        by_reason = Counter(reason.split(":")[0] for _, reason in result.skipped)
        lines.append(f"skipped {len(result.skipped)} records: " + ", ".join(
            f"{r} x{n}" for r, n in by_reason.most_common()))
        for sid, reason in result.skipped[:max_listed]:
            lines.append(f"  skipped {sid}: {reason}")
        if len(result.skipped) > max_listed:
            lines.append(f"  ... and {len(result.skipped) - max_listed} more")
    return "\n".join(lines)
