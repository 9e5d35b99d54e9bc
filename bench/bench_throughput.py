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

from conftest import NOTES, PAYLOAD
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
        system.producer_done()
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


def _systems_at(senders: int) -> list[str]:
    return [s for s in ORDER if senders in (1, 4) or s not in SLOW_PEERS]


@pytest.mark.parametrize("name", ORDER)
def test_peer_available(name: str, systems: dict[str, System]) -> None:
    """One line per system, so a peer that cannot run shows as skipped with its reason."""
    why = systems[name].unavailable()
    if why:
        pytest.skip(why)


@pytest.mark.parametrize("senders", SENDERS)
def test_throughput(benchmark: Any, record: Any, systems: dict[str, System], workdir: Path, pick: Any,
                    senders: int) -> None:
    """Every system at this sender count, round-robin: round k of each system
    runs before round k+1 of any, so load from elsewhere on the shared machine
    falls on all of them alike."""
    names = []
    for n in _systems_at(senders):
        why = systems[n].unavailable()
        if why:
            NOTES.append(f"throughput: {n} skipped: {why}")
        else:
            names.append(n)
    rates: dict[str, list[float]] = {n: [] for n in names}
    counter = iter(range(10**6))
    failed: dict[str, str] = {}

    def total_for(name: str) -> int:
        t = pick(4000 if name in SLOW_PEERS or name == "plain files" else 20000, 80)
        return t - t % senders

    def one_round() -> None:
        k = next(counter)
        order = names[k % len(names):] + names[:k % len(names)]  # rotate who goes first
        for name in order:
            if name in failed:
                continue
            try:
                rates[name].append(run_round(systems[name], workdir / f"{name}-{k}".replace(" ", "_"),
                                             senders, total_for(name)))
            except Exception as e:  # one peer breaking must not cost the others' figures
                failed[name] = f"{type(e).__name__}: {e}"
                NOTES.append(f"throughput: {name} at {senders} sender(s) failed: {failed[name]}")

    benchmark.group = "throughput (all systems, round-robin)"
    benchmark.pedantic(one_round, rounds=pick(3, 1), warmup_rounds=0)
    for name in names:
        if rates[name]:
            record(benchmark, f"tput.{name}@{senders}", statistics.median(rates[name]))
    benchmark.extra_info.update(
        senders=senders, capacity=CAPACITY, rates=rates,
        messages={n: total_for(n) for n in names},
        backpressure={n: systems[n].backpressure for n in names},
        consumer={n: systems[n].consumes for n in names}, failed=failed)
    assert not failed, failed
