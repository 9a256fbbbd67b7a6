"""The benchmark harness works: a --quick run measures every figure for us and the floor.

It proves the harness, not the speed: no figure is compared with any bound here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

FIGURES = {
    "rss_mib",
    "enqueue_per_s",
    "enqueue_many_per_s",
    "noop_per_s",
    "noop_p2_per_s",
    "sleep_s",
    "sleep_vs_ideal",
    "start_p50_ms",
    "start_p99_ms",
    "result_p50_ms",
    "result_p99_ms",
    "wakeup_p50_ms",
    "wakeup_p99_ms",
}


def test_a_quick_run_measures_every_figure(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from bench.__main__ import main  # noqa: PLC0415 - bench lives beside the package

    output = tmp_path / "quick.json"
    status = main(["--quick", "--systems", "semibot,floor", "--output", str(output)])
    assert status == 0
    report = json.loads(output.read_text())
    ours = report["systems"]["semibot"]
    assert ours["status"] == "ok", ours.get("errors")
    missing = FIGURES - set(ours["metrics"])
    assert not missing, f"figures not measured: {sorted(missing)}"
    for name in FIGURES:
        figure = ours["metrics"][name]
        assert figure["min"] <= figure["median"] <= figure["max"], name
        assert figure["median"] > 0, name
    assert report["systems"]["floor"]["status"] == "ok"
    assert sys.modules["bench.__main__"].__file__.startswith(str(ROOT))
