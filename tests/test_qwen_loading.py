"""Checkpoint I/O: sharded safetensors, .bin, dtype, and clear errors for bad input."""

import json

import pytest
import torch
from qwenvl_lab.qwen import QWenConfig, QWenLMHeadModel
from safetensors.torch import load_file, save_file
from tiny_qwen import write_tiny_qwen_checkpoint


def _logits(model, seed=0):
    ids = torch.randint(0, 290, (1, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch", ["qwen1", "qwen3"])
def test_sharded_safetensors_with_index_loads(tmp_path, arch):
    write_tiny_qwen_checkpoint(tmp_path / "one", arch)
    ref = QWenLMHeadModel.from_pretrained(tmp_path / "one")
    ref.save_pretrained(tmp_path / "sharded", max_shard_bytes=60_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    loaded = QWenLMHeadModel.from_pretrained(tmp_path / "sharded")
    assert torch.equal(_logits(loaded), _logits(ref))


def test_bin_checkpoint_loads_with_weights_only(tmp_path):
    write_tiny_qwen_checkpoint(tmp_path, "qwen2")
    ref = QWenLMHeadModel.from_pretrained(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    (tmp_path / "model.safetensors").unlink()
    torch.save(sd, tmp_path / "pytorch_model.bin")
    assert torch.equal(_logits(QWenLMHeadModel.from_pretrained(tmp_path)), _logits(ref))


class _NotAllowed:
    pass


def test_bin_with_pickled_objects_is_refused(tmp_path):
    write_tiny_qwen_checkpoint(tmp_path, "qwen1")
    (tmp_path / "model.safetensors").unlink()
    torch.save({"x": _NotAllowed()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pytorch_model.bin.*weights_only"):
        QWenLMHeadModel.from_pretrained(tmp_path)


def test_dtype_and_no_real_allocation_before_load(tmp_path):
    write_tiny_qwen_checkpoint(tmp_path, "qwen1")
    model = QWenLMHeadModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in model.parameters())
    assert not model.training


def test_from_pretrained_builds_on_meta(tmp_path, monkeypatch):
    # The weights the model ends up with are the very tensors read from disk (assigned, not copied).
    import qwenvl_lab.qwen.loading as loading

    write_tiny_qwen_checkpoint(tmp_path, "qwen1")
    captured = {}
    orig = loading.load_state_dict_native

    def spy(*a, **k):
        captured.update(orig(*a, **k))
        return captured

    monkeypatch.setattr(loading, "load_state_dict_native", spy)
    model = QWenLMHeadModel.from_pretrained(tmp_path)
    w = model.transformer.h[0].mlp.w1.weight
    assert w.data_ptr() == captured["transformer.h.0.mlp.w1.weight"].data_ptr()


# ---------- bad input ----------
def test_unknown_config_field_is_named(tmp_path):
    write_tiny_qwen_checkpoint(tmp_path, "qwen1")
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["hiden_size"] = 3
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"config.json.*hiden_size"):
        QWenLMHeadModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("arch,field", [("qwen1", "kv_channels"), ("qwen2", "num_hidden_layers")])
def test_missing_config_field_is_named(tmp_path, arch, field):
    write_tiny_qwen_checkpoint(tmp_path, arch)
    raw = json.loads((tmp_path / "config.json").read_text())
    del raw[field]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=rf"{tmp_path / 'config.json'}.*{field}"):
        QWenConfig.from_pretrained(tmp_path)


def test_unknown_model_type_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match=r"config.json.*model_type"):
        QWenConfig.from_pretrained(tmp_path)


def test_shape_mismatch_names_file_and_tensor(tmp_path):
    write_tiny_qwen_checkpoint(tmp_path, "qwen1")
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["intermediate_size"] = 2 * 80  # the checkpoint was written with 96 per branch
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"model.safetensors: tensor 'transformer.h.0.mlp.\w+.weight' has shape "
                       r"\((64, 96|96, 64)\).*expects \((64, 80|80, 64)\)"):
        QWenLMHeadModel.from_pretrained(tmp_path)


def test_unexpected_tensor_names_file_and_tensor(tmp_path):
    write_tiny_qwen_checkpoint(tmp_path, "qwen2")
    sd = load_file(str(tmp_path / "model.safetensors"))
    sd["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model.safetensors.*model.layers.0.mlp.extra.weight"):
        QWenLMHeadModel.from_pretrained(tmp_path)


def test_missing_tensor_is_named(tmp_path):
    write_tiny_qwen_checkpoint(tmp_path, "qwen1")
    sd = load_file(str(tmp_path / "model.safetensors"))
    del sd["transformer.h.1.ln_2.weight"]
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing tensor.*transformer.h.1.ln_2.weight"):
        QWenLMHeadModel.from_pretrained(tmp_path)


def test_missing_weights_and_missing_shard_are_named(tmp_path):
    write_tiny_qwen_checkpoint(tmp_path, "qwen1")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights in"):
        QWenLMHeadModel.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="gone.safetensors"):
        QWenLMHeadModel.from_pretrained(tmp_path)


def test_missing_directory_offline_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found|could not be fetched"):
        QWenLMHeadModel.from_pretrained(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="no-such-org/no-such-model"):
        QWenLMHeadModel.from_pretrained("no-such-org/no-such-model")


def test_config_invariants_raise():
    with pytest.raises(ValueError, match="arch"):
        QWenConfig(arch="qwen9")
    with pytest.raises(ValueError, match="num_key_value_heads"):
        QWenConfig(arch="qwen2", hidden_size=64, num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(ValueError, match="unknown fields"):
        QWenConfig.from_dict({"arch": "qwen1", "bogus": 1})
    cfg = QWenConfig(arch="qwen3", hidden_size=64, num_attention_heads=4, head_dim=32)
    assert QWenConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("arch", ["qwen1", "qwen2", "qwen3"])
def test_tiny_checkpoint_image_token_is_its_tokenizers_placeholder(tmp_path, arch):
    from qwenvl_lab.qwen import load_tokenizer
    from tiny_qwen import tiny_qwen_config

    write_tiny_qwen_checkpoint(tmp_path, arch)
    model = QWenLMHeadModel.from_pretrained(tmp_path)
    assert model.config.image_token_id == load_tokenizer(tmp_path).image_token_id
    assert model.config.image_token_id == tiny_qwen_config(arch).image_token_id
    assert QWenLMHeadModel.from_pretrained(tmp_path, image_token_id=7).config.image_token_id == 7
