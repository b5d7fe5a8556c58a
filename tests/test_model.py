"""The VLM: placeholder placement with 0/1/many images, both LM backends, Llava import, save/load, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from qwenvl_lab.model import PRESETS, VLM, VLMConfig, build_projector, build_vlm, resolve_config

from tests.tiny_model import build_tiny_vlm, save_tiny_llava, tiny_llama_dir, tiny_tower_spec


def make_batch(vlm: VLM, counts: list[int], text_len: int = 5, seed: int = 0):
    """Right-padded batch: sample b has counts[b] images, each a run of tokens_per_image placeholders."""
    g = torch.Generator().manual_seed(seed)
    n_tok = vlm.tokens_per_image

    def text(n: int) -> list[int]:  # text ids in 1..99, never the placeholder
        return [i if i != vlm.image_token_id else i + 1 for i in torch.randint(1, 99, (n,), generator=g).tolist()]

    rows = []
    for c in counts:
        ids = text(text_len)
        for _ in range(c):
            ids += [vlm.image_token_id] * n_tok + text(2)
        rows.append(ids)
    T = max(len(r) for r in rows) + 1  # at least one pad column
    input_ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        input_ids[b, : len(r)] = torch.tensor(r)
        mask[b, : len(r)] = 1
    labels = input_ids.masked_fill((mask == 0) | (input_ids == vlm.image_token_id), -100)
    size = vlm.towers.image_size
    pixel_values = torch.randn(sum(counts), 3, size, size, generator=g)
    return dict(input_ids=input_ids, attention_mask=mask, labels=labels, pixel_values=pixel_values,
                image_counts=torch.tensor(counts))


def capture_lm_inputs(vlm: VLM) -> dict:
    """Hook the LM's first layer (qwen) / decoder (hf) to capture the input embeddings it receives."""
    seen: dict = {}
    if vlm.config.lm_backend == "qwen":
        def hook(mod, args, kwargs):
            seen["embeds"] = args[0].detach()
        vlm.lm.transformer.h[0].register_forward_pre_hook(hook, with_kwargs=True)
    else:
        def hook(mod, args, kwargs):
            if kwargs.get("inputs_embeds") is not None:  # decode steps of generate pass ids
                seen["embeds"] = kwargs["inputs_embeds"].detach()
        vlm.lm.model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def check_placement(vlm: VLM, batch: dict, embeds: torch.Tensor) -> None:
    counts = batch["image_counts"].tolist()
    ids = batch["input_ids"]
    with torch.no_grad():
        expected = vlm.projector(vlm.towers(batch["pixel_values"]))  # [n_images, N, D]
        text = vlm.lm.get_input_embeddings()(ids.masked_fill(ids == vlm.image_token_id, 0))
    first = 0
    for b, c in enumerate(counts):
        slots = (ids[b] == vlm.image_token_id).nonzero().flatten()
        assert len(slots) == c * vlm.tokens_per_image
        want = expected[first : first + c].reshape(-1, expected.shape[-1])
        torch.testing.assert_close(embeds[b, slots], want, rtol=0, atol=1e-6)
        other = ids[b] != vlm.image_token_id
        torch.testing.assert_close(embeds[b, other], text[b, other], rtol=0, atol=0)
        first += c


@pytest.mark.parametrize("lm_backend", ["qwen", "hf"])
def test_mixed_batch_0_1_3_images_forward_backward_and_placement(tmp_path, lm_backend):
    vlm = build_tiny_vlm(tmp_path, tower="clip", lm_backend=lm_backend)
    vlm.train()
    seen = capture_lm_inputs(vlm)
    batch = make_batch(vlm, [0, 1, 3])
    out = vlm(**batch)
    assert out.logits.shape == (*batch["input_ids"].shape, vlm.lm.get_input_embeddings().weight.shape[0])
    assert torch.isfinite(out.loss)
    check_placement(vlm, batch, seen["embeds"])
    out.loss.backward()
    assert all(p.grad is None for p in vlm.towers.parameters()), "frozen towers must get no gradient"
    assert not vlm.towers.training, "frozen towers run in eval mode"
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in vlm.projector.parameters())
    assert vlm.lm.get_input_embeddings().weight.grad is not None


