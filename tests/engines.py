"""Distributed Redis engines of the tests' own: a Cluster, a Sentinel group, a TLS server.

Like ``redis_server.py``, each engine runs real ``redis-server`` processes on free loopback
ports in a directory it is given, waits for readiness against a deadline, fails with the tail
of every process's log, and kills all its processes when it stops. Measured facts about these
engines are in /work/shared/ENGINES.md. The pytest fixtures at the end (``cluster1``,
``cluster3``, ``sentinels``, ``tls_redis``) give a test a fresh, started engine.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import redis
import trustme
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.retry import Retry

from redis_server import HOST, STOP_TIMEOUT_S, find_redis_server, free_port

START_ATTEMPTS = 3  #: fresh ports to try when a process exits at start (port taken meanwhile)
POLL_INTERVAL_S = 0.05  #: pause between two readiness checks
MIGRATE_TIMEOUT_MS = 5000
SLOTS = 16384
ADMIN_PASSWORD = "adminpw"  # noqa: S105 - a throwaway server's password, in its ACL file
#: ACL rules of TlsRedis's ``queue`` user: a first guess at least privilege for queue
#: ``agent:tasks``. What the queue really needs is decided by the tests that use it.
DEFAULT_QUEUE_USER_RULES = (
    "on >queuepw ~agent:tasks ~{agent:tasks}:* &agent:results:* -@all "
    "+evalsha +eval +script|load +blmove +lrange +llen +zcard +get +time +ping +publish "
    "+subscribe +unsubscribe +psubscribe +punsubscribe +hello +client|setname +config|get "
    "+info +select +exists +type +hget +hlen +zrange +zrangebyscore +scan"
)
# what a not-yet-ready engine answers: refused connections, LOADING, CLUSTERDOWN, NOREPLICAS
_NOT_READY = (redis.ConnectionError, redis.TimeoutError, redis.ResponseError)


class EngineError(RuntimeError):
    """An engine did not start, or did not reach the state it was waiting for."""


class EngineExitedError(EngineError):
    """A process of the engine exited while starting (a taken port, a bad option)."""


def free_cluster_port() -> int:
    """A loopback port P where both P and its cluster bus port P+10000 were free a moment ago."""
    for _ in range(200):
        with socket.socket() as sock:
            sock.bind((HOST, 0))
            port: int = sock.getsockname()[1]
            if port + 10000 > 65535:
                continue
            # P is still held here, so the OS cannot hand it out while we try the bus port
            with socket.socket() as bus:
                try:
                    bus.bind((HOST, port + 10000))
                except OSError:
                    continue
            return port
    raise EngineError("found no free loopback port P with P+10000 free too")


def _distinct_ports(count: int, pick: Callable[[], int]) -> list[int]:
    # a picked port is released at once, so the OS may hand the same one out twice
    ports: list[int] = []
    while len(ports) < count:
        if (port := pick()) not in ports:
            ports.append(port)
    return ports


def _client(port: int, **kwargs: Any) -> redis.Redis:
    # no retries inside redis-py (its default is 10 with Redis(host=...)): our loops are the
    # retry, bounded by deadlines, and a test must see the first failure
    kwargs.setdefault("socket_timeout", 5.0)
    return redis.Redis(HOST, port, retry=Retry(NoBackoff(), 0), **kwargs)


class _Process:
    """One redis-server (data node or sentinel) writing to its own log file."""

    def __init__(self, argv: list[str], log_path: Path) -> None:
        self.log_path = log_path
        with log_path.open("ab") as log:
            self.popen = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        self.popen.kill()
        self.popen.wait()

    def stop(self) -> None:
        self.popen.terminate()
        try:
            self.popen.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()

    def describe(self, lines: int = 15) -> str:
        code = self.popen.poll()
        state = "running" if code is None else f"exited with {code}"
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        tail = "\n".join(text.splitlines()[-lines:])
        return f"--- {self.log_path.name} ({state}):\n{tail}"


class _Engine:
    """Processes started together and stopped together, whose logs explain any failure."""

    ready_timeout = 15.0  #: seconds each readiness wait of :meth:`start` may take

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._processes: dict[int, _Process] = {}  # by port
        self._binary = find_redis_server()

    def start(self) -> None:
        """Start every process and wait until the engine is ready; on failure none is left."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for attempt in range(START_ATTEMPTS):
            try:
                self._start()
            except EngineExitedError:
                self.kill_all()
                if attempt == START_ATTEMPTS - 1:
                    raise
                # most likely another process took a port: _start picks new ones
            except BaseException:
                self.kill_all()
                raise
            else:
                return

    def stop(self) -> None:
        """Terminate every process and wait for it (SIGKILL after a grace period)."""
        for process in self._processes.values():
            process.stop()
        self._processes.clear()

    def kill_all(self) -> None:
        """SIGKILL every process, as a crash of every machine would, and reap them."""
        for process in self._processes.values():
            process.kill()
        self._processes.clear()

    def __enter__(self) -> Any:  # Any: each subclass returns itself
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def _start(self) -> None:
        """Pick ports, start the processes, wait until ready (EngineExitedError: try again)."""
        raise NotImplementedError

    def _spawn(self, port: int, name: str, argv: list[str]) -> None:
        self._processes[port] = _Process(argv, self.directory / f"{name}-{port}.log")

    def _data_argv(self, port: int, *extra: str, directory: Path | None = None) -> list[str]:
        return [
            self._binary, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly",
            "no", "--dir", str(directory or self.directory), "--daemonize", "no", *extra,
        ]  # fmt: skip

    def _wait(self, what: str, check: Callable[[], bool], timeout: float | None = None) -> None:
        timeout = self.ready_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while True:
            if any(process.popen.poll() is not None for process in self._processes.values()):
                raise EngineExitedError(
                    f"a process exited while waiting for {what}:\n{self._logs()}"
                )
            try:
                if check():
                    return
                last_error = None
            except _NOT_READY as error:
                last_error = error
            if time.monotonic() >= deadline:
                raise EngineError(
                    f"{what}: not reached within {timeout} s (last error: "
                    f"{last_error!r}):\n{self._logs()}"
                )
            time.sleep(POLL_INTERVAL_S)

    def _logs(self) -> str:
        return "\n".join(process.describe() for process in self._processes.values())

    def _ping(self, port: int, **kwargs: Any) -> bool:
        with _client(port, socket_timeout=1.0, **kwargs) as client:
            return bool(client.ping())


