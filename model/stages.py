"""What trains: one function decides it from the config, and logs it.

Stages (`stage` in the config):
  align  projector only (LLaVA stage 1)
  sft    projector + LoRA adapters on the LM (stage 2); `lora.r=0` means the LM stays frozen
  full   projector + the whole LM
  dpo    what sft trains, tuned on preference pairs (trainer/pref_trainer.py); the reference is the model at the
         start with its adapters off (model/preference.py)
The vision towers train only when `vision_lr > 0` (any stage). After the stage rule, `freeze` regexes
freeze matching parameters and then `unfreeze` regexes make matching ones trainable (Cerebras-style
fine control); regexes are searched (`re.search`) in full parameter names such as
`lm.transformer.h.0.attn.c_attn.weight` or `towers.0.model.stem.conv.weight`.

A released wrapper (model/released.py, names `model.<transformers name>`, `model.base_model.model.<...>` under
peft) has its parts named by its family's module prefixes (model/families.py `vision` / `projector` / `lm`):
the same stages, the LoRA adapters on its LM's linear layers only (default: the family's `lora_targets`).
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from .config import PROJECTOR_PREFIXES
from .dtypes import upcast_trainable
from .families import FAMILIES
from .quant import quantize_lm_4bit
from .released import ReleasedVLM
from .train_config import LoraSettings, TrainConfig

log = logging.getLogger(__name__)

STAGES = ("align", "sft", "full", "dpo")


def _released_part(name: str) -> str | None:
    """The part of a released wrapper's parameter name (`model.` + its transformers name), None otherwise."""
    if not name.startswith("model."):
        return None
    inner = name.removeprefix("model.").removeprefix("base_model.model.")  # peft wraps the transformers model
    for family in FAMILIES.values():
        if family.native:
            continue
        for part in ("projector", "vision", "lm"):
            prefixes = getattr(family, part)  # module prefixes, or a parameter's own name (image_newline)
            if inner in prefixes or inner.startswith(tuple(p + "." for p in prefixes)):
                return part
    return "other"


def part_of(name: str) -> str:
    """The part of a VLM parameter name: projector | vision | lm (everything else)."""
    released = _released_part(name)
    if released is not None:
        return "lm" if released == "other" else released
    if name.startswith(PROJECTOR_PREFIXES):
        return "projector"
    if name.startswith("towers."):
        return "vision"
    return "lm"


@dataclass
class TrainableReport:
    trainable: int = 0
    total: int = 0
    modules: OrderedDict[str, tuple[int, int]] = field(default_factory=OrderedDict)

    def parts_summary(self) -> str:
        """`towers 0/316,700, projector 33,024/33,024, lm 45,056/422,784` (trainable/total per part)."""
        parts: OrderedDict[str, list[int]] = OrderedDict()
        for name, (t, n) in self.modules.items():
            acc = parts.setdefault(name.split(".")[0], [0, 0])
            acc[0] += t
            acc[1] += n
        return ", ".join(f"{k} {t:,}/{n:,}" for k, (t, n) in parts.items())

    def table(self) -> str:
        lines = [f"{'module':<60} {'trainable':>12} {'total':>12}"]
        for name, (t, n) in self.modules.items():
            state = "trainable" if t == n else ("frozen" if t == 0 else "partial")
            lines.append(f"{name:<60} {t:>12,} {n:>12,}  {state}")
        lines.append(f"{'TOTAL':<60} {self.trainable:>12,} {self.total:>12,}")
        return "\n".join(lines)


def lora_target_regex(targets: str) -> str:
    """`c_attn|attn.c_proj|w1|w2` -> a full-name regex for peft: a target is a module-name suffix."""
    alts = "|".join(re.escape(t.strip()) for t in targets.split("|") if t.strip())
    if not alts:
        raise ValueError("lora.targets is empty")
    return rf"(?:.*\.)?(?:{alts})"


def resolve_lora_targets(vlm: nn.Module, targets: str) -> str:
    """"" -> the LM backbone's default for this architecture; "all-linear" -> every Linear of the LM except
    its output head; anything else as given."""
    if isinstance(vlm, ReleasedVLM):
        targets = (targets or "").strip()
        return vlm.family.notes["lora_targets"] if targets in ("", "all-linear") else targets  # its LM's linears
    targets = (targets or "").strip() or vlm.backbone.default_lora_targets(vlm.lm)
    return vlm.backbone.all_linear_targets(vlm.lm) if targets == "all-linear" else targets


def apply_lora(vlm: nn.Module, lora: LoraSettings) -> None:
    """Wrap `vlm.lm` with peft LoRA adapters (QLoRA: 4-bit base weights first, needs bitsandbytes)."""
    # peft is heavy (it loads bitsandbytes and parts of inductor): imported only when adapters are applied.
    from peft import LoraConfig, get_peft_model

    if lora.qlora:
        # 4-bit NF4 base weights; bitsandbytes quantises on the GPU when there is one, else with its CPU
        # backend (it raises a clear error when missing).
        n4 = quantize_lm_4bit(vlm)
        log.info("QLoRA: %d linear layers of the LM hold 4-bit NF4 weights", n4)
    targets = resolve_lora_targets(vlm, lora.targets)
    released = isinstance(vlm, ReleasedVLM)
    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
        target_modules=vlm.lora_target_regex(targets) if released else lora_target_regex(targets),
    )
    if released:  # the whole transformers model is wrapped; the regex keeps the adapters inside its LM
        vlm.model = get_peft_model(vlm.model, config)
    else:
        vlm.lm = get_peft_model(vlm.lm, config)
    n = sum(1 for name, _ in vlm.named_modules() if name.endswith("lora_A"))
    if n == 0:
        raise ValueError(f"LoRA targets {targets!r} matched no module of the LM")
    log.info("LoRA r=%d alpha=%d on %d modules (targets %s)", lora.r, lora.alpha, n, targets)


