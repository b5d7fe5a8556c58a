"""lmms-eval runs our model offline on local task definitions (YAML) over a fixture dataset.

The fixture's reference answers are made from the model's own answers (right for some documents, wrong for
the others), so lmms-eval's score is known exactly only if it asked our model the same questions and got
the same answers: exact match for generation, accuracy for multiple choice by log-likelihood.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import textwrap

import pytest
import torch

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (optional extra: pip install '.[lmms]')")

from PIL import Image  # noqa: E402

from evaluation import lmms_eval as launcher  # noqa: E402
from evaluation.likelihood import reply_logprobs  # noqa: E402
from tests import tiny_bench as tb  # noqa: E402
from tests.tiny_model import build_tiny_vlm, randomize_  # noqa: E402

COLOURS = ["red", "green", "blue", "yellow"]

UTILS = textwrap.dedent('''
    from PIL import Image


    def doc_to_visual(doc):
        return [Image.open(doc["image"]).convert("RGB")]


    def doc_to_text(doc, lmms_eval_specific_kwargs=None):
        return doc["question"]


    def doc_to_messages(doc, lmms_eval_specific_kwargs=None):
        # For lmms-eval's chat models (llava_hf): the image, then the question on a new line, as our model sees it.
        return [{"role": "user", "content": [{"type": "image", "url": doc_to_visual(doc)[0]},
                                             {"type": "text", "text": "\\n" + doc["question"]}]}]


    def doc_to_choice(doc):
        return ["red", "green", "blue", "yellow"]


    def process_results(doc, results):
        return {"exact_match": float(results[0].strip() == doc["answer"])}
''')

GEN_TASK = """
task: qvl_fixture_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_messages: !function utils.doc_to_messages
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 4
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

MC_TASK = """
task: qvl_fixture_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_choice: !function utils.doc_to_choice
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def _fixture(tmp_path, vlm):
    docs = []
    for k in range(5):
        path = tb.png(tmp_path / "images" / f"{k}.png", tb.COLOURS[k % 4])
        docs.append({"image": str(path), "question": f"What colour is picture {k}?"})
    convs = [([Image.open(d["image"]).convert("RGB")], [{"role": "user", "content": "<image>\n" + d["question"]}])
             for d in docs]
    own = vlm.chat_batch(convs, max_new_tokens=4, do_sample=False)
    for k, (d, (imgs, msgs), ans) in enumerate(zip(docs, convs, own)):
        means = [s / n for s, n, _ in reply_logprobs(vlm, imgs, msgs, COLOURS)]
        best = max(range(4), key=lambda i: means[i])  # lmms-eval picks the smallest loss = the largest mean
        right = k % 2 == 0  # documents 0, 2, 4 get the model's own answer as the reference
        d["answer"] = ans.strip() if right else "zzz"
        d["label"] = best if right else (best + 1) % 4
    data = tmp_path / "fixture.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "utils.py").write_text(UTILS)
    (tasks / "qvl_fixture_gen.yaml").write_text(GEN_TASK.format(data=data))
    (tasks / "qvl_fixture_mc.yaml").write_text(MC_TASK.format(data=data))
    return tasks


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny saved model, the fixture tasks, and offline Hugging Face settings for the module."""
    tmp = tmp_path_factory.mktemp("lmms")
    with pytest.MonkeyPatch.context() as mp:
        for var, value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("HF_HOME", str(tmp / "hf")),
                           ("HF_DATASETS_CACHE", str(tmp / "hf" / "datasets"))):
            mp.setenv(var, value)
        torch.manual_seed(0)
        vlm = build_tiny_vlm(tmp / "parts")
        randomize_(vlm, seed=1)
        vlm.eval().save_pretrained(tmp / "model")
        yield tmp, vlm, _fixture(tmp, vlm)


@pytest.mark.slow
def test_lmms_eval_cli_runs_our_model_offline(setup, monkeypatch):
    """One lmms-eval command with `--model qwenvl_lab`. Slow (about 30-70 s here) because lmms-eval's CLI
    indexes its ~340 built-in task folders before it reads ours; the model work is a few seconds."""
    tmp, _, tasks = setup
    out = tmp / "out"
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # the launcher hands lmms-eval its own argv
    rc = launcher.main(["--model", "qwenvl_lab", "--model_args", f"pretrained={tmp / 'model'}",
                        "--tasks", "qvl_fixture_gen,qvl_fixture_mc", "--include_path", str(tasks),
                        "--batch_size", "2", "--output_path", str(out), "--log_samples"])
    assert rc == 0
    found = glob.glob(os.path.join(out, "**", "*_results.json"), recursive=True)
    assert len(found) == 1, found
    results = json.loads(open(found[0]).read())["results"]
    assert results["qvl_fixture_gen"]["exact_match,none"] == pytest.approx(3 / 5)
    assert results["qvl_fixture_mc"]["acc,none"] == pytest.approx(3 / 5)


def test_llava_hf_export_runs_in_lmms_eval(setup):
    """Our llava-hf export through lmms-eval's own `llava_hf` model gives our model's answers (lmms-eval's
    Python API with only our task indexed; `device_map=cpu` because its default "" is refused by transformers)."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from model.export import export_llava_hf

    tmp, vlm, tasks = setup
    export_llava_hf(vlm, tmp / "llava")
    res = simple_evaluate(model="llava_hf", model_args=f"pretrained={tmp / 'llava'},dtype=float32,device_map=cpu",
                          tasks=["qvl_fixture_gen"], task_manager=TaskManager("WARNING", include_path=str(tasks),
                                                                               include_defaults=False),
                          batch_size=1, device="cpu")
    assert res["results"]["qvl_fixture_gen"]["exact_match,none"] == pytest.approx(3 / 5)


def test_launcher_registers_model_and_says_when_missing(monkeypatch, capsys):
    launcher.register()
    from lmms_eval.models import get_model

    assert get_model("qwenvl_lab").__name__ == "QwenVLLab"
    monkeypatch.setitem(sys.modules, "lmms_eval", None)  # as if not installed
    from trainer.cli import run_cli

    assert run_cli(launcher.main, ["--model", "qwenvl_lab"]) == 2
    assert "lmms-eval is not installed" in capsys.readouterr().err
