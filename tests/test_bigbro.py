"""Checkpoints and command lines of the BigBro repo work here (model/bigbro.py, dataprocess/bigbro.py).

The fixture writes a tiny checkpoint in that repo's exact layout and names: a tiny Qwen-1 LM and tiny
CLIP / SigLIP towers in transformers' native format (the base models, named by path), peft LoRA on
`c_attn|w1|w2` saved as `adapter_model.bin` with torch.save, and the projector's state dict as
`other_params.bin`. The reference logits are computed here the way that repo's forward did: the tower's
`last_hidden_state` minus its first token, projected, all rows inserted where the one `<|extra_0|>` stood,
the LM run on `inputs_embeds`.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from qwenvl_lab.dataset.chat_templates import BIGBRO_SYSTEM, BIGBRO_USER_PREFIX
from torch import nn

from tests.tiny_model import tiny_lm_dir
from tests.tiny_visual import save_tiny_clip, save_tiny_siglip

REPO = Path(__file__).resolve().parents[1]
QUESTION = ("What colour", "is the shape?")  # the prompt is QUESTION[0] + <|extra_0|> + QUESTION[1]


def _towers_class(kind: str):
    from transformers import CLIPVisionModel, SiglipVisionModel

    return CLIPVisionModel if kind == "clip" else SiglipVisionModel


def _tower_dir(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"tower_{kind}"
    if not path.exists():
        (save_tiny_clip if kind == "clip" else save_tiny_siglip)(path)
    return path


def write_bigbro_checkpoint(out: Path, lm_dir: Path, tower_dir: Path, kind: str, seed: int = 1):
    """The BigBro repo's checkpoint layout; returns (peft-wrapped LM, feature_proj) for the reference."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from qwenvl_lab.qwen.modeling import QWenLMHeadModel

    g = torch.Generator().manual_seed(seed)
    lm = QWenLMHeadModel.from_pretrained(str(lm_dir))
    # (the BigBro repo set task_type CAUSAL_LM, which only changes the wrapper class, not the saved names)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["c_attn", "w1", "w2"])
    peft_lm = get_peft_model(lm, lora).eval()
    with torch.no_grad():  # LoRA B starts at zero: random A and B, so the adapters change the logits
        for name, p in peft_lm.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    d_vision = _towers_class(kind).from_pretrained(str(tower_dir)).config.hidden_size
    d_lm = lm.config.hidden_size
    feature_proj = nn.Sequential(nn.Linear(d_vision, d_lm), nn.GELU(), nn.Linear(d_lm, d_lm))
    with torch.no_grad():
        for p in feature_proj.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    out.mkdir(parents=True, exist_ok=True)
    torch.save(get_peft_model_state_dict(peft_lm), out / "adapter_model.bin")
    peft_lm.peft_config["default"].save_pretrained(str(out))
    config = json.loads((out / "adapter_config.json").read_text())
    config.update(task_type="CAUSAL_LM", inference_mode=True)  # as that repo's files have them
    (out / "adapter_config.json").write_text(json.dumps(config))
    torch.save(feature_proj.state_dict(), out / "other_params.bin")
    return peft_lm, feature_proj.eval()


def seed_prompt_ids(tok, before: str, after: str) -> list[int]:
    """The ChatML prompt as Qwen's make_context lays it out, with the one <|extra_0|> id in it."""
    nl = tok.encode("\n")
    start, end = [tok.im_start_id], [tok.im_end_id]
    system = start + tok.encode("system") + nl + tok.encode(BIGBRO_SYSTEM) + end
    user = (start + tok.encode("user") + nl + tok.encode(BIGBRO_USER_PREFIX + before)
            + [tok.token_to_id("<|extra_0|>")] + tok.encode(after) + end)
    return system + nl + user + nl + start + tok.encode("assistant") + nl


