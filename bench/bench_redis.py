"""The Redis backend against its floors and its peer, measured in one run on
one private redis-server (the Redis peer's, bench/peers.py):

* send with room (``send_message``, 1 KiB, a sender without an outbox)
  against one EVALSHA round trip of a script that returns at once: the floor
  of any server-side step. Target: <= 1.3x. Measured twice: each side's
  rounds one after the other, and the two sides alternating in blocks.
* throughput, 1 and 4 producer processes + 1 consumer, capacity 1,000,
  against the raw redis-py list+Lua peer (``RedisList``): per message
  (send_with_backpressure; consume_raw(agent, 10)) target >= 1x, and through
  the batch paths (send_batch of 100; consume_raw(agent, 100)) target >= 10x.
* resume: a sender blocked on a full inbox (capacity 1) in another process,
  from just before a consume in this process to its send returning
  (CLOCK_MONOTONIC in both). Target: median <= 2 ms.

Each ratio goes into the benchmark's ``extra_info`` and is printed at the end
(``ratios``); nothing here is asserted on time.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from bench_throughput import run_round
from conftest import PAYLOAD, bus_config
from peers import BATCH, RedisList, System

RATIOS: dict[str, float] = {}
FIGURES: dict[str, float] = {}


@pytest.fixture(scope="module")
def peer() -> Iterator[RedisList]:
    p = RedisList()
    why = p.unavailable()
    if why:
        pytest.skip(why)
    p._ensure_server()
    yield p
    p.close()


def _url(peer: RedisList) -> str:
    return f"redis://127.0.0.1:{peer.port}/0?prefix=cfnbench"


def _bus(peer: RedisList, root: Path, **settings: Any) -> Any:
    from cfn_fast import MessageBus

    return MessageBus(config=bus_config(root, bus_url=_url(peer), **settings))


class CfnRedis(System):
    """cfn-fast on Redis, per message or through its batch paths."""

    def __init__(self, peer: RedisList, batch: int) -> None:
        self.peer, self.batch = peer, batch
        self.name = f"cfn-fast-redis{'-batch' if batch > 1 else ''}"

    def start(self, root: Path, capacity: int) -> None:
        self.root, self.capacity = root, capacity
        bus = _bus(self.peer, root, max_inbox_size=capacity)
        bus.cleanup_message_bus("consumer")
        bus.init_message_bus("consumer")
        bus.close()

    def producer(self, index: int) -> Any:
        bus = _bus(self.peer, self.root, max_inbox_size=self.capacity, backpressure_wait_ms=100)
        sender = f"sender-{index}"
        if self.batch == 1:
            def send(payload: str) -> None:
                bus.send_with_backpressure(sender, "consumer", "bench", payload)
            return send
        pending: list[str] = []

        def send_batch(payload: str) -> None:
            pending.append(payload)
            if len(pending) >= self.batch:
                out = bus.send_batch(sender, "consumer", "bench", pending)
                assert all(isinstance(x, str) for x in out), out[:3]
                pending.clear()
        self._flush = lambda: pending and bus.send_batch(sender, "consumer", "bench", pending)
        return send_batch

    def producer_done(self) -> None:
        flush = getattr(self, "_flush", None)
        if flush is not None:
            flush()

    def consumer(self) -> Any:
        bus = _bus(self.peer, self.root, max_inbox_size=self.capacity)
        n = BATCH if self.batch == 1 else self.batch

        def take() -> int:
            got = len(bus.consume_raw("consumer", n))
            if not got:
                time.sleep(0.0005)
            return got
        return take


def _ratio(name: str, value: float) -> None:
    RATIOS[name] = value


@pytest.mark.parametrize("side", ["floor", "send"])
def test_send_with_room(benchmark: Any, peer: RedisList, tmp_path: Path, pick: Any, side: str) -> None:
    import redis

    bus = _bus(peer, tmp_path, max_inbox_size=1_000_000_000)
    bus.init_message_bus("sink")
    r = redis.Redis(port=peer.port)
    sha = r.script_load("return 1")
    rounds = pick(3000, 3)
    if side == "floor":
        benchmark.pedantic(lambda: r.evalsha(sha, 0), rounds=rounds, iterations=1, warmup_rounds=pick(200, 0))
    else:
        benchmark.pedantic(lambda: bus.send_message("nobox", "sink", "bench", PAYLOAD), rounds=rounds,
                           iterations=1, warmup_rounds=pick(200, 0))
    bus.clear_inbox("sink")
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        FIGURES[f"send.{side}"] = float(stats.stats.median)
        if "send.floor" in FIGURES and "send.send" in FIGURES:
            q = FIGURES["send.send"] / FIGURES["send.floor"]
            benchmark.extra_info["send / evalsha round trip (target <= 1.3)"] = q
            _ratio("send with room / one EVALSHA round trip (<= 1.3x)", q)


def test_send_with_room_interleaved(benchmark: Any, peer: RedisList, tmp_path: Path, pick: Any) -> None:
    """The send row again, its two sides alternating in blocks (the order
    flipped every block), so the machine's drift cannot lean on one side:
    test_send_with_room times the floor's 3,000 rounds and then the sends',
    and read 1.28x-1.69x in seven runs of one hour. Each side's figure is the
    median of its blocks' per-call times."""
    import redis

    bus = _bus(peer, tmp_path, max_inbox_size=1_000_000_000)
    bus.init_message_bus("sink")
    r = redis.Redis(port=peer.port)
    sha = r.script_load("return 1")
    blocks, block = pick(30, 2), pick(100, 3)
    sides = {"floor": lambda: r.evalsha(sha, 0), "send": lambda: bus.send_message("nobox", "sink", "bench", PAYLOAD)}
    per_call: dict[str, list[float]] = {"floor": [], "send": []}

    def run() -> None:
        for k in range(blocks):
            for side in (("floor", "send") if k % 2 == 0 else ("send", "floor")):
                op = sides[side]
                t0 = time.perf_counter_ns()
                for _ in range(block):
                    op()
                per_call[side].append((time.perf_counter_ns() - t0) / block / 1e9)

    for op in sides.values():  # warm both
        for _ in range(pick(100, 0)):
            op()
    benchmark.pedantic(run, rounds=1, iterations=1)
    bus.clear_inbox("sink")
    f, s_ = statistics.median(per_call["floor"]), statistics.median(per_call["send"])
    benchmark.extra_info.update({"floor_s": f, "send_s": s_, "blocks": blocks, "block": block})
    if pick(True, False):
        FIGURES["send.floor_il"], FIGURES["send.send_il"] = f, s_
        _ratio("send with room / one EVALSHA round trip, interleaved (<= 1.3x)", s_ / f)


