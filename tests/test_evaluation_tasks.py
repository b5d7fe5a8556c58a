"""Every benchmark task reads a fixture in its released format and scores scripted answers as computed by hand.

A scripted model (the VLM's `chat_batch` interface) answers from the prompt and the image it is shown, so
each test checks the loader (questions, images, targets, categories), the prompt, and the scorer.
"""

import functools
import json

import pytest
import qwenvl_lab.evaluation.tasks.captions as captions_task
from qwenvl_lab.evaluation.__main__ import main as evaluation_main
from qwenvl_lab.evaluation.items import BenchmarkFormatError
from qwenvl_lab.evaluation.metrics import caption_scores
from qwenvl_lab.evaluation.report import format_table
from qwenvl_lab.evaluation.runner import EvaluationSetupError, run_task

from tests import tiny_bench as tb


class ScriptedVLM:
    """Answers each conversation with `rule(prompt_text, images)`; records what it was asked."""

    def __init__(self, rule):
        self.rule, self.asked, self.training = rule, [], False

    def eval(self):
        self.training = False
        return self

    def train(self, mode=True):
        self.training = mode
        return self

    def chat_batch(self, convs, **gen_kw):
        assert gen_kw.get("do_sample") is False  # deterministic answers
        self.asked += convs
        return [self.rule(msgs[-1]["content"], imgs) for imgs, msgs in convs]


def colour(img):
    """The fixture colour an image shows (JPEG fixtures are lossy)."""
    px = img.getpixel((4, 4))
    return min(tb.COLOURS, key=lambda c: sum((a - b) ** 2 for a, b in zip(c, px)))


def by_question(table):
    def rule(text, imgs):
        for key, ans in table.items():
            if key in text:
                return ans
        return "?"
    return rule


@pytest.fixture(autouse=True)
def _fast_captions(monkeypatch):
    # Java's PTB tokenizer and METEOR take tens of seconds; their paths are covered in test_evaluation_metrics.
    monkeypatch.setattr(captions_task, "caption_scores",
                        functools.partial(caption_scores, meteor=False, spice=False, tokenizer="python"))


