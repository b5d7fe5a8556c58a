"""Stage 1 with cached tower features (same loss as with pixels, mismatched caches refused) and
frozen towers in bf16."""

from __future__ import annotations

import pytest
import torch
from qwenvl_lab.dataset import Collator, VLMDataset
from qwenvl_lab.dataset.feature_cache import FeatureCache, FeatureCacheMismatch, tower_identity
from qwenvl_lab.model import VLM, build_vlm

from tests.tiny_model import randomize_
from tests.tiny_opt import assert_same_grads, grads, tiny_vlm
from tests.tiny_train import make_tiny_data, tiny_model_section


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_data(tmp_path_factory.mktemp("shapes_cache"))


@pytest.fixture(scope="module")
def cached(data, tmp_path_factory):
    """A saved frozen-tower VLM and the feature cache written by the command line entry point."""
    from qwenvl_lab.dataprocess.cache_features import main

    root = tmp_path_factory.mktemp("cache_run")
    vlm = build_vlm(dict(tiny_model_section(data), freeze_towers=True))
    randomize_(vlm.projector, seed=2)
    vlm.save_pretrained(root / "model")
    rc = main(["--model", str(root / "model"), "--data", str(data / "train.jsonl"), "--image-folder", str(data),
               "--out", str(root / "cache"), "--batch-size", "5", "--shard-images", "7"])
    assert rc == 0
    return root / "model", root / "cache"


def _datasets(vlm, data, cache):
    kw = dict(tokenizer=vlm.tokenizer, image_processor=vlm.image_processor, tokens_per_image=vlm.tokens_per_image,
              image_folder=str(data), max_length=160)
    return (VLMDataset(str(data / "train.jsonl"), **kw),
            VLMDataset(str(data / "train.jsonl"), feature_cache=str(cache), **kw))