@pytest.mark.parametrize("senders", [1, 4])
def test_throughput_against_the_list_peer(benchmark: Any, peer: RedisList, tmp_path: Path, pick: Any,
                                          senders: int) -> None:
    total = pick(20_000, 400)
    rounds = pick(3, 1)
    systems = {"peer": peer, "cfn": CfnRedis(peer, 1), "batch": CfnRedis(peer, 100)}
    rates: dict[str, list[float]] = {k: [] for k in systems}
    k = 0
    for _ in range(rounds):  # round-robin: round k of each before round k+1 of any
        for name, system in systems.items():
            k += 1
            rates[name].append(run_round(system, tmp_path / f"r{k}", senders, total))
    med = {n: statistics.median(v) for n, v in rates.items()}
    benchmark.extra_info.update({f"{n}_msgs_per_s": v for n, v in med.items()})
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    if pick(True, False):
        q1, q2 = med["cfn"] / med["peer"], med["batch"] / med["peer"]
        benchmark.extra_info["per message / peer (target >= 1)"] = q1
        benchmark.extra_info["batch paths / peer (target >= 10)"] = q2
        _ratio(f"{senders}+1 per message / redis list+Lua peer (>= 1x)", q1)
        _ratio(f"{senders}+1 batch paths / redis list+Lua peer (>= 10x)", q2)
        for n, v in med.items():
            FIGURES[f"{senders}+1 {n} msg/s"] = v


def _blocked_sender(url: str, root: str, ready: Any, out: Any) -> None:
    from cfn_fast import Config, MessageBus

    bus = MessageBus(config=Config(base_dir=root, bus_url=url, max_inbox_size=1, backpressure_wait_ms=60_000,
                                   backpressure_max_retries=1, metrics_enabled=False))
    while True:
        ready.send(1)
        if not ready.recv():
            return
        bus.send_with_backpressure("s", "sink", "t", "1")
        out.send(time.clock_gettime_ns(time.CLOCK_MONOTONIC))


def test_resume_after_a_consume_on_another_process(benchmark: Any, peer: RedisList, tmp_path: Path,
                                                   pick: Any) -> None:
    ctx = mp.get_context("fork")
    bus = _bus(peer, tmp_path, max_inbox_size=1, metrics_enabled=False)
    bus.cleanup_message_bus("sink")
    bus.init_message_bus("sink")
    bus.send_message("s", "sink", "t", "0")
    ready_a, ready_b = ctx.Pipe()
    out_r, out_w = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_blocked_sender, args=(_url(peer), str(tmp_path / "child"), ready_b, out_w))
    child.start()
    samples = []
    try:
        for _ in range(pick(60, 3)):
            ready_a.recv()
            ready_a.send(True)
            while not any(s.agent == "sink" and s.waiters for s in bus.storage.slots()):
                time.sleep(0.0005)
            time.sleep(0.002)
            t0 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            assert len(bus.consume_raw("sink", 1)) == 1
            samples.append((out_r.recv() - t0) / 1e6)
        ready_a.recv()
        ready_a.send(False)
    finally:
        child.join(10)
        if child.is_alive():
            child.kill()
    med = statistics.median(samples)
    benchmark.extra_info["resume_ms_median"] = med
    benchmark.extra_info["resume_ms_p90"] = sorted(samples)[int(len(samples) * 0.9)]
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    if pick(True, False):
        FIGURES["resume median ms"] = med
        _ratio("resume median, ms (<= 2)", med)


def test_redis_ratios(benchmark: Any, pick: Any) -> None:
    """Prints this run's Redis figures and ratios (the measured run only)."""
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    benchmark.extra_info.update(RATIOS)
    if pick(True, False):
        lines = [f"  {k}: {v:.3g}" for k, v in {**FIGURES, **RATIOS}.items()]
        print("\ncfn-fast on Redis, this run:\n" + "\n".join(lines), flush=True)
        os.write(2, ("\n".join(lines) + "\n").encode())
