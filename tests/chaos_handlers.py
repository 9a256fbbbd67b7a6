"""Handlers that worker subprocesses of the chaos and worker-fault tests import.

``handle`` is the chaos handler. What it does with a task is a pure function of
``(seed, task id, attempt)``: :func:`plan` draws the task's behaviour from a
``random.Random`` seeded with the seed and the task id, and :func:`act` carries it out
for one attempt (``message.retry_count``). The test computes the same plan with
:func:`expect` and so knows each task's final outcome before any worker runs it. The
seed and the payload limit travel in the task's ``config`` (``chaos_seed``, ``limit``).

``gated`` runs until a file named by ``config["gate"]`` exists, for tests that need a
task to stay running while they inject a fault.

Both log every run to ``$FAULT_RUNS_FILE`` (see ``fault_handlers.record``).
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fault_handlers import record
from semibot_queue import PermanentTaskError, TaskMessage

#: Seconds a gated task waits for its gate at most (then it fails, visibly).
GATE_TIMEOUT_S = 120.0

#: Characters of the message of a "huge" exception (10 MB).
HUGE_MESSAGE_CHARS = 10_000_000

#: Characters of the message of the errors raised by tasks near the payload limit: enough
#: for a retry copy (which keeps the last error) to be over MAX_PAYLOAD_BYTES.
LONG_ERROR_CHARS = 3_000

#: Nesting of a returned value that JSON can hold, and of one it cannot.
DEEP_OK = 40
TOO_DEEP = 5_000


class ChaosBaseException(BaseException):
    """A BaseException that is none of Python's own."""


class UnprintableError(Exception):
    """An error whose ``__str__`` and ``__repr__`` raise."""

    def __str__(self) -> str:
        raise RuntimeError("UnprintableError.__str__ refuses")

    def __repr__(self) -> str:
        raise RuntimeError("UnprintableError.__repr__ refuses")


class SurrogateError(Exception):
    """An error whose message holds lone surrogates (no UTF-8 encoding exists)."""

    def __str__(self) -> str:
        return "lone \ud800 surrogates \udfff here"


class HugeError(Exception):
    """An error with a 10 MB message."""


class Unprintable:
    """A returned value that is not JSON, and whose ``__str__`` and ``__repr__`` raise."""

    def __str__(self) -> str:
        raise RuntimeError("Unprintable.__str__ refuses")

    def __repr__(self) -> str:
        raise RuntimeError("Unprintable.__repr__ refuses")


BASE_EXCEPTIONS: tuple[type[BaseException], ...] = (
    KeyboardInterrupt,
    SystemExit,
    GeneratorExit,
    ChaosBaseException,
)
ORDINARY_ERRORS: tuple[type[Exception], ...] = (
    RuntimeError,
    ValueError,
    KeyError,
    ZeroDivisionError,
    OSError,
)

#: Behaviours and their weights. ``return_*`` return an odd value on their first attempt;
#: ``raise_*`` raise on their first ``failures`` attempts (None: on every attempt), then
#: return; ``sleep`` sleeps, then returns.
KINDS: dict[str, int] = {
    "return_none": 4,
    "return_nested": 4,
    "return_deep_ok": 2,
    "return_too_deep": 2,
    "return_big_string": 3,
    "return_unicode": 4,
    "return_lone_surrogate": 3,
    "return_object": 3,
    "return_set": 3,
    "return_nan": 3,
    "return_recursive": 3,
    "return_unprintable": 3,
    "return_tuple_keys": 2,
    "return_near_limit": 2,
    "return_over_limit": 2,
    "raise_base_exception": 12,
    "raise_unprintable": 4,
    "raise_surrogates": 4,
    "raise_huge_message": 2,
    "raise_permanent": 5,
    "raise_permanent_later": 3,
    "raise_flaky": 10,
    "raise_always": 5,
    "big_payload_raise_always": 2,
    "big_payload_raise_once": 2,
    "sleep": 15,
}

#: Kinds whose task payload is made near MAX_PAYLOAD_BYTES by the test (their retry copy,
#: keeping the last error in full, would be over it).
BIG_PAYLOAD_KINDS = frozenset({"big_payload_raise_always", "big_payload_raise_once"})

