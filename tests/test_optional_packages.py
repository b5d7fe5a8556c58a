"""Optional packages (open_clip, PyAV, fastapi / uvicorn / gradio, bitsandbytes, deepspeed) are absent on some
machines: importing the entry points and the core packages must not need them, and the one feature that
does answers with a UserError naming the package. A package is made absent by `sys.modules[name] = None`,
which makes both `import name` and `importlib.util.find_spec(name)` see no such package."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from qwenvl_lab.core.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("open_clip", "av", "fastapi", "uvicorn", "gradio", "bitsandbytes", "deepspeed")
CORE = ("train", "test") + tuple("qwenvl_lab." + m for m in (
    "trainer.run", "trainer.hf_trainer", "model", "model.model", "kernels.attention", "visual", "visual.registry",
    "qwen", "dataset", "evaluation", "serve.cli"))


def _hide(monkeypatch, *names: str) -> None:
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)


def test_core_modules_import_without_the_optional_packages():
    code = (f"import importlib, sys\nfor n in {OPTIONAL!r}: sys.modules[n] = None\n"
            f"for m in {CORE!r}: importlib.import_module(m)\n"
            "print('imported', len(" + repr(CORE) + "))")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"imported {len(CORE)}" in out.stdout


def test_open_clip_tower_without_open_clip_names_the_package(monkeypatch):
    from qwenvl_lab.visual import build_tower

    _hide(monkeypatch, "open_clip", "open_clip.transformer")
    with pytest.raises(UserError, match="open_clip package.*pip install open-clip-torch"):
        build_tower("open_clip", "hf-hub:timm/ViT-B-16-SigLIP")


def test_video_without_pyav_names_the_package(monkeypatch, tmp_path):
    from qwenvl_lab.dataset.images import load_video_frames

    _hide(monkeypatch, "av")
    (tmp_path / "clip.mp4").write_bytes(b"not read")
    with pytest.raises(UserError, match="PyAV package"):
        load_video_frames(tmp_path / "clip.mp4", 4)


def test_server_without_fastapi_names_the_package(monkeypatch):
    from qwenvl_lab.serve.cli import check_server_packages

    _hide(monkeypatch, "fastapi")
    with pytest.raises(UserError, match=r"needs fastapi\b.*not installed.*\[serve\]"):
        check_server_packages()


@pytest.mark.parametrize("overrides,key,package", [
    ({"deepspeed": "configs/engines/zero2.json"}, "deepspeed", "deepspeed"),
    ({"stage": "sft", "lora": {"r": 4, "qlora": True}}, "lora.qlora", "bitsandbytes"),
])
def test_config_key_needing_a_missing_package_is_a_config_error(monkeypatch, tmp_path, overrides, key, package):
    from qwenvl_lab.core.config_io import ConfigError
    from qwenvl_lab.model.train_config import check_paths

    from tests.tiny_train import make_tiny_data, tiny_train_config

    cfg = tiny_train_config(tmp_path, make_tiny_data(tmp_path / "data", n_train=4, n_val=1), **overrides)
    _hide(monkeypatch, package)
    with pytest.raises(ConfigError, match=f"^{key} needs the {package} package"):
        check_paths(cfg)
