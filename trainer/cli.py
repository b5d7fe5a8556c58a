"""How every entry point answers a user mistake: one line `error: ...`, exit status 2, no traceback.

Contract:
- `UserError` (defined in dataset/sample.py, the lowest module every package imports): an expected
  mistake of the user's (a missing or bad file, a bad key, a model directory without a model, a hub name
  while offline, data with no usable sample, an unwritable output directory). Its message names the file,
  key or sample and says what to do. `ConfigError`, `DataFileError` and `BadSampleError` are UserErrors.
- `run_cli(main, argv=None) -> int` runs `main(argv)`; a UserError becomes `error: <message>` on stderr
  and exit status 2. Anything else is a bug and keeps its traceback. `--debug` on the command line (removed
  before `main` sees it) or `QWENVL_DEBUG=1` shows the traceback of user errors too.
- `writable_dir(path, what)`: creates `path` (and parents) or raises a UserError naming it.
This module imports nothing heavy, so converters and `--help` stay fast.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from dataset.sample import UserError

__all__ = ["UserError", "run_cli", "writable_dir"]

DEBUG_ENV = "QWENVL_DEBUG"


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