def test_qwen_and_hf_backends_agree_on_logits_and_loss(tmp_path):
    """The same Qwen2 weights through our qwen LM and through transformers (inputs_embeds path)."""
    a = build_tiny_vlm(tmp_path, tower="siglip", lm_backend="qwen")
    b = build_tiny_vlm(tmp_path, tower="siglip", lm_backend="hf")
    b.projector.load_state_dict(a.projector.state_dict())
    assert a.image_token_id == b.image_token_id
    batch = make_batch(a, [2, 0, 1])
    batch["attention_mask"] = None  # transformers and ours differ only in how padded rows are positioned
    with torch.no_grad():
        oa, ob = a(**batch), b(**batch)
    torch.testing.assert_close(oa.logits, ob.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(oa.loss, ob.loss, rtol=0, atol=1e-5)


def test_generic_hf_llama_lm(tmp_path):
    tower = tiny_tower_spec(tmp_path, "timm_cnn")
    cfg = dict(lm=str(tiny_llama_dir(tmp_path)), lm_backend="hf", towers=[tower], image_token_id=7,
               projector="mlp2x_gelu", reduce="avg_pool", reduce_factor=2, image_mode="resize")
    vlm = build_vlm(cfg)
    assert vlm.tokens_per_image == 16  # timm CNN 8x8 grid pooled 2x2
    seen = capture_lm_inputs(vlm)
    batch = make_batch(vlm, [1, 0, 3])
    out = vlm(**batch)
    check_placement(vlm, batch, seen["embeds"])
    out.loss.backward()
    assert vlm.projector.mlp[0].weight.grad.abs().sum() > 0
    # The loss is the qwen rule computed by hand: position t predicts label t+1.
    logits, labels = out.logits.detach()[:, :-1], batch["labels"][:, 1:]
    keep = labels != -100
    manual = torch.nn.functional.cross_entropy(logits[keep], labels[keep])
    torch.testing.assert_close(out.loss.detach(), manual, rtol=0, atol=1e-6)
    new = vlm.generate(batch["input_ids"][1:2, :5], pixel_values=None, max_new_tokens=3)  # text-only sample
    assert len(new) == 1 and len(new[0]) == 3


def test_two_towers_and_pixel_shuffle(tmp_path):
    vlm = build_tiny_vlm(tmp_path, tower="clip", n_towers=2, reduce="pixel_shuffle", reduce_factor=2)
    assert vlm.towers.hidden_size == 64 and vlm.projector.mlp[0].in_features == 64 * 4
    assert vlm.tokens_per_image == 4  # 4x4 grid shuffled by 2
    seen = capture_lm_inputs(vlm)
    batch = make_batch(vlm, [1, 2])
    vlm(**batch).loss.backward()
    check_placement(vlm, batch, seen["embeds"])


def test_count_mismatches_fail_loudly(tmp_path):
    vlm = build_tiny_vlm(tmp_path, tower="clip")
    batch = make_batch(vlm, [1, 1])
    with pytest.raises(ValueError, match=r"sample 0: 16 image placeholders but 2 image"):
        vlm(**{**batch, "image_counts": torch.tensor([2, 0])})
    with pytest.raises(ValueError, match=r"32 image placeholder.*16 rows"):
        vlm(**{**batch, "pixel_values": batch["pixel_values"][:1], "image_counts": None})


def test_width_mismatch_fails_at_build_naming_both(tmp_path):
    good = build_tiny_vlm(tmp_path, tower="clip")
    with pytest.raises(ValueError, match=r"input width 48 != vision tower width 32"):
        VLM(good.config, good.towers, build_projector("mlp2x_gelu", 48, 64), good.lm, good.tokenizer)
    with pytest.raises(ValueError, match=r"output width 80 != LM embedding width 64"):
        VLM(good.config, good.towers, build_projector("linear", 32, 80), good.lm, good.tokenizer)
    with pytest.raises(ValueError, match=r"in_dim=32 out_dim=64"):
        build_tiny_vlm(tmp_path, tower="clip", projector="identity")


def test_unknown_preset_backend_and_fields():
    with pytest.raises(ValueError, match=r"nope.*qwen1.8b-clip336.*qwen2.5-0.5b-siglip.*qwen7b-siglip.*tiny"):
        resolve_config("nope")
    with pytest.raises(ValueError, match=r"lm_backend='jax'.*qwen, hf"):
        resolve_config("tiny", lm_backend="jax")
    with pytest.raises(ValueError, match="unknown field"):
        resolve_config("tiny", projecter="linear")
    with pytest.raises(ValueError, match=r"unknown vision backend 'clipp'.*hf_clip"):
        build_vlm("tiny", towers=[{"backend": "clipp", "name_or_path": "x"}])


def test_presets_name_the_published_pairs():
    assert PRESETS["qwen7b-siglip"]["lm"] == "Qwen/Qwen-7B-Chat"
    assert PRESETS["qwen7b-siglip"]["towers"][0]["name_or_path"] == "google/siglip-so400m-patch14-384"
    assert PRESETS["qwen1.8b-clip336"]["lm"] == "Qwen/Qwen-1_8B-Chat"
    assert PRESETS["qwen1.8b-clip336"]["towers"][0]["name_or_path"] == "openai/clip-vit-large-patch14-336"
    assert PRESETS["qwen2.5-0.5b-siglip"]["lm"] == "Qwen/Qwen2.5-0.5B-Instruct"
    for name in PRESETS:
        assert isinstance(resolve_config(name), VLMConfig)


def test_tiny_preset_builds_offline_and_round_trips(tmp_path):
    vlm = build_vlm("tiny")
    assert vlm.tokens_per_image == 25  # timm test_resnet: last feature map 5x5
    batch = make_batch(vlm, [1, 0])
    with torch.no_grad():
        ref = vlm(**batch).logits
    vlm.save_pretrained(tmp_path / "ck", trainable_only=True)  # scratch parts have no base: stored too
    again = VLM.from_pretrained(tmp_path / "ck")
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, ref, rtol=0, atol=0)


