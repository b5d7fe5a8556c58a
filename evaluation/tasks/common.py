"""What every task shares: the `Task` record, LLaVA-1.5's prompt wordings, and mean-per-category scoring.

A task is `Task(name, load, score, prompt, kind, max_new_tokens, main_metric)`:
- `load(data, images, options) -> list[EvalItem]`, reading the benchmark's released files (`options` holds
  `split`, `annotations`, `circular`);
- `score(items, answers) -> {"metrics": {...}, "categories": {group: {name: {"n": n, metric: value}}}}`,
  over the items that have an answer and a target;
- `prompt`: the template `{question}` is placed in (overridable with `--prompt`);
- `kind`: "short" (free-form short answer), "choice" (multiple choice: generation, or the likelihood of
  each option's text), "caption".

Results are fractions in [0, 1] except where a metric is a sum of scores (MME) or a caption score.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from ..items import EvalItem

SHORT_ANSWER = "{question}\nAnswer the question using a single word or phrase."
OPTION_LETTER = "{question}\nAnswer with the option's letter from the given choices directly."
CAPTION = "Provide a one-sentence caption for the provided image."


@dataclass
class Task:
    name: str
    load: Callable
    score: Callable
    prompt: str
    kind: str = "short"
    max_new_tokens: int = 16
    main_metric: str = "accuracy"
    about: str = ""


def _names(value) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


def mean_by_category(items: list[EvalItem], per_item: dict[str, dict[str, float]]) -> dict:
    """Means of each per-item metric overall and per category (an item counts in every category it names).

    `per_item`: {item id: {metric: value}} for the scored items."""
    scored = [it for it in items if it.id in per_item]
    if not scored:
        return {"metrics": {}, "categories": {}, "n_scored": 0}
    keys = list(per_item[scored[0].id])
    overall = {k: sum(per_item[it.id][k] for it in scored) / len(scored) for k in keys}
    buckets: dict[str, dict[str, list[EvalItem]]] = defaultdict(lambda: defaultdict(list))
    for it in scored:
        for group, value in it.category.items():
            for name in _names(value):
                buckets[group][name].append(it)
    categories = {
        group: {name: {"n": len(its), **{k: sum(per_item[i.id][k] for i in its) / len(its) for k in keys}}
                for name, its in sorted(cats.items())}
        for group, cats in buckets.items()
    }
    return {"metrics": overall, "categories": categories, "n_scored": len(scored)}


def per_item_score(items: list[EvalItem], answers: dict[str, str], fn: Callable, metric: str) -> dict:
    """`mean_by_category` of one metric `fn(answer, target)` over the answered items that have a target."""
    per_item = {it.id: {metric: float(fn(answers[it.id], it.target))}
                for it in items if it.id in answers and it.target is not None}
    return mean_by_category(items, per_item)


def options_block(options: list[str], letters: str = "ABCDEFGHIJ") -> str:
    """LLaVA's option lines: "A. first" ... one per line."""
    return "\n".join(f"{letters[i]}. {o}" for i, o in enumerate(options))
