"""The arguments of the ``semibot-queue`` command line: the parser and a check for every value.

Global options (``--redis-url``, ``--queue``, ``--debug``, ``--log-level``, ``--log-format``)
are accepted before or after the command (``semibot-queue stats --redis-url U`` and
``semibot-queue --redis-url U stats`` are the same; given twice, the later one wins).
Every value is checked as it is parsed: a nonsense one (``--concurrency 0``, ``--watch -1``,
``--wait nan``, a URL Redis cannot use, ...) raises :class:`UsageError`, one line naming
the option, which the command line turns into exit status 2.
"""

from __future__ import annotations

import argparse
import errno
import math
import re
import socket
from collections.abc import Callable, Sequence
from typing import Any, Final, NoReturn

from semibot_queue.constants import (
    DEFAULT_QUEUE_NAME,
    DEFAULT_REDIS_URL,
    MAX_CLI_SECONDS,
    MAX_NAME_LENGTH,
    MAX_QUEUE_LENGTH,
    MAX_RANGE,
    MAX_WORKER_PROCESSES,
    METRICS_HOST,
)
from semibot_queue.demo import DEMO_TASKS
from semibot_queue.errors import QueueConfigurationError, QueueError
from semibot_queue.keys import is_valid_name
from semibot_queue.urls import check_url

#: Levels ``--log-level`` accepts.
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

#: What ``--wait`` given without SECONDS stands for: wait RESULT_WAIT_TIMEOUT. (Not a
#: string: argparse would run a string through the option's check.)
DEFAULT_WAIT: Final = object()

#: The highest TCP port number.
_MAX_PORT = 65_535

#: A URL: a scheme, then ``://``.
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")

#: Global options and their values when not given (they are parsed with SUPPRESS
#: defaults so that a value given before the command survives the command's parser).
GLOBAL_DEFAULTS: dict[str, Any] = {
    "redis_url": None,
    "queue": None,
    "debug": False,
    "log_level": None,
    "log_format": "text",
}


class UsageError(QueueError):
    """A nonsense or missing argument: the command line exits 2 with this one line."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise UsageError instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        """Raise the error as one line that names the option and where to find help."""
        raise UsageError(f"{message} (see '{self.prog} --help')")


# --- value checks: each returns the parsed value or raises ArgumentTypeError ------------


def _whole(low: int, high: int | None = None) -> Callable[[str], int]:
    """A check for a whole number from ``low`` (to ``high``)."""
    wanted = f">= {low}" if high is None else f"from {low} to {high}"

    def check(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be a whole number {wanted}, got {text!r}")
        return value

    return check


def _seconds(*, zero: bool) -> Callable[[str], float]:
    """A check for a number of seconds, > 0 (or >= 0 when ``zero``), at most a year."""
    wanted = ">= 0" if zero else "> 0"

    def check(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not 0 <= value <= MAX_CLI_SECONDS or (value == 0 and not zero):
            raise argparse.ArgumentTypeError(
                f"must be a number of seconds {wanted} and at most {MAX_CLI_SECONDS}"
                f" (a year), got {text!r}"
            )
        return value

    return check


def check_redis_url(text: str) -> str:
    """``text`` if the Redis client can use it as a URL (nothing is connected)."""
    if not _URL.match(text):
        # Not echoed: without a scheme, a password in it could not be masked.
        raise argparse.ArgumentTypeError(f"must be a URL such as {DEFAULT_REDIS_URL}")
    try:
        check_url(text)  # parses only, as make_client does first
    except QueueConfigurationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _name(what: str) -> Callable[[str], str]:
    """A check for a queue name or task id: what can be part of a Redis key."""

    def check(text: str) -> str:
        if not is_valid_name(text):
            raise argparse.ArgumentTypeError(
                f"{what} {text!r} is not allowed: use 1 to {MAX_NAME_LENGTH}"
                " of the characters A-Z a-z 0-9 _ . : -"
            )
        return text

    return check


def _text(text: str) -> str:
    """Any non-blank text."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must not be empty, got {text!r}")
    return text


def _host(text: str) -> str:
    """A host name or address to bind to."""
    if not text or any(char.isspace() for char in text):
        raise argparse.ArgumentTypeError(f"must be a host name or address, got {text!r}")
    return text


# --- the parser -----------------------------------------------------------------------


def _global_options() -> argparse.ArgumentParser:
    """The options every command takes, before or after its name."""
    parent = _Parser(add_help=False)
    group = parent.add_argument_group("global options (before or after the command)")
    suppress = argparse.SUPPRESS
    group.add_argument(
        "--redis-url",
        type=check_redis_url,
        default=suppress,
        metavar="URL",
        help=f"default: $REDIS_URL, then {DEFAULT_REDIS_URL}",
    )
    group.add_argument(
        "--queue",
        type=_name("queue name"),
        default=suppress,
        metavar="NAME",
        help=f"queue name (default: {DEFAULT_QUEUE_NAME})",
    )
    group.add_argument(
        "--debug", action="store_true", default=suppress, help="print tracebacks on errors"
    )
    group.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        default=suppress,
        metavar="LEVEL",
        help=f"{', '.join(LOG_LEVELS)}: library logs on stderr from this level"
        " (default: INFO for worker, WARNING for demo, none for other commands)",
    )
    group.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=suppress,
        metavar="FORMAT",
        help="text (default), or json: one object per line",
    )
    return parent


