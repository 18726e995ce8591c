"""One typed dataclass config drives Python, YAML and the command line.

Each config field carries its one-line help in ``field(metadata={"help": ...})``. This
module turns such a dataclass into argparse flags (``max_new_tokens`` -> ``--max-new-tokens``),
reads YAML files into it, and merges the two (flags given on the command line win over
YAML, YAML wins over defaults), in the spirit of TRL's ``HfArgumentParser``.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import ConfigError

T = TypeVar("T")


def help_field(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    **kwargs,
) -> Any:
    """A dataclass field with a one-line help string (shown by ``--help``) and, for numbers, its allowed range.

    ``ge``/``gt``/``le``/``lt`` bound the value; :func:`check_ranges` enforces them (``None`` always passes,
    for optional fields).
    """
    metadata = {"help": help}
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    if bounds:
        metadata["range"] = bounds
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


_SYMBOLS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def describe_range(bounds: dict[str, float]) -> str:
    return " and ".join(f"{_SYMBOLS[k]} {v:g}" for k, v in bounds.items())


def check_ranges(config: Any) -> None:
    """Refuse any numeric field outside its declared range, naming the field and the range.

    The one place every config's numbers are validated: each config calls it from ``__post_init__``.
    """
    for f in dataclasses.fields(config):
        bounds = f.metadata.get("range")
        value = getattr(config, f.name)
        if not bounds or value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{f.name} must be a number {describe_range(bounds)}, got {value!r}")
        ok = all({"ge": value >= b, "gt": value > b, "le": value <= b, "lt": value < b}[k] for k, b in bounds.items())
        if not ok or value != value:  # NaN fails every bound
            raise ConfigError(f"{f.name} must be {describe_range(bounds)}, got {value!r}")


def _strip_optional(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {text!r}")


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one ``--flag`` per field of dataclass ``cls``; defaults stay ``None`` so we can tell what was given."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        tp = _strip_optional(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        )
        help_text = f"{help_text} (default: {default!r})"
        origin = typing.get_origin(tp)
        if tp is bool:
            group.add_argument(flag, type=_parse_bool, nargs="?", const=True, default=None, help=help_text)
        elif origin in (list, tuple):
            inner = typing.get_args(tp)[0] if typing.get_args(tp) else str
            group.add_argument(flag, type=inner, nargs="*", default=None, help=help_text)
        elif tp in (int, float, str):
            group.add_argument(flag, type=tp, default=None, help=help_text)
        else:
            group.add_argument(flag, type=str, default=None, help=help_text)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping of config fields; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config fields, got {type(data).__name__}")
    return data


def build_config(cls: type[T], values: dict[str, Any], source: str = "config") -> T:
    """Instantiate ``cls`` from a mapping, refusing unknown keys with their names."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {unknown} for {cls.__name__}; known: {sorted(names)}")
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def config_from_args(cls: type[T], args: argparse.Namespace, yaml_values: dict[str, Any] | None = None) -> T:
    """Merge defaults < YAML < command-line flags into one ``cls`` instance."""
    values = dict(yaml_values or {})
    for f in dataclasses.fields(cls):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
    return build_config(cls, values)


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON/YAML-safe dict of a config dataclass."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out
