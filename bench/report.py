"""The results table (Markdown, readable in a terminal too) and the JSON results file."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.config import ALL_SYSTEMS

#: Where ``python -m bench`` writes a full run's results by default.
RESULTS_DIR = Path(__file__).resolve().parent / "results"

OURS = "semibot"


@dataclass(frozen=True)
class Metric:
    """One row of the table."""

    key: str
    label: str
    unit: str
    higher_is_better: bool


METRICS: tuple[Metric, ...] = (
    Metric("enqueue_per_s", "enqueue, one at a time", "tasks/s", True),
    Metric("enqueue_many_per_s", "enqueue in batches (enqueue_many)", "tasks/s", True),
    Metric("noop_per_s", "no-op processed", "tasks/s", True),
    Metric("noop_p2_per_s", "no-op processed, 2 processes", "tasks/s", True),
    Metric("noop_bare_per_s", "no-op processed, no INCR (floor only)", "tasks/s", True),
    Metric("sleep_s", "sleep-bound wall time", "s", False),
    Metric("sleep_vs_ideal", "sleep-bound / ideal", "x", False),
    Metric("start_p50_ms", "enqueue->start p50", "ms", False),
    Metric("start_p99_ms", "enqueue->start p99", "ms", False),
    Metric("result_p50_ms", "enqueue->result p50", "ms", False),
    Metric("result_p99_ms", "enqueue->result p99", "ms", False),
    Metric("wakeup_p50_ms", "idle wake-up p50", "ms", False),
    Metric("wakeup_p99_ms", "idle wake-up p99", "ms", False),
    Metric("rss_mib", "worker peak RSS", "MiB", False),
)


#: Below this, a figure is shown with two decimals; below ten times it, with one; else none.
_TWO_DECIMALS_BELOW = 10.0


def _number(value: float) -> str:
    magnitude = abs(value)
    if magnitude < _TWO_DECIMALS_BELOW:
        return f"{value:.2f}"
    if magnitude < _TWO_DECIMALS_BELOW * 10:
        return f"{value:.1f}"
    return f"{value:,.0f}"


def _cell(summary: Mapping[str, Any] | None) -> str:
    if summary is None:
        return "-"
    median = _number(summary["median"])
    if summary["min"] == summary["max"]:
        return median
    return f"{median} ({_number(summary['min'])}-{_number(summary['max'])})"


def ratios(results: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """``{metric: {"semibot/<other>": ours_median / other_median}}`` where both exist."""
    systems = results["systems"]
    ours = systems.get(OURS, {}).get("metrics", {})
    table: dict[str, dict[str, float]] = {}
    for metric in METRICS:
        if metric.key not in ours:
            continue
        for name, entry in systems.items():
            theirs = entry.get("metrics", {}).get(metric.key)
            if name == OURS or theirs is None or theirs["median"] == 0:
                continue
            table.setdefault(metric.key, {})[f"{OURS}/{name}"] = (
                ours[metric.key]["median"] / theirs["median"]
            )
    return table


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return (
            "| "
            + " | ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True))
            + " |"
        )

    rule = "|" + "|".join("-" * (width + 2) for width in widths) + "|"
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


def render(results: Mapping[str, Any]) -> str:
    """The figures table, the ratios table and one line per system."""
    systems = [name for name in ALL_SYSTEMS if name in results["systems"]]
    ratio_table = ratios(results)
    ratio_columns = [f"{OURS}/{name}" for name in systems if name != OURS]
    header = ["figure", "unit", "better", *systems]
    rows, ratio_rows = [], []
    for metric in METRICS:
        cells = [results["systems"][name].get("metrics", {}).get(metric.key) for name in systems]
        if all(cell is None for cell in cells):
            continue
        better = "higher" if metric.higher_is_better else "lower"
        rows.append([metric.label, metric.unit, better, *(_cell(cell) for cell in cells)])
        if metric.key in ratio_table:
            found = ratio_table[metric.key]
            ratio_rows.append(
                [metric.label, better, *(_ratio(found.get(col)) for col in ratio_columns)]
            )
    parts = [_markdown(header, rows)]
    if ratio_rows:
        parts.append(_markdown(["ours/peer (medians)", "better", *ratio_columns], ratio_rows))
    parts.append("\n".join(_system_line(name, results["systems"][name]) for name in systems))
    return "\n\n".join(parts)


#: Ratios below this are shown with two significant digits instead of two decimals.
_SMALL_RATIO = 0.1


def _ratio(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2g}x" if value < _SMALL_RATIO else f"{value:.2f}x"


def _system_line(name: str, entry: Mapping[str, Any]) -> str:
    if entry["status"] == "not installed":
        return f"- {name}: not installed ({entry.get('detail', '')})"
    line = f"- {name} {entry.get('version') or ''}: {entry['shape']}"
    if "result_mechanism" in entry:
        line += f"; results: {entry['result_mechanism']}"
    if entry["status"] != "ok":
        line += f"; {entry['status'].upper()}: " + " | ".join(entry.get("errors", []))
    return line


def read_json(path: Path) -> dict[str, Any]:
    """Read a results document written by :func:`write_json`."""
    document: dict[str, Any] = json.loads(path.read_text())
    return document


def write_json(results: Mapping[str, Any], path: Path) -> Path:
    """Write the results document (with its ratios) to ``path`` and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {**results, "ratios": ratios(results)}
    path.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n")
    return path


def default_path(results: Mapping[str, Any]) -> Path:
    """``bench/results/<date>.json``."""
    return RESULTS_DIR / f"{results['date']}.json"
