"""Errors as text, whatever the exception does: for results, dead letters and logs.

Neither function here ever raises, whatever an exception's ``__str__`` does (raise
anything, return a non-string, lone surrogates or megabytes of text); both cut their text
to MAX_ERROR_CHARS and keep it encodable as UTF-8.
"""

from __future__ import annotations

import traceback

from semibot_queue.constants import MAX_ERROR_CHARS


def describe_error(exc: BaseException) -> str:
    """The message of ``exc`` (``str(exc)``), at most MAX_ERROR_CHARS, encodable as UTF-8.

    Never raises, whatever the exception's ``__str__`` does (raise anything, return a
    non-string, return lone surrogates or megabytes of text): a message that cannot be
    had is described as such. The type is not included (callers add it where wanted).
    """
    try:
        text = str(exc)
        text = text if type(text) is str else str.__str__(text)
    except BaseException as failure:  # noqa: BLE001 - nothing str() raises may escape
        text = f"<str() of the exception raised {_type_name(failure)}>"
    return _clip(text)


def format_traceback(exc: BaseException) -> str:
    """The traceback of ``exc`` as text, at most MAX_ERROR_CHARS (its start and its end
    kept), encodable as UTF-8. Never raises."""
    try:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    except BaseException as failure:  # noqa: BLE001 - a traceback is best effort, never fatal
        text = f"{describe_error(exc)}\n(no traceback: formatting it raised {_type_name(failure)})"
    return _clip(text, keep_end=True)


def _type_name(exc: BaseException) -> str:
    try:
        name = type(exc).__qualname__
    except BaseException:  # noqa: BLE001 # pragma: no cover - a class always has a name
        return "BaseException"
    return name if type(name) is str else "BaseException"


def _clip(text: str, *, keep_end: bool = False) -> str:
    """``text`` cut to MAX_ERROR_CHARS (saying so), lone surrogates written as ``\\udXXX``."""
    text = _cut(text, keep_end=keep_end)
    safe = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return _cut(safe, keep_end=keep_end)  # escapes may have made it longer


def _cut(text: str, *, keep_end: bool) -> str:
    if len(text) <= MAX_ERROR_CHARS:
        return text
    cut = f" [... {len(text) - MAX_ERROR_CHARS} characters cut ...] "
    room = max(MAX_ERROR_CHARS - len(cut), 0)
    if not keep_end:
        return text[:room] + cut.rstrip()
    head = room // 2
    return text[:head] + cut + text[len(text) - (room - head) :]
