"""The systems the throughput benchmark drives, cfn-fast and its peers, behind
one small interface.

A round: ``start`` (parent, fresh state), then forked children call
``producer`` (returns a send function) or ``consumer`` (returns a take
function giving how many messages it took) before the clock starts, then
``stop``. ``backpressure`` says what each system was measured doing when the
buffer is full: only cfn-fast, the POSIX queue and multiprocessing.Queue block
a sender natively; the others are given the nearest thing their API allows.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Optional

POLL_S = 0.0005  # consumers without a blocking receive sleep this long on an empty queue
FULL_SLEEP_S = 0.001  # senders without a blocking send sleep this long on a full queue
BATCH = 10  # cfn-fast's default CFN_BATCH_SIZE; Redis pops the same


def read_whole(fd: int) -> bytes:
    """A message file's bytes as the C core reads them: one read of up to
    16 KiB (a regular file reads short only at its end), more only when that
    filled. Not os.read(fd, 1 << 20): a 1 MiB request makes CPython allocate
    1 MiB per read, which glibc serves with mmap, mremap and munmap (three
    more syscalls a message, and 20-28 us instead of 4 us for open, read and
    close on this machine; how often depends on malloc's adaptive threshold,
    so a floor written that way moved 2.5x between runs)."""
    data = os.read(fd, 16384)
    if len(data) < 16384:
        return data
    parts = [data]
    while True:
        more = os.read(fd, 65536)
        if not more:
            return b"".join(parts)
        parts.append(more)

Send = Callable[[str], None]
Take = Callable[[], int]


class System:
    name = ""
    backpressure = ""
    # the consumer's unit of work, for the README
    consumes = ""

    def unavailable(self) -> Optional[str]:
        return None

    def start(self, root: Path, capacity: int) -> None:
        raise NotImplementedError

    def producer(self, index: int) -> Send:
        raise NotImplementedError

    def consumer(self) -> Take:
        raise NotImplementedError

    def producer_done(self) -> None:
        """In the producer's process, after its last send."""

    def stop(self) -> None:
        pass

    def close(self) -> None:
        pass


class CfnFast(System):
    name = "cfn-fast"
    backpressure = ("send_with_backpressure: blocks in the C loop (futex wait, woken by the consumer), "
                    "metrics on, BACKPRESSURE_WAIT_MS=100")
    consumes = f"consume_messages(agent, {BATCH}), polling every {POLL_S * 1e3:g} ms when empty"

    def start(self, root: Path, capacity: int) -> None:
        from conftest import bus_config, new_bus

        self.cfg = bus_config(root, max_inbox_size=capacity, backpressure_wait_ms=100)
        bus = new_bus(root, max_inbox_size=capacity, backpressure_wait_ms=100)
        bus.init_message_bus("consumer")
        bus.close()

    def producer(self, index: int) -> Send:
        from cfn_fast import MessageBus

        bus = MessageBus(config=self.cfg)
        sender = f"sender-{index}"

        def send(payload: str) -> None:
            bus.send_with_backpressure(sender, "consumer", "bench", payload)
        return send

    def consumer(self) -> Take:
        from cfn_fast import MessageBus

        bus = MessageBus(config=self.cfg)

        def take() -> int:
            got = len(bus.consume_messages("consumer", BATCH))
            if not got:
                time.sleep(POLL_S)
            return got
        return take


def _mq_msg_max() -> int:
    try:
        with open("/proc/sys/fs/mqueue/msg_max") as f:
            return int(f.read())
    except OSError:
        return 10


class PosixQueue(System):
    name = "posix_ipc"
    consumes = "MessageQueue.receive(), blocking, one message per call"

    def __init__(self) -> None:
        self.depth = min(1000, _mq_msg_max())
        self.backpressure = ("blocking mq_send on a full queue (the kernel's own backpressure); depth "
                             f"{self.depth}, not 1,000: fs.mqueue.msg_max caps it without CAP_SYS_RESOURCE")
        self.q: Any = None
        self.rounds = 0

    def unavailable(self) -> Optional[str]:
        try:
            import posix_ipc  # noqa: F401
        except ImportError:
            return "posix_ipc is not installed (pip install -e '.[bench]')"
        return None

    def start(self, root: Path, capacity: int) -> None:
        import posix_ipc

        self.rounds += 1
        self.qname = f"/cfnbench-{os.getpid()}-{self.rounds}"
        self.q = posix_ipc.MessageQueue(self.qname, posix_ipc.O_CREX, max_messages=min(capacity, self.depth),
                                        max_message_size=2048)

    def producer(self, index: int) -> Send:
        import posix_ipc

        return posix_ipc.MessageQueue(self.qname).send

    def consumer(self) -> Take:
        import posix_ipc

        q = posix_ipc.MessageQueue(self.qname)

        def take() -> int:
            q.receive()
            return 1
        return take

    def stop(self) -> None:
        if self.q is not None:
            self.q.close()
            self.q.unlink()
            self.q = None


