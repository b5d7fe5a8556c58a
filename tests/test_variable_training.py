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
    # the reloaded model answers the validation file (batched chat, images of several sizes)
    from qwenvl_lab.trainer.evaluate import answer_file

    val = data / "val.jsonl"
    assert answer_file(loaded, str(val), str(tmp_path / "answers.jsonl"), str(data), max_new_tokens=3) == 4

    # Killed after step 3: a second run holding only that checkpoint resumes and logs the same losses.
    resumed = tmp_path / "b" / "run"
    resumed.mkdir(parents=True)
    shutil.copytree(out / "checkpoint-3", resumed / "checkpoint-3")
    train(run_config(tmp_path / "b", data, towers, mode, max_steps=6, save_steps=3, resume_from_checkpoint="auto"))
    again = run_losses(resumed)
    assert sorted(again) == [4, 5, 6]
    assert all(again[s] == losses[s] for s in (4, 5, 6)), (losses, again)


# ----- FLOPs ----------------------------------------------------------------------------------------------
def _flops_vlm(tmp_path, **over):
    """test_bench's tiny VLM: CLIP d=32, 2 layers, MLP 64, patch 8 on 32 px; Qwen2 H=32; towers frozen."""
    from tests.test_bench import _tiny_vlm

    return _tiny_vlm(tmp_path, **over)


def _image_batch(vlm, sizes: list[tuple[int, int]]) -> dict:
    images = [Image.new("RGB", s, (40 * i, 90, 200)) for i, s in enumerate(sizes)]
    ids = torch.randint(0, 90, (1, 24))
    labels = torch.full((1, 24), -100)
    labels[0, 20:] = 5
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "image_counts": torch.tensor([len(images)]), **vlm.image_inputs(images)}


D, LAYERS, MLP = 32, 2, 64  # the tiny CLIP
TOWER_W = LAYERS * (4 * D * D + 2 * D * MLP) + 3 * 8 * 8 * D  # q, k, v, o, fc1, fc2 per layer + patch conv


def test_step_flops_native_is_the_sum_of_per_image_counts(tmp_path):
    from qwenvl_lab.model.flops import ModelDims, batch_stats, step_flops

    vlm = _flops_vlm(tmp_path, max_pixels=64 * 64, min_pixels=16 * 16, reduce="pixel_shuffle", reduce_factor=2)
    sizes = [(64, 40), (20, 60), (90, 30)]
    batch = _image_batch(vlm, sizes)
    grids = [vlm.resolution.layout(w, h).grid for w, h in sizes]
    assert batch["image_grid"].tolist() == [list(g) for g in grids] and len(set(grids)) == 3
    stats = batch_stats(batch)
    assert stats.image_count == 3 and stats.patches == sum(h * w for h, w in grids)
    flops = step_flops(ModelDims.from_model(vlm), stats)
    towers = projector = 0
    for h, w in grids:  # every image alone: its patches + CLIP's CLS row; frozen tower: forward only
        t = h * w + 1
        towers += 2 * TOWER_W * t + 4 * LAYERS * D * t * t
        projector += 6 * (4 * D * 32 + 32 * 32) * (h * w // 4)  # pixel shuffle 2x2 -> 128 in, mlp2x_gelu
    assert (flops["towers"], flops["projector"]) == (towers, projector)
    assert flops["total"] == sum(v for k, v in flops.items() if k != "total")


def test_step_flops_anyres_counts_every_crop(tmp_path):
    from qwenvl_lab.model.flops import ModelDims, batch_stats, step_flops

    vlm = _flops_vlm(tmp_path, image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]], multi_image="anyres")
    sizes = [(64, 30), (20, 60), (64, 64)]
    batch = _image_batch(vlm, sizes)
    crops = [vlm.resolution.layout(w, h, 3).crops for w, h in sizes]
    assert crops == [3, 3, 5] and batch["pixel_values"].shape[0] == 11
    stats = batch_stats(batch)
    assert (stats.images, stats.image_count) == (11, 3)  # the tower runs 11 times on 3 images
    flops = step_flops(ModelDims.from_model(vlm), stats)
    t = 17  # 16 patches + CLS per 32 px crop
    assert flops["towers"] == 11 * (2 * TOWER_W * t + 4 * LAYERS * D * t * t)
    assert flops["projector"] == 11 * 6 * (32 * 32 + 32 * 32) * 16  # unpadding drops rows after the projector


