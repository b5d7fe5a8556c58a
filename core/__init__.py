"""The shared ground every other package stands on (the bottom layer): user errors (`errors`), the command-line
runner (`cli`), config file reading (`config_io`), the supervised-only loss (`loss`) and the placeholder
scatter every LM backbone uses (`placeholders`). It imports no other package of the project."""

if not __package__.startswith("qwenvl_lab."):  # the old spelling: `python -m core...` from the checkout
    from qwenvl_lab._moved import refuse  # (absolute: this is not qwenvl_lab.*)

    refuse(__package__)

# Installs the NOISE filters (core/cli.py) whenever any module of the package loads, so library use
# (`from qwenvl_lab.model import VLM` in a notebook) starts as quietly as the entry points do.
from .cli import quiet_third_party  # noqa: E402,F401
