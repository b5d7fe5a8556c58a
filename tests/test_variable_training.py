"""Training with images at their own resolution (anyres, native, NaFlex) end to end on tiny models.

- train.py's library call on the tiny shapes data with every image resized to one of several sizes and
  aspect ratios: finite losses, the run directory reloads with the same resolution and the same logits,
  resume reproduces the loss curve exactly (as tests/test_train.py checks for fixed mode);
- packing (qwen backend) with spans of different lengths: packed logits and loss equal the padded ones;
- FLOPs of native / anyres batches against counts by hand; the plan's worst case; export refusals;
  trainable-only checkpoints of a native model.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.tiny_model import tiny_tower_spec
from tests.tiny_train import make_tiny_data, run_losses, tiny_model_section, tiny_train_config

SIZES = [(32, 32), (48, 20), (20, 60), (64, 40), (17, 33), (90, 30), (40, 96)]  # (width, height)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The shapes data with every image resized to a size drawn from SIZES (mixed aspect ratios)."""
    root = make_tiny_data(tmp_path_factory.mktemp("shapes_mixed"), n_train=24, n_val=4)
    rng = random.Random(0)
    for path in sorted((root / "images").rglob("*.png")):
        Image.open(path).convert("RGB").resize(rng.choice(SIZES)).save(path)
    return root


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    return tmp_path_factory.mktemp("towers")


def model_section(data: Path, towers: Path, mode: str) -> dict:
    """The tiny scratch Qwen2 LM with a tiny CLIP (32 px, patch 8) or SigLIP2 tower in `mode`."""
    model = tiny_model_section(data)
    model["lm_config"]["max_position_embeddings"] = 512
    if mode == "naflex":
        from tests.tiny_visual import save_tiny_siglip2

        path = towers / "siglip2"
        if not path.exists():
            save_tiny_siglip2(path, num_patches=16, patch_size=8)
        model["towers"] = [{"backend": "hf_siglip2", "name_or_path": str(path), "feature_layer": -2,
                            "select": "patch"}]
        return model
    model["towers"] = [tiny_tower_spec(towers, "clip")]
    if mode == "anyres":
        model.update(image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]], multi_image="anyres")
    elif mode == "native":
        model.update(max_pixels=64 * 64, min_pixels=16 * 16, reduce="pixel_shuffle", reduce_factor=2)
    return model


def run_config(tmp: Path, data: Path, towers: Path, mode: str, **overrides):
    return tiny_train_config(tmp, data, model=model_section(data, towers, mode), max_length=400, **overrides)


def first_batch(vlm, cfg, n: int = 4) -> dict:
    """The first `n` training samples of `cfg` as the model sees them (the run's own dataset and collator)."""
    from qwenvl_lab.dataset import Collator
    from qwenvl_lab.trainer.run import build_datasets

    ds, _ = build_datasets(cfg, vlm)
    return {k: v for k, v in dict(Collator(pad_id=vlm.pad_token_id)([ds[i] for i in range(n)])).items()
            if k not in ("labels", "skipped_records")}


MODES = ["anyres", "native", "naflex"]


@pytest.mark.parametrize("mode", MODES)
def test_train_reload_and_resume_with_mixed_image_sizes(tmp_path, data, towers, mode):
    from qwenvl_lab.model import VLM
    from qwenvl_lab.trainer.run import train

    cfg = run_config(tmp_path / "a", data, towers, mode, max_steps=6, save_steps=3)
    result = train(cfg)
    out = result.output_dir
    losses = run_losses(out)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values()), losses

    trained = result.model.eval()
    loaded = VLM.from_pretrained(out / "final").eval()
    assert loaded.resolution == trained.resolution and loaded.resolution.mode == mode
    batch = first_batch(loaded, cfg)
    sizes = {tuple(s) for s in batch["image_sizes"].tolist()}
    assert len(sizes) > 1, sizes  # the batch really mixes sizes
    with torch.no_grad():
        assert torch.equal(trained(**batch).logits, loaded(**batch).logits)

    # Killed after step 3: a second run holding only that checkpoint resumes and logs the same losses.
    resumed = tmp_path / "b" / "run"
    resumed.mkdir(parents=True)
    shutil.copytree(out / "checkpoint-3", resumed / "checkpoint-3")
    train(run_config(tmp_path / "b", data, towers, mode, max_steps=6, save_steps=3, resume_from_checkpoint="auto"))
    again = run_losses(resumed)
    assert sorted(again) == [4, 5, 6]
    assert all(again[s] == losses[s] for s in (4, 5, 6)), (losses, again)
