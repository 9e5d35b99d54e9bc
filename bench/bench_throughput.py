"""End-to-end throughput: N sender processes and one consumer process move a
fixed number of 1 KiB messages through a buffer of capacity 1,000 (diskcache's
``benchmark_core.py`` style: forked workers, a warm start, several rounds,
median reported).

The clock starts when every worker has opened its connection and passed a
barrier, and stops when the consumer has taken the last message; throughput
is messages / that time, the median over the rounds. See peers.py for what
each peer does when its buffer is full.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import PAYLOAD
from peers import SYSTEMS, System
from targets import SENDERS, SLOW_PEERS, SYSTEMS as ORDER

CAPACITY = 1000
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def systems() -> Iterator[dict[str, System]]:
    made = {name: cls() for name, cls in SYSTEMS.items()}
    yield made
    for s in made.values():
        s.close()


def _producer(system: System, index: int, count: int, barrier: Any) -> None:
    try:
        send = system.producer(index)
        barrier.wait()
        for _ in range(count):
            send(PAYLOAD)
        if system.name == "mp.Queue":
            system.q.close()
            system.q.join_thread()  # the feeder thread must hand everything over
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)


def _consumer(system: System, total: int, barrier: Any, done: Any) -> None:
    try:
        take = system.consumer()
        barrier.wait()
        got = 0
        while got < total:
            got += take()
        done.send(time.perf_counter_ns())
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)


def run_round(system: System, root: Path, senders: int, total: int) -> float:
    """One round; returns messages per second."""
    ctx = mp.get_context("fork")
    root.mkdir()
    system.start(root, CAPACITY)
    procs: list[Any] = []
    try:
        barrier = ctx.Barrier(senders + 2)
        done_r, done_w = ctx.Pipe(duplex=False)
        per = total // senders
        procs = [ctx.Process(target=_producer, args=(system, i, per, barrier)) for i in range(senders)]
        procs.append(ctx.Process(target=_consumer, args=(system, per * senders, barrier, done_w)))
        for p in procs:
            p.start()
        barrier.wait(timeout=60)
        t0 = time.perf_counter_ns()
        deadline = time.monotonic() + TIMEOUT_S
        while not done_r.poll(0.2):
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"{system.name}: a worker failed (exit {[p.exitcode for p in dead]}) "
                                   "or the round timed out")
        t_end = done_r.recv()
        for p in procs:
            p.join(30)
        return per * senders / ((t_end - t0) / 1e9)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        system.stop()


CASES = [(n, s) for n in SENDERS for s in ORDER if n in (1, 4) or s not in SLOW_PEERS]


@pytest.mark.parametrize("senders,name", CASES, ids=[f"{s}-{n}" for n, s in CASES])
def test_throughput(benchmark: Any, record: Any, systems: dict[str, System], workdir: Path, pick: Any,
                    senders: int, name: str) -> None:
    system = systems[name]
    why = system.unavailable()
    if why:
        pytest.skip(why)
    total = pick(4000 if name in SLOW_PEERS or name == "plain files" else 20000, 80)
    total -= total % senders
    rates: list[float] = []
    rounds = iter(range(10**6))

    def one_round() -> None:
        rates.append(run_round(system, workdir / f"round-{next(rounds)}", senders, total))

    benchmark.group = f"throughput, {senders} sender(s)"
    benchmark.pedantic(one_round, rounds=pick(3, 1), warmup_rounds=0)
    record(benchmark, f"tput.{name}@{senders}", statistics.median(rates), unit="msg/s", senders=senders,
           system=name, messages=total, capacity=CAPACITY, rates=rates, backpressure=system.backpressure,
           consumer=system.consumes)
