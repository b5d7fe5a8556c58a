"""The BigBro repo's command lines, run here unchanged: its flags as aliases of our keys.

Each flag of that repo's test.py / train.py is rewritten to our spelling before our parser sees it, with one
line on stderr saying how it is spelt here (`--flag value` and `--flag=value` both work).
It sits with the converters (dataprocess/, above the trainer) because its `--image_map` / `--captions_file`
flags convert that repo's data with `image_map.py` and its `init_from` converts that repo's checkpoints
(model/bigbro.py); train.py and test.py, the only commands that take those flags, import it from here.

- `test_argv(argv)`: `--base_language_model X` -> `--lm X`, `--base_value_model X` -> `--tower X`,
  `--model_weights D` -> `--model D`, `--image_path P` -> `--image P` (`--prompt` is the same).
- `train_argv(argv)`: a train.py command line with `--flag value` arguments (that repo's train.sh: HF
  TrainingArguments plus `--lora_rank --lora_dropout --target_modules --feature_proj_lr --image_map
  --captions_file --previous_lora_weights`) -> our `key=value` overrides: `lora.r`, `lora.dropout`,
  `lora.targets`, `projector_lr`, `data_path` (the image_map + captions pair converted once to our JSONL
  beside the captions file, `dataprocess/image_map.py` with Chinese prompts; image paths relative to the
  current directory, as that repo opened them), `init_from`. The model is that repo's (model/bigbro.py:
  its tower features, projector and prompt) on `--base_language_model` / `--base_value_model`, by default
  the pair its train.py hard-codes. TrainingArguments that are our keys pass under the same name
  (`--bf16 true` -> `precision=bf16`, `--report_to none` -> `report_to=[]`); the few that mean nothing here
  are ignored with a line; any other flag is an error listing the known ones. A command line without
  `--flag`s is returned unchanged.
- `resolve_init_from(cfg)`: `init_from` naming a BigBro checkpoint is converted once (model/bigbro.py)
  with the base models of `model.lm` / `model.towers[0].name_or_path` (over the `preset`'s), then names
  the conversion (and the model keys are dropped: the conversion holds the whole model).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ..core.errors import UserError
from ..model.paths import is_bigbro_dir
from .common import read_text, write_jsonl
from .image_map import convert_image_map, parse_captions, parse_image_map

TEST_ALIASES = {"--base_language_model": "--lm", "--base_value_model": "--tower", "--model_weights": "--model",
                "--image_path": "--image"}
# What the BigBro repo's train.py hard-codes for its base models.
SEED_LM, SEED_TOWER = "Qwen/Qwen-7B-Chat", "openai/clip-vit-large-patch14"
# Its own flags -> our keys.
TRAIN_ALIASES = {"lora_rank": "lora.r", "lora_dropout": "lora.dropout", "target_modules": "lora.targets",
                 "feature_proj_lr": "projector_lr", "previous_lora_weights": "init_from"}
# TrainingArguments with the same meaning and name here.
SAME_KEYS = ("learning_rate", "per_device_train_batch_size", "per_device_eval_batch_size",
             "gradient_accumulation_steps", "num_train_epochs", "max_steps", "save_steps", "save_total_limit",
             "logging_steps", "seed", "output_dir", "warmup_ratio", "weight_decay", "lr_scheduler_type",
             "max_grad_norm", "gradient_checkpointing", "dataloader_num_workers", "deepspeed", "eval_steps",
             "group_by_length", "resume_from_checkpoint", "ddp_timeout", "fsdp", "fsdp_config")
# TrainingArguments that change nothing here (why in the line printed).
IGNORED = {"ddp_find_unused_parameters": "DDP here never needs unused-parameter detection",
           "remove_unused_columns": "our collator reads its own columns", "do_train": "train.py always trains",
           "overwrite_output_dir": "output_dir is reused as is", "local_rank": "torchrun's LOCAL_RANK is read",
           "logging_dir": "logs go to output_dir", "save_strategy": "save_steps decides",
           "logging_strategy": "logging_steps decides", "tf32": "matmul precision is set per device",
           "dataloader_pin_memory": "set by the run", "disable_tqdm": "progress is logged per logging_steps",
           "save_safetensors": "checkpoints are always safetensors", "optim": "the optimizer is AdamW"}
BOOL_FLAGS = {"bf16", "fp16", "gradient_checkpointing", "group_by_length", "do_train", "overwrite_output_dir",
              "remove_unused_columns", "ddp_find_unused_parameters", "tf32", "disable_tqdm", "save_safetensors",
              "dataloader_pin_memory"}
FALSE = ("false", "0", "no")


def _say(line: str) -> None:
    print(line, file=sys.stderr)


def _pairs(argv: list[str], is_bool=lambda name: False) -> list[tuple[str, str | None, str]]:
    """(name, value or None, the text as given) per `--name value` / `--name=value`; other items: ("", item)."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if not a.startswith("--") or a in ("--check", "--debug"):
            out.append(("", a, a))
            i += 1
            continue
        name, eq, value = a[2:].partition("=")
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            takes = nxt is not None and not nxt.startswith("--")
            if is_bool(name) and takes and nxt.lower() not in ("true", "false", "1", "0", "yes", "no"):
                takes = False  # a bare boolean switch followed by something else
            value = nxt if takes else None
            i += 1 + int(takes)
        else:
            i += 1
        out.append((name, value, a if eq else f"{a} {value}" if value is not None else a))
    return out


