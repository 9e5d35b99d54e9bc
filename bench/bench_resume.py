"""Resume latency: how long a sender blocked on a full inbox takes to deliver
once a consumer frees one place, against the backpressure interval
(BACKPRESSURE_WAIT_MS=100) and against a POSIX queue's blocked ``mq_send``.

Each cycle: the inbox (queue) holds its capacity of 10; a child process is
told to send and blocks; once it is asleep (cfn-fast: the slot shows a
waiter; POSIX: 5 ms later) the parent takes one message. The figure is the
time from just before the parent's take to the child's send returning,
CLOCK_MONOTONIC in both processes, so it includes the take itself; the time
from the take's return is reported beside it. Capacity 10 on both sides:
fs.mqueue.msg_max caps a POSIX queue at 10 here (no CAP_SYS_RESOURCE).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from conftest import PAYLOAD, bus_config, fill, new_bus
from peers import read_whole
from targets import RESUME_INTERVAL_S

CAPACITY = 10
SETTLE_S = 0.005  # let the child reach its wait before freeing a place


def _cfn_child(cfg: Any, conn: Any) -> None:
    from cfn_fast import MessageBus

    bus = MessageBus(config=cfg)
    while conn.recv():
        bus.send_with_backpressure("sender", "c", "t", PAYLOAD)
        conn.send(time.perf_counter_ns())


def _posix_child(name: str, conn: Any) -> None:
    import posix_ipc

    q = posix_ipc.MessageQueue(name)
    while conn.recv():
        q.send(PAYLOAD)
        conn.send(time.perf_counter_ns())


def _plain_child(inbox: str, wake_r: int, conn: Any) -> None:
    """The plain-os floor's sender: asleep in a pipe read until the consumer
    writes its wake byte, then one message file (write a temporary, rename)."""
    d = os.open(inbox, os.O_RDONLY | os.O_DIRECTORY)
    data = PAYLOAD.encode()
    n = 0
    while conn.recv():
        os.read(wake_r, 1)
        n += 1
        tmp, name = f".s{n}.tmp", f"msg-2-{n:010d}-s.json"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=d)
        os.write(fd, data)
        os.close(fd)
        os.rename(tmp, name, src_dir_fd=d, dst_dir_fd=d)
        conn.send(time.perf_counter_ns())


def _pct(xs: list[int], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p * len(s)))] / 1e9


@pytest.mark.parametrize("system", ["posix_ipc", "plain-os", "cfn-fast"])
def test_resume(benchmark: Any, record: Any, workdir: Path, pick: Any, system: str) -> None:
    ctx = mp.get_context("fork")
    parent_conn, child_conn = ctx.Pipe()
    cleanup: list[Callable[[], None]] = []
    if system == "cfn-fast":
        from cfn_fast import _core

        settings = dict(max_inbox_size=CAPACITY, backpressure_wait_ms=int(RESUME_INTERVAL_S * 1000))
        bus = new_bus(workdir, **settings)
        bus.init_message_bus("c")
        fill(bus, "c", CAPACITY)
        child = ctx.Process(target=_cfn_child, args=(bus_config(workdir, **settings), child_conn))

        def waiting() -> bool:
            return any(s.agent == "c" and s.waiters > 0 for s in bus.storage.slots())

        def free_one() -> None:
            assert len(bus.consume_messages("c", 1)) == 1
        cleanup.append(bus.close)
    elif system == "plain-os":
        # The floor of any file-per-message bus: the consumer's plain-os take
        # (list, read, unlink the oldest), a kernel wake (one byte down a pipe)
        # and the woken sender's file (write, rename); no capacity, no lock.
        inbox = workdir / "plain"
        inbox.mkdir()
        for i in range(CAPACITY):
            (inbox / f"msg-1-{i:010d}-f.json").write_text(PAYLOAD)
        wake_r, wake_w = os.pipe()
        cleanup += [lambda: os.close(wake_r), lambda: os.close(wake_w)]
        inbox_fd = os.open(inbox, os.O_RDONLY | os.O_DIRECTORY)
        cleanup.append(lambda: os.close(inbox_fd))
        child = ctx.Process(target=_plain_child, args=(str(inbox), wake_r, child_conn))

        def waiting() -> bool:
            return True  # not observable: the settle time has to do

        def free_one() -> None:
            oldest = min(n for n in os.listdir(inbox_fd) if n.endswith(".json"))
            fd = os.open(oldest, os.O_RDONLY, dir_fd=inbox_fd)
            read_whole(fd)
            os.close(fd)
            os.unlink(oldest, dir_fd=inbox_fd)
            os.write(wake_w, b"1")
    else:
        posix_ipc = pytest.importorskip("posix_ipc")
        name = f"/cfnbench-resume-{id(workdir)}"
        q = posix_ipc.MessageQueue(name, posix_ipc.O_CREX, max_messages=CAPACITY, max_message_size=2048)
        cleanup += [q.unlink, q.close]
        for _ in range(CAPACITY):
            q.send(PAYLOAD)
        child = ctx.Process(target=_posix_child, args=(name, child_conn))

        def waiting() -> bool:
            return True  # not observable: the settle time has to do

        def free_one() -> None:
            q.receive()

    child.start()
    from_take: list[int] = []
    from_freed: list[int] = []
    late: list[int] = []

    def cycle() -> None:
        parent_conn.send(1)
        time.sleep(SETTLE_S)
        for _ in range(200):
            if waiting():
                break
            time.sleep(0.001)
        else:
            late.append(1)
        t0 = time.perf_counter_ns()
        free_one()
        t1 = time.perf_counter_ns()
        assert parent_conn.poll(5), "blocked sender never resumed"
        done = parent_conn.recv()
        from_take.append(done - t0)
        from_freed.append(done - t1)

    try:
        benchmark.group = "resume of a blocked sender"
        benchmark.pedantic(cycle, rounds=pick(200, 3), warmup_rounds=pick(5, 0))
    finally:
        parent_conn.send(0)
        child.join(10)
        if child.is_alive():
            child.kill()
        for f in cleanup:
            f()
    assert not late, f"{len(late)} cycles: the sender was never seen waiting"
    median = statistics.median(from_take) / 1e9
    record(benchmark, "resume.interval", RESUME_INTERVAL_S)  # the configured wait, the row's reference
    record(benchmark, f"resume.{system}", median, cycles=len(from_take), capacity=CAPACITY,
           p90_s=_pct(from_take, 0.9), p99_s=_pct(from_take, 0.99), max_s=max(from_take) / 1e9,
           median_after_take_s=statistics.median(from_freed) / 1e9, interval_s=RESUME_INTERVAL_S)