@torch.no_grad()
def seed_logits(peft_lm, feature_proj, tower_dir: Path, kind: str, pixel_values: torch.Tensor,
                ids: list[int], extra0: int) -> torch.Tensor:
    tower = _towers_class(kind).from_pretrained(str(tower_dir)).eval()
    feats = tower(pixel_values=pixel_values).last_hidden_state[:, 1:, :]  # [1, T - 1, C]: the first token dropped
    rows = feature_proj(feats)[0]  # [T - 1, D]
    at = ids.index(extra0)
    emb = peft_lm.get_input_embeddings()(torch.tensor(ids))  # [L, D]
    embeds = torch.cat([emb[:at], rows, emb[at + 1:]])[None]  # [1, L - 1 + T - 1, D]
    return peft_lm(inputs_embeds=embeds).logits[0]  # [L - 1 + T - 1, V]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("bigbro_base")
    return root, tiny_lm_dir(root, "qwen1")


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_imported_logits_equal_the_seed_forward(tmp_path, base, kind):
    from PIL import Image
    from qwenvl_lab.model.bigbro import load_bigbro

    root, lm_dir = base
    tower_dir = _tower_dir(root, kind)
    ckpt = tmp_path / "checkpoint-10"
    peft_lm, feature_proj = write_bigbro_checkpoint(ckpt, lm_dir, tower_dir, kind)
    before = sorted(p.name for p in ckpt.iterdir())
    img = Image.new("RGB", (40, 30), (200, 30, 60))
    img.paste((10, 220, 90), (5, 5, 25, 20))
    prompt = [{"role": "user", "content": QUESTION[0] + "<image>" + QUESTION[1]}]

    for attempt in ("converted", "reloaded"):
        vlm = load_bigbro(ckpt, str(lm_dir), str(tower_dir))
        tower = vlm.towers
        n_patches = tower.grid[0] * tower.grid[1]
        # CLIP: the CLS goes (every patch stays); SigLIP has no CLS: a real patch goes.
        assert vlm.tokens_per_image == (n_patches if kind == "clip" else n_patches - 1)
        ids = vlm.chat_ids(prompt, 1)
        pv = vlm.image_processor([img])
        ours = vlm(torch.tensor([ids]), pixel_values=pv).logits[0]
        ref_ids = seed_prompt_ids(vlm.tokenizer, *QUESTION)
        extra0 = vlm.tokenizer.token_to_id("<|extra_0|>")
        at = ref_ids.index(extra0)
        # our prompt = the seed's with its <|extra_0|> swapped for the image's rows, nothing around them
        assert ids == ref_ids[:at] + [vlm.image_token_id] * vlm.tokens_per_image + ref_ids[at + 1:], attempt
        ref = seed_logits(peft_lm, feature_proj, tower_dir, kind, pv, ref_ids, extra0)
        assert ours.shape == ref.shape
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0, msg=attempt)
    conv = ckpt / "converted"
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(before + ["converted", ".converted.lock"])
    assert (conv / "model.safetensors").is_file() and (conv / "lora" / "adapter_config.json").is_file()
    assert json.loads((conv / "vlm_config.json").read_text())["config"]["chat_template"] == "bigbro"


def test_pickle_with_more_than_tensors_is_refused(tmp_path, base):
    from qwenvl_lab.model.bigbro import BigBroError, read_bin

    good = tmp_path / "good.bin"
    torch.save({"0.weight": torch.ones(2)}, good)
    assert set(read_bin(good)) == {"0.weight"}
    evil = tmp_path / "evil.bin"
    torch.save({"0.weight": torch.ones(2), "why": _NotATensor()}, evil)
    with pytest.raises(BigBroError, match="evil.bin: refused"):
        read_bin(evil)
    listy = tmp_path / "list.bin"
    torch.save([torch.ones(2)], listy)
    with pytest.raises(BigBroError, match="list.bin: refused"):
        read_bin(listy)


class _NotATensor:
    def __reduce__(self):  # unpickling it with weights_only=False would run print: a stand-in for code
        return (print, ("unpickled",))


