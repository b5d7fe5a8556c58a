"""The shared ground every other package stands on (the bottom layer): user errors (`errors`), the command-line
runner (`cli`), config file reading (`config_io`), the supervised-only loss (`loss`) and the placeholder
scatter every LM backbone uses (`placeholders`). It imports no other package of the project."""

if not __package__.startswith("qwenvl_lab."):  # the old spelling: `python -m core...` from the checkout
    from qwenvl_lab._moved import refuse  # (absolute: this is not qwenvl_lab.*)

    refuse(__package__)
