"""model.plan: published parameter counts from real configs, DeepSpeed's ZeRO estimators, the activation
formula against the tensors autograd really saves, and the command line."""

import contextlib
import io
import json
import re
from pathlib import Path

import pytest
import torch
from qwenvl_lab.model import plan as P
from qwenvl_lab.model.train_config import LoraSettings, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
HUB = ROOT / "configs" / "hub"


def _cfg(preset=None, model=None, **kw) -> TrainConfig:
    kw.setdefault("data_path", ["unused.jsonl"])
    return TrainConfig(preset=preset, model=model or {}, **kw)


@pytest.fixture(scope="module")
def qwen7b_full():
    """The original pair with everything trainable (what DeepSpeed's estimators assume)."""
    return P.make_plan(_cfg("qwen7b-siglip", stage="full", vision_lr=1e-5, max_length=2048), gpus=8, gpu_mem_gib=80)


def test_published_counts_from_the_hub_fixtures():
    from qwenvl_lab.qwen import QWenConfig, QWenLMHeadModel
    from qwenvl_lab.visual.registry import build_tower

    want_lm = {"Qwen--Qwen-7B-Chat": 7_721_324_544, "Qwen--Qwen-1_8B-Chat": 1_836_828_672,
               "Qwen--Qwen2.5-0.5B-Instruct": 494_032_768}
    for name, n in want_lm.items():
        cfg = QWenConfig.from_pretrained(HUB / f"{name}.json")
        with torch.device("meta"):
            assert sum(p.numel() for p in QWenLMHeadModel(cfg).parameters()) == n, name
    want_tower = {("hf_siglip", "google--siglip-so400m-patch14-384"): (428_225_600, 729, 1152),
                  ("hf_clip", "openai--clip-vit-large-patch14-336"): (303_507_456, 576, 1024)}
    for (backend, name), (n, tokens, width) in want_tower.items():
        with torch.device("meta"):
            t = build_tower(backend, str(HUB / f"{name}.json"), pretrained=False)
        assert (sum(p.numel() for p in t.parameters()), t.num_tokens, t.hidden_size) == (n, tokens, width)


def test_shared_qwen_configs_match_the_fixtures_and_count(shared_qwen1):
    shipped = json.loads((HUB / "Qwen--Qwen-7B-Chat.json").read_text())
    assert shipped == json.loads((shared_qwen1 / "config.json").read_text())
    vlm, base = P.meta_model(_cfg(model={"lm": str(shared_qwen1), "towers": [
        {"backend": "hf_siglip", "name_or_path": "google/siglip-so400m-patch14-384"}]}, stage="align"))
    counts = P.count_parts(vlm)
    assert counts["lm"].total == 7_721_324_544 and counts["lm"].trainable == 0
    assert base == "bfloat16" and counts["lm"].bytes == 2 * 7_721_324_544
    assert counts["projector"].trainable == counts["projector"].total == 1152 * 4096 + 4096 + 4096 * 4096 + 4096
    assert counts["projector"].bytes == 4 * counts["projector"].total  # trainable: fp32 master weights
    resaved = shared_qwen1 / "qwen-1_8b-chat" / "config.resaved.json"
    from qwenvl_lab.qwen import QWenConfig

    assert QWenConfig.from_pretrained(resaved) == QWenConfig.from_pretrained(HUB / "Qwen--Qwen-1_8B-Chat.json")


def test_lora_recipe_counts():
    vlm, _ = P.meta_model(_cfg("qwen1.8b-clip336", stage="sft", lora=LoraSettings(r=128, targets="c_attn|w1|w2")))
    counts = P.count_parts(vlm)
    assert counts["lm"].total == 1_836_828_672 and counts["lm"].trainable == 0
    per_layer = 128 * (2048 + 3 * 2048) + 2 * 128 * (2048 + 5504)
    assert counts["lora"].total == counts["lora"].trainable == 24 * per_layer
    assert counts["towers"].trainable == 0 and counts["towers"].total == 303_507_456


