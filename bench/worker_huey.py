"""``python -m bench.worker_huey``: one Huey consumer with N worker threads, until SIGTERM.

Huey's consumer installs its own handlers: SIGTERM stops at once, SIGINT gracefully.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from bench import system_huey, worker_common


def main(argv: Sequence[str] | None = None) -> int:
    """Run the Huey consumer until signalled."""
    args = worker_common.prepare(argv, __doc__ or "")
    app = system_huey.build(args.redis_url)
    consumer = app.huey.create_consumer(
        workers=args.concurrency, worker_type="thread", periodic=False
    )
    consumer.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
