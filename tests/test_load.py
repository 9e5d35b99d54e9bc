"""The seed's own load test, at full size, and the failure modes that broke the
original: every send is delivered exactly once or reported as failed, and the
inbox is never seen above capacity."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cfn_fast import BackpressureTimeout, Config, MessageBus

CTX = mp.get_context("fork")
pytestmark = pytest.mark.slow


class Sampler:
    """Counts the inbox's *.json files as fast as it can while a test runs."""

    def __init__(self, inbox: Path) -> None:
        self.inbox, self.peak, self.samples = inbox, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            n = sum(1 for name in os.listdir(self.inbox) if name.endswith(".json"))
            self.peak, self.samples = max(self.peak, n), self.samples + 1

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def delivered(inbox: Path) -> dict[str, dict]:
    return {n[:-5]: json.loads((inbox / n).read_text()) for n in os.listdir(inbox) if n.endswith(".json")}


def _thread_senders(base: str, proc: int, threads: int, out: "mp.Queue[list]") -> None:
    bus = MessageBus(base, Config.from_env().replace(
        max_inbox_size=1000, backpressure_wait_ms=20, backpressure_max_retries=5))
    results: list = [None] * threads
    start = threading.Barrier(threads)

    def one(t: int) -> None:
        start.wait()
        try:
            results[t] = ("ok", bus.send_with_backpressure(f"p{proc}", "receiver", "test", {"msg": [proc, t]}))
        except BackpressureTimeout:
            results[t] = ("failed", [proc, t])

    workers = [threading.Thread(target=one, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    out.put(results)


def test_seed_load_test_2000_senders_capacity_1000(base: Path, make_bus) -> None:
    make_bus().init_message_bus("receiver")
    inbox = base / "receiver" / "inbox"
    out: "mp.Queue[list]" = CTX.Queue()
    procs = [CTX.Process(target=_thread_senders, args=(str(base), p, 200, out)) for p in range(10)]
    t0 = time.monotonic()
    with Sampler(inbox) as sampler:
        for p in procs:
            p.start()
        results = [r for _ in procs for r in out.get(timeout=240)]
        for p in procs:
            p.join(timeout=60)
    wall = time.monotonic() - t0
    ok = {mid for kind, mid in results if kind == "ok"}
    failed = [who for kind, who in results if kind == "failed"]
    files = delivered(inbox)
    assert len(results) == 2000
    assert len(ok) == 1000 and len(failed) == 1000  # exactly capacity, the rest reported
    assert set(files) == ok                          # 0 lost: every success has its file
    payloads = [tuple(m["payload"]["msg"]) for m in files.values()]
    assert len(set(payloads)) == 1000                # 0 duplicated
    assert not set(payloads) & {tuple(w) for w in failed}  # nothing reported failed was delivered
    assert sampler.peak <= 1000 and sampler.samples > 0
    print(f"\nseed load test: delivered={len(ok)} failed={len(failed)} lost=0 duplicated=0 "
          f"peak={sampler.peak} samples={sampler.samples} wall={wall:.2f}s")


def test_cli_load_test_200_processes_capacity_100(base: Path, make_bus) -> None:
    make_bus().init_message_bus("receiver")
    env = dict(os.environ, MAX_INBOX_SIZE="100", BACKPRESSURE_WAIT_MS="50", BACKPRESSURE_MAX_RETRIES="4")
    inbox = base / "receiver" / "inbox"
    with Sampler(inbox) as sampler:
        procs = [
            subprocess.Popen([sys.executable, "-m", "cfn_fast", "send-backpressure", f"s{i}", "receiver", "test",
                              json.dumps({"msg": i})], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for i in range(200)
        ]
        outcomes = [(p.wait(timeout=240), p.stdout.read().decode(), p.stderr.read().decode()) for p in procs]  # type: ignore[union-attr]
    codes = [c for c, _, _ in outcomes]
    assert sorted(set(codes)) == [0, 1], outcomes[:3]
    assert codes.count(0) == 100 and codes.count(1) == 100
    files = delivered(inbox)
    assert len(files) == 100 and sampler.peak <= 100
    assert len({m["payload"]["msg"] for m in files.values()}) == 100


def _drain_sender(base: str, rank: int, n: int) -> None:
    bus = MessageBus(base, Config.from_env().replace(max_inbox_size=100, backpressure_max_retries=200))
    for i in range(n):
        bus.send_with_backpressure(f"s{rank:02d}", "sink", "t", {"s": rank, "i": i})


def test_twenty_senders_through_a_small_inbox_with_a_consumer(base: Path, make_bus) -> None:
    bus = make_bus(max_inbox_size=100)
    bus.init_message_bus("sink")
    senders = [CTX.Process(target=_drain_sender, args=(str(base), r, 500)) for r in range(20)]
    got: list[dict] = []
    with Sampler(base / "sink" / "inbox") as sampler:
        for p in senders:
            p.start()
        deadline = time.monotonic() + 240
        while len(got) < 10_000 and time.monotonic() < deadline:
            batch = bus.consume_messages("sink", 64)
            got += batch
            if not batch:
                time.sleep(0.0005)
        for p in senders:
            p.join(timeout=60)
            assert p.exitcode == 0
    assert len(got) == 10_000
    pairs = [(m["payload"]["s"], m["payload"]["i"]) for m in got]
    assert sorted(pairs) == [(s, i) for s in range(20) for i in range(500)]  # each exactly once
    for s in range(20):  # each sender's messages in its sequence order
        mine = [m for m in got if m["payload"]["s"] == s]
        assert [m["payload"]["i"] for m in mine] == list(range(500))
        assert [m["sequence"] for m in mine] == sorted(m["sequence"] for m in mine)
    assert sampler.peak <= 100 and bus.consume_messages("sink") == []


def _send_forever(base: str) -> None:
    bus = MessageBus(base, Config.from_env().replace(max_inbox_size=1_000_000))
    i = 0
    while True:
        bus.send_message("killer", "victim", "t", {"i": i, "pad": "x" * 2000})
        i += 1


def test_senders_killed_at_random_points_leave_nothing_half_written(base: Path, make_bus) -> None:
    bus = make_bus(max_inbox_size=1_000_000)
    bus.init_message_bus("victim")
    inbox = base / "victim" / "inbox"
    bad: list[str] = []
    stop = threading.Event()

    def check() -> None:  # a reader that must never see a partial or invalid message
        while not stop.is_set():
            for name in os.listdir(inbox):
                if name.endswith(".json"):
                    try:
                        json.loads((inbox / name).read_bytes())
                    except FileNotFoundError:
                        pass
                    except ValueError:
                        bad.append(name)

    checker = threading.Thread(target=check)
    checker.start()
    rng = random.Random(5)
    try:
        for _ in range(100):
            child = CTX.Process(target=_send_forever, args=(str(base),))
            child.start()
            time.sleep(rng.uniform(0.0, 0.02))
            os.kill(child.pid, signal.SIGKILL)
            child.join()
    finally:
        stop.set()
        checker.join()
    assert bad == []
    files = [n for n in os.listdir(inbox) if n.endswith(".json")]
    res = bus.reconcile("victim")  # leaked reservations and stale temporaries go here
    assert res.count == len(files) == bus.get_inbox_size("victim")
    assert [n for n in os.listdir(inbox) if not n.endswith(".json")] == [".lock"]
    for m in bus.receive_messages("victim"):
        assert m["from"] == "killer"