def test_throughput_logs_images_not_crops_or_zero(tmp_path):
    from qwenvl_lab.trainer.throughput import ThroughputCallback

    for over in ({"max_pixels": 64 * 64, "reduce": "pixel_shuffle", "reduce_factor": 2},
                 {"image_grid_pinpoints": [[32, 64], [64, 32], [64, 64]], "multi_image": "anyres"}):
        vlm = _flops_vlm(tmp_path / str(len(over)), **over)
        cb = ThroughputCallback(vlm, peak_flops=1e12)
        cb._count(vlm, (), _image_batch(vlm, [(64, 40), (20, 60)]))
        assert cb.totals["images"] == 2 and cb.totals["flops"] > 0, (over, cb.totals)


# ----- packing ----------------------------------------------------------------------------------------------
def _model_and_items(tmp_path, data, towers, mode, n: int = 6):
    """A fresh fp32 VLM of `mode` and the first `n` training items (spans of different lengths)."""
    from qwenvl_lab.model import build_vlm
    from qwenvl_lab.trainer.run import build_datasets

    model = dict(model_section(data, towers, mode), dtype="float32")
    cfg = tiny_train_config(tmp_path, data, model=model, max_length=400)
    torch.manual_seed(0)
    vlm = build_vlm(cfg.vlm_config())
    ds, _ = build_datasets(cfg, vlm)
    return vlm, [ds[i] for i in range(n)]


@pytest.mark.parametrize("mode", MODES)
def test_packed_logits_and_loss_equal_padded_with_variable_spans(tmp_path, data, towers, mode):
    from qwenvl_lab.dataset import Collator
    from qwenvl_lab.dataset.packing import PackingCollator

    vlm, items = _model_and_items(tmp_path, data, towers, mode)
    vlm.train()  # dropout is 0 in the tiny models: train mode is what packing serves
    spans = [int((it["input_ids"] == vlm.image_token_id).sum()) for it in items]
    sizes = torch.cat([it["image_sizes"] for it in items if "image_sizes" in it])
    distinct = 1 if mode == "naflex" else 2  # NaFlex fills max_num_patches: counts vary little with size
    assert len({tuple(s) for s in sizes.tolist()}) > 2 and len(set(spans)) > distinct, (sizes, spans)
    padded = Collator(pad_id=vlm.pad_token_id)(items)
    packed = PackingCollator()([items[:3], items[3:]])  # two packs back to back in one row
    for key in ("pixel_values", "image_sizes", "image_crops", "image_grid"):
        if key in padded:
            assert torch.equal(packed[key], padded[key]), key
    pad_out = vlm(**padded, return_logits=True)
    pack_out = vlm(**packed, return_logits=True)
    torch.testing.assert_close(pack_out.loss, pad_out.loss, rtol=0, atol=1e-5)
    start = 0
    for b, it in enumerate(items):
        n = len(it["input_ids"])
        torch.testing.assert_close(pack_out.logits[0, start:start + n], pad_out.logits[b, :n], rtol=0, atol=1e-5)
        start += n
    pad_out.loss.backward()
    g_pad = {k: p.grad.clone() for k, p in vlm.named_parameters() if p.grad is not None}
    vlm.zero_grad(set_to_none=True)
    pack_out.loss.backward()
    for k, p in vlm.named_parameters():
        if k in g_pad:
            torch.testing.assert_close(p.grad, g_pad[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("mode", ["anyres", "native"])
def test_training_run_with_packing_and_a_batch_image_budget(tmp_path, data, towers, mode):
    """packing=true through the Trainer: packs of variable spans under an image budget; resume is exact."""
    from qwenvl_lab.trainer.run import train

    kw = dict(packing=True, per_device_train_batch_size=1, max_steps=4, save_steps=2, max_batch_image_tokens=400)
    out = train(run_config(tmp_path / "a", data, towers, mode, **kw)).output_dir
    losses = run_losses(out)
    assert sorted(losses) == [1, 2, 3, 4] and all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    resumed = tmp_path / "b" / "run"
    resumed.mkdir(parents=True)
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    train(run_config(tmp_path / "b", data, towers, mode, resume_from_checkpoint="auto", **kw))
    again = run_losses(resumed)
    assert sorted(again) == [3, 4] and all(again[s] == losses[s] for s in (3, 4)), (losses, again)


# ----- export -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode, extra, key", [
    ("native", {}, "max_pixels"),
    ("naflex", {}, "hf_siglip2"),
    ("anyres", {"anyres_max": 2}, "anyres_max=2"),
    ("anyres", {"multi_image": "base"}, "multi_image='base'"),
])
def test_export_refuses_what_llava_next_cannot_express_in_one_line(tmp_path, data, towers, capsys, mode, extra, key):
    from qwenvl_lab.core.cli import run_cli
    from qwenvl_lab.model import build_vlm
    from qwenvl_lab.model.export import main

    model = {**model_section(data, towers, mode), **extra, "dtype": "float32"}
    cfg = tiny_train_config(tmp_path, data, model=model)
    build_vlm(cfg.vlm_config()).save_pretrained(tmp_path / "src")
    assert run_cli(main, ["--src", str(tmp_path / "src"), "--dst", str(tmp_path / "dst")]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip() and "it/s]" not in x]  # no progress bars
    assert len(err) == 1 and err[0].startswith("error: export:") and key in err[0], err
    assert not (tmp_path / "dst" / "config.json").exists()


