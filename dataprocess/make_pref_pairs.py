"""Preference pairs from the shapes data (make_shapes.py) for the stage-dpo demo, in trl's layout.

    python -m qwenvl_lab.dataprocess.make_pref_pairs data/shapes/train.jsonl --out data/shapes/pref_train.jsonl

Each sample's first question becomes one pair: chosen = the right answer, rejected = another answer of the same
question type (a wrong colour for a colour question, a wrong count, ...), drawn from the type's answer
vocabulary (`meta.json` beside the input, written by make_shapes) or, without it, from the answers the file
gives that type. The draw is seeded per sample id (`random.Random(f"{seed}/{id}")`), so the same input gives
the same file. Follow-up turns are not used (a pair is one question and its two answers).

Output (one JSON object per line, trl's conversational layout, read unmodified by dataset/pref_formats.py):
    {"id", "type", "images": [...], "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text",
     "text": ...}]}], "chosen": [{"role": "assistant", "content": [{"type": "text", "text": right}]}],
     "rejected": [... wrong ...]}
Image paths stay as the input wrote them (relative to the shapes folder, the `image_folder` of a run).
`--types colour,count` keeps only those question types; a type with one answer only is skipped (counted).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from ..core.cli import run_cli
from ..core.errors import UserError
from ..dataset.formats import read_records
from ..dataset.sample import IMAGE_MARKER


def _blocks(content: str) -> list[dict]:
    """`<image>\\nWhat colour...?` -> trl content blocks: an image block per marker, the text in between."""
    out: list[dict] = []
    for i, text in enumerate(content.split(IMAGE_MARKER)):
        if i:
            out.append({"type": "image"})
        if text:
            out.append({"type": "text", "text": text})
    return out


def answer_vocabulary(records: list[dict], meta_path: Path) -> dict[str, list[str]]:
    """Each question type's possible answers: make_shapes' meta.json when present, else the file's answers."""
    if meta_path.is_file():
        return {t: list(a) for t, a in json.loads(meta_path.read_text(encoding="utf-8"))["answers"].items()}
    vocab: dict[str, set[str]] = {}
    for r in records:
        vocab.setdefault(r["type"], set()).add(r["messages"][1]["content"])
    return {t: sorted(a) for t, a in vocab.items()}


def make_pair(record: dict, vocab: dict[str, list[str]], seed: int) -> dict | None:
    """The trl record of a shapes sample's first question; None when its type has no other answer."""
    question, right = record["messages"][0]["content"], record["messages"][1]["content"]
    wrong = [a for a in vocab.get(record["type"], []) if a != right]
    if not wrong:
        return None
    rejected = random.Random(f"{seed}/{record['id']}").choice(wrong)
    n_images = question.count(IMAGE_MARKER)
    return {"id": record["id"], "type": record["type"], "images": list(record["images"][:n_images]),
            "prompt": [{"role": "user", "content": _blocks(question)}],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": right}]}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": rejected}]}]}


def _records(path: Path, types: set[str] | None) -> list[dict]:
    out = []
    for pos, r in read_records(str(path)):
        msgs = r.get("messages") if isinstance(r, dict) else None
        if not (isinstance(msgs, list) and len(msgs) >= 2 and "type" in r and "id" in r):
            raise UserError(f"{path}: record {pos} is not a make_shapes sample (needs id, type and a question with "
                            f"its answer in messages): convert the output of dataprocess/make_shapes.py")
        if types is None or r["type"] in types:
            out.append(r)
    return out


def make_pref_pairs(data: str | Path, out: str | Path, seed: int = 0, types: set[str] | None = None) -> dict:
    """Write the pairs of `data` to `out`; returns {"pairs": n, "skipped": n, "by_type": {type: n}}."""
    data, out = Path(data), Path(out)
    if not data.is_file():
        raise UserError(f"{data}: no such file; give a make_shapes JSONL such as data/shapes/train.jsonl")
    records = _records(data, types)
    vocab = answer_vocabulary(records, data.parent / "meta.json")
    pairs = [make_pair(r, vocab, seed) for r in records]
    kept = [p for p in pairs if p is not None]
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for p in kept:
            f.write(json.dumps(p) + "\n")
    by_type: dict[str, int] = {}
    for p in kept:
        by_type[p["type"]] = by_type.get(p["type"], 0) + 1
    return {"pairs": len(kept), "skipped": len(pairs) - len(kept), "by_type": by_type}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qwenvl_lab.dataprocess.make_pref_pairs", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", help="a make_shapes JSONL (train.jsonl / val.jsonl)")
    ap.add_argument("--out", required=True, help="the pairs' JSONL (trl's layout)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the rejected answers' draw")
    ap.add_argument("--types", default=None, help="comma-separated question types to keep (default: all)")
    args = ap.parse_args(argv)
    types = {t.strip() for t in args.types.split(",") if t.strip()} if args.types else None
    rep = make_pref_pairs(args.data, args.out, args.seed, types)
    print(f"wrote {rep['pairs']} pairs to {args.out} ({rep['skipped']} skipped: a type with one answer); "
          f"by type {rep['by_type']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
