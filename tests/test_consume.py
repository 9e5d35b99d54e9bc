"""Consumption is exactly-once with several consumers and senders at once,
and at-least-once through claims when a consumer dies."""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

from cfn_fast import BackpressureTimeout, Config, MessageBus

CTX = mp.get_context("fork")
SENDERS, PER_SENDER, CONSUMERS = 3, 200, 3


def _sender(base: str, rank: int) -> None:
    bus = MessageBus(base, Config.from_env().replace(max_inbox_size=50, backpressure_wait_ms=5,
                                                     backpressure_max_retries=2000))
    for i in range(PER_SENDER):
        bus.send_with_backpressure(f"s{rank}", "sink", "t", {"s": rank, "i": i})


def _consumer(base: str, out: "mp.Queue[list[tuple[int, int, int]]]", stop: "mp.Event") -> None:
    bus = MessageBus(base)
    got: list[tuple[int, int, int]] = []
    while True:
        batch = bus.consume_messages("sink", 7)
        got += [(m["payload"]["s"], m["payload"]["i"], m["sequence"]) for m in batch]
        if not batch:
            if stop.is_set() and not bus.consume_messages("sink", 0) and bus.message_count("sink") == 0:
                break
            time.sleep(0.001)
    out.put(got)


def test_exactly_once_with_concurrent_senders_and_consumers(make_bus) -> None:
    bus = make_bus()
    bus.init_message_bus("sink")
    out: "mp.Queue[list[tuple[int, int, int]]]" = CTX.Queue()
    stop = CTX.Event()
    consumers = [CTX.Process(target=_consumer, args=(bus.base_dir, out, stop)) for _ in range(CONSUMERS)]
    senders = [CTX.Process(target=_sender, args=(bus.base_dir, r)) for r in range(SENDERS)]
    for p in consumers + senders:
        p.start()
    for p in senders:
        p.join(timeout=120)
        assert p.exitcode == 0
    stop.set()
    results = [out.get(timeout=60) for _ in consumers]
    for p in consumers:
        p.join(timeout=30)
    everything = [x for r in results for x in r]
    assert len(everything) == SENDERS * PER_SENDER
    assert sorted((s, i) for s, i, _ in everything) == [(s, i) for s in range(SENDERS) for i in range(PER_SENDER)]
    # every consumer's share of one sender comes in that sender's sequence order
    for got in results:
        for s in range(SENDERS):
            seqs = [seq for snd, _, seq in got if snd == s]
            assert seqs == sorted(seqs)
    assert bus.get_inbox_size("sink") == 0


def _claim_and_hang(base: str, ready: "mp.Event") -> None:
    bus = MessageBus(base)
    bus.claim_messages("sink", 3)
    ready.set()
    time.sleep(60)


def _start_claimer(bus: MessageBus) -> "mp.process.BaseProcess":
    """A consumer process that has claimed 3 messages of sink and hangs before acking."""
    ready = CTX.Event()
    child = CTX.Process(target=_claim_and_hang, args=(bus.base_dir, ready))
    child.start()
    assert ready.wait(30)
    return child


def _kill(child: "mp.process.BaseProcess") -> None:
    os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
    child.join()


def test_claims_of_a_killed_consumer_are_delivered_again(make_bus, base: Path) -> None:
    bus = make_bus(max_inbox_size=5, backpressure_wait_ms=1, backpressure_max_retries=1)
    bus.init_message_bus("sink")
    ids = [bus.send_message("src", "sink", "t", i) for i in range(5)]
    child = _start_claimer(bus)
    assert bus.message_count("sink") == 2
    try:  # claimed messages still hold their places: no overshoot when they come back
        bus.send_with_backpressure("src", "sink", "t", 99)
        raise AssertionError("inbox should be full")
    except BackpressureTimeout:
        pass
    _kill(child)
    assert bus.recover("sink") == 3
    assert sorted(m["msg_id"] for m in bus.consume_messages("sink")) == sorted(ids)
    assert bus.get_inbox_size("sink") == 0
    assert not [d for d in os.listdir(base / "sink" / ".claims") if d.startswith(f"{child.pid}.")]


def test_recover_command_returns_a_dead_consumers_claims(make_bus) -> None:
    import subprocess
    import sys

    bus = make_bus()
    bus.init_message_bus("sink")
    ids = [bus.send_message("src", "sink", "t", i) for i in range(4)]
    _kill(_start_claimer(bus))
    out = subprocess.run([sys.executable, "-m", "cfn_fast", "bus", "recover"], capture_output=True, text=True,
                         timeout=60)
    assert (out.returncode, out.stdout) == (0, "3\n")
    assert sorted(m["msg_id"] for m in bus.consume_messages("sink")) == sorted(ids)
