"""Every default of semibot_queue, in one place.

Each value carries a ``#:`` comment with its unit and meaning. Nothing here reads
the environment: :class:`semibot_queue.settings.QueueSettings` does that on request.
"""

from __future__ import annotations

# --- names -----------------------------------------------------------------

#: Name of the queue when none is given; every key of a queue carries it as a hash tag.
DEFAULT_QUEUE_NAME = "agent:tasks"

#: Prefix of result channels; a result is published on ``<prefix>:<session_id>``.
RESULT_CHANNEL_PREFIX = "agent:results"

#: Suffix of a queue's dead-letter store (queue ``agent:tasks``: ``{agent:tasks}:dead``).
DEAD_LETTER_QUEUE = "dead"

# --- consumer --------------------------------------------------------------

#: Handlers one worker runs at once (thread pool size and in-flight limit).
MAX_CONCURRENT_TASKS = 10

#: Seconds one blocking pop waits for a task (``stop()`` cuts it short at once).
QUEUE_POLL_TIMEOUT = 30.0

#: Seconds the fetch loop waits for a free slot before it looks at its stop flag again.
STOP_POLL_SLICE = 1.0

#: Seconds between two "all slots busy" warnings of one worker.
BUSY_WARNING_INTERVAL = 10.0

# --- producer and results --------------------------------------------------

#: Seconds ``wait_for_result`` waits by default.
RESULT_WAIT_TIMEOUT = 300.0

#: Seconds one pub/sub read waits before the waiter re-checks its deadline.
PUBSUB_MESSAGE_TIMEOUT = 1.0

#: Seconds a stored result stays readable after the task finished.
RESULT_TTL = 3600

#: Task ids whose session a producer remembers, so a waiter listens on one channel only.
MAX_TRACKED_SESSIONS = 10_000

# --- backpressure ----------------------------------------------------------

#: Pending tasks beyond which ``enqueue`` raises QueueFullError.
MAX_QUEUE_LENGTH = 10_000

#: Pending length whose crossing (from below) a producer logs as a warning.
QUEUE_LENGTH_WARNING_THRESHOLD = 5_000

#: Seconds between two "queue length crossed the threshold" warnings of one producer.
QUEUE_LENGTH_WARNING_INTERVAL = 60.0

#: Bytes of one encoded task beyond which ``enqueue`` refuses it.
MAX_PAYLOAD_BYTES = 1_048_576

# --- connection failures ---------------------------------------------------

#: Seconds before the first reconnect attempt; doubles on each consecutive failure.
ERROR_RETRY_DELAY = 1.0

#: Seconds a reconnect delay grows to at most.
MAX_RECONNECT_DELAY = 60.0

#: Consecutive connection failures after which QueueConnectionError is raised.
MAX_RECONNECT_ATTEMPTS = 10

#: Consecutive connection failures after which a one-shot command (not a worker) gives up.
CLI_RECONNECT_ATTEMPTS = 3

#: Largest ``--limit`` or ``--offset`` the CLI takes: their sum must stay a Redis integer.
MAX_RANGE = 2**62

#: Most seconds a command-line option takes (--watch, --wait, --delay): a year. More is
#: surely a mistake, and would overflow the platform's timers (time.sleep of 1e10 s).
MAX_CLI_SECONDS = 366 * 24 * 3600

#: Seconds a connection may wait for a reply (blocking calls stay below it).
SOCKET_TIMEOUT = 5.0

#: Connections one client object (producer, consumer, dead-letter queue) opens at most;
#: callers beyond it wait for a free one instead of failing.
MAX_CONNECTIONS = 50

#: Connections the script runner keeps between calls instead of giving them back to the
#: pool (a hot thread then skips the pool's ~20 us of bookkeeping); never more than a
#: quarter of the pool, so other callers always find room.
IDLE_SCRIPT_CONNECTIONS = 2

#: Seconds the blocking pop's connection waits for a reply beyond QUEUE_POLL_TIMEOUT, so a
#: pop that waited its full time is never mistaken for a dead link.
BLOCKING_MARGIN = 2.0

#: Replicas that must confirm each enqueue and outcome write (WAIT); 0 does not wait.
MIN_REPLICAS_TO_ACK = 0

#: Seconds a write waits for MIN_REPLICAS_TO_ACK replicas before it counts as failed.
REPLICA_ACK_TIMEOUT = 1.0

#: Seconds a probe connection waits for a TLS server's alert after a new TLS link failed
#: with an EOF (a refused client certificate looks like that under TLS 1.3).
TLS_PROBE_TIMEOUT = 1.0

#: MOVED or ASK replies one script call follows before it reports the error (a cluster
#: whose slot map keeps changing); each says the script did not run.
CLUSTER_REDIRECTS = 5

# --- retries and dead letters ----------------------------------------------

#: Retries after the first attempt before a failing task is dead-lettered.
MAX_RETRY_ATTEMPTS = 3

