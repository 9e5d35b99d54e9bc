"""Fair wake: senders blocked on one inbox are admitted in the order they
found it full (a line of tickets in the inbox's slot; on Redis, the queue of
waiting tokens), so with 50 senders competing for a slowly drained inbox none
starves: Jain's fairness index over what each delivered is at least 0.95, and
no send waits more than three times the median. A ticket holder that is
killed does not block the line: a head that goes quiet is passed over."""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import statistics
import threading
import time

import pytest

from cfn_fast import Config, InboxFull, MessageBus

CTX = mp.get_context("fork")
SETTINGS = dict(max_inbox_size=10, backpressure_wait_ms=100, backpressure_max_retries=10_000, breaker_failures=0)


def _senders(rank: int, threads: int, until: float, out: "mp.Queue[tuple[list[int], list[float]]]") -> None:
    """`threads` senders in one process, each sending as fast as the inbox lets it until `until`."""
    bus = MessageBus(config=Config.from_env().replace(**SETTINGS))
    counts, waits = [0] * threads, []

    def one(i: int) -> None:
        while time.time() < until:
            t = time.monotonic()
            bus.send_with_backpressure(f"s{rank}-{i}", "sink", "t", i)
            waits.append(time.monotonic() - t)
            counts[i] += 1

    workers = [threading.Thread(target=one, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    out.put((counts, waits))


def _drain(per_s: float, until: float) -> None:
    bus = MessageBus(config=Config.from_env().replace(**SETTINGS))
    while time.time() < until:
        t = time.monotonic()
        bus.consume_messages("sink", 1)
        time.sleep(max(0.0, 1 / per_s - (time.monotonic() - t)))


@pytest.mark.parametrize("backend", ["file", "redis"], indirect=True)
def test_fifty_senders_on_a_slowly_drained_inbox_are_served_fairly(backend: str, make_bus) -> None:
    make_bus(**SETTINGS).init_message_bus("sink")
    until = time.time() + 3.0
    out: "mp.Queue[tuple[list[int], list[float]]]" = CTX.Queue()
    senders = [CTX.Process(target=_senders, args=(r, 10, until, out)) for r in range(5)]
    drain = CTX.Process(target=_drain, args=(150, until + 3.0))  # ends every send still waiting
    for p in senders + [drain]:
        p.start()
    got = [out.get(timeout=60) for _ in senders]
    for p in senders + [drain]:
        p.join(30)
    counts = [c for cs, _ in got for c in cs]
    waits = sorted(w for _, ws in got for w in ws)
    jain = sum(counts) ** 2 / (len(counts) * sum(c * c for c in counts))
    median, longest = statistics.median(waits), waits[-1]
    print(f"\n{backend}: 50 senders, {sum(counts)} delivered, Jain's index {jain:.3f}, "
          f"median wait {median * 1000:.0f} ms, longest {longest * 1000:.0f} ms ({longest / median:.2f}x)")
    assert len(counts) == 50 and min(counts) > 0
    assert jain >= 0.95
    assert longest <= 3 * median


def _wait_in_line(ready: "mp.Event") -> None:
    bus = MessageBus(config=Config.from_env().replace(max_inbox_size=1, backpressure_wait_ms=60_000,
                                                      backpressure_max_retries=1, breaker_failures=0))
    ready.set()
    bus.send_with_backpressure("doomed", "sink", "t", 1)


def test_killed_ticket_holders_do_not_block_the_line(make_bus) -> None:
    bus = make_bus(max_inbox_size=1, backpressure_wait_ms=50, backpressure_max_retries=200, breaker_failures=0)
    bus.init_message_bus("sink")
    bus.send_message("alice", "sink", "t", 0)
    doomed = []

    def waiters() -> int:
        return {s.agent: s for s in bus.storage.slots()}["sink"].waiters

    for k in range(1, 5):  # four senders take tickets, one after the other, and are killed in the line
        ready = CTX.Event()
        p = CTX.Process(target=_wait_in_line, args=(ready,))
        p.start()
        ready.wait(30)
        doomed.append(p)
        deadline = time.monotonic() + 30
        while waiters() < k:  # its ticket taken before the next one starts: the order is theirs
            assert time.monotonic() < deadline
            time.sleep(0.005)
    assert waiters() == 4
    for p in doomed:
        os.kill(p.pid, signal.SIGKILL)
        p.join(30)
    with pytest.raises(InboxFull, match="wait their turn"):  # the dead still hold the line...
        bus.consume_messages("sink")
        bus.send_message("alice", "sink", "t", 1)
    t0 = time.monotonic()
    bus.send_with_backpressure("alice", "sink", "t", 2)  # ...until each, quiet, is passed over
    took = time.monotonic() - t0
    assert took < 3.0, took
    assert [m["payload"] for m in bus.consume_messages("sink")] == [2]
    bus.send_message("alice", "sink", "t", 3)  # and the line is empty again
