"""Qwen-VL-Chat imported natively (model/qwenvl_chat.py, visual/qwenvl.py, Qwen-VL's tokenizer in qwen/).

The fixture writes a tiny checkpoint in the released layout: config.json (model_type "qwen" + a `visual`
dict), one model.safetensors holding the Qwen-1 LM's `transformer.*` / `lm_head.*` tensors and the vision
side's `transformer.visual.*` tensors (names and shapes written out here from the published description, not
from our module), and a `qwen.tiktoken`. The vision reference below is a plain re-implementation with torch
ops of the same published description (visual/qwenvl.py's docstring lists it).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from tests.tiny_qwen import tiny_n_ranks, write_tiny_qwen_checkpoint

REPO = Path(__file__).resolve().parents[1]
REAL_VOCAB = REPO.parent / "shared" / "data" / "qwen1"  # ../shared beside the checkout
# Tiny vision side: a 6x6 patch grid, a 3x3 learned position table (resized to 6x6), 2 resampler heads.
VISUAL = {"image_size": 84, "patch_size": 14, "width": 32, "layers": 2, "heads": 4, "mlp_ratio": 2.5,
          "output_dim": 256, "n_queries": 16}
POS_ROWS = 9
LM = {"vocab_size": 528, "hidden_size": 256, "num_attention_heads": 4}  # 528 >= tiny ranks + 217 specials


def visual_tensors(cfg: dict, pos_rows: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random `transformer.visual.*` tensors with the released names and shapes."""
    w, p, e, q = cfg["width"], cfg["patch_size"], cfg["output_dim"], cfg["n_queries"]
    m = int(w * cfg["mlp_ratio"])
    shapes = {"conv1.weight": (w, 3, p, p), "positional_embedding": (pos_rows, w), "ln_pre.weight": (w,),
              "ln_pre.bias": (w,)}
    for i in range(cfg["layers"]):
        b = f"transformer.resblocks.{i}."
        shapes.update({b + "ln_1.weight": (w,), b + "ln_1.bias": (w,), b + "attn.in_proj.weight": (3 * w, w),
                       b + "attn.in_proj.bias": (3 * w,), b + "attn.out_proj.weight": (w, w),
                       b + "attn.out_proj.bias": (w,), b + "ln_2.weight": (w,), b + "ln_2.bias": (w,),
                       b + "mlp.c_fc.weight": (m, w), b + "mlp.c_fc.bias": (m,), b + "mlp.c_proj.weight": (w, m),
                       b + "mlp.c_proj.bias": (w,)})
    shapes.update({"attn_pool.query": (q, e), "attn_pool.kv_proj.weight": (e, w),
                   "attn_pool.attn.in_proj_weight": (3 * e, e), "attn_pool.attn.in_proj_bias": (3 * e,),
                   "attn_pool.attn.out_proj.weight": (e, e), "attn_pool.attn.out_proj.bias": (e,),
                   "attn_pool.ln_q.weight": (e,), "attn_pool.ln_q.bias": (e,), "attn_pool.ln_kv.weight": (e,),
                   "attn_pool.ln_kv.bias": (e,), "attn_pool.pos_embed": (q, e), "ln_post.weight": (e,),
                   "ln_post.bias": (e,), "proj": (e, e)})
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        t = torch.randn(shape, generator=g)
        is_norm_weight = name.endswith(".weight") and ("ln_" in name)
        out["transformer.visual." + name] = 1.0 + 0.1 * t if is_norm_weight else 0.1 * t
    return out


def write_qwenvl_chat(out: Path, visual: dict = VISUAL, pos_rows: int = POS_ROWS) -> Path:
    """A tiny Qwen-VL-Chat directory in the released layout."""
    write_tiny_qwen_checkpoint(out, arch="qwen1", **LM)
    cfg = json.loads((out / "config.json").read_text())
    cfg.pop("image_token_id", None)  # the released config.json has none; its tokenizer names <imgpad>
    n = tiny_n_ranks()
    cfg["visual"] = dict(visual, image_start_id=n + 208 + 6)  # <img>, as the released config records it
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    tensors = load_file(str(out / "model.safetensors"))
    tensors.update(visual_tensors(visual, pos_rows))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