class MpQueue(System):
    name = "mp.Queue"
    backpressure = "multiprocessing.Queue(maxsize=capacity).put blocks on a full queue (a semaphore)"
    consumes = "Queue.get(), blocking, one message per call"

    def start(self, root: Path, capacity: int) -> None:
        self.q = mp.get_context("fork").Queue(maxsize=capacity)

    def producer(self, index: int) -> Send:
        return self.q.put

    def producer_done(self) -> None:
        self.q.close()
        self.q.join_thread()  # the feeder thread must hand everything over before exit

    def consumer(self) -> Take:
        def take() -> int:
            self.q.get()
            return 1
        return take

    def stop(self) -> None:
        self.q.close()


class PersistQueue(System):
    name = "persist-queue"
    backpressure = ("no capacity in its API: each put is preceded by SELECT COUNT and, while the count is at "
                    f"capacity, a {FULL_SLEEP_S * 1e3:g} ms sleep; check-then-put is not atomic, so concurrent "
                    "senders can overshoot")
    consumes = f"SQLiteQueue.get(block=False), polling every {POLL_S * 1e3:g} ms when empty"

    def unavailable(self) -> Optional[str]:
        try:
            import persistqueue  # noqa: F401
        except ImportError:
            return "persist-queue is not installed (pip install -e '.[bench]')"
        return None

    def start(self, root: Path, capacity: int) -> None:
        from persistqueue import SQLiteQueue

        self.path = str(root / "persist-queue")
        self.capacity = capacity
        SQLiteQueue(self.path, auto_commit=True).close()

    def _open(self) -> Any:
        from persistqueue import SQLiteQueue

        return SQLiteQueue(self.path, auto_commit=True)

    def producer(self, index: int) -> Send:
        q = self._open()

        def send(payload: str) -> None:
            while q._count() >= self.capacity:
                time.sleep(FULL_SLEEP_S)
            q.put(payload)
        return send

    def consumer(self) -> Take:
        from persistqueue import Empty

        q = self._open()

        def take() -> int:
            try:
                q.get(block=False)
                return 1
            except Empty:
                time.sleep(POLL_S)
                return 0
        return take


class DiskcacheDeque(System):
    name = "diskcache"
    backpressure = ("Deque(maxlen) would drop the oldest item, not wait: each append runs inside "
                    "Deque.transact() after a len() check (atomic), with a "
                    f"{FULL_SLEEP_S * 1e3:g} ms sleep while full")
    consumes = f"Deque.popleft(), polling every {POLL_S * 1e3:g} ms when empty"

    def unavailable(self) -> Optional[str]:
        try:
            import diskcache  # noqa: F401
        except ImportError:
            return "diskcache is not installed (pip install -e '.[bench]')"
        return None

    def start(self, root: Path, capacity: int) -> None:
        from diskcache import Deque

        self.path = str(root / "diskcache")
        self.capacity = capacity
        Deque(directory=self.path)

    def producer(self, index: int) -> Send:
        from diskcache import Deque

        dq = Deque(directory=self.path)

        def send(payload: str) -> None:
            while True:
                with dq.transact():
                    if len(dq) < self.capacity:
                        dq.append(payload)
                        return
                time.sleep(FULL_SLEEP_S)
        return send

    def consumer(self) -> Take:
        from diskcache import Deque

        dq = Deque(directory=self.path)

        def take() -> int:
            try:
                dq.popleft()
                return 1
            except IndexError:
                time.sleep(POLL_S)
                return 0
        return take


class PlainFiles(System):
    """The bash original's design in plain Python: the design's floor, for orientation."""
    name = "plain files"
    backpressure = ("the original's check-then-write: len(os.listdir(inbox)) against the capacity, a "
                    f"{FULL_SLEEP_S * 1e3:g} ms sleep while full (not atomic: concurrent senders can overshoot), "
                    "then temp file, write, rename")
    consumes = (f"os.listdir, sort by name, then for the oldest {BATCH}: rename into a claim folder, read, "
                f"unlink; polling every {POLL_S * 1e3:g} ms when empty")

    def start(self, root: Path, capacity: int) -> None:
        self.inbox = root / "inbox"
        self.claims = root / "claims"
        self.inbox.mkdir()
        self.claims.mkdir()
        self.capacity = capacity

    def producer(self, index: int) -> Send:
        inbox, pid = str(self.inbox), os.getpid()
        seq = iter(range(10**9))

        def send(payload: str) -> None:
            while len(os.listdir(inbox)) >= self.capacity:
                time.sleep(FULL_SLEEP_S)
            n = next(seq)
            name = f"msg-{int(time.time())}-{n:010d}-{pid}"
            data = payload.encode()
            tmp = f"{inbox}/.{name}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, data)
            os.close(fd)
            os.rename(tmp, f"{inbox}/{name}.json")
        return send

    def consumer(self) -> Take:
        inbox, claims = str(self.inbox), str(self.claims)

        def take() -> int:
            names = sorted(n for n in os.listdir(inbox) if n.endswith(".json"))[:BATCH]
            for n in names:
                os.rename(f"{inbox}/{n}", f"{claims}/{n}")
                with open(f"{claims}/{n}", "rb") as f:
                    f.read()
                os.unlink(f"{claims}/{n}")
            if not names:
                time.sleep(POLL_S)
            return len(names)
        return take


