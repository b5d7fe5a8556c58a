"""The code's shape, measured from its source: layers, import cycles, function-local imports, function length.

    python tools/architecture.py            # prints the figures and every violation; exit 1 on a violation
    python tools/architecture.py --graph    # also prints each package's imports of other packages

Layers (docs/architecture.md): a module may import its own package and the packages of lower layers only;
packages in the same layer never import each other. Every import counts, including those inside functions.
The thresholds below are what tests/test_architecture.py holds the code to.
"""

from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAME = "qwenvl_lab"
# Bottom first; one layer may hold several packages, which then never import each other.
LAYERS: list[tuple[str, ...]] = [
    ("qwenvl_lab", "core"),
    ("kernels",),
    ("dataset",),  # samples, chat templates, images, batches: needs no model
    ("visual", "qwen"),  # the towers and the LM backbones
    ("model",),
    ("trainer", "evaluation"),
    ("serve", "dataprocess"),
    ("scripts",),  # train.py, test.py, benchmarks/, tools/: entry points, import anything below
]
LAYER = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}
PACKAGES = [p for layer in LAYERS[:-1] for p in layer]
SCRIPTS = ["train.py", "test.py", "benchmarks", "tools"]
# Function-local imports that are allowed without counting: optional or heavy third-party packages, loaded
# only by the feature that needs them.
# peft is a dependency but heavy (3.3-3.5 s and ~2,200 modules on top of torch + transformers, measured in
# docs/architecture.md: it loads bitsandbytes and parts of inductor), so only LoRA code imports it.
OPTIONAL = ("deepspeed", "bitsandbytes", "gradio", "lmms_eval", "triton", "open_clip", "av", "fastapi",
            "uvicorn", "pycocoevalcap", "openai", "playwright", "matplotlib", "tensorboard", "torchvision.io", "peft")
# Functions whose imports are deferred so `--help` / `--check` answer before torch loads (`file:function`; the
# list is docs/architecture.md's too). Their function-local imports do not count either.
DEFERRED: set[str] = {
    "train.py:main",  # trainer.run (torch, transformers) and evaluation's callbacks after the config is checked
    "test.py:load_model",  # torch and the VLM after the arguments and the files they name are checked
    "serve/cli.py:build",  # torch, the VLM and the server after the arguments are checked
    "evaluation/__main__.py:main",  # the VLM (transformers) after the task, data and output are checked
    "trainer/evaluate.py:main",  # the VLM after the data file is read
    "dataprocess/cache_features.py:main",  # the VLM after the arguments are checked
    "model/merge.py:merge",  # the VLM after main has checked the paths
    "model/train_config.py:vlm_config",  # the model registry (torch) when a config is validated, not for --help
    "benchmarks/gpu_check.py:main",  # torch after the arguments: --help, and one line without a CUDA device
}
MAX_LOCAL_IMPORTS = 15
MAX_FUNCTION_LINES = 80


@dataclass
class Module:
    name: str  # dotted, e.g. qwenvl_lab.model.build (scripts: their path)
    path: Path
    package: str  # model, dataset, ...; "scripts" for entry points
    is_package: bool
    imports: list[tuple[str, int, bool]] = field(default_factory=list)  # (absolute module, line, at top level)


