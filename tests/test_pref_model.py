"""The model side of preference tuning (model/preference.py, core/loss.py `sequence_logps`): per-sequence
log-probs equal a full-logits gather (values and gradients), each pair's images go through the tower once, and
the reference (adapters off + snapshot) equals a separate frozen copy after optimizer steps and after a reload."""

from __future__ import annotations

import copy

import pytest
import torch
from qwenvl_lab.model import load_vlm
from qwenvl_lab.model.preference import (
    Reference,
    full_logits_logps,
    pair_features,
    pair_logps,
    reference_logps,
)
from qwenvl_lab.model.stages import apply_lora, set_trainable
from qwenvl_lab.model.train_config import LoraSettings
from qwenvl_lab.trainer.pref_loss import LN2, preference_loss
from safetensors.torch import load_file, save_file

from tests.tiny_opt import tiny_vlm


def pair_batch(vlm, counts: list[int], seed: int = 0) -> dict:
    """B pairs: pair b has counts[b] images; both sides share the prompt, answers differ in length."""
    g = torch.Generator().manual_seed(seed)
    size = vlm.towers.image_size
    rows, labels = [], []
    prompts = []
    for b, c in enumerate(counts):
        ids = torch.randint(1, 200, (5 + b,), generator=g).tolist()
        for _ in range(c):
            ids += [vlm.image_token_id] * vlm.tokens_per_image + torch.randint(1, 200, (2,), generator=g).tolist()
        prompts.append(ids)
    for side in range(2):
        for b, p in enumerate(prompts):
            answer = torch.randint(1, 200, (3 + 2 * side + b,), generator=g).tolist()
            rows.append(p + answer)
            labels.append([-100] * len(p) + answer)
    T = max(len(r) for r in rows)
    input_ids = torch.zeros(len(rows), T, dtype=torch.long)
    lab = torch.full((len(rows), T), -100)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, (r, lb) in enumerate(zip(rows, labels)):
        input_ids[i, :len(r)], lab[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), torch.tensor(lb), 1
    n = sum(counts)
    pix = torch.randn(n, 3, size, size, generator=g) if n else None
    return {"input_ids": input_ids, "attention_mask": mask, "labels": lab, "pixel_values": pix,
            "image_counts": torch.tensor(counts)}


def _lora_vlm(tmp_path, backend="qwen", unfreeze=None):
    vlm = tiny_vlm(tmp_path, backend=backend)
    apply_lora(vlm, LoraSettings(r=4, alpha=8, dropout=0.0))
    set_trainable(vlm, "sft", unfreeze=unfreeze)
    return vlm


def _ours(vlm, batch):
    feats = pair_features(vlm, batch["pixel_values"])
    return pair_logps(vlm, batch["input_ids"], batch["attention_mask"], batch["labels"], batch["image_counts"], feats)


def _full(vlm, batch):
    """The reference computation: the images repeated per row and the model's full [2B, T, V] logits."""
    counts = batch["image_counts"].tolist()
    n_pairs = len(counts)
    pix = batch["pixel_values"]
    per_pair = list(torch.split(pix, counts)) if pix is not None else []
    pix2 = torch.cat(per_pair + per_pair) if pix is not None else None
    out = vlm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=pix2,
              image_counts=counts + counts, labels=batch["labels"], return_logits=True)
    assert out.logits.shape[0] == 2 * n_pairs
    return full_logits_logps(out.logits, batch["labels"])


@pytest.mark.parametrize("backend", ["qwen", "hf"])
def test_sequence_logps_equal_full_logits_gather_values_and_gradients(tmp_path, backend):
    vlm = _lora_vlm(tmp_path, backend)
    with torch.no_grad():  # non-zero adapters, so their gradients and values count
        for n, p in vlm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    vlm.loss_chunk_size = 7  # several chunks
    batch = pair_batch(vlm, [1, 0, 2])
    weights = torch.tensor([0.3, -1.0, 0.7, 1.1, -0.4, 0.9])
    results = []
    for fn in (_ours, _full):
        vlm.zero_grad(set_to_none=True)
        logps, counts = fn(vlm, batch)
        (logps * weights).sum().backward()
        grads = {n: p.grad.clone() for n, p in vlm.named_parameters() if p.grad is not None}
        results.append((logps.detach(), counts, grads))
    (a, ca, ga), (b, cb, gb) = results
    assert torch.equal(ca, cb) and ca.tolist() == [3, 4, 5, 5, 6, 7]
    assert torch.allclose(a, b, atol=1e-5, rtol=0), (a - b).abs().max()
    assert set(ga) == set(gb) and any("projector" in n for n in ga) and any("lora_A" in n for n in ga)
    for n in ga:
        assert torch.allclose(ga[n], gb[n], atol=1e-5, rtol=1e-4), (n, (ga[n] - gb[n]).abs().max())


class _Counter:
    def __init__(self, module):
        self.calls, self.images = 0, 0
        module.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.calls += 1
        self.images += int(args[0].shape[0])


