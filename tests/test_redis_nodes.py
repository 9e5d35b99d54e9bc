"""Swarms across hosts: "nodes" are separate processes, each with its own
local base folder and state file (MESSAGE_BASE_DIR), sharing one Redis server
or one Redis Cluster. Capacity holds cluster-wide, consumption is exactly
once, and a consumer killed between claim and ack loses nothing."""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import tempfile
import threading
import time
from typing import Any

import pytest

from cfn_fast import BackpressureTimeout, Config, MessageBus

CTX = mp.get_context("fork")
pytestmark = pytest.mark.slow


def _node_bus(**settings: Any) -> MessageBus:
    """A bus as a process on another host has it: its own base folder and state file."""
    # in the test's own folder (removed with it), apart from every other node's
    base = tempfile.mkdtemp(prefix="node-", dir=os.path.dirname(os.environ["MESSAGE_BASE_DIR"]))
    cfg = Config.from_env().replace(base_dir=base, metrics_file=os.path.join(base, "m.jsonl"),
                                    alert_log_file=os.path.join(base, "a.jsonl"), **settings)
    bus = MessageBus(config=cfg)
    bus.init_message_bus_system()  # the node's local base folder and state file
    return bus


def _sender(node: int, rank: int, per: int, settings: dict[str, Any], out: "mp.Queue[Any]") -> None:
    bus = _node_bus(**settings)
    ok: list[str] = []
    timeouts = 0
    for i in range(per):
        try:
            ok.append(bus.send_with_backpressure(f"n{node}s{rank}", "sink", "t", {"n": node, "s": rank, "i": i}))
        except BackpressureTimeout:
            timeouts += 1
    out.put((node, rank, ok, timeouts))


def _node(node: int, senders: int, per: int, settings: dict[str, Any], out: "mp.Queue[Any]") -> None:
    """One node: its senders are its own processes."""
    procs = [CTX.Process(target=_sender, args=(node, r, per, settings, out)) for r in range(senders)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()


def _sample(bus: MessageBus, stop: threading.Event, peak: list[int]) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], bus.get_inbox_size("sink"), bus.message_count("sink"))


def _run_nodes(nodes: int, senders: int, per: int, settings: dict[str, Any]) -> list[Any]:
    out: "mp.Queue[Any]" = CTX.Queue()
    procs = [CTX.Process(target=_node, args=(n, senders, per, settings, out)) for n in range(nodes)]
    for p in procs:
        p.start()
    results = [out.get(timeout=240) for _ in range(nodes * senders)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results


def test_three_nodes_never_pass_capacity_together(redis_url: str) -> None:
    watcher = _node_bus(max_inbox_size=300)
    watcher.init_message_bus("sink")
    stop, peak = threading.Event(), [0]
    sampler = threading.Thread(target=_sample, args=(watcher, stop, peak))
    sampler.start()
    try:
        results = _run_nodes(3, 4, 40, dict(max_inbox_size=300, backpressure_wait_ms=5,
                                            backpressure_max_retries=4))
    finally:
        stop.set()
        sampler.join()
    delivered = [mid for _, _, ok, _ in results for mid in ok]
    timeouts = sum(t for *_, t in results)
    assert len(delivered) == 300 and timeouts == 3 * 4 * 40 - 300
    held = [m["msg_id"] for m in watcher.receive_messages("sink")]
    assert sorted(held) == sorted(delivered) and len(set(held)) == 300  # 0 lost, 0 duplicated
    assert peak[0] <= 300 and watcher.get_inbox_size("sink") == 300


def _consumer(total: int, out: "mp.Queue[Any]") -> None:
    bus = _node_bus()
    got: list[tuple[int, int, int]] = []
    deadline = time.monotonic() + 200
    while len(got) < total and time.monotonic() < deadline:
        batch = bus.consume_messages("sink", 10)
        got += [(m["payload"]["n"], m["payload"]["s"], m["payload"]["i"]) for m in batch]
        if not batch:
            time.sleep(0.001)
    out.put(got)


def test_a_fourth_node_drains_through_capacity_50_exactly_once_in_order(redis_url: str) -> None:
    watcher = _node_bus(max_inbox_size=50)
    watcher.init_message_bus("sink")
    per = 60
    total = 3 * 4 * per
    got_q: "mp.Queue[Any]" = CTX.Queue()
    consumer = CTX.Process(target=_consumer, args=(total, got_q))
    consumer.start()
    stop, peak = threading.Event(), [0]
    sampler = threading.Thread(target=_sample, args=(watcher, stop, peak))
    sampler.start()
    try:
        results = _run_nodes(3, 4, per, dict(max_inbox_size=50, backpressure_wait_ms=50,
                                             backpressure_max_retries=10_000))
        got = got_q.get(timeout=240)
    finally:
        stop.set()
        sampler.join()
        consumer.join(timeout=30)
    assert sum(t for *_, t in results) == 0 and sum(len(ok) for _, _, ok, _ in results) == total
    assert sorted(got) == sorted((n, s, i) for n in range(3) for s in range(4) for i in range(per))
    for n in range(3):  # each sender's messages were consumed in its order
        for s in range(4):
            assert [i for nn, ss, i in got if (nn, ss) == (n, s)] == list(range(per))
    assert peak[0] <= 50 and watcher.get_inbox_size("sink") == 0


def _claim_and_hang(ready: "mp.Event") -> None:
    bus = _node_bus(claim_timeout_ms=600)
    bus.claim_messages("sink", 3)
    ready.set()
    time.sleep(120)


def test_a_consumer_killed_between_claim_and_ack_loses_nothing(redis_url: str) -> None:
    other = _node_bus(claim_timeout_ms=600)
    other.init_message_bus("sink")
    ids = [other.send_message("src", "sink", "t", i) for i in range(5)]
    ready = CTX.Event()
    child = CTX.Process(target=_claim_and_hang, args=(ready,))
    child.start()
    assert ready.wait(30)
    assert other.message_count("sink") == 2 and other.get_inbox_size("sink") == 5
    # a live claimer keeps its claims past the visibility timeout: it renews its lease
    time.sleep(1.0)
    assert sorted(m["msg_id"] for m in other.consume_messages("sink")) == sorted(ids[3:])
    os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
    child.join()
    deadline = time.monotonic() + 10
    again: list[str] = []
    while len(again) < 3 and time.monotonic() < deadline:  # back after the timeout, on their own
        again += [m["msg_id"] for m in other.claim_messages("sink")]
        time.sleep(0.05)
    assert sorted(again) == sorted(ids[:3])
    assert other.ack_messages("sink", again) == 3 and other.get_inbox_size("sink") == 0


def test_recover_on_another_node_returns_a_dead_consumers_claims(redis_url: str) -> None:
    import subprocess
    import sys

    other = _node_bus(claim_timeout_ms=300)
    other.init_message_bus("sink")
    ids = [other.send_message("src", "sink", "t", i) for i in range(4)]
    ready = CTX.Event()
    child = CTX.Process(target=_claim_and_hang, args=(ready,))
    child.start()
    assert ready.wait(30)
    os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
    child.join()
    time.sleep(0.8)
    env = dict(os.environ, MESSAGE_BASE_DIR=other.base_dir)
    r = subprocess.run([sys.executable, "-m", "cfn_fast", "bus", "recover"], capture_output=True, text=True,
                       timeout=60, env=env)
    assert (r.returncode, r.stdout) == (0, "3\n"), r.stderr
    assert sorted(m["msg_id"] for m in other.consume_messages("sink")) == sorted(ids)
