"""trainer/hf_trainer.py overrides and calls private methods of transformers' Trainer (docs/architecture.md
says why no public hook serves for each): each must exist in the installed transformers with the parameters
our code expects, the Trainer must still call each one we override, the installed transformers must lie in
the range pyproject.toml declares, and every release of that range must have the signatures in `KNOWN`
below, or a test names the method that changed. A tiny run that saves and resumes checks that each override
is reached; the NaN-stop callback that replaced the `_maybe_log_save_evaluate` override is tested too."""

from __future__ import annotations

import ast
import collections
import inspect
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import transformers
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from qwenvl_lab.trainer.hf_trainer import (
    PRIVATE_TRAINER_ATTRIBUTES,
    PRIVATE_TRAINER_CALLS,
    PRIVATE_TRAINER_METHODS,
    NonFiniteStop,
    VLMTrainer,
)
from transformers import TrainerCallback, TrainerControl, TrainerState
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import rotate_checkpoints

from tests.tiny_train import make_tiny_data, tiny_train_config

ROOT = Path(__file__).resolve().parents[1]
VERSION = transformers.__version__

# Parameter names (without *args / **kwargs) of the Trainer methods trainer/hf_trainer.py overrides or calls,
# the same in every release from 5.17 to 5.23 (this file ran on 5.17.0 and 5.23.0; 5.18-5.22 were read from
# their sources). Widening pyproject.toml's transformers range means running this file on the new ends.
KNOWN_RANGE = ("5.17.0", "5.23.0")
KNOWN = {
    "_get_grad_norm": ("self", "model", "grad_norm"),
    "_get_train_sampler": ("self", "train_dataset"),
    "_save": ("self", "output_dir", "state_dict"),
    "_load_from_checkpoint": ("self", "resume_from_checkpoint", "model"),
    "_load_optimizer_and_scheduler": ("self", "checkpoint"),
    "_save_checkpoint": ("self", "model", "trial"),
    "_load_rng_state": ("self", "checkpoint"),
    "_get_output_dir": ("self", "trial"),
    "_save_scaler": ("self", "output_dir"),
    "_push_from_checkpoint": ("self", "checkpoint_folder"),
    "_prepare_inputs": ("self", "inputs"),
    "save_model": ("self", "output_dir", "_internal_call"),
}
ROTATE_CHECKPOINTS = ("output_dir", "save_total_limit", "best_model_checkpoint", "use_mtime", "checkpoint_prefix")
# Trainer methods the overrides of earlier versions replaced: the Trainer calls them from its
# `_save_checkpoint` alone, which VLMTrainer replaces, so a run must never reach them.
REPLACED = ("_save_optimizer_and_scheduler", "_save_rng_state")


def _params(fn) -> tuple[str, ...]:
    return tuple(p.name for p in inspect.signature(fn).parameters.values()
                 if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))


def _declared_range() -> SpecifierSet:
    text = (ROOT / "pyproject.toml").read_text()
    found = re.search(r'"transformers([<>=!~][^"]*)"', text)
    assert found, "pyproject.toml declares no transformers range"
    return SpecifierSet(found.group(1))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_data(tmp_path_factory.mktemp("shapes"))


# ---- the installed transformers against the declared range -----------------------------------------------
def test_declared_range_is_the_range_the_signatures_were_checked_on():
    spec = _declared_range()
    low, high = (Version(v) for v in KNOWN_RANGE)
    assert low in spec and high in spec, f"pyproject.toml's transformers{spec} leaves out a checked end {KNOWN_RANGE}"
    assert Version(f"{low.major}.{low.minor - 1}.999") not in spec and Version(f"{high.major}.{high.minor + 1}") not in spec, (
        f"pyproject.toml's transformers{spec} is wider than the checked range {KNOWN_RANGE}: run this file on the "
        f"new ends, then update KNOWN_RANGE")
    assert Version(VERSION) in spec, (
        f"transformers {VERSION} is installed, outside pyproject.toml's transformers{spec}: "
        f"pip install -c constraints.txt -e . (or check it with this file and widen the range)")


def test_known_signatures_cover_exactly_the_listed_methods():
    assert set(KNOWN) == set(PRIVATE_TRAINER_METHODS) | set(PRIVATE_TRAINER_CALLS), (
        f"KNOWN and hf_trainer's lists differ: {set(KNOWN) ^ (set(PRIVATE_TRAINER_METHODS) | set(PRIVATE_TRAINER_CALLS))}")


