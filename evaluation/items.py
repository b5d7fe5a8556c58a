"""`EvalItem`: one question of a benchmark, as every task loader returns it, and the helpers loaders share.

An item holds what the runner needs to ask (the question text that fills the prompt's `{question}`, its
images as paths or base64 strings, the options of a multiple-choice question) and what the task's scorer
needs afterwards (`target`: the human answers, a label, the index of the right option, the reference
captions), its categories (`{group: name or [names]}`, e.g. `{"answer_type": "number"}`) and `group`,
the unit `--limit` counts (a question of MMBench's circular rounds, an image of MME's question pair).

Images are read only when the item is answered: `load_images(item)` returns RGB PIL images or raises
`BadSampleError` naming the item and the file; the runner skips (and counts) such an item.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from ..core.errors import UserError
from ..dataset.formats import resolve_path
from ..dataset.images import load_image, to_rgb
from ..dataset.sample import BadSampleError


class BenchmarkFormatError(UserError, ValueError):
    """A benchmark file is not in the released format: the message names the file and what is wrong."""


@dataclass
class EvalItem:
    id: str
    question: str
    images: list[str] = field(default_factory=list)  # file paths, or "base64:<data>"
    target: Any = None  # None: no reference (a test split): answered, not scored
    category: dict[str, Any] = field(default_factory=dict)
    options: list[str] | None = None
    group: str | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.group is None:
            self.group = self.id


def load_images(item: EvalItem) -> list[Image.Image]:
    out = []
    for ref in item.images:
        if ref.startswith("base64:"):
            try:
                img = Image.open(io.BytesIO(base64.b64decode(ref[7:], validate=False)))
                img.load()
            except (binascii.Error, UnidentifiedImageError, OSError, ValueError) as e:
                raise BadSampleError(f"item {item.id}: its base64 image does not decode ({e})", "bad_image") from None
            out.append(to_rgb(img))
        else:
            try:
                out.append(load_image(ref))
            except BadSampleError as e:
                raise BadSampleError(f"item {item.id}: {e}", e.kind) from None
    return out


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise BenchmarkFormatError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BenchmarkFormatError(f"{path}: not valid JSON ({e})") from None


def read_jsonl(path: str | Path) -> list[dict]:
    """JSON Lines (a whole-file JSON list is accepted too)."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkFormatError(f"{path}: file not found")
    text = path.read_text(encoding="utf-8").strip()
    if text.startswith("["):
        return read_json(path)
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise BenchmarkFormatError(f"{path}:{n}: not a JSON line ({e})") from None
    return rows


def need(record: dict, keys: tuple[str, ...], where: str) -> None:
    """Raise `BenchmarkFormatError` naming `where` and the first missing key."""
    if not isinstance(record, dict):
        raise BenchmarkFormatError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for k in keys:
        if k not in record:
            raise BenchmarkFormatError(f"{where}: missing key {k!r} (has {sorted(record)[:12]})")


def image_path(folder: str | Path, name: str, alternatives: tuple[str, ...] = ()) -> str:
    """`folder/name` kept inside `folder`; the first of `name` and `alternatives` that exists, else `name`."""
    for candidate in (name, *alternatives):
        full = resolve_path(candidate, str(folder), str(folder), allow_absolute_paths=False,
                            fail=BenchmarkFormatError)
        if Path(full).is_file():
            return full
    return resolve_path(name, str(folder), str(folder), allow_absolute_paths=False, fail=BenchmarkFormatError)


def find_one(folder: Path, pattern: str, what: str, required: bool = True) -> Path | None:
    """The single file matching `pattern` in `folder` (an error names the candidates when ambiguous)."""
    hits = sorted(folder.glob(pattern))
    if len(hits) == 1:
        return hits[0]
    if not hits:
        if required:
            raise BenchmarkFormatError(f"{folder}: no {what} file ({pattern}) in this folder")
        return None
    raise BenchmarkFormatError(f"{folder}: several {what} files match {pattern}: {[h.name for h in hits]}; "
                               f"name one")