def build_parser(description: str) -> argparse.ArgumentParser:
    """The parser of the whole command line."""
    common = _global_options()
    parser = _Parser(prog="semibot-queue", description=description, parents=[common])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str, into: Any = commands) -> argparse.ArgumentParser:
        made: argparse.ArgumentParser = into.add_parser(
            name, help=help_text, description=help_text, parents=[common]
        )
        return made

    worker = command("worker", "run tasks with MODULE:FUNCTION until SIGTERM/SIGINT")
    worker.add_argument(
        "handler", metavar="MODULE:FUNCTION", help="the handler, importable from here or PYTHONPATH"
    )
    worker.add_argument(
        "--concurrency",
        type=_whole(1),
        metavar="N",
        help="handlers run at once (default: MAX_CONCURRENT_TASKS)",
    )
    worker.add_argument(
        "--processes",
        type=_whole(1, MAX_WORKER_PROCESSES),
        metavar="N",
        help="run N worker processes under a supervisor that restarts them (default: one"
        " worker, in this process)",
    )
    worker.add_argument(
        "--metrics-port",
        type=_whole(1, _MAX_PORT),
        metavar="PORT",
        help="serve /metrics on this port",
    )
    worker.add_argument(
        "--metrics-host",
        type=_host,
        default=METRICS_HOST,
        metavar="HOST",
        help=f"default: {METRICS_HOST}",
    )

    enqueue = command("enqueue", "enqueue one task and print its id")
    source = enqueue.add_mutually_exclusive_group(required=True)
    source.add_argument("--json", metavar="FILE", help="payload as JSON, '-' for stdin")
    source.add_argument("--session-id")
    enqueue.add_argument("--agent-id")
    enqueue.add_argument("--org-id")
    enqueue.add_argument("--message", action="append", default=[], metavar="ROLE:TEXT")
    enqueue.add_argument(
        "--delay",
        type=_seconds(zero=True),
        metavar="SECONDS",
        help="schedule the task: pending that many seconds from now",
    )
    enqueue.add_argument(
        "--wait",
        nargs="?",
        type=_seconds(zero=True),
        const=DEFAULT_WAIT,
        metavar="SECONDS",
        help="wait for the result and print it (default: RESULT_WAIT_TIMEOUT; from the"
        " enqueue, so count a --delay in)",
    )

    for name, help_text in (
        ("status", "print a task's status: pending, scheduled, running, succeeded, failed,"
         " dead, cancelled; unknown (exit 4)"),
        ("cancel", "cancel a pending, scheduled or running task (exit 4 if it is not live)"),
    ):  # fmt: skip
        command(name, help_text).add_argument("task_id", metavar="ID", type=_name("task id"))

    stats = command("stats", "pending, scheduled, in flight, dead letters, workers")
    stats.add_argument("--json", action="store_true", help="one JSON object per snapshot")
    stats.add_argument(
        "--watch", type=_seconds(zero=False), metavar="SECONDS", help="repeat every SECONDS"
    )

    dlq = command("dlq", "inspect and replay dead letters")
    dlq_commands = dlq.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    listing = command("list", "dead letters, newest first", dlq_commands)
    # Redis ranges are 64-bit: larger numbers would reach it and be refused there
    listing.add_argument(
        "--limit", type=_whole(0, MAX_RANGE), default=20, metavar="N", help="default: 20"
    )
    listing.add_argument(
        "--offset", type=_whole(0, MAX_RANGE), default=0, metavar="N", help="default: 0"
    )
    listing.add_argument("--json", action="store_true")
    for name, help_text in (
        ("show", "one dead letter, field by field"),
        ("retry", "put the task back on pending"),
        ("delete", "delete one dead letter"),
    ):
        one = command(name, help_text, dlq_commands)
        one.add_argument("task_id", metavar="ID", type=_text, help="task id or record id")
        if name == "delete":
            one.add_argument("--yes", action="store_true", help="do not ask")
    command("retry-all", "put every dead letter back on pending, as many as fit", dlq_commands)
    purge = command("purge", "delete every dead letter", dlq_commands)
    purge.add_argument("--yes", action="store_true", help="do not ask")

    demo = command("demo", "producer and worker end to end in one process")
    demo.add_argument(
        "--tasks",
        type=_whole(1, MAX_QUEUE_LENGTH),
        default=DEMO_TASKS,
        metavar="N",
        help=f"default: {DEMO_TASKS}",
    )
    return parser


def check_metrics_address(host: str, port: int) -> None:
    """UsageError naming the option unless ``host`` resolves and ``port`` can be bound
    there now (as the metrics server will bind it, address reuse on)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (OSError, UnicodeError) as exc:
        raise UsageError(f"argument --metrics-host: cannot resolve {host!r}: {exc}") from None
    try:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as exc:
        option = "--metrics-host" if exc.errno == errno.EADDRNOTAVAIL else "--metrics-port"
        raise UsageError(
            f"argument {option}: cannot serve metrics on {host}:{port}: {exc.strerror}"
        ) from None


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``argv`` parsed, every global option present (its default when not given)."""
    args = parser.parse_args(argv)
    for name, default in GLOBAL_DEFAULTS.items():
        if not hasattr(args, name):
            setattr(args, name, default)
    return args
