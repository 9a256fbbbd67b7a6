"""``python -m bench.worker_rq``: one RQ ``SimpleWorker`` (no threads), until SIGTERM.

RQ installs its own handlers (a first SIGTERM or SIGINT is a warm shutdown).
``--concurrency`` is accepted and ignored: RQ runs one job at a time per worker process.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from rq import SimpleWorker

from bench import system_rq, worker_common


def main(argv: Sequence[str] | None = None) -> int:
    """Run the RQ worker until signalled."""
    args = worker_common.prepare(argv, __doc__ or "")
    queue = system_rq.make_queue(args.redis_url)
    worker = SimpleWorker([queue], connection=queue.connection)
    worker.work(logging_level="WARNING", with_scheduler=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
