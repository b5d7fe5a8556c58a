"""Tiny benchmark fixtures in each benchmark's RELEASED file format (field names as the official releases
name them), with 8x8 images, for the evaluation tests. Each writer returns the `--data` path (and the
image folder where the benchmark keeps images apart) and the facts a test checks against.
"""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

from PIL import Image

COLOURS = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (230, 220, 20)]


def png(path: Path, colour=(200, 30, 10), size=(8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def png_b64(colour=(200, 30, 10)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def write_vqav2(root: Path) -> tuple[Path, Path]:
    """v2_OpenEnded_mscoco_val2014_questions.json + v2_mscoco_val2014_annotations.json + val2014/ images."""
    root.mkdir(parents=True, exist_ok=True)
    images = root / "val2014"
    qs, anns = [], []
    specs = [  # (image_id, question, ten answers, answer_type, question_type)
        (9, "What color is the square?", ["red"] * 10, "other", "what color is the"),
        (25, "How many dogs?", ["2"] * 4 + ["two"] * 2 + ["3"] * 4, "number", "how many"),
        (42, "Is it raining?", ["yes"] * 2 + ["no"] * 8, "yes/no", "is it"),
    ]
    for k, (iid, q, answers, atype, qtype) in enumerate(specs):
        png(images / f"COCO_val2014_{iid:012d}.jpg", COLOURS[k])
        qid = iid * 1000
        qs.append({"image_id": iid, "question": q, "question_id": qid})
        anns.append({"question_type": qtype, "multiple_choice_answer": answers[0], "image_id": iid,
                     "answer_type": atype, "question_id": qid,
                     "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                                 for i, a in enumerate(answers)]})
    (root / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps(
        {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {}, "data_subtype": "val2014",
         "questions": qs}))
    (root / "v2_mscoco_val2014_annotations.json").write_text(json.dumps(
        {"info": {}, "license": {}, "data_subtype": "val2014", "data_type": "mscoco", "annotations": anns}))
    return root, images


def write_gqa(root: Path) -> tuple[Path, Path]:
    """testdev_balanced_questions.json ({qid: {...}}) + images/{imageId}.jpg."""
    doc = {}
    for k, (qid, image, q, a, struct) in enumerate([
        ("201307251", "n161313", "Is the sky blue?", "yes", "verify"),
        ("201640614", "n235859", "What is the animal on the left?", "cat", "query"),
    ]):
        png(root / "images" / f"{image}.jpg", COLOURS[k])
        doc[qid] = {"semantic": [], "entailed": [], "equivalent": [qid], "question": q, "imageId": image,
                    "isBalanced": True, "groups": {"global": None, "local": "x"}, "answer": a,
                    "semanticStr": "", "annotations": {"answer": {}, "question": {}, "fullAnswer": {}},
                    "types": {"detailed": "x", "semantic": "attr" if k == 0 else "obj", "structural": struct},
                    "fullAnswer": f"{a}."}
    path = root / "testdev_balanced_questions.json"
    path.write_text(json.dumps(doc))
    return path, root / "images"


def write_textvqa(root: Path) -> tuple[Path, Path]:
    data = []
    for k, (qid, image, q, answers) in enumerate([
        (34602, "0054c91397f2fe05", "what is the brand?", ["nokia"] * 10),
        (34603, "005635e119b9f32f", "what does it say?", ["stop"] * 3 + ["go"] * 7),
    ]):
        png(root / "train_images" / f"{image}.jpg", COLOURS[k])
        data.append({"question": q, "image_id": image, "image_classes": ["Sign"], "flickr_original_url": "",
                     "flickr_300k_url": "", "image_width": 8, "image_height": 8, "answers": answers,
                     "question_tokens": q.split(), "question_id": qid, "set_name": "val"})
    path = root / "TextVQA_0.5.1_val.json"
    path.write_text(json.dumps({"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1",
                                "data": data}))
    return path, root / "train_images"


def write_vizwiz(root: Path) -> tuple[Path, Path]:
    rows = []
    for k, (name, q, answers, atype, answerable) in enumerate([
        ("VizWiz_val_00000000.jpg", "What is this?", ["milk"] * 10, "other", 1),
        ("VizWiz_val_00000001.jpg", "What colour is the shirt?", ["unanswerable"] * 8 + ["blue"] * 2,
         "unanswerable", 0),
    ]):
        png(root / "val" / name, COLOURS[k])
        rows.append({"image": name, "question": q, "answerable": answerable, "answer_type": atype,
                     "answers": [{"answer": a, "answer_confidence": "yes"} for a in answers]})
    path = root / "val.json"
    path.write_text(json.dumps(rows))
    return path, root / "val"


def write_pope(root: Path) -> tuple[Path, Path]:
    """coco_pope_{random,adversarial}.json (JSON lines) + COCO images."""
    labels = {"random": ["yes", "no", "no", "yes"], "adversarial": ["yes", "no"]}
    for split, labs in labels.items():
        lines = []
        for k, lab in enumerate(labs):
            name = f"COCO_val2014_{k:012d}.jpg"
            png(root / "val2014" / name, COLOURS[k % 4])
            lines.append(json.dumps({"question_id": k + 1, "image": name, "text": f"Is there a thing {k} in the image?",
                                     "label": lab}))
        (root / f"coco_pope_{split}.json").write_text("\n".join(lines) + "\n")
    return root, root / "val2014"


def write_mmbench(root: Path) -> Path:
    """mmbench_dev.tsv: index, question, hint, A-D, answer, category, l2-category, image (base64)."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "mmbench_dev_20230712.tsv"
    cols = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "source", "l2-category",
            "comment", "split", "image"]
    rows = [
        {"index": 0, "question": "What colour is the picture?", "hint": "", "A": "red", "B": "green",
         "C": "blue", "D": "", "answer": "A", "category": "attribute_recognition", "l2-category": "attribute",
         "image": png_b64(COLOURS[0])},
        {"index": 1, "question": "Which shape?", "hint": "Look closely.", "A": "circle", "B": "square",
         "C": "", "D": "", "answer": "B", "category": "object_localization", "l2-category": "localization",
         "image": "0"},  # reuses row 0's image, as the released TSV does
    ]
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols, delimiter="\t")
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in cols})
    return path


def write_scienceqa(root: Path) -> tuple[Path, Path]:
    """problems.json + pid_splits.json + images/{split}/{pid}/image.png."""
    problems = {
        "5": {"question": "Which is a mammal?", "choices": ["shark", "whale", "trout"], "answer": 1,
              "hint": "", "image": "image.png", "task": "closed choice", "grade": "grade3",
              "subject": "natural science", "topic": "biology", "category": "Classify", "skill": "",
              "lecture": "", "solution": "", "split": "test"},
        "7": {"question": "What is the capital?", "choices": ["Paris", "Rome"], "answer": 0,
              "hint": "This is France.", "image": "image.png", "task": "closed choice", "grade": "grade8",
              "subject": "social science", "topic": "geography", "category": "", "skill": "", "lecture": "",
              "solution": "", "split": "test"},
        "9": {"question": "No image here?", "choices": ["a", "b"], "answer": 0, "hint": "", "image": None,
              "grade": "grade2", "subject": "language science", "split": "test"},
        "11": {"question": "Train question", "choices": ["a", "b"], "answer": 0, "hint": "", "image": "image.png",
               "grade": "grade2", "subject": "language science", "split": "train"},
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "problems.json").write_text(json.dumps(problems))
    (root / "pid_splits.json").write_text(json.dumps({"train": ["11"], "val": [], "test": ["5", "7", "9"]}))
    for k, pid in enumerate(["5", "7"]):
        png(root / "images" / "test" / pid / "image.png", COLOURS[k])
    png(root / "images" / "train" / "11" / "image.png")
    return root / "problems.json", root / "images"


def write_mme(root: Path) -> Path:
    """MME_Benchmark_release_version/: a category with images/ + questions_answers_YN/, one with both side by side."""
    png(root / "artwork" / "images" / "10002.jpg", COLOURS[0])
    (root / "artwork" / "questions_answers_YN").mkdir(parents=True)
    (root / "artwork" / "questions_answers_YN" / "10002.txt").write_text(
        "Is this artwork created by Leonardo? Please answer yes or no.\tYes\n"
        "Is this artwork created by Monet? Please answer yes or no.\tNo\n")
    for stem, colour in (("000000006040", COLOURS[1]), ("000000044279", COLOURS[2])):
        png(root / "code_reasoning" / f"{stem}.png", colour)
        (root / "code_reasoning" / f"{stem}.txt").write_text(
            "Will the code print 5? Please answer yes or no.\tYes\n"
            "Will the code print 6? Please answer yes or no.\tNo\n")
    return root


def write_coco_captions(root: Path, domain: bool = False) -> tuple[Path, Path]:
    """captions_val2014.json (or NoCaps' nocaps_val_4500_captions.json with `domain`)."""
    images, anns = [], []
    caps = {1: ["a red square", "a red block"], 2: ["a green square", "a green tile"]}
    for k, (iid, refs) in enumerate(caps.items()):
        name = f"COCO_val2014_{iid:012d}.jpg"
        png(root / "val2014" / name, COLOURS[k])
        im = {"id": iid, "file_name": name, "height": 8, "width": 8}
        if domain:
            im["domain"] = "in-domain" if k == 0 else "out-domain"
        images.append(im)
        anns += [{"image_id": iid, "id": 100 * iid + j, "caption": c} for j, c in enumerate(refs)]
    path = root / ("nocaps_val_4500_captions.json" if domain else "captions_val2014.json")
    path.write_text(json.dumps({"info": {}, "licenses": [], "images": images, "annotations": anns}))
    return path, root / "val2014"


def write_flickr30k(root: Path) -> tuple[Path, Path, Path]:
    """dataset_flickr30k.json (Karpathy split) and results_20130124.token, images flickr30k-images/."""
    refs = {"1000092795.jpg": ["two men in a field", "men outside"], "10002456.jpg": ["a dog runs", "a dog"]}
    imgs = []
    for k, (name, caps) in enumerate(refs.items()):
        png(root / "flickr30k-images" / name, COLOURS[k])
        imgs.append({"filename": name, "imgid": k, "split": "test" if k == 0 else "train",
                     "sentences": [{"raw": c, "tokens": c.split(), "imgid": k} for c in caps], "sentids": [0, 1]})
    karpathy = root / "dataset_flickr30k.json"
    karpathy.write_text(json.dumps({"images": imgs, "dataset": "flickr30k"}))
    token = root / "results_20130124.token"
    token.write_text("".join(f"{n}#{j}\t{c}\n" for n, caps in refs.items() for j, c in enumerate(caps)))
    return karpathy, token, root / "flickr30k-images"


def write_docvqa(root: Path) -> Path:
    data = []
    for k, (qid, q, answers, types) in enumerate([
        (49153, "What is the date?", ["1/8/93", "January 8, 1993"], ["layout"]),
        (24580, "What is the title?", ["Annual Report"], ["layout", "free_text"]),
    ]):
        png(root / "documents" / f"doc{k}.png", COLOURS[k])
        data.append({"questionId": qid, "question": q, "question_types": types, "image": f"documents/doc{k}.png",
                     "docId": 14465 + k, "ucsf_document_id": "txpp0227", "ucsf_document_page_no": "10",
                     "answers": answers, "data_split": "val"})
    path = root / "val_v1.0_withQT.json"
    path.write_text(json.dumps({"dataset_name": "docvqa", "dataset_split": "val", "dataset_version": "1.0",
                                "data": data}))
    return path


def write_chartqa(root: Path) -> Path:
    """test/test_human.json + test/test_augmented.json + test/png/."""
    test = root / "test"
    for k, name in enumerate(["41699051005347.png", "multi_col_1.png"]):
        png(test / "png" / name, COLOURS[k])
    (test / "test_human.json").write_text(json.dumps([
        {"imgname": "41699051005347.png", "query": "What is the peak value?", "label": "20.5"}]))
    (test / "test_augmented.json").write_text(json.dumps([
        {"imgname": "multi_col_1.png", "query": "Which year is highest?", "label": "2019"},
        {"imgname": "multi_col_1.png", "query": "Which colour is the bar?", "label": "Blue"}]))
    return test
