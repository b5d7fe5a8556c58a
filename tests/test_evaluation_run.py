"""`python -m qwenvl_lab.evaluation` with a real tiny VLM: the command line, determinism, likelihood scoring, the
demo's VQAv2 pair agreeing with `trainer.evaluate`'s exact match (its images found without --images), and
the planted failures of the command line and of `evaluation.to_vqav2` (one line, exit status 2)."""

import json

import pytest
import torch
from qwenvl_lab.core.cli import run_cli
from qwenvl_lab.dataprocess.make_shapes import make_shapes
from qwenvl_lab.evaluation import to_vqav2
from qwenvl_lab.evaluation.__main__ import main as cli_main
from qwenvl_lab.evaluation.likelihood import rank_options, reply_logprobs
from qwenvl_lab.evaluation.runner import read_answers, run_task
from qwenvl_lab.evaluation.tasks.vqa import score_vqa
from qwenvl_lab.evaluation.to_vqav2 import convert
from qwenvl_lab.trainer import evaluate as trainer_eval

from tests import tiny_bench as tb
from tests.tiny_model import build_tiny_vlm, randomize_


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_vlm")
    torch.manual_seed(0)
    vlm = build_tiny_vlm(d)
    randomize_(vlm, seed=1)  # varied answers, so equal answers mean equal computation
    vlm.save_pretrained(d / "model")
    return vlm.eval(), d / "model"


def test_cli_end_to_end_resume_and_determinism(tiny, tmp_path, capsys):
    _, model_dir = tiny
    root, images = tb.write_vqav2(tmp_path / "vqav2")
    args = ["--model", str(model_dir), "--task", "vqav2", "--data", str(root), "--images", str(images),
            "--max-new-tokens", "4"]
    out = tmp_path / "a"
    assert cli_main(args + ["--output", str(out), "--batch-size", "2"]) == 0
    printed = capsys.readouterr().out
    assert "vqav2: 3 scored of 3" in printed and "answer_type" in printed
    first = read_answers(out / "answers.jsonl")
    assert len(first) == 3 and all(isinstance(a, str) for a in first.values())
    assert json.loads((out / "results.json").read_text())["n_scored"] == 3
    assert cli_main(args + ["--output", str(out), "--batch-size", "2"]) == 0  # resume: nothing new
    assert len((out / "answers.jsonl").read_text().splitlines()) == 3
    vlm, _ = tiny  # the same weights in memory, one question at a time
    run_task(vlm, "vqav2", str(root), images=str(images), output=tmp_path / "b", batch_size=1, max_new_tokens=4,
             progress=False)
    assert read_answers(tmp_path / "b" / "answers.jsonl") == first  # batched == one by one, every run


def test_likelihood_matches_teacher_forcing(tiny):
    vlm, _ = tiny
    from PIL import Image

    img = Image.new("RGB", (8, 8), (200, 30, 10))
    msgs = [{"role": "user", "content": "<image>\nWhich colour?\nA. red\nB. dark green"}]
    options = ["red", "dark green", "a much longer option text"]
    got = reply_logprobs(vlm, [img], msgs, options)  # one padded batch
    for opt, (total, n, _) in zip(options, got):
        full = vlm.chat_ids(msgs + [{"role": "assistant", "content": opt}], 1)
        base = vlm.chat_ids(msgs, 1)
        ids = torch.tensor([full])
        with torch.no_grad():
            logits = vlm(input_ids=ids, pixel_values=vlm.image_processor([img]), return_logits=True).logits[0]
        lp = torch.log_softmax(logits.float(), dim=-1)
        want = sum(lp[p - 1, full[p]].item() for p in range(len(base), len(base) + n))  # reply + end of turn
        assert total == pytest.approx(want, abs=1e-3)
        assert full[len(base) + n - 1] in vlm.stop_token_ids  # the scored span ends with the end-of-turn token
    means = [t / n for t, n, _ in got]
    assert rank_options(vlm, [img], msgs, options) == max(range(3), key=lambda i: means[i])


def test_mmbench_likelihood_mode(tiny, tmp_path):
    vlm, _ = tiny
    path = tb.write_mmbench(tmp_path / "mmb")
    res = run_task(vlm, "mmbench", str(path), mc_mode="likelihood", output=tmp_path / "o", progress=False)
    answers = read_answers(tmp_path / "o" / "answers.jsonl")
    assert len(answers) == 5 and set(answers.values()) <= {"A", "B", "C"}
    assert res["mc_mode"] == "likelihood" and 0.0 <= res["metrics"]["circular_accuracy"] <= 1.0


