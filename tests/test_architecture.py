"""The code keeps its shape (tools/architecture.py, docs/architecture.md): imports go down the layers only,
no import cycle, function-local imports stay few, no function is longer than MAX_FUNCTION_LINES (benchmarks
and tools included). Each check is also shown to catch a planted fault."""

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


def _function(name: str, lines: int, indent: str = "") -> str:
    """The source of a function `lines` lines long, `def` line and `return` line included."""
    body = [f"{indent}    x = {i}\n" for i in range(lines - 2)]
    return f"{indent}def {name}():\n" + "".join(body) + f"{indent}    return x\n"


def test_no_function_is_longer_than_the_limit():
    limit = A.MAX_FUNCTION_LINES
    longest = A.long_functions(A.read_modules(), 0)
    assert longest, "the tool found no function at all"
    offenders = [f"{n} lines {where}" for n, where in longest if n > limit]
    assert longest[0][0] <= limit, f"functions over {limit} lines:\n" + "\n".join(offenders)


def test_the_measure_catches_a_planted_long_function(tmp_path, monkeypatch):
    limit = A.MAX_FUNCTION_LINES
    functions = [_function("short", 5), _function("at_the_limit", limit), _function("too_long", limit + 10),
                 "class Holder:\n" + _function("long_method", limit + 1, "    ")]
    source = "\n\n".join(functions)
    path = tmp_path / "planted.py"
    path.write_text(source)
    monkeypatch.setattr(A, "ROOT", tmp_path)  # the tool names each function relative to ROOT
    modules = {"planted.py": A.Module("planted.py", path, "scripts", False)}

    found = A.long_functions(modules)
    lines = source.splitlines()
    start = {name: lines.index(f"{indent}def {name}():") + 1
             for name, indent in (("too_long", ""), ("long_method", "    "), ("at_the_limit", ""))}
    assert found == sorted([(limit + 10, f"planted.py:{start['too_long']} too_long"),
                            (limit + 1, f"planted.py:{start['long_method']} long_method")], reverse=True)
    # With no limit every function is listed, each with its exact length.
    lengths = {where.split()[-1]: n for n, where in A.long_functions(modules, 0)}
    assert lengths == {"short": 5, "at_the_limit": limit, "too_long": limit + 10, "long_method": limit + 1}
