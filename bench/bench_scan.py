"""Counting an inbox: the O(1) counter, the authoritative scans, and the full
reconcile of many inboxes, each against ``len(os.listdir(inbox))``.

``os.listdir`` is the reference the issue names: one Python call that reads
the folder and builds a list of names (the bash original's ``ls | wc -l``
does more). ``reconcile(agent, force=False)`` takes the inbox's lock
exclusively and sets the shared counter from the folder; ``message_count``
scans only.

A reconcile may skip reading a folder whose mtime has not moved since its last
scan, so each reconcile is measured twice: *changed* (before every round, untimed,
a file is created in the inbox and removed again: the names are the same but
the folder has moved, so the names must be read) and *unchanged* (nothing
touches the folder between rounds). The references get the same untimed touch.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from conftest import fill, new_bus
from targets import SIZES

OPS = ("listdir", "size", "reconcile", "reconcile_unchanged", "count")
KEYS = {"listdir": "scan.listdir", "size": "size.cfn", "reconcile": "scan.reconcile",
        "reconcile_unchanged": "scan.reconcile_unchanged", "count": "scan.count"}
ROUNDS = {10: 3000, 100: 2000, 1_000: 500, 10_000: 100}


def toucher(inboxes: list[str]) -> Callable[[], None]:
    """Moves each folder's mtime without changing its names (the file is no *.json)."""
    def touch() -> None:
        for p in inboxes:
            f = f"{p}/.cfnbench-touch"
            os.close(os.open(f, os.O_WRONLY | os.O_CREAT, 0o600))
            os.unlink(f)
    return touch


@pytest.mark.parametrize("size,op", [(n, o) for n in SIZES for o in OPS],
                         ids=[f"{o}-{n}" for n in SIZES for o in OPS])
def test_scan(benchmark: Any, record: Any, workdir: Path, pick: Any, size: int, op: str) -> None:
    n = pick(size, min(size, 1000))
    benchmark.group = f"count, inbox holds {size}"
    bus = new_bus(workdir, max_inbox_size=10**7)
    bus.init_message_bus("b")
    fill(bus, "b", n)
    inbox = str(workdir / "messages" / "b" / "inbox")
    fns = {
        "listdir": lambda: len(os.listdir(inbox)),
        "size": lambda: bus.get_inbox_size("b"),
        "reconcile": lambda: bus.reconcile("b", False).count,
        "reconcile_unchanged": lambda: bus.reconcile("b", False).count,
        "count": lambda: bus.message_count("b"),
    }
    if op == "reconcile_unchanged":
        # a folder is trusted once a scan began well after its last change (50 ms in the C)
        time.sleep(0.1)
        bus.reconcile("b", False)
    if op == "size":
        got = benchmark(fns[op])  # nanoseconds a call: let pytest-benchmark calibrate loops
    else:
        setup = None if op == "reconcile_unchanged" else toucher([inbox])
        got = benchmark.pedantic(fns[op], setup=setup, rounds=pick(ROUNDS[size], 1),
                                 warmup_rounds=pick(10, 0))
    assert got == (n + 1 if op == "listdir" else n)  # listdir also sees inbox/.lock
    record(benchmark, f"{KEYS[op]}@{size}", size=size, op=op)


@pytest.fixture(scope="module")
def swarm(module_workdir: Path, pick: Any) -> Iterator[tuple[Any, list[str], list[str]]]:
    """1,000 inboxes of 100 messages each (20 of 10 in the smoke pass)."""
    agents_n, per = pick(1000, 20), pick(100, 10)
    bus = new_bus(module_workdir)
    agents = [f"agent-{i:04d}" for i in range(agents_n)]
    for a in agents:
        bus.init_message_bus(a)
        fill(bus, a, per)
    paths = [str(module_workdir / "messages" / a / "inbox") for a in agents]
    yield bus, agents, paths
    bus.close()


@pytest.mark.parametrize("op", ["listdir", "reconcile", "reconcile_unchanged"])
def test_reconcile_all(benchmark: Any, record: Any, swarm: Any, pick: Any, op: str) -> None:
    """Every inbox, with ``reconcile(agent)`` (force=True: claims of dead
    consumers returned, stale temporary files removed)."""
    bus, agents, paths = swarm
    benchmark.group = f"every inbox, {len(agents)} inboxes"
    fns = {
        "listdir": lambda: sum(len(os.listdir(p)) - 1 for p in paths),
        "reconcile": lambda: sum(bus.reconcile(a).count for a in agents),
        "reconcile_unchanged": lambda: sum(bus.reconcile(a).count for a in agents),
    }
    setup = None if op == "reconcile_unchanged" else toucher(paths)
    if op == "reconcile_unchanged":
        time.sleep(0.1)
        fns[op]()  # see test_scan: the last change must be well before a trusted scan
    total = benchmark.pedantic(fns[op], setup=setup, rounds=pick(15, 1), warmup_rounds=pick(1, 0))
    assert total == sum(len(os.listdir(p)) - 1 for p in paths)
    record(benchmark, f"all.{op}", inboxes=len(agents), messages=total, op=op)
