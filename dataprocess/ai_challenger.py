"""AI Challenger image captions (Chinese) -> caption samples in our JSONL.

Source: `caption_train_annotations_20170902.json`, a JSON list of
`{"image_id": "xxx.jpg", "caption": [five Chinese captions], "url"?: str}`.
Output: one sample per caption (default) or one per image with `--one-per-image` (its first non-empty
caption). The user turn is `<image>\\n` + one of the fixed Chinese prompts in `BRIEF_PROMPTS_ZH`, chosen
by a hash of (seed, sample id); the answer is the caption with ALL whitespace removed (the source
captions carry stray spaces and newlines inside Chinese text, where no space belongs).
Sample ids are `aic_{image stem}_{k}` (k = caption index). Empty captions are skipped and counted.

    python -m qwenvl_lab.dataprocess.ai_challenger caption_train_annotations_20170902.json out.jsonl \\
        --image-prefix ai_challenger/caption_train_images_20170902
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any

from ..core.cli import run_cli
from .common import (
    BRIEF_PROMPTS_ZH,
    Converted,
    SourceError,
    caption_sample,
    join_path,
    pick,
    read_json,
    report,
    write_jsonl,
)


def clean_zh(caption: str) -> str:
    """Remove every whitespace character (spaces, newlines, full-width spaces)."""
    return re.sub(r"\s+", "", caption)


def convert_ai_challenger(records: list[Any], image_prefix: str = "", one_per_image: bool = False,
                          seed: int = 0, source: str = "ai_challenger") -> Converted:
    """Convert a parsed AI Challenger caption list; `source` names the file in error messages."""
    if not isinstance(records, list):
        raise SourceError(f"{source}: expected a JSON list of records, got {type(records).__name__}")
    out = Converted()
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or not isinstance(rec.get("image_id"), str):
            raise SourceError(f"{source}: record {i} lacks a string 'image_id'")
        captions = rec.get("caption")
        if isinstance(captions, str):
            captions = [captions]
        if not isinstance(captions, list):
            raise SourceError(f"{source}: record {i} ({rec['image_id']}) has no 'caption' list")
        stem = os.path.splitext(rec["image_id"])[0]
        image = join_path(image_prefix, rec["image_id"])
        for k, cap in enumerate(captions):
            sample_id = f"aic_{stem}_{k}"
            text = clean_zh(cap) if isinstance(cap, str) else ""
            if not text:
                out.skip(sample_id, f"empty caption: record {i} caption {k}")
                continue
            out.samples.append(caption_sample(sample_id, pick(BRIEF_PROMPTS_ZH, seed, sample_id), text, image))
            if one_per_image:
                break
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qwenvl_lab.dataprocess.ai_challenger", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", help="AI Challenger caption annotations JSON")
    ap.add_argument("output", help="output JSONL path")
    ap.add_argument("--image-prefix", default="", help="prepended to image_id")
    ap.add_argument("--one-per-image", action="store_true", help="one sample per image (its first caption)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the prompt choice")
    args = ap.parse_args(argv)
    result = convert_ai_challenger(read_json(args.input), args.image_prefix, args.one_per_image, args.seed,
                                   source=args.input)
    write_jsonl(args.output, result.samples)
    print(report(result, args.output))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
