"""The original repo's image_map + captions layout -> caption samples in our JSONL.

Two files, each either JSON or TSV (a file whose first non-blank character is `{` is read as JSON,
anything else as TSV; both UTF-8):

image_map — which image file belongs to an id:
    JSON: `{"<id>": "<file name or relative path>", ...}`
    TSV:  one `<id>\\t<file name>` per line.
captions — the caption(s) of an id:
    JSON: `{"<id>": "<caption>", ...}` or `{"<id>": ["<caption>", "<caption>", ...], ...}`
    TSV:  one `<id>\\t<caption>` per line; an id may appear on several lines (several captions).
In TSV files blank lines and lines starting with `#` are ignored; the line is split at its FIRST tab
(so captions may contain tabs); a line without a tab, an empty id, or an id repeated in the
image_map is an error naming the file and line. Ids are compared as strings.

Output: one sample per caption, id `<id>_<k>`, image `--image-prefix` + file name, user turn
`<image>\\n` + a brief-caption prompt (`--lang en|zh`, chosen by a hash of seed and sample id),
assistant turn the caption (whitespace collapsed). Caption ids with no image in the map, and empty
captions, are skipped and counted; images without captions are only counted.

    python -m qwenvl_lab.dataprocess.image_map image_map.tsv captions.json out.jsonl --image-prefix images --lang zh
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..core.cli import run_cli
from .common import (
    BRIEF_PROMPTS_EN,
    BRIEF_PROMPTS_ZH,
    Converted,
    SourceError,
    caption_sample,
    clean_spaces,
    join_path,
    pick,
    read_text,
    report,
    write_jsonl,
)

PROMPTS = {"en": BRIEF_PROMPTS_EN, "zh": BRIEF_PROMPTS_ZH}


def _parse(text: str, name: str) -> tuple[dict | None, list[tuple[str, str]]]:
    """(JSON dict, []) or (None, TSV pairs) from a file's text; `name` is used in errors."""
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SourceError(f"{name}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        if not isinstance(data, dict):
            raise SourceError(f"{name}: expected a JSON object mapping ids to values")
        return {str(k): v for k, v in data.items()}, []
    pairs = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        if "\t" not in line:
            raise SourceError(f"{name}: line {lineno} has no tab (expected '<id>\\t<value>')")
        key, value = line.split("\t", 1)
        if not key.strip():
            raise SourceError(f"{name}: line {lineno} has an empty id")
        pairs.append((key.strip(), value.strip()))
    return None, pairs


def parse_image_map(text: str, name: str = "image_map") -> dict[str, str]:
    """id -> image file name, from JSON or TSV text."""
    data, pairs = _parse(text, name)
    if data is not None:
        for k, v in data.items():
            if not isinstance(v, str) or not v:
                raise SourceError(f"{name}: id {k!r} maps to {v!r}, expected a file name")
        return data
    out: dict[str, str] = {}
    for key, value in pairs:
        if key in out:
            raise SourceError(f"{name}: id {key!r} appears twice")
        if not value:
            raise SourceError(f"{name}: id {key!r} has an empty file name")
        out[key] = value
    return out


def parse_captions(text: str, name: str = "captions") -> dict[str, list[str]]:
    """id -> list of captions (file order), from JSON or TSV text."""
    data, pairs = _parse(text, name)
    out: dict[str, list[str]] = {}
    if data is not None:
        for k, v in data.items():
            caps = [v] if isinstance(v, str) else v
            if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
                raise SourceError(f"{name}: id {k!r} must map to a caption string or a list of strings")
            out[k] = list(caps)
        return out
    for key, value in pairs:
        out.setdefault(key, []).append(value)
    return out


def convert_image_map(image_map: dict[str, str], captions: dict[str, list[str]], image_prefix: str = "",
                      lang: str = "en", seed: int = 0) -> tuple[Converted, int]:
    """(samples + skips, number of mapped images that have no caption)."""
    if lang not in PROMPTS:
        raise ValueError(f"unknown --lang {lang!r}; choose from {sorted(PROMPTS)}")  # a bug: argparse has choices
    out = Converted()
    for key, caps in captions.items():
        for k, cap in enumerate(caps):
            sample_id = f"{key}_{k}"
            if key not in image_map:
                out.skip(sample_id, f"no image: id {key!r} is not in the image_map")
                continue
            text = clean_spaces(cap)
            if not text:
                out.skip(sample_id, "empty caption")
                continue
            prompt = pick(PROMPTS[lang], seed, sample_id)
            out.samples.append(caption_sample(sample_id, prompt, text, join_path(image_prefix, image_map[key])))
    n_uncaptioned = sum(1 for key in image_map if key not in captions)
    return out, n_uncaptioned


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qwenvl_lab.dataprocess.image_map", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("image_map", help="image_map file (JSON dict or TSV id<TAB>file)")
    ap.add_argument("captions", help="captions file (JSON dict or TSV id<TAB>caption)")
    ap.add_argument("output", help="output JSONL path")
    ap.add_argument("--image-prefix", default="", help="prepended to every image file name")
    ap.add_argument("--lang", default="en", choices=sorted(PROMPTS), help="language of the prompts")
    ap.add_argument("--seed", type=int, default=0, help="seed of the prompt choice")
    args = ap.parse_args(argv)
    image_map = parse_image_map(read_text(args.image_map), str(Path(args.image_map)))
    captions = parse_captions(read_text(args.captions), str(Path(args.captions)))
    result, n_uncaptioned = convert_image_map(image_map, captions, args.image_prefix, args.lang, args.seed)
    write_jsonl(args.output, result.samples)
    print(report(result, args.output))
    if n_uncaptioned:
        print(f"{n_uncaptioned} images in the image_map have no caption")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