def test_argv(argv: list[str]) -> list[str]:
    """That repo's test.py flags in our spelling."""
    out: list[str] = []
    for name, value, given in _pairs(argv):
        flag = f"--{name}"
        if name and flag in TEST_ALIASES:
            if value is None:
                raise UserError(f"{flag} needs a value")
            ours = TEST_ALIASES[flag]
            _say(f"{given}: spelt {ours} {value} here")
            out += [ours, value]
        elif name:
            out += [flag] + ([] if value is None else [value])
        else:
            out.append(value)
    return out


def _is_flag_line(argv: list[str]) -> bool:
    return any(a.startswith("--") and a not in ("--check", "--debug", "--help") for a in argv)


def train_argv(argv: list[str]) -> list[str]:
    """That repo's train.py command line as our key=value overrides (unchanged when it has no --flags)."""
    if not _is_flag_line(argv):
        return argv
    kept, overrides, named, data = [], [], {}, {}
    for name, value, given in _pairs(argv, lambda n: n in BOOL_FLAGS):
        if not name:  # --check, a config file: in front; key=value overrides pass on
            (overrides if "=" in value else kept).append(value)
            continue
        key, ours = _translate(name, value, given)
        if key in ("base_language_model", "base_value_model"):
            named[key] = value
        elif key in ("image_map", "captions_file"):
            data[key] = value
        elif ours is not None:
            overrides.append(ours)
            _say(f"{given}: spelt {ours} here")
    overrides = _model_overrides(named, overrides) + _data_overrides(data, overrides) + overrides
    return sorted(kept, key=lambda a: a != "--check") + overrides


def _translate(name: str, value: str | None, given: str) -> tuple[str, str | None]:
    """(name, our key=value or None) for one flag; ignored flags say so, unknown ones are an error."""
    if name in IGNORED:
        _say(f"{given}: ignored here ({IGNORED[name]})")
        return name, None
    if name in ("bf16", "fp16"):
        on = value is None or value.lower() not in FALSE
        return name, (f"precision={name}" if on else None)
    if value is None and name not in BOOL_FLAGS:
        raise UserError(f"--{name} needs a value")
    if name in ("base_language_model", "base_value_model", "image_map", "captions_file"):
        return name, None
    if name == "report_to":
        return name, "report_to=[]" if value.lower() == "none" else f"report_to=[{value}]"
    if name in TRAIN_ALIASES:
        return name, f"{TRAIN_ALIASES[name]}={value}"
    if name in SAME_KEYS:
        return name, f"{name}={'true' if value is None else value}"
    known = sorted([*TRAIN_ALIASES, *SAME_KEYS, *IGNORED, "bf16", "fp16", "report_to", "base_language_model",
                    "base_value_model", "image_map", "captions_file"])
    raise UserError(f"--{name}: not a flag train.py knows (the BigBro repo's flags it reads: {', '.join(known)}); "
                    f"our own keys are key=value (python train.py --help)")


