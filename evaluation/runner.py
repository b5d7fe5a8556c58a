"""Answer a benchmark with a VLM, resumably, and score it.

`run_task(vlm, task, data, images=None, output=None, limit=None, batch_size=8, prompt=None,
mc_mode="generate", max_new_tokens=None, options=None, progress=True) -> results dict`

1. The task's loader reads the released files into `EvalItem`s; `limit` keeps the first N groups (a
   question with its circular rounds, an image with its question pair).
2. Each item's prompt is `prompt` (default: the task's LLaVA-1.5 wording) with `{question}` filled in,
   after one `<image>` marker per image. Items are answered in batches with `vlm.chat_batch` (greedy,
   left-padded), or, for multiple choice with `mc_mode="likelihood"`, by the most likely option text
   (`likelihood.rank_options`; the answer is recorded as its letter). A batch that fails is retried item by
   item; an item whose image cannot be read, or that the model's resolution rule refuses
   (`vlm.image_tokens`: e.g. an aspect ratio over 200 in native mode; counted as "bad_image"), or whose
   prompt is too long is skipped and counted, never fatal.
3. With `output`, every answer is appended to `output/answers.jsonl` as soon as its batch is done
   (`{"id", "answer", "prompt"}`); a rerun into the same folder skips the ids already there, and refuses a
   folder written for another task, prompt, mode or `model_id` (`run.json`; the command line passes the
   model directory and its weights' modification time). Then `results.json` and `results.png`
   (a bar chart per category group) are written.
The results dict: `task`, `main_metric`, `metrics`, `categories`, `n_items`, `n_answered`, `n_scored`,
`skipped` ({reason kind: count}), `skipped_examples`, `missing_images` ({folder: number of distinct image
files not found there}), `prompt`, `mc_mode`. `check_answered(results)` raises the UserError the command
line reports when nothing could be answered (no questions, or every item skipped: every image missing, ...).
Everything is deterministic: items keep the files' order, generation is greedy.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm

from ..core.errors import UserError
from ..dataset.sample import BadSampleError
from .items import EvalItem, load_images
from .likelihood import rank_options
from .metrics import LETTERS
from .report import write_chart
from .tasks import TASKS

ANSWERS_FILE = "answers.jsonl"
RESULTS_FILE = "results.json"
CHART_FILE = "results.png"
RUN_FILE = "run.json"
MC_MODES = ("generate", "likelihood")


class EvaluationSetupError(UserError, ValueError):
    """A user mistake in what to evaluate (unknown task, a folder written by another run, ...)."""


def get_task(name: str):
    if name not in TASKS:
        raise EvaluationSetupError(f"unknown task {name!r}; choose one of {', '.join(sorted(TASKS))}")
    return TASKS[name]


def limit_items(items: list[EvalItem], limit: int | None) -> list[EvalItem]:
    """The items of the first `limit` groups, in order."""
    if limit is None:
        return items
    chosen: set[str] = set()
    for it in items:
        if it.group not in chosen:
            if len(chosen) == limit:
                break
            chosen.add(it.group)
    return [it for it in items if it.group in chosen]


def render_prompt(template: str, item: EvalItem) -> str:
    return template.replace("{question}", item.question)


def user_messages(item: EvalItem, text: str) -> list[dict]:
    return [{"role": "user", "content": "<image>\n" * len(item.images) + text}]


def read_answers(path: Path) -> dict[str, str]:
    """{id: answer} of an answers file; an unreadable line (a run killed mid-write) is ignored."""
    out: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                out[str(row["id"])] = row["answer"]
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return out


def usable_images(vlm, item: EvalItem) -> list:
    """The item's images, loaded and checked against the model's resolution rule (each image's token count,
    the one the prompt will get); a refusal is the item's BadSampleError ("bad_image"), skipped and counted."""
    images = load_images(item)
    rule = getattr(vlm, "image_tokens", None)  # a model without a resolution rule (a scripted stand-in): none
    try:
        if rule is not None and images:
            rule(images)  # None in fixed mode; raises for a size the rule cannot take
    except ValueError as e:
        raise BadSampleError(f"item {item.id}: {e}", "bad_image") from None
    return images


def _check_run_file(output: Path, identity: dict) -> None:
    path = output / RUN_FILE
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        differs = {k: (old.get(k), v) for k, v in identity.items() if old.get(k) != v}
        if differs:
            raise EvaluationSetupError(
                f"{output}: its {ANSWERS_FILE} was written with other settings {differs} (old, new); use another "
                f"--output folder or delete it")
    else:
        path.write_text(json.dumps(identity, indent=2) + "\n", encoding="utf-8")


