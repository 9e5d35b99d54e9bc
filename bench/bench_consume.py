"""Taking the oldest messages: ``consume_messages(agent, 10)`` at inbox depths
10 to 10,000, against the same work in plain ``os`` calls (list the folder,
sort the names, then for the oldest 10: rename into a claim folder, read,
unlink). The issue's point: claiming the oldest message must not cost a scan
of the whole inbox. Each round's 10 messages are put back (untimed) first.

A third side, ``floor_cached``, is the same plain-``os`` consumer keeping the
sorted listing of its last scan and taking from it until it runs out: what a
consumer that does not rescan per batch costs (orientation for the C side).
"""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import PAYLOAD, fill, new_bus
from peers import read_whole
from targets import SIZES

BATCH = 10


class FloorConsumer:
    def __init__(self, root: Path) -> None:
        self.inbox, self.claims = root / "inbox", root / "claims"
        self.inbox.mkdir(parents=True)
        self.claims.mkdir()
        self.n = 0
        self.data = PAYLOAD.encode()
        self.pending: list[str] = []

    def put(self, k: int) -> None:
        for _ in range(k):
            self.n += 1
            tmp, name = self.inbox / f".{self.n}.tmp", self.inbox / f"msg-1-{self.n:010d}-0.json"
            tmp.write_bytes(self.data)
            tmp.rename(name)

    def take(self, k: int, cached: bool = False) -> int:
        inbox, claims = str(self.inbox), str(self.claims)
        if not cached:
            names = sorted(n for n in os.listdir(inbox) if n.endswith(".json"))[:k]
        else:
            if not self.pending:
                self.pending = sorted((n for n in os.listdir(inbox) if n.endswith(".json")), reverse=True)
            names = [self.pending.pop() for _ in range(min(k, len(self.pending)))]
        for n in names:
            os.rename(f"{inbox}/{n}", f"{claims}/{n}")
            with open(f"{claims}/{n}", "rb") as f:
                f.read()
            os.unlink(f"{claims}/{n}")
        return len(names)


SIDES = ("floor", "floor_cached", "cfn")


@pytest.mark.parametrize("size,side", [(n, s) for n in SIZES for s in SIDES],
                         ids=[f"{s}-{n}" for n in SIZES for s in SIDES])
def test_consume(benchmark: Any, record: Any, workdir: Path, pick: Any, size: int, side: str) -> None:
    n = pick(size, min(size, 1000))
    benchmark.group = f"take the oldest {BATCH}, inbox holds {size}"
    if side.startswith("floor"):
        floor = FloorConsumer(workdir / "floor")
        floor.put(n)
        cached = side == "floor_cached"

        def refill() -> None:
            floor.put(BATCH)

        def take() -> int:
            return floor.take(BATCH, cached)
    else:
        bus = new_bus(workdir, max_inbox_size=10**7)
        bus.init_message_bus("b")
        fill(bus, "b", n)

        def refill() -> None:
            fill(bus, "b", BATCH)

        def take() -> int:
            return len(bus.consume_messages("b", BATCH))

    got = benchmark.pedantic(take, setup=refill, rounds=pick(300, 1), warmup_rounds=pick(10, 0))
    assert got == BATCH
    record(benchmark, f"consume.{side}@{size}", size=size, side=side)


# -- issue 15: draining 1,000 messages in batches of 100 -----------------------------

DRAIN, DRAIN_BATCH = 1000, 100
DRAIN_SIDES = ("floor_rw", "cfn", "floor_rw_raw", "cfn_raw")


def _drain_floor(inbox_fd: int, decode: bool) -> int:
    """The plain-os floor: one listing, then read and unlink each file, oldest first."""
    import json

    got = 0
    for name in sorted(n for n in os.listdir(inbox_fd) if n.endswith(".json")):
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=inbox_fd)
        try:
            data = read_whole(fd)
        finally:
            os.close(fd)
        if decode:
            json.loads(data)
        os.unlink(name, dir_fd=inbox_fd)
        got += 1
    return got


@pytest.mark.parametrize("side", DRAIN_SIDES)
def test_drain(benchmark: Any, record: Any, workdir: Path, pick: Any, side: str) -> None:
    """consume_messages (decoded) against read + json.loads + unlink, and
    consume_raw against read + unlink, over the same 1,000 files (refilled,
    untimed, before each round)."""
    n = pick(DRAIN, 200)
    benchmark.group = f"drain {DRAIN} messages in batches of {DRAIN_BATCH}"
    bus = new_bus(workdir, max_inbox_size=10**7)
    bus.init_message_bus("b")
    inbox_fd = os.open(workdir / "messages" / "b" / "inbox", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def refill() -> None:
        fill(bus, "b", n)

    def drain() -> int:
        if side.startswith("floor"):
            return _drain_floor(inbox_fd, decode=not side.endswith("raw"))
        take = bus.consume_raw if side.endswith("raw") else bus.consume_messages
        got = 0
        while got < n:
            got += len(take("b", DRAIN_BATCH))
        return got

    assert benchmark.pedantic(drain, setup=refill, rounds=pick(20, 1), warmup_rounds=pick(1, 0)) == n
    os.close(inbox_fd)
    record(benchmark, f"drain.{side}", side=side)


def test_drain_interleaved(benchmark: Any, record: Any, workdir: Path, pick: Any) -> None:
    """The consume_raw drain row again, its two sides alternating round by
    round (the order flipped every round, each round's 1,000 files refilled
    untimed first), so the machine's drift cannot lean on one side: test_drain
    times each side's 20 rounds one after the other, and with an honest floor
    its ratio still moved 0.90x-1.54x in three runs of one hour. Each side's
    figure is the median of its rounds."""
    n, rounds = pick(DRAIN, 200), pick(20, 2)
    bus = new_bus(workdir, max_inbox_size=10**7)
    bus.init_message_bus("b")
    inbox_fd = os.open(workdir / "messages" / "b" / "inbox", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    times: dict[str, list[float]] = {"floor_rw_raw": [], "cfn_raw": []}

    def drain(side: str) -> int:
        if side == "floor_rw_raw":
            return _drain_floor(inbox_fd, decode=False)
        got = 0
        while got < n:
            got += len(bus.consume_raw("b", DRAIN_BATCH))
        return got

    def run() -> None:
        for r in range(rounds):
            for side in (("floor_rw_raw", "cfn_raw") if r % 2 == 0 else ("cfn_raw", "floor_rw_raw")):
                fill(bus, "b", n)
                t0 = time.perf_counter_ns()
                assert drain(side) == n
                times[side].append((time.perf_counter_ns() - t0) / 1e9)

    benchmark.group = f"drain {DRAIN} messages in batches of {DRAIN_BATCH}, interleaved"
    benchmark.pedantic(run, rounds=1, iterations=1)
    os.close(inbox_fd)
    for side, ts in times.items():
        record(benchmark, f"drain.{side}_il", statistics.median(ts), rounds=rounds)

