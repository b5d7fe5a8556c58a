"""Every entry point answers the expected user mistakes with one line `error: ...` naming the file, key or
sample, exit status 2 and no traceback. Each mistake runs as the user would: its own subprocess.

Mistakes (per the entry point): a missing, unreadable or non-image file; a data file that is not JSON /
JSONL or not UTF-8; a missing model directory, or one holding no model; a hub name while offline; a data
set with no usable sample; an output directory that cannot be written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from tests.tiny_model import build_tiny_vlm
from tests.tiny_train import make_tiny_data, tiny_model_section

ROOT = Path(__file__).resolve().parents[1]
HUB_ID = "some-org/some-model-that-is-not-cached"


def _run(args: list[str], stdin: str | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", QWENVL_DEBUG="")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, input=stdin, capture_output=True,
                          text=True, timeout=timeout)


def _check_all(cases: dict[str, tuple[list[str], list[str]]], stdin: dict | None = None) -> None:
    """cases: name -> (command line, strings the error must contain). Runs them two at a time."""
    with ThreadPoolExecutor(2) as pool:
        procs = dict(zip(cases, pool.map(lambda c: _run(c[0], (stdin or {}).get(c[1])),
                                         [(args, name) for name, (args, _) in cases.items()])))
    problems = []
    for name, (_, needles) in cases.items():
        p = procs[name]
        err = p.stderr.strip()
        last = err.splitlines()[-1] if err else ""
        if p.returncode != 2 or "Traceback" in err or not last.startswith("error: ") or \
                not all(n in last for n in needles):
            problems.append(f"{name}: exit {p.returncode}, wanted 2 and one line with {needles}; stderr tail:\n"
                            f"{err[-1500:]}")
    assert not problems, "\n\n".join(problems)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("mistakes")
    (d / "not_json.jsonl").write_text('{"messages": [\n')
    (d / "not_json.json").write_text('[{"messages": [}')
    (d / "latin1.jsonl").write_bytes('{"id": "caf\xe9"}\n'.encode("latin-1"))
    (d / "not_image.png").write_text("this is text, not a PNG")
    (d / "a_file").write_text("a file where a directory should be")
    (d / "no_model").mkdir()
    (d / "no_model" / "readme.txt").write_text("nothing here")
    (d / "not_a_list.json").write_text('{"a": 1}')
    (d / "questions.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    return d


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    build_tiny_vlm(d, tower="clip").save_pretrained(d / "saved")
    return d / "saved"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_data(tmp_path_factory.mktemp("shapes"))


def _train_config(tmp: Path, data: Path, name: str, **overrides) -> tuple[str, Path]:
    cfg = {"model": tiny_model_section(data), "data_path": [str(data / "train.jsonl")], "image_folder": str(data),
           "max_length": 160, "stage": "full", "max_steps": 1, "report_to": [], "precision": "fp32",
           "output_dir": str(tmp / f"run_{name}")}
    cfg.update(overrides)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path), Path(cfg["output_dir"])


def test_train_py(tmp_path, files, data):
    configs = {
        "missing data file": ({"data_path": [str(files / "missing.jsonl")]}, ["missing.jsonl", "not found"]),
        "data not JSON": ({"data_path": [str(files / "not_json.json")]}, ["not_json.json", "invalid JSON"]),
        "data not UTF-8": ({"data_path": [str(files / "latin1.jsonl")]}, ["latin1.jsonl", "UTF-8"]),
        "every sample too long": ({"max_length": 20}, ["no usable sample", "too_long", "longest sample has",
                                                       "max_length", "frames_per_video"]),
        "image folder missing": ({"image_folder": str(files / "no_images")}, ["image_folder", "no_images"]),
        "output_dir unwritable": ({"output_dir": str(files / "a_file" / "run")}, ["output_dir", "a_file"]),
        "hub name offline": ({"model": dict(tiny_model_section(data), lm=HUB_ID, lm_backend="hf", tokenizer=None)},
                             [HUB_ID, "HF_HUB_OFFLINE", "--local-dir"]),
        "init_from missing": ({"init_from": str(files / "nowhere")}, ["nowhere", "does not exist"]),
    }
    cases, outs = {}, {}
    for name, (over, needles) in configs.items():
        path, out = _train_config(tmp_path, data, name.replace(" ", "_"), **over)
        cases[name], outs[name] = (["train.py", path], needles), out
    cases["unknown key"] = (["train.py", _train_config(tmp_path, data, "k")[0], "learning_rat=1"], ["learning_rat"])
    _check_all(cases)
    left = [n for n, out in outs.items() if out.exists()]
    assert not left, f"runs that failed before their first step left their output_dir: {left}"


def test_test_py(tmp_path, files, model_dir):
    img = files / "not_image.png"
    cases = {
        "missing image": (["test.py", "--model", str(model_dir), "--image", str(files / "nope.png"), "--prompt", "q"],
                          ["nope.png", "not found"]),
        "not an image": (["test.py", "--model", str(model_dir), "--image", str(img), "--prompt", "q"],
                         ["not_image.png", "not a readable image"]),
        "missing model dir": (["test.py", "--model", str(files / "nowhere"), "--prompt", "q"],
                              ["nowhere", "does not exist"]),
        "dir without a model": (["test.py", "--model", str(files / "no_model"), "--prompt", "q"],
                                ["no_model", "holds no model"]),
        "hub name offline": (["test.py", "--model_weights", str(model_dir), "--base_language_model", HUB_ID,
                              "--prompt", "q"], [HUB_ID, "HF_HUB_OFFLINE"]),
        "input not JSON": (["test.py", "--model", str(model_dir), "--input", str(files / "not_json.json"),
                            "--output", str(tmp_path / "a.jsonl")], ["not_json.json", "invalid JSON"]),
        "output unwritable": (["test.py", "--model", str(model_dir), "--input", str(files / "questions.jsonl"),
                               "--output", str(files / "a_file" / "a.jsonl")], ["--output", "a_file"]),
    }
    _check_all(cases)


def test_chat_reports_a_bad_image_and_goes_on(files, model_dir):
    p = _run(["test.py", "--model", str(model_dir), "--max-new-tokens", "2"],
             stdin=f"/image {files / 'nope.png'}\nhello\n\n")
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "error: " in p.stderr and "nope.png" in p.stderr
    assert p.stdout.count("assistant>") == 1  # the chat went on and answered the next question


def test_model_tools_and_evaluation(tmp_path, files, model_dir):
    cases = {
        "merge: missing src": (["-m", "qwenvl_lab.model.merge", "--src", str(files / "nowhere"), "--dst", str(tmp_path / "m")],
                               ["nowhere", "does not exist"]),
        "merge: no model": (["-m", "qwenvl_lab.model.merge", "--src", str(files / "no_model"), "--dst", str(tmp_path / "m")],
                            ["no_model", "holds no model"]),
        "merge: dst unwritable": (["-m", "qwenvl_lab.model.merge", "--src", str(model_dir), "--dst", str(files / "a_file" / "m")],
                                  ["--dst", "a_file"]),
        "export: missing src": (["-m", "qwenvl_lab.model.export", "--src", str(files / "nowhere"), "--dst", str(tmp_path / "e")],
                                ["nowhere", "does not exist"]),
        "evaluate: missing model": (["-m", "qwenvl_lab.trainer.evaluate", "--model", str(files / "nowhere"), "--data", "x.jsonl"],
                                    ["nowhere", "does not exist"]),
        "evaluate: data not JSON": (["-m", "qwenvl_lab.trainer.evaluate", "--model", str(model_dir), "--data",
                                     str(files / "not_json.json"), "--output", str(tmp_path / "e.jsonl")],
                                    ["not_json.json", "invalid JSON"]),
        "evaluation: missing model": (["-m", "qwenvl_lab.evaluation", "--model", str(files / "nowhere"), "--task", "vqav2",
                                       "--data", "d", "--output", str(tmp_path / "ev")], ["nowhere", "does not exist"]),
        "evaluation: unknown task": (["-m", "qwenvl_lab.evaluation", "--model", str(model_dir), "--task", "vqa3", "--data", "d",
                                      "--output", str(tmp_path / "ev")], ["vqa3"]),
        "serve: missing model": (["-m", "qwenvl_lab.serve", "--model", str(files / "nowhere")], ["nowhere", "does not exist"]),
        "serve: bad cache flag": (["-m", "qwenvl_lab.serve", "--model", str(model_dir), "--prefill-chunk", "0"],
                                  ["--prefill-chunk", ">= 1"]),
        "serve.web: no model": (["-m", "qwenvl_lab.serve.web", "--model", str(files / "no_model")], ["no_model", "holds no model"]),
        "plan: unknown key": (["-m", "qwenvl_lab.model.plan", "configs/qwen7b_siglip_lora.yaml", "lora.rr=1", "--gpus", "1",
                               "--gpu-mem", "80"], ["lora.rr"]),
    }
    _check_all(cases)


def test_dataprocess_commands(tmp_path, files, model_dir):
    out = str(tmp_path / "o.jsonl")
    cases = {
        "coco: missing file": (["-m", "qwenvl_lab.dataprocess.coco_captions", str(files / "nope.json"), out], ["nope.json"]),
        "coco: not JSON": (["-m", "qwenvl_lab.dataprocess.coco_captions", str(files / "not_json.json"), out],
                           ["not_json.json", "invalid JSON"]),
        "coco: not UTF-8": (["-m", "qwenvl_lab.dataprocess.coco_captions", str(files / "latin1.jsonl"), out],
                            ["latin1.jsonl", "UTF-8"]),
        "coco: output unwritable": (["-m", "qwenvl_lab.dataprocess.coco_captions", str(_coco(tmp_path)),
                                     str(files / "a_file" / "o.jsonl")], ["a_file", "cannot be written"]),
        "llava: not a list": (["-m", "qwenvl_lab.dataprocess.llava_instruct", str(files / "not_a_list.json"), out],
                              ["not_a_list.json", "list"]),
        "ai_challenger: missing": (["-m", "qwenvl_lab.dataprocess.ai_challenger", str(files / "nope.json"), out], ["nope.json"]),
        "image_map: missing": (["-m", "qwenvl_lab.dataprocess.image_map", str(files / "nope.tsv"), str(files / "nope.json"), out],
                               ["nope.tsv"]),
        "process_image: no folder": (["-m", "qwenvl_lab.dataprocess.process_image", str(files / "nope_dir"),
                                      str(tmp_path / "cache")], ["nope_dir"]),
        "make_vocab: missing data": (["-m", "qwenvl_lab.dataprocess.make_vocab", "--data", str(files / "nope.jsonl"), "--out",
                                      str(tmp_path / "v")], ["nope.jsonl"]),
        "make_shapes: unwritable": (["-m", "qwenvl_lab.dataprocess.make_shapes", str(files / "a_file" / "s"), "--n-train", "2",
                                     "--n-val", "1"], ["a_file"]),
        "cache_features: no model": (["-m", "qwenvl_lab.dataprocess.cache_features", "--model", str(files / "nowhere"), "--data",
                                      out, "--out", str(tmp_path / "c")], ["nowhere", "does not exist"]),
    }
    _check_all(cases)


def _coco(tmp: Path) -> Path:
    p = tmp / "captions.json"
    p.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}],
                             "annotations": [{"image_id": 1, "caption": "A cat."}]}))
    return p


def test_train_sh_with_several_processes_answers_a_config_mistake_once(tmp_path, data):
    """NPROC=2: the config is checked once before torchrun starts (not by each rank, then torchrun's trace)."""
    path, _ = _train_config(tmp_path, data, "ddp")
    env = dict(os.environ, NPROC="2", PY=sys.executable, HF_HUB_OFFLINE="1", QWENVL_DEBUG="")
    p = subprocess.run(["sh", "train.sh", path, "global_batch_size=7"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=240)
    err = p.stderr.strip()
    assert p.returncode == 2 and "Traceback" not in err and "torch.distributed" not in err, err[-1500:]
    assert [line for line in err.splitlines() if line.startswith("error: ")] == [err.splitlines()[-1]]
    assert "global_batch_size=7" in err and "2 process(es)" in err
