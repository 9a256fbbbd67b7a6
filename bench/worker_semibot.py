"""``python -m bench.worker_semibot``: one ``TaskConsumer`` with N slots, until SIGTERM.

``TaskConsumer.start()`` blocks, so it runs in a named thread; SIGTERM/SIGINT only set an
event, and the main thread then calls ``stop()`` and joins. With ``--processes N`` (N > 1)
it is ``semibot_queue.run_workers`` instead: N worker processes under one supervisor, which
handles the signals itself.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Sequence

from bench import system_semibot, worker_common
from bench.config import QUEUE_NAME
from semibot_queue import TaskConsumer, run_workers

#: How long ``stop()`` plus the join may take before the process gives up on them.
STOP_TIMEOUT_S = 10.0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the semibot_queue consumer until signalled."""
    args = worker_common.prepare(argv, __doc__ or "")
    if args.processes > 1:
        return run_workers(
            "bench.system_semibot:handle",
            processes=args.processes,
            redis_url=args.redis_url,
            queue_name=QUEUE_NAME,
            concurrency=args.concurrency,
            settings=system_semibot.bench_settings(),
            worker_args=["--log-level", "WARNING"],
        )
    consumer = TaskConsumer(
        redis_url=args.redis_url,
        queue_name=QUEUE_NAME,
        handler=system_semibot.handle,
        max_concurrent=args.concurrency,
        settings=system_semibot.bench_settings(),
    )
    runner = threading.Thread(target=consumer.start, name="bench-semibot-consumer", daemon=True)
    runner.start()
    try:
        worker_common.wait_for_signal(alive=runner.is_alive)
        died_early = not runner.is_alive()
    finally:
        consumer.stop(timeout=STOP_TIMEOUT_S)
        runner.join(STOP_TIMEOUT_S)
    return 1 if died_early or runner.is_alive() else 0


if __name__ == "__main__":
    sys.exit(main())
