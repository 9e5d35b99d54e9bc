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
from pathlib import Path
from typing import Any

import pytest

from conftest import PAYLOAD, fill, new_bus
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