@pytest.mark.parametrize("trainable_only", [False, True])
def test_save_load_round_trip(tmp_path, trainable_only):
    vlm = build_tiny_vlm(tmp_path, tower="siglip", reduce="avg_pool", reduce_factor=2)
    vlm.lm.requires_grad_(False)
    vlm.lm.transformer.ln_f.requires_grad_(True)
    with torch.no_grad():  # "training" moved these away from the base checkpoint
        for p in list(vlm.projector.parameters()) + [vlm.lm.transformer.ln_f.weight]:
            p.add_(0.05 * torch.randn_like(p))
    vlm.eval()
    batch = make_batch(vlm, [0, 2, 1])
    with torch.no_grad():
        ref = vlm(**batch).logits
    out = tmp_path / "ckpt"
    vlm.save_pretrained(out, trainable_only=trainable_only)
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    meta = json.loads((out / "vlm_config.json").read_text())
    assert meta["checkpoint"]["kind"] == ("trainable" if trainable_only else "full")
    if trainable_only:
        assert keys == {k for k in vlm.state_dict() if k.startswith("projector.")} | {"lm.transformer.ln_f.weight"}
    else:
        assert keys == set(vlm.state_dict())
    assert (out / "tokenizer").is_dir() and (out / "processor.json").is_file()
    loaded = VLM.from_pretrained(out).eval()
    assert loaded.tokens_per_image == vlm.tokens_per_image and loaded.image_token_id == vlm.image_token_id
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, ref, rtol=0, atol=0)


def _llava_batch(vlm: VLM, token_id: int, n_images: int = 2):
    n = vlm.tokens_per_image
    ids = [1, 2, 3] + [token_id] * n + [4, 5] + [token_id] * n * (n_images - 1) + [6]
    pixel_values = torch.randn(n_images, 3, 32, 32)
    return torch.tensor([ids]), pixel_values


@pytest.mark.parametrize(
    "vision,text,strategy,layer,n_tokens",
    [
        ("clip", "qwen2", "default", -2, 16),  # CLS dropped
        ("clip", "qwen2", "full", -1, 17),  # CLS kept
        ("siglip", "qwen2", "full", -2, 16),  # every SigLIP token is a patch
        ("clip", "llama", "default", -2, 16),  # llava-1.5 layout: generic hf LM path
    ],
)
def test_llava_import_matches_transformers(tmp_path, vision, text, strategy, layer, n_tokens):
    from transformers import LlavaForConditionalGeneration

    path = save_tiny_llava(tmp_path / "llava", vision=vision, text=text, strategy=strategy, feature_layer=layer)
    ref = LlavaForConditionalGeneration.from_pretrained(str(path)).eval()
    vlm = VLM.from_pretrained(path).eval()
    assert vlm.config.lm_backend == ("qwen" if text == "qwen2" else "hf")
    assert vlm.tokens_per_image == n_tokens and vlm.image_token_id == 100
    ids, px = _llava_batch(vlm, 100)
    with torch.no_grad():
        want = ref(input_ids=ids, pixel_values=px).logits
        got = vlm(ids, pixel_values=px, image_counts=[2]).logits
    assert want.abs().max() > 1e-2  # random weights big enough that a wrong mapping shows
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)

    # A trainable-only checkpoint of the imported model points back at the Llava directory.
    with torch.no_grad():
        vlm.projector.mlp[2].bias.add_(0.1)
        ref_logits = vlm(ids, pixel_values=px).logits
    vlm.save_pretrained(tmp_path / "ft", trainable_only=True)
    again = VLM.from_pretrained(tmp_path / "ft").eval()
    assert again.config.init_from == str(path)
    with torch.no_grad():
        torch.testing.assert_close(again(ids, pixel_values=px).logits, ref_logits, rtol=0, atol=0)