def _module_name(path: Path) -> tuple[str, str, bool]:
    rel = path.relative_to(ROOT)
    if rel.parts[0] in PACKAGES:
        parts = list(rel.with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        if parts[0] == NAME:
            parts = parts[1:]
        return ".".join([NAME, *parts]), (rel.parts[0] if rel.parts[0] != NAME else NAME), is_pkg
    return str(rel), "scripts", False


def _top_level_nodes(tree: ast.Module) -> set[int]:
    """Import nodes that run when the module is imported (module body, also under if/try at top level)."""
    top, todo = set(), list(tree.body)
    while todo:
        node = todo.pop()
        top.add(id(node))
        if isinstance(node, (ast.If, ast.Try)):
            todo += node.body + node.orelse + getattr(node, "finalbody", [])
            for handler in getattr(node, "handlers", []):
                todo += handler.body
    return top


def _resolve(mod: Module, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = mod.name.split(".")
    if not mod.is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def read_modules() -> dict[str, Module]:
    files = [p for pkg in PACKAGES if (ROOT / pkg).is_dir() for p in (ROOT / pkg).rglob("*.py")]
    for s in SCRIPTS:
        files += [ROOT / s] if s.endswith(".py") else sorted((ROOT / s).rglob("*.py"))
    modules = {}
    for path in sorted(files):
        name, package, is_pkg = _module_name(path)
        mod = Module(name, path, package, is_pkg)
        tree = ast.parse(path.read_text(), str(path))
        top = _top_level_nodes(tree)
        rel = path.relative_to(ROOT)
        for func in ast.walk(tree):
            if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)) and f"{rel}:{func.name}" in DEFERRED:
                top |= {id(n) for n in ast.walk(func) if isinstance(n, (ast.Import, ast.ImportFrom))}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mod.imports += [(a.name, node.lineno, id(node) in top) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
                target = _resolve(mod, node)
                mod.imports.append((target, node.lineno, id(node) in top))
                # `from pkg import submodule` imports the submodule too
                mod.imports += [(f"{target}.{a.name}", node.lineno, id(node) in top) for a in node.names]
        modules[name] = mod
    return modules


def _own(target: str, modules: dict[str, Module]) -> str | None:
    """The project module an import names (None for third-party names and attributes)."""
    if target in modules:
        return target
    if not target.startswith(NAME + "."):
        return None
    return None  # an attribute (`from pkg import name`), counted through `pkg` itself


def edges(modules: dict[str, Module]) -> dict[str, set[str]]:
    graph = {name: set() for name in modules}
    for name, mod in modules.items():
        for target, _, _ in mod.imports:
            own = _own(target, modules)
            if own and own != name:
                graph[name].add(own)
    return graph


def layer_violations(modules: dict[str, Module]) -> list[str]:
    out = []
    for mod in modules.values():
        for target, line, _ in mod.imports:
            own = _own(target, modules)
            if not own:
                continue
            other = modules[own]
            a, b = mod.package, other.package
            if a == b or LAYER[b] < LAYER[a] or b == NAME:
                continue
            why = "the same layer as" if LAYER[a] == LAYER[b] else "a higher layer than"
            out.append(f"{mod.path.relative_to(ROOT)}:{line} imports {other.path.relative_to(ROOT)} "
                       f"({b} is in {why} {a})")
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def connect(v: str) -> None:
        work = [(v, iter(sorted(graph[v])))]
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        while work:
            node, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter[0]
                    counter[0] += 1
                    stack.append(nxt)
                    on.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                elif nxt in on:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def local_imports(modules: dict[str, Module]) -> list[str]:
    """Function-local imports other than optional heavy packages (`file:line module`)."""
    out = []
    for mod in modules.values():
        if mod.package == "scripts" and mod.path.parts[-2] == "tests":
            continue
        for target, line, top in mod.imports:
            if top or target.split(".")[0] in OPTIONAL or target.startswith(OPTIONAL):
                continue
            if target.startswith(NAME + ".") and target not in modules:
                continue  # `from pkg import name`: counted once, as `pkg`
            out.append(f"{mod.path.relative_to(ROOT)}:{line} {target}")
    return sorted(set(out))


def long_functions(modules: dict[str, Module], limit: int = MAX_FUNCTION_LINES) -> list[tuple[int, str]]:
    out = []
    for mod in modules.values():
        tree = ast.parse(mod.path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    out.append((n, f"{mod.path.relative_to(ROOT)}:{node.lineno} {node.name}"))
    return sorted(out, reverse=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--graph", action="store_true", help="print each package's imports of other packages")
    ap.add_argument("--list", action="store_true", help="list every function-local import and long function")
    args = ap.parse_args(argv)
    modules = read_modules()
    graph = edges(modules)
    bad_layers, cyc = layer_violations(modules), cycles(graph)
    local, longest = local_imports(modules), long_functions(modules, 0)
    too_long = [f for f in longest if f[0] > MAX_FUNCTION_LINES]
    print(f"modules: {len(modules)}  layer violations: {len(bad_layers)}  cycles: {len(cyc)}")
    print(f"function-local imports (besides optional packages): {len(local)} (at most {MAX_LOCAL_IMPORTS})")
    print(f"longest function: {longest[0][0]} lines, {longest[0][1]} (at most {MAX_FUNCTION_LINES}); "
          f"{len(too_long)} over")
    for v in bad_layers:
        print("layer:", v)
    for c in cyc:
        print("cycle:", " <-> ".join(c))
    if args.list:
        for item in local:
            print("local import:", item)
        for n, where in too_long:
            print(f"long function: {n} lines {where}")
    if args.graph:
        pk: dict[str, set[str]] = {}
        for name, deps in graph.items():
            for d in deps:
                if modules[d].package != modules[name].package:
                    pk.setdefault(modules[name].package, set()).add(modules[d].package)
        for p in sorted(pk, key=lambda p: LAYER[p]):
            print(f"{p} -> {', '.join(sorted(pk[p], key=lambda q: LAYER[q]))}")
    ok = not bad_layers and not cyc and len(local) <= MAX_LOCAL_IMPORTS and not too_long
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
