"""Tiny training runs for tests: a few dozen shapes samples, a learned vocabulary, a ~100k-param VLM.

`make_tiny_data(dir)` writes the shapes data and its vocabulary once per directory;
`tiny_train_config(tmp, **overrides)` returns a validated TrainConfig that trains in seconds.
"""

from __future__ import annotations

from pathlib import Path

from qwenvl_lab.dataprocess.make_shapes import make_shapes
from qwenvl_lab.dataprocess.make_vocab import _texts_from_jsonl, train_bpe, write_tiktoken
from qwenvl_lab.model.train_config import TrainConfig, load_train_config

TINY_TOWER = {
    "backend": "timm", "name_or_path": "resnet10t", "pretrained": False, "feature_layer": -1,
    "channels": [8, 8, 16, 16], "stem_width": 8, "output_stride": 8,
    "pretrained_cfg_overlay": {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3},
}


def make_tiny_data(root: str | Path, n_train: int = 48, n_val: int = 8) -> Path:
    root = Path(root)
    if not (root / "train.jsonl").is_file():
        make_shapes(root, n_train=n_train, n_val=n_val, seed=0, size=32)
        write_tiktoken(train_bpe(_texts_from_jsonl(root / "train.jsonl"), 200), root / "vocab")
    return root


def tiny_model_section(data: Path, hidden: int = 32) -> dict:
    return {
        "lm": "scratch", "lm_backend": "qwen",
        "lm_config": {"arch": "qwen2", "vocab_size": 512, "hidden_size": hidden, "num_hidden_layers": 2,
                      "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 64,
                      "max_position_embeddings": 256, "tie_word_embeddings": True},
        "tokenizer": str(data / "vocab"),
        "towers": [dict(TINY_TOWER)],
        "image_mode": "resize", "projector": "mlp2x_gelu", "freeze_towers": False,
    }


def tiny_train_config(tmp: str | Path, data: str | Path, **overrides) -> TrainConfig:
    """A validated config for a run of a few steps in `tmp/run` (overrides are `key=value` semantics)."""
    data = Path(data)
    base = {
        "model": tiny_model_section(data),
        "data_path": [str(data / "train.jsonl")],
        "image_folder": str(data),
        "max_length": 160,
        "stage": "full",
        "learning_rate": 3e-3,
        "vision_lr": 3e-3,
        "warmup_ratio": 0.0,
        "per_device_train_batch_size": 4,
        "max_steps": 4,
        "logging_steps": 1,
        "save_steps": 1000,
        "precision": "fp32",
        "report_to": [],
        "dataloader_num_workers": 0,
        "output_dir": str(Path(tmp) / "run"),
    }
    base.update(overrides)
    import yaml

    Path(tmp).mkdir(parents=True, exist_ok=True)
    path = Path(tmp) / "tiny_config.yaml"
    path.write_text(yaml.safe_dump(base))
    return load_train_config(str(path))


def run_losses(run: Path) -> dict[int, float]:
    """Logged loss per optimizer step of a run directory (the last row of a step wins)."""
    from qwenvl_lab.trainer.callbacks import read_log

    return {r["step"]: r["loss"] for r in read_log(Path(run) / "log.jsonl") if "loss" in r}