def test_evil_checkpoint_refused_by_test_py(tmp_path, base):
    root, lm_dir = base
    tower_dir = _tower_dir(root, "clip")
    ckpt = tmp_path / "ckpt"
    write_bigbro_checkpoint(ckpt, lm_dir, tower_dir, "clip")
    with open(ckpt / "other_params.bin", "wb") as f:
        pickle.dump({"0.weight": _NotATensor()}, f)
    img = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (32, 32), (1, 2, 3)).save(img)
    proc = subprocess.run(
        [sys.executable, "test.py", "--base_language_model", str(lm_dir), "--base_value_model", str(tower_dir),
         "--model_weights", str(ckpt), "--image_path", str(img), "--prompt", "hi<|extra_0|>"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "other_params.bin" in errors[0] and "refused" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr and "unpickled" not in proc.stdout + proc.stderr
    assert not (ckpt / "converted").exists()


def _image(path: Path, colour) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (36, 32), colour).save(path)
    return path


def test_seed_test_sh_answers(tmp_path, base):
    from qwenvl_lab.model.bigbro import load_bigbro

    root, lm_dir = base
    tower_dir = _tower_dir(root, "siglip")
    ckpt = tmp_path / "weights" / "checkpoint-10000"
    write_bigbro_checkpoint(ckpt, lm_dir, tower_dir, "siglip")
    img = _image(tmp_path / "test_img" / "1.jpg", (30, 140, 200))
    # that repo's test.sh, as its users have it (only the paths are ours)
    script = tmp_path / "test.sh"
    script.write_text(f'"{sys.executable}" test.py --base_language_model {lm_dir} --base_value_model {tower_dir} '
                      f'--model_weights {ckpt}/ --image_path {img} --prompt "{QUESTION[0]}<|extra_0|>{QUESTION[1]}" '
                      f'--max-new-tokens 5\n')
    proc = subprocess.run(["sh", str(script)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for flag, ours in (("--base_language_model", "--lm"), ("--base_value_model", "--tower"),
                       ("--model_weights", "--model"), ("--image_path", "--image")):
        assert sum(line.startswith(flag) and f"spelt {ours} " in line for line in proc.stderr.splitlines()) == 1
    from qwenvl_lab.dataset import load_image

    vlm = load_bigbro(ckpt, str(lm_dir), str(tower_dir))  # the conversion test.py made
    expect = vlm.chat([load_image(str(img))], [{"role": "user", "content": QUESTION[0] + "<image>" + QUESTION[1]}],
                      max_new_tokens=5)
    assert proc.stdout.strip().splitlines()[-1] == expect.strip()
    assert (ckpt / "converted" / "bigbro_import.json").is_file()


def test_seed_train_sh_continues_from_the_checkpoint(tmp_path, base, monkeypatch, capsys):
    from qwenvl_lab.model import VLM

    from tests.tiny_server import entry

    root, lm_dir = base
    tower_dir = _tower_dir(root, "siglip")
    ckpt = tmp_path / "weights" / "checkpoint-10"
    peft_lm, feature_proj = write_bigbro_checkpoint(ckpt, lm_dir, tower_dir, "siglip")
    monkeypatch.chdir(tmp_path)  # that repo opened the image_map's paths from the current directory
    colours = [(200, 20, 20), (20, 200, 20), (20, 20, 200), (200, 200, 20)]
    image_map = {str(i): f"data/imgs/{i}.png" for i in range(4)}
    for i, c in enumerate(colours):
        _image(tmp_path / image_map[str(i)], c)
    (tmp_path / "data" / "image_map_b.json").write_text(json.dumps(image_map))
    captions = {str(i): [f"一个{['红', '绿', '蓝', '黄'][i]}色的方块"] for i in range(4)}
    (tmp_path / "data" / "captions_b.json").write_text(json.dumps(captions, ensure_ascii=False))
    out = tmp_path / "weights" / "train_V1_6"
    argv = ("--lora_rank 4 --lora_dropout 0.10 --per_device_train_batch_size 2 --gradient_accumulation_steps 1 "
            "--num_train_epochs 2 --save_steps 1000 --save_total_limit 5 --learning_rate 3e-5 --seed 42 "
            "--ddp_find_unused_parameters False --feature_proj_lr 1e-4 --remove_unused_columns false "
            f"--logging_steps 100 --output_dir {out} --target_modules c_attn|w1|w2 "
            "--image_map data/image_map_b.json --captions_file data/captions_b.json "
            f"--base_language_model {lm_dir} --base_value_model {tower_dir} --previous_lora_weights {ckpt} "
            "--report_to none --max_steps 2").split()
    assert entry("train").main(argv) == 0
    said = capsys.readouterr().err.splitlines()
    for flag, ours in (("--lora_rank 4", "lora.r=4"), ("--feature_proj_lr 1e-4", "projector_lr=1e-4"),
                       ("--target_modules c_attn|w1|w2", "lora.targets=c_attn|w1|w2"),
                       (f"--previous_lora_weights {ckpt}", f"init_from={ckpt}")):
        assert sum(line == f"{flag}: spelt {ours} here" for line in said) == 1, (flag, said)
    assert any(line.startswith("--ddp_find_unused_parameters False: ignored") for line in said)
    assert any(line.startswith("--image_map data/image_map_b.json --captions_file") for line in said)

    final = VLM.from_pretrained(out / "final")
    assert final.config.chat_template == "bigbro" and final.towers.select == "drop_first"
    # it went on from the checkpoint: its projector and adapters moved a little from the BigBro ones
    mlp = final.projector.mlp
    for ours, seed in ((mlp[0].weight, feature_proj[0].weight), (mlp[2].weight, feature_proj[2].weight)):
        gap = (ours.float() - seed.float()).abs().max().item()
        assert 0 < gap < 1e-2, gap
    seed_a = dict(peft_lm.named_parameters())["base_model.model.transformer.h.0.attn.c_attn.lora_A.default.weight"]
    ours_a = dict(final.lm.named_parameters())["base_model.model.transformer.h.0.attn.c_attn.lora_A.default.weight"]
    gap = (ours_a.float() - seed_a.float()).abs().max().item()
    assert 0 < gap < 1e-2, gap


def test_train_flags_in_our_spelling(tmp_path, base, capsys):
    from qwenvl_lab.core.errors import UserError
    from qwenvl_lab.dataprocess.bigbro import train_argv

    root, lm_dir = base
    tower_dir = _tower_dir(root, "clip")
    got = train_argv(["--bf16", "True", "--gradient_checkpointing", "--report_to", "none", "--output_dir=runs/x",
                      "--base_language_model", str(lm_dir), "--base_value_model", str(tower_dir), "seed=3"])
    for want in ("precision=bf16", "gradient_checkpointing=true", "report_to=[]", "output_dir=runs/x", "seed=3",
                 f"model.lm={lm_dir}", "model.chat_template=bigbro", "model.image_mode=crop"):
        assert want in got, (want, got)
    towers = [a for a in got if a.startswith("model.towers=")]
    assert len(towers) == 1 and '"hf_clip"' in towers[0] and '"drop_first"' in towers[0]
    assert train_argv(["configs/x.yaml", "lora.r=4"]) == ["configs/x.yaml", "lora.r=4"]  # ours: unchanged
    with pytest.raises(UserError, match="--warmup_stepz"):
        train_argv(["--warmup_stepz", "10"])
    capsys.readouterr()


def test_checkpoint_without_base_names_says_so(tmp_path, base, capsys):
    from qwenvl_lab.core.cli import run_cli

    from tests.tiny_server import entry

    root, lm_dir = base
    ckpt = tmp_path / "ckpt"
    write_bigbro_checkpoint(ckpt, lm_dir, _tower_dir(root, "clip"), "clip")
    img = _image(tmp_path / "a.png", (9, 9, 9))
    assert run_cli(entry("test").main, ["--model_weights", str(ckpt), "--image_path", str(img), "--prompt", "q"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "BigBro checkpoint" in err[0] and "--base_value_model" in err[0]
    assert not (ckpt / "converted").exists()


def test_init_from_with_our_keys(tmp_path, base):
    from qwenvl_lab.dataprocess.bigbro import resolve_init_from
    from qwenvl_lab.model import VLM
    from qwenvl_lab.model.train_config import check_paths, load_train_config

    root, lm_dir = base
    tower_dir = _tower_dir(root, "clip")
    ckpt = tmp_path / "ckpt"
    write_bigbro_checkpoint(ckpt, lm_dir, tower_dir, "clip")
    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    over = [f"init_from={ckpt}", f"model.lm={lm_dir}", f"model.towers=[{{backend: hf_clip, name_or_path: {tower_dir}}}]",
            f"data_path=[{data}]", f"output_dir={tmp_path / 'run'}", "lora.r=4", "lora.targets=c_attn|w1|w2"]
    cfg = resolve_init_from(load_train_config(None, over))
    assert cfg.init_from == str(ckpt / "converted") and cfg.model == {}
    check_paths(cfg)  # a model directory of ours now
    vlm = VLM.from_pretrained(cfg.init_from)
    assert vlm.config.chat_template == "bigbro" and vlm.towers.last_hidden_state
    # its adapters train on when lora.* names them; other settings would lose them in a trainable-only model
    from qwenvl_lab.core.config_io import ConfigError
    from qwenvl_lab.trainer.run import continue_or_fold_adapters

    assert continue_or_fold_adapters(cfg, vlm).r == 0  # no second set of adapters
    for key, value in (("r", 8), ("targets", "c_attn|w1")):
        other = load_train_config(None, over + [f"lora.{key}={value}"])
        with pytest.raises(ConfigError, match="save_full_model=true"):
            continue_or_fold_adapters(other, vlm)
