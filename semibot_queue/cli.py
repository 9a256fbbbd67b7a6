"""The ``semibot-queue`` command line (also ``python -m semibot_queue``).

Errors print one line on stderr and exit with a code of :class:`Exit`; ``--debug``
adds the traceback. A nonsense argument is a usage error (exit 2) naming the option;
the arguments and their checks are in :mod:`semibot_queue.cli_parser`.
"""

from __future__ import annotations

import argparse
import enum
import importlib
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import attrs

from semibot_queue import logs, stats
from semibot_queue.cli_parser import (
    DEFAULT_WAIT,
    UsageError,
    build_parser,
    check_metrics_address,
    check_redis_url,
    parse,
)
from semibot_queue.clients import make_client
from semibot_queue.codec import Codec
from semibot_queue.connection import (
    Reconnector,
    mask_url,
)
from semibot_queue.constants import CLI_RECONNECT_ATTEMPTS, ENV_PREFIX
from semibot_queue.dead_letter import DeadLetterQueue
from semibot_queue.errors import (
    DuplicateTaskError,
    InvalidTaskError,
    QueueConfigurationError,
    QueueConnectionError,
    QueueError,
    QueueFullError,
)
from semibot_queue.keys import KeySpace
from semibot_queue.producer import TaskProducer, default_redis_url
from semibot_queue.settings import QueueSettings
from semibot_queue.signals import ignore_stop_signals
from semibot_queue.supervisor import run_workers
from semibot_queue.tables import print_dead_letters, print_record, print_stats


class Exit(enum.IntEnum):
    """Exit statuses of the command line (documented in the README)."""

    OK = 0
    ERROR = 1
    #: A nonsense or missing argument; one line on stderr names the option.
    USAGE = 2
    UNREACHABLE = 3
    #: No such dead letter; ``status`` of an unknown task; ``cancel`` of a task not live.
    NOT_FOUND = 4
    INVALID = 5
    #: The queue is full; also ``dlq retry-all`` stopped early at a full queue.
    FULL = 6
    TIMEOUT = 7
    DECLINED = 8
    #: Redis refused us for good: wrong password, ACL refusal, failed certificate check.
    CONFIGURATION = 9


class CommandError(QueueError):
    """A command failed in a way the user can act on; carries its exit status."""

    def __init__(self, message: str, status: Exit) -> None:
        super().__init__(message)
        self.status = status


def _parser() -> argparse.ArgumentParser:
    return build_parser("Run, feed and inspect a semibot_queue task queue on Redis.")