class PlainOsPair(System):
    """The same file work as a cfn-fast delivery and consume, as tightly as plain
    Python does it (folder descriptors opened once, a consumer keeping its
    sorted listing between batches), with nothing else: no capacity, no lock,
    no counter, no sequence. Issue 15's throughput floor."""
    name = "plain-os pair"
    backpressure = "none: the producer never waits (there is no capacity to wait for)"
    consumes = (f"one os.listdir kept between batches, then for the oldest {BATCH}: read, unlink; "
                f"polling every {POLL_S * 1e3:g} ms when empty")

    def start(self, root: Path, capacity: int) -> None:
        self.inbox = root / "inbox"
        self.outbox = root / "outbox"
        self.inbox.mkdir()
        self.outbox.mkdir()

    def producer(self, index: int) -> Send:
        fds = [os.open(d, os.O_RDONLY | os.O_DIRECTORY) for d in (self.inbox, self.outbox)]
        pid = os.getpid()
        seq = iter(range(1, 10**9))

        def send(payload: str) -> None:
            name = f"msg-{int(time.time())}-{next(seq):010d}-{pid}"
            data = payload.encode()
            for d in fds:
                fd = os.open(f".{name}.tmp", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=d)
                os.write(fd, data)
                os.close(fd)
                os.rename(f".{name}.tmp", f"{name}.json", src_dir_fd=d, dst_dir_fd=d)
        return send

    def consumer(self) -> Take:
        d = os.open(self.inbox, os.O_RDONLY | os.O_DIRECTORY)
        pending: list[str] = []

        def take() -> int:
            if not pending:
                pending.extend(sorted((n for n in os.listdir(d) if n.endswith(".json")), reverse=True))
            got = 0
            while pending and got < BATCH:
                n = pending.pop()
                fd = os.open(n, os.O_RDONLY, dir_fd=d)
                read_whole(fd)
                os.close(fd)
                os.unlink(n, dir_fd=d)
                got += 1
            if not got:
                time.sleep(POLL_S)
            return got
        return take


_LUA_PUSH = """
if redis.call('LLEN', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('RPUSH', KEYS[1], ARGV[1])
  return 1
end
return 0
"""


class RedisList(System):
    name = "redis"
    backpressure = ("a Lua script checks LLEN against the capacity and RPUSHes atomically; a sender told "
                    f"'full' sleeps {FULL_SLEEP_S * 1e3:g} ms and retries")
    consumes = f"LPOP key {BATCH}, then BLPOP (blocking) when the list is empty"

    def __init__(self) -> None:
        self.server: Optional[subprocess.Popen[bytes]] = None
        self.port = 0
        self.rounds = 0

    def unavailable(self) -> Optional[str]:
        try:
            import redis  # noqa: F401
        except ImportError:
            return "the redis client is not installed (pip install -e '.[bench]')"
        if shutil.which("redis-server") is None:
            return "no redis-server on PATH (apt-get install redis-server)"
        return None

    def _ensure_server(self) -> None:
        if self.server is not None:
            return
        import redis

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis(port=self.port).ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.server.poll() is not None:
                    self.close()
                    raise RuntimeError("redis-server did not start")
                time.sleep(0.05)

    def start(self, root: Path, capacity: int) -> None:
        import redis

        self._ensure_server()
        self.rounds += 1
        self.key = f"cfnbench:{self.rounds}"
        self.capacity = capacity
        redis.Redis(port=self.port).delete(self.key)

    def producer(self, index: int) -> Send:
        import redis

        r = redis.Redis(port=self.port)
        push = r.register_script(_LUA_PUSH)

        def send(payload: str) -> None:
            while not push(keys=[self.key], args=[payload, self.capacity]):
                time.sleep(FULL_SLEEP_S)
        return send

    def consumer(self) -> Take:
        import redis

        r = redis.Redis(port=self.port)

        def take() -> int:
            items = r.lpop(self.key, BATCH)
            if items:
                return len(items)
            return 1 if r.blpop([self.key], timeout=0.05) else 0
        return take

    def stop(self) -> None:
        import redis

        redis.Redis(port=self.port).delete(self.key)

    def close(self) -> None:
        if self.server is not None:
            self.server.terminate()
            try:
                self.server.wait(10)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait()
            self.server = None


SYSTEMS: dict[str, type[System]] = {
    s.name: s for s in (CfnFast, PosixQueue, MpQueue, PersistQueue, DiskcacheDeque, RedisList, PlainFiles,
                        PlainOsPair)
}