class _Answerer:
    """Answers items with one model; records skips."""

    def __init__(self, vlm, task, template: str, mc_mode: str, gen_kw: dict):
        self.vlm, self.task, self.template, self.mc_mode, self.gen_kw = vlm, task, template, mc_mode, gen_kw
        self.skipped: Counter = Counter()
        self.examples: list[str] = []
        self.missing: set[str] = set()  # image files not found

    def _skip(self, item: EvalItem, err: Exception) -> None:
        kind = getattr(err, "kind", type(err).__name__)
        self.skipped[kind] += 1
        if kind == "missing_file":
            self.missing.update(r for r in item.images if not r.startswith("base64:") and not os.path.isfile(r))
        if len(self.examples) < 5:
            self.examples.append(str(err))

    def answer_batch(self, batch: list[EvalItem]) -> list[tuple[EvalItem, str]]:
        loaded = []
        for it in batch:
            try:
                loaded.append((it, usable_images(self.vlm, it)))
            except BadSampleError as e:
                self._skip(it, e)
        if not loaded:
            return []
        if self.task.kind == "choice" and self.mc_mode == "likelihood":
            out = []
            for it, imgs in loaded:
                try:
                    # The likelihood prompt lists the options but does not ask for a letter: the options' texts
                    # are what is scored.
                    msgs = user_messages(it, it.question)
                    out.append((it, LETTERS[rank_options(self.vlm, imgs, msgs, it.options)]))
                except BadSampleError as e:
                    self._skip(it, e)
            return out
        convs = [(imgs, user_messages(it, render_prompt(self.template, it))) for it, imgs in loaded]
        try:
            replies = self.vlm.chat_batch(convs, **self.gen_kw)
            return [(it, r) for (it, _), r in zip(loaded, replies)]
        except BadSampleError:
            pass  # one item's prompt is unusable (e.g. too long): answer one by one to find it
        out = []
        for (it, _), conv in zip(loaded, convs):
            try:
                out.append((it, self.vlm.chat_batch([conv], **self.gen_kw)[0]))
            except BadSampleError as e:
                self._skip(it, e)
        return out


def _by_folder(paths: set[str]) -> dict[str, int]:
    return dict(sorted(Counter(str(Path(p).parent) for p in paths).items()))


def check_answered(results: dict) -> None:
    """Raise `EvaluationSetupError` when no question was answered (nothing can be scored): one line naming
    the image folder(s) and how many images were missing there, or the first reason items were skipped."""
    task, n = results["task"], results["n_items"]
    if n == 0:
        raise EvaluationSetupError(f"{results['data']} gave no {task} questions (an empty file, or --limit 0): "
                                   f"nothing to score")
    if results["n_answered"] > 0:
        return
    missing = results.get("missing_images") or {}
    if missing:
        where = "; ".join(f"{k} images missing from {folder}" for folder, k in missing.items())
        raise EvaluationSetupError(f"none of the {n} {task} questions could be answered: {where}; pass --images "
                                   f"with the folder that holds them")
    why = ", ".join(f"{k} {kind}" for kind, k in results["skipped"].items()) or "no answers"
    first = f", e.g. {results['skipped_examples'][0]}" if results["skipped_examples"] else ""
    raise EvaluationSetupError(f"none of the {n} {task} questions could be answered ({why}){first}")


@torch.no_grad()
def run_task(vlm, task: str, data: str, images: str | None = None, output: str | Path | None = None,
             limit: int | None = None, batch_size: int = 8, prompt: str | None = None, mc_mode: str = "generate",
             max_new_tokens: int | None = None, options: dict | None = None, progress: bool = True,
             model_id: str | None = None) -> dict:
    """Answer and score one benchmark (see the module docstring)."""
    t = get_task(task)
    if mc_mode not in MC_MODES:
        raise EvaluationSetupError(f"mc_mode {mc_mode!r}: choose one of {MC_MODES}")
    template = prompt if prompt is not None else t.prompt
    items = limit_items(t.load(data, images, dict(options or {})), limit)
    answers: dict[str, str] = {}
    out_dir = Path(output) if output is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        _check_run_file(out_dir, {"task": task, "prompt": template, "mc_mode": mc_mode, "model": model_id,
                                  "options": {k: v for k, v in sorted((options or {}).items())}})
        answers = {k: v for k, v in read_answers(out_dir / ANSWERS_FILE).items()}
    todo = [it for it in items if it.id not in answers]
    gen_kw = {"max_new_tokens": max_new_tokens or t.max_new_tokens, "do_sample": False}
    answerer = _Answerer(vlm, t, template, mc_mode, gen_kw)
    was_training = vlm.training
    vlm.eval()
    bar = tqdm(total=len(items), initial=len(items) - len(todo), desc=f"{task}", unit="q", disable=not progress)
    try:
        sink = (out_dir / ANSWERS_FILE).open("a", encoding="utf-8") if out_dir is not None else None
        try:
            for start in range(0, len(todo), batch_size):
                batch = todo[start:start + batch_size]
                for it, ans in answerer.answer_batch(batch):
                    answers[it.id] = ans
                    if sink is not None:
                        row = {"id": it.id, "answer": ans, "prompt": render_prompt(template, it)}
                        sink.write(json.dumps(row, ensure_ascii=False) + "\n")
                if sink is not None:
                    sink.flush()  # what is answered survives a crash
                bar.update(len(batch))
        finally:
            if sink is not None:
                sink.close()
    finally:
        bar.close()
        vlm.train(was_training)
    wanted = {it.id for it in items}
    answered = {k: v for k, v in answers.items() if k in wanted}
    scored = t.score(items, answered)
    results = {
        "task": task, "main_metric": t.main_metric, "metrics": scored.get("metrics", {}),
        "categories": scored.get("categories", {}), "n_items": len(items), "n_answered": len(answered),
        "n_scored": scored.get("n_scored", 0), "skipped": dict(answerer.skipped),
        "skipped_examples": answerer.examples, "missing_images": _by_folder(answerer.missing), "prompt": template, "mc_mode": mc_mode, "data": str(data),
    }
    if out_dir is not None:
        (out_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n",
                                            encoding="utf-8")
        write_chart(results, out_dir / CHART_FILE)
    return results