#: Kinds that return a value JSON cannot hold: the task is dead-lettered as permanent.
UNENCODABLE = frozenset(
    {
        "return_too_deep",
        "return_object",
        "return_set",
        "return_nan",
        "return_recursive",
        "return_unprintable",
        "return_tuple_keys",
    }
)


@dataclass(frozen=True)
class Plan:
    """What the chaos handler does with one task.

    ``failures``: attempts that raise before one returns (None: every attempt raises);
    ``number``: a kind-specific choice (which exception class, how many ms to sleep).
    """

    kind: str
    failures: int | None = 0
    number: int = 0


#: Per kind: the choices of ``failures`` and the range of ``number`` (kinds not named
#: here return on their first attempt, number 0).
_CHOICES: dict[str, tuple[list[int | None], int, int]] = {
    "raise_base_exception": ([1, 2, None], 0, len(BASE_EXCEPTIONS)),
    "raise_unprintable": ([1, 2, None], 0, 1),
    "raise_surrogates": ([1, 2, None], 0, 1),
    "raise_huge_message": ([1, None], 0, 1),
    "raise_flaky": ([1, 2, 3], 0, len(ORDINARY_ERRORS)),
    "raise_always": ([None], 0, len(ORDINARY_ERRORS)),
    "big_payload_raise_always": ([None], 0, 1),
    "big_payload_raise_once": ([1], 0, 1),
    "raise_permanent_later": ([1], 0, 1),
    "sleep": ([0, 0, 0, 1], 50, 400),
}


def plan(seed: int, task_id: str) -> Plan:
    """The behaviour of ``task_id`` under ``seed``: the same in every process."""
    # a str seed is hashed with SHA-512: the same plan in every process and Python run
    rng = random.Random(f"{seed}:{task_id}")  # noqa: S311 - a replayable plan, not a secret
    kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
    if kind not in _CHOICES:
        return Plan(kind)
    failures, low, high = _CHOICES[kind]
    return Plan(kind, rng.choice(failures), rng.randrange(low, high))


@dataclass(frozen=True)
class Expected:
    """The final outcome a plan leads to, as far as the contract fixes it.

    ``outcomes``: the allowed final outcomes (SUCCEEDED, DEAD); ``reason``: the
    dead-letter reason, None when not fixed; ``attempts``: how many attempts it takes,
    None when not fixed; ``value``: the stored result of a success, checked only when
    ``check_value``.
    """

    outcomes: frozenset[str]
    reason: str | None = None
    attempts: int | None = None
    value: Any = None
    check_value: bool = True


SUCCEEDED = "succeeded"
DEAD = "dead"

#: Kinds whose outcome does not depend on retries.
_FIXED: dict[str, Expected] = {
    # a returned value JSON cannot hold: dead-lettered as permanent at once
    **dict.fromkeys(UNENCODABLE, Expected(frozenset({DEAD}), "permanent", 1)),
    # not fixed by the contract: stored (escaped, or as is) or refused as permanent
    "return_lone_surrogate": Expected(frozenset({SUCCEEDED, DEAD}), None, 1, check_value=False),
    "return_over_limit": Expected(frozenset({SUCCEEDED, DEAD}), None, 1, check_value=False),
    "raise_permanent": Expected(frozenset({DEAD}), "permanent", 1),
    "raise_permanent_later": Expected(frozenset({DEAD}), "permanent", 2),
}


def expect(seed: int, task_id: str, limit: int, max_retries: int) -> Expected:
    """The final outcome of ``task_id`` under ``seed``, a payload limit of ``limit`` bytes
    and ``max_retries`` retries (MAX_RETRY_ATTEMPTS)."""
    p = plan(seed, task_id)
    if p.kind in _FIXED:
        return _FIXED[p.kind]
    if p.kind.startswith("return_"):
        return Expected(frozenset({SUCCEEDED}), None, 1, _VALUES[p.kind](limit))
    # The big-payload kinds too: a retry copy that the last error would take over the limit
    # keeps a shortened error instead (a task that fitted once always fits again).
    if p.failures is None or p.failures > max_retries:
        return Expected(frozenset({DEAD}), "exhausted", max_retries + 1)
    return Expected(frozenset({SUCCEEDED}), None, p.failures + 1, _succeeded_value(p))