def test_cached_features_give_the_same_loss_and_grads(data, cached, monkeypatch):
    model_dir, cache_dir = cached
    vlm = VLM.from_pretrained(model_dir).train()
    cache = FeatureCache(cache_dir)
    assert len(cache) > 7  # several shards were written
    assert len(list(cache_dir.glob("features-*.safetensors"))) == -(-len(cache) // 7)
    cache.check(tower_identity(vlm.towers, vlm.config.towers, vlm.config.image_mode))
    pix_ds, feat_ds = _datasets(vlm, data, cache_dir)
    idx = [i for i in range(len(pix_ds)) if pix_ds.samples[pix_ds.index[i]].images][:4] + [len(pix_ds) - 1]
    batch_pix = Collator(vlm.tokenizer.eod_id)([pix_ds[i] for i in idx])

    import qwenvl_lab.dataset.dataset as dataset_module

    def no_decode(*a, **k):
        raise AssertionError("a feature-cache dataset decoded an image")

    monkeypatch.setattr(dataset_module, "load_image", no_decode)
    batch_feat = Collator(vlm.tokenizer.eod_id)([feat_ds[i] for i in idx])
    assert batch_feat["pixel_values"] is None
    assert batch_feat["image_features"].shape == (batch_pix["pixel_values"].shape[0], vlm.towers.num_tokens,
                                                   vlm.towers.hidden_size)
    torch.testing.assert_close(batch_feat["input_ids"], batch_pix["input_ids"], rtol=0, atol=0)

    vlm.zero_grad(set_to_none=True)
    loss_pix = vlm(**batch_pix).loss
    loss_pix.backward()
    g_pix = grads(vlm)
    vlm.zero_grad(set_to_none=True)
    hook = vlm.towers.register_forward_hook(lambda *a: (_ for _ in ()).throw(AssertionError("tower ran")))
    loss_feat = vlm(**batch_feat).loss
    loss_feat.backward()
    hook.remove()
    torch.testing.assert_close(loss_feat, loss_pix, rtol=0, atol=1e-5)
    assert_same_grads(grads(vlm), g_pix)


def test_mismatched_cache_is_refused(data, cached):
    model_dir, cache_dir = cached
    other = build_vlm(dict(tiny_model_section(data), freeze_towers=True))
    randomize_(other.towers, seed=9)  # same architecture, other weights
    with pytest.raises(FeatureCacheMismatch, match="fingerprint"):
        FeatureCache(cache_dir).check(tower_identity(other.towers, other.config.towers, other.config.image_mode))
    spec = dict(other.config.towers[0], feature_layer=-2)
    with pytest.raises(FeatureCacheMismatch, match="towers"):
        FeatureCache(cache_dir).check(tower_identity(other.towers, [spec], other.config.image_mode))
    with pytest.raises(FeatureCacheMismatch, match="no feature_cache.json"):
        FeatureCache(model_dir)
    # Wrong-width features given to the VLM directly are refused with the expected shape.
    vlm = VLM.from_pretrained(model_dir)
    bad = torch.zeros(1, vlm.towers.num_tokens, vlm.towers.hidden_size + 1)
    ids = torch.tensor([[1] + [vlm.image_token_id] * vlm.tokens_per_image + [2]])
    with pytest.raises(ValueError, match="image features must be"):
        vlm(ids, image_features=bad)


def test_training_config_checks_and_runs(data, cached, tmp_path):
    from qwenvl_lab.core.config_io import ConfigError
    from qwenvl_lab.trainer.run import build_model, train

    from tests.tiny_train import tiny_train_config

    model_dir, cache_dir = cached
    cfg = tiny_train_config(tmp_path, data, feature_cache=str(cache_dir), vision_lr=1e-3)
    with pytest.raises(ConfigError, match="frozen towers"):
        build_model(cfg)  # the towers train: cached features would go stale
    section = tiny_model_section(data)
    section["towers"] = [dict(section["towers"][0], feature_layer=-2)]
    cfg = tiny_train_config(tmp_path, data, feature_cache=str(cache_dir), vision_lr=0.0, stage="align",
                            model=section)
    with pytest.raises(ConfigError, match="another vision tower"):
        build_model(cfg)  # another feature layer: not what the cache holds
    # Stage 1 from the model the cache was written with: trains on cached features.
    cfg = tiny_train_config(tmp_path, data, feature_cache=str(cache_dir), vision_lr=0.0, stage="align",
                            init_from=str(model_dir), model={}, max_steps=2)
    result = train(cfg)
    losses = [r["loss"] for r in _log(result.output_dir) if "loss" in r]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(v)) for v in losses)


def _log(run_dir):
    from qwenvl_lab.trainer.callbacks import read_log

    return read_log(run_dir / "log.jsonl")


def test_frozen_towers_in_bf16(tmp_path):
    ref = tiny_vlm(tmp_path, backend="qwen", tower="clip")
    vlm = tiny_vlm(tmp_path, backend="qwen", tower="clip", tower_dtype="bfloat16")
    vlm.load_state_dict(ref.state_dict())  # same weights, towers rounded to bf16
    vlm.cast_frozen_towers()
    assert {p.dtype for p in vlm.towers.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in vlm.projector.parameters()} == {torch.float32}
    assert {p.dtype for p in vlm.lm.parameters()} == {torch.float32}
    px = torch.randn(2, 3, vlm.towers.image_size, vlm.towers.image_size)
    rows, rows_ref = vlm.encode_images(px), ref.encode_images(px)
    assert rows.dtype == torch.float32 and rows.requires_grad  # the projector still trains
    assert not torch.equal(rows, rows_ref)  # the tower really ran in bf16 ...
    torch.testing.assert_close(rows, rows_ref, rtol=0.05, atol=0.05)  # ... and agrees to bf16 precision
    # The cache identity survives the cast; a trainable tower stays in the model dtype.
    assert (tower_identity(vlm.towers, vlm.config.towers, "resize")["fingerprint"]
            == tower_identity(ref.towers, ref.config.towers, "resize")["fingerprint"])
    vlm.towers.requires_grad_(True)
    vlm.cast_frozen_towers()
    assert {p.dtype for p in vlm.towers.parameters()} == {torch.float32}
    with pytest.raises(ValueError, match="tower_dtype"):
        tiny_vlm(tmp_path, tower_dtype="float16")