@pytest.mark.parametrize("name", PRIVATE_TRAINER_METHODS)
def test_overridden_private_method_exists_with_our_parameters(name):
    base = transformers.Trainer
    assert name in VLMTrainer.__dict__, (
        f"{name} is in PRIVATE_TRAINER_METHODS but VLMTrainer no longer overrides it: update the list, KNOWN "
        f"and docs/architecture.md")
    assert hasattr(base, name), (
        f"transformers {VERSION}: Trainer.{name} is gone, so VLMTrainer.{name} is never called; see "
        f"docs/architecture.md for what it changes and use the range in pyproject.toml")
    ours, theirs = _params(VLMTrainer.__dict__[name]), _params(getattr(base, name))
    assert ours == theirs[:len(ours)], (
        f"transformers {VERSION}: Trainer.{name}{theirs} no longer starts with the parameters "
        f"VLMTrainer.{name}{ours} takes; see docs/architecture.md and use the range in pyproject.toml")
    assert ours == KNOWN[name][:len(ours)], f"VLMTrainer.{name}{ours} does not match the range's Trainer.{name}{KNOWN[name]}"


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_installed_trainer_has_the_signature_of_the_declared_range(name):
    base = transformers.Trainer
    assert hasattr(base, name), f"transformers {VERSION}: Trainer.{name}, which trainer/hf_trainer.py relies on, is gone"
    assert _params(getattr(base, name)) == KNOWN[name], (
        f"transformers {VERSION}: Trainer.{name}{_params(getattr(base, name))} differs from Trainer.{name}{KNOWN[name]} "
        f"of {KNOWN_RANGE}, which trainer/hf_trainer.py relies on")


@pytest.mark.parametrize("name", PRIVATE_TRAINER_METHODS)
def test_the_trainer_still_calls_each_overridden_method(name):
    """An override the Trainer stopped calling would silently do nothing."""
    source = inspect.getsource(transformers.Trainer)
    calls = re.findall(rf"self\.{name}\b(?!\s*=)", source)
    assert calls, f"transformers {VERSION}: the Trainer no longer calls self.{name}, so VLMTrainer.{name} never runs"


def test_helpers_hf_trainer_imports_keep_their_form():
    assert _params(rotate_checkpoints) == ROTATE_CHECKPOINTS, (
        f"transformers {VERSION}: rotate_checkpoints{_params(rotate_checkpoints)} differs from {ROTATE_CHECKPOINTS}")
    assert inspect.isclass(ExportableState) and hasattr(ExportableState, "state"), (
        f"transformers {VERSION}: ExportableState.state, read by VLMTrainer._save_checkpoint, is gone")


def test_no_unlisted_private_override():
    base = transformers.Trainer
    overrides = {n for n, v in VLMTrainer.__dict__.items() if n.startswith("_") and not n.startswith("__")
                 and callable(v) and hasattr(base, n)}
    assert overrides <= set(PRIVATE_TRAINER_METHODS), (
        f"unlisted private overrides (a new Trainer method may share the name of one of ours): "
        f"{overrides - set(PRIVATE_TRAINER_METHODS)}")
    assert not [n for n in REPLACED if n in VLMTrainer.__dict__], "an override replaced by our _write_* methods is back"


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
    assert not missing, (f"transformers {VERSION}'s Trainer no longer reads {missing}, which "
                         f"trainer/hf_trainer.py sets to normalise the loss by target tokens")


def test_architecture_doc_lists_exactly_the_private_methods():
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("## Private Trainer methods we override", 1)[1].split("\n## ", 1)[0]
    rows = {m.group(1) for m in re.finditer(r"^\|\s*`(?:Trainer\.)?(\w+)`", section, re.M)}
    listed = set(PRIVATE_TRAINER_METHODS) | set(PRIVATE_TRAINER_CALLS)
    assert rows == listed, f"docs/architecture.md's table and hf_trainer's lists differ: {rows ^ listed}"


# ---- each override is reached ---------------------------------------------------------------------------
def _spy(monkeypatch, cls, name: str, calls: collections.Counter) -> None:
    real = cls.__dict__[name]

    def spy(self, *args, **kwargs):
        calls[name] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, spy)


