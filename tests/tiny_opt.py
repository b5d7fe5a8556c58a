"""Helpers for the optimisation tests (tiny VLMs, batches, gradient comparison); holds no test."""

from __future__ import annotations

from pathlib import Path

import torch
from qwenvl_lab.model import VLM, build_vlm

from tests.tiny_model import randomize_, tiny_tower_spec

QWEN_LM = {"arch": "qwen2", "vocab_size": 300, "hidden_size": 32, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 48,
           "max_position_embeddings": 256}
LLAMA_LM = {"model_type": "llama", "vocab_size": 300, "hidden_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 48,
            "max_position_embeddings": 256}
IMAGE_TOKEN = 250


def tiny_vlm(tmp_path: Path, backend: str = "qwen", tied: bool = False, tower: str = "timm_cnn", **kw) -> VLM:
    """A scratch LM (qwen or transformers Llama) + a tiny tower, randomised so every weight matters."""
    lm_cfg = dict(QWEN_LM if backend == "qwen" else LLAMA_LM, tie_word_embeddings=tied)
    cfg = dict(lm="scratch", lm_backend=backend, lm_config=lm_cfg, towers=[tiny_tower_spec(tmp_path, tower)],
               image_token_id=IMAGE_TOKEN, image_mode="resize", projector="mlp2x_gelu",
               reduce="avg_pool", reduce_factor=2)
    cfg.update(kw)
    vlm = build_vlm(cfg)
    randomize_(vlm, seed=1)
    if tied:  # randomize_ visits the tied matrix once; make sure it is still one tensor
        assert vlm.lm.get_output_embeddings().weight is vlm.lm.get_input_embeddings().weight
    return vlm


def sample_items(vlm: VLM, counts: list[int], seed: int = 0, text_len: int = 6) -> list[dict]:
    """Dataset-like items: sample i has counts[i] images; only some text positions are supervised."""
    g = torch.Generator().manual_seed(seed)
    size = vlm.towers.image_size
    items = []
    for i, c in enumerate(counts):
        ids: list[int] = torch.randint(1, 200, (text_len + i,), generator=g).tolist()
        for _ in range(c):
            ids += [vlm.image_token_id] * vlm.tokens_per_image + torch.randint(1, 200, (3,), generator=g).tolist()
        ids += torch.randint(1, 200, (4 + i,), generator=g).tolist()  # the "answer"
        labels = [-100] * len(ids)
        for t in range(len(ids) - 4 - i, len(ids)):
            labels[t] = ids[t]
        labels[2] = ids[2]  # one early target too
        items.append({
            "input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
            "pixel_values": torch.randn(c, 3, size, size, generator=g) if c else None,
            "n_images": c, "id": f"s{i}", "skipped": [],
        })
    return items


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    assert a, "no gradient at all"
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=name)
