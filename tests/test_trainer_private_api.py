"""trainer/hf_trainer.py overrides and calls private methods of transformers' Trainer: each must exist in the
installed transformers with the parameters our code expects, the installed transformers must lie in the
range pyproject.toml declares, and every release of that range must have the signatures in `KNOWN` below,
or this test names what changed."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import transformers
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from qwenvl_lab.trainer.hf_trainer import (
    PRIVATE_TRAINER_ATTRIBUTES,
    PRIVATE_TRAINER_CALLS,
    PRIVATE_TRAINER_METHODS,
    VLMTrainer,
)
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import rotate_checkpoints

ROOT = Path(__file__).resolve().parents[1]

# Parameter names (without *args / **kwargs) of the Trainer methods trainer/hf_trainer.py overrides or calls,
# the same in every release from 5.17 to 5.23 (this file ran on 5.17.0 and 5.23.0; 5.18-5.22 were read from
# their sources). Widening pyproject.toml's transformers range means running this file on the new ends.
KNOWN_RANGE = ("5.17.0", "5.23.0")
KNOWN = {
    "_get_grad_norm": ("self", "model", "grad_norm"),
    "_maybe_log_save_evaluate": ("self", "tr_loss", "grad_norm", "model", "trial", "epoch", "ignore_keys_for_eval",
                                 "start_time", "learning_rate"),
    "_get_train_sampler": ("self", "train_dataset"),
    "_save": ("self", "output_dir", "state_dict"),
    "_load_from_checkpoint": ("self", "resume_from_checkpoint", "model"),
    "_save_optimizer_and_scheduler": ("self", "output_dir"),
    "_load_optimizer_and_scheduler": ("self", "checkpoint"),
    "_save_rng_state": ("self", "output_dir"),
    "_save_checkpoint": ("self", "model", "trial"),
    "_load_rng_state": ("self", "checkpoint"),
    "_get_output_dir": ("self", "trial"),
    "_save_scaler": ("self", "output_dir"),
    "_push_from_checkpoint": ("self", "checkpoint_folder"),
    "_prepare_inputs": ("self", "inputs"),
    "save_model": ("self", "output_dir", "_internal_call"),
}
ROTATE_CHECKPOINTS = ("output_dir", "save_total_limit", "best_model_checkpoint", "use_mtime", "checkpoint_prefix")


def _params(fn) -> tuple[str, ...]:
    return tuple(p.name for p in inspect.signature(fn).parameters.values()
                 if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))


def _declared_range() -> SpecifierSet:
    text = (ROOT / "pyproject.toml").read_text()
    found = re.search(r'"transformers([<>=!~][^"]*)"', text)
    assert found, "pyproject.toml declares no transformers range"
    return SpecifierSet(found.group(1))


def test_declared_range_is_the_range_the_signatures_were_checked_on():
    spec = _declared_range()
    low, high = (Version(v) for v in KNOWN_RANGE)
    assert low in spec and high in spec, f"pyproject.toml's transformers{spec} leaves out a checked end {KNOWN_RANGE}"
    assert Version(f"{low.major}.{low.minor - 1}.999") not in spec and Version(f"{high.major}.{high.minor + 1}") not in spec, (
        f"pyproject.toml's transformers{spec} is wider than the checked range {KNOWN_RANGE}: run this file on the "
        f"new ends, then update KNOWN_RANGE")
    assert Version(transformers.__version__) in spec, (
        f"transformers {transformers.__version__} is installed, outside pyproject.toml's transformers{spec}: "
        f"pip install -c constraints.txt -e . (or check it with this file and widen the range)")


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
        if ours != KNOWN[name][:len(ours)]:
            problems.append(f"our {name}{ours} does not match the range's Trainer.{name}{KNOWN[name]}")
    overrides = {n for n, v in VLMTrainer.__dict__.items() if n.startswith("_") and not n.startswith("__")
                 and callable(v) and hasattr(base, n)}
    assert overrides <= set(PRIVATE_TRAINER_METHODS), f"unlisted private overrides: {overrides - set(PRIVATE_TRAINER_METHODS)}"
    assert not problems, (f"transformers {transformers.__version__} changed the private Trainer API that "
                          f"trainer/hf_trainer.py overrides: {problems}; use the version range in pyproject.toml")


def test_installed_trainer_has_the_signatures_of_the_declared_range():
    base = transformers.Trainer
    assert set(KNOWN) == set(PRIVATE_TRAINER_METHODS) | set(PRIVATE_TRAINER_CALLS), "KNOWN and the lists differ"
    changed = {n: _params(getattr(base, n)) for n in KNOWN if not hasattr(base, n) or _params(getattr(base, n)) != KNOWN[n]}
    assert not changed, (f"transformers {transformers.__version__}'s Trainer differs from the signatures of "
                         f"{KNOWN_RANGE}: {changed}")
    assert _params(rotate_checkpoints) == ROTATE_CHECKPOINTS, _params(rotate_checkpoints)
    assert inspect.isclass(ExportableState) and hasattr(ExportableState, "state")


def test_every_private_trainer_method_hf_trainer_calls_is_listed():
    """A new `self._x(...)` on a Trainer method in trainer/hf_trainer.py must join PRIVATE_TRAINER_CALLS."""
    tree = ast.parse((ROOT / "trainer" / "hf_trainer.py").read_text())
    called = {n.func.attr for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
              and isinstance(n.func.value, ast.Name) and n.func.value.id == "self" and n.func.attr.startswith("_")}
    inherited = {n for n in called if n not in VLMTrainer.__dict__ and hasattr(transformers.Trainer, n)}
    assert inherited, "found no call of an inherited private method: the scan is broken"
    assert inherited <= set(PRIVATE_TRAINER_CALLS), f"unlisted private Trainer calls: {inherited - set(PRIVATE_TRAINER_CALLS)}"


def test_private_trainer_attributes_are_still_read_by_the_trainer():
    source = inspect.getsource(transformers.Trainer)
    missing = [a for a in PRIVATE_TRAINER_ATTRIBUTES if a not in source]
    assert not missing, (f"transformers {transformers.__version__}'s Trainer no longer reads {missing}, which "
                         f"trainer/hf_trainer.py sets to normalise the loss by target tokens")
