"""The one normalised sample every data format becomes, and the error a bad sample raises.

Contract:
- `Sample.messages` is `[{"role": "system"|"user"|"assistant", "content": str}]`: at most one system
  message and only first, then user / assistant alternating, starting with user.
- Each image stands in the text as the literal marker `<image>`, each video as `<video>`; the i-th
  marker (counted over all messages in order) is `images[i]` / `videos[i]`.
- `images` / `videos` hold resolved file paths (strings).
- `source` is `(file, position)`: the 1-based line of a JSONL file or the 0-based index of a JSON list,
  used only in error messages.
- `BadSampleError` is the one error class for a sample that cannot be used (bad record, bad image,
  too long). The dataset skips it (counted, logged) in non-strict mode and re-raises it in strict mode.
- `BadSampleError` is a `UserError` (core/errors.py: the base of every expected user mistake; entry points
  answer it with one line, exit 2).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..core.errors import UserError

IMAGE_MARKER = "<image>"
VIDEO_MARKER = "<video>"
ROLES = ("system", "user", "assistant")


class BadSampleError(UserError, ValueError):
    """A sample (or one of its files) that cannot be used; the message names the file and the sample.

    `kind` is a short category used to count skips: bad_record | bad_json | bad_image | missing_file |
    too_large | bad_video | too_long | no_target.
    """

    def __init__(self, message: str, kind: str = "bad_record"):
        super().__init__(message)
        self.kind = kind


def describe_source(source: tuple[str, int] | None) -> str:
    """'data.jsonl line 3' / 'data.json index 2' — where a record came from, for error messages."""
    if source is None:
        return "<unknown source>"
    path, pos = source
    kind = "line" if str(path).endswith(".jsonl") else "index"
    return f"{path} {kind} {pos}"


@dataclass
class Sample:
    id: str
    messages: list[dict[str, str]]
    images: list[str] = field(default_factory=list)
    videos: list[str] = field(default_factory=list)
    source: tuple[str, int] | None = None

    @property
    def where(self) -> str:
        """Human-readable location used in every error about this sample."""
        return f"sample {self.id!r} ({describe_source(self.source)})"
