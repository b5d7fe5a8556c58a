"""Padding-free packing: packed loss and gradients equal the padded, unpacked ones; the sampler packs well."""

from __future__ import annotations

import pytest
import torch
from qwenvl_lab.dataset import Collator
from qwenvl_lab.dataset.packing import PackedDataset, PackingCollator, PackingSampler, first_fit_decreasing

from tests.tiny_opt import assert_same_grads, grads, sample_items, tiny_vlm


def _loss_and_grads(vlm, batch):
    vlm.zero_grad(set_to_none=True)
    loss = vlm(**batch).loss
    loss.backward()
    return loss.detach(), grads(vlm)


@pytest.mark.parametrize("return_logits", [None, True])
def test_packed_equals_unpacked(tmp_path, return_logits):
    vlm = tiny_vlm(tmp_path, backend="qwen")
    vlm.train()
    items = sample_items(vlm, [2, 0, 1, 1], seed=4)
    padded = Collator(pad_id=0)(items)
    packed = PackingCollator()([items[:2], items[2:]])  # two packs, one row
    lens = [len(it["input_ids"]) for it in items]
    assert packed["input_ids"].shape == (1, sum(lens))
    assert packed["cu_seqlens"].tolist() == [0, *torch.tensor(lens).cumsum(0).tolist()]
    assert packed["cu_seqlens"].dtype == torch.int32
    assert packed["position_ids"][0, lens[0]].item() == 0 and packed["position_ids"][0, lens[0] - 1] == lens[0] - 1
    assert packed["image_counts"].tolist() == [4] and packed.sample_image_counts == [2, 0, 1, 1]
    assert packed.pack_sizes == [2, 2] and "attention_mask" not in packed
    torch.testing.assert_close(packed["pixel_values"], padded["pixel_values"], rtol=0, atol=0)
    # The trainer normalises by labels[..., 1:] != -100: both layouts must count the same targets.
    assert int((packed["labels"][..., 1:] != -100).sum()) == int((padded["labels"][..., 1:] != -100).sum())

    kw = {} if return_logits is None else {"return_logits": True}
    l_pad, g_pad = _loss_and_grads(vlm, {**padded, **kw})
    l_pack, g_pack = _loss_and_grads(vlm, {**packed, **kw})
    torch.testing.assert_close(l_pack, l_pad, rtol=0, atol=1e-5)
    assert_same_grads(g_pack, g_pad)


def test_packing_isolates_samples(tmp_path):
    """Changing sample 0 must not change sample 1's logits inside the pack (no attention across)."""
    vlm = tiny_vlm(tmp_path, backend="qwen").eval()
    items = sample_items(vlm, [0, 1], seed=5)
    other = [dict(items[0], input_ids=items[0]["input_ids"].flip(0)), items[1]]
    with torch.no_grad():
        a = vlm(**PackingCollator()(items), return_logits=True).logits
        b = vlm(**PackingCollator()(other), return_logits=True).logits
        alone = vlm(**Collator(pad_id=0)([items[1]]), return_logits=True).logits
    n0 = len(items[0]["input_ids"])
    assert not torch.allclose(a[0, :n0], b[0, :n0])
    torch.testing.assert_close(a[0, n0:], b[0, n0:], rtol=0, atol=1e-5)
    torch.testing.assert_close(a[0, n0:], alone[0], rtol=0, atol=1e-5)


def test_hf_backend_refuses_packing(tmp_path):
    vlm = tiny_vlm(tmp_path, backend="hf")
    batch = PackingCollator()(sample_items(vlm, [1, 0]))
    with pytest.raises(ValueError, match="packing=false"):
        vlm(**batch)


