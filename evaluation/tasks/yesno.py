"""Yes/no benchmarks: POPE and MME.

- `pope`: the released question files `coco_pope_{random,popular,adversarial}.json` (JSON lines
  `{"question_id", "image", "text", "label"}`), `--data` one of them or their folder; images by name in
  `--images` (COCO val2014). Accuracy, precision, recall, F1 and yes-ratio per split (the file's last
  name part) and pooled; answers read with LLaVA's rule (`metrics.pope_yes_no`).
- `mme`: the released `MME_Benchmark_release_version` folder: one folder per category holding either
  `images/` + `questions_answers_YN/` or the images and `.txt` files side by side; each `.txt` (named as
  its image) has two lines `question<TAB>Yes|No`. Per category: acc (questions), acc+ (images whose two
  questions are both right), score = 100 x (acc + acc+); totals: perception (10 categories, max 2000)
  and cognition (4 categories, max 800). Answers read with MME's rule (`metrics.mme_yes_no`).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from ..items import BenchmarkFormatError, EvalItem, image_path, need, read_jsonl
from ..metrics import mme_yes_no, pope
from .common import SHORT_ANSWER, Task

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg", ".JPG", ".PNG")


# ----- POPE -----------------------------------------------------------------------------------------
def load_pope(data: str, images: str | None, options: dict) -> list[EvalItem]:
    p = Path(data)
    files = sorted(p.glob("*pope*.json*")) if p.is_dir() else [p]
    if not files:
        raise BenchmarkFormatError(f"{p}: no POPE question files (coco_pope_*.json) in this folder")
    folder = Path(images) if images else (p if p.is_dir() else p.parent)
    items = []
    for f in files:
        split = f.name.split(".")[0].split("_")[-1]  # coco_pope_random.json -> random
        for i, r in enumerate(read_jsonl(f)):
            need(r, ("question_id", "image", "text"), f"{f} line {i + 1}")
            items.append(EvalItem(f"{split}/{r['question_id']}", r["text"], [image_path(folder, r["image"])],
                                  r.get("label"), {"split": split}))
    return items


def score_pope(items: list[EvalItem], answers: dict[str, str]) -> dict:
    scored = [it for it in items if it.id in answers and it.target is not None]
    if not scored:
        return {"metrics": {}, "categories": {}, "n_scored": 0}
    by_split: dict[str, list[EvalItem]] = defaultdict(list)
    for it in scored:
        by_split[it.category["split"]].append(it)
    cats = {s: {"n": len(its), **pope([answers[i.id] for i in its], [i.target for i in its])}
            for s, its in sorted(by_split.items())}
    overall = pope([answers[i.id] for i in scored], [i.target for i in scored])
    return {"metrics": overall, "categories": {"split": cats}, "n_scored": len(scored)}


# ----- MME ------------------------------------------------------------------------------------------
def _mme_pairs(cat_dir: Path) -> list[tuple[Path, Path]]:
    """(question file, image folder) pairs of one category folder, in name order."""
    qa = cat_dir / "questions_answers_YN"
    if qa.is_dir():
        return [(t, cat_dir / "images") for t in sorted(qa.glob("*.txt"))]
    return [(t, cat_dir) for t in sorted(cat_dir.glob("*.txt"))]


def load_mme(data: str, images: str | None, options: dict) -> list[EvalItem]:
    root = Path(data)
    if not root.is_dir():
        raise BenchmarkFormatError(f"{root}: MME is read from its release folder (one folder per category)")
    items = []
    for cat_dir in sorted(d for d in root.iterdir() if d.is_dir()):
        for txt, img_dir in _mme_pairs(cat_dir):
            stem = txt.stem
            img = image_path(img_dir, stem + ".jpg", tuple(stem + s for s in IMAGE_SUFFIXES[1:]))
            lines = [ln for ln in txt.read_text(encoding="utf-8").splitlines() if ln.strip()]
            for k, line in enumerate(lines):
                if "\t" not in line:
                    raise BenchmarkFormatError(f"{txt}: line {k + 1} is not 'question<TAB>answer'")
                question, answer = line.rsplit("\t", 1)
                items.append(EvalItem(f"{cat_dir.name}/{stem}/{k}", question.strip(), [img],
                                      answer.strip().lower(), {"category": cat_dir.name},
                                      group=f"{cat_dir.name}/{stem}"))
    if not items:
        raise BenchmarkFormatError(f"{root}: no MME question files (*.txt) found in its category folders")
    return items


def score_mme(items: list[EvalItem], answers: dict[str, str]) -> dict:
    scored = [it for it in items if it.id in answers and it.target is not None]
    by_cat: dict[str, list[EvalItem]] = defaultdict(list)
    for it in scored:
        by_cat[it.category["category"]].append(it)
    cats = {}
    for cat, its in sorted(by_cat.items()):
        right = {it.id: mme_yes_no(answers[it.id]) == it.target for it in its}
        images: dict[str, list[bool]] = defaultdict(list)
        for it in its:
            images[it.group].append(right[it.id])
        acc = sum(right.values()) / len(its)
        acc_plus = sum(all(v) for v in images.values()) / len(images)
        cats[cat] = {"n": len(its), "acc": acc, "acc_plus": acc_plus, "score": 100.0 * (acc + acc_plus)}
    metrics = {
        "perception": sum(c["score"] for k, c in cats.items() if k in MME_PERCEPTION),
        "cognition": sum(c["score"] for k, c in cats.items() if k in MME_COGNITION),
        "accuracy": sum(c["acc"] * c["n"] for c in cats.values()) / max(len(scored), 1),
    }
    if not scored:
        metrics = {}
    return {"metrics": metrics, "categories": {"category": cats} if cats else {}, "n_scored": len(scored)}


TASKS = {
    "pope": Task("pope", load_pope, score_pope, SHORT_ANSWER, main_metric="f1", about="POPE (per split)"),
    "mme": Task("mme", load_mme, score_mme, SHORT_ANSWER, main_metric="perception",
                about="MME (acc / acc+ per category, perception and cognition totals)"),
}
