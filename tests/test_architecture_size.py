"""Function length, as tools/architecture.py measures it: no function of the code (benchmarks and tools
included) is longer than the tool's MAX_FUNCTION_LINES, and the measure does catch a long function."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "architecture.py"


@pytest.fixture(scope="module")
def arch():
    name = "tools_architecture"
    spec = importlib.util.spec_from_file_location(name, TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # @dataclass looks the class's module up in sys.modules while building it
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)


def _function(name: str, lines: int, indent: str = "") -> str:
    """The source of a function `lines` lines long, `def` line and `return` line included."""
    body = [f"{indent}    x = {i}\n" for i in range(lines - 2)]
    return f"{indent}def {name}():\n" + "".join(body) + f"{indent}    return x\n"


def test_no_function_is_longer_than_the_limit(arch):
    limit = arch.MAX_FUNCTION_LINES
    longest = arch.long_functions(arch.read_modules(), 0)
    assert longest, "the tool found no function at all"
    offenders = [f"{n} lines {where}" for n, where in longest if n > limit]
    assert longest[0][0] <= limit, f"functions over {limit} lines:\n" + "\n".join(offenders)


def test_the_measure_catches_a_planted_long_function(arch, tmp_path, monkeypatch):
    limit = arch.MAX_FUNCTION_LINES
    functions = [_function("short", 5), _function("at_the_limit", limit), _function("too_long", limit + 10),
                 "class Holder:\n" + _function("long_method", limit + 1, "    ")]
    source = "\n\n".join(functions)
    path = tmp_path / "planted.py"
    path.write_text(source)
    monkeypatch.setattr(arch, "ROOT", tmp_path)  # the tool names each function relative to ROOT
    modules = {"planted.py": arch.Module("planted.py", path, "scripts", False)}

    found = arch.long_functions(modules)
    lines = source.splitlines()
    start = {name: lines.index(f"{indent}def {name}():") + 1
             for name, indent in (("too_long", ""), ("long_method", "    "), ("at_the_limit", ""))}
    assert found == sorted([(limit + 10, f"planted.py:{start['too_long']} too_long"),
                            (limit + 1, f"planted.py:{start['long_method']} long_method")], reverse=True)
    # With no limit every function is listed, each with its exact length.
    lengths = {where.split()[-1]: n for n, where in arch.long_functions(modules, 0)}
    assert lengths == {"short": 5, "at_the_limit": limit, "too_long": limit + 10, "long_method": limit + 1}
