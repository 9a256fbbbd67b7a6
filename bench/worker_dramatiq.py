"""``python -m bench.worker_dramatiq``: one ``dramatiq.Worker`` with N threads, until SIGTERM."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import dramatiq

from bench import system_dramatiq, worker_common


def main(argv: Sequence[str] | None = None) -> int:
    """Run the Dramatiq worker until signalled."""
    args = worker_common.prepare(argv, __doc__ or "")
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