def test_llava_siglip_default_strategy_is_refused(tmp_path):
    path = save_tiny_llava(tmp_path / "llava", vision="siglip", strategy="default")
    with pytest.raises(ValueError, match="SigLIP has no CLS"):
        VLM.from_pretrained(path)


def test_from_pretrained_on_a_plain_dir_fails(tmp_path):
    with pytest.raises(FileNotFoundError, match="vlm_config.json"):
        VLM.from_pretrained(tmp_path)


def test_from_pretrained_needs_only_the_module_that_defines_vlm(tmp_path):
    """A fresh interpreter that imported `qwenvl_lab.model.model` and nothing else loads a checkpoint with
    `VLM.from_pretrained`: no loader is registered as a side effect of importing another module."""
    from safetensors.torch import load_file, save_file

    vlm = build_vlm("tiny")
    batch = make_batch(vlm, [1, 0])
    with torch.no_grad():
        ref = vlm(**batch).logits
    vlm.save_pretrained(tmp_path / "ck")
    save_file(batch, str(tmp_path / "batch.safetensors"))
    code = ("import sys, torch\nfrom safetensors.torch import load_file, save_file\n"
            "from qwenvl_lab.model.model import VLM\n"
            "vlm = VLM.from_pretrained(sys.argv[1])\n"
            "with torch.no_grad():\n    logits = vlm(**load_file(sys.argv[2])).logits\n"
            "save_file({'logits': logits.contiguous()}, sys.argv[3])\n")
    args = [str(tmp_path / f) for f in ("ck", "batch.safetensors", "logits.safetensors")]
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code, *args], cwd=root, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(root)}, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    torch.testing.assert_close(load_file(args[2])["logits"], ref, rtol=0, atol=0)


def test_chat_renders_image_span_and_answers_greedily(tmp_path):
    vlm = build_tiny_vlm(tmp_path, tower="clip").eval()
    tok = vlm.tokenizer
    msgs = [{"role": "user", "content": "<image>\nwhat is it?"}]
    ids = vlm.chat_ids(msgs, n_images=1)
    n = vlm.tokens_per_image
    start = ids.index(tok.image_start_id)
    assert ids[start + 1 : start + 1 + n] == [vlm.image_token_id] * n and ids[start + 1 + n] == tok.image_end_id
    assert ids[0] == tok.im_start_id
    last = len(ids) - 1 - ids[::-1].index(tok.im_start_id)
    assert tok.decode(ids[last:]) == "<|im_start|>assistant\n"
    from qwenvl_lab.qwen.chat import build_prompt_ids

    text_only = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi there"}]
    assert vlm.chat_ids(text_only, n_images=0) == build_prompt_ids(tok, text_only)  # same ChatML as qwen's
    img = Image.new("RGB", (40, 30), (120, 30, 200))
    # Greedy first token = argmax of the forward logits at the last prompt position.
    px = vlm.image_processor([img])
    with torch.no_grad():
        logits = vlm(torch.tensor([ids]), pixel_values=px).logits[0, -1]
    first = int(logits.argmax())
    new = vlm.generate(torch.tensor([ids]), pixel_values=px, max_new_tokens=4, stop_token_ids=[])
    assert new[0][0] == first
    answer = vlm.chat([img], msgs, max_new_tokens=4)
    assert isinstance(answer, str)
    with pytest.raises(ValueError, match=r"2 <image> marker.*1 image"):
        vlm.chat_ids([{"role": "user", "content": "<image><image>"}], n_images=1)
    with pytest.raises(ValueError, match=r"messages\[0\]: role 'robot'"):
        vlm.chat_ids([{"role": "robot", "content": "hi"}], n_images=0)
    with pytest.raises(ValueError, match=r"messages\[1\]: content must be a string"):
        vlm.chat_ids([{"role": "user", "content": "<image>"}, {"role": "assistant", "content": 3}], n_images=1)