def lora_modules(vlm: nn.Module, targets: str) -> set[str]:
    """Names (inside the LM) of the modules `targets` would put LoRA adapters on."""
    rx = re.compile(lora_target_regex(resolve_lora_targets(vlm, targets)))
    base = vlm.lm.get_base_model() if hasattr(vlm.lm, "get_base_model") else vlm.lm
    return {n for n, m in base.named_modules()
            if rx.fullmatch(n) and (isinstance(m, nn.Linear) or hasattr(m, "base_layer"))}


def adapters_match(vlm: nn.Module, lora: LoraSettings) -> bool:
    """True when the LM's LoRA adapters (e.g. from init_from) are those `lora` asks for: same rank, same
    modules. Training then continues them instead of folding them in under a fresh set."""
    peft_config = getattr(vlm.lm, "peft_config", None) or {}
    if "default" not in peft_config or peft_config["default"].r != lora.r:
        return False
    have = {n for n, m in vlm.lm.get_base_model().named_modules() if hasattr(m, "lora_A")}
    return have == lora_modules(vlm, lora.targets)


def apply_stage(vlm: nn.Module, cfg: TrainConfig, lora: LoraSettings,
                check: Callable[[nn.Module], None] | None = None) -> int:
    """The stage on a built VLM: LoRA adapters (sft with lora.r > 0), the trainable set, frozen towers in
    tower_dtype and fp32 master weights for what trains. The run and the memory plan (model/plan.py) both
    call it, so the plan models exactly what trains. `check` sees the trainable set before any cast.
    Returns how many trainable tensors moved to fp32."""
    if cfg.stage in ("sft", "dpo") and lora.r > 0:
        apply_lora(vlm, lora)
    set_trainable(vlm, cfg.stage, cfg.vision_lr, cfg.freeze, cfg.unfreeze)
    if check is not None:
        check(vlm)
    if getattr(vlm.config, "tower_dtype", None) is not None:  # a released wrapper keeps its own dtypes
        vlm.cast_frozen_towers()  # tower_dtype applies to frozen towers only (decided by the stage above)
    return upcast_trainable(vlm)  # frozen bases keep their dtype


def set_trainable(
    vlm: nn.Module,
    stage: str,
    vision_lr: float = 0.0,
    freeze: list[str] | None = None,
    unfreeze: list[str] | None = None,
) -> TrainableReport:
    """Set `requires_grad` on every parameter for `stage` and return (and log) the per-module report.

    Call after `apply_lora` for the `sft` stage: LoRA parameters are recognised by `lora_` in their name.
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; valid stages: {', '.join(STAGES)}")
    freeze_re = [re.compile(p) for p in (freeze or [])]
    unfreeze_re = [re.compile(p) for p in (unfreeze or [])]
    for name, p in vlm.named_parameters():
        part = part_of(name)
        if part == "projector":
            train = True
        elif part == "vision":
            train = vision_lr > 0
        elif name.startswith("lm.") or _released_part(name) == "lm":  # other names part_of calls "lm" stay frozen
            train = stage == "full" or (stage in ("sft", "dpo") and "lora_" in name)
        else:
            train = False
        if any(r.search(name) for r in freeze_re):
            train = False
        if any(r.search(name) for r in unfreeze_re):
            train = True
        # Quantised / integer weights can never take gradients.
        p.requires_grad_(train and p.is_floating_point())
    for pattern, rx in zip((freeze or []) + (unfreeze or []), freeze_re + unfreeze_re):
        if not any(rx.search(n) for n, _ in vlm.named_parameters()):
            log.warning("freeze/unfreeze regex %r matches no parameter", pattern)
    # Frozen towers run in eval mode (no dropout / batch-norm updates); VLM.train() keeps that.
    report = trainable_report(vlm)
    # Every module's state goes to the run's log file (DEBUG); the console gets one line per part.
    log.debug("stage=%s: trainable state of every module\n%s", stage, report.table())
    log.info("stage=%s: %s of %s parameters trainable (%s)", stage, f"{report.trainable:,}",
             f"{report.total:,}", report.parts_summary())
    if report.trainable == 0:
        raise ValueError(f"stage {stage!r} with the given freeze regexes leaves nothing to train")
    return report


def trainable_report(vlm: nn.Module) -> TrainableReport:
    """Per-module (direct parameters only) trainable / total counts, in module order."""
    rep = TrainableReport()
    seen: set[int] = set()  # tied weights (embedding / LM head) count once, under their first module
    for mname, module in vlm.named_modules():
        params = [p for p in module.parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for p in params)
        if not params:
            continue
        t = sum(p.numel() for p in params if p.requires_grad)
        n = sum(p.numel() for p in params)
        rep.modules[mname or "(root)"] = (t, n)
        rep.trainable += t
        rep.total += n
    return rep
