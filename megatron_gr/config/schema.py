"""Typed construction of config dataclasses from plain YAML/flag values.

Every value is checked against its field's annotation before the dataclass is built, so a
wrong type is reported as ``section.key=value must be ...`` instead of surfacing later as a
Python exception deep in the run.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from typing import Any, Iterable, Literal, Optional, Union

from megatron_gr.config.errors import ConfigError

_NONE_TYPE = type(None)
_LEADING_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(=|\s)")


def coerce(value: Any, annotation: Any, key: str) -> Any:
    """Returns ``value`` as the type ``annotation`` allows, or raises ConfigError."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None:
            if _NONE_TYPE in options:
                return None
            raise ConfigError(f"{key}=null is not allowed: a value is required")
        errors = []
        for option in options:
            if option is _NONE_TYPE:
                continue
            try:
                return coerce(value, option, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}={value!r} matches none of: " + "; ".join(errors))
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            allowed = ", ".join(repr(c) for c in choices)
            raise ConfigError(f"{key}={value!r} is not allowed: choose one of {allowed}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r} must be a list, e.g. [a, b]")
        (item,) = typing.get_args(annotation)
        return [coerce(element, item, f"{key}[{i}]") for i, element in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r} must be a mapping, e.g. {{name: value}}")
        key_type, value_type = typing.get_args(annotation)
        return {
            coerce(name, key_type, f"{key} key {name!r}"): coerce(element, value_type, f"{key}.{name}")
            for name, element in value.items()
        }
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be true or false")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be an integer")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r} must be a number")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}={value!r} must be a string")
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of fields, got {value!r}")
        return build_dataclass(annotation, value, key)
    raise ConfigError(f"{key}: values of type {annotation} cannot be set from a config file")


def field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def check_known_keys(raw: dict, allowed: Iterable[str], section: str) -> None:
    allowed = sorted(allowed)
    for key in raw:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=3)
            hint = f"; did you mean {', '.join(f'{section}.{c}' for c in close)}?" if close else ""
            listing = "" if len(allowed) > 40 else f" Allowed keys: {', '.join(allowed)}."
            raise ConfigError(f"unknown key {section}.{key}{hint}{listing}")


def prefix_error(section: str, error: Exception) -> ConfigError:
    """``num_layers=0 ...`` -> ``model.num_layers=0 ...``; other messages get ``model: ``."""
    message = str(error)
    if message.startswith(section + ".") or message.startswith(section + ":"):
        return ConfigError(message)
    if _LEADING_FIELD.match(message):
        return ConfigError(f"{section}.{message}")
    return ConfigError(f"{section}: {message}")


def build_dataclass(cls, raw: dict, section: str, allowed: Optional[Iterable[str]] = None, **fixed):
    """Builds ``cls`` from ``raw`` (keys checked against ``allowed``, default: all init
    fields); ``fixed`` values come from other sections and bypass the key check."""
    types_ = field_types(cls)
    check_known_keys(raw, allowed if allowed is not None else types_.keys(), section)
    kwargs = {key: coerce(value, types_[key], f"{section}.{key}") for key, value in raw.items()}
    kwargs.update(fixed)
    try:
        return cls(**kwargs)
    except (ConfigError, ValueError) as error:
        raise prefix_error(section, error) from None


def dataclass_to_dict(obj, keys: Optional[Iterable[str]] = None) -> dict:
    """Plain-value dict of a config dataclass (nested dataclasses become dicts)."""
    names = list(keys) if keys is not None else [f.name for f in dataclasses.fields(obj) if f.init]
    return {name: _plain(getattr(obj, name)) for name in names}


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclass_to_dict(value)
    if isinstance(value, list):
        return [_plain(element) for element in value]
    if isinstance(value, dict):
        return {name: _plain(element) for name, element in value.items()}
    return value
