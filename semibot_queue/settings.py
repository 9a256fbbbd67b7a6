"""``QueueSettings``: every tunable of a queue, frozen and validated at construction.

Every setting can be given on its own. Some settings are bounded by another (a warning
threshold by the queue's length limit, a heartbeat by the dead-after limit, ...): when
only one of such a pair is given and the other's default would contradict it, the other
follows it, keeping the ratio of the two defaults (``_FOLLOWERS``). Two values given
explicitly that contradict each other are refused, naming both.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from typing import Any, cast

import attrs

from semibot_queue import constants as c
from semibot_queue.errors import SettingsError
from semibot_queue.keys import is_valid_name


class _Follow:
    """Default of a setting that follows its partner when only the partner is given."""

    def __repr__(self) -> str:
        return "<default>"


_FOLLOW: Any = _Follow()


def _constant(attribute: attrs.Attribute[Any]) -> Any:
    """The constant a field defaults to (a following field keeps it in its metadata)."""
    return attribute.metadata.get("constant", attribute.default)


def _number(attribute: attrs.Attribute[Any], value: object) -> float:
    """``value`` if it is a finite number of the field's kind (a count must be whole)."""
    whole = isinstance(_constant(attribute), int)
    kinds = (int,) if whole else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
        kind = "a whole number" if whole else "a finite number"
        raise SettingsError(f"setting {attribute.name} must be {kind}, got {value!r}")
    return float(value)


