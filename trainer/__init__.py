"""Training library behind train.py: config, what trains, optimizer groups, the Trainer, logging."""

if not __package__.startswith("qwenvl_lab."):  # the old spelling: `python -m trainer...` from the checkout
    from qwenvl_lab._moved import refuse  # (absolute: this is not qwenvl_lab.*)

    refuse(__package__)
