"""``python -m bench.worker_dramatiq``: one ``dramatiq.Worker`` with N threads, until SIGTERM.

With ``--processes N`` (N > 1) this process becomes Dramatiq's own command line
(``dramatiq bench.dramatiq_app --processes N --threads T``), which runs and stops them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import dramatiq

from bench import system_dramatiq, worker_common


def main(argv: Sequence[str] | None = None) -> int:
    """Run the Dramatiq worker until signalled."""
    args = worker_common.prepare(argv, __doc__ or "")
    if args.processes > 1:
        command = [sys.executable, "-m", "dramatiq", "bench.dramatiq_app"]
        command += ["--processes", str(args.processes), "--threads", str(args.concurrency)]
        os.execv(sys.executable, command)  # noqa: S606 - Dramatiq's CLI, same interpreter
    app = system_dramatiq.build(args.redis_url)
    worker = dramatiq.Worker(app.broker, worker_threads=args.concurrency)
    worker.start()
    try:
        worker_common.wait_for_signal()
    finally:
        worker.stop()
        app.broker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
