"""Synthetic shapes dataset for the offline demo and tests: coloured shapes, one-word answers.

Writes under `out/`:
    train.jsonl, val.jsonl          our JSONL plus a `"type"` field (the question type)
    images/{split}/{index:06d}.png  (multi-image samples: {index:06d}_0.png and _1.png)
    meta.json                       seed, size, types, followups, distractor, each type's answer vocabulary
Image paths in the JSONL are relative to `out/`.

Question types (sample i of a split gets type `types[i % len(types)]`, so counts are balanced):
    colour    one large shape            "What colour is the shape?"            red|green|blue|yellow
    shape     one large shape            "What shape is this?"                  circle|square|triangle|cross
    count     1-4 shapes, one per quadrant "How many shapes are there?"         1|2|3|4
    position  the target in one half (+ with probability `--distractor P`, default 0.5, a distractor of
              another colour and shape in the other half)
              "Is the red circle on the left or the right?"                   left|right
    multi     two images, one shape each; exactly one is the target
              "Which image has the red circle? Answer first or second."        first|second
Wide and tall pictures (`--canvas K`, default 1): colour and shape pictures become (K*size) x size or
size x (K*size) (orientation drawn per sample), the shape still 40-60% of the SHORT side, anywhere on the
canvas: small in a picture that a fixed-square model squashes K times along one axis (the dynamic-resolution
demo, docs/benchmarks.md). Other types stay square.
Single-shape questions use a shape spanning 40-60% of the image side (>= 1/3 as required for a tiny
CNN to learn it fast); 4 colours x 4 shapes keep chance at <= 25% for colour and shape.

Follow-ups (`--followups P`: a sample gets them with probability P, default 0): 1-2 more questions about
the same image(s) in the same conversation, each answered from the image and/or an earlier turn:
    colour    "What shape is it?" (the shape just named by colour), then "Is it <colour>?"  yes|no
    shape     "What colour is it?", then "Is it a <shape>?"                                  yes|no
    count     "Is there a <colour> one?" yes|no, then "And how many with one more?"          2-5
    position  "And the <colour> <shape>?" (the distractor's side), or "Is there another shape?" yes|no
              then "What colour is it?" / "What shape is it?" (the other shape)
    multi     "What colour is the shape in the other image?", then "And what shape is it?"
The sample's `"type"` stays its first question's type; every later assistant turn is a follow-up.
`--followup-set recall` (the demo's) asks none that compares a named colour or shape with the picture
(the tiny demo model answers those at chance: docs/benchmarks.md); each refers back to the scene or an answer:
    colour    "What shape is it?", then "What colour was it again?"
    shape     "What colour is it?", then "What shape was it again?"
    count     "And how many would there be with one more?" 2-5, then "How many were there again?"
    position  "What colour is it?", then "What shape is it?" (the named shape); with a distractor only
              "And the <colour> <shape>?" (the distractor's side)
    multi     as above

Deterministic: sample i of split s is drawn from `random.Random(f"{seed}/{s}/{i}")` (string seeds are
hashed with SHA-512 by Python, independent of PYTHONHASHSEED) and PNG encoding has no timestamps, so
the same arguments give byte-identical files.

    python -m qwenvl_lab.dataprocess.make_shapes runs/shapes --n-train 2000 --n-val 200 --seed 0 --size 64
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from PIL import Image

from ..core.cli import run_cli, writable_dir
from .common import SourceError, make_sample, write_jsonl
from .shapes_draw import COLOURS, SHAPES, render

TYPES = ("colour", "shape", "count", "position", "multi")
ANSWERS: dict[str, list[str]] = {
    "colour": list(COLOURS),
    "shape": list(SHAPES),
    "count": ["1", "2", "3", "4"],
    "position": ["left", "right"],
    "multi": ["first", "second"],
}
Item = tuple[str, str, int, int, int]  # (shape, colour, cx, cy, r)


def _one_large(rng: random.Random, size: int, shape: str, colour: str) -> Item:
    r = round(size * rng.uniform(0.20, 0.30))  # diameter 40-60% of the side
    cx, cy = rng.randint(r, size - 1 - r), rng.randint(r, size - 1 - r)
    return shape, colour, cx, cy, r


def _random_kind(rng: random.Random) -> tuple[str, str]:
    return rng.choice(SHAPES), rng.choice(list(COLOURS))


def scene_colour(rng: random.Random, size: int) -> tuple[list[list[Item]], str, str]:
    shape, colour = _random_kind(rng)
    return [[_one_large(rng, size, shape, colour)]], "What colour is the shape?", colour


def scene_shape(rng: random.Random, size: int) -> tuple[list[list[Item]], str, str]:
    shape, colour = _random_kind(rng)
    return [[_one_large(rng, size, shape, colour)]], "What shape is this?", shape


def scene_count(rng: random.Random, size: int) -> tuple[list[list[Item]], str, str]:
    n = rng.randint(1, 4)
    half = size // 2
    items = []
    # one shape per chosen quadrant with a 1-pixel margin, so shapes never touch and each stays countable
    for cell in rng.sample(range(4), n):
        x0, y0 = (cell % 2) * half, (cell // 2) * half
        r = round(half * rng.uniform(0.28, 0.40))
        cx, cy = rng.randint(x0 + r + 1, x0 + half - 2 - r), rng.randint(y0 + r + 1, y0 + half - 2 - r)
        items.append((*_random_kind(rng), cx, cy, r))
    return [items], "How many shapes are there?", str(n)


def scene_position(rng: random.Random, size: int, distractor: float = 0.5) -> tuple[list[list[Item]], str, str]:
    shape, colour = _random_kind(rng)
    side = rng.choice(["left", "right"])
    half = size // 2

    def place(s: str) -> tuple[int, int, int]:
        r = round(size * rng.uniform(0.17, 0.23))
        x0 = 0 if s == "left" else size - half
        return rng.randint(x0 + r, x0 + half - 1 - r), rng.randint(r, size - 1 - r), r

    items = [(shape, colour, *place(side))]
    if rng.random() < distractor:
        # the distractor differs in both colour and shape so "the red circle" names one object
        d_shape = rng.choice([s for s in SHAPES if s != shape])
        d_colour = rng.choice([c for c in COLOURS if c != colour])
        items.append((d_shape, d_colour, *place("right" if side == "left" else "left")))
    return [items], f"Is the {colour} {shape} on the left or the right?", side


def scene_multi(rng: random.Random, size: int) -> tuple[list[list[Item]], str, str]:
    shape, colour = _random_kind(rng)
    other = (shape, colour)
    while other == (shape, colour):  # the other image must not also show the target
        other = _random_kind(rng)
    first = rng.random() < 0.5
    target = [_one_large(rng, size, shape, colour)]
    decoy = [_one_large(rng, size, *other)]
    images = [target, decoy] if first else [decoy, target]
    question = f"Which image has the {colour} {shape}? Answer first or second."
    return images, question, "first" if first else "second"


SCENES = {"colour": scene_colour, "shape": scene_shape, "count": scene_count,
          "position": scene_position, "multi": scene_multi}

# ------------------------------------------------------------------------------------------- follow-ups
Turn = tuple[str, str]  # (question, answer)


def _yes_no(rng: random.Random, truth: str, options: list[str]) -> tuple[str, str]:
    """(asked value, "yes"|"no"): the truth half of the time, else another option."""
    if rng.random() < 0.5:
        return truth, "yes"
    return rng.choice([o for o in options if o != truth]), "no"


def follow_colour(rng: random.Random, scenes: list[list[Item]], answer: str) -> list[Turn]:
    shape, colour = scenes[0][0][:2]
    asked, yn = _yes_no(rng, colour, list(COLOURS))
    return [("What shape is it?", shape), (f"Is it {asked}?", yn)]


def follow_shape(rng: random.Random, scenes: list[list[Item]], answer: str) -> list[Turn]:
    shape, colour = scenes[0][0][:2]
    asked, yn = _yes_no(rng, shape, list(SHAPES))
    return [("What colour is it?", colour), (f"Is it a {asked}?", yn)]


def follow_count(rng: random.Random, scenes: list[list[Item]], answer: str) -> list[Turn]:
    present = sorted({item[1] for item in scenes[0]})
    absent = [c for c in COLOURS if c not in present]
    yes = not absent or rng.random() < 0.5
    asked = rng.choice(present if yes else absent)
    return [(f"Is there a {asked} one?", "yes" if yes else "no"),
            ("And how many would there be with one more?", str(int(answer) + 1))]


def follow_position(rng: random.Random, scenes: list[list[Item]], answer: str) -> list[Turn]:
    items = scenes[0]
    if len(items) == 1:
        return [("Is there another shape?", "no")]
    other_shape, other_colour = items[1][:2]
    other_side = "right" if answer == "left" else "left"
    if rng.random() < 0.5:  # an elliptical question: the earlier one's form, about the other shape
        return [(f"And the {other_colour} {other_shape}?", other_side)]
    last = ("What colour is it?", other_colour) if rng.random() < 0.5 else ("What shape is it?", other_shape)
    return [("Is there another shape?", "yes"), last]


def follow_multi(rng: random.Random, scenes: list[list[Item]], answer: str) -> list[Turn]:
    shape, colour = scenes[1 if answer == "first" else 0][0][:2]  # the image without the target
    return [("What colour is the shape in the other image?", colour), ("And what shape is it?", shape)]


FOLLOWUPS = {"colour": follow_colour, "shape": follow_shape, "count": follow_count,
             "position": follow_position, "multi": follow_multi}


# `--followup-set recall`: no question that compares a named colour or shape with the picture (the yes/no
# ones, "the other shape's colour"); each later turn asks for another attribute or refers back to an answer.
def recall_colour(rng: random.Random, scenes: list[list[Item]], answer: str) -> list[Turn]:
    return [("What shape is it?", scenes[0][0][0]), ("What colour was it again?", answer)]


def recall_shape(rng: random.Random, scenes: list[list[Item]], answer: str) -> list[Turn]:
    return [("What colour is it?", scenes[0][0][1]), ("What shape was it again?", answer)]


def recall_count(rng: random.Random, scenes: list[list[Item]], answer: str) -> list[Turn]:
    return [("And how many would there be with one more?", str(int(answer) + 1)),
            ("How many were there again?", answer)]


def recall_position(rng: random.Random, scenes: list[list[Item]], answer: str) -> list[Turn]:
    items = scenes[0]
    if len(items) == 1:
        return [("What colour is it?", items[0][1]), ("What shape is it?", items[0][0])]
    other_shape, other_colour = items[1][:2]
    return [(f"And the {other_colour} {other_shape}?", "right" if answer == "left" else "left")]


RECALL_FOLLOWUPS = {"colour": recall_colour, "shape": recall_shape, "count": recall_count,
                    "position": recall_position, "multi": follow_multi}
FOLLOWUP_SETS = {"all": FOLLOWUPS, "recall": RECALL_FOLLOWUPS}


def followups(rng: random.Random, qtype: str, scenes: list[list[Item]], answer: str,
              followup_set: str = "all") -> list[Turn]:
    """1-2 follow-up turns about the scene of a `qtype` question whose answer was `answer`."""
    turns = FOLLOWUP_SETS[followup_set][qtype](rng, scenes, answer)
    return turns[:rng.randint(1, len(turns))]


def _canvas(rng: random.Random, size: int, canvas: int) -> tuple[int, int]:
    """(width, height) of a colour / shape picture: square, or K times wider or taller (drawn here)."""
    if canvas == 1:
        return size, size  # no draw from rng: square data stays byte-identical to earlier versions
    return (canvas * size, size) if rng.random() < 0.5 else (size, canvas * size)


def scene_on_canvas(rng: random.Random, w: int, h: int, qtype: str) -> tuple[list[list[Item]], str, str]:
    """A colour or shape scene on a w x h canvas: one shape, 40-60% of the short side, anywhere."""
    shape, colour = _random_kind(rng)
    r = round(min(w, h) * rng.uniform(0.20, 0.30))
    item = (shape, colour, rng.randint(r, w - 1 - r), rng.randint(r, h - 1 - r), r)
    if qtype == "colour":
        return [[item]], "What colour is the shape?", colour
    return [[item]], "What shape is this?", shape


def make_one(seed: int, split: str, index: int, qtype: str, size: int, followup_p: float = 0.0,
             distractor: float = 0.5, followup_set: str = "all", canvas: int = 1) -> tuple[dict, list[Image.Image]]:
    """Sample `index` of `split`: (JSONL dict with relative image paths, its images in order)."""
    rng = random.Random(f"{seed}/{split}/{index}")
    dims = (size, size)
    if canvas > 1 and qtype in ("colour", "shape"):
        dims = _canvas(rng, size, canvas)
        scenes, question, answer = scene_on_canvas(rng, *dims, qtype)
    elif qtype == "position":
        scenes, question, answer = scene_position(rng, size, distractor)
    else:
        scenes, question, answer = SCENES[qtype](rng, size)
    turns: list[Turn] = []
    if followup_p > 0:
        # a stream of its own: the scene (and every sample without follow-ups) is the same for any P
        frng = random.Random(f"{seed}/{split}/{index}/followup")
        if frng.random() < followup_p:
            turns = followups(frng, qtype, scenes, answer, followup_set)
    images = [render(dims, items) for items in scenes]
    if len(images) == 1:
        paths = [f"images/{split}/{index:06d}.png"]
    else:
        paths = [f"images/{split}/{index:06d}_{k}.png" for k in range(len(images))]
    markers = "".join("<image>\n" for _ in images)
    messages = [{"role": "user", "content": markers + question}, {"role": "assistant", "content": answer}]
    for q, a in turns:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    sample = make_sample(f"shapes_{split}_{index:06d}", messages, paths, type=qtype)
    return sample, images


def make_split(out: Path, split: str, n: int, seed: int, size: int, types: list[str],
               followup_p: float = 0.0, distractor: float = 0.5, followup_set: str = "all",
               canvas: int = 1) -> list[dict]:
    """Write `n` samples of `split` (images + `{split}.jsonl`) under `out`; returns the samples."""
    (out / "images" / split).mkdir(parents=True, exist_ok=True)
    samples = []
    for i in range(n):
        sample, images = make_one(seed, split, i, types[i % len(types)], size, followup_p, distractor, followup_set,
                                  canvas)
        for rel, img in zip(sample["images"], images):
            img.save(out / rel, format="PNG")
        samples.append(sample)
    write_jsonl(out / f"{split}.jsonl", samples)
    return samples


def parse_types(text: str) -> list[str]:
    types = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in types if t not in SCENES]
    if not types or bad:
        raise SourceError(f"--types {text!r}: unknown {bad}; choose from {','.join(TYPES)}")
    return types


def make_shapes(out: str | Path, n_train: int = 2000, n_val: int = 200, seed: int = 0, size: int = 64,
                types: list[str] | None = None, followups: float = 0.0,
                distractor: float = 0.5, followup_set: str = "all", canvas: int = 1) -> dict[str, list[dict]]:
    """Generate both splits and meta.json under `out`; returns {"train": samples, "val": samples}.
    `followups`: the probability that a sample gets 1-2 follow-up turns (see the module docstring);
    `distractor`: the probability that a position scene has a second shape; `followup_set`: "all" or
    "recall" (see the module docstring)."""
    types = list(types or TYPES)
    assert size >= 32, f"--size {size}: at least 32 pixels are needed to draw 4 distinguishable shapes"
    assert n_train >= 0 and n_val >= 0, "sample counts must be >= 0"
    for name, value in (("--followups", followups), ("--distractor", distractor)):
        if not 0.0 <= value <= 1.0:
            raise SourceError(f"{name} {value}: give a probability between 0 and 1")
    if canvas < 1:
        raise SourceError(f"--canvas {canvas}: give a whole number >= 1 (1 = square pictures)")
    if followup_set not in FOLLOWUP_SETS:
        raise SourceError(f"--followup-set {followup_set!r}: choose from {', '.join(FOLLOWUP_SETS)}")
    out = writable_dir(out, "output folder")
    result = {split: make_split(out, split, n, seed, size, types, followups, distractor, followup_set, canvas)
              for split, n in (("train", n_train), ("val", n_val))}
    meta = {"seed": seed, "size": size, "types": types, "n_train": n_train, "n_val": n_val,
            "followups": followups, "followup_set": followup_set, "distractor": distractor, "canvas": canvas, "answers": {t: ANSWERS[t] for t in types}}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qwenvl_lab.dataprocess.make_shapes", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="output folder")
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-val", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--types", default=",".join(TYPES), help="comma-separated question types")
    ap.add_argument("--followups", type=float, default=0.0,
                    help="probability that a sample gets 1-2 follow-up questions about the same image(s)")
    ap.add_argument("--distractor", type=float, default=0.5,
                    help="probability that a position question's picture has a second shape")
    ap.add_argument("--followup-set", choices=sorted(FOLLOWUP_SETS), default="all",
                    help="all: the follow-ups above; recall: none that compares a named colour or shape with "
                         "the picture (see the docstring)")
    ap.add_argument("--canvas", type=int, default=1,
                    help="colour and shape pictures K times wider or taller than --size, shapes as small as "
                         "on a square one (1 = square)")
    args = ap.parse_args(argv)
    result = make_shapes(args.out, args.n_train, args.n_val, args.seed, args.size, parse_types(args.types),
                         args.followups, args.distractor, args.followup_set, args.canvas)
    print(f"wrote {len(result['train'])} train and {len(result['val'])} val samples to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
