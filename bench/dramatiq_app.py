"""The module Dramatiq's own command line loads for ``--processes N``: the benchmark's
broker (``BENCH_REDIS_URL``) set as the global one, with its actors declared."""

from __future__ import annotations

import logging
import os

import dramatiq

from bench import system_dramatiq, tasks

# as bench.worker_common does for one process: per-task lines would measure the terminal
logging.getLogger("dramatiq").setLevel(logging.WARNING)
APP = system_dramatiq.build(os.environ[tasks.REDIS_URL_ENV])
dramatiq.set_broker(APP.broker)
