"""trainer/hf_trainer.py overrides private methods of transformers' Trainer: each must still exist in the
installed transformers, with the parameters our override expects, or this test names what changed."""

from __future__ import annotations

import inspect

import transformers

from trainer.hf_trainer import PRIVATE_TRAINER_ATTRIBUTES, PRIVATE_TRAINER_METHODS, VLMTrainer


def _params(fn) -> list[str]:
    return [p.name for p in inspect.signature(fn).parameters.values()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def test_every_overridden_private_trainer_method_exists_with_our_parameters():
    base = transformers.Trainer
    problems = []
    for name in PRIVATE_TRAINER_METHODS:
        assert name in VLMTrainer.__dict__, f"{name} is listed but no longer overridden: update the list"
        if not hasattr(base, name):
            problems.append(f"Trainer.{name} is gone")
            continue
        ours, theirs = _params(VLMTrainer.__dict__[name]), _params(getattr(base, name))
        if ours != theirs[:len(ours)]:
            problems.append(f"Trainer.{name}{tuple(theirs)} no longer starts with our parameters {tuple(ours)}")
    overrides = {n for n, v in VLMTrainer.__dict__.items() if n.startswith("_") and not n.startswith("__")
                 and callable(v) and hasattr(base, n)}
    assert overrides <= set(PRIVATE_TRAINER_METHODS), f"unlisted private overrides: {overrides - set(PRIVATE_TRAINER_METHODS)}"
    assert not problems, (f"transformers {transformers.__version__} changed the private Trainer API that "
                          f"trainer/hf_trainer.py overrides: {problems}; use the version range in pyproject.toml")


def test_private_trainer_attributes_are_still_read_by_the_trainer():
    source = inspect.getsource(transformers.Trainer)
    missing = [a for a in PRIVATE_TRAINER_ATTRIBUTES if a not in source]
    assert not missing, (f"transformers {transformers.__version__}'s Trainer no longer reads {missing}, which "
                         f"trainer/hf_trainer.py sets to normalise the loss by target tokens")
