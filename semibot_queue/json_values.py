"""What may cross Redis: plain JSON values, checked and copied before they are encoded.

Only JSON crosses Redis. :func:`plain` copies a value into exact ``dict``/``list``/``str``/
``int``/``float``/``bool``/``None`` objects, refusing anything else with the path of the
offending part: a type JSON cannot carry, a key that is not a string, NaN or Infinity,
nesting deeper than MAX_JSON_DEPTH (a container that contains itself included), a value
certainly larger than the byte limit. Encoding the copy (never the caller's objects) is
what makes "validated" and "written" the same thing: a list changed after a payload was
built cannot slip past the check, and no user ``__eq__``, ``__str__`` or ``__iter__`` runs.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

from semibot_queue.constants import MAX_JSON_DEPTH
from semibot_queue.errors import InvalidTaskError


class NotJsonError(ValueError):
    """A value cannot cross Redis; ``where()`` names the part and ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.path: list[str] = []

    def where(self, root: str = "") -> str:
        """The path of the offending part below ``root`` (``config.steps[2]``)."""
        return join_path([root, *reversed(self.path)] if root else list(reversed(self.path)))


class TooLargeError(NotJsonError):
    """A value is certainly larger than the byte limit it was copied under."""


def _part(key: str) -> str:
    return key if key.isidentifier() else f"[{json.dumps(key)[:40]}]"


#: Exact types copied as they are (immutable): the common case, checked inline.
_SCALARS = frozenset({str, int, bool, type(None)})


class _Copier:
    """One copy: remembers the depth limit and how many bytes may still be spent.

    Scalars of exact types are handled inline in the container loops (no call per
    value): this copy runs for every task enqueued and every result recorded.
    """

    def __init__(self, max_bytes: int | None, max_depth: int) -> None:
        self.budget = sys.maxsize if max_bytes is None else max_bytes
        self.max_depth = max_depth

    def spend(self, size: int) -> None:
        self.budget -= size
        if self.budget < 0:
            raise TooLargeError("larger than MAX_PAYLOAD_BYTES")

    def copy(self, value: Any, depth: int) -> Any:
        kind = type(value)
        if kind in _SCALARS:
            self.spend(len(value) + 1 if kind is str else 1)
            return value
        if kind is float:
            if not math.isfinite(value):
                raise NotJsonError(f"{value!r} is not a JSON number")
            self.spend(1)
            return value
        if isinstance(value, dict):
            return self.copy_dict(value, depth + 1)
        if isinstance(value, (list, tuple)):
            return self.copy_list(value, depth + 1)
        return self.copy(_exact(value), depth)

    def enter(self, depth: int) -> None:
        if depth > self.max_depth:
            raise NotJsonError(
                f"nested deeper than MAX_JSON_DEPTH ({self.max_depth} levels),"
                " or a container that contains itself"
            )

    def copy_dict(self, value: dict[Any, Any], depth: int) -> dict[str, Any]:
        self.enter(depth)
        copied: dict[str, Any] = {}
        spent = 1
        for key, item in dict.items(value):
            if type(key) is not str:
                if not isinstance(key, str):
                    raise NotJsonError(f"a key of type {type(key).__name__} is not a string")
                key = str.__str__(key)  # noqa: PLW2901 - the exact str of a str subclass
            kind = type(item)
            if kind in _SCALARS:
                spent += len(key) + (len(item) + 2 if kind is str else 2)
                if spent > self.budget:
                    self.spend(spent)
            else:
                self.spend(spent + len(key) + 1)
                spent = 0
                try:
                    item = self.copy(item, depth)  # noqa: PLW2901 - replaced by its copy
                except NotJsonError as exc:
                    exc.path.append(_part(key))
                    raise
            copied[key] = item
        self.spend(spent)
        return copied

    def copy_list(self, value: list[Any] | tuple[Any, ...], depth: int) -> list[Any]:
        self.enter(depth)
        copied = list.copy(value) if isinstance(value, list) else list(tuple.__iter__(value))
        spent = 1
        for index, item in enumerate(copied):
            kind = type(item)
            if kind in _SCALARS:
                spent += len(item) + 2 if kind is str else 1
                if spent > self.budget:
                    self.spend(spent)
                continue
            self.spend(spent + 1)
            spent = 0
            try:
                copied[index] = self.copy(item, depth)
            except NotJsonError as exc:
                exc.path.append(f"[{index}]")
                raise
        self.spend(spent)
        return copied


