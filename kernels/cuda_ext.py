"""Build-on-first-use loader for the CUDA flash attention extension in `kernels/csrc/`.

Contract
--------
* `load()` compiles `csrc/flash_attn.cu` + `csrc/flash_attn.cpp` with `torch.utils.cpp_extension.load`
  into a cache directory (`$QWENVL_KERNEL_CACHE`, else `~/.cache/qwenvl_lab/torch_extensions/<tag>`)
  and returns the module (`fwd`, `bwd`, `max_head_dim`). Later calls reuse the process-wide module; a
  later process reuses the cached objects (ninja only rebuilds what changed).
* Architectures: `TORCH_CUDA_ARCH_LIST` when set, else the GPUs present, else one arch ("8.0") so a
  build on a machine without a GPU stays as short as possible.
* A failed build raises `CudaExtensionError` whose message ends with the tail of the build log; the
  failure is remembered so a second call fails fast with the same message.
* `is_built()` says whether the module is loaded in this process (no build is attempted); `prebuilt()`
  whether the build cache holds a compiled module.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = [CSRC / "flash_attn.cpp", CSRC / "flash_attn.cu"]
EXT_NAME = "qwenvl_flash_attn"
DEFAULT_ARCH = "8.0"  # only used when there is neither a GPU nor TORCH_CUDA_ARCH_LIST
LOG_TAIL_LINES = 40

_module: ModuleType | None = None
_failure: str | None = None


class CudaExtensionError(RuntimeError):
    """The CUDA extension could not be built or imported."""


def cache_dir() -> Path:
    """Where build artefacts go; keyed by torch + CUDA version so upgrades never mix objects."""
    env = os.environ.get("QWENVL_KERNEL_CACHE")
    if env:
        return Path(env).expanduser()
    tag = f"torch{torch.__version__.split('+')[0]}_cu{(torch.version.cuda or 'none').replace('.', '')}"
    return Path.home() / ".cache" / "qwenvl_lab" / "torch_extensions" / tag


def _find_cuda_home() -> str | None:
    for key in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(key):
            return os.environ[key]
    # nvcc on PATH may be a wrapper script outside the toolkit, so prefer the conventional location.
    for cand in ("/usr/local/cuda",):
        if (Path(cand) / "include" / "cuda_runtime.h").is_file():
            return cand
    nvcc = shutil.which("nvcc")
    return str(Path(nvcc).resolve().parent.parent) if nvcc else None


def _arch_list() -> str:
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{a}.{b}" for a, b in caps)
    return DEFAULT_ARCH


def _tail(text: str, n: int = LOG_TAIL_LINES) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


def is_built() -> bool:
    return _module is not None


def prebuilt() -> bool:
    """Whether a compiled module is in the build cache (loading it then takes seconds, not minutes)."""
    return (cache_dir() / f"{EXT_NAME}.so").is_file()


def load(verbose: bool = False) -> ModuleType:
    """Build (if needed) and import the extension; raises CudaExtensionError with the log tail."""
    global _module, _failure
    if _module is not None:
        return _module
    if _failure is not None:
        raise CudaExtensionError(_failure)
    if torch.version.cuda is None:
        _failure = "torch was built without CUDA; the CUDA attention extension cannot be built"
        raise CudaExtensionError(_failure)
    cuda_home = _find_cuda_home()
    if cuda_home is None or not (Path(cuda_home) / "include" / "cuda_runtime.h").is_file():
        _failure = f"CUDA toolkit not found (CUDA_HOME={cuda_home!r}); set CUDA_HOME to build the extension"
        raise CudaExtensionError(_failure)

    # cpp_extension resolves CUDA_HOME once at import (maybe earlier, elsewhere): set both.
    os.environ.setdefault("CUDA_HOME", cuda_home)
    from torch.utils import cpp_extension

    cpp_extension.CUDA_HOME = cuda_home
    build_dir = cache_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    arch = _arch_list()
    old_arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch
    log.info("building CUDA attention extension for arch %s in %s (first use can take minutes)", arch, build_dir)
    try:
        _module = cpp_extension.load(
            name=EXT_NAME,
            sources=[str(s) for s in SOURCES],
            build_directory=str(build_dir),
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3", "--use_fast_math", "-lineinfo"],
            verbose=verbose,
        )
    except Exception as e:  # noqa: BLE001 - any build/import failure becomes one clear error
        _failure = f"building/importing the CUDA attention extension failed in {build_dir}:\n{_tail(str(e))}"
        raise CudaExtensionError(_failure) from e
    finally:
        if old_arch is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = old_arch
    return _module


def reset() -> None:
    """Forget a remembered failure (tests use this after monkeypatching the build)."""
    global _failure
    _failure = None
