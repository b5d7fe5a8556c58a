"""Typed dataclass configs from YAML plus `key=value` overrides.

`load_config(cls, yaml_path, overrides)` builds `cls` (a dataclass, possibly nested) from a YAML file and
command-line overrides such as `learning_rate=1e-4 model.projector=mlp2x_gelu lora.r=16`.

* Dotted keys address nested dataclass fields; values are parsed as YAML scalars/lists.
* Every value is checked against the field's type; an unknown key is an error listing the valid ones.
* `to_dict(cfg)` gives the resolved config back as plain data (written into the run directory).
* `describe_fields(cls)` lists every key (nested ones dotted) with its default and the one-line
  description written as a comment beside the field (`field_comments`).
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import re
import textwrap
import tokenize
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError


class ConfigError(UserError, ValueError):
    """A config file or override that cannot be applied; the message names the key and the source."""


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _check(value, tp, key: str, where: str):
    """Coerce `value` to the annotated type `tp` or raise a ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check(value, arg, key, where)
            except ConfigError:
                pass  # try the next member of the union
        raise ConfigError(f"{where}: `{key}` = {value!r} matches none of {tp}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: `{key}` = {value!r}; valid values: {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and origin is list:
            value = [value]  # `data_path=a.jsonl` means a one-element list
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: `{key}` must be a list, got {value!r}")
        inner = args[0] if args else Any
        return [_check(v, inner, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: `{key}` must be a mapping, got {value!r}")
        return dict(value)
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: `{key}` must be a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, where, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: `{key}` must be true/false, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads `1e-4` as a string
            except ValueError:
                pass
        raise ConfigError(f"{where}: `{key}` must be a number, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: `{key}` must be an integer, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: `{key}` must be a string, got {value!r}")
    return value


def from_dict(cls, data: dict, where: str = "config", prefix: str = ""):
    """Build dataclass `cls` from a (possibly nested) dict, validating every key and type."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(prefix + u for u in unknown)}; "
            f"valid keys{' under ' + prefix.rstrip('.') if prefix else ''}: {', '.join(sorted(types_))}"
        )
    kwargs = {name: _check(value, types_[name], prefix + name, where) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{where}: {e}") from None


def _set_dotted(tree: dict, key: str, value) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override `{key}`: `{p}` is not a nested section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else None
        out.append((key.strip(), value))
    return out


def load_config(cls, yaml_path: str | Path | None = None, overrides: list[str] | None = None):
    """YAML file (optional) + `key=value` overrides -> validated dataclass instance."""
    tree: dict = {}
    where = "config"
    if yaml_path is not None:
        path = Path(yaml_path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        where = str(path)
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)
    return from_dict(cls, tree, where)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def field_comments(cls) -> dict[str, str]:
    """{field: description} from the dataclass's source: the comment at the end of the field's line, else
    the comment lines right above it (section rulers `# ---- ... ----` excluded). The comments in the
    class ARE the documentation; `describe_fields` and `train.py --help` print them."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    lines = source.splitlines()
    out: dict[str, str] = {}
    names = {f.name for f in dataclasses.fields(cls)}
    for lineno, line in enumerate(lines, start=1):
        m = re.match(r"\s{4}(\w+)\s*:", line)
        if not m or m.group(1) not in names:
            continue
        text = comments.get(lineno) if not line.lstrip().startswith("#") else None
        if not text:
            above, k = [], lineno - 1
            while k >= 1 and lines[k - 1].lstrip().startswith("#") and k in comments \
                    and not comments[k].startswith("----"):
                above.insert(0, comments[k])
                k -= 1
            text = " ".join(above)
        out[m.group(1)] = text
    return out


def describe_fields(cls, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, description) for every field of `cls`, nested dataclasses flattened as `a.b`."""
    rows = []
    notes = field_comments(cls)
    types_ = _field_types(cls)
    for f in dataclasses.fields(cls):
        if _is_dataclass_type(types_[f.name]):
            rows += describe_fields(types_[f.name], prefix=f"{prefix}{f.name}.")
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        rows.append((prefix + f.name, yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("..."
                                                                                                        ).strip(),
                     notes.get(f.name, "")))
    return rows


def save_config(cfg, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True), encoding="utf-8")
