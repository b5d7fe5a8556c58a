"""LLaVA instruct sets (detail_23k, complex_reasoning_77k, llava_v1_5_mix665k) -> our JSONL.

Source: a JSON list of `{"id": str|int, "image"?: str, "conversations": [{"from": "human"|"gpt"|"system",
"value": str}, ...]}`. Text-only records have no `image`. Image paths are kept as written (mix665k
already has "coco/train2017/x.jpg", "gqa/images/...", "ocr_vqa/images/...", ...) with `--image-prefix`
prepended. `<image>` markers stay exactly where they are in the text.

A record is reported and skipped (counted by reason, never fatal) when: its `<image>` count differs
from its number of images; its conversation is empty, starts with the assistant, or has an unknown
`from` or a non-string `value`; or, with `--image-root`, its image file does not exist there.
Record ids repeat in mix665k, so a repeated id gets a `#k` suffix to keep ids unique.

    python -m qwenvl_lab.dataprocess.llava_instruct llava_v1_5_mix665k.json out.jsonl --image-root /data/llava
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from ..core.cli import run_cli
from .common import (
    IMAGE_MARKER,
    Converted,
    SourceError,
    join_path,
    make_sample,
    read_json,
    report,
    write_jsonl,
)

ROLE_OF = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _messages(conversations: Any) -> tuple[list[dict] | None, str]:
    """(messages, '') or (None, reason) for one record's `conversations`."""
    if not isinstance(conversations, list) or not conversations:
        return None, "empty conversation"
    messages = []
    for k, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            return None, f"bad turn: conversations[{k}] is not an object"
        frm = turn.get("from")
        role = ROLE_OF.get(frm) if isinstance(frm, str) else None
        if role is None:
            return None, f"unknown role: conversations[{k}] from={turn.get('from')!r}"
        if not isinstance(turn.get("value"), str):
            return None, f"non-string content: conversations[{k}]"
        messages.append({"role": role, "content": turn["value"]})
    first = next((m["role"] for m in messages if m["role"] != "system"), None)
    if first != "user":
        return None, "assistant-first conversation" if first else "no user turn"
    return messages, ""


def convert_llava(records: list[Any], image_prefix: str = "", image_root: str | None = None,
                  source: str = "llava") -> Converted:
    """Convert a parsed LLaVA instruct list; `image_root` (optional) checks that image files exist."""
    if not isinstance(records, list):
        raise SourceError(f"{source}: expected a JSON list of records, got {type(records).__name__}")
    out = Converted()
    id_counts: dict[str, int] = {}
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            out.skip(f"{source}[{i}]", "bad record: not an object")
            continue
        base = str(rec.get("id", f"{source}[{i}]"))
        n_seen = id_counts.get(base, 0)
        id_counts[base] = n_seen + 1
        sample_id = base if n_seen == 0 else f"{base}#{n_seen}"

        image = rec.get("image")
        images = [image] if isinstance(image, str) else list(image or [])
        if not all(isinstance(p, str) and p for p in images):
            out.skip(sample_id, "bad image field: not a path string")
            continue
        images = [join_path(image_prefix, p) for p in images]

        messages, reason = _messages(rec.get("conversations"))
        if messages is None:
            out.skip(sample_id, reason)
            continue
        n_markers = sum(m["content"].count(IMAGE_MARKER) for m in messages)
        if n_markers != len(images):
            out.skip(sample_id, f"image count mismatch: {n_markers} {IMAGE_MARKER} markers, {len(images)} images")
            continue
        if image_root is not None:
            missing = [p for p in images if not os.path.isfile(os.path.join(image_root, p))]
            if missing:
                out.skip(sample_id, f"missing image: {missing[0]}")
                continue
        out.samples.append(make_sample(sample_id, messages, images))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qwenvl_lab.dataprocess.llava_instruct", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", help="LLaVA instruct JSON (a list of records)")
    ap.add_argument("output", help="output JSONL path")
    ap.add_argument("--image-prefix", default="", help="prepended to every image path (e.g. coco/train2017)")
    ap.add_argument("--image-root", default=None, help="if set, skip records whose image is missing here")
    args = ap.parse_args(argv)
    result = convert_llava(read_json(args.input), args.image_prefix, args.image_root, source=args.input)
    write_jsonl(args.output, result.samples)
    print(report(result, args.output))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
