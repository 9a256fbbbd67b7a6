"""``python -m bench [--quick] [--runs N] [--systems a,b,...] [--output PATH]``, or
``python -m bench soak [--minutes M]`` (a long steady run, see bench/soak.py), or
``python -m bench cluster [--tasks N]`` (queues on one or three cluster masters, see
bench/cluster.py).

Prints the table; writes the results JSON to ``bench/results/<date>.json`` for a full run
(a ``--quick`` run writes a file only when ``--output`` is given). Exit status: 0 when every
installed system produced every figure, 1 when a workload failed, 2 on a usage error or
(full run only) a missing peer.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench.config import ALL_SYSTEMS, FULL, QUICK
from bench.report import default_path, read_json, render, write_json
from bench.runner import load_specs, run_benchmark

INSTALL_HINT = 'the full benchmark needs its peers: pip install "dramatiq[redis]" huey rq hiredis'


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="tiny counts, 1 run: proves the harness works"
    )
    parser.add_argument(
        "--runs", type=int, help="repetitions; each figure is their median (default 3)"
    )
    parser.add_argument(
        "--systems", default=",".join(ALL_SYSTEMS), help="comma-separated, from: %(default)s"
    )
    parser.add_argument("--output", type=Path, help="where to write the results JSON")
    parser.add_argument(
        "--show", type=Path, metavar="JSON", help="print the table of a results file, run nothing"
    )
    parser.add_argument(
        "--log-dir", type=Path, help="keep Redis and worker logs here (default: a temp dir)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (or ``soak``, see bench/soak.py); return the process exit status."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["soak"]:
        from bench import soak  # noqa: PLC0415 - only the soak needs it

        return soak.main(arguments[1:])
    if arguments[:1] == ["cluster"]:
        from bench import cluster  # noqa: PLC0415 - only the cluster run needs it

        return cluster.main(arguments[1:])
    parser = _parser()
    args = parser.parse_args(arguments)
    if args.show is not None:
        print(render(read_json(args.show)))
        return 0
    systems = [name.strip() for name in args.systems.split(",") if name.strip()]
    unknown = sorted(set(systems) - set(ALL_SYSTEMS))
    if unknown or not systems:
        parser.error(f"unknown systems {unknown}; choose from {','.join(ALL_SYSTEMS)}")
    config = QUICK if args.quick else FULL
    if args.runs is not None:
        if args.runs < 1:
            parser.error("--runs must be at least 1")
        config = dataclasses.replace(config, runs=args.runs)
    if not args.quick:
        _, missing = load_specs(systems)
        if missing:
            print("\n".join([*missing.values(), INSTALL_HINT]), file=sys.stderr)
            return 2
    try:
        if args.log_dir is not None:
            args.log_dir.mkdir(parents=True, exist_ok=True)
            results = run_benchmark(config, systems, args.log_dir)
        else:
            with tempfile.TemporaryDirectory(prefix="semibot-bench-") as workdir:
                results = run_benchmark(config, systems, Path(workdir))
    except KeyboardInterrupt:
        print("interrupted; every server and worker was stopped", file=sys.stderr)
        return 130
    print(render(results))
    output = (
        args.output if args.output is not None else (None if args.quick else default_path(results))
    )
    if output is not None:
        print(f"\nresults written to {write_json(results, output)}")
    failed = [
        name
        for name, entry in results["systems"].items()
        if entry["status"] in ("failed", "partial")
    ]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