def test_chat_batch_equals_each_chat_alone(tmp_path):
    """Left-padded batched answers equal one-at-a-time answers (different prompt lengths and image counts)."""
    vlm = build_tiny_vlm(tmp_path, tower="clip").eval()
    red, blue = Image.new("RGB", (40, 30), (200, 20, 20)), Image.new("RGB", (30, 40), (20, 20, 200))
    convs = [
        ([red], [{"role": "user", "content": "what colour?"}]),
        ([], [{"role": "user", "content": "a longer question with no image at all"}]),
        ([red, blue], [{"role": "user", "content": "<image> and <image>: same?"}]),
    ]
    together = vlm.chat_batch(convs, max_new_tokens=5, stop_token_ids=[])
    alone = [vlm.chat(imgs, msgs, max_new_tokens=5, stop_token_ids=[]) for imgs, msgs in convs]
    assert together == alone and len(set(together)) > 1
    assert vlm.decode([vlm.tokenizer.im_end_id]) == ""  # special tokens never reach the text
    assert vlm.stop_token_ids[0] == vlm.tokenizer.im_end_id


def test_tiny_preset_chats_with_the_real_qwen1_vocab(shared_qwen1):
    vlm = build_vlm("tiny", tokenizer=str(shared_qwen1)).eval()
    assert vlm.image_token_id == 151646  # <|extra_0|> (FACTS.md)
    ids = vlm.chat_ids([{"role": "user", "content": "<image>\nHi there"}], n_images=1)
    assert ids[:3] == [151644, 872, 198]  # <|im_start|>user\n
    span = ids[3 : 3 + vlm.tokens_per_image + 2]
    assert span == [151647] + [151646] * vlm.tokens_per_image + [151648]  # extra_1, N x extra_0, extra_2
    assert ids[-3:] == [151644, 77091, 198]  # <|im_start|>assistant\n
    assert isinstance(vlm.chat([Image.new("RGB", (50, 40))], [{"role": "user", "content": "Hi"}],
                               max_new_tokens=2), str)


def test_scratch_hf_lm_from_a_config_dict(tmp_path):
    lm_config = dict(model_type="llama", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=1)
    vlm = build_vlm(dict(lm="scratch", lm_backend="hf", lm_config=lm_config, image_token_id=127,
                         towers=[tiny_tower_spec(tmp_path, "timm_vit")], projector="mlp1x_gelu"))
    assert type(vlm.lm).__name__ == "LlamaForCausalLM" and vlm.tokens_per_image == 16
    batch = make_batch(vlm, [1, 2])
    vlm(**batch).loss.backward()
    assert vlm.projector.mlp[0].weight.grad is not None


def test_trainable_only_keeps_batchnorm_stats_of_a_trained_cnn_tower(tmp_path):
    vlm = build_tiny_vlm(tmp_path, tower="timm_cnn", freeze_towers=False)
    vlm.train()
    vlm(**make_batch(vlm, [2, 1])).loss.backward()  # train mode: batch-norm statistics move
    vlm.eval()
    batch = make_batch(vlm, [1, 1], seed=1)
    with torch.no_grad():
        ref = vlm(**batch).logits
    vlm.save_pretrained(tmp_path / "ck", trainable_only=True)
    loaded = VLM.from_pretrained(tmp_path / "ck", freeze_towers=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, ref, rtol=0, atol=0)


@pytest.mark.parametrize("lm_backend", ["qwen", "hf"])
def test_lora_checkpoint_round_trip_and_merge(tmp_path, lm_backend):
    from peft import LoraConfig, get_peft_model

    vlm = build_tiny_vlm(tmp_path, tower="clip", lm_backend=lm_backend)
    targets = r"(?:.*\.)?(?:c_attn|q_proj|v_proj)"
    vlm.lm = get_peft_model(vlm.lm, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
    vlm.config.lora = {"r": 4, "alpha": 8}
    with torch.no_grad():  # a trained adapter: lora_B away from its zero init
        for n, p in vlm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    vlm.eval()
    batch = make_batch(vlm, [1, 0, 2])
    with torch.no_grad():
        ref = vlm(**batch).logits
    vlm.save_pretrained(tmp_path / "run" / "checkpoint-2", trainable_only=True)
    (tmp_path / "run" / "checkpoint-10").mkdir()  # not a model: skipped
    from qwenvl_lab.model.paths import resolve_model_dir

    ck = resolve_model_dir(tmp_path / "run")
    assert ck.name == "checkpoint-2" and (ck / "lora" / "adapter_config.json").is_file()
    loaded = VLM.from_pretrained(tmp_path / "run").eval()  # the run directory itself: its newest checkpoint
    assert any("lora_A" in n for n, _ in loaded.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, ref, rtol=0, atol=0)
        loaded.merge_lora()
        assert not any("lora_" in n for n, _ in loaded.named_parameters()) and loaded.config.lora is None
        torch.testing.assert_close(loaded(**batch).logits, ref, rtol=0, atol=1e-5)
    loaded.save_pretrained(tmp_path / "merged")
    merged = VLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, ref, rtol=0, atol=1e-5)


