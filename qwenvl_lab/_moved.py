"""The answer to a module run or imported by its old top-level name (`python -m model.plan` from the checkout)."""

import sys


def refuse(package: str) -> None:
    """`python -m model.plan`: exit with one line naming the new spelling; `import model`: an ImportError."""
    argv = sys.orig_argv
    old = argv[argv.index("-m") + 1] if "-m" in argv[:-1] else ""
    if old.split(".")[0] == package:
        print(f"error: `{old}` is `qwenvl_lab.{old}` now: run `python -m qwenvl_lab.{old} ...` (see the README)",
              file=sys.stderr)
        raise SystemExit(2)
    raise ImportError(f"`{package}` is `qwenvl_lab.{package}` now: `from qwenvl_lab.{package} import ...`")
