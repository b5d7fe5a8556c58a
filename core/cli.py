"""How every entry point answers a user mistake: one line `error: ...`, exit status 2, no traceback.

Contract:
- `UserError` (core/errors.py, in the bottom layer every package may import): an expected
  mistake of the user's (a missing or bad file, a bad key, a model directory without a model, a hub name
  while offline, data with no usable sample, an unwritable output directory). Its message names the file,
  key or sample and says what to do. `ConfigError`, `DataFileError` and `BadSampleError` are UserErrors.
- `run_cli(main, argv=None) -> int` runs `main(argv)`; a UserError becomes `error: <message>` on stderr
  and exit status 2. Anything else is a bug and keeps its traceback. `--debug` on the command line (removed
  before `main` sees it) or `QWENVL_DEBUG=1` shows the traceback of user errors too.
- `writable_dir(path, what)`: creates `path` (and parents) or raises a UserError naming it.
- `quiet_third_party()`: drops the start-up messages of third-party libraries that say nothing a user can
  act on (`NOISE`: a logger name and the prefixes of the messages dropped from it; nothing else from that
  logger, no warning of ours). It runs when this module is imported, before any entry point's heavy
  imports (bitsandbytes logs at import time), and is idempotent; handlers set up later keep it.
This module imports nothing heavy, so converters and `--help` stay fast.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from .errors import UserError

__all__ = ["quiet_third_party", "run_cli", "writable_dir"]

DEBUG_ENV = "QWENVL_DEBUG"

NOISE: dict[str, tuple[str, ...]] = {
    # bitsandbytes on AVX512-BF16 CPUs tries an optional CPU kernel from the Hugging Face hub through
    # Hugging Face's `kernels` package (absent, untrusted or offline) and falls back to its own kernel.
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
    # DeepSpeed's accelerator detection on a machine without CUDA (the run logs its own device choices).
    "DeepSpeed": ("Setting accelerator to CPU.",),
}


class _DropMessages(logging.Filter):
    """Drops the records of one logger whose message starts with one of `prefixes`."""

    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def quiet_third_party() -> None:
    """Install the `NOISE` filters on their loggers (once; the loggers need not exist yet)."""
    for name, prefixes in NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(prefixes))


quiet_third_party()  # at import: entry points import heavy modules (which log as they load) before run_cli


def debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def run_cli(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    argv = [a for a in argv if a != "--debug"]
    try:
        return int(main(argv) or 0)
    except UserError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def writable_dir(path: str | Path, what: str = "output directory") -> Path:
    """Create `path` if needed and check that a file can be written in it."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / ".write_test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{what} {p} cannot be written ({e.strerror or e}); choose another path") from None
    return p
