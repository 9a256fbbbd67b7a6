"""Aligned tables for the command line's human output."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any, TextIO

from semibot_queue.models import DeadLetterRecord


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], out: TextIO) -> None:
    """Print ``rows`` under ``headers``, each column as wide as its widest cell."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip(),
            file=out,
        )


def print_stats(snapshot: dict[str, Any], out: TextIO) -> None:
    """The ``stats`` command's summary and worker table."""
    table(
        ["queue", "pending", "scheduled", "in_flight", "dead_letters", "workers", "dead_workers"],
        [
            [
                snapshot["queue"],
                snapshot["pending"],
                snapshot["scheduled"],
                snapshot["in_flight"],
                snapshot["dead_letters"],
                len(snapshot["workers"]),
                snapshot["dead_workers"],
            ]
        ],
        out,
    )
    if snapshot["workers"]:
        print(file=out)
        table(
            ["worker", "state", "in_flight", "heartbeat_age_s"],
            [
                [w["worker_id"], w["state"], w["in_flight"], f"{w['heartbeat_age_s']:.1f}"]
                for w in snapshot["workers"]
            ],
            out,
        )


def _when(stamp: float | None) -> str:
    if not stamp:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(stamp))


def print_dead_letters(records: Sequence[DeadLetterRecord], total: int, out: TextIO) -> None:
    """The ``dlq list`` table, newest first."""
    table(
        ["task_id", "reason", "error", "attempts", "failed_at (UTC)"],
        [
            [r.task_id, r.reason, f"{r.error_type}: {r.error}"[:60], r.attempts, _when(r.failed_at)]
            for r in records
        ],
        out,
    )
    print(f"({len(records)} shown of {total})", file=out)


def print_record(record: dict[str, Any], out: TextIO) -> None:
    """One dead letter, field by field (the ``dlq show`` output)."""
    width = max(len(key) for key in record)
    for key, value in record.items():
        if key == "traceback" and value:
            print(f"{key.ljust(width)}  |", file=out)
            for line in str(value).rstrip().splitlines():
                print(f"{''.ljust(width)}  | {line}", file=out)
            continue
        shown = json.dumps(value) if isinstance(value, (dict, list)) else value
        print(f"{key.ljust(width)}  {shown}", file=out)
