"""Write a data file of ours as a VQAv2 questions + annotations pair, so `python -m qwenvl_lab.evaluation --task vqav2`
scores it with the official VQA accuracy.

    python -m qwenvl_lab.evaluation.to_vqav2 val.jsonl --out DIR [--image-folder DIR] [--subtype shapes]

Reads any format the dataset reader accepts. A sample becomes one question when it has one image and
one question-answer turn: the question is the user's text without its `<image>` marker, and all ten
"human" answers are the reference answer (so VQA accuracy equals exact match after normalisation).
Other samples (several images, several turns, no answer) are left out and counted. Writes
`DIR/questions.json`, `DIR/annotations.json` (`question_type` = the sample's `"type"` when it has one,
`answer_type` = yes/no | number | other; `source_id` = the sample id) and `DIR/images/
COCO_{subtype}_{image_id:012d}.{ext}` (hard links when possible, else copies), where
`python -m qwenvl_lab.evaluation --task vqav2 --data DIR` finds them without `--images`.

A missing or unreadable data file, an `--out` that cannot be written, and a file of which no sample
becomes a question (e.g. every image missing: the line says how many were left out and why) are one line
on stderr and exit status 2; no questions or annotations file is written then.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections import Counter
from pathlib import Path

from ..core.cli import run_cli, writable_dir
from ..dataset.formats import DataFileError, normalize, read_records
from ..dataset.sample import BadSampleError


def _answer_type(answer: str) -> str:
    a = answer.strip().lower()
    if a in ("yes", "no"):
        return "yes/no"
    return "number" if a.replace(".", "", 1).isdigit() else "other"


def _link_or_copy(src: str, dst: Path) -> None:
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def convert(data: str, out: str | Path, image_folder: str | None = None, subtype: str = "shapes") -> dict:
    """Write the pair (see the module docstring); returns {"questions": n, "skipped": {reason: n}}."""
    out = Path(out)
    records = read_records(data)
    writable_dir(out / "images", "--out")
    questions, annotations = [], []
    skipped: Counter = Counter()
    for pos, rec in records:
        try:
            s = normalize(rec, pos, data, image_folder=image_folder)
        except BadSampleError as e:
            skipped[e.kind] += 1
            continue
        msgs = [m for m in s.messages if m["role"] != "system"]
        if len(s.images) != 1 or s.videos:
            skipped["not one image"] += 1
            continue
        if len(msgs) != 2 or msgs[0]["role"] != "user" or msgs[1]["role"] != "assistant":
            skipped["not one question-answer turn"] += 1
            continue
        image_id = len(questions) + 1
        qid = image_id * 1000  # VQAv2 numbers an image's questions image_id * 1000 + k
        ext = Path(s.images[0]).suffix or ".jpg"
        try:
            _link_or_copy(s.images[0], out / "images" / f"COCO_{subtype}_{image_id:012d}{ext}")
        except OSError as e:
            skipped["image not found" if isinstance(e, FileNotFoundError) else "image not readable"] += 1
            continue
        question = msgs[0]["content"].replace("<image>", "").strip()
        answer = msgs[1]["content"].strip()
        questions.append({"image_id": image_id, "question": question, "question_id": qid})
        annotations.append({
            "question_id": qid, "image_id": image_id, "question_type": str(rec.get("type") or
                                                                           " ".join(question.lower().split()[:2])),
            "answer_type": _answer_type(answer), "multiple_choice_answer": answer,
            "answers": [{"answer": answer, "answer_confidence": "yes", "answer_id": k + 1} for k in range(10)],
            "source_id": s.id,
        })
    if not questions:
        left = ", ".join(f"{n} {k}" for k, n in skipped.items()) or "the file holds no samples"
        hint = " (check --image-folder)" if {"image not found", "image not readable"} & set(skipped) else ""
        raise DataFileError(f"{data}: no sample became a VQAv2 question (left out: {left}){hint}")
    info = {"description": f"converted from {Path(data).name}"}
    (out / "questions.json").write_text(json.dumps({
        "info": info, "task_type": "Open-Ended", "data_type": "mscoco", "license": {}, "data_subtype": subtype,
        "questions": questions}, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "annotations.json").write_text(json.dumps({
        "info": info, "license": {}, "data_type": "mscoco", "data_subtype": subtype,
        "annotations": annotations}, ensure_ascii=False) + "\n", encoding="utf-8")
    return {"questions": len(questions), "skipped": dict(skipped)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qwenvl_lab.evaluation.to_vqav2", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", help="our JSONL (or any format the dataset reader accepts)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--image-folder", default=None)
    ap.add_argument("--subtype", default="shapes", help="data_subtype (names the image files)")
    args = ap.parse_args(argv)
    rep = convert(args.data, args.out, args.image_folder, args.subtype)  # a UserError: one line, exit 2
    left = ", ".join(f"{n} {k}" for k, n in rep["skipped"].items()) or "none"
    print(f"wrote {rep['questions']} VQAv2 questions to {args.out} (left out: {left})")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