class RedisCluster(_Engine):
    """``masters`` cluster-enabled redis-servers with every slot assigned, no replicas."""

    def __init__(self, directory: Path, *, masters: int = 3, extra_args: Sequence[str] = ()):
        super().__init__(directory)
        self.masters = masters
        self.extra_args = tuple(extra_args)
        self.ports: list[int] = []  #: one per master, chosen by start()

    @property
    def url(self) -> str:
        """``redis+cluster://`` URL naming every node."""
        return "redis+cluster://" + ",".join(f"{HOST}:{port}" for port in self.ports)

    def node_client(self, port: int) -> redis.Redis:
        """A plain (not cluster-aware) client of one node, without retries; caller closes it."""
        return _client(port)

    def node_id(self, port: int) -> str:
        """The 40-character cluster node id of the node on ``port``."""
        with self.node_client(port) as client:
            return bytes(client.execute_command("CLUSTER", "MYID")).decode()

    @staticmethod
    def slot_of(key: bytes | str) -> int:
        """The hash slot of ``key`` (hash tags honoured)."""
        return key_slot(key.encode() if isinstance(key, str) else key)

    def owner_port(self, slot: int) -> int:
        """Port of the master serving ``slot``, as the first node's slot map says."""
        for start, end, port in self._slot_map(self.ports[0]):
            if start <= slot <= end:
                return port
        raise EngineError(f"slot {slot} is not assigned to any node")

    def moved_to(self, port: int, key: str) -> int | None:
        """The port a GET of ``key`` on the node at ``port`` is MOVED to, or None if served."""
        with self.node_client(port) as client:
            try:
                client.get(key)
            except redis.exceptions.MovedError as error:
                return int(error.port)
        return None

    def migrate_slot(
        self,
        slot: int,
        to_port: int,
        *,
        batch: int = 10,
        between_batches: Callable[[], None] | None = None,
    ) -> None:
        """Move ``slot`` and its keys to the node on ``to_port``, ``batch`` keys per MIGRATE.

        ``between_batches()`` runs after each batch, while the slot's keys are split between
        the two nodes (clients get ASK, and TRYAGAIN for multi-key commands).
        """
        source = self.owner_port(slot)
        if source == to_port:
            raise ValueError(f"slot {slot} is already served by port {to_port}")
        target_id = self.node_id(to_port)
        with self.node_client(to_port) as target, self.node_client(source) as src:
            target.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", self.node_id(source))
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
            while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, batch):
                src.execute_command(
                    "MIGRATE", HOST, to_port, "", 0, MIGRATE_TIMEOUT_MS, "KEYS", *keys
                )
                if between_batches is not None:
                    between_batches()
        # the target first (it then stops answering ASK-only), then the source, which would
        # otherwise keep redirecting with ASK, then the others, which would answer MOVED-to-source
        others = [port for port in self.ports if port not in (to_port, source)]
        for port in [to_port, source, *others]:
            with self.node_client(port) as client:
                client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)

    def flushall(self) -> None:
        """FLUSHALL on every node."""
        for port in self.ports:
            with self.node_client(port) as client:
                client.flushall()

    def _start(self) -> None:
        self.ports = _distinct_ports(self.masters, free_cluster_port)
        for port in self.ports:
            self._spawn(port, "node", self._data_argv(
                port, "--cluster-enabled", "yes",
                "--cluster-config-file", str(self.directory / f"nodes-{port}.conf"),
                "--cluster-node-timeout", "2000", *self.extra_args,
            ))  # fmt: skip
        self._wait("every node answering PING", lambda: all(map(self._ping, self.ports)))
        if self.masters == 1:  # redis-cli --cluster create refuses fewer than 3 masters
            with self.node_client(self.ports[0]) as client:
                client.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, SLOTS - 1)
        else:
            self._create_with_redis_cli()
        # a master reports cluster_state:ok only 2 s after it started, whatever we do
        self._wait("cluster_state:ok and one full slot map on every node", self._converged)

    def _create_with_redis_cli(self) -> None:
        cli = shutil.which("redis-cli") or str(Path(self._binary).with_name("redis-cli"))
        nodes = [f"{HOST}:{port}" for port in self.ports]
        argv = [cli, "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"]
        try:
            done = subprocess.run(argv, capture_output=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise EngineError(f"{argv} failed: {error!r}\n{self._logs()}") from error
        if done.returncode != 0:
            output = (done.stdout + done.stderr).decode(errors="replace")
            raise EngineError(f"{argv} exited with {done.returncode}:\n{output}\n{self._logs()}")

    def _slot_map(self, port: int) -> list[tuple[int, int, int]]:
        with self.node_client(port) as client:
            ranges = client.execute_command("CLUSTER", "SLOTS")
        # each entry is [start, end, [master ip, port, id], replicas...]
        return sorted((int(entry[0]), int(entry[1]), int(entry[2][1])) for entry in ranges)

    def _converged(self) -> bool:
        for port in self.ports:
            with self.node_client(port) as client:
                if b"cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
                    return False
        maps = [self._slot_map(port) for port in self.ports]
        covered = sum(end - start + 1 for start, end, _ in maps[0])
        return covered == SLOTS and all(slot_map == maps[0] for slot_map in maps)


class SentinelGroup(_Engine):
    """A master, one replica and three sentinels (quorum 2) watching them as ``master_name``."""

    ready_timeout = 20.0  # sentinels find each other through hello messages sent every 2 s

    def __init__(
        self,
        directory: Path,
        *,
        master_name: str = "semibot",
        min_replicas_to_write: int = 0,
        extra_args: Sequence[str] = (),
    ) -> None:
        super().__init__(directory)
        self.master_name = master_name
        self.min_replicas_to_write = min_replicas_to_write
        self.extra_args = tuple(extra_args)
        self.data_ports: list[int] = []  #: the first master, then its replica (set by start)
        self.sentinel_ports: list[int] = []

    @property
    def url(self) -> str:
        """``redis+sentinel://`` URL naming the three sentinels, the master name and db 0."""
        hosts = ",".join(f"{HOST}:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{self.master_name}/0"

    def data_client(self, port: int) -> redis.Redis:
        """A plain client of one data server, without retries; the caller closes it."""
        return _client(port)

    def master_port(self, sentinel_port: int | None = None) -> int:
        """The master's port, as a sentinel (by default the first) reports it."""
        with _client(sentinel_port or self.sentinel_ports[0]) as client:
            _, port = client.execute_command(
                "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name
            )
        return int(port)

    def failover(self, timeout: float = 20.0) -> float:
        """``SENTINEL FAILOVER``; seconds until another data server is master and takes a SET.

        Then it also waits (uncounted) until every sentinel names the new master. With
        ``min_replicas_to_write`` the SET is refused (NOREPLICAS) until Sentinel has demoted
        the old master to replicate the new one: about 11 s here.
        """
        old = self.master_port()
        started = time.monotonic()
        with _client(self.sentinel_ports[0]) as sentinel:
            # NOGOODSLAVE (the replica's state is not fresh yet) is a ResponseError: retried
            order = ("SENTINEL", "FAILOVER", self.master_name)
            self._wait(
                "SENTINEL FAILOVER accepted", lambda: sentinel.execute_command(*order), timeout
            )
        self._wait("a new master that accepts writes", lambda: self._writable_new(old), timeout)
        took = time.monotonic() - started
        self._wait("every sentinel naming the new master", lambda: self._agreed(old), timeout)
        return took

    def kill_master(self) -> int:
        """SIGKILL the current master's process (Sentinel fails over ~2 s later); its port."""
        port = self.master_port()
        self._processes.pop(port).kill()
        return port

    def flushall(self) -> None:
        """FLUSHALL on every running data server that says it is a master (replicas follow)."""
        for port in self.data_ports:
            if port in self._processes:
                with self.data_client(port) as client:
                    if client.execute_command("ROLE")[0] == b"master":
                        client.flushall()

    def stop(self) -> None:
        """Stop the sentinels first, so they do not fail over while the data servers stop."""
        for port in self.sentinel_ports:
            if port in self._processes:
                self._processes.pop(port).stop()
        super().stop()

    def _start(self) -> None:
        ports = _distinct_ports(5, free_port)
        self.data_ports, self.sentinel_ports = ports[:2], ports[2:]
        master, replica = self.data_ports
        # to both data servers, so whichever is master enforces it; no 5 s pause before a
        # full sync (repl-diskless-sync-delay) waiting for more replicas to come
        common = ["--min-replicas-to-write", str(self.min_replicas_to_write),
                  "--min-replicas-max-lag", "10", "--repl-diskless-sync-delay", "0"]  # fmt: skip
        for port, role in ((master, []), (replica, ["--replicaof", HOST, str(master)])):
            data_dir = self.directory / f"data-{port}"  # one each: a sync writes RDB files
            data_dir.mkdir(exist_ok=True)
            argv = self._data_argv(port, *common, *role, *self.extra_args, directory=data_dir)
            self._spawn(port, "data", argv)
        # before the sentinels start: they learn of the replica from the master's INFO, which
        # they ask again only every 10 s
        self._wait("the replica's master_link_status:up", self._replica_linked)
        for port in self.sentinel_ports:
            config = self.directory / f"sentinel-{port}.conf"
            name = self.master_name
            config.write_text(  # Sentinel rewrites this file, so it must be ours and writable
                f"port {port}\nbind {HOST}\ndir {self.directory}\n"
                f"sentinel resolve-hostnames no\nsentinel monitor {name} {HOST} {master} 2\n"
                f"sentinel down-after-milliseconds {name} 1000\n"
                f"sentinel failover-timeout {name} 5000\nsentinel parallel-syncs {name} 1\n"
            )
            self._spawn(port, "sentinel", [self._binary, str(config), "--sentinel"])
        self._wait(
            "every sentinel knowing the master, the replica and 2 other sentinels",
            lambda: all(map(self._sentinel_ready, self.sentinel_ports)),
        )

    def _replica_linked(self) -> bool:
        with self.data_client(self.data_ports[1]) as client:
            return bool(client.info("replication").get("master_link_status") == "up")

    def _sentinel_ready(self, port: int) -> bool:
        if self.master_port(port) != self.data_ports[0]:
            return False
        with _client(port) as client:
            replicas = client.execute_command("SENTINEL", "REPLICAS", self.master_name)
            sentinels = client.execute_command("SENTINEL", "SENTINELS", self.master_name)
        # a map per replica under RESP3 (redis-py 8's default), a flat [field, value...] in RESP2
        known = [
            e if isinstance(e, dict) else dict(zip(e[::2], e[1::2], strict=True)) for e in replicas
        ]
        replica = str(self.data_ports[1]).encode()
        ok = any(info[b"port"] == replica and info[b"flags"] == b"slave" for info in known)
        return ok and len(sentinels) == 2

    def _writable_new(self, old: int) -> bool:
        new = self.master_port()
        if new == old:
            return False
        with self.data_client(new) as client:
            if client.execute_command("ROLE")[0] != b"master":
                return False
            client.set("engines:failover-probe", b"1")  # READONLY, NOREPLICAS: wait on
            client.delete("engines:failover-probe")
        return True

    def _agreed(self, old: int) -> bool:
        masters = {self.master_port(port) for port in self.sentinel_ports}
        return len(masters) == 1 and old not in masters


class TlsRedis(_Engine):
    """A TLS-only redis-server with an ACL file, and trustme certificates to talk to it.

    Users: ``default`` is off, ``admin`` (password ``adminpw``) may do anything, ``queue``
    (password ``queuepw`` by default) has ``queue_user_rules``.
    """

    def __init__(
        self,
        directory: Path,
        *,
        mutual: bool = False,
        queue_user_rules: str = DEFAULT_QUEUE_USER_RULES,
        extra_args: Sequence[str] = (),
    ) -> None:
        super().__init__(directory)
        self.mutual = mutual  #: tls-auth-clients yes: every client must show a certificate
        self.queue_user_rules = queue_user_rules
        self.extra_args = tuple(extra_args)
        self.ca_path = directory / "ca.pem"  #: the CA of the server and client certificates
        self.other_ca_path = directory / "other-ca.pem"  #: an unrelated CA: verification fails
        self.client_cert_path = directory / "client.pem"  #: signed by the CA, for mutual TLS
        self.client_key_path = directory / "client.key"
        self.port = 0  #: the TLS port, chosen by start() (the plain port is disabled)

    def url(
        self,
        user: str = "queue",
        password: str = "queuepw",  # noqa: S107 - the throwaway server's ACL file password
        *,
        ca: Path | None = None,
        client_cert: bool = False,
    ) -> str:
        """``rediss://`` URL verifying the server with ``ca`` (default: the right CA)."""
        query = f"ssl_ca_certs={quote(str(ca or self.ca_path))}&ssl_cert_reqs=required"
        if client_cert:
            query += f"&ssl_certfile={quote(str(self.client_cert_path))}"
            query += f"&ssl_keyfile={quote(str(self.client_key_path))}"
        return f"rediss://{quote(user)}:{quote(password)}@{HOST}:{self.port}/0?{query}"

    def _start(self) -> None:
        self.port = free_port()
        ca = trustme.CA()
        server = ca.issue_cert(HOST)  # an IP address becomes an IP SAN
        client = ca.issue_cert("queue-client.test")
        ca.cert_pem.write_to_path(str(self.ca_path))
        trustme.CA().cert_pem.write_to_path(str(self.other_ca_path))
        server.cert_chain_pems[0].write_to_path(str(self.directory / "server.pem"))
        server.private_key_pem.write_to_path(str(self.directory / "server.key"))
        client.cert_chain_pems[0].write_to_path(str(self.client_cert_path))
        client.private_key_pem.write_to_path(str(self.client_key_path))
        acl = self.directory / "users.acl"
        acl.write_text(
            "user default off\n"
            f"user admin on >{ADMIN_PASSWORD} ~* &* +@all\n"
            f"user queue {self.queue_user_rules}\n"
        )
        self._spawn(self.port, "tls", self._data_argv(
            0, "--tls-port", str(self.port),
            "--tls-cert-file", str(self.directory / "server.pem"),
            "--tls-key-file", str(self.directory / "server.key"),
            "--tls-ca-cert-file", str(self.ca_path),
            "--tls-auth-clients", "yes" if self.mutual else "optional",
            "--aclfile", str(acl), *self.extra_args,
        ))  # fmt: skip
        tls: dict[str, Any] = {"ssl": True, "ssl_ca_certs": str(self.ca_path)}
        if self.mutual:  # the server then refuses a client without a certificate
            tls |= {"ssl_certfile": str(self.client_cert_path)}
            tls |= {"ssl_keyfile": str(self.client_key_path)}
        self._wait(
            "admin PING over TLS",
            lambda: self._ping(self.port, username="admin", password=ADMIN_PASSWORD, **tls),
        )
