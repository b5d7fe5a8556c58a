"""Every YAML recipe in configs/ parses and builds, with tiny local stand-ins for its hub models.

The stand-ins keep each recipe's own choices (preset, stage, LoRA targets and rank, learning rates, tower
backend and feature layer); only the checkpoint paths (and the demo's data paths) are swapped.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from qwenvl_lab.model.model import PRESETS
from qwenvl_lab.model.stages import part_of, resolve_lora_targets
from qwenvl_lab.model.train_config import load_train_config
from qwenvl_lab.trainer.optim import param_groups
from qwenvl_lab.trainer.run import build_model

from tests.test_families import write_released
from tests.test_families_idefics import write_released as write_tiled_released
from tests.test_families_native import save_llava_next_qwen
from tests.tiny_model import build_tiny_vlm, tiny_lm_dir, tiny_tower_spec
from tests.tiny_train import make_tiny_data

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(CONFIG_DIR.rglob("*.yaml"))
# Which tiny LM stands in for each preset's hub LM (same Qwen generation).
LM_ARCH = {"Qwen/Qwen-7B-Chat": "qwen1", "Qwen/Qwen-1_8B-Chat": "qwen1", "Qwen/Qwen2.5-0.5B-Instruct": "qwen2"}
TOWER_KIND = {"hf_siglip": "siglip", "hf_clip": "clip"}


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    root = tmp_path_factory.mktemp("stand_ins")
    data = make_tiny_data(root / "shapes")
    # A saved stage-1 model for recipes that start from one (init_from).
    stage1 = root / "stage1_final"
    vlm = build_tiny_vlm(root, tower="clip", lm_arch="qwen1")
    vlm.save_pretrained(stage1, trainable_only=True)
    return root, data, stage1


def _released_stand_in(root: Path, path: Path) -> Path:
    """configs/released/<family>_*.yaml: a tiny released checkpoint of that family (tests/test_families.py,
    tests/test_families_idefics.py, tests/tiny_llava_video.py)."""
    family = next(f for f in ("qwen2_5_vl", "qwen2_vl", "idefics3", "smolvlm", "llava_onevision", "llava_next_video",
                              "llava_next")
                  if path.name.startswith(f))
    out = root / f"released_{family}"
    if out.is_dir():
        return out
    if family == "llava_next":  # a native family: a tiny LLaVA-NeXT (tests/test_families_native.py)
        return save_llava_next_qwen(out)
    if family.startswith("llava"):
        from tests.tiny_llava_video import save_next_video, save_onevision

        return (save_onevision if family == "llava_onevision" else save_next_video)(out)
    write = write_tiled_released if family in ("idefics3", "smolvlm") else write_released
    return write(out, family)


def _stand_in_overrides(raw: dict, root: Path, data: Path, stage1: Path, path: Path | None = None) -> list[str]:
    over = [f"data_path=[{data / 'train.jsonl'}]", f"image_folder={data}", f"output_dir={root / 'out'}"]
    if path is not None and path.parent.name == "released":
        over.append(f"init_from={_released_stand_in(root, path)}")
    elif raw.get("init_from"):
        over.append(f"init_from={stage1}")
    preset = raw.get("preset")
    if preset:
        spec = PRESETS[preset]
        over.append(f"model.lm={tiny_lm_dir(root, LM_ARCH[spec['lm']])}")
        towers = []
        for t in spec["towers"]:
            tiny = tiny_tower_spec(root, TOWER_KIND[t["backend"]])
            towers.append({**t, "name_or_path": tiny["name_or_path"]})
        over.append("model.towers=" + yaml.safe_dump(towers, default_flow_style=True).strip())
    elif raw.get("model", {}).get("tokenizer"):
        over.append(f"model.tokenizer={data / 'vocab'}")  # the demo's learned vocabulary
    return over


def test_configs_exist():
    names = {p.relative_to(CONFIG_DIR).as_posix() for p in CONFIGS}
    assert {"demo/stage1.yaml", "demo/stage2_sft.yaml", "qwen7b_siglip_lora.yaml", "qwen2.5_0.5b_siglip.yaml",
            "llava15_qwen1.8b_clip336/stage1_align.yaml", "llava15_qwen1.8b_clip336/stage2_lora.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(CONFIG_DIR).as_posix())
def test_config_parses_and_builds(path, stand_ins):
    root, data, stage1 = stand_ins
    raw = yaml.safe_load(path.read_text())
    cfg = load_train_config(str(path), _stand_in_overrides(raw, root, data, stage1, path))
    vlm = build_model(cfg)
    trainable = {n for n, p in vlm.named_parameters() if p.requires_grad}
    assert any(part_of(n) == "projector" for n in trainable)
    if cfg.stage == "align":
        assert all(part_of(n) == "projector" for n in trainable)
    if cfg.stage == "sft":
        lora = [n for n in trainable if "lora_" in n]
        assert lora, "LoRA targets matched nothing"
        targets = resolve_lora_targets(vlm, cfg.lora.targets).split("|")  # "" = the family's / backbone's default
        assert all(any(f".{t}.lora_" in n for t in targets) for n in lora)
        a = next(m for name, m in vlm.lm.named_modules() if name.endswith("lora_A.default"))
        assert a.weight.shape[0] == cfg.lora.r
    groups = {g["name"]: g["lr"] for g in param_groups(vlm, cfg.learning_rate, cfg.projector_lr,
                                                       cfg.vision_lr, cfg.weight_decay)}
    assert groups["projector"] == (cfg.projector_lr if cfg.projector_lr is not None else cfg.learning_rate)
    if "lm" in groups:
        assert groups["lm"] == cfg.learning_rate


def test_original_recipe_values():
    cfg = yaml.safe_load((CONFIG_DIR / "qwen7b_siglip_lora.yaml").read_text())
    assert cfg["preset"] == "qwen7b-siglip" and cfg["lora"]["r"] == 128
    assert cfg["lora"]["targets"] == "c_attn|w1|w2"
    assert float(cfg["learning_rate"]) == 3e-5 and float(cfg["projector_lr"]) == 1e-4
    assert PRESETS["qwen7b-siglip"]["towers"][0]["name_or_path"] == "google/siglip-so400m-patch14-384"


@pytest.mark.parametrize("path", [p for p in CONFIGS if "packing" in yaml.safe_load(p.read_text())],
                         ids=lambda p: p.relative_to(CONFIG_DIR).as_posix())
def test_packing_is_on_or_says_why(path):
    """Each recipe packs where it is exact (our qwen LM), or its packing line says why not."""
    line = next(x for x in path.read_text().splitlines() if x.startswith("packing:"))
    if "packing: false" in line:
        assert "#" in line and len(line.split("#", 1)[1].strip()) > 10, f"{path}: packing off without a reason"


@pytest.mark.parametrize("path", [p for p in CONFIGS if yaml.safe_load(p.read_text()).get("packing") == "samples"],
                         ids=lambda p: p.relative_to(CONFIG_DIR).as_posix())
def test_recipes_packed_by_default_give_the_padded_loss(path, stand_ins):
    """A recipe with packing=samples, built on its tiny stand-ins: one micro-batch's loss packed into one row
    equals the same samples padded (1e-5), in eval mode and in the training forward."""
    import torch
    from qwenvl_lab.dataset import Collator
    from qwenvl_lab.dataset.packing import PackingCollator
    from qwenvl_lab.trainer.run import build_datasets

    root, data, stage1 = stand_ins
    raw = yaml.safe_load(path.read_text())
    cfg = load_train_config(str(path), _stand_in_overrides(raw, root, data, stage1, path))
    vlm = build_model(cfg).float().eval()
    train_ds, _ = build_datasets(cfg, vlm)
    items = [train_ds[i] for i in range(3)]
    padded = Collator(pad_id=vlm.pad_token_id)(items)
    packed = PackingCollator()(items)
    assert packed["input_ids"].shape[0] == 1 and len(packed["cu_seqlens"]) == 4
    with torch.no_grad():
        a = vlm(**padded).loss
        b = vlm(**packed).loss
        vlm.train()  # the training forward (the LM's last block at target positions only)
        c = vlm(**padded).loss
        d = vlm(**packed).loss
    assert abs(float(a) - float(b)) <= 1e-5, (float(a), float(b))
    assert abs(float(c) - float(d)) <= 1e-5 and abs(float(a) - float(c)) <= 1e-5, (float(a), float(c), float(d))
