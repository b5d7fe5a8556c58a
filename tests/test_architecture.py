"""The code keeps its shape (tools/architecture.py, docs/architecture.md): imports go down the layers only,
no import cycle, function-local imports stay few. Each check is also shown to catch a planted fault."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("architecture", ROOT / "tools" / "architecture.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["architecture"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


A = _tool()


@pytest.fixture(scope="module")
def modules():
    return A.read_modules()


def test_imports_follow_the_layers(modules):
    assert A.layer_violations(modules) == []


def test_no_import_cycle(modules):
    assert A.cycles(A.edges(modules)) == []


def test_a_planted_upward_import_is_named_with_both_files(modules):
    errors = modules["qwenvl_lab.core.errors"]
    errors.imports.append(("qwenvl_lab.trainer.hf_trainer", 7, False))
    try:
        found = A.layer_violations(modules)
    finally:
        errors.imports.pop()
    assert found == ["core/errors.py:7 imports trainer/hf_trainer.py (trainer is in a higher layer than core)"]


def test_a_planted_cycle_is_found(modules):
    graph = A.edges(modules)
    graph["qwenvl_lab.core.errors"].add("qwenvl_lab.core.cli")  # core.cli imports core.errors
    cyc = A.cycles(graph)
    assert ["qwenvl_lab.core.cli", "qwenvl_lab.core.errors"] in cyc


def test_function_local_imports_stay_few(modules):
    """Besides optional packages and the functions deferred so `--help` answers before torch loads."""
    local = A.local_imports(modules)
    assert len(local) <= A.MAX_LOCAL_IMPORTS, "\n".join(local)


def test_a_planted_local_import_counts(modules):
    errors = modules["qwenvl_lab.core.errors"]
    before = len(A.local_imports(modules))
    errors.imports.append(("qwenvl_lab.core.cli", 9, False))
    try:
        assert len(A.local_imports(modules)) == before + 1
    finally:
        errors.imports.pop()
