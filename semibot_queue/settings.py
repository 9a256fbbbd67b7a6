"""``QueueSettings``: every tunable of a queue, frozen and validated at construction."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from typing import Any, cast

import attrs

from semibot_queue import constants as c
from semibot_queue.errors import SettingsError


def _number(attribute: attrs.Attribute[Any], value: object) -> float:
    """``value`` if it is a finite number of the field's kind (a count must be whole)."""
    whole = isinstance(attribute.default, int)
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


def _field(default: Any, validator: Callable[..., None]) -> Any:
    return attrs.field(default=default, validator=validator, kw_only=True)


@attrs.frozen
class QueueSettings:
    """Every tunable of a queue; defaults come from :mod:`semibot_queue.constants`.

    Field names are the constant names in lower case; ``from_env`` reads
    ``SEMIBOT_QUEUE_<NAME>`` for each. A bad value raises :class:`SettingsError`
    naming the field (or the variable).
    """

    default_queue_name: str = _field(c.DEFAULT_QUEUE_NAME, _text)
    result_channel_prefix: str = _field(c.RESULT_CHANNEL_PREFIX, _text)
    dead_letter_queue: str = _field(c.DEAD_LETTER_QUEUE, _text)
    max_concurrent_tasks: int = _field(c.MAX_CONCURRENT_TASKS, _positive)
    queue_poll_timeout: float = _field(c.QUEUE_POLL_TIMEOUT, _positive)
    stop_poll_slice: float = _field(c.STOP_POLL_SLICE, _positive)
    busy_warning_interval: float = _field(c.BUSY_WARNING_INTERVAL, _non_negative)
    result_wait_timeout: float = _field(c.RESULT_WAIT_TIMEOUT, _positive)
    pubsub_message_timeout: float = _field(c.PUBSUB_MESSAGE_TIMEOUT, _positive)
    result_ttl: int = _field(c.RESULT_TTL, _positive)
    max_queue_length: int = _field(c.MAX_QUEUE_LENGTH, _positive)
    queue_length_warning_threshold: int = _field(c.QUEUE_LENGTH_WARNING_THRESHOLD, _positive)
    max_payload_bytes: int = _field(c.MAX_PAYLOAD_BYTES, _positive)
    error_retry_delay: float = _field(c.ERROR_RETRY_DELAY, _positive)
    max_reconnect_delay: float = _field(c.MAX_RECONNECT_DELAY, _positive)
    max_reconnect_attempts: int = _field(c.MAX_RECONNECT_ATTEMPTS, _positive)
    socket_timeout: float = _field(c.SOCKET_TIMEOUT, _positive)
    max_connections: int = _field(c.MAX_CONNECTIONS, _positive)
    min_replicas_to_ack: int = _field(c.MIN_REPLICAS_TO_ACK, _non_negative)
    replica_ack_timeout: float = _field(c.REPLICA_ACK_TIMEOUT, _positive)
    max_retry_attempts: int = _field(c.MAX_RETRY_ATTEMPTS, _non_negative)
    task_time_limit: float = _field(c.TASK_TIME_LIMIT, _non_negative)
    idempotency_ttl: int = _field(c.IDEMPOTENCY_TTL, _positive)
    retry_base_delay: float = _field(c.RETRY_BASE_DELAY, _non_negative)
    retry_max_delay: float = _field(c.RETRY_MAX_DELAY, _non_negative)
    retry_jitter: float = _field(c.RETRY_JITTER, _fraction)
    max_delivery_attempts: int = _field(c.MAX_DELIVERY_ATTEMPTS, _positive)
    dead_letter_max_length: int = _field(c.DEAD_LETTER_MAX_LENGTH, _positive)
    dead_letter_ttl: int = _field(c.DEAD_LETTER_TTL, _positive)
    heartbeat_interval: float = _field(c.HEARTBEAT_INTERVAL, _positive)
    worker_dead_after: float = _field(c.WORKER_DEAD_AFTER, _positive)
    shutdown_timeout: float = _field(c.SHUTDOWN_TIMEOUT, _non_negative)
    maintenance_batch: int = _field(c.MAINTENANCE_BATCH, _positive)

    def __attrs_post_init__(self) -> None:
        pairs = [
            ("queue_length_warning_threshold", "max_queue_length"),
            ("error_retry_delay", "max_reconnect_delay"),
            ("retry_base_delay", "retry_max_delay"),
            ("heartbeat_interval", "worker_dead_after"),
            ("stop_poll_slice", "socket_timeout"),
            ("pubsub_message_timeout", "socket_timeout"),
        ]
        for low, high in pairs:
            if getattr(self, low) > getattr(self, high):
                raise SettingsError(
                    f"setting {low} ({getattr(self, low)}) must not exceed"
                    f" {high} ({getattr(self, high)})"
                )
        if self.heartbeat_interval * 2 > self.worker_dead_after:
            # One late heartbeat must not get a healthy worker's tasks recovered.
            raise SettingsError(
                f"setting worker_dead_after ({self.worker_dead_after}) must be at least"
                f" twice heartbeat_interval ({self.heartbeat_interval})"
            )

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
                values[field.name] = _parse(raw, type(field.default))
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