def _exact(value: Any) -> Any:
    """A subclass of str, int or float as its exact type (its overrides unused)."""
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    raise NotJsonError(f"a {type(value).__name__} is not a JSON value")


def plain(value: Any, max_bytes: int | None = None, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """A copy of ``value`` made of exact JSON types only, or NotJsonError naming the part.

    ``max_bytes`` stops early at a value certainly larger (its estimate never exceeds
    the real encoded size, which the caller still checks). Tuples become lists.
    """
    return _Copier(max_bytes, max_depth).copy(value, 0)


def too_deep(value: Any, max_depth: int = MAX_JSON_DEPTH) -> bool:
    """Whether decoded JSON ``value`` nests deeper than ``max_depth`` (no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth + 1 > max_depth:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def find_unencodable_text(value: Any) -> str | None:
    """The path of a string of plain JSON ``value`` (a key or a value) that UTF-8 cannot
    encode (a lone surrogate), or None when there is none."""
    stack: list[tuple[Any, list[str]]] = [(value, [])]
    while stack:
        item, parts = stack.pop()
        if isinstance(item, str) and not _utf8(item):
            return join_path(parts)
        if isinstance(item, dict):
            for key, child in item.items():
                where = [*parts, _part(key)]
                if not _utf8(key):
                    return join_path(where)
                stack.append((child, where))
        elif isinstance(item, list):
            stack.extend((child, [*parts, f"[{i}]"]) for i, child in enumerate(item))
    return None


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


#: Parts of a path shown at most; a deeper one is shortened in its middle.
_PATH_PARTS = 10


def join_path(parts: list[str]) -> str:
    """Path parts joined as a reader writes them: ``config.steps[2]``."""
    if len(parts) > _PATH_PARTS:
        parts = [*parts[: _PATH_PARTS - 3], "[...]", *parts[-2:]]
    text = ""
    for part in parts:
        text += part if part.startswith("[") or not text else "." + part
    return text or "value"


#: Built once: ``json.dumps`` with options builds a new encoder on every call, which cost
#: about a fifth of encoding a task.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
_ASCII_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def dumps(value: Any, *, ascii_only: bool = False) -> bytes:
    """Compact JSON bytes of plain ``value``; ``ascii_only`` escapes what UTF-8 cannot carry."""
    return (_ASCII_ENCODER if ascii_only else _ENCODER).encode(value).encode("utf-8")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is out of range")
    return value


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def loads(raw: bytes) -> Any:
    """The JSON value of ``raw``, or InvalidTaskError: not UTF-8, not JSON, NaN or an
    out-of-range number, nesting deeper than MAX_JSON_DEPTH."""
    try:
        data = json.loads(raw.decode("utf-8"), parse_float=_finite, parse_constant=_no_constants)
    except UnicodeDecodeError as exc:
        raise InvalidTaskError(f"payload is not UTF-8 text: {exc}") from None
    except RecursionError:
        raise InvalidTaskError(
            f"payload is not JSON: nested deeper than MAX_JSON_DEPTH ({MAX_JSON_DEPTH} levels)"
        ) from None
    except ValueError as exc:
        raise InvalidTaskError(f"payload is not JSON: {exc}") from None
    # More brackets than MAX_JSON_DEPTH (in strings too) is the only way to be deeper.
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and too_deep(data):
        raise InvalidTaskError(
            f"payload nests deeper than MAX_JSON_DEPTH ({MAX_JSON_DEPTH} levels)"
        )
    return data
