"""Load typed configs from YAML files plus ``a.b=value`` overrides.

    cfg = load_config(RunConfig, "configs/demo.yaml", ["online.iterations=5",
                      "model.position=cope"])

YAML is read with ``yaml.safe_load``; each override's value is parsed as a YAML scalar/flow value
(``5`` -> int, ``1e-3`` -> float, ``[1, 2]`` -> list, ``null`` -> None). The typed config (a
pydantic model deriving from :class:`jaxselm.model.FrozenConfig`) refuses unknown keys and wrong
types; every problem becomes a one-line :class:`ConfigError` naming the file and the key.
"""

from __future__ import annotations

import os
import re
from typing import Any, TypeVar

import yaml

from jaxselm.errors import ConfigError

T = TypeVar("T")

_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)$")


def parse_value(text: str) -> Any:
    """A YAML scalar, with ``1e-3``-style floats (which YAML 1.1 reads as strings) made floats."""
    if _FLOAT_RE.match(text.strip()):
        return float(text)
    try:
        return _fix_floats(yaml.safe_load(text)) if text.strip() else ""
    except yaml.YAMLError:
        return text


def _fix_floats(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _fix_floats(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_fix_floats(v) for v in node]
    if isinstance(node, str) and _FLOAT_RE.match(node.strip()):
        return float(node)
    return node


def _check_unique_keys(node: yaml.Node) -> None:
    """A key given twice in one mapping is an error (plain YAML loading keeps the last one
    silently: a setting the user wrote would be ignored). Works on the composed node tree, which
    holds no constructed objects."""
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                if key.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key.value!r} given twice", key.start_mark
                    )
                seen.add(key.value)
            _check_unique_keys(value)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_unique_keys(item)


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML mapping from ``path``; a missing file or bad YAML is a one-line ConfigError."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
        text = raw.decode("utf-8")
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        if root is not None:
            _check_unique_keys(root)
        data = yaml.safe_load(text)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, expected a YAML file") from None
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}: line {line}: not UTF-8 text (byte 0x{raw[err.start]:02x})"
        ) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}:{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return _fix_floats(data)


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """A copy of ``data`` with each ``a.b.c=value`` override set."""
    out = _deep_copy(data)
    given: dict[str, str] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. online.iterations=3)")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty key")
        name = ".".join(parts)
        if name in given:  # which one was meant? (taking the last would hide a typo)
            raise ConfigError(f"override {name}: given twice ({given[name]!r} and {item!r})")
        given[name] = item
        node = out
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
            node = child
        node[parts[-1]] = parse_value(value)
    return out


def _deep_copy(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _deep_copy(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_deep_copy(v) for v in node]
    return node


def load_config(cls: type[T], path: str | os.PathLike | None, overrides=()) -> T:
    """Read, override and validate. Errors name the file (if any) and the key."""
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, list(overrides))
    try:
        return cls(**data)
    except ConfigError as err:
        prefix = f"{os.fspath(path)}: " if path is not None else ""
        raise ConfigError(f"{prefix}{err}") from None
    except TypeError as err:  # e.g. a section given as a scalar
        prefix = f"{os.fspath(path)}: " if path is not None else ""
        raise ConfigError(f"{prefix}{err}") from None
