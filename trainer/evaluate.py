"""Answer a data file in batches and score the answers.

    python -m qwenvl_lab.trainer.evaluate --model RUN_OR_MODEL_DIR --data val.jsonl [--image-folder DIR] [--output OUT]

Every assistant turn of a sample is scored (`--last-turn-only`: only the last): its text is the reference,
and the conversation before it is the prompt, so a later turn is answered with the reference history (the
earlier turns' reference answers, not the model's own). A sample ending in a user turn is answered
without a reference. Answers are greedy. Accuracy is exact match after normalisation (case, surrounding
punctuation and spaces), reported per question type when samples carry a `"type"` field (the shapes data
does; it is the type of a sample's first question), with every turn after a sample's first in a row of
its own (`multi-turn`), and overall. The answers JSONL has one row per scored turn (`turn`: 0 = first).
"""

from __future__ import annotations

import argparse
import json
import string
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

from ..core.cli import run_cli, writable_dir
from ..dataset.formats import normalize, read_records
from ..dataset.images import load_image
from ..dataset.sample import IMAGE_MARKER
from ..model.paths import resolve_model_dir

FOLLOWUP_ROW = "multi-turn"  # the score row of every assistant turn after a sample's first


def _norm(text: str) -> str:
    return text.strip().strip(string.punctuation + " ").lower()


def _prompt_and_reference(sample) -> tuple[list[dict], str | None, int]:
    """Messages to send (up to the last user turn), the reference answer, images used by the prompt."""
    msgs = list(sample.messages)
    reference = None
    if msgs and msgs[-1]["role"] == "assistant":
        reference = msgs.pop()["content"]
    n_images = sum(m["content"].count(IMAGE_MARKER) for m in msgs)
    return msgs, reference, n_images


def answer_samples(vlm, samples: list, batch_size: int = 8, system: str | None = None, **gen_kw) -> list[str]:
    """Greedy (by default) answers for normalised samples, batched with left padding (`VLM.chat_batch`)."""
    gen_kw.setdefault("max_new_tokens", 32)
    answers: list[str] = []
    for start in range(0, len(samples), batch_size):
        convs = []
        for s in samples[start:start + batch_size]:
            msgs, _, n_img = _prompt_and_reference(s)
            if system and not (msgs and msgs[0]["role"] == "system"):
                msgs = [{"role": "system", "content": system}] + msgs
            convs.append(([load_image(p) for p in s.images[:n_img]], msgs))
        answers += vlm.chat_batch(convs, **gen_kw)
    return answers


def split_turns(pairs: list[tuple[dict, object]]) -> list[tuple[dict, object, int]]:
    """(record, Sample, turn) per assistant turn: the sample cut just after that turn, so its prompt holds the
    earlier turns with their reference answers. A sample ending in a user turn also gives the whole sample
    (no reference) as its last entry; one without any assistant turn gives just that."""
    out = []
    for rec, s in pairs:
        ends = [k for k, m in enumerate(s.messages) if m["role"] == "assistant"]
        out += [(rec, replace(s, messages=s.messages[:k + 1]), t) for t, k in enumerate(ends)]
        if not s.messages or s.messages[-1]["role"] != "assistant":
            out.append((rec, s, len(ends)))
    return out


def load_samples(path: str, image_folder: str | None = None,
                 allow_absolute_paths: bool = False) -> list[tuple[dict, object]]:
    """(record, Sample) pairs; image paths stay inside `image_folder` unless `allow_absolute_paths`."""
    return [(rec, normalize(rec, pos, path, image_folder=image_folder, allow_absolute_paths=allow_absolute_paths))
            for pos, rec in read_records(path)]


def answer_file(vlm, input_path: str, output_path: str, image_folder: str | None = None,
                batch_size: int = 8, system: str | None = None, allow_absolute_paths: bool = False,
                **gen_kw) -> int:
    pairs = load_samples(input_path, image_folder, allow_absolute_paths)
    return write_answers(vlm, pairs, output_path, batch_size, system, **gen_kw)


def write_answers(vlm, pairs: list[tuple[dict, object]], output_path: str, batch_size: int = 8,
                  system: str | None = None, every_turn: bool = False, **gen_kw) -> int:
    """Answers `load_samples`' pairs into JSONL (id, answer, reference, type): a caller that checked the file
    before loading the model passes the pairs it has, rather than reading the file again. `every_turn`:
    one row per assistant turn (`split_turns`; rows carry `turn`), else one per sample (its last turn)."""
    items = split_turns(pairs) if every_turn else [(rec, s, None) for rec, s in pairs]
    answers = answer_samples(vlm, [s for _, s, _ in items], batch_size, system, **gen_kw)
    with open(output_path, "w", encoding="utf-8") as f:
        for (rec, s, turn), ans in zip(items, answers):
            _, ref, _ = _prompt_and_reference(s)
            row = {"id": s.id, "answer": ans, "reference": ref}
            if turn is not None:
                row["turn"] = turn
            if "type" in rec:
                row["type"] = rec["type"]
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return len(answers)


def score(rows: list[dict]) -> dict[str, tuple[int, int]]:
    """{type: (correct, total)} plus "all"; rows of a turn after the first count under `FOLLOWUP_ROW`."""
    tally: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in rows:
        ok = int(r["reference"] is not None and _norm(r["answer"]) == _norm(r["reference"]))
        row = FOLLOWUP_ROW if (r.get("turn") or 0) > 0 else r.get("type")
        for key in (row, "all") if row else ("all",):
            tally[key][0] += ok
            tally[key][1] += 1
    return {k: (v[0], v[1]) for k, v in tally.items()}


def format_table(scores: dict[str, tuple[int, int]]) -> str:
    lines = [f"{'question type':<16} {'correct':>8} {'total':>6} {'accuracy':>9}"]
    for k in sorted(scores, key=lambda k: (k == "all", k)):
        c, n = scores[k]
        lines.append(f"{k:<16} {c:>8} {n:>6} {100.0 * c / max(n, 1):>8.1f}%")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Answer a data file and report exact-match accuracy per type.")
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--image-folder", default=None)
    ap.add_argument("--allow-absolute-paths", action="store_true", help="accept image paths outside the folder")
    ap.add_argument("--output", default=None, help="answers JSONL (default: next to the model)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--last-turn-only", action="store_true",
                    help="score each sample's last assistant turn only (default: every assistant turn)")
    args = ap.parse_args(argv)
    model_dir = resolve_model_dir(args.model)
    out = args.output or str(Path(model_dir) / "eval_answers.jsonl")
    writable_dir(Path(out).resolve().parent, "--output's directory")
    pairs = load_samples(args.data, args.image_folder, args.allow_absolute_paths)  # a bad file fails before the model
    from ..model import VLM  # heavy: after the arguments and the data file are checked

    vlm = VLM.from_pretrained(model_dir).eval()
    write_answers(vlm, pairs, out, args.batch_size, every_turn=not args.last_turn_only,
                  max_new_tokens=args.max_new_tokens)
    rows = [json.loads(line) for line in Path(out).read_text(encoding="utf-8").splitlines() if line]
    table = format_table(score(rows))
    print(table)
    (Path(out).with_suffix(".scores.txt")).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