# ----- checkpoints --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["native", "naflex"])
def test_trainable_only_checkpoint_of_a_native_model_reloads_equal(tmp_path, data, towers, mode):
    import json

    from qwenvl_lab.model import VLM
    from qwenvl_lab.model.stages import set_trainable

    vlm, items = _model_and_items(tmp_path, data, towers, mode, n=3)
    set_trainable(vlm, "align")  # the projector trains; towers and LM point at their base files
    with torch.no_grad():
        for p in vlm.projector.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # "trained": differs from a fresh build
    vlm.save_pretrained(tmp_path / "ck", trainable_only=True)
    again = VLM.from_pretrained(tmp_path / "ck")
    assert again.resolution == vlm.resolution
    a, b = vlm.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k].to(a[k].dtype)) for k in a)
    from qwenvl_lab.dataset import Collator

    batch = {k: v for k, v in dict(Collator(pad_id=vlm.pad_token_id)(items)).items() if k != "labels"}
    with torch.no_grad():
        assert torch.equal(vlm.eval()(**batch).logits, again.eval()(**batch).logits)

    meta = json.loads((tmp_path / "ck" / "vlm_config.json").read_text())
    facts, config = meta["checkpoint"], meta["config"]
    assert facts["kind"] == "trainable"
    tower = vlm.towers
    merge = 2 if mode == "native" else 1
    assert facts["tokens_per_image"] == tower.grid[0] * tower.grid[1] // merge**2 == vlm.tokens_per_image  # per crop
    assert facts["resolution"] == {"mode": mode, "max_tokens_per_image": vlm.resolution.max_tokens()}
    if mode == "native":
        assert (config["max_pixels"], config["min_pixels"]) == (64 * 64, 16 * 16)
        assert (config["reduce"], config["reduce_factor"]) == ("pixel_shuffle", 2)
    else:
        assert config["towers"][0]["backend"] == "hf_siglip2" and config["max_pixels"] is None


# ----- the plan -----------------------------------------------------------------------------------------------
def _worst_image(res) -> tuple[int, int]:
    """(width, height) of an image that gets `res.max_tokens()` tokens: a pinpoint's own size (anyres),
    a 200:1 strip over max_pixels (native: smart_resize keeps one merged row; Resolution.max_tokens),
    a square of max_num_patches patches (naflex)."""
    from qwenvl_lab.visual.resolution import sweep_sizes

    candidates = sweep_sizes(res) + [(4000, 20), (20, 4000), (res.patch_size * 16, res.patch_size * 16)]
    size = max(candidates, key=lambda s: res.tokens(*s))
    assert res.tokens(*size) == res.max_tokens(), (size, res.tokens(*size), res.max_tokens())
    return size


