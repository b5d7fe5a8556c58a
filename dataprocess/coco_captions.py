"""COCO captions (`captions_train2017.json`) -> stage-1 caption samples in our JSONL.

Source: `{"images": [{"id": int, "file_name": str, ...}], "annotations": [{"id": int, "image_id": int,
"caption": str}, ...]}`. Output: one sample per annotation (default) or one per image with
`--one-per-image` (its first non-empty caption in file order). The user turn is `<image>\\n` + a prompt
drawn deterministically from `BRIEF_PROMPTS_EN` by a hash of (seed, sample id); the assistant turn is
the caption with whitespace collapsed. Image paths are `--image-prefix` + `file_name`.
Annotations naming an unknown image, or with an empty caption, are skipped and counted.

    python -m qwenvl_lab.dataprocess.coco_captions captions_train2017.json out.jsonl --image-prefix coco/train2017
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..core.cli import run_cli
from .common import (
    BRIEF_PROMPTS_EN,
    Converted,
    SourceError,
    caption_sample,
    clean_spaces,
    join_path,
    pick,
    read_json,
    report,
    write_jsonl,
)


def convert_coco(data: dict[str, Any], image_prefix: str = "", one_per_image: bool = False,
                 seed: int = 0, source: str = "captions") -> Converted:
    """Convert a parsed COCO captions dict; `source` names the file in error messages."""
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise SourceError(f"{source}: expected a COCO captions dict with 'images' and 'annotations'")
    files: dict[Any, str] = {}
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "id" not in img or "file_name" not in img:
            raise SourceError(f"{source}: images[{i}] lacks 'id' or 'file_name'")
        files[img["id"]] = img["file_name"]

    out = Converted()
    seen_images: set = set()
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
            raise SourceError(f"{source}: annotations[{i}] lacks 'image_id' or 'caption'")
        image_id = ann["image_id"]
        sample_id = f"coco_{image_id}" if one_per_image else f"coco_{image_id}_{ann.get('id', i)}"
        if one_per_image and image_id in seen_images:
            continue
        if image_id not in files:
            out.skip(sample_id, f"unknown image_id: annotations[{i}] names image {image_id}")
            continue
        caption = clean_spaces(ann["caption"]) if isinstance(ann["caption"], str) else ""
        if not caption:
            out.skip(sample_id, f"empty caption: annotations[{i}]")
            continue
        seen_images.add(image_id)
        prompt = pick(BRIEF_PROMPTS_EN, seed, sample_id)
        out.samples.append(caption_sample(sample_id, prompt, caption, join_path(image_prefix, files[image_id])))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qwenvl_lab.dataprocess.coco_captions", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("captions", help="COCO captions JSON, e.g. annotations/captions_train2017.json")
    ap.add_argument("output", help="output JSONL path")
    ap.add_argument("--image-prefix", default="", help="prepended to file_name (e.g. coco/train2017)")
    ap.add_argument("--one-per-image", action="store_true", help="one sample per image (its first caption)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the prompt choice")
    args = ap.parse_args(argv)
    result = convert_coco(read_json(args.captions), args.image_prefix, args.one_per_image, args.seed,
                          source=args.captions)
    write_jsonl(args.output, result.samples)
    print(report(result, args.output))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
