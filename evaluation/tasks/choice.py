"""Multiple-choice benchmarks: MMBench and ScienceQA-IMG.

- `mmbench`: the released TSV (columns `index, question, hint, A, B, C, D[, E, F], answer, category,
  l2-category, image` with the image base64-encoded; a row whose image is a short number reuses that
  row's image). Circular evaluation (default; `circular=False` for one round): a question with k options
  is asked k times with the options rotated, and counts as right only when every round is right
  (`circular_accuracy`); `accuracy` is the first round alone. Prompt as LLaVA-1.5: hint, question, one
  "A. option" line per option, "Answer with the option's letter from the given choices directly."
- `scienceqa`: `problems.json` (`{pid: {"question", "choices", "answer": index, "hint", "image", "split",
  "subject", "grade"}}`) with `pid_splits.json` beside it (`--data` the JSON or their folder); the
  questions with an image in `split` (default test), images `--images/{split}/{pid}/{image}` (default
  `images/` beside the JSON). Accuracy per subject and grade band (G1-6, G7-12).

Answers are read with `metrics.extract_choice` (letter, "answer is X", or the option's text); with the
likelihood mode the answer is the letter of the option whose text is most likely.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from ..items import BenchmarkFormatError, EvalItem, find_one, image_path, read_json
from ..metrics import LETTERS, extract_choice
from .common import OPTION_LETTER, Task, mean_by_category, options_block


def _missing(value) -> bool:
    return value is None or str(value).strip().lower() in ("", "nan", "none")


# ----- MMBench --------------------------------------------------------------------------------------
def read_tsv(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise BenchmarkFormatError(f"{path}: file not found")
    csv.field_size_limit(sys.maxsize)  # base64 images are long fields
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    for col in ("index", "question", "A", "B", "image"):
        if rows and col not in rows[0]:
            raise BenchmarkFormatError(f"{path}: no {col!r} column (has {list(rows[0])[:14]}); is this an MMBench TSV?")
    return rows


def load_mmbench(data: str, images: str | None, options: dict) -> list[EvalItem]:
    rows = read_tsv(data)
    by_index = {str(r["index"]): r for r in rows}
    circular = options.get("circular", True)
    items = []
    for r in rows:
        idx = str(r["index"])
        image = r["image"]
        if len(image) < 16 and image.strip().isdigit():  # a reference to another row's image
            if image.strip() not in by_index:
                raise BenchmarkFormatError(f"{data}: row {idx} refers to the image of row {image}, which is absent")
            image = by_index[image.strip()]["image"]
        opts = [r[c] for c in LETTERS[:6] if c in r and not _missing(r[c])]
        answer = r.get("answer")
        gt = LETTERS.index(answer.strip()) if not _missing(answer) else None
        if gt is not None and gt >= len(opts):
            raise BenchmarkFormatError(f"{data}: row {idx}: answer {answer} but only {len(opts)} options")
        hint = r.get("hint")
        question = r["question"] if _missing(hint) else f"{hint}\n{r['question']}"
        category = {k: r[k] for k in ("category", "l2-category") if not _missing(r.get(k))}
        for j in range(len(opts) if circular else 1):
            shown = opts[j:] + opts[:j]  # round j: option j is shown first
            target = None if gt is None else (gt - j) % len(opts)
            items.append(EvalItem(f"{idx}/r{j}", f"{question}\n{options_block(shown)}", [f"base64:{image}"], target,
                                  category, options=shown, group=idx))
    return items


def _choice_correct(items: list[EvalItem], answers: dict[str, str]) -> dict[str, bool]:
    return {it.id: extract_choice(answers[it.id], len(it.options), it.options) == it.target
            for it in items if it.id in answers and it.target is not None}


def score_mmbench(items: list[EvalItem], answers: dict[str, str]) -> dict:
    right = _choice_correct(items, answers)
    rounds: dict[str, list[EvalItem]] = {}
    for it in items:
        rounds.setdefault(it.group, []).append(it)
    per_question = {}
    for its in rounds.values():
        if all(it.id in right for it in its):  # a question scores once all its rounds are answered
            per_question[its[0].id] = {"circular_accuracy": float(all(right[it.id] for it in its)),
                                       "accuracy": float(right[its[0].id])}
    out = mean_by_category([its[0] for its in rounds.values()], per_question)
    out["n_questions"] = len(per_question)
    return out


# ----- ScienceQA-IMG --------------------------------------------------------------------------------
def _grade_band(grade: str) -> str:
    digits = "".join(ch for ch in str(grade) if ch.isdigit())
    if not digits:
        return "unknown"
    return "G1-6" if int(digits) <= 6 else "G7-12"


def load_scienceqa(data: str, images: str | None, options: dict) -> list[EvalItem]:
    p = Path(data)
    problems_file = p / "problems.json" if p.is_dir() else p
    folder = problems_file.parent
    split = options.get("split") or "test"
    problems = read_json(problems_file)
    splits_file = find_one(folder, "pid_splits.json", "ScienceQA pid_splits")
    splits = read_json(splits_file)
    if split not in splits:
        raise BenchmarkFormatError(f"{splits_file}: no split {split!r} (has {sorted(splits)})")
    image_root = Path(images) if images else folder / "images"
    items = []
    for pid in splits[split]:
        if pid not in problems:
            raise BenchmarkFormatError(f"{splits_file}: pid {pid} of split {split} is not in {problems_file}")
        q = problems[pid]
        if not q.get("image"):
            continue  # -IMG: the questions with an image
        for key in ("question", "choices", "answer"):
            if key not in q:
                raise BenchmarkFormatError(f"{problems_file}: problem {pid} has no {key!r}")
        context = (q.get("hint") or "").strip()
        question = (f"Context: {context}\n" if context else "") + q["question"]
        opts = list(q["choices"])
        img = image_path(image_root, f"{split}/{pid}/{q['image']}")
        items.append(EvalItem(str(pid), f"{question}\n{options_block(opts)}", [img], int(q["answer"]),
                              {"subject": q.get("subject", "unknown"), "grade": _grade_band(q.get("grade", ""))},
                              options=opts))
    return items


def score_scienceqa(items: list[EvalItem], answers: dict[str, str]) -> dict:
    right = _choice_correct(items, answers)
    return mean_by_category(items, {k: {"accuracy": float(v)} for k, v in right.items()})


TASKS = {
    "mmbench": Task("mmbench", load_mmbench, score_mmbench, OPTION_LETTER, kind="choice",
                    main_metric="circular_accuracy", about="MMBench TSV (circular evaluation)"),
    "scienceqa": Task("scienceqa", load_scienceqa, score_scienceqa, OPTION_LETTER, kind="choice",
                      about="ScienceQA-IMG (problems.json + pid_splits.json)"),
}
