"""The cattrs converters of the codec: strict (no coercion), with readable errors."""

from __future__ import annotations

from typing import Any

import attrs
import cattrs


def strict_converter(*, forbid_extra_keys: bool) -> cattrs.Converter:
    """A converter that never coerces: ``5`` is not a session id, ``"x"`` is not a list.

    Containers pass through unchanged; the models' own validators check their items
    and name the offending index.
    """
    converter = cattrs.Converter(forbid_extra_keys=forbid_extra_keys)

    def exact(kind: type[Any], label: str) -> Any:
        def hook(value: Any, _: Any) -> Any:
            if isinstance(value, bool) or not isinstance(value, kind):
                raise TypeError(f"expected {label}, got {type(value).__name__}")
            return value

        return hook

    def number(value: Any, _: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"expected a number, got {type(value).__name__}")
        return float(value)

    converter.register_structure_hook(str, exact(str, "a string"))
    converter.register_structure_hook(int, exact(int, "a whole number"))
    converter.register_structure_hook(float, number)
    converter.register_structure_hook_func(
        lambda kind: kind == list[dict[str, str]], exact(list, "a list")
    )
    converter.register_structure_hook_func(
        lambda kind: kind in (dict[str, Any], dict[str, Any] | None), mapping_or_none
    )
    return converter


def describe(exc: BaseException, _: Any) -> str:
    """What was wrong with one field, for an InvalidTaskError's message."""
    if isinstance(exc, KeyError):
        return "required field missing"
    if isinstance(exc, cattrs.ForbiddenExtraKeysError):
        return "unknown key " + ", ".join(repr(key) for key in sorted(exc.extra_fields))
    return str(exc) or type(exc).__name__


def mapping_or_none(value: Any, kind: Any) -> Any:
    """A JSON object as it is (or None where the field allows it), else TypeError."""
    if value is None and kind != dict[str, Any]:
        return None
    if not isinstance(value, dict):
        raise TypeError(f"expected a JSON object, got {type(value).__name__}")
    return value


def fields_of(cls: type[Any]) -> list[str]:
    """Names of a model's fields, in order (for tables and documentation)."""
    return [field.name for field in attrs.fields(cls) if field.init]