# ----- the independent reference: plain torch ops from the published description -----------------------
def _ln(x, sd, name):
    return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps=1e-6)


def _resize_table(t, n):
    s, d = math.isqrt(t.shape[0]), math.isqrt(n)
    if s == d:
        return t
    img = t.reshape(1, s, s, -1).permute(0, 3, 1, 2)
    return F.interpolate(img, size=(d, d), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(n, -1)


def _softmax_attn(q, k, v):  # [.., H, Tq, d] x [.., H, Tk, d]
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v


def reference_visual(sd: dict, cfg: dict, px: torch.Tensor) -> torch.Tensor:
    sd = {k.removeprefix("transformer.visual."): v.double() for k, v in sd.items()}
    px = px.double()
    x = F.conv2d(px, sd["conv1.weight"], stride=cfg["patch_size"])  # [N, W, g, g]
    x = x.flatten(2).transpose(1, 2)
    n, t, w = x.shape
    x = _ln(x + _resize_table(sd["positional_embedding"], t), sd, "ln_pre")
    h = cfg["heads"]
    for i in range(cfg["layers"]):
        b = f"transformer.resblocks.{i}."
        y = _ln(x, sd, b + "ln_1")
        qkv = (y @ sd[b + "attn.in_proj.weight"].T + sd[b + "attn.in_proj.bias"]).reshape(n, t, h, 3, w // h)
        q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]  # Megatron layout: per head q, k, v
        o = _softmax_attn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2).reshape(n, t, w)
        x = x + o @ sd[b + "attn.out_proj.weight"].T + sd[b + "attn.out_proj.bias"]
        y = _ln(x, sd, b + "ln_2") @ sd[b + "mlp.c_fc.weight"].T + sd[b + "mlp.c_fc.bias"]
        x = x + F.gelu(y) @ sd[b + "mlp.c_proj.weight"].T + sd[b + "mlp.c_proj.bias"]
    e = cfg["output_dim"]
    kv = _ln(x @ sd["attn_pool.kv_proj.weight"].T, sd, "attn_pool.ln_kv")  # [N, T, E]
    query = _ln(sd["attn_pool.query"], sd, "attn_pool.ln_q") + sd["attn_pool.pos_embed"]  # [Q, E]
    key = kv + _resize_table(sd["attn_pool.pos_embed"], t)
    wq, wk, wv = sd["attn_pool.attn.in_proj_weight"].split(e)
    bq, bk, bv = sd["attn_pool.attn.in_proj_bias"].split(e)
    hh = e // 128

    def heads(z):
        return z.reshape(*z.shape[:-1], hh, e // hh).transpose(-2, -3)  # [.., H, T, d]

    o = _softmax_attn(heads(query @ wq.T + bq).expand(n, -1, -1, -1), heads(key @ wk.T + bk), heads(kv @ wv.T + bv))
    o = o.transpose(1, 2).reshape(n, -1, e) @ sd["attn_pool.attn.out_proj.weight"].T + sd["attn_pool.attn.out_proj.bias"]
    return _ln(o, sd, "ln_post") @ sd["proj"]  # [N, Q, E]


# ----- tests -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_qwenvl_chat(tmp_path_factory.mktemp("qwenvl") / "Qwen-VL-Chat")


def test_loads_as_our_vlm_with_n_queries_rows(ckpt):
    from qwenvl_lab.model.model import VLM
    from qwenvl_lab.qwen.modeling import QWenLMHeadModel
    from qwenvl_lab.visual.qwenvl import QwenVLTower

    vlm = VLM.from_pretrained(ckpt, dtype="float32")
    assert isinstance(vlm.towers, QwenVLTower) and isinstance(vlm.lm, QWenLMHeadModel)
    assert vlm.config.projector == "identity" and vlm.tokens_per_image == VISUAL["n_queries"]
    assert vlm.towers.grid == (4, 4) and vlm.towers.hidden_size == LM["hidden_size"]
    px = torch.randn(2, 3, 84, 84)
    rows = vlm.encode_images(px)  # [2 * 16, 256]
    assert rows.shape == (2 * VISUAL["n_queries"], LM["hidden_size"])
    # the LM's weights are the checkpoint's own (the visual tensors were skipped, not mixed in)
    saved = load_file(str(ckpt / "model.safetensors"))
    assert torch.equal(vlm.lm.transformer.wte.weight, saved["transformer.wte.weight"])
    n = tiny_n_ranks()
    assert vlm.image_token_id == n + 208 + 8  # <imgpad>


def test_vision_forward_matches_plain_reimplementation(ckpt):
    from qwenvl_lab.visual.registry import build_tower

    tower = build_tower("qwenvl", str(ckpt), feature_layer=-1, dtype=torch.float64)
    px = torch.randn(2, 3, 84, 84, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        got = tower(px)
    want = reference_visual(load_file(str(ckpt / "model.safetensors")), VISUAL, px)
    assert got.shape == (2, 16, 256)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    tower32 = build_tower("qwenvl", str(ckpt), feature_layer=-1, dtype=torch.float32)
    with torch.no_grad():  # fp32 too, against the fp64 reference
        torch.testing.assert_close(tower32(px.float()).double(), want, atol=1e-5, rtol=1e-4)


def test_default_256_queries_on_a_tiny_width(tmp_path):
    from qwenvl_lab.model.model import VLM

    visual = dict(VISUAL, image_size=56, n_queries=256)  # 16x16 queries over a 4x4 patch grid
    path = write_qwenvl_chat(tmp_path / "vl256", visual=visual, pos_rows=16)
    vlm = VLM.from_pretrained(path, dtype="float32")
    assert vlm.tokens_per_image == 256
    px = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        feats = vlm.towers(px)  # [1, 256, D_lm]
    assert feats.shape == (1, 256, LM["hidden_size"])
    want = reference_visual(load_file(str(path / "model.safetensors")), visual, px)
    torch.testing.assert_close(feats.double(), want, atol=1e-5, rtol=1e-4)


def test_prompt_renders_as_released(ckpt):
    from qwenvl_lab.model.model import VLM

    vlm = VLM.from_pretrained(ckpt, dtype="float32")
    tok = vlm.tokenizer
    n = tiny_n_ranks()
    im_start, im_end, img, img_end, pad = n + 1, n + 2, n + 214, n + 215, n + 216
    assert (tok.image_start_id, tok.image_end_id, tok.image_token_id) == (img, img_end, pad)
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Picture 1: <image>\nWhat is it?"}]
    nl = tok.encode("\n")
    # Released: make_context's ChatML; the query text from_list_format writes, `Picture 1: <img>...</img>\n`,
    # the span being <img> + 256 rows (path bytes then <imgpad>, all overwritten by the image) + </img>.
    want = ([im_start] + tok.encode("system") + nl + tok.encode("You are a helpful assistant.") + [im_end] + nl
            + [im_start] + tok.encode("user") + nl + tok.encode("Picture 1: ") + [img] + [pad] * 16 + [img_end]
            + tok.encode("\nWhat is it?") + [im_end] + nl + [im_start] + tok.encode("assistant") + nl)
    assert vlm.chat_ids(messages, n_images=1) == want


@pytest.mark.skipif(not (REAL_VOCAB / "qwen.tiktoken").is_file(), reason="../shared/data/qwen1 is absent")
def test_real_vocabulary_ids_are_the_released_ones(tmp_path):
    from qwenvl_lab.qwen.tokenizer import QWenTokenizer, load_tokenizer

    tok = QWenTokenizer(REAL_VOCAB / "qwen.tiktoken", qwen_vl=True)
    # Qwen-VL-Chat's config.json: visual.image_start_id 151857; </img> and <imgpad> follow it.
    assert (tok.image_start_id, tok.image_end_id, tok.image_token_id) == (151857, 151858, 151859)
    assert tok.token_to_id("<ref>") == 151851 and len(tok) == 151860
    assert tok.encode("<img>") != [151857]  # typed text never becomes the special
    plain = load_tokenizer(REAL_VOCAB)  # a Qwen-1 directory keeps Qwen-1's specials
    assert len(plain) == 151851 and plain.image_token_id == 151646
    tok.save_pretrained(tmp_path)
    assert load_tokenizer(tmp_path).image_token_id == 151859  # a saved Qwen-VL tokenizer reloads as one


@pytest.mark.parametrize("key", ["model.init_from", "init_from"])  # the model section's key, or the run's
def test_trains_and_answers_through_train_and_test_py(ckpt, tmp_path, key):
    img = tmp_path / "red.png"
    Image.new("RGB", (40, 30), (220, 20, 20)).save(img)
    data = tmp_path / "train.jsonl"
    rec = {"image": "red.png", "conversations": [
        {"from": "human", "value": "Picture 1: <image>\nWhat colour is it?"}, {"from": "gpt", "value": "red"}]}
    data.write_text("\n".join(json.dumps(dict(rec, id=str(i))) for i in range(4)) + "\n")
    run = tmp_path / "run"
    env = dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    args = [f"{key}={ckpt}", f"data_path=[{data}]", f"image_folder={tmp_path}",
            "stage=sft", "lora.r=4", "max_steps=2", "per_device_train_batch_size=2", "max_length=96",
            "precision=fp32", "report_to=[]", "dataloader_num_workers=0", "save_steps=1000", "logging_steps=1",
            f"output_dir={run}"]
    p = subprocess.run([sys.executable, "train.py", *args], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    losses = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in losses), "no training step was logged"
    saved = json.loads((run / "final" / "vlm_config.json").read_text())["config"]
    assert saved["towers"][0]["backend"] == "qwenvl" and saved["projector"] == "identity"
    for model in (run, ckpt)[: 2 if key == "init_from" else 1]:  # the trained run; the released directory
        p = subprocess.run([sys.executable, "test.py", "--model", str(model), "--image", str(img), "--prompt",
                            "Picture 1: <image>\nWhat colour is it?", "--max-new-tokens", "4", "--device", "cpu"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        assert p.stdout.strip(), f"test.py --model {model} printed no answer"


def test_user_mistakes_are_one_line_naming_file_and_key(tmp_path):
    from qwenvl_lab.core.errors import UserError
    from qwenvl_lab.model.model import VLM

    path = write_qwenvl_chat(tmp_path / "broken")
    cfg = json.loads((path / "config.json").read_text())
    del cfg["visual"]["width"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError) as e:
        VLM.from_pretrained(path, dtype="float32")
    msg = str(e.value)
    assert "\n" not in msg and "config.json" in msg and "visual.width" in msg
    cfg["visual"]["width"] = VISUAL["width"]
    (path / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["transformer.visual.proj"]
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(UserError) as e:
        VLM.from_pretrained(path, dtype="float32")
    assert "\n" not in str(e.value) and "transformer.visual.proj" in str(e.value)


def test_family_entry_and_plain_qwen1_untouched(tmp_path):
    from qwenvl_lab.model.families import FAMILIES, family_of
    from qwenvl_lab.model.paths import is_qwenvl_chat_dir
    from qwenvl_lab.qwen.tokenizer import load_tokenizer

    fam = FAMILIES["qwen_vl_chat"]
    assert fam.native and fam.vision == ("towers",) and fam.projector == ("projector",) and fam.lm == ("lm",)
    plain = write_tiny_qwen_checkpoint(tmp_path / "qwen1", arch="qwen1")  # a text-only Qwen-1 LM
    assert not is_qwenvl_chat_dir(plain) and family_of(plain) is None
    tok = load_tokenizer(plain)  # keeps Qwen-1's specials and image roles
    assert len(tok) == tiny_n_ranks() + 208 and tok.image_token_id == tiny_n_ranks() + 3
