"""Logit parity with transformers' Qwen2/Qwen3 and the Qwen-1 official layout + conversion."""

import json

import pytest
import torch
from qwenvl_lab.qwen import QWenConfig, QWenLMHeadModel, load_tokenizer
from qwenvl_lab.qwen.convert import convert
from qwenvl_lab.qwen.loading import to_native_state_dict
from safetensors import safe_open
from tiny_qwen import build_hf_reference, tiny_qwen_config, write_tiny_qwen_checkpoint

TOL = 1e-5
# The keys of the published Qwen-1 config.json (Qwen-7B).
QWEN1_KEYS = {
    "architectures", "auto_map", "attn_dropout_prob", "bf16", "emb_dropout_prob", "fp16", "fp32", "hidden_size",
    "intermediate_size", "initializer_range", "kv_channels", "layer_norm_epsilon", "max_position_embeddings",
    "model_type", "no_bias", "num_attention_heads", "num_hidden_layers", "onnx_safe", "rotary_emb_base",
    "rotary_pct", "scale_attn_weights", "seq_length", "tie_word_embeddings", "tokenizer_class",
    "transformers_version", "use_cache", "use_dynamic_ntk", "use_flash_attn", "use_logn_attn", "vocab_size",
}


def _ids(vocab=400, B=2, T=17, seed=1):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def _hf_logits(path, ids):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        return ref.eval()(ids).logits, ref