def test_each_override_is_reached_in_a_save_and_resume(tmp_path, data, monkeypatch):
    from qwenvl_lab.trainer.run import train

    calls = collections.Counter()
    ours = PRIVATE_TRAINER_METHODS + ("_write_optimizer_and_scheduler", "_write_rng_state")
    for name in ours:
        _spy(monkeypatch, VLMTrainer, name, calls)
    used = ("_get_output_dir", "_save_scaler", "save_model", "_prepare_inputs")  # _push_from_checkpoint: hub only
    for name in used + REPLACED:
        _spy(monkeypatch, transformers.Trainer, name, calls)

    train(tiny_train_config(tmp_path, data, max_steps=2, save_steps=2))
    ckpt = tmp_path / "run" / "checkpoint-2"
    names = sorted(p.name for p in ckpt.iterdir())
    for state in ("optimizer_state", "scheduler_state", "rng_state_0"):
        assert f"{state}.safetensors" in names and f"{state}.json" in names, names
    assert "trainer_state.json" in names and not [n for n in names if n.endswith((".pt", ".pth", ".bin"))], names
    train(tiny_train_config(tmp_path, data, max_steps=3, save_steps=100, resume_from_checkpoint="auto"))

    missed = [n for n in ours + used if not calls[n]]
    assert not missed, f"transformers {VERSION}: never reached during a save and resume: {missed} ({dict(calls)})"
    assert not [n for n in REPLACED if calls[n]], f"the Trainer's own state writers ran: {dict(calls)}"


# ---- NonFiniteStop: what the `_maybe_log_save_evaluate` override did ----------------------------------------
def test_nonfinite_stop_asks_for_save_log_and_stop_once_per_step():
    trainer = SimpleNamespace(nan_abort=False)
    cb, state, control = NonFiniteStop(trainer), TrainerState(), TrainerControl()
    state.global_step = 3
    cb.on_step_end(None, state, control)
    assert not (control.should_save or control.should_training_stop or control.should_log)
    trainer.nan_abort = True
    assert cb.on_step_end(None, state, control) is control
    assert control.should_save and control.should_training_stop and control.should_log
    control = TrainerControl()
    cb.on_epoch_end(None, state, control)  # the epoch-end pass of the same step: already asked for
    assert not (control.should_save or control.should_training_stop or control.should_log)
    state.global_step = 4
    cb.on_epoch_end(None, state, control)
    assert control.should_save and control.should_training_stop and control.should_log


class _LogsAtStepEnd(TrainerCallback):
    """Like EvalTasksCallback: added after the Trainer is built, calls `trainer.log` in `on_step_end`
    (which clears `should_log`)."""

    def __init__(self, trainer):
        self.trainer, self.last = trainer, []

    def on_train_begin(self, args, state, control, **kwargs):
        self.last.append(type(self.trainer.callback_handler.callbacks[-1]))

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.log({"probe": 1.0})


def test_too_many_nan_steps_save_log_and_stop_after_every_other_callback(tmp_path, data, monkeypatch):
    """With no save and no log due before step 8, the checkpoint and the loss row of step 3 come from the
    NaN stop alone; a callback added later that logs in `on_step_end` does not drop the loss row."""
    from qwenvl_lab.trainer.run import TrainingAborted, train

    probes = []
    real_train = VLMTrainer.train

    def train_with_a_late_callback(self, *args, **kwargs):
        probes.append(_LogsAtStepEnd(self))
        self.add_callback(probes[-1])
        return real_train(self, *args, **kwargs)

    monkeypatch.setattr(VLMTrainer, "train", train_with_a_late_callback)
    cfg = tiny_train_config(tmp_path, data, max_steps=8, save_steps=8, logging_steps=8, save_total_limit=None,
                            debug_inject_nan_steps=[2, 3], max_consecutive_nan=2)
    with pytest.raises(TrainingAborted, match="max_consecutive_nan=2"):
        train(cfg)
    run = Path(cfg.output_dir)
    assert probes and probes[0].last == [NonFiniteStop], "NonFiniteStop is not the last callback"
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-3"]
    assert json.loads((run / "checkpoint-3" / "trainer_state.json").read_text())["global_step"] == 3
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    losses = [r for r in rows if "loss" in r]
    assert [r["step"] for r in losses] == [3] and losses[0]["nan_steps_skipped"] == 2, losses
    assert max(r["step"] for r in rows) == 3  # stopped there
