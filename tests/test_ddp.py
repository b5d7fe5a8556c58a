"""Two processes on the CPU (torchrun + gloo, through `NPROC=2 sh train.sh`) against one process.

One run covers three promises at once:
* the same global batch gives the same per-step losses (1e-5) and the same final weights as one process
  (towers frozen: a training tower's batch-norm statistics depend on the per-rank batch);
* a step where one rank's micro-batch has no image (rank 1 gets the two shortest samples of a global
  batch, which are text-only) finishes: the projector still takes part in the graph;
* a bad sample met by rank 1 only (an image whose header reads but whose pixels are corrupt, so the
  pre-scan keeps it) is in rank 0's data_report.json: skip records are gathered from every rank;
* only rank 0 writes into the run directory: every process records the files it opens for writing (a
  `sitecustomize` hook put on PYTHONPATH), and rank 1's list must be empty while rank 0's is not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from qwenvl_lab.trainer.callbacks import read_log
from safetensors.torch import load_file

from tests import tiny_data as td
from tests.tiny_train import make_tiny_data, run_losses, tiny_train_config

ROOT = Path(__file__).resolve().parents[1]

# Records, per process, every path opened for writing / created / renamed; dumped as JSON at exit.
TRACER = r'''
import atexit, builtins, io, json, os

_out = os.environ.get("QWENVL_TRACE_WRITES")
if _out:
    _seen = []
    _open, _io_open, _mkdir, _replace, _rename = builtins.open, io.open, os.mkdir, os.replace, os.rename

    def _note(path, what):
        try:
            _seen.append([what, os.path.abspath(os.fspath(path))])
        except TypeError:
            pass

    def _writes(mode):
        return any(c in str(mode) for c in "wax+")

    def open_(file, mode="r", *a, **k):
        if _writes(mode) and not isinstance(file, int):
            _note(file, "open")
        return _open(file, mode, *a, **k)

    def io_open_(file, mode="r", *a, **k):
        if _writes(mode) and not isinstance(file, int):
            _note(file, "open")
        return _io_open(file, mode, *a, **k)

    def mkdir_(path, *a, **k):
        _note(path, "mkdir")
        return _mkdir(path, *a, **k)

    def replace_(src, dst, *a, **k):
        _note(dst, "replace")
        return _replace(src, dst, *a, **k)

    def rename_(src, dst, *a, **k):
        _note(dst, "rename")
        return _rename(src, dst, *a, **k)

    builtins.open, io.open, os.mkdir, os.replace, os.rename = open_, io_open_, mkdir_, replace_, rename_

    try:
        import safetensors.torch as _st
        _save_file = _st.save_file

        def save_file_(tensors, filename, *a, **k):
            _note(filename, "safetensors")
            return _save_file(tensors, filename, *a, **k)

        _st.save_file = save_file_
    except Exception:
        pass

    @atexit.register
    def _dump():
        who = os.environ.get("RANK", "launcher")
        with _open(os.path.join(_out, f"writes_{who}_{os.getpid()}.json"), "w") as f:
            json.dump(_seen, f)
'''


def _mixed_data(root: Path) -> Path:
    """6 one-image samples, one corrupt-image sample and 5 short text-only ones (lengths in that order, so
    a length-grouped global batch of 4 gives rank 1 the corrupt sample, replaced by the text sample that
    follows it in the file, and a text sample)."""
    data = make_tiny_data(root / "shapes")
    rows = [json.loads(x) for x in (data / "train.jsonl").read_text().splitlines()]
    with_image = [r for r in rows if len(r.get("images", [])) == 1][:6]
    assert len(with_image) == 6
    text = [{"id": f"t{i}", "messages": [{"role": "user", "content": "hi"},
                                         {"role": "assistant", "content": ["red", "blue"][i % 2]}]}
            for i in range(5)]
    td.write_bad_images(data / "bad")
    corrupt = {"id": "corrupt", "images": ["bad/corrupt.jpg"],
               "messages": [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "a"}]}
    path = data / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in with_image + [corrupt] + text))
    return data


def _settings(data: Path) -> dict:
    return dict(data_path=[str(data / "mixed.jsonl")], per_device_train_batch_size=2, global_batch_size=4,
                num_train_epochs=1, max_steps=-1, vision_lr=0.0, learning_rate=1e-2, save_steps=2,
                save_total_limit=1, ddp_timeout=60, group_by_length=True)


def test_two_processes_match_one(tmp_path):
    data = _mixed_data(tmp_path)
    from qwenvl_lab.trainer.run import train

    one = train(tiny_train_config(tmp_path / "one", data, **_settings(data))).output_dir  # GA 2 x batch 2

    cfg = tiny_train_config(tmp_path / "two", data, **_settings(data))  # GA 1 x batch 2 x 2 ranks
    trace = tmp_path / "trace"
    trace.mkdir()
    (trace / "sitecustomize.py").write_text(TRACER)
    env = dict(os.environ, NPROC="2", PY=sys.executable, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               QWENVL_TRACE_WRITES=str(trace),
               PYTHONPATH=os.pathsep.join([str(trace), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(["sh", str(ROOT / "train.sh"), str(tmp_path / "two" / "tiny_config.yaml")], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = Path(cfg.output_dir)

    # Rank 1 really met a batch without any image (the case that hangs without the projector anchor).
    rows = [json.loads(x) for x in (data / "mixed.jsonl").read_text().splitlines()]
    from qwenvl_lab.dataset import LengthGroupedSampler, VLMDataset
    from qwenvl_lab.model import VLM

    vlm = VLM.from_pretrained(one / "final")
    ds = VLMDataset([str(data / "mixed.jsonl")], vlm.tokenizer, vlm.image_processor, vlm.tokens_per_image,
                    image_folder=str(data), max_length=cfg.max_length)
    ds.validate()
    batches = LengthGroupedSampler(ds.lengths, batch_size=4, seed=cfg.seed).global_batches()
    served = [[i + 1 if rows[i]["id"] == "corrupt" else i for i in b] for b in batches]  # the skip's stand-in
    rank1_text_only = [not any(rows[i].get("images") for i in b[2:]) for b in served]
    rank0_has_image = [any(rows[i].get("images") for i in b[:2]) for b in served]
    assert any(a and b for a, b in zip(rank1_text_only, rank0_has_image)), batches
    assert any(rows[i]["id"] == "corrupt" for b in batches for i in b[2:]), batches  # met by rank 1 only
    for run in (one, two):
        report = json.loads((run / "data_report.json").read_text())
        assert [r["id"] for r in report["samples"]] == ["corrupt"], (run, report)

    la, lb = run_losses(one), run_losses(two)
    assert sorted(la) == sorted(lb) == [1, 2, 3], (la, lb)
    for step in la:
        assert abs(la[step] - lb[step]) < 1e-5, (step, la[step], lb[step])
    wa = load_file(str(one / "final" / "model.safetensors"))
    wb = load_file(str(two / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys() and any(k.startswith("projector.") for k in wa)
    worst = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    assert worst < 1e-5, worst

    # Exactly one writer: rank 0 wrote the run directory's files, rank 1 none of them.
    writes: dict[str, list[str]] = {}
    for f in trace.glob("writes_*.json"):
        who = f.name.split("_")[1]
        paths = [p for _, p in json.loads(f.read_text()) if Path(p).is_relative_to(two)]
        writes.setdefault(who, []).extend(paths)
    assert set(writes) >= {"0", "1"}, sorted(writes)
    assert writes["1"] == [], writes["1"][:10]
    rank0 = {Path(p).relative_to(two).parts[0] for p in writes["0"] if Path(p) != two}
    for name in ("config.yaml", "log.jsonl", "final", "data_report.json", "loss.png", "train.log"):
        assert name in rank0, (name, sorted(rank0))
    assert any(p.endswith("rng_state_1.json") for p in writes["0"])  # rank 1's RNG, written by rank 0
    # Each step is logged once, and the checkpoint holds both ranks' RNG states.
    steps = [r["step"] for r in read_log(two / "log.jsonl") if "loss" in r]
    assert steps == [1, 2, 3]
    ckpt = two / "checkpoint-3"
    assert (ckpt / "rng_state_0.json").is_file() and (ckpt / "rng_state_1.json").is_file()
    assert not list(two.glob("*.tmp-*"))


@pytest.mark.parametrize("world,per_device,global_batch,expect", [
    (1, 2, 8, 4), (2, 2, 8, 2), (4, 2, 8, 1), (2, 4, None, 3)])
def test_global_batch_size_sets_accumulation(tmp_path, world, per_device, global_batch, expect):
    data = make_tiny_data(tmp_path / "shapes")
    cfg = tiny_train_config(tmp_path, data, per_device_train_batch_size=per_device,
                            global_batch_size=global_batch, gradient_accumulation_steps=3)
    assert cfg.accumulation_steps(world) == expect
    assert per_device * world * cfg.accumulation_steps(world) == (global_batch or per_device * world * 3)


def test_global_batch_size_not_divisible_is_an_error(tmp_path, monkeypatch):
    from qwenvl_lab.core.config_io import ConfigError
    from qwenvl_lab.trainer.run import training_arguments

    data = make_tiny_data(tmp_path / "shapes")
    cfg = tiny_train_config(tmp_path, data, per_device_train_batch_size=2, global_batch_size=6)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"global_batch_size=6 .*=2 x 2 process"):
        training_arguments(cfg, tmp_path / "run")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert cfg.accumulation_steps(3) == 1


def test_two_processes_with_a_training_tower_read_at_an_inner_layer(tmp_path):
    """A training tower read at an inner feature_layer leaves its later stages unused; DDP must not stop
    on them (find_unused_parameters is on exactly when a tower trains)."""
    from tests.tiny_train import TINY_TOWER, tiny_model_section

    data = make_tiny_data(tmp_path / "shapes")
    model = tiny_model_section(data)
    model["towers"] = [dict(TINY_TOWER, feature_layer=2)]  # stages 3 and 4 take no part in the forward
    cfg = tiny_train_config(tmp_path / "two", data, model=model, per_device_train_batch_size=2,
                            global_batch_size=4, max_steps=2, vision_lr=1e-3, ddp_timeout=60)
    env = dict(os.environ, NPROC="2", PY=sys.executable, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(["sh", str(ROOT / "train.sh"), str(tmp_path / "two" / "tiny_config.yaml")], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(run_losses(Path(cfg.output_dir))) == [1, 2]