def test_first_fit_decreasing_and_sampler():
    lengths = [7, 3, 5, 2, 9, 4, 1, 6, 8, 12]
    bins = first_fit_decreasing(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins if len(b) > 1)
    assert [9] in bins  # 12 > capacity: alone
    assert sorted(map(sorted, bins)) == [[0, 1], [2], [3, 8], [4, 6], [5, 7], [9]]  # 12 | 9+1 8+2 7+3 6+4 | 5
    s = PackingSampler(lengths, max_length=10, batch_size=4, seed=1, megabatch_size=100)
    packs = list(s)
    assert len(packs) == len(s) == 8  # 6 packs padded to a multiple of 4
    assert sum(lengths[i] for i in packs[0]) == max(sum(lengths[i] for i in p) for p in packs)
    assert sorted(i for p in packs[:6] for i in p) == list(range(len(lengths)))
    s.set_epoch(1)
    assert len(list(s)) == 8 and sorted(map(sorted, s.packs)) == sorted(map(sorted, packs[:6]))
    ds = PackedDataset(list(range(100, 110)))
    assert ds[[2, 5]] == [102, 105]


def test_training_run_with_packing(tmp_path, monkeypatch):
    import qwenvl_lab.model.model as model_module
    from qwenvl_lab.core.config_io import ConfigError
    from qwenvl_lab.trainer.callbacks import read_log
    from qwenvl_lab.trainer.run import build_model, train

    from tests.tiny_train import make_tiny_data, tiny_train_config

    seen = []
    forward = model_module.VLM.forward

    def spy(self, *a, **kw):
        seen.append((kw["input_ids"].shape[0], len(kw["cu_seqlens"]) - 1 if "cu_seqlens" in kw else None))
        return forward(self, *a, **kw)

    monkeypatch.setattr(model_module.VLM, "forward", spy)
    data = make_tiny_data(tmp_path / "data")
    cfg = tiny_train_config(tmp_path, data, packing=True, per_device_train_batch_size=1,
                            gradient_accumulation_steps=2, max_steps=3)
    result = train(cfg)
    log = read_log(result.output_dir / "log.jsonl")
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(v)) for v in losses)
    assert all(rows == 1 and n for rows, n in seen), seen  # every batch is one packed row
    assert max(n for _, n in seen) > 1, seen  # several samples per pack
    hf = tiny_train_config(tmp_path, data, packing=True)
    hf.model = dict(hf.model, lm_backend="hf", lm_config=dict(hf.model["lm_config"], model_type="qwen2"))
    with pytest.raises(ConfigError, match="packing=true needs"):
        build_model(hf)


def test_packing_samples_trains_as_padded(tmp_path, monkeypatch):
    """packing=samples: every micro-batch is ONE row holding the same samples padding would batch, and the run's
    micro-batch losses and final weights equal the padded run's."""
    import qwenvl_lab.model.model as model_module
    from qwenvl_lab.trainer.run import train

    from tests.tiny_train import make_tiny_data, run_losses, tiny_train_config

    forward = model_module.VLM.forward
    seen: list[tuple[int, int | None, float]] = []

    def spy(self, *a, **kw):
        out = forward(self, *a, **kw)
        samples = len(kw["cu_seqlens"]) - 1 if "cu_seqlens" in kw else None
        seen.append((kw["input_ids"].shape[0], samples, float(out.loss.detach())))
        return out

    monkeypatch.setattr(model_module.VLM, "forward", spy)
    data = make_tiny_data(tmp_path / "data")
    runs, calls = {}, {}
    for packing in (False, "samples"):
        seen.clear()
        cfg = tiny_train_config(tmp_path / str(packing), data, packing=packing, per_device_train_batch_size=3,
                                gradient_accumulation_steps=2, max_steps=3)
        runs[packing] = train(cfg).output_dir
        calls[packing] = list(seen)
    padded, packed = calls[False], calls["samples"]
    assert len(padded) == len(packed) == 6
    assert all(rows == 3 and n is None for rows, n, _ in padded)  # three padded rows per micro-batch
    assert all(rows == 1 and n == 3 for rows, n, _ in packed)  # the same three samples in one row
    for (_, _, a), (_, _, b) in zip(padded, packed):
        assert abs(a - b) <= 1e-5, (a, b)
    assert run_losses(runs[False]) == pytest.approx(run_losses(runs["samples"]), abs=1e-4)
    from safetensors.torch import load_file

    def final(run):
        files = sorted((run / "final").rglob("*.safetensors"))
        assert files, f"no weights under {run / 'final'}"
        return {f"{f.name}:{k}": v for f in files for k, v in load_file(f).items()}

    a, b = final(runs[False]), final(runs["samples"])
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)