@pytest.mark.parametrize("arch,overrides", [
    ("qwen2", {}),
    ("qwen2", {"tie_word_embeddings": True, "num_key_value_heads": 1}),
    ("qwen3", {}),
    ("qwen3", {"tie_word_embeddings": True, "num_key_value_heads": 4}),
])
def test_transformers_checkpoint_loads_and_matches(tmp_path, arch, overrides):
    write_tiny_qwen_checkpoint(tmp_path, arch, **overrides)  # saved by transformers' save_pretrained
    model = QWenLMHeadModel.from_pretrained(tmp_path)
    assert model.config.arch == arch and model.config.tie_word_embeddings == overrides.get(
        "tie_word_embeddings", False)
    ids = _ids()
    ref, _ = _hf_logits(tmp_path, ids)
    with torch.no_grad():
        ours = model(ids).logits
    assert (ours - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_our_save_is_loadable_by_transformers(tmp_path, arch):
    cfg = tiny_qwen_config(arch)
    model = QWenLMHeadModel(cfg).eval()
    model.save_pretrained(tmp_path)
    ids = _ids()
    ref, hf = _hf_logits(tmp_path, ids)
    assert type(hf).__name__ == ("Qwen2ForCausalLM" if arch == "qwen2" else "Qwen3ForCausalLM")
    with torch.no_grad():
        assert (model(ids).logits - ref).abs().max().item() <= TOL


def test_qwen1_official_layout_on_disk(tmp_path):
    write_tiny_qwen_checkpoint(tmp_path, "qwen1")
    raw = json.loads((tmp_path / "config.json").read_text())
    assert set(raw) == QWEN1_KEYS
    cfg = tiny_qwen_config("qwen1")
    assert raw["intermediate_size"] == 2 * cfg.intermediate_size and raw["kv_channels"] == cfg.head_dim
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    H, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    expected = {"transformer.wte.weight": (V, H), "lm_head.weight": (V, H), "transformer.ln_f.weight": (H,)}
    for i in range(cfg.num_hidden_layers):
        p = f"transformer.h.{i}."
        expected.update({
            p + "ln_1.weight": (H,), p + "attn.c_attn.weight": (3 * H, H), p + "attn.c_attn.bias": (3 * H,),
            p + "attn.c_proj.weight": (H, H), p + "ln_2.weight": (H,), p + "mlp.w1.weight": (F, H),
            p + "mlp.w2.weight": (F, H), p + "mlp.c_proj.weight": (H, F),
        })
    assert shapes == expected


def test_qwen1_names_match_published_index(shared_qwen1):
    cfg = QWenConfig.from_pretrained(shared_qwen1)
    assert cfg.intermediate_size == 22016 // 2 and cfg.head_dim == 128 and cfg.seq_length == 8192
    with torch.device("meta"):
        model = QWenLMHeadModel(cfg)
    published = json.loads((shared_qwen1 / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(to_native_state_dict(model)) == set(published)
    assert cfg.to_native_dict() == {k: v for k, v in json.loads((shared_qwen1 / "config.json").read_text()).items()}


def test_qwen1_checkpoint_converts_and_matches_transformers(tmp_path):
    src, dst = tmp_path / "q1", tmp_path / "q2"
    write_tiny_qwen_checkpoint(src, "qwen1")
    ours = QWenLMHeadModel.from_pretrained(src)
    assert ours.config.arch == "qwen1"
    convert(src, dst)
    ids = _ids()
    ref, hf = _hf_logits(dst, ids)
    assert type(hf).__name__ == "Qwen2ForCausalLM"
    with torch.no_grad():
        assert (ours(ids).logits - ref).abs().max().item() <= TOL
    # The converted tokenizer.json tokenises like the source qwen.tiktoken.
    q1, q2 = load_tokenizer(src), load_tokenizer(dst)
    for t in ["the cat is in the hat", "Hello,\n\nworld 42!"]:
        assert q2.encode(t) == q1.encode(t)
    assert (q2.eod_id, q2.im_end_id, q2.image_token_id) == (q1.eod_id, q1.im_end_id, q1.image_token_id)
    # a loaded QWenTokenizer converts the same way as its directory
    from qwenvl_lab.qwen.convert import convert_tokenizer

    convert_tokenizer(q1, tmp_path / "tok")
    assert load_tokenizer(tmp_path / "tok").encode("the hat") == q1.encode("the hat")
    assert load_tokenizer(tmp_path / "tok").hf_tokenizer is not None


def test_convert_warns_when_source_uses_ntk(tmp_path):
    write_tiny_qwen_checkpoint(tmp_path / "q1", "qwen1", use_dynamic_ntk=True, use_logn_attn=True)
    with pytest.warns(UserWarning, match="seq_length"):
        convert(tmp_path / "q1", tmp_path / "q2")
    assert json.loads((tmp_path / "q2" / "config.json").read_text())["max_position_embeddings"] == 256


def test_convert_cli(tmp_path):
    from qwenvl_lab.qwen.convert import main

    write_tiny_qwen_checkpoint(tmp_path / "q1", "qwen1")
    main(["--src", str(tmp_path / "q1"), "--dst", str(tmp_path / "q2")])
    assert QWenLMHeadModel.from_pretrained(tmp_path / "q2").config.arch == "qwen2"


def test_real_vocab_converts_like_tiktoken(shared_qwen1, tmp_path):
    from qwenvl_lab.qwen.convert import convert_tokenizer

    convert_tokenizer(shared_qwen1, tmp_path)
    a, b = load_tokenizer(shared_qwen1), load_tokenizer(tmp_path)
    text = "Hello world, 你好！ It's   a test\n\n  x = 12345; naïve <|im_end|>"
    assert b.encode(text) == a.encode(text) and b.im_end_id == 151645


def test_hf_reference_builder_matches_config():
    # guards the helper other tests rely on
    cfg = tiny_qwen_config("qwen3")
    hf = build_hf_reference(cfg)
    assert hf.model.layers[0].self_attn.q_proj.weight.shape == (cfg.q_dim, cfg.hidden_size)


def test_published_qwen1_configs_read(shared_qwen1):
    cfg = QWenConfig.from_pretrained(shared_qwen1 / "qwen-1_8b-chat" / "config.resaved.json")
    assert (cfg.arch, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == ("qwen1", 2048, 24, 16)
    assert cfg.intermediate_size == 11008 // 2 and cfg.use_dynamic_ntk and cfg.use_logn_attn
    assert cfg.image_token_id == 151646 and cfg.vocab_size == 151936
