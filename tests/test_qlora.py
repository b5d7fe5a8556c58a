"""QLoRA on this CPU: bitsandbytes' CPU backend holds the LM's base weights in NF4 while LoRA trains.

* a QLoRA run (train.py's path, `lora.qlora=true`) quantises every linear layer of the LM but the head,
  trains only LoRA and the projector, and lowers the loss on a fixed batch;
* its run directory loads back as the same 4-bit model (bit-for-bit logits);
* `python -m qwenvl_lab.model.merge` dequantises the base and folds LoRA in: a plain float LM with the logits of
  the 4-bit model it came from;
* 4-bit base weights take about a quarter of their bf16 bytes;
* on a CPU, an LM layer whose widths bitsandbytes' CPU 4-bit paths cannot take (in_features not a multiple
  of 64, out_features not a multiple of 32) is refused with one line before training, on every CPU.

The tiny LMs here have 64-wide layers, so every test runs the same on an AVX2, an AVX512-BF16 and an AMX CPU.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.tiny_server import entry
from tests.tiny_train import make_tiny_data, tiny_model_section, tiny_train_config

QLORA_HIDDEN = 64  # widths bitsandbytes' CPU 4-bit paths take on every CPU (multiples of 64)


def _require_bnb_cpu_4bit() -> None:
    """Skip, naming the reason, when bitsandbytes is missing or its CPU backend cannot quantise to 4 bits."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        pytest.skip("bitsandbytes is not installed: pip install -e '.[qlora]' (make setup installs it)")
    try:
        layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4").to("cpu")
        layer(torch.randn(2, 64))
    except Exception as e:  # the backend's own error is the reason
        pytest.skip(f"bitsandbytes {bnb.__version__} cannot run NF4 4-bit layers on this CPU: {e}")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_data(tmp_path_factory.mktemp("shapes"))


def _fixed_batch(cfg, vlm) -> dict:
    """The first 8 training samples, collated as the run collates them."""
    from qwenvl_lab.dataset import Collator
    from qwenvl_lab.trainer.run import build_datasets

    train_ds, _ = build_datasets(cfg, vlm)
    return dict(Collator(pad_id=vlm.pad_token_id)([train_ds[i] for i in range(8)]))


def _forward(vlm, batch):
    """Eval-mode outputs with the 4-bit layers on bitsandbytes' dequantise-and-matmul path, which computes
    in the layers' compute dtype on every CPU. (In eval mode without gradients, bitsandbytes repacks the
    layers on AVX512-BF16 CPUs for a bf16 kernel, whose logits differ from the fp32 ones by bf16 rounding.)
    Call it before any plain eval forward of the same model: a repacked layer stays repacked."""
    vlm.eval()
    for m in vlm.lm.modules():
        if type(m).__name__ == "Linear4bit":
            m.train()  # the only effect on a 4-bit layer: no repacking (its LoRA dropout is 0 here)
    with torch.no_grad():
        out = vlm(**batch, return_logits=True)
    vlm.eval()
    return out


def test_qlora_trains_reloads_and_merges_on_cpu(tmp_path, data):
    _require_bnb_cpu_4bit()
    from qwenvl_lab.model import VLM
    from qwenvl_lab.model.merge import main as merge_main
    from qwenvl_lab.model.quant import has_4bit
    from qwenvl_lab.trainer.run import build_model, train
    from transformers import set_seed

    cfg = tiny_train_config(tmp_path, data, stage="sft", vision_lr=0.0, learning_rate=2e-2, max_steps=6,
                            model=tiny_model_section(data, hidden=QLORA_HIDDEN),
                            lora={"r": 8, "alpha": 16, "dropout": 0.0, "qlora": True})
    set_seed(cfg.seed)
    before = build_model(cfg)  # the run's initial model (its LoRA B matrices start at zero)
    batch = _fixed_batch(cfg, before)
    loss_before = _forward(before, batch).loss.item()

    result = train(cfg)
    vlm = result.model
    head = vlm.lm.get_output_embeddings()
    linears = [(n, m) for n, m in vlm.lm.named_modules() if isinstance(m, nn.Linear) and m is not head
               and not n.split(".")[-1].startswith("lora_") and ".lora_" not in n]
    assert linears and all(type(m).__name__ == "Linear4bit" for _, m in linears), \
        [(n, type(m).__name__) for n, m in linears if type(m).__name__ != "Linear4bit"][:5]
    assert {m.weight.quant_type for _, m in linears} == {"nf4"}
    assert all(m.weight.dtype == torch.uint8 and not m.weight.requires_grad for _, m in linears)
    trainable = [n for n, p in vlm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("projector.") for n in trainable), trainable[:5]
    out = _forward(vlm, batch)
    loss_after, logits = out.loss.item(), out.logits
    assert loss_after < loss_before - 0.05, (loss_before, loss_after)

    # The run directory loads back quantised, with the same logits.
    again = VLM.from_pretrained(result.output_dir / "final")
    assert has_4bit(again.lm)
    assert torch.equal(_forward(again, batch).logits, logits)

    # Merge: float weights (no 4-bit layer, no adapter), the 4-bit model's logits.
    assert merge_main(["--src", str(result.output_dir), "--dst", str(tmp_path / "merged")]) == 0
    merged = VLM.from_pretrained(tmp_path / "merged")
    assert not has_4bit(merged.lm) and not any("lora_" in n for n, _ in merged.named_parameters())
    assert all(m.weight.dtype == torch.float32 for m in merged.lm.modules() if type(m) is nn.Linear)
    with torch.no_grad():
        merged_logits = merged(**batch, return_logits=True).logits
    assert (merged_logits - logits).abs().max().item() < 1e-4

    # Plain eval mode (what generation runs): on AVX512-BF16 CPUs bitsandbytes repacks the 64-wide layers
    # for its bf16 kernel (32-wide ones failed there); elsewhere the same fp32 path as above.
    with torch.no_grad():
        eval_logits = again(**batch, return_logits=True).logits
    assert torch.isfinite(eval_logits).all()
    assert (eval_logits - merged_logits).abs().max().item() < 0.1 * logits.abs().max().item()  # bf16 rounding


