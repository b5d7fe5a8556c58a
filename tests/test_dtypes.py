"""`dtype: auto`: the decision per device (CPU flags and GPU capability monkeypatched), fp32 for what
trains, the per-part report, and the precision flags that follow the decision."""

import logging

import pytest
import torch
from qwenvl_lab.core import cpu as cpu_info
from qwenvl_lab.kernels import _log
from qwenvl_lab.model import dtypes
from qwenvl_lab.model.config import VLMConfig
from torch import nn


@pytest.fixture(autouse=True)
def _detect(monkeypatch):
    monkeypatch.delenv(dtypes.ENV_OVERRIDE, raising=False)  # the suite pins float32; these tests detect
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _log.reset()


def _cpu(monkeypatch, flags: str) -> None:
    monkeypatch.setattr(cpu_info, "cpu_flags", lambda path=cpu_info.CPUINFO: set(flags.split()))


def test_cpuinfo_flags_are_read(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu avx2 avx512f amx_bf16 amx_tile\n\n"
                 "processor\t: 1\nflags\t\t: fpu\n")
    assert dtypes.cpu_flags(f) == {"fpu", "avx2", "avx512f", "amx_bf16", "amx_tile"}
    assert dtypes.cpu_flags(tmp_path / "missing") == set()


@pytest.mark.parametrize("flags, want", [
    ("fpu sse avx avx2 fma", torch.float32),  # AMD EPYC with AVX2 only: bf16 would be emulated
    ("avx2 avx512f avx512_bf16", torch.bfloat16),
    ("avx2 avx512f amx_tile amx_bf16", torch.bfloat16),
])
def test_auto_on_cpu_follows_native_bf16(monkeypatch, flags, want):
    _cpu(monkeypatch, flags)
    d = dtypes.auto_decision()
    assert d.dtype == want
    assert ("emulated" in d.reason) == (want == torch.float32)


@pytest.mark.parametrize("cap, want", [((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16), ((7, 0), torch.float32)])
def test_auto_on_gpu_follows_compute_capability(monkeypatch, cap, want):
    _cpu(monkeypatch, "avx2")  # the host CPU must not matter when the run uses the GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: cap)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: "Fake GPU")
    d = dtypes.auto_decision()
    assert d.dtype == want and f"{cap[0]}.{cap[1]}" in d.reason


def test_env_override_and_bad_value(monkeypatch):
    _cpu(monkeypatch, "avx2")
    monkeypatch.setenv(dtypes.ENV_OVERRIDE, "bfloat16")
    assert dtypes.auto_decision().dtype == torch.bfloat16
    monkeypatch.setenv(dtypes.ENV_OVERRIDE, "fp8")
    with pytest.raises(ValueError, match="QWENVL_AUTO_DTYPE='fp8'"):
        dtypes.auto_decision()


def test_auto_is_the_default_and_is_logged_once(monkeypatch, caplog):
    assert VLMConfig(towers=[{"backend": "timm", "name_or_path": "x"}]).dtype == "auto"
    _cpu(monkeypatch, "avx2")
    with caplog.at_level(logging.INFO, logger="qwenvl_lab.model.dtypes"):
        assert dtypes.torch_dtype("auto") == torch.float32
        assert dtypes.torch_dtype("auto") == torch.float32
        assert dtypes.torch_dtype("bfloat16") == torch.bfloat16
    msgs = [r.getMessage() for r in caplog.records if "dtype=auto" in r.getMessage()]
    assert len(msgs) == 1 and "float32" in msgs[0] and "AMX" in msgs[0]
    with pytest.raises(ValueError, match="unknown dtype 'fp32'"):
        dtypes.torch_dtype("fp32")


def test_upcast_trainable_and_part_report():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.towers = nn.Linear(4, 4).to(torch.bfloat16).requires_grad_(False)
            self.projector = nn.Linear(4, 8).to(torch.bfloat16)
            self.lm = nn.Linear(8, 8).to(torch.bfloat16)
            self.lm.bias.requires_grad_(False)

    m = M()
    keep = m.projector.weight
    assert dtypes.upcast_trainable(m) == 3  # projector weight+bias, lm weight
    assert m.projector.weight is keep and keep.dtype == torch.float32  # the same Parameter object
    assert m.towers.weight.dtype == torch.bfloat16 and m.lm.bias.dtype == torch.bfloat16
    rep = {r.part: r for r in dtypes.part_report(m)}
    assert rep["towers"].dtypes == ["bfloat16"] and rep["towers"].bytes == 20 * 2 and rep["towers"].trainable_bytes == 0
    assert rep["projector"].bytes == rep["projector"].trainable_bytes == 40 * 4
    assert rep["lm"].dtypes == ["bfloat16", "float32"] and rep["lm"].bytes == 64 * 4 + 8 * 2
    assert "projector" in dtypes.describe_parts(m)


def test_upcast_trainable_moves_a_trainable_batchnorm_s_statistics_and_it_runs_under_bf16_autocast():
    """dtype=auto (bf16 base weights) with a trainable CNN tower: the BatchNorm's running statistics stayed
    bf16 beside fp32 weights and the first training step raised a dtype error on the CPU."""
    tower = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)).to(torch.bfloat16)
    tower[2].requires_grad_(False)
    tower[3].requires_grad_(False)  # a frozen norm keeps its dtype, statistics included
    assert dtypes.upcast_trainable(tower) == 2 + 2 + 2  # conv weight/bias, norm weight/bias, mean/var
    assert tower[1].running_mean.dtype == tower[1].running_var.dtype == torch.float32
    assert tower[1].num_batches_tracked.dtype == torch.long and "running_mean" in dict(tower[1].named_buffers())
    assert tower[3].running_mean.dtype == torch.bfloat16
    tower[3].float()  # the frozen half in fp32 too, so this CPU forward mixes only what autocast allows
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tower.train()(torch.randn(2, 3, 8, 8)).float().sum().backward()
    assert tower[1].weight.grad is not None