def test_vqav2(tmp_path):
    root, images = tb.write_vqav2(tmp_path / "vqav2")
    vlm = ScriptedVLM(by_question({"color": "Red.", "How many": "two", "raining": "yes"}))
    out = tmp_path / "out"
    res = run_task(vlm, "vqav2", str(root), images=str(images), output=out)
    # red: 10/10 -> 1; "two" -> "2": 6 of 10 humans -> 1; "yes": 2 of 10 -> 0.6
    assert res["metrics"]["accuracy"] == pytest.approx((1 + 1 + 0.6) / 3)
    assert res["categories"]["answer_type"]["yes/no"]["accuracy"] == pytest.approx(0.6)
    assert res["categories"]["answer_type"]["number"] == {"n": 1, "accuracy": 1.0}
    assert set(res["categories"]["question_type"]) == {"what color is the", "how many", "is it"}
    imgs, msgs = vlm.asked[0]
    assert msgs[-1]["content"] == "<image>\nWhat color is the square?\nAnswer the question using a single word or phrase."
    assert colour(imgs[0]) == tb.COLOURS[0]
    rows = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["9000", "25000", "42000"] and rows[0]["answer"] == "Red."
    assert json.loads((out / "results.json").read_text())["metrics"] == res["metrics"]
    assert (out / "results.png").stat().st_size > 1000
    assert "answer_type" in format_table(res) and "86.67" in format_table(res)

    # A rerun asks nothing again and scores the same; a partial file is completed.
    again = ScriptedVLM(vlm.rule)
    assert run_task(again, "vqav2", str(root), images=str(images), output=out)["metrics"] == res["metrics"]
    assert again.asked == []
    (out / "answers.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:1]) + '\n{"id": "25000", "ans')
    third = ScriptedVLM(vlm.rule)
    assert run_task(third, "vqav2", str(root), images=str(images), output=out)["metrics"] == res["metrics"]
    assert len(third.asked) == 2
    with pytest.raises(EvaluationSetupError, match="other settings"):
        run_task(vlm, "vqav2", str(root), images=str(images), output=out, prompt="{question}")


def test_vqav2_limit_and_missing_annotations(tmp_path):
    root, images = tb.write_vqav2(tmp_path / "vqav2")
    res = run_task(ScriptedVLM(lambda t, i: "red"), "vqav2", str(root), images=str(images), limit=1)
    assert res["n_items"] == 1 and res["metrics"]["accuracy"] == 1.0
    (root / "v2_mscoco_val2014_annotations.json").unlink()  # test-dev: answers only
    res = run_task(ScriptedVLM(lambda t, i: "red"), "vqav2", str(root), images=str(images))
    assert res["n_answered"] == 3 and res["n_scored"] == 0 and res["metrics"] == {}


def test_gqa_textvqa_vizwiz(tmp_path):
    path, images = tb.write_gqa(tmp_path / "gqa")
    res = run_task(ScriptedVLM(by_question({"sky": "Yes", "animal": "dog"})), "gqa", str(path), images=str(images))
    assert res["metrics"]["accuracy"] == 0.5
    assert res["categories"]["structural"]["verify"]["accuracy"] == 1.0
    assert res["categories"]["structural"]["query"]["accuracy"] == 0.0

    path, images = tb.write_textvqa(tmp_path / "textvqa")
    res = run_task(ScriptedVLM(by_question({"brand": "Nokia", "say": "stop"})), "textvqa", str(path),
                   images=str(images))
    assert res["metrics"]["accuracy"] == pytest.approx((1.0 + 0.9) / 2)  # "stop": 3 of 10 humans

    path, images = tb.write_vizwiz(tmp_path / "vizwiz")
    vlm = ScriptedVLM(by_question({"What is this": "milk", "shirt": "Unanswerable"}))
    res = run_task(vlm, "vizwiz", str(path), images=str(images))
    assert res["metrics"]["accuracy"] == 1.0  # 8 of 10 humans said unanswerable
    assert res["metrics"]["unanswerable_precision"] == 1.0 and res["metrics"]["unanswerable_recall"] == 1.0
    assert res["categories"]["answer_type"]["unanswerable"]["n"] == 1
    assert "respond with 'Unanswerable'" in vlm.asked[0][1][-1]["content"]


def test_pope_per_split(tmp_path):
    root, images = tb.write_pope(tmp_path / "pope")
    vlm = ScriptedVLM(lambda text, imgs: "Yes, there is." if "thing 0" in text else "No.")
    res = run_task(vlm, "pope", str(root), images=str(images))
    rnd = res["categories"]["split"]["random"]  # labels yes no no yes, predictions yes no no no
    assert rnd["n"] == 4 and rnd["accuracy"] == 0.75 and rnd["precision"] == 1.0 and rnd["recall"] == 0.5
    assert rnd["f1"] == pytest.approx(2 / 3) and rnd["yes_ratio"] == 0.25
    assert res["categories"]["split"]["adversarial"]["accuracy"] == 1.0
    assert res["metrics"]["accuracy"] == pytest.approx(5 / 6)


def test_mmbench_circular(tmp_path):
    path = tb.write_mmbench(tmp_path / "mmb")

    def rule(text, imgs):
        for line in text.splitlines():  # picks "red" wherever the rotation put it; otherwise always "A"
            if line.endswith(". red"):
                return line[0]
        return "A"

    vlm = ScriptedVLM(rule)
    res = run_task(vlm, "mmbench", str(path))
    assert res["n_items"] == 5  # 3 rounds + 2 rounds
    # question 0: right in every round; question 1 (answer B = square): "A" is right only in round 1
    assert res["metrics"] == {"circular_accuracy": 0.5, "accuracy": 0.5}
    assert res["categories"]["category"]["attribute_recognition"]["circular_accuracy"] == 1.0
    prompts = [m[-1]["content"] for _, m in vlm.asked]
    assert prompts[1].endswith("A. green\nB. blue\nC. red\nAnswer with the option's letter from the given choices directly.")
    assert prompts[3].startswith("<image>\nLook closely.\nWhich shape?\nA. circle\nB. square")
    assert colour(vlm.asked[3][0][0]) == tb.COLOURS[0]  # row 1 reuses row 0's image
    res = run_task(ScriptedVLM(rule), "mmbench", str(path), options={"circular": False})
    assert res["n_items"] == 2 and res["metrics"]["accuracy"] == 0.5


def test_scienceqa_img(tmp_path):
    path, images = tb.write_scienceqa(tmp_path / "sqa")
    vlm = ScriptedVLM(lambda text, imgs: "B")
    res = run_task(vlm, "scienceqa", str(path), images=str(images))
    assert res["n_items"] == 2  # test split, with an image
    assert res["metrics"]["accuracy"] == 0.5
    assert res["categories"]["subject"]["natural science"]["accuracy"] == 1.0
    assert res["categories"]["grade"]["G7-12"]["accuracy"] == 0.0
    assert "Context: This is France.\nWhat is the capital?\nA. Paris\nB. Rome" in vlm.asked[1][1][-1]["content"]
    res = run_task(vlm, "scienceqa", str(path.parent), options={"split": "train"})
    assert res["n_items"] == 1


def test_mme_scores(tmp_path):
    root = tb.write_mme(tmp_path / "MME_Benchmark_release_version")
    vlm = ScriptedVLM(lambda text, imgs: "No" if "Monet" in text else "Yes")
    res = run_task(vlm, "mme", str(root))
    cats = res["categories"]["category"]
    assert cats["artwork"] == {"n": 2, "acc": 1.0, "acc_plus": 1.0, "score": 200.0}
    assert cats["code_reasoning"]["acc"] == 0.5 and cats["code_reasoning"]["acc_plus"] == 0.0
    assert res["metrics"]["perception"] == 200.0 and res["metrics"]["cognition"] == 50.0
    assert "200.00" in format_table(res)


def test_captions(tmp_path):
    path, images = tb.write_coco_captions(tmp_path / "coco")
    good = ScriptedVLM(lambda text, imgs: "a red square" if colour(imgs[0]) == tb.COLOURS[0] else "a green square")
    res = run_task(good, "coco", str(path), images=str(images))
    assert set(res["metrics"]) == {"BLEU-4", "CIDEr"}
    assert good.asked[0][1][-1]["content"] == "<image>\nProvide a one-sentence caption for the provided image."
    bad = run_task(ScriptedVLM(lambda t, i: "a blue circle"), "coco", str(path), images=str(images))
    assert res["metrics"]["CIDEr"] > bad["metrics"]["CIDEr"]

    path, images = tb.write_coco_captions(tmp_path / "nocaps", domain=True)
    res = run_task(good, "nocaps", str(path), images=str(images))
    assert set(res["categories"]["domain"]) == {"in-domain", "out-domain"}

    karpathy, token, images = tb.write_flickr30k(tmp_path / "flickr")
    assert run_task(good, "flickr30k", str(karpathy), images=str(images))["n_items"] == 1  # the test split
    assert run_task(good, "flickr30k", str(token), images=str(images))["n_items"] == 2


def test_docvqa_chartqa(tmp_path):
    path = tb.write_docvqa(tmp_path / "docvqa" / "val")
    res = run_task(ScriptedVLM(by_question({"date": "1/8/93", "title": "Annual Reprt"})), "docvqa", str(path))
    assert res["metrics"]["anls"] == pytest.approx((1.0 + (1 - 1 / 13)) / 2)
    assert res["categories"]["question_type"]["layout"]["n"] == 2
    assert res["categories"]["question_type"]["free_text"]["anls"] == pytest.approx(1 - 1 / 13)

    test = tb.write_chartqa(tmp_path / "chartqa")
    vlm = ScriptedVLM(by_question({"peak": "20.9", "year": "2019", "colour": "red"}))
    res = run_task(vlm, "chartqa", str(test))
    assert res["metrics"]["relaxed_accuracy"] == pytest.approx(2 / 3)
    assert res["categories"]["source"]["human"]["relaxed_accuracy"] == 1.0
    assert res["categories"]["source"]["augmented"]["relaxed_accuracy"] == 0.5


def test_bad_image_is_skipped_and_counted(tmp_path):
    root, images = tb.write_vqav2(tmp_path / "vqav2")
    (images / "COCO_val2014_000000000025.jpg").write_bytes(b"not an image")
    res = run_task(ScriptedVLM(lambda t, i: "red"), "vqav2", str(root), images=str(images), output=tmp_path / "o")
    assert res["n_answered"] == 2 and res["skipped"] == {"bad_image": 1}
    assert "COCO_val2014_000000000025.jpg" in res["skipped_examples"][0]


def test_format_errors_name_the_file(tmp_path):
    root, images = tb.write_vqav2(tmp_path / "vqav2")
    q = root / "v2_OpenEnded_mscoco_val2014_questions.json"
    q.write_text(json.dumps({"info": {}}))
    with pytest.raises(BenchmarkFormatError, match="questions.json: missing key 'questions'"):
        run_task(ScriptedVLM(str), "vqav2", str(root))
    bad = tmp_path / "bad.tsv"
    bad.write_text("index\tquestion\n0\tq\n")
    with pytest.raises(BenchmarkFormatError, match="bad.tsv: no 'A' column"):
        run_task(ScriptedVLM(str), "mmbench", str(bad))


def test_cli_user_mistakes_exit_2(tmp_path, capsys):
    from qwenvl_lab.core.cli import run_cli

    def cli_main(argv):
        return run_cli(evaluation_main, argv)

    assert cli_main(["--model", "x", "--task", "nope", "--data", "d", "--output", "o"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert cli_main(["--model", str(tmp_path), "--task", "vqav2", "--data", "d", "--output", "o"]) == 2
    assert "holds no model" in capsys.readouterr().err
    assert cli_main(["--task", "vqav2"]) == 2
    assert cli_main(["--list-tasks"]) == 0
    assert "mmbench" in capsys.readouterr().out