def _deepspeed_estimators():
    try:
        from deepspeed.runtime.zero.stage3 import (
            estimate_zero3_model_states_mem_needs,
            estimate_zero3_model_states_mem_needs_all_cold,
        )
        from deepspeed.runtime.zero.stage_1_and_2 import (
            estimate_zero2_model_states_mem_needs,
            estimate_zero2_model_states_mem_needs_all_cold,
        )
    except Exception as e:  # noqa: BLE001 - deepspeed missing or broken: say which
        pytest.skip(f"deepspeed is not importable ({type(e).__name__}: {e}); pip install deepspeed to compare")
    return (estimate_zero2_model_states_mem_needs, estimate_zero2_model_states_mem_needs_all_cold,
            estimate_zero3_model_states_mem_needs, estimate_zero3_model_states_mem_needs_all_cold)


def _printed_gpu_gib(fn, **kw) -> float:
    """The per-GPU figure DeepSpeed's `*_all_cold` prints for the no-offload row."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        fn(**kw)
    row = next(line for line in buf.getvalue().splitlines() if "offload_optimizer=none" in line)
    return float(re.findall(r"([\d.]+)GB", row)[1])


@pytest.mark.parametrize("gpus", [1, 8, 64])
def test_zero_figures_agree_with_deepspeed(qwen7b_full, gpus):
    z2, z2_cold, z3, z3_cold = _deepspeed_estimators()
    plan = qwen7b_full
    total, largest = plan.total_params, plan.largest_module
    assert plan.trainable == total
    ours = {e: P.model_states(plan.counts, e, gpus, 2, largest, (0, 0))["total"] for e in ("ZeRO-2", "ZeRO-3")}
    ds2 = z2(total_params=total, num_gpus_per_node=gpus, cpu_offload=False)[1]
    ds3 = z3(total_params=total, largest_layer_params=largest, num_gpus_per_node=gpus, cpu_offload=False,
             cpu_offload_params=False)[1]
    assert abs(ours["ZeRO-2"] / ds2 - 1) < 0.05 and abs(ours["ZeRO-3"] / ds3 - 1) < 0.05, (ours, ds2, ds3)
    printed2 = _printed_gpu_gib(z2_cold, total_params=total, num_gpus_per_node=gpus)
    printed3 = _printed_gpu_gib(z3_cold, total_params=total, largest_layer_params=largest, num_gpus_per_node=gpus)
    assert abs(ours["ZeRO-2"] / P.GIB / printed2 - 1) < 0.05 and abs(ours["ZeRO-3"] / P.GIB / printed3 - 1) < 0.05


def test_lora_zero2_is_the_frozen_base_plus_the_trainables_estimate():
    z2 = _deepspeed_estimators()[0]
    plan = P.make_plan(_cfg("qwen1.8b-clip336", stage="sft", lora=LoraSettings(r=64)), gpus=4, gpu_mem_gib=24)
    frozen = plan.total_params - plan.trainable
    ds = 2 * frozen + z2(total_params=plan.trainable, num_gpus_per_node=4, cpu_offload=False)[1]
    assert abs(plan.engines["ZeRO-2"]["total"] / ds - 1) < 0.05
    assert plan.engines["ZeRO-3"]["total"] < plan.engines["ZeRO-2"]["total"] < plan.engines["DDP"]["total"]


def _saved_activation_bytes(vlm, ids):
    """Bytes autograd saves for one training forward (parameters and the input ids excluded)."""
    params = {p.untyped_storage().data_ptr() for p in vlm.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params and t.device.type == "cpu":
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        vlm.lm(input_ids=ids, labels=ids)
    return sum(seen.values())


@pytest.mark.parametrize("kv_heads, lora", [(4, 0), (2, 8)])
def test_activation_formula_matches_what_autograd_saves(kv_heads, lora):
    """The per-layer count (fp32, no checkpointing) against a real small LM's saved tensors."""
    from qwenvl_lab.model import build_vlm
    from qwenvl_lab.model.stages import apply_lora, set_trainable

    from tests.tiny_train import TINY_TOWER

    T, layers = 256, 3
    lm_cfg = {"arch": "qwen2", "vocab_size": 512, "hidden_size": 256, "num_hidden_layers": layers,
              "num_attention_heads": 4, "num_key_value_heads": kv_heads, "intermediate_size": 688,
              "attn_impl": "torch"}
    vlm = build_vlm({"lm": "scratch", "lm_config": lm_cfg, "towers": [dict(TINY_TOWER)], "dtype": "float32"})
    if lora:
        apply_lora(vlm, LoraSettings(r=lora, alpha=16, dropout=0.05, targets="c_attn|w1|w2"))
    set_trainable(vlm, "sft" if lora else "full")
    vlm.train()
    ids = torch.randint(0, 500, (1, T))
    measured = _saved_activation_bytes(vlm, ids)
    shape = P.Shape(seq=T, image_tokens=0, images=0, targets=T - 1, micro_batch=1, accumulation=1)
    est = P.activation_bytes(vlm, shape, c=4, checkpointing=False)
    saved = est["lm"] + (T - 1) * 256 * 4  # the logits chunk is transient (recomputed in backward): not saved
    assert 0.8 < saved / measured < 1.2, (est, measured)  # within 20%: the plan budgets GPUs, not bytes
    with_ckpt = P.activation_bytes(vlm, shape, c=4, checkpointing=True)
    assert with_ckpt["lm"] < est["lm"] / 2  # checkpointing keeps one layer's input per layer