def _saved_bytes(model, fn) -> int:
    """Bytes autograd saves while `fn()` runs (the model's parameters and views of them excluded), each
    storage once (as tests/test_plan.py measures)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params and t.device.type == "cpu":
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("mode", ["anyres", "native"])
def test_plan_worst_case_image_and_its_activations(tmp_path, data, towers, mode, capsys):
    """The plan sizes the worst image (`Resolution.max_tokens`); its activation estimate (fp32, no
    checkpointing, everything training) is within 20% of what autograd saves for an image of that size."""
    from qwenvl_lab.model import plan as P
    from qwenvl_lab.trainer.run import build_model

    model = model_section(data, towers, mode)
    model["lm_config"].update(hidden_size=256, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                              intermediate_size=688, attn_impl="torch")
    model["dtype"] = "float32"
    T = 256
    cfg = tiny_train_config(tmp_path, data, model=model, max_length=T, per_device_train_batch_size=1)
    vlm = build_model(cfg).train()
    res = vlm.resolution
    plan = P.make_plan(cfg, gpus=1, gpu_mem_gib=80, device="cpu", seq=T, images=1, targets=T - 1 - res.max_tokens(),
                       micro_batch=1, dtype="float32")
    assert plan.image.worst == res.max_tokens() == plan.shape.image_tokens
    assert plan.image.per_image[2] == res.max_tokens() and plan.image.per_image[0] <= plan.image.per_image[1]

    # One sample of T tokens holding the worst image, every text position supervised.
    width, height = _worst_image(res)
    image = Image.new("RGB", (width, height), (200, 30, 90))
    n = res.max_tokens()
    ids = torch.randint(0, 200, (1, T))
    ids[0, 4:4 + n] = vlm.image_token_id
    labels = ids.masked_fill(ids == vlm.image_token_id, -100)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
             "image_counts": torch.tensor([1]), **vlm.image_inputs([image])}
    assert int((labels[0, 1:] != -100).sum()) == plan.shape.targets
    # the plan's FLOPs of the image side are those of this batch's (crops / patch grid of the worst image)
    from qwenvl_lab.model.flops import ModelDims, batch_stats, step_flops

    real = step_flops(ModelDims.from_model(vlm), batch_stats(batch))
    assert (plan.flops["towers"], plan.flops["projector"]) == (real["towers"], real["projector"])
    measured = _saved_bytes(vlm, lambda: vlm(**batch))
    est = plan.activations["no checkpointing"]
    # the head's logits chunk is transient (recomputed in backward); its input rows are saved
    saved = est["lm"] + est["projector"] + est["towers"] + plan.shape.targets * 256 * 4
    assert 0.8 < saved / measured < 1.2, (mode, est, saved, measured)
    # ... and the image part alone: the towers on the worst image's crops / patches (CLS rows, input pixels)
    if mode == "anyres":
        towers_saved = _saved_bytes(vlm, lambda: vlm.towers(batch["pixel_values"]))
    else:
        towers_saved = _saved_bytes(vlm, lambda: vlm.towers.forward_grid(batch["pixel_values"], batch["image_grid"]))
    assert 0.8 < est["towers"] / towers_saved < 1.2, (mode, est["towers"], towers_saved)

    assert P.main([str(tmp_path / "tiny_config.yaml"), "--gpus", "1", "--gpu-mem", "80"]) == 0
    out = capsys.readouterr().out
    lo, typ, hi = plan.image.per_image
    assert f"images: {mode} resolution; LM tokens per image min / typical / max = {lo} / {typ} / {hi}" in out
    assert f"planned for the worst case: 1 x {n} tokens" in out


@pytest.mark.parametrize("mode", MODES)
def test_unvalidated_lengths_bound_every_image_by_its_most_tokens(tmp_path, data, towers, mode):
    """validate_data=false: length grouping and packing read estimates; an image's estimate is the most
    tokens any image can get (no header read), never a square crop's count below what it really takes."""
    from qwenvl_lab.dataset.rendering import estimate_length
    from qwenvl_lab.model import build_vlm
    from qwenvl_lab.trainer.run import build_datasets

    cfg = tiny_train_config(tmp_path, data, model=model_section(data, towers, mode), max_length=4000,
                            validate_data=False)
    vlm = build_vlm(cfg.vlm_config())
    ds, _ = build_datasets(cfg, vlm)
    est, exact_images = ds.lengths, ds.image_tokens
    for i, k in enumerate(ds.index):
        s = ds.samples[k]
        image_part = est[i] - estimate_length(s, 0, ds.mode, ds.frames_per_video)
        assert image_part == len(s.images) * vlm.resolution.max_tokens(len(s.images))
        assert image_part >= exact_images[i] > 0


