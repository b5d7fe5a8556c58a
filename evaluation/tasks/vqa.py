"""Open-ended VQA benchmarks read from their released files.

- `vqav2`: `--data` the questions JSON (`{"data_subtype", "questions": [{"question_id", "image_id",
  "question"}]}`) or a folder holding one `*questions*.json` and one `*annotations*.json`; the annotations
  (`{"annotations": [{"question_id", "answers": [{"answer"}] x 10, "answer_type", "question_type"}]}`)
  come from `--annotations` or that folder (without them: answers only). Images: `--images` (default:
  `images/` beside the questions when there is one, as `evaluation.to_vqav2` writes it, else the questions'
  folder) / `COCO_{data_subtype}_{image_id:012d}.jpg` (.png accepted). VQA accuracy per answer and
  question type.
- `gqa`: a balanced questions JSON (`{qid: {"imageId", "question", "answer", "types": {"structural",
  "semantic"}}}`), images `{imageId}.jpg`; exact match after the VQA normalisation.
- `textvqa`: `TextVQA_0.5.1_val.json` (`{"data": [{"question_id", "image_id", "question", "answers"}]}`),
  images `{image_id}.jpg` (the `train_images` folder); VQA accuracy.
- `vizwiz`: `val.json` (`[{"image", "question", "answers": [{"answer", "answer_confidence"}],
  "answer_type", "answerable"}]`), images by name; VQA accuracy per answer type, plus precision / recall /
  F1 of answering "unanswerable" where the question is unanswerable (`answerable == 0`).
- `docvqa`: `val_v1.0.json` (`{"data": [{"questionId", "question", "image": "documents/x.png",
  "answers", "question_types"}]}`), images relative to `--images` (default: the JSON's folder); ANLS.
- `chartqa`: `test_human.json` / `test_augmented.json` (`[{"imgname", "query", "label"}]`), or the
  folder holding them; images `--images` (default `png/` beside them); relaxed accuracy per source.
"""

from __future__ import annotations

from pathlib import Path

from ..items import BenchmarkFormatError, EvalItem, find_one, image_path, need, read_json
from ..metrics import anls, exact_match, relaxed_accuracy, vqa_accuracy
from ..normalize import normalize_answer
from .common import SHORT_ANSWER, Task, per_item_score

VIZWIZ_PROMPT = ("{question}\nWhen the provided information is insufficient, respond with 'Unanswerable'.\n"
                 "Answer the question using a single word or phrase.")


def _image_folder(images: str | None, default: Path) -> Path:
    return Path(images) if images else default


# ----- VQAv2 ----------------------------------------------------------------------------------------
def vqav2_files(data: str, annotations: str | None) -> tuple[Path, Path | None]:
    p = Path(data)
    if p.is_dir():
        q = find_one(p, "*questions*.json", "VQAv2 questions")
        a = Path(annotations) if annotations else find_one(p, "*annotations*.json", "VQAv2 annotations", False)
        return q, a
    if annotations:
        return p, Path(annotations)
    return p, find_one(p.parent, "*annotations*.json", "VQAv2 annotations", required=False)


def load_vqav2(data: str, images: str | None, options: dict) -> list[EvalItem]:
    qfile, afile = vqav2_files(data, options.get("annotations"))
    qdoc = read_json(qfile)
    need(qdoc, ("questions",), str(qfile))
    subtype = qdoc.get("data_subtype", "val2014")
    # python -m qwenvl_lab.evaluation.to_vqav2 writes the images to images/ beside the questions; the released
    # VQAv2 files are unpacked apart from their images (val2014/), which --images names.
    folder = _image_folder(images, qfile.parent / "images" if (qfile.parent / "images").is_dir() else qfile.parent)
    anns = {}
    if afile is not None:
        adoc = read_json(afile)
        need(adoc, ("annotations",), str(afile))
        for i, a in enumerate(adoc["annotations"]):
            need(a, ("question_id", "answers"), f"{afile} annotation {i}")
            anns[a["question_id"]] = a
    items = []
    for i, q in enumerate(qdoc["questions"]):
        need(q, ("question_id", "image_id", "question"), f"{qfile} question {i}")
        iid = int(q["image_id"])
        name = f"COCO_{subtype}_{iid:012d}.jpg"
        img = image_path(folder, name, (name[:-4] + ".png", f"{iid}.jpg", f"{iid}.png"))
        a = anns.get(q["question_id"])
        if afile is not None and a is None:
            raise BenchmarkFormatError(f"{afile}: no annotation for question_id {q['question_id']} of {qfile}")
        target = [x["answer"] for x in a["answers"]] if a else None
        category = {"answer_type": a.get("answer_type", "other"), "question_type": a.get("question_type", "")} if a else {}
        items.append(EvalItem(str(q["question_id"]), q["question"], [img], target, category,
                              meta={"image_id": iid}))
    return items


def score_vqa(items: list[EvalItem], answers: dict[str, str]) -> dict:
    return per_item_score(items, answers, vqa_accuracy, "accuracy")


# ----- GQA ------------------------------------------------------------------------------------------
def load_gqa(data: str, images: str | None, options: dict) -> list[EvalItem]:
    doc = read_json(data)
    if not isinstance(doc, dict):
        raise BenchmarkFormatError(f"{data}: a GQA questions file is a JSON object {{question id: question}}")
    folder = _image_folder(images, Path(data).parent / "images")
    items = []
    for qid in sorted(doc):
        q = doc[qid]
        need(q, ("imageId", "question"), f"{data} question {qid}")
        types = q.get("types") or {}
        items.append(EvalItem(str(qid), q["question"], [image_path(folder, f"{q['imageId']}.jpg")],
                              q.get("answer"), {"structural": types.get("structural", "unknown"),
                                                "semantic": types.get("semantic", "unknown")}))
    return items


