"""Real Redis for the tests: a private redis-server on a free loopback port,
and a 3-master Redis Cluster built with ``redis-cli --cluster create``, each
started once per session and torn down at its end; every test that uses one
starts from an empty server (FLUSHALL on every master).

Without redis-server on PATH (apt-get install redis-server redis-tools) the
Redis tests skip with the reason; with CFN_REQUIRE_REDIS=1 (CI) they fail.
Nothing stands in for Redis: no mock, no fake server.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import pytest

REQUIRED = os.environ.get("CFN_REQUIRE_REDIS") == "1"


def _missing() -> Optional[str]:
    for tool in ("redis-server", "redis-cli"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install redis-server redis-tools)"
    try:
        import redis  # noqa: F401
    except ImportError:
        return "the redis client is not installed (pip install -e '.[redis]')"
    return None


def need_redis() -> None:
    why = _missing()
    if why:
        if REQUIRED:
            pytest.fail(f"CFN_REQUIRE_REDIS=1 but {why}")
        pytest.skip(why)


def _free_port(also_bus: bool = False) -> int:
    """A loopback port free now (and, for a cluster node, port + 10000 too)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not also_bus:
            return port
        if port + 10000 > 65535:
            continue
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue
    raise RuntimeError("no free loopback port")


class Server:
    """One redis-server process on 127.0.0.1."""

    def __init__(self, folder: Path, *, cluster: bool = False, aof: bool = False,
                 password: Optional[str] = None, extra: tuple[str, ...] = ()) -> None:
        self.folder = folder
        self.extra = extra  # more redis-server arguments
        self.cluster = cluster
        self.aof = aof
        self.password = password
        self.port = _free_port(also_bus=cluster)
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.start()

    def args(self) -> list[str]:
        a = ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--dir", str(self.folder), "--daemonize", "no", "--loglevel", "warning",
             "--logfile", str(self.folder / "redis.log"), "--protected-mode", "no",
             # backpressure waits are timed by the client; hz only affects expiry and idle work
             "--hz", "100"]
        if self.aof:
            a += ["--appendonly", "yes", "--appendfsync", "always", "--appenddirname", "aof"]
        else:
            a += ["--appendonly", "no"]
        if self.cluster:
            a += ["--cluster-enabled", "yes", "--cluster-config-file", str(self.folder / "nodes.conf"),
                  "--cluster-node-timeout", "5000"]
        if self.password:
            a += ["--requirepass", self.password]
        return a + list(self.extra)

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(self.args(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        self.wait_ready()

    def client(self) -> "object":
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_timeout=5)

    def wait_ready(self, timeout: float = 15) -> None:
        import redis

        deadline = time.monotonic() + timeout
        while True:
            try:
                r = redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_timeout=1)
                r.ping()
                r.close()
                return
            except (redis.ConnectionError, redis.TimeoutError, redis.exceptions.BusyLoadingError):
                assert self.proc is not None
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    log = (self.folder / "redis.log")
                    raise RuntimeError(f"redis-server on {self.port} did not start: "
                                       f"{log.read_text()[-2000:] if log.exists() else ''}")
                time.sleep(0.02)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def url(self, db: int = 0) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"

    def flush(self) -> None:
        r = self.client()
        r.flushall()  # type: ignore[attr-defined]
        r.close()  # type: ignore[attr-defined]

    def pause(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.pid, signal.SIGCONT)
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        """Killed outright (what a crash is) and started again on the same port and folder."""
        self.stop(signal.SIGKILL)
        self.start()


class Cluster:
    """Three masters, no replicas, slots split by redis-cli --cluster create."""

    def __init__(self, folder: Path) -> None:
        self.nodes = [Server(folder / f"node{i}", cluster=True) for i in range(3)]
        hosts = [f"127.0.0.1:{n.port}" for n in self.nodes]
        out = subprocess.run(["redis-cli", "--cluster", "create", *hosts, "--cluster-replicas", "0",
                              "--cluster-yes"], capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            self.stop()
            raise RuntimeError(f"redis-cli --cluster create failed: {out.stdout[-1000:]} {out.stderr[-1000:]}")
        deadline = time.monotonic() + 30
        while not self.ok():
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the cluster did not reach cluster_state:ok")
            time.sleep(0.1)

    def ok(self) -> bool:
        for n in self.nodes:
            r = n.client()
            info = r.execute_command("CLUSTER", "INFO")  # type: ignore[attr-defined]
            r.close()  # type: ignore[attr-defined]
            text = info.decode() if isinstance(info, bytes) else str(info)
            if "cluster_state:ok" not in text:
                return False
        return True

    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def owner(self, key: bytes) -> Server:
        """The master that holds key's slot."""
        r = self.nodes[0].client()
        slot = int(r.execute_command("CLUSTER", "KEYSLOT", key))  # type: ignore[attr-defined]
        ranges = r.execute_command("CLUSTER", "SLOTS")  # type: ignore[attr-defined]
        r.close()  # type: ignore[attr-defined]
        for lo, hi, master, *_ in ranges:
            if int(lo) <= slot <= int(hi):
                port = int(master[1])
                return next(n for n in self.nodes if n.port == port)
        raise RuntimeError(f"no master holds slot {slot}")

    def flush(self) -> None:
        for n in self.nodes:
            n.flush()

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()


@pytest.fixture(scope="session")
def _redis_root() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="cfn-redis-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server(_redis_root: Path) -> Iterator[Server]:
    """A private redis-server for the session (no persistence)."""
    need_redis()
    s = Server(_redis_root / "single")
    yield s
    s.stop()


@pytest.fixture(scope="session")
def redis_cluster(_redis_root: Path) -> Iterator[Cluster]:
    """A private 3-master Redis Cluster for the session."""
    need_redis()
    c = Cluster(_redis_root / "cluster")
    yield c
    c.stop()


@pytest.fixture(params=["single", "cluster"])
def redis_url(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """MESSAGE_BUS_URL of an empty Redis (one server, then a Cluster), set in
    the environment too, so module functions and child processes use it."""
    target = request.getfixturevalue("redis_server" if request.param == "single" else "redis_cluster")
    target.flush()
    url: str = target.url()
    monkeypatch.setenv("MESSAGE_BUS_URL", url)
    return url


@pytest.fixture(params=["file", "redis", "cluster"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a backend-neutral test on the base folder's files, on one Redis
    server and on a Redis Cluster (MESSAGE_BUS_URL set or not)."""
    if request.param == "file":
        monkeypatch.delenv("MESSAGE_BUS_URL", raising=False)
        return "file"
    target = request.getfixturevalue("redis_server" if request.param == "redis" else "redis_cluster")
    target.flush()
    monkeypatch.setenv("MESSAGE_BUS_URL", target.url())
    return str(request.param)


__all__ = ["Cluster", "REQUIRED", "Server", "backend", "need_redis", "redis_cluster", "redis_server",
           "redis_url"]