#: Seconds a handler may run before TaskTimeoutError is raised in its thread; 0 = no limit.
TASK_TIME_LIMIT = 0.0

#: The error text of a cancelled task's result.
CANCELLED_ERROR = "cancelled"

#: Seconds a task id stays reserved after enqueue (a second enqueue of it is a duplicate)
#: unless the task finishes, or is cleared or purged, sooner.
IDEMPOTENCY_TTL = 600

#: Characters of an error message (and of a traceback) kept in a result or dead letter.
MAX_ERROR_CHARS = 4_000

#: Levels of nesting a JSON value (payload, config, result) may have at most.
MAX_JSON_DEPTH = 64

#: Seconds before the first retry; doubles on each further retry.
RETRY_BASE_DELAY = 1.0

#: Seconds a retry delay grows to at most.
RETRY_MAX_DELAY = 300.0

#: Fraction of a retry delay added or removed at random, so retries do not stampede.
RETRY_JITTER = 0.1

#: Deliveries lost to dead workers after which a task is dead-lettered as poison.
MAX_DELIVERY_ATTEMPTS = 3

#: Dead-letter records kept; the oldest is evicted (logged and counted) beyond it.
DEAD_LETTER_MAX_LENGTH = 10_000

#: Seconds a dead-letter record is kept before it is evicted (logged and counted).
DEAD_LETTER_TTL = 7 * 24 * 3600

#: Joins a task id and a number into a dead-letter record id, ``<task id>#<n>``; task ids
#: cannot contain it. lib_dead_letter.lua spells it too.
DEAD_LETTER_ID_SEPARATOR = "#"

# --- workers ---------------------------------------------------------------

#: Seconds between two heartbeats of a worker.
HEARTBEAT_INTERVAL = 2.0

#: Seconds without a heartbeat after which a worker is dead and its tasks are recovered.
WORKER_DEAD_AFTER = 10.0

#: Seconds a stopping worker waits for in-flight tasks before returning them to pending.
SHUTDOWN_TIMEOUT = 30.0

#: Tasks moved by one call of the promote or recover scripts, to keep each script short.
MAINTENANCE_BATCH = 100

#: Characters a queue name, worker id or task id may have at most.
MAX_NAME_LENGTH = 200

#: Prefix of the environment variables that override settings: ``SEMIBOT_QUEUE_<NAME>``.
ENV_PREFIX = "SEMIBOT_QUEUE_"

# --- metrics ---------------------------------------------------------------

#: Histogram buckets of task duration in seconds: agent runs take 5 ms to 10 minutes.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

#: Host the worker's ``/metrics`` endpoint binds to unless told otherwise.
METRICS_HOST = "127.0.0.1"

#: Heartbeats between two scans for in-flight lists that no registered worker owns.
ADOPT_EVERY = 10

#: Seconds the demo's blocking pop waits (its embedded fakeredis cannot be interrupted).
DEMO_POLL_TIMEOUT = 0.5

#: Seconds between two runs of the watcher's loop (promotes due retries each time).
WATCHER_TICK = 0.25

#: URL of Redis when neither ``--redis-url`` nor ``$REDIS_URL`` is given.
DEFAULT_REDIS_URL = "redis://localhost:6379/0"

#: Outcomes one round trip of the recorder records at most.
MAX_ACK_BATCH = 64

# --- supervisor (worker --processes N) ----------------------------------------

#: Seconds before a worker process that died is started again; doubles with each death
#: of that process within RESTART_WINDOW.
RESTART_BACKOFF_BASE = 0.5

#: Seconds a restart delay grows to at most.
RESTART_BACKOFF_CAP = 30.0

#: Seconds over which the deaths of one worker process count towards giving up.
RESTART_WINDOW = 60.0

#: Restarts of one worker process within RESTART_WINDOW; one more death and the
#: supervisor gives up (exit 1) instead of restarting it in a loop.
MAX_RESTARTS_IN_WINDOW = 5

#: Seconds between two looks of the supervisor at its worker processes and signals.
SUPERVISOR_POLL_INTERVAL = 0.05

#: Seconds a stopping worker process gets beyond SHUTDOWN_TIMEOUT before it is killed.
SUPERVISOR_KILL_MARGIN = 10.0

#: Most worker processes one supervisor runs (``--processes``): more is surely a typo,
#: and each process is a whole interpreter.
MAX_WORKER_PROCESSES = 256

#: Variable naming the supervisor's pid in its worker processes' environment: a worker
#: whose supervisor is gone (SIGKILLed, say) stops by itself instead of serving forever.
SUPERVISOR_PID_ENV = "SEMIBOT_SUPERVISOR_PID"

#: Seconds between a supervised worker's checks that its supervisor still runs.
SUPERVISOR_CHECK_INTERVAL = 0.5

#: Prefix of the temporary directory of the worker processes' metrics files.
METRICS_DIR_PREFIX = "semibot-queue-metrics-"