def test_merge_lora_drops_the_adapter_config_older_peft_leaves(tmp_path, monkeypatch):
    """peft < 0.19's merge_and_unload keeps `peft_config` on the unwrapped LM; the merged model must still
    save without a lora/ directory and load without adapters."""
    from peft import LoraConfig, get_peft_model

    vlm = build_tiny_vlm(tmp_path, tower="clip")
    vlm.lm = get_peft_model(vlm.lm, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["c_attn"]))
    vlm.config.lora = {"r": 4, "alpha": 8}
    peft_model, stock = vlm.lm, vlm.lm.merge_and_unload

    def merge_keeping_config(*args, **kwargs):  # what peft 0.18 does
        config = peft_model.peft_config
        base = stock(*args, **kwargs)
        base.peft_config = config
        return base

    monkeypatch.setattr(peft_model, "merge_and_unload", merge_keeping_config)
    vlm.merge_lora()
    assert not hasattr(vlm.lm, "peft_config")
    vlm.save_pretrained(tmp_path / "merged")
    assert not (tmp_path / "merged" / "lora").exists()
    merged = VLM.from_pretrained(tmp_path / "merged")
    assert not any("lora_" in n for n, _ in merged.named_parameters())


def test_tower_path_override_and_missing_model_dir(tmp_path):
    vlm = build_tiny_vlm(tmp_path, tower="siglip")
    vlm.save_pretrained(tmp_path / "ck", trainable_only=True)
    import shutil

    moved = tmp_path / "moved_tower"
    shutil.move(vlm.config.towers[0]["name_or_path"], moved)
    loaded = VLM.from_pretrained(tmp_path / "ck", tower_path=str(moved))
    assert loaded.config.towers[0]["name_or_path"] == str(moved)
    from qwenvl_lab.model.paths import resolve_model_dir

    with pytest.raises(FileNotFoundError, match="checkpoint-N"):
        resolve_model_dir(tmp_path / "nothing")


def test_load_trainable_weights_into_a_live_model(tmp_path):
    from qwenvl_lab.model.checkpoint import load_trainable_weights

    vlm = build_tiny_vlm(tmp_path, tower="clip").eval()
    fresh = build_tiny_vlm(tmp_path, tower="clip").eval()  # same base, its own random projector
    batch = make_batch(vlm, [1, 1])
    with torch.no_grad():
        ref = vlm(**batch).logits
        assert not torch.allclose(fresh(**batch).logits, ref)
    vlm.save_pretrained(tmp_path / "ck", trainable_only=True)
    missing = load_trainable_weights(fresh, tmp_path / "ck")
    assert missing and not any(k.startswith("projector.") for k in missing)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, ref, rtol=0, atol=0)
    vlm.lm.lm_head = torch.nn.Linear(64, 512, bias=True)  # now the checkpoint holds a bias `other` lacks
    vlm.save_pretrained(tmp_path / "ck2", trainable_only=True)
    other = build_tiny_vlm(tmp_path, tower="clip")
    with pytest.raises(ValueError, match="does not have"):
        load_trainable_weights(other, tmp_path / "ck2")


@pytest.mark.parametrize("text", ['{"model_type": "bert"}', "[1, 2]", "{not json"])
def test_load_vlm_on_a_foreign_config_json_says_so(tmp_path, text):
    """Some other (or broken) config.json is neither of the two model kinds: one ModelDirError, no traceback."""
    from qwenvl_lab.model.model import load_vlm
    from qwenvl_lab.model.paths import ModelDirError

    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ModelDirError, match="holds no model: expected vlm_config.json"):
        load_vlm(tmp_path)