def test_part_report_lists_every_top_level_part():
    """A part beyond towers/projector/lm (the VLM's trained token rows) is reported too."""
    m = nn.Module()
    m.lm = nn.Linear(2, 2)
    m.token_rows = nn.Linear(2, 3, bias=False)
    rep = {r.part: r for r in dtypes.part_report(m)}
    assert list(rep) == ["lm", "token_rows"] and rep["token_rows"].params == 6
    assert "token_rows" in dtypes.describe_parts(m)


def test_precision_flags_follow_the_decision(monkeypatch):
    from qwenvl_lab.core.config_io import ConfigError
    from qwenvl_lab.model.train_config import TrainConfig
    from qwenvl_lab.trainer.run import precision_flags

    _cpu(monkeypatch, "avx2")
    assert precision_flags(TrainConfig(precision="auto")) == {"bf16": False, "fp16": False}
    with pytest.raises(ConfigError, match="precision=bf16 on this CPU"):
        precision_flags(TrainConfig(precision="bf16"))
    with pytest.raises(ConfigError, match="precision=fp16 needs a GPU"):
        precision_flags(TrainConfig(precision="fp16"))
    _cpu(monkeypatch, "avx512_bf16 amx_bf16")  # a CPU with native bf16: autocast bf16 is allowed
    assert precision_flags(TrainConfig(precision="auto")) == {"bf16": True, "fp16": False}
    assert precision_flags(TrainConfig(precision="bf16")) == {"bf16": True, "fp16": False}


def test_build_model_bf16_base_keeps_trainables_fp32_and_trains(caplog):
    """A bf16 base (what `auto` gives on a GPU): frozen LM and tower in bf16, projector and LoRA in fp32,
    and a training forward/backward runs on the mixed model; the log lists each part's dtype and bytes."""
    from qwenvl_lab.model.train_config import LoraSettings, TrainConfig
    from qwenvl_lab.trainer.run import build_model

    from tests.tiny_train import TINY_TOWER

    model = {"lm": "scratch", "lm_backend": "qwen", "dtype": "bfloat16", "towers": [dict(TINY_TOWER)],
             "lm_config": {"arch": "qwen2", "vocab_size": 256, "hidden_size": 32, "num_hidden_layers": 2,
                           "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 64,
                           "image_token_id": 200},
             "image_mode": "resize"}
    cfg = TrainConfig(model=model, stage="sft", lora=LoraSettings(r=4, alpha=8, dropout=0.0), precision="fp32")
    with caplog.at_level(logging.INFO, logger="qwenvl_lab.trainer"):
        vlm = build_model(cfg)
    by_kind = {}
    for name, p in vlm.named_parameters():
        kind = "lora" if "lora_" in name else name.split(".")[0]
        by_kind.setdefault(kind, set()).add(p.dtype)
    assert by_kind == {"towers": {torch.bfloat16}, "lm": {torch.bfloat16}, "lora": {torch.float32},
                       "projector": {torch.float32}}
    assert "parameter dtypes and bytes per part" in caplog.text and "bfloat16" in caplog.text
    n = vlm.tokens_per_image
    ids = torch.tensor([[1, 2] + [200] * n + [3, 4, 5]])
    labels = ids.clone()
    labels[:, : n + 2] = -100
    vlm.train()
    out = vlm(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32), labels=labels, image_counts=[1])
    out.loss.backward()
    grads = [p.grad for n_, p in vlm.named_parameters() if p.requires_grad]
    assert torch.isfinite(out.loss) and all(g is not None and g.dtype == torch.float32 for g in grads)
