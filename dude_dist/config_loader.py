"""Loading a run config: YAML file and ``--set`` overrides onto the schema in :mod:`dude_dist.config`.

Precedence, highest first: ``--set key=value`` on the command line > the YAML file >
the defaults of the dataclasses. Every key the YAML or ``--set`` names must exist; a typo
is an error that names the file, line and the closest valid key; a key given twice in
one YAML mapping is an error naming both lines. Values are coerced to the field's type
and checked by the dataclass itself.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from dude_dist.config import RunConfig
from dude_dist.errors import ConfigError


def _compose_with_lines(text: str, source: str) -> tuple[dict, dict[str, int]]:
    """Parse YAML safely; return the mapping and the line of every dotted key."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise ConfigError(f"{where}: YAML syntax error: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(data).__name__}")
    lines: dict[str, int] = {}

    def walk(n: yaml.Node, prefix: str) -> None:
        # YAML itself keeps the last of two equal keys and drops the first without a word
        # (two `train:` sections lose the first): refuse them, naming both lines.
        if isinstance(n, yaml.MappingNode):
            seen: dict[str, int] = {}
            for key_node, value_node in n.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = f"{prefix}{key_node.value}"
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise ConfigError(f"{source}:{line}: duplicate key {key!r} (first at {source}:{seen[key]}); "
                                      "YAML would keep only the last one: merge them into one")
                seen[key] = line
                lines[key] = line
                walk(value_node, key + ".")

    walk(node, "")
    return data, lines


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is tuple:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        item_type = args[0]
        return tuple(_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(items))
    if tp in (float, int) and isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
        # YAML 1.1 (PyYAML) reads `lr: 3e-4` as a string: a float needs a dot there (3.0e-4).
        value = float(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")  # a bug in this module, not in the YAML


def _accepts_str(tp: Any) -> bool:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return str in typing.get_args(tp)
    return tp is str


def _build(cls: type, data: Any, prefix: str, where: typing.Callable[[str], str],
           set_text: dict[str, str] | None = None) -> Any:
    """Build ``cls`` from ``data``; ``set_text`` holds the raw text of ``--set`` values by key."""
    set_text = set_text or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where(prefix.rstrip('.'))}{prefix.rstrip('.')}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean {prefix + close[0]!r}?" if close else ""
            raise ConfigError(
                f"{where(full)}unknown key {full!r}{hint} (valid keys here: {', '.join(fields)})"
            )
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{full}.", where, set_text)
        elif full in set_text and value is not None and not isinstance(value, str) and _accepts_str(tp):
            # `--set output_dir=2024-01-01` or `model.revision=1.0`: YAML would read a date or
            # a number, but a string field given on the command line means the text as typed.
            kwargs[key] = set_text[full]
        else:
            try:
                kwargs[key] = _coerce(value, tp, full)
            except ConfigError as exc:
                raise ConfigError(f"{where(full)}{exc}") from None
    for f in dataclasses.fields(cls):
        # A required section left out is built from nothing, so the error names the key it lacks.
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.name not in kwargs and dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = _build(hints[f.name], {}, f"{prefix}{f.name}.", where, set_text)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        key = str(exc).split(":", 1)[0]
        raise ConfigError(f"{where(key)}{exc}") from None
    except TypeError as exc:  # a missing required key
        raise ConfigError(f"{where(prefix.rstrip('.'))}{prefix or 'config'}: {exc}") from None


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> list[tuple[str, Any]]:
    """Parse ``key.sub=value`` strings; values are YAML scalars/lists (``3``, ``1e-4``, ``[q_proj]``)."""
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.max_steps=10")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        parsed.append((key.strip(), value))
    return parsed


def apply_overrides(data: dict, overrides: list[tuple[str, Any]]) -> dict:
    """Set dotted keys in a nested dict (creating sections as needed)."""
    for key, value in overrides:
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {part!r} is not a section")
        node[parts[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load a run config: defaults < YAML file < ``--set`` overrides.

    Raises:
        ConfigError: syntax error, unknown key, wrong type or value out of range; the
            message names the file, line and key.
        FileNotFoundError: ``path`` does not exist.
    """
    data: dict = {}
    lines: dict[str, int] = {}
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"config file {str(path)!r} is a folder; give a YAML file in it, e.g. "
                              "configs/tiny_cpu.yaml")
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} does not exist")
        source = str(path)
        data, lines = _compose_with_lines(path.read_text(), source)
    parsed = parse_overrides(overrides)
    set_text = {item.split("=", 1)[0].strip(): item.split("=", 1)[1] for item in overrides}
    data = apply_overrides(data, parsed)

    def where(key: str) -> str:
        # The messages go on with the key itself ("<where>adapter.rank: ..."), so name the origin only.
        if key in set_text:
            return "--set: "
        if key in lines:
            return f"{source}:{lines[key]}: "
        return f"{source}: "

    return _build(RunConfig, data, "", where, set_text)


