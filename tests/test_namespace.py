"""One import name: installed, the project adds `qwenvl_lab` and nothing else to the top-level names; from the
checkout its folders never hide another package (Hugging Face's `kernels` is the one that collided), and the
old spellings (`python -m model.plan`) answer with one line naming the new one."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("core", "model", "dataset", "trainer", "kernels", "visual", "qwen", "serve", "evaluation", "dataprocess")


def _run(code: str, cwd: Path, extra_path: str = "") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    if extra_path:
        env["PYTHONPATH"] = extra_path
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _installed() -> bool:
    out = _run("import qwenvl_lab, sys; print(qwenvl_lab.__file__)", Path("/"))
    return out.returncode == 0


@pytest.fixture
def hf_kernels(tmp_path) -> Path:
    """A stand-in for Hugging Face's `kernels` distribution (a regular package + its dist-info, version 0.17.2)."""
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("__version__ = '0.17.2'\nHUB = True\n")
    info = site / "kernels-0.17.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 0.17.2\n")
    return site


def test_the_checkout_never_hides_hf_kernels(hf_kernels):
    # From the checkout's root (on sys.path first, as for `python train.py`), with the other `kernels` installed.
    code = ("import sys; sys.path.insert(0, '.')\n"
            "import kernels; assert kernels.HUB, kernels.__file__\n"
            "from transformers.utils.import_utils import _is_package_available\n"
            "assert _is_package_available('kernels', return_version=True) == (True, '0.17.2')\n"
            "from transformers import PreTrainedModel\n"
            "from qwenvl_lab.kernels.attention import attention\n"
            "from qwenvl_lab.qwen.modeling import QWenModel\n"
            "import qwenvl_lab.kernels as ours; assert 'kernels' in ours.__path__[0]\n"
            "print('ok', kernels.__file__)")
    out = _run(code, ROOT, str(hf_kernels))
    assert out.returncode == 0, out.stderr[-2000:]
    assert str(hf_kernels) in out.stdout


@pytest.mark.skipif(not _installed(), reason="the project is not installed in this environment (make setup does it)")
def test_installed_adds_one_import_name(tmp_path, hf_kernels):
    code = ("from qwenvl_lab.model import VLM, build_vlm\n"
            "import kernels; assert kernels.HUB\n"
            "import importlib.util as u\n"
            f"print(sorted(n for n in {FOLDERS!r} if u.find_spec(n) is not None))")
    out = _run(code, tmp_path, str(hf_kernels))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "['kernels']"  # only the other project's package; none of our folders


@pytest.mark.parametrize("argv, new", [(["-m", "model.plan", "--help"], "qwenvl_lab.model.plan"),
                                       (["-m", "evaluation", "--help"], "qwenvl_lab.evaluation"),
                                       (["-m", "kernels.selftest"], "qwenvl_lab.kernels.selftest")])
def test_old_spellings_name_the_new_one(argv, new):
    if argv[1].startswith("kernels."):
        spec = importlib.util.find_spec("kernels")
        if spec is not None and spec.origin is not None:  # a regular package: Hugging Face's, which wins
            pytest.skip("Hugging Face's `kernels` is installed: `kernels.*` is its name, not ours any more")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and f"python -m {new}" in lines[0], out.stderr


def test_old_import_name_is_an_import_error():
    out = _run("import sys; sys.path.insert(0, '.')\ntry:\n    import model\nexcept ImportError as e:\n    print(e)\n",
               ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "from qwenvl_lab.model import" in out.stdout
