"""The exception tree of semibot_queue.

::

    QueueError                  every error this package raises on purpose
    ├── QueueFullError          a push was refused: the pending list is at MAX_QUEUE_LENGTH
    ├── QueueConnectionError    Redis stayed unreachable through every reconnect attempt
    │   └── QueueConfigurationError  wrong password, refused ACL, failed certificate check:
    │                                 fails at once, never retried as "unreachable"
    ├── RedisCommandError       Redis refused a command for a reason retrying will not fix
    │   └── QueueOutOfMemoryError    Redis is at maxmemory and refuses writes
    ├── InvalidTaskError        a payload failed validation or decoding; says the field and why
    ├── DuplicateTaskError      enqueue of a task id that is still live (pending, running, ...)
    ├── SettingsError           a setting or SEMIBOT_QUEUE_* variable has a bad value; names it
    ├── PermanentTaskError      raised by a handler: do not retry, dead-letter the task now
    └── TaskTimeoutError        raised in a handler's thread past its time limit (retried)

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


class QueueConfigurationError(QueueConnectionError):
    """Redis refused us for good: wrong password, ACL refusal or a failed certificate check.

    A subclass of QueueConnectionError (the connection cannot be used), but raised at once:
    retrying a wrong password only hides the cause.
    """


class RedisCommandError(QueueError):
    """Redis answered a command with an error that retrying will not fix; says which."""


class QueueOutOfMemoryError(RedisCommandError):
    """Redis is at its maxmemory limit and refuses writes; nothing was written."""


class DuplicateTaskError(QueueError):
    """``enqueue`` of a task id that is still live; nothing was written."""


class TaskTimeoutError(QueueError):
    """Raised in a handler's thread when it runs past its time limit; the task is retried."""
