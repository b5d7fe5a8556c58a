"""Training library behind train.py: config, what trains, optimizer groups, the Trainer, logging."""