def test_demo_vqa_accuracy_agrees_with_trainer_evaluate(tiny, tmp_path):
    """The shapes validation set as a VQAv2 pair: the same answers as trainer.evaluate, and VQA accuracy equal
    to its exact match, on the model's answers and on answers that are partly right."""
    vlm, _ = tiny
    data = tmp_path / "shapes"
    make_shapes(data, n_train=0, n_val=10, seed=0, size=32)
    rows_path = tmp_path / "te.jsonl"
    trainer_eval.answer_file(vlm, str(data / "val.jsonl"), str(rows_path), str(data), batch_size=4, max_new_tokens=4)
    te_rows = {r["id"]: r for r in map(json.loads, rows_path.read_text().splitlines())}

    rep = convert(str(data / "val.jsonl"), tmp_path / "vqav2", image_folder=str(data))
    assert rep == {"questions": 8, "skipped": {"not one image": 2}}  # the 2 two-image ("multi") samples
    res = run_task(vlm, "vqav2", str(tmp_path / "vqav2"),  # no images: to_vqav2's images/ is the default
                   output=tmp_path / "ev", prompt="{question}", max_new_tokens=4, batch_size=3, progress=False)
    ann = json.loads((tmp_path / "vqav2" / "annotations.json").read_text())["annotations"]
    source = {str(a["question_id"]): a["source_id"] for a in ann}
    ours = read_answers(tmp_path / "ev" / "answers.jsonl")
    assert {source[q]: a for q, a in ours.items()} == {s: te_rows[s]["answer"] for s in source.values()}
    kept = [te_rows[s] for s in source.values()]
    correct, total = trainer_eval.score(kept)["all"]
    assert res["metrics"]["accuracy"] == pytest.approx(correct / total)
    assert set(res["categories"]["question_type"]) == {"colour", "shape", "count", "position"}

    # The same comparison on answers that are right for some samples ("Red." style) and wrong for others.
    items_answers, mixed = {}, []
    for k, (qid, sid) in enumerate(sorted(source.items())):
        ref = te_rows[sid]["reference"]
        ans = f"{ref.capitalize()}." if k % 3 else "nothing"
        items_answers[qid] = ans
        mixed.append({**te_rows[sid], "answer": ans})
    from qwenvl_lab.evaluation.tasks.vqa import load_vqav2

    items = load_vqav2(str(tmp_path / "vqav2"), None, {})
    correct, total = trainer_eval.score(mixed)["all"]
    assert 0 < correct < total
    assert score_vqa(items, items_answers)["metrics"]["accuracy"] == pytest.approx(correct / total)


def _error_line(capsys) -> str:
    """The last line on stderr (progress bars come before it), checked to be the one error line."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: ")
    return line


def test_cli_failures_exit_2_with_one_line(tiny, tmp_path, capsys):
    """Planted: every image missing (nothing answered is not a score of 0), an unknown task, a missing data
    file. One image missing of three is skipped and counted, not a failure."""
    _, model_dir = tiny
    root, images = tb.write_vqav2(tmp_path / "vqav2")
    common = ["--model", str(model_dir), "--max-new-tokens", "2"]
    empty = tmp_path / "empty"
    empty.mkdir()
    args = common + ["--task", "vqav2", "--data", str(root), "--images", str(empty), "--output", str(tmp_path / "a")]
    assert run_cli(cli_main, args) == 2
    assert f"none of the 3 vqav2 questions could be answered: 3 images missing from {empty}" in _error_line(capsys)

    args = common + ["--task", "vqav3", "--data", str(root), "--output", str(tmp_path / "b")]
    assert run_cli(cli_main, args) == 2
    assert "unknown task 'vqav3'" in _error_line(capsys)

    absent = tmp_path / "absent_questions.json"
    args = common + ["--task", "vqav2", "--data", str(absent), "--images", str(images), "--output", str(tmp_path / "c")]
    assert run_cli(cli_main, args) == 2
    assert f"{absent}: file not found" in _error_line(capsys)

    first = sorted(images.iterdir())[0]
    first.unlink()
    args = common + ["--task", "vqav2", "--data", str(root), "--images", str(images), "--output", str(tmp_path / "d")]
    assert run_cli(cli_main, args) == 0
    res = json.loads((tmp_path / "d" / "results.json").read_text())
    assert (res["n_scored"], res["skipped"], res["missing_images"]) == (2, {"missing_file": 1}, {str(images): 1})


def test_to_vqav2_failures_exit_2_with_one_line(tmp_path, capsys):
    data = tmp_path / "shapes"
    make_shapes(data, n_train=0, n_val=6, seed=0, size=32)
    assert run_cli(to_vqav2.main, [str(tmp_path / "absent.jsonl"), "--out", str(tmp_path / "a")]) == 2
    assert f"{tmp_path / 'absent.jsonl'}: data file not found" in _error_line(capsys)

    elsewhere = tmp_path / "elsewhere"  # every image missing: no question, no half-written pair
    assert run_cli(to_vqav2.main, [str(data / "val.jsonl"), "--image-folder", str(elsewhere),
                                   "--out", str(tmp_path / "b")]) == 2
    line = _error_line(capsys)
    assert "no sample became a VQAv2 question" in line and "image not found" in line and "--image-folder" in line
    assert not (tmp_path / "b" / "questions.json").exists()