def _with_text_only(tmp_path: Path, data: Path, n_text: int = 4) -> Path:
    """The shapes training file plus `n_text` text-only conversations (no image key at all)."""
    import json

    lines = (data / "train.jsonl").read_text().splitlines()[:12]
    text = [json.dumps({"id": f"text{i}", "messages": [{"role": "user", "content": "Say hi"},
                                                        {"role": "assistant", "content": "hi"}]}) for i in range(n_text)]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(text[:2] + lines + text[2:]) + "\n")
    return path


@pytest.mark.parametrize("mode", ["anyres", "native"])
def test_text_only_samples_and_evaluation_during_a_variable_run(tmp_path, data, towers, mode):
    """Micro-batches mixing (or holding only) text-only samples, packed or not, and eval_loss at eval_steps."""
    from qwenvl_lab.dataset import Collator
    from qwenvl_lab.dataset.packing import PackingCollator
    from qwenvl_lab.trainer.callbacks import read_log
    from qwenvl_lab.trainer.run import build_datasets, train

    mixed = _with_text_only(tmp_path, data)
    vlm, items = _model_and_items(tmp_path, data, towers, mode, n=2)
    cfg = tiny_train_config(tmp_path, data, model=model_section(data, towers, mode), data_path=[str(mixed)],
                            max_length=400)
    ds, _ = build_datasets(cfg, vlm)
    text = [ds[0], ds[1]]
    assert all(it.get("pixel_values") is None or it["pixel_values"].numel() == 0 for it in text)
    with torch.no_grad():
        only = vlm(**Collator(pad_id=vlm.pad_token_id)(text)).loss
        padded = vlm(**Collator(pad_id=vlm.pad_token_id)(text[:1] + items)).loss
        packed = vlm(**PackingCollator()([text[:1] + items[:1], items[1:]])).loss
    assert torch.isfinite(only)
    torch.testing.assert_close(packed, padded, rtol=0, atol=1e-5)

    run = train(tiny_train_config(tmp_path / "run", data, model=model_section(data, towers, mode),
                                  data_path=[str(mixed)], eval_data_path=[str(data / "val.jsonl")], eval_steps=2,
                                  max_steps=4, max_length=400)).output_dir
    evals = [r["eval_loss"] for r in read_log(run / "log.jsonl") if "eval_loss" in r]
    assert len(evals) == 2 and all(torch.isfinite(torch.tensor(v)) for v in evals)
    assert sorted(run_losses(run)) == [1, 2, 3, 4]


def test_plan_cli_on_hub_configs_with_resolution_keys(capsys):
    """The real recipe (SigLIP 384/14: a 27x27 grid) with anyres / native keys: the images line and the worst
    case; a merge its square grid cannot split still builds in native mode; a bad pinpoint is one line."""
    from qwenvl_lab.core.cli import run_cli
    from qwenvl_lab.model import plan as P

    base = ["configs/qwen2.5_0.5b_siglip.yaml", "max_length=4096", "--gpus", "1", "--gpu-mem", "80"]
    assert P.main(base[:1] + ["model.image_grid_pinpoints=[[384,768],[768,384],[768,768]]"] + base[1:]) == 0
    out = capsys.readouterr().out
    assert "images: anyres resolution" in out and "planned for the worst case: 1 x 3699 tokens" in out
    assert P.main(base[:1] + ["model.max_pixels=401408"] + base[1:]) == 0  # 14 px patches: 2048 tokens at most
    assert "images: native resolution" in (out := capsys.readouterr().out) and "worst case: 1 x 2048 tokens" in out
    # Qwen2-VL's merge on SigLIP's 27x27 square grid: native mode never feeds the square, so it builds.
    merged = base[:1] + ["model.max_pixels=1003520", "model.reduce=pixel_shuffle", "model.reduce_factor=2"] + base[1:]
    assert P.main(merged) == 0  # 1003520 / 28**2 = 1280 = 32 x 40 merged tokens at most
    assert "worst case: 1 x 1280 tokens" in capsys.readouterr().out
    bad = base[:1] + ["model.image_grid_pinpoints=[[384,700]]"] + base[1:]
    assert run_cli(P.main, bad) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a multiple of the tower's image size 384" in err
