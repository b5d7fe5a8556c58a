"""Test setup: offline hubs, the Triton interpreter, and tiny local fixtures.

Environment variables are set before anything imports torch, transformers or a kernel module.
`make gpu-check` runs the kernel tests on a GPU with TRITON_INTERPRET=0 (kept: only a missing value
becomes 1, so Triton compiles for the GPU) and QWENVL_TEST_DEVICE=cuda (tensors a test creates without
naming a device are created there).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `dtype: auto` would pick bf16 on a CPU with AMX; tiny-model tests compare values in fp32 everywhere.
os.environ.setdefault("QWENVL_AUTO_DTYPE", "float32")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SHARED_QWEN1 = SHARED / "data" / "qwen1"
SHARED_IMAGES = SHARED / "data" / "images"

torch.set_num_threads(2)
if os.environ.get("QWENVL_TEST_DEVICE"):
    torch.set_default_device(os.environ["QWENVL_TEST_DEVICE"])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def shared_qwen1() -> Path:
    """The real Qwen-1 vocabulary and configs; tests using it skip when ../shared is absent."""
    if not (SHARED_QWEN1 / "qwen.tiktoken").is_file():
        pytest.skip("../shared/data/qwen1 not present")
    return SHARED_QWEN1


@pytest.fixture
def shared_images() -> Path:
    if not SHARED_IMAGES.is_dir():
        pytest.skip("../shared/data/images not present")
    return SHARED_IMAGES