def test_fits_and_fewest_gpus_are_consistent():
    plan = P.make_plan(_cfg("qwen7b-siglip", stage="full", max_length=2048, gradient_checkpointing=True,
                            per_device_train_batch_size=1), gpus=1, gpu_mem_gib=80)
    # Full fine-tuning of 8.4B parameters with AdamW does not fit one 80 GiB GPU under any engine ...
    assert not P.fits(plan.engines["DDP"]["total"] + plan.activation_per_gpu(), 80)
    # ... ZeRO-3 spreads it: the fewest GPUs it names fit, half as many do not.
    n = plan.min_gpus["ZeRO-3"]
    assert n is not None and n > 1
    act = plan.activation_per_gpu()
    states = lambda k: P.model_states(plan.counts, "ZeRO-3", k, 2, plan.largest_module, (0, 0))["total"]  # noqa: E731
    assert P.fits(states(n) + act, 80) and not P.fits(states(n // 2) + act, 80)
    assert plan.flops["recompute"] > 0 and plan.step_seconds() > 0


def test_cli_prints_the_plan_and_refuses_bad_input(capsys, tmp_path):
    from qwenvl_lab.core.cli import run_cli

    rc = P.main(["configs/qwen2.5_0.5b_siglip.yaml", "lora.r=8", "--gpus", "2", "--gpu-mem", "24"])
    out = capsys.readouterr().out
    assert rc == 0 and "494,032,768" in out and "ZeRO-3" in out and "fits 24 GiB" in out
    assert run_cli(P.main, ["configs/qwen2.5_0.5b_siglip.yaml", "lora.rr=8", "--gpus", "2", "--gpu-mem", "24"]) == 2
    assert "lora.rr" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {lm: /nowhere/lm, towers: [{backend: hf_clip, name_or_path: /nowhere/t}]}\n"
                   "data_path: [x.jsonl]\n")
    assert run_cli(P.main, [str(bad), "--gpus", "1", "--gpu-mem", "80"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.lm '/nowhere/lm'" in err


def _tiny_lora_cfg(backend: str = "qwen") -> TrainConfig:
    """A tiny scratch LM with the LoRA recipe's targets and checkpointing, a tiny tower."""
    from tests.tiny_train import TINY_TOWER

    lm = {"arch": "qwen2", "vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "intermediate_size": 96, "attn_impl": "torch"}
    if backend == "hf":
        lm = {"model_type": "llama", "vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96}
    return _cfg(model={"lm": "scratch", "lm_backend": backend, "lm_config": lm, "towers": [dict(TINY_TOWER)],
                       "image_token_id": 500}, stage="sft", gradient_checkpointing=True, max_length=64,
                lora=LoraSettings(r=4, alpha=8, targets="c_attn|w1|w2" if backend == "qwen" else "q_proj|up_proj"))


def test_bf16_autocast_copies_of_the_trainables_are_counted_under_ddp():
    cfg = _tiny_lora_cfg()
    bf16 = P.make_plan(cfg, gpus=1, gpu_mem_gib=80, device="cpu", dtype="bfloat16", seq=48, images=1)
    fp32 = P.make_plan(cfg, gpus=1, gpu_mem_gib=80, device="cpu", dtype="float32", seq=48, images=1)
    assert bf16.base_dtype == "bfloat16" and fp32.base_dtype == "float32"  # dtype= replaces the config's
    ddp = bf16.engines["DDP"]
    assert ddp["casts"] == 2 * bf16.trainable > 0 and fp32.engines["DDP"]["casts"] == 0
    assert ddp["total"] == ddp["weights"] + ddp["casts"] + ddp["grads"] + ddp["optimizer"]
    assert all(bf16.engines[e]["casts"] == 0 for e in ("ZeRO-2", "ZeRO-3"))  # DeepSpeed's bf16 mode: no autocast


def test_autocast_makes_a_bf16_copy_of_each_fp32_trainable_weight():
    """What the `casts` term stands for, on a real tiny model: in a bf16 autocast forward every fp32 trainable
    weight of the LM is cast to bf16 once (2 bytes each), and the copy is cached for its next use."""
    from qwenvl_lab.model import build_vlm
    from qwenvl_lab.model.stages import apply_stage
    from torch.utils._python_dispatch import TorchDispatchMode

    cfg = _tiny_lora_cfg()
    vlm = build_vlm(dict(cfg.model, dtype="bfloat16"))
    apply_stage(vlm, cfg, cfg.lora)
    trainable = {p.data_ptr(): p.numel() for p in vlm.lm.parameters() if p.requires_grad}
    assert trainable and all(p.dtype == torch.float32 for p in vlm.lm.parameters() if p.requires_grad)
    casts: list[int] = []

    class Casts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten._to_copy.default and args[0].data_ptr() in trainable:
                casts.append(args[0].data_ptr())
                assert out.dtype == torch.bfloat16
            return out

    vlm.train()
    ids = torch.randint(0, 400, (1, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16), Casts():
        assert torch.is_autocast_cache_enabled()
        vlm.lm(input_ids=ids, labels=ids)
        vlm.lm(input_ids=ids, labels=ids)  # same autocast region: served from the cache, no new copies
    assert sorted(casts) == sorted(trainable)  # each once
    assert sum(trainable.values()) == P.count_parts(vlm)["lora"].trainable  # the LM trains its adapters only


def test_measured_block_gives_the_mfu_the_step_time_uses():
    cfg = _tiny_lora_cfg()
    t = P.measure_block(cfg, "cpu", seq=32, dtype="float32", repeats=1)
    plan = P.make_plan(cfg, gpus=1, gpu_mem_gib=80, device="cpu", dtype="float32", seq=32, images=0, targets=8,
                       micro_batch=1)
    f = plan.flops
    assert t.flops == (f["lm"] + f["attention"] + f["recompute"]) // 2  # the LM's share of one of 2 layers
    assert t.seconds > 0 and t.peak_flops > 0 and 0 < t.mfu < float("inf")
    pred = P.predict_on_device(cfg, "cpu", "float32", seq=32, images=0, targets=8, micro_batch=1, timing=t)
    assert pred.mfu == t.mfu and pred.memory_bytes == plan.engines["DDP"]["total"] + plan.activation_per_gpu()
    assert abs(pred.step_seconds - f["total"] / (t.peak_flops * t.mfu)) < 1e-9 * pred.step_seconds
    given = P.predict_on_device(cfg, "cpu", "float32", seq=32, images=0, targets=8, micro_batch=1, mfu=0.5)
    assert given.mfu == 0.5 and given.mfu_source == "given"


def test_measuring_the_mfu_of_a_non_qwen_lm_is_one_clear_error():
    with pytest.raises(P.PlanError, match="--mfu"):
        P.measure_block(_tiny_lora_cfg("hf"), "cpu", seq=16, dtype="float32", repeats=1)