def run() -> None:
    """The ``semibot-queue`` command: :func:`main` on ``sys.argv``, exiting with its status."""
    status = main()
    # Done (a worker has stopped and drained): a signal arriving now must not replace the
    # exit status with death by that signal.
    ignore_stop_signals()
    sys.exit(status)


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Run the command line with ``argv``; the exit status."""
    try:
        args = parse(_parser(), argv)
    except UsageError as exc:
        print(f"semibot-queue: error: {exc}", file=sys.stderr)
        return int(Exit.USAGE)  # no --debug traceback: there is nothing to trace
    stdout = out or sys.stdout
    if args.command not in ("worker", "demo"):
        # One-shot commands print one line per error; the library's logs only with
        # --debug (WARNING) or --log-level.
        level = args.log_level or ("WARNING" if args.debug else "CRITICAL")
        logs.configure(level, args.log_format)
    try:
        return int(COMMANDS[args.command](args, stdout))
    except QueueError as exc:
        return _fail(args, exc, _status(exc))


#: The exit status of each kind of error, most specific first; any other QueueError
#: (RedisCommandError, QueueOutOfMemoryError among them) exits ERROR.
_STATUSES: tuple[tuple[type[QueueError], Exit], ...] = (
    (UsageError, Exit.USAGE),
    (QueueConfigurationError, Exit.CONFIGURATION),
    (QueueConnectionError, Exit.UNREACHABLE),
    (QueueFullError, Exit.FULL),
    (InvalidTaskError, Exit.INVALID),
    (DuplicateTaskError, Exit.INVALID),  # an id still live is refused input too
)


def _status(exc: QueueError) -> Exit:
    if isinstance(exc, CommandError):
        return exc.status
    return next((status for kind, status in _STATUSES if isinstance(exc, kind)), Exit.ERROR)


def _fail(args: argparse.Namespace, exc: Exception, status: Exit) -> int:
    if args.debug:
        traceback.print_exception(exc)
    print(f"semibot-queue: error: {exc}", file=sys.stderr)
    return int(status)


def _settings(one_shot: bool = True) -> QueueSettings:
    """Settings from the environment; a one-shot command gives up on Redis sooner."""
    settings = QueueSettings.from_env()
    variable = ENV_PREFIX + "MAX_RECONNECT_ATTEMPTS"
    if one_shot and variable not in os.environ:
        return attrs.evolve(settings, max_reconnect_attempts=CLI_RECONNECT_ATTEMPTS)
    return settings


def _url(args: argparse.Namespace) -> str:
    """``--redis-url`` (checked as it was parsed), else ``$REDIS_URL``, checked here."""
    if args.redis_url is not None:
        return str(args.redis_url)
    url = default_redis_url()
    try:
        return check_redis_url(url)
    except argparse.ArgumentTypeError as exc:
        raise UsageError(f"environment variable REDIS_URL: {exc}") from None


# --- worker ---------------------------------------------------------------------


def load_handler(spec: str) -> Callable[..., Any]:
    """The callable named by ``MODULE:FUNCTION``; CommandError(INVALID) if there is none."""
    module_name, _, function = spec.partition(":")
    if not module_name or not function:
        raise CommandError(f"handler {spec!r} is not of the form MODULE:FUNCTION", Exit.INVALID)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: handlers live beside the caller
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, SyntaxError, TypeError (a relative name): all bad input
        raise CommandError(f"cannot import {module_name!r}: {exc}", Exit.INVALID) from exc
    handler = getattr(module, function, None)
    if not callable(handler):
        raise CommandError(f"{module_name!r} has no callable {function!r}", Exit.INVALID)
    return handler  # type: ignore[no-any-return]


def _worker(args: argparse.Namespace, _out: TextIO) -> int:
    logs.configure(args.log_level or "INFO", args.log_format)
    url = _url(args)
    metrics = None
    if args.metrics_port is not None:
        metrics = (args.metrics_host, args.metrics_port)
        check_metrics_address(*metrics)
    handler = load_handler(args.handler)  # refused here, before any process starts
    if args.processes is not None:
        return _supervise(args, url)
    from semibot_queue.worker_process import run_worker  # noqa: PLC0415 - only the worker needs it

    return run_worker(
        handler=handler,
        redis_url=url,
        queue=args.queue,
        settings=_settings(one_shot=False),
        concurrency=args.concurrency,
        metrics=metrics,
    )


def _supervise(args: argparse.Namespace, url: str) -> int:
    """``worker --processes N``: N worker processes with these options, one supervisor."""
    return run_workers(
        args.handler,
        processes=args.processes,
        redis_url=url,
        queue_name=args.queue,
        concurrency=args.concurrency,
        settings=_settings(one_shot=False),
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        worker_args=["--log-level", args.log_level or "INFO", "--log-format", args.log_format],
    )


# --- enqueue ------------------------------------------------------------------------


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8") as file:
        return file.read()


def _payload(args: argparse.Namespace, codec: Codec) -> Any:
    if args.json is not None:
        try:
            text = sys.stdin.read() if args.json == "-" else _read_text(args.json)
        except (OSError, UnicodeDecodeError) as exc:
            raise CommandError(f"cannot read {args.json}: {exc}", Exit.INVALID) from exc
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise CommandError(f"{args.json} is not valid JSON: {exc}", Exit.INVALID) from exc
        except RecursionError:
            raise CommandError(
                f"{args.json} nests JSON deeper than the parser can follow", Exit.INVALID
            ) from None
        return codec.payload_from_dict(data)
    messages = []
    for item in args.message:
        role, sep, content = item.partition(":")
        if not sep:
            raise CommandError(f"--message {item!r} is not ROLE:TEXT", Exit.INVALID)
        messages.append({"role": role, "content": content})
    data = {
        "session_id": args.session_id,
        "agent_id": args.agent_id,
        "org_id": args.org_id,
        "messages": messages,
    }
    missing = [f"--{k.replace('_', '-')}" for k, v in data.items() if v is None]
    if missing:
        raise CommandError(f"enqueue needs {', '.join(missing)}", Exit.USAGE)
    return codec.payload_from_dict(data)


def _enqueue(args: argparse.Namespace, out: TextIO) -> int:
    settings = _settings()
    payload = _payload(args, Codec(settings.max_payload_bytes))
    with TaskProducer(_url(args), args.queue, settings) as producer:
        task_id = producer.enqueue(payload, delay=args.delay)
        print(task_id, file=out)
        if args.wait is None:
            return Exit.OK
        out.flush()  # the id is useful while the wait goes on
        timeout = None if args.wait is DEFAULT_WAIT else args.wait
        result = producer.wait_for_result(task_id, timeout=timeout)
    if result is None:
        raise CommandError(f"no result for task {task_id} in time", Exit.TIMEOUT)
    print(json.dumps(Codec(settings.max_payload_bytes).unstructure(result)), file=out)
    return Exit.OK if result.status == "succeeded" else Exit.ERROR


# --- following one task ----------------------------------------------------------------


def _task_status(args: argparse.Namespace, out: TextIO) -> int:
    """Print the task's status word; ``unknown`` and NOT_FOUND for an id the queue does
    not know (or whose result has expired)."""
    with TaskProducer(_url(args), args.queue, _settings()) as producer:
        status = producer.status(args.task_id)
    print(status or "unknown", file=out)
    return Exit.OK if status is not None else Exit.NOT_FOUND


def _cancel(args: argparse.Namespace, out: TextIO) -> int:
    """Cancel the task and say what became of it; NOT_FOUND when it was not live
    (unknown, or already finished), with the status it has."""
    task_id = args.task_id
    with TaskProducer(_url(args), args.queue, _settings()) as producer:
        cancelled = producer.cancel(task_id)
        status = producer.status(task_id)
    if not cancelled:
        print(f"{task_id} not cancelled: {status or 'unknown'}", file=out)
        return Exit.NOT_FOUND
    if status == "running":
        print(f"{task_id} asked to stop: it ends cancelled when its handler returns", file=out)
    elif status in ("cancelled", None):
        print(f"{task_id} cancelled", file=out)
    else:  # it was running and ended before it saw the request
        print(f"{task_id} asked to stop, but it ended first: {status}", file=out)
    return Exit.OK


# --- stats and dead letters -----------------------------------------------------------


def _stats(args: argparse.Namespace, out: TextIO) -> int:
    settings = _settings()
    url = _url(args)
    keys = KeySpace.of(args.queue, settings)
    client = make_client(url, settings, queue=keys.queue)
    # Each read is tried as the other one-shot commands try (CLI_RECONNECT_ATTEMPTS), so a
    # watch outlives a Redis restart.
    retry = Reconnector(url, keys.queue, settings)
    try:
        while True:
            try:
                snapshot = retry.call(
                    "reading stats", lambda: stats.collect(client, keys, settings)
                )
            except Exception as exc:
                if isinstance(exc, QueueError) and type(exc) is not QueueConnectionError:
                    raise  # refused, out of memory...: it says why
                # Redis out of reach, or an answer stats cannot read
                masked = mask_url(url)
                raise QueueConnectionError(f"cannot read stats from {masked}: {exc}") from exc
            if args.json:
                print(json.dumps(snapshot, sort_keys=True), file=out)
            else:
                print_stats(snapshot, out)
            if not args.watch:
                return Exit.OK
            out.flush()
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return Exit.OK  # Ctrl-C is how a watch ends
    finally:
        client.close()


def _confirm(args: argparse.Namespace, question: str) -> None:
    if getattr(args, "yes", False) or not sys.stdin.isatty():
        return
    if input(f"{question} [y/N] ").strip().lower() not in ("y", "yes"):
        raise CommandError("cancelled", Exit.DECLINED)


def _dlq(args: argparse.Namespace, out: TextIO) -> int:
    settings = _settings()
    dlq = DeadLetterQueue(_url(args), args.queue, settings)
    codec = Codec(settings.max_payload_bytes)
    try:
        command = args.dlq_command
        if command == "list":
            records = dlq.list(offset=args.offset, limit=args.limit)
            if args.json:
                print(json.dumps([codec.unstructure(r) for r in records]), file=out)
            else:
                print_dead_letters(records, dlq.count(), out)
        elif command == "retry-all":
            moved = dlq.retry_all()
            print(f"{int(moved)} dead letter(s) put back on pending", file=out)
            if moved.stopped_early:
                raise CommandError(
                    f"queue {dlq.keys.queue} is full (MAX_QUEUE_LENGTH="
                    f"{settings.max_queue_length}): stopped with {moved.remaining}"
                    " dead letter(s) left",
                    Exit.FULL,
                )
        elif command == "purge":
            _confirm(args, f"delete every dead letter of {dlq.keys.queue}?")
            print(f"{dlq.purge()} dead letter(s) deleted", file=out)
        else:
            return _dlq_one(args, dlq, codec, out)
    finally:
        dlq.close()
    return Exit.OK


def _dlq_one(args: argparse.Namespace, dlq: DeadLetterQueue, codec: Codec, out: TextIO) -> int:
    task_id = args.task_id
    command = args.dlq_command
    if command == "show":
        record = dlq.get(task_id)
        if record is not None:
            print_record(codec.unstructure(record), out)
            return Exit.OK
    elif command == "retry":
        if dlq.retry(task_id):
            print(f"{task_id} put back on pending", file=out)
            return Exit.OK
    else:
        _confirm(args, f"delete dead letter {task_id}?")
        if dlq.delete(task_id):
            print(f"{task_id} deleted", file=out)
            return Exit.OK
    raise CommandError(f"no dead letter with task id {task_id!r}", Exit.NOT_FOUND)


def _demo(args: argparse.Namespace, out: TextIO) -> int:
    from semibot_queue import demo  # noqa: PLC0415 - fakeredis is only needed here

    logs.configure(args.log_level or "WARNING", args.log_format)
    queue = args.queue or _settings().default_queue_name
    return demo.run(args.redis_url, args.tasks, queue, out)


COMMANDS: dict[str, Callable[[argparse.Namespace, TextIO], int]] = {
    "worker": _worker,
    "enqueue": _enqueue,
    "status": _task_status,
    "cancel": _cancel,
    "stats": _stats,
    "dlq": _dlq,
    "demo": _demo,
}