def score_exact(items: list[EvalItem], answers: dict[str, str]) -> dict:
    return per_item_score(items, answers, exact_match, "accuracy")


# ----- TextVQA --------------------------------------------------------------------------------------
def load_textvqa(data: str, images: str | None, options: dict) -> list[EvalItem]:
    doc = read_json(data)
    need(doc, ("data",), data)
    folder = _image_folder(images, Path(data).parent / "train_images")
    items = []
    for i, q in enumerate(doc["data"]):
        need(q, ("question_id", "image_id", "question"), f"{data} entry {i}")
        items.append(EvalItem(str(q["question_id"]), q["question"],
                              [image_path(folder, f"{q['image_id']}.jpg")], q.get("answers"), {}))
    return items


# ----- VizWiz ---------------------------------------------------------------------------------------
def load_vizwiz(data: str, images: str | None, options: dict) -> list[EvalItem]:
    doc = read_json(data)
    if not isinstance(doc, list):
        raise BenchmarkFormatError(f"{data}: a VizWiz annotation file is a JSON list of questions")
    folder = _image_folder(images, Path(data).parent)
    items = []
    for i, q in enumerate(doc):
        need(q, ("image", "question"), f"{data} entry {i}")
        answers = [a["answer"] for a in q["answers"]] if q.get("answers") else None
        cat = {"answer_type": q["answer_type"]} if "answer_type" in q else {}
        items.append(EvalItem(Path(q["image"]).stem, q["question"], [image_path(folder, q["image"])], answers,
                              cat, meta={"answerable": q.get("answerable")}))
    return items


def score_vizwiz(items: list[EvalItem], answers: dict[str, str]) -> dict:
    out = score_vqa(items, answers)
    judged = [it for it in items if it.id in answers and it.meta.get("answerable") is not None]
    if judged:
        said = [normalize_answer(answers[it.id]) == "unanswerable" for it in judged]
        truth = [int(it.meta["answerable"]) == 0 for it in judged]
        tp = sum(s and t for s, t in zip(said, truth))
        precision = tp / max(sum(said), 1)
        recall = tp / max(sum(truth), 1)
        out["metrics"].update({
            "unanswerable_precision": precision, "unanswerable_recall": recall,
            "unanswerable_f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        })
    return out


# ----- DocVQA ---------------------------------------------------------------------------------------
def load_docvqa(data: str, images: str | None, options: dict) -> list[EvalItem]:
    doc = read_json(data)
    need(doc, ("data",), data)
    folder = _image_folder(images, Path(data).parent)
    items = []
    for i, q in enumerate(doc["data"]):
        need(q, ("questionId", "question", "image"), f"{data} entry {i}")
        types = q.get("question_types") or []
        items.append(EvalItem(str(q["questionId"]), q["question"], [image_path(folder, q["image"])],
                              q.get("answers"), {"question_type": types} if types else {}))
    return items


def score_anls(items: list[EvalItem], answers: dict[str, str]) -> dict:
    return per_item_score(items, answers, anls, "anls")


# ----- ChartQA --------------------------------------------------------------------------------------
def load_chartqa(data: str, images: str | None, options: dict) -> list[EvalItem]:
    p = Path(data)
    files = sorted(p.glob("*_human.json")) + sorted(p.glob("*_augmented.json")) if p.is_dir() else [p]
    if not files:
        raise BenchmarkFormatError(f"{p}: no ChartQA *_human.json / *_augmented.json here")
    folder = _image_folder(images, (p if p.is_dir() else p.parent) / "png")
    items = []
    for f in files:
        rows = read_json(f)
        if not isinstance(rows, list):
            raise BenchmarkFormatError(f"{f}: a ChartQA file is a JSON list of {{imgname, query, label}}")
        source = f.stem.split("_")[-1]  # human | augmented
        for i, r in enumerate(rows):
            need(r, ("imgname", "query"), f"{f} entry {i}")
            items.append(EvalItem(f"{source}/{i}", r["query"], [image_path(folder, r["imgname"])], r.get("label"),
                                  {"source": source}))
    return items


def score_relaxed(items: list[EvalItem], answers: dict[str, str]) -> dict:
    return per_item_score(items, answers, relaxed_accuracy, "relaxed_accuracy")


TASKS = {
    "vqav2": Task("vqav2", load_vqav2, score_vqa, SHORT_ANSWER, about="VQAv2 (VQA accuracy)"),
    "gqa": Task("gqa", load_gqa, score_exact, SHORT_ANSWER, about="GQA balanced (exact match)"),
    "textvqa": Task("textvqa", load_textvqa, score_vqa, SHORT_ANSWER, about="TextVQA (VQA accuracy)"),
    "vizwiz": Task("vizwiz", load_vizwiz, score_vizwiz, VIZWIZ_PROMPT, about="VizWiz (VQA accuracy, unanswerable)"),
    "docvqa": Task("docvqa", load_docvqa, score_anls, SHORT_ANSWER, max_new_tokens=32, main_metric="anls",
                   about="DocVQA (ANLS)"),
    "chartqa": Task("chartqa", load_chartqa, score_relaxed, SHORT_ANSWER, main_metric="relaxed_accuracy",
                    about="ChartQA (relaxed accuracy)"),
}
