"""Engines: every trainable vision part is in the graph even without images; FSDP / ZeRO configs are valid
(the engines themselves run in tests/test_engines_run.py).

A training step over a batch without images must still use the projector (and trainable towers), or
DDP without unused-parameter detection, FSDP and ZeRO-3 wait forever on the ranks that did use them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from tests.tiny_train import make_tiny_data, tiny_train_config

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ROOT / "configs" / "engines"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_data(tmp_path_factory.mktemp("shapes"))


def _text_batch(vlm) -> dict:
    tok = vlm.tokenizer
    ids = [tok.im_start_id] + tok.encode("user\nhi") + [tok.im_end_id] + tok.encode("\n")
    ids += [tok.im_start_id] + tok.encode("assistant\nred") + [tok.im_end_id]
    x = torch.tensor([ids, ids])  # [2, T]
    return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}


@pytest.mark.parametrize("vision_lr", [0.0, 1e-3])
def test_text_only_batch_still_uses_every_trainable_vision_weight(tmp_path, data, vision_lr):
    from qwenvl_lab.trainer.run import build_model

    vlm = build_model(tiny_train_config(tmp_path, data, stage="full", vision_lr=vision_lr))
    batch = _text_batch(vlm)
    with torch.no_grad():
        expected = vlm.eval()(**batch).loss  # no anchor outside training
    vlm.train()
    buffers = {n: b.clone() for n, b in vlm.towers.named_buffers()}
    loss = vlm(**batch).loss
    assert torch.equal(loss.detach(), expected)  # the anchor adds exactly zero
    loss.backward()
    vision = [(n, p) for n, p in vlm.named_parameters() if n.startswith(("projector.", "towers.")) and p.requires_grad]
    assert any(n.startswith("projector.") for n, _ in vision)
    assert any(n.startswith("towers.") for n, _ in vision) == (vision_lr > 0)
    for name, p in vision:
        assert p.grad is not None, name  # reached by autograd: DDP's hook fires for it
        assert torch.count_nonzero(p.grad) == 0, name
    for name, b in vlm.towers.named_buffers():  # the blank image never touches batch-norm statistics
        assert torch.equal(b, buffers[name]), name
    assert vlm.towers.training == (vision_lr > 0)  # the tower's mode is restored


def test_fsdp_config_is_valid_for_the_trainer(tmp_path, data):
    from qwenvl_lab.trainer.run import build_model, training_arguments

    cfg = tiny_train_config(tmp_path, data, fsdp="true", fsdp_config=str(ENGINES / "fsdp.json"))
    args = training_arguments(cfg, tmp_path / "run")
    plugin = args.fsdp_plugin_args
    assert args.fsdp is True and plugin["fsdp_version"] == 2
    names = plugin["transformer_cls_names_to_wrap"].split(",")
    vlm = build_model(cfg)
    classes = {type(m).__name__ for m in vlm.modules()}
    assert names and set(names) <= classes, (names, sorted(classes))


@pytest.mark.parametrize("name,stage", [("zero2.json", 2), ("zero3.json", 3)])
def test_deepspeed_configs(name, stage):
    """The JSON itself (tests/test_engines_run.py runs both configs with 2 CPU processes)."""
    conf = json.loads((ENGINES / name).read_text())
    assert conf["zero_optimization"]["stage"] == stage
    # Batch sizes and accumulation come from the Trainer ("auto"), i.e. from global_batch_size.
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping"):
        assert conf[key] == "auto", key
    # The Trainer derives these from `model.config.hidden_size` when "auto"; the VLM's config has none
    # (the LM's width is not the towers'), so they must be numbers.
    from qwenvl_lab.model.config import VLMConfig

    assert "hidden_size" not in {f.name for f in dataclasses.fields(VLMConfig)}
    for key in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"):
        assert conf["zero_optimization"].get(key, 0) != "auto", key
    if stage == 3:  # the final weights must be gathered into one file on save
        assert conf["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_save_uses_the_gathered_state_dict_when_given(tmp_path, data):
    """Under FSDP / ZeRO-3 the Trainer passes the gathered full tensors; they, not the shards, are saved."""
    from types import SimpleNamespace

    from qwenvl_lab.trainer.hf_trainer import VLMTrainer
    from qwenvl_lab.trainer.run import build_model
    from safetensors.torch import load_file

    vlm = build_model(tiny_train_config(tmp_path, data, stage="full", vision_lr=0.0))
    trainer = VLMTrainer.__new__(VLMTrainer)  # only what _save reads
    trainer.args, trainer.model = SimpleNamespace(should_save=True, output_dir=str(tmp_path)), vlm
    gathered = {k: v.detach().clone() + 1 for k, v in vlm.state_dict().items()}
    trainer._save(str(tmp_path / "ckpt"), state_dict=gathered)
    saved = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    key = next(k for k in saved if k.startswith("projector.") and k.endswith("weight"))
    assert torch.equal(saved[key], gathered[key])
    assert "state_dict" not in vlm.__dict__ and torch.equal(vlm.state_dict()[key] + 1, gathered[key])
