"""lmms-eval runs our model offline on local task definitions (YAML) over a fixture dataset.

The fixture's reference answers are made from the model's own answers (right for some documents, wrong for
the others), so lmms-eval's score is known exactly only if it asked our model the same questions and got
the same answers: exact match for generation, accuracy for multiple choice by log-likelihood.
The README's command runs in a fresh process; the launcher's failures (planted: unknown task, missing model,
data or image file, a bug in a task) run in this one with only the local tasks indexed.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (optional extra: pip install '.[lmms]')")

from PIL import Image  # noqa: E402
from qwenvl_lab.core.cli import run_cli  # noqa: E402
from qwenvl_lab.core.errors import UserError  # noqa: E402
from qwenvl_lab.evaluation import lmms_eval as launcher  # noqa: E402
from qwenvl_lab.evaluation.likelihood import reply_logprobs  # noqa: E402

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


REPO = Path(__file__).resolve().parents[1]


def _offline_env(tmp) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp / "hf"),
            "HF_DATASETS_CACHE": str(tmp / "hf" / "datasets"), "PYTHONPATH": str(REPO)}


@pytest.mark.slow
def test_lmms_eval_cli_runs_our_model_offline(setup):
    """The README's command in a fresh process (`python -m qwenvl_lab.evaluation.lmms_eval --model qwenvl_lab ...`, i.e.
    lmms-eval's own CLI): nothing imported beforehand, so the model class must load the model by itself. Slow
    (about 30-70 s here) because lmms-eval's CLI indexes its ~340 built-in task folders before it reads ours;
    the model work is a few seconds."""
    tmp, _, tasks = setup
    out = tmp / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "qwenvl_lab.evaluation.lmms_eval", "--model", "qwenvl_lab", "--model_args",
         f"pretrained={tmp / 'model'}", "--tasks", "qvl_fixture_gen,qvl_fixture_mc", "--include_path", str(tasks),
         "--batch_size", "2", "--output_path", str(out), "--log_samples"],
        cwd=REPO, env=_offline_env(tmp), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = glob.glob(os.path.join(out, "**", "*_results.json"), recursive=True)
    assert len(found) == 1, (found, proc.stdout[-3000:], proc.stderr[-3000:])
    results = json.loads(open(found[0]).read())["results"]
    assert results["qvl_fixture_gen"]["exact_match,none"] == pytest.approx(3 / 5)
    assert results["qvl_fixture_mc"]["acc,none"] == pytest.approx(3 / 5)
    table = {line.split("|")[1].strip(): line for line in proc.stdout.splitlines() if line.startswith("|qvl_")}
    assert "|exact_match|" in table["qvl_fixture_gen"] and "|0.6|" in table["qvl_fixture_gen"]  # scores printed
    assert "|acc" in table["qvl_fixture_mc"] and "|0.6|" in table["qvl_fixture_mc"]


@pytest.fixture
def local_tasks_only(monkeypatch):
    """lmms-eval's CLI in this process, indexing only the --include_path tasks (the built-in index is what
    takes 10-60 s); the launcher hands lmms-eval its own argv."""
    import functools

    import lmms_eval.__main__ as lmms_cli

    monkeypatch.setattr(lmms_cli, "TaskManager", functools.partial(lmms_cli.TaskManager, include_defaults=False))
    monkeypatch.setattr(sys, "argv", list(sys.argv))


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err.strip().splitlines()[-1]


def _bad_task(tasks, tmp_path, name: str, data: Path) -> Path:
    """A copy of the generation task named `name`, reading `data`."""
    folder = tmp_path / "bad_tasks"
    folder.mkdir(exist_ok=True)
    shutil.copy(tasks / "utils.py", folder / "utils.py")
    (folder / f"{name}.yaml").write_text(GEN_TASK.format(data=data).replace("qvl_fixture_gen", name))
    return folder


def test_launcher_user_errors_exit_2_with_one_line(setup, local_tasks_only, tmp_path, capsys):
    """Planted mistakes: each is one line and exit status 2 (lmms-eval's CLI alone logs them and exits 0)."""
    tmp, _, tasks = setup
    model = ["--model", "qwenvl_lab", "--model_args", f"pretrained={tmp / 'model'}"]

    assert run_cli(launcher.main, model + ["--tasks", "qvl_no_such_task", "--include_path", str(tasks)]) == 2
    assert "unknown task(s) qvl_no_such_task" in _error_line(capsys)

    missing_model = ["--model", "qwenvl_lab", "--model_args", f"pretrained={tmp / 'no_model'}"]
    assert run_cli(launcher.main, missing_model + ["--tasks", "qvl_fixture_gen", "--include_path", str(tasks)]) == 2
    assert f"model directory {tmp / 'no_model'} does not exist" in _error_line(capsys)

    no_data = _bad_task(tasks, tmp_path, "qvl_no_data", tmp_path / "absent.jsonl")
    assert run_cli(launcher.main, model + ["--tasks", "qvl_no_data", "--include_path", str(no_data)]) == 2
    line = _error_line(capsys)
    assert line.startswith("error: lmms-eval: FileNotFoundError") and "absent.jsonl" in line

    docs = [json.loads(r) for r in (tmp / "fixture.jsonl").read_text().splitlines()]
    moved = tmp_path / "moved.jsonl"
    moved.write_text("".join(json.dumps({**d, "image": str(tmp_path / "gone" / Path(d["image"]).name)}) + "\n"
                             for d in docs))
    no_images = _bad_task(tasks, tmp_path, "qvl_no_images", moved)
    assert run_cli(launcher.main, model + ["--tasks", "qvl_no_images", "--include_path", str(no_images)]) == 2
    assert str(tmp_path / "gone" / "0.png") in _error_line(capsys)

    assert run_cli(launcher.main, model + ["--include_path", str(tasks)]) == 2
    assert "no --tasks given" in _error_line(capsys)


def test_launcher_reraises_a_bug(setup, local_tasks_only, tmp_path):
    """An exception that is no user mistake (here a task's scoring function fails) keeps its traceback and a
    non-zero exit instead of lmms-eval's logged error and exit 0."""
    tmp, _, tasks = setup
    folder = _bad_task(tasks, tmp_path, "qvl_buggy", tmp / "fixture.jsonl")
    utils = (folder / "utils.py").read_text()
    (folder / "utils.py").write_text(utils.replace('    return {"exact_match"', '    1 / 0\n    return {"exact_match"'))
    with pytest.raises(Exception) as info:  # lmms-eval's retries wrap it (tenacity's RetryError from it)
        run_cli(launcher.main, ["--model", "qwenvl_lab", "--model_args", f"pretrained={tmp / 'model'}",
                                "--tasks", "qvl_buggy", "--include_path", str(folder)])
    chain, err = [], info.value
    while err is not None:
        chain.append(type(err))
        err = err.__cause__
    assert ZeroDivisionError in chain and UserError not in chain


def test_run_without_results_is_an_error():
    watch = launcher.RunWatch()
    watch.runs.append(({"results": {}}, None))
    watch.check(rank=0)
    watch.runs.append((None, None))  # lmms-eval returned no results and raised nothing
    watch.check(rank=1)  # other ranks get no results by design
    with pytest.raises(UserError, match="ended without results"):
        watch.check(rank=0)


def test_llava_hf_export_runs_in_lmms_eval(setup, local_tasks_only, tmp_path):
    """Our llava-hf export through lmms-eval's own `llava_hf` model, with the README's CPU flags
    (`device_map=cpu` and `--device cpu`), gives our model's answers."""
    from qwenvl_lab.model.export import export_llava_hf

    tmp, vlm, tasks = setup
    export_llava_hf(vlm, tmp / "llava")
    out = tmp_path / "out"
    rc = run_cli(launcher.main, ["--model", "llava_hf", "--model_args",
                                 f"pretrained={tmp / 'llava'},dtype=float32,device_map=cpu", "--device", "cpu",
                                 "--tasks", "qvl_fixture_gen", "--include_path", str(tasks), "--output_path", str(out)])
    assert rc == 0
    found = glob.glob(os.path.join(out, "**", "*_results.json"), recursive=True)
    results = json.loads(open(found[0]).read())["results"]
    assert results["qvl_fixture_gen"]["exact_match,none"] == pytest.approx(3 / 5)


def test_llava_hf_device_mistakes_are_one_line(setup, monkeypatch, capsys):
    """lmms-eval's `llava_hf` on a CPU without `--device cpu`, or without `device_map`: told before lmms-eval runs."""
    tmp, _, _ = setup
    import torch as torch_mod

    monkeypatch.setattr(torch_mod.cuda, "is_available", lambda: False)
    args = ["--model", "llava_hf", "--tasks", "qvl_fixture_gen", "--model_args", f"pretrained={tmp / 'llava'}"]
    assert run_cli(launcher.main, args) == 2
    assert "no CUDA device; add --device cpu and device_map=cpu to --model_args" in _error_line(capsys)
    assert run_cli(launcher.main, args + ["--device", "cpu"]) == 2
    assert "needs device_map=cpu in --model_args" in _error_line(capsys)


def test_launcher_registers_model_and_says_when_missing(monkeypatch, capsys):
    launcher.register()
    from lmms_eval.models import get_model

    assert get_model("qwenvl_lab").__name__ == "QwenVLLab"
    monkeypatch.setitem(sys.modules, "lmms_eval", None)  # as if not installed
    assert run_cli(launcher.main, ["--model", "qwenvl_lab"]) == 2
    assert "lmms-eval is not installed" in capsys.readouterr().err