def test_tower_runs_once_per_pair_for_policy_and_reference(tmp_path):
    vlm = _lora_vlm(tmp_path)
    ref = Reference(vlm)
    tower, projector = _Counter(vlm.towers), _Counter(vlm.projector)
    batch = pair_batch(vlm, [1, 2])
    feats = pair_features(vlm, batch["pixel_values"])
    logps, counts = pair_logps(vlm, batch["input_ids"], batch["attention_mask"], batch["labels"],
                               batch["image_counts"], feats)
    ref_logps = reference_logps(vlm, ref, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                batch["image_counts"], feats, batch["pixel_values"])
    assert tower.calls == 1 and tower.images == 3  # 3 pair images, not 6 (two sides) or 12 (and the reference)
    assert projector.calls == 2  # policy and reference projector, each once for both sides
    # step 0: LoRA B is zero and the snapshot is the current projector: policy == reference, DPO loss ln 2
    assert torch.allclose(logps, ref_logps, atol=1e-6)
    out = preference_loss("sigmoid", logps[:2], logps[2:], counts[:2], counts[2:], ref_logps[:2], ref_logps[2:])
    assert abs(out.loss.item() - LN2) < 1e-6


def _frozen_reference_logps(frozen, batch):
    with torch.no_grad(), frozen.lm.disable_adapter():
        logps, _ = _ours(frozen, batch)
    return logps


@pytest.mark.parametrize("towers_train", [False, True])
def test_reference_equals_frozen_copy_after_steps_and_after_reload(tmp_path, towers_train):
    unfreeze = [r"ln_f"] + ([r"^towers\."] if towers_train else [])  # trainable parts besides the adapters
    vlm = _lora_vlm(tmp_path, unfreeze=unfreeze)
    with torch.no_grad():  # adapters that already hold something: "off" must really switch them off
        for n, p in vlm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    frozen = copy.deepcopy(vlm).eval()
    ref = Reference(vlm)
    assert any(n.startswith("projector.") for n in ref.snapshot) and any("ln_f" in n for n in ref.snapshot)
    assert any(n.startswith("towers.") for n in ref.snapshot) == towers_train  # a training tower: rerun on its snapshot
    assert not any("lora_" in n for n in ref.snapshot)
    batch = pair_batch(vlm, [1, 1], seed=3)
    opt = torch.optim.AdamW([p for p in vlm.parameters() if p.requires_grad], lr=5e-2)
    vlm.train()
    for _ in range(3):  # K = 3 optimizer steps of DPO
        feats = pair_features(vlm, batch["pixel_values"])
        logps, counts = pair_logps(vlm, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                   batch["image_counts"], feats)
        r = reference_logps(vlm, ref, batch["input_ids"], batch["attention_mask"], batch["labels"],
                            batch["image_counts"], feats, batch["pixel_values"])
        loss = preference_loss("sigmoid", logps[:2], logps[2:], counts[:2], counts[2:], r[:2], r[2:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    want = _frozen_reference_logps(frozen, batch)
    got = reference_logps(vlm, ref, batch["input_ids"], batch["attention_mask"], batch["labels"],
                          batch["image_counts"], pair_features(vlm, batch["pixel_values"]), batch["pixel_values"])
    assert torch.allclose(got, want, atol=1e-6, rtol=0), (got - want).abs().max()
    with torch.no_grad():
        policy, _ = _ours(vlm, batch)
    assert (policy - want).abs().max() > 1e-2  # the policy did move: the check above is not vacuous
    assert vlm.training  # the reference pass put the mode back

    # resume: the trained model from its checkpoint, the snapshot from its safetensors file
    save_file(ref.state_dict(), str(tmp_path / "reference.safetensors"))
    vlm.save_pretrained(tmp_path / "ckpt")
    again = load_vlm(tmp_path / "ckpt")
    set_trainable(again, "sft", unfreeze=unfreeze)
    ref2 = Reference(again)  # snapshot of the TRAINED weights: wrong until the checkpoint's is loaded
    ref2.load_state_dict(load_file(str(tmp_path / "reference.safetensors")))
    got2 = reference_logps(again, ref2, batch["input_ids"], batch["attention_mask"], batch["labels"],
                           batch["image_counts"], pair_features(again, batch["pixel_values"]), batch["pixel_values"])
    assert torch.allclose(got2, want, atol=1e-6, rtol=0), (got2 - want).abs().max()


def test_mismatched_pair_batch_is_refused(tmp_path):
    vlm = _lora_vlm(tmp_path)
    batch = pair_batch(vlm, [1, 1])
    with pytest.raises(ValueError, match="2 rows per pair"):
        pair_logps(vlm, batch["input_ids"][:3], None, batch["labels"][:3], batch["image_counts"], None)
    with pytest.raises(ValueError, match="image_counts"):
        pair_logps(vlm, batch["input_ids"], None, batch["labels"], torch.tensor([1, 2]),
                   pair_features(vlm, batch["pixel_values"]))