def _positive(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if _number(attribute, value) <= 0:
        raise SettingsError(f"setting {attribute.name} must be positive, got {value!r}")


def _non_negative(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if _number(attribute, value) < 0:
        raise SettingsError(f"setting {attribute.name} must be zero or more, got {value!r}")


def _fraction(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not 0 <= _number(attribute, value) < 1:
        raise SettingsError(f"setting {attribute.name} must be in [0, 1), got {value!r}")


def _text(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, str) or not value:
        raise SettingsError(f"setting {attribute.name} must be a non-empty string, got {value!r}")


def _key_name(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    """A name that becomes part of Redis keys (see ``keys.validate_name``)."""
    _text(_, attribute, value)
    if not is_valid_name(cast("str", value)):
        raise SettingsError(
            f"setting {attribute.name} {value!r} is not allowed: use 1 to {c.MAX_NAME_LENGTH}"
            " of the characters A-Z a-z 0-9 _ . : -"
        )


def _unless_following(validator: Callable[..., None]) -> Callable[..., None]:
    def check(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if value is not _FOLLOW:
            validator(instance, attribute, value)

    return check


def _field(default: Any, validator: Callable[..., None], *, follows: bool = False) -> Any:
    if follows:
        return attrs.field(
            default=_FOLLOW,
            validator=_unless_following(validator),
            kw_only=True,
            metadata={"constant": default},
        )
    return attrs.field(default=default, validator=validator, kw_only=True)


#: ``(low, high, factor)``: ``low`` must not exceed ``high``, and ``high`` must be at least
#: ``low * minimum`` (1 for most pairs). When only one of a pair is given, the other keeps
#: its default unless that contradicts the given one; then it follows it: ``low`` becomes
#: ``high / factor`` or ``high`` becomes ``low * factor``.
_FOLLOWERS: tuple[tuple[str, str, float, float], ...] = (
    # (low, high, factor, minimum ratio high/low)
    (
        "queue_length_warning_threshold",
        "max_queue_length",
        c.MAX_QUEUE_LENGTH / c.QUEUE_LENGTH_WARNING_THRESHOLD,
        1.0,
    ),
    ("error_retry_delay", "max_reconnect_delay", 1.0, 1.0),
    ("retry_base_delay", "retry_max_delay", 1.0, 1.0),
    # One late heartbeat must not get a healthy worker's tasks recovered: at least 2x.
    ("heartbeat_interval", "worker_dead_after", c.WORKER_DEAD_AFTER / c.HEARTBEAT_INTERVAL, 2.0),
    ("stop_poll_slice", "socket_timeout", c.SOCKET_TIMEOUT / c.STOP_POLL_SLICE, 1.0),
    (
        "pubsub_message_timeout",
        "socket_timeout",
        c.SOCKET_TIMEOUT / c.PUBSUB_MESSAGE_TIMEOUT,
        1.0,
    ),
)


@attrs.frozen
class QueueSettings:
    """Every tunable of a queue; defaults come from :mod:`semibot_queue.constants`.

    Field names are the constant names in lower case; ``from_env`` reads
    ``SEMIBOT_QUEUE_<NAME>`` for each. A bad value raises :class:`SettingsError`
    naming the field (or the variable). Any one setting may be given alone: a bound
    that depends on it follows it (``max_queue_length=100`` alone warns from 50).
    """

    default_queue_name: str = _field(c.DEFAULT_QUEUE_NAME, _key_name)
    result_channel_prefix: str = _field(c.RESULT_CHANNEL_PREFIX, _text)
    dead_letter_queue: str = _field(c.DEAD_LETTER_QUEUE, _key_name)
    max_concurrent_tasks: int = _field(c.MAX_CONCURRENT_TASKS, _positive)
    queue_poll_timeout: float = _field(c.QUEUE_POLL_TIMEOUT, _positive)
    stop_poll_slice: float = _field(c.STOP_POLL_SLICE, _positive, follows=True)
    busy_warning_interval: float = _field(c.BUSY_WARNING_INTERVAL, _non_negative)
    result_wait_timeout: float = _field(c.RESULT_WAIT_TIMEOUT, _positive)
    pubsub_message_timeout: float = _field(c.PUBSUB_MESSAGE_TIMEOUT, _positive, follows=True)
    result_ttl: int = _field(c.RESULT_TTL, _positive)
    max_queue_length: int = _field(c.MAX_QUEUE_LENGTH, _positive, follows=True)
    queue_length_warning_threshold: int = _field(
        c.QUEUE_LENGTH_WARNING_THRESHOLD, _positive, follows=True
    )
    max_payload_bytes: int = _field(c.MAX_PAYLOAD_BYTES, _positive)
    error_retry_delay: float = _field(c.ERROR_RETRY_DELAY, _positive, follows=True)
    max_reconnect_delay: float = _field(c.MAX_RECONNECT_DELAY, _positive, follows=True)
    max_reconnect_attempts: int = _field(c.MAX_RECONNECT_ATTEMPTS, _positive)
    socket_timeout: float = _field(c.SOCKET_TIMEOUT, _positive, follows=True)
    max_connections: int = _field(c.MAX_CONNECTIONS, _positive)
    min_replicas_to_ack: int = _field(c.MIN_REPLICAS_TO_ACK, _non_negative)
    replica_ack_timeout: float = _field(c.REPLICA_ACK_TIMEOUT, _positive)
    max_retry_attempts: int = _field(c.MAX_RETRY_ATTEMPTS, _non_negative)
    task_time_limit: float = _field(c.TASK_TIME_LIMIT, _non_negative)
    idempotency_ttl: int = _field(c.IDEMPOTENCY_TTL, _positive)
    retry_base_delay: float = _field(c.RETRY_BASE_DELAY, _non_negative, follows=True)
    retry_max_delay: float = _field(c.RETRY_MAX_DELAY, _non_negative, follows=True)
    retry_jitter: float = _field(c.RETRY_JITTER, _fraction)
    max_delivery_attempts: int = _field(c.MAX_DELIVERY_ATTEMPTS, _positive)
    dead_letter_max_length: int = _field(c.DEAD_LETTER_MAX_LENGTH, _positive)
    dead_letter_ttl: int = _field(c.DEAD_LETTER_TTL, _positive)
    heartbeat_interval: float = _field(c.HEARTBEAT_INTERVAL, _positive, follows=True)
    worker_dead_after: float = _field(c.WORKER_DEAD_AFTER, _positive, follows=True)
    shutdown_timeout: float = _field(c.SHUTDOWN_TIMEOUT, _non_negative)
    maintenance_batch: int = _field(c.MAINTENANCE_BATCH, _positive)

    def __attrs_post_init__(self) -> None:
        given = {f.name for f in attrs.fields(type(self)) if getattr(self, f.name) is not _FOLLOW}
        for low, high, factor, _ in _FOLLOWERS:
            if low not in given and high in given:
                self._follow(low, min, getattr(self, high) / factor)
            elif high not in given and low in given:
                self._follow(high, max, getattr(self, low) * factor)
        for field in attrs.fields(type(self)):
            if getattr(self, field.name) is _FOLLOW:
                object.__setattr__(self, field.name, _constant(field))
        for low, high, _, ratio in _FOLLOWERS:
            low_value, high_value = getattr(self, low), getattr(self, high)
            if low_value * ratio <= high_value:
                continue
            if ratio == 1:
                raise SettingsError(
                    f"setting {low} ({low_value}) must not exceed {high} ({high_value})"
                )
            raise SettingsError(
                f"setting {high} ({high_value}) must be at least {ratio:g} times"
                f" {low} ({low_value})"
            )

    def _follow(self, name: str, pick: Callable[[float, float], float], wanted: float) -> None:
        """Set ``name`` (not given) to ``pick(its default, wanted)``, of its default's kind."""
        field = attrs.fields_dict(type(self))[name]
        default = _constant(field)
        value = pick(default, wanted)
        if isinstance(default, int):
            value = max(1, int(value))
        if getattr(self, name) is not _FOLLOW:  # socket_timeout follows two settings
            value = max(getattr(self, name), value)
        object.__setattr__(self, name, value)

    @property
    def blocking_timeout(self) -> float:
        """Seconds one blocking pop waits: short enough for ``stop()`` to act promptly."""
        return min(self.queue_poll_timeout, self.stop_poll_slice)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> QueueSettings:
        """Build settings from ``SEMIBOT_QUEUE_<NAME>`` variables, then ``overrides``.

        A value that does not parse, or is out of range, raises SettingsError naming
        the variable.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in attrs.fields(cls):
            variable = c.ENV_PREFIX + field.name.upper()
            if variable not in env:
                continue
            raw = env[variable]
            try:
                values[field.name] = _parse(raw, type(_constant(field)))
                validator = cast("Callable[..., None]", field.validator)
                validator(None, field, values[field.name])
            except (ValueError, SettingsError) as exc:
                raise SettingsError(f"environment variable {variable}={raw!r}: {exc}") from None
        values.update(overrides)
        return cls(**values)


def _parse(raw: str, kind: type) -> Any:
    if kind is int:
        return int(raw)
    if kind is float:
        return float(raw)
    return raw
