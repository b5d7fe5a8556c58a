"""Training library behind train.py: optimizer groups, the Trainer, throughput and loss logging (the run's config and
what trains are model/train_config.py and model/stages.py, below it)."""

if not __package__.startswith("qwenvl_lab."):  # the old spelling: `python -m trainer...` from the checkout
    from qwenvl_lab._moved import refuse  # (absolute: this is not qwenvl_lab.*)

    refuse(__package__)
