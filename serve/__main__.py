"""`python -m qwenvl_lab.serve --model RUN_OR_MODEL_DIR [--host 127.0.0.1] [--port 8000]`: see serve/cli.py."""

import sys

from ..core.cli import run_cli
from .cli import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