def test_4bit_base_weights_take_a_quarter_of_bf16(tmp_path, data):
    _require_bnb_cpu_4bit()
    from qwenvl_lab.model import build_vlm
    from qwenvl_lab.model.quant import base_weight_bytes, dequantize_lm, quantize_lm_4bit

    model = tiny_model_section(data, hidden=256)
    model["lm_config"].update(intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)
    vlm = build_vlm(model)
    originals = {n: m.weight.detach().clone() for n, m in vlm.lm.named_modules() if type(m) is nn.Linear}
    n = quantize_lm_4bit(vlm)
    head = vlm.lm.get_output_embeddings()
    assert n == sum(1 for m in originals if m != "lm_head") and head is not None
    nbytes, numel = base_weight_bytes(vlm.lm)
    ratio = nbytes / (2 * numel)  # bf16: 2 bytes a weight
    assert 0.25 <= ratio < 0.27, ratio  # 4-bit codes (exactly 1/4) + block scales and tables

    dequantize_lm(vlm)  # NF4 keeps each weight within its block's scale: a small relative error
    for name, module in vlm.lm.named_modules():
        if name in originals and name != "lm_head":
            w = originals[name]
            err = (module.weight - w).abs().mean() / w.abs().mean()
            assert err < 0.15, (name, err.item())


def test_4bit_layer_keeps_its_gradient_after_an_eval_forward(data):
    """Mid-run evaluation (eval mode, no gradients) must not change a later training step. On AVX512-BF16
    CPUs bitsandbytes repacks a layer for a bf16 kernel without backward on such a forward; elsewhere this
    holds by itself."""
    _require_bnb_cpu_4bit()
    from qwenvl_lab.model import build_vlm
    from qwenvl_lab.model.quant import dequantize_lm, quantize_lm_4bit

    def step(layer, x):  # a training forward and backward: (output, gradient at the input)
        x = x.detach().requires_grad_(True)
        layer.train()
        y = layer(x)
        y.sum().backward()
        return y.detach(), x.grad

    def evaluate(layer, x):
        layer.eval()
        with torch.no_grad():
            return layer(x)

    vlm = build_vlm(tiny_model_section(data, hidden=QLORA_HIDDEN))
    quantize_lm_4bit(vlm)
    evaluated_vlm = copy.deepcopy(vlm)
    layer = vlm.lm.transformer.h[0].attn.c_attn  # it has a bias
    evaluated_first = copy.deepcopy(layer)
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0))

    y1, g1 = step(layer, x)
    evaluate(layer, x)
    y2, g2 = step(layer, x)  # trained before: the evaluation took the training path, nothing changed
    assert g2 is not None and torch.equal(y1, y2) and torch.equal(g1, g2)

    evaluate(evaluated_first, x)  # an evaluation before any training step (repacks where bitsandbytes does)
    y3, g3 = step(evaluated_first, x)
    assert g3 is not None, "no gradient reached the input of a 4-bit layer trained after an evaluation"
    scale = y1.abs().max().item()
    assert (y3 - y1).abs().max().item() < 0.02 * scale  # at most the block scales' bf16 rounding
    assert (g3 - g1).abs().max().item() < 0.02 * g1.abs().max().item()

    # Dequantising (merging) after an evaluation reads the same weights.
    evaluate(evaluated_vlm.lm.transformer.h[0].attn.c_attn, x)
    dequantize_lm(evaluated_vlm)
    with torch.no_grad():
        y4 = evaluated_vlm.lm.transformer.h[0].attn.c_attn(x)
    assert (y4 - y1).abs().max().item() < 0.02 * scale

def test_qlora_refuses_a_32_wide_layer_on_any_cpu_before_training(tmp_path, data, capsys, monkeypatch):
    import qwenvl_lab.model.quant as quant
    from qwenvl_lab.core.cli import run_cli

    def no_bnb():  # the width rule holds without bitsandbytes (or its CPU backend) ever loading
        raise AssertionError("bitsandbytes was reached before the layer widths were checked")

    monkeypatch.setattr(quant, "_bnb", no_bnb)
    monkeypatch.setattr(quant, "_device", lambda: torch.device("cpu"))  # a CPU run, also on a GPU machine
    cfg = tiny_train_config(tmp_path, data, stage="sft", vision_lr=0.0, model=tiny_model_section(data, hidden=32),
                            lora={"r": 4, "alpha": 8, "dropout": 0.0, "qlora": True})
    assert run_cli(entry("train").main, [str(tmp_path / "tiny_config.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: lora.qlora=true on a CPU: LM layer lm."), err
    assert "in_features=32" in err and "multiple of 64" in err and "lora.qlora=false" in err, err
    assert not (Path(cfg.output_dir) / "log.jsonl").exists()  # refused before the first step


def test_qlora_width_rule_accepts_64_wide_layers(data):
    from qwenvl_lab.core.errors import UserError
    from qwenvl_lab.model import build_vlm
    from qwenvl_lab.model.quant import check_cpu_widths

    with pytest.raises(UserError, match=r"lm\.transformer\.h\.0\.attn\.c_attn has in_features=32"):
        check_cpu_widths(build_vlm(tiny_model_section(data, hidden=32)))
    check_cpu_widths(build_vlm(tiny_model_section(data, hidden=QLORA_HIDDEN)))  # no error
