"""``python -m semibot_queue``: the command line."""

from __future__ import annotations

from semibot_queue.cli import run

if __name__ == "__main__":
    run()
