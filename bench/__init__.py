"""Benchmark harness: semibot_queue against Dramatiq, Huey, RQ and a bare redis-py floor.

Run it with ``python -m bench`` (see ``docs/BENCHMARKS.md``). Every system runs against the
same throw-away ``redis-server`` in the same run; each worker is one separate process with
8 threads of concurrency (RQ has no threads: one ``SimpleWorker`` process).
"""
