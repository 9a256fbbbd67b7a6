"""The exception tree of semibot_queue.

::

    QueueError                  every error this package raises on purpose
    ├── QueueFullError          a push was refused: the pending list is at MAX_QUEUE_LENGTH
    ├── QueueConnectionError    Redis stayed unreachable through every reconnect attempt
    ├── InvalidTaskError        a payload failed validation or decoding; says the field and why
    ├── SettingsError           a setting or SEMIBOT_QUEUE_* variable has a bad value; names it
    └── PermanentTaskError      raised by a handler: do not retry, dead-letter the task now

Redis errors are translated at the boundary (``raise QueueConnectionError(...) from exc``)
so that callers only ever catch these.
"""

from __future__ import annotations


class QueueError(Exception):
    """Root of every error raised by semibot_queue."""


class QueueFullError(QueueError):
    """The pending list is full; nothing was written."""


class QueueConnectionError(QueueError):
    """Redis could not be reached after the configured reconnect attempts."""


class InvalidTaskError(QueueError):
    """A payload or message is malformed; the message names the field and what was wrong."""


class SettingsError(QueueError):
    """A setting is out of range or of the wrong type; the message names it."""


class PermanentTaskError(QueueError):
    """Raised by a handler to send its task straight to the dead-letter queue."""
