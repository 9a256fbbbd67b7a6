"""``python -m semibot_queue``: the command line."""

from __future__ import annotations

import sys

from semibot_queue.cli import main

if __name__ == "__main__":
    sys.exit(main())