def _nested(depth: int, leaf: Any) -> Any:
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def _recursive(_: int) -> list[Any]:
    loop: list[Any] = []
    loop.append(loop)
    return loop


#: The value each ``return_*`` kind returns, from the payload limit.
_VALUES: dict[str, Any] = {
    "return_none": lambda _: None,
    "return_nested": lambda _: {
        "level": {"list": [1, 2.5, True, None, {"deep": ["x", ""]}], "s": "t"},
        "n": -7,
    },
    "return_deep_ok": lambda _: _nested(DEEP_OK, "leaf"),
    "return_big_string": lambda _: "abc€" * 5_000,
    "return_unicode": lambda _: "héllo wörld ✓ 日本語 🎉 \u0000 nul \u2028 line",
    "return_near_limit": lambda limit: "n" * (limit - 2_000),
    "return_too_deep": lambda _: _nested(TOO_DEEP, []),
    "return_lone_surrogate": lambda _: "lone \ud800 surrogate",
    "return_object": lambda _: object(),
    "return_set": lambda _: {1, 2, 3},
    "return_nan": lambda _: {"x": float("nan")},
    "return_recursive": _recursive,
    "return_unprintable": lambda _: Unprintable(),
    "return_tuple_keys": lambda _: {(1, 2): "tuple key"},
    "return_over_limit": lambda limit: "o" * (limit * 2),
}


def _succeeded_value(p: Plan) -> Any:
    if p.kind == "sleep":
        return {"slept_ms": p.number}
    return {"kind": p.kind, "failures": p.failures}


#: The exception each raising kind raises on a failing attempt (others: an ordinary error).
_ERRORS: dict[str, Any] = {
    "raise_base_exception": lambda p: BASE_EXCEPTIONS[p.number]("chaos"),
    "raise_unprintable": lambda _: UnprintableError(),
    "raise_surrogates": lambda _: SurrogateError(),
    "raise_huge_message": lambda _: HugeError("E" * HUGE_MESSAGE_CHARS),
    "big_payload_raise_always": lambda _: RuntimeError("L" * LONG_ERROR_CHARS),
    "big_payload_raise_once": lambda _: RuntimeError("L" * LONG_ERROR_CHARS),
    "raise_permanent_later": lambda _: RuntimeError("not yet permanent"),
}


def _error(p: Plan) -> BaseException:
    """The exception ``p`` raises on a failing attempt."""
    if p.kind in _ERRORS:
        error: BaseException = _ERRORS[p.kind](p)
        return error
    return ORDINARY_ERRORS[p.number % len(ORDINARY_ERRORS)](f"chaos {p.kind}")


def act(p: Plan, attempt: int, limit: int) -> Any:
    """Carry out ``p`` for its ``attempt``-th attempt (0 first): return or raise."""
    if p.kind == "raise_permanent" or (p.kind == "raise_permanent_later" and attempt >= 1):
        raise PermanentTaskError(f"chaos {p.kind}")
    if p.kind.startswith("return_"):
        return _VALUES[p.kind](limit)
    if p.kind == "sleep":
        time.sleep(p.number / 1000)
    if p.failures is None or attempt < p.failures:
        raise _error(p)
    return _succeeded_value(p)


def handle(message: TaskMessage) -> Any:
    """The chaos handler: behave as :func:`plan` says for this task and attempt."""
    record("start", message)
    seed = int(message.config["chaos_seed"])
    limit = int(message.config["limit"])
    return act(plan(seed, message.task_id), message.retry_count, limit)


def gated(message: TaskMessage) -> dict[str, Any]:
    """Run until the file ``config["gate"]`` exists (none given: return at once)."""
    record("start", message)
    gate = message.config.get("gate")
    if gate:
        deadline = time.monotonic() + GATE_TIMEOUT_S
        while not Path(gate).exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"gate {gate} never opened")
            time.sleep(0.01)
    record("done", message)
    return {"pid": os.getpid(), "delivery_count": message.delivery_count}