def _model_overrides(named: dict, overrides: list[str]) -> list[str]:
    """model.* keys of the BigBro model on the named base models (its train.py's pair when none are named)."""
    lm, tower = named.get("base_language_model"), named.get("base_value_model")
    if lm is None:
        _say(f"--base_language_model not given: {SEED_LM}, as the BigBro repo's train.py")
        lm = SEED_LM
    if tower is None:
        _say(f"--base_value_model not given: {SEED_TOWER}, as the BigBro repo's train.py")
        tower = SEED_TOWER
    from ..model.bigbro import (
        bigbro_config,  # torch + transformers: the tower's family is read from its config
    )

    cfg = bigbro_config(lm, tower)
    spec = cfg["towers"][0]
    ours = [f"model.lm={lm}", "model.lm_backend=qwen", f"model.image_mode={cfg['image_mode']}",
            f"model.projector={cfg['projector']}", f"model.chat_template={cfg['chat_template']}",
            "model.towers=[{" + ", ".join(f"{k}: {_yaml(v)}" for k, v in spec.items()) + "}]"]
    if "base_language_model" in named:
        _say(f"--base_language_model {lm}: spelt model.lm={lm} here")
    if "base_value_model" in named:
        _say(f"--base_value_model {tower}: spelt {ours[-1]} here")
    _say(f"the BigBro model layout: {' '.join(ours[1:5])} (its tower features: select=drop_first, "
         f"last_hidden_state=true)")
    return ours


def _yaml(v) -> str:
    return json.dumps(v) if isinstance(v, (str, bool)) else str(v)


def _data_overrides(data: dict, overrides: list[str]) -> list[str]:
    if not data:
        return []
    if set(data) != {"image_map", "captions_file"}:
        raise UserError("--image_map and --captions_file go together (the image files and their captions)")

    imap_path, caps_path = Path(data["image_map"]), Path(data["captions_file"])
    image_map = parse_image_map(read_text(imap_path), str(imap_path))
    result, _ = convert_image_map(image_map, parse_captions(read_text(caps_path), str(caps_path)), lang="zh")
    if not result.samples:
        raise UserError(f"{caps_path}: no caption has an image in {imap_path}; nothing to train on")
    out = caps_path.with_name(caps_path.stem + ".image_map.jsonl")
    tmp = out.with_name(f".{out.name}.{os.getpid()}")
    write_jsonl(tmp, result.samples)
    os.replace(tmp, out)  # several processes (torchrun) write the same file: each replace is whole
    ours = [f"data_path=[{_yaml(str(out))}]", f"image_folder={_yaml(str(Path.cwd()))}"]
    if any(Path(p).is_absolute() for p in image_map.values()) and not any(
            o.startswith("allow_absolute_paths=") for o in overrides):
        ours.append("allow_absolute_paths=true")
    _say(f"--image_map {imap_path} --captions_file {caps_path}: {len(result.samples)} caption samples written to "
         f"{out} ({len(result.skipped)} skipped); spelt {' '.join(ours)} here")
    return ours


def resolve_init_from(cfg):
    """A BigBro checkpoint in `init_from`: converted once, then `init_from` names the conversion."""
    if not cfg.init_from or not is_bigbro_dir(cfg.init_from):
        return cfg
    from ..model.bigbro import convert_bigbro  # heavy (torch): only for a BigBro checkpoint
    from ..model.model import PRESETS

    named = {**(PRESETS.get(cfg.preset, {}) if cfg.preset else {}), **cfg.model}  # base names: preset, model.*
    lm, tower = named.get("lm"), (named.get("towers") or [{}])[0].get("name_or_path")

    cfg.init_from = str(convert_bigbro(cfg.init_from, lm, tower))
    cfg.model, cfg.preset = {}, None  # the conversion holds the whole model
    return cfg
