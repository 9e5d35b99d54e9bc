"""The priority lane: a high-priority send may fill the inbox past its
capacity by the headroom (CFN_PRIORITY_HEADROOM_PCT of it), so it gets in
while normal traffic holds the inbox full; a normal send never uses the
headroom, and the inbox never holds more than capacity + headroom, however
many processes send. Consumers take high messages first, but at most
CFN_PRIORITY_RATIO in a row while normal ones wait (a ratio, not aging: a
steady stream of high messages still lets normal ones through). A high
message's envelope carries "priority": "high" and its id ends in -hi, so a
bash reader still reads it, in (timestamp, sequence) order."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cfn_fast import Config, InboxFull, InvalidArgument, MessageBus
from cfn_fast.errors import ConfigError
from test_interop import FIELDS, bash_receive

CTX = mp.get_context("fork")


def _bus_with(make_bus, cap: int, headroom_pct: int, **settings: object) -> MessageBus:
    bus = make_bus(max_inbox_size=cap, priority_headroom_pct=headroom_pct, **settings)
    bus.init_message_bus("bob")
    return bus


def test_normal_sends_never_use_the_headroom_and_high_ones_stop_at_its_end(backend: str, make_bus) -> None:
    bus = _bus_with(make_bus, cap=4, headroom_pct=50)  # two places of headroom
    for i in range(4):
        bus.send_message("alice", "bob", "t", i)
    with pytest.raises(InboxFull, match=r"full \(4 messages\)"):
        bus.send_message("alice", "bob", "t", {"v": "n"})
    highs = [bus.send_message("alice", "bob", "t", {"v": f"h{i}"}, priority="high") for i in range(2)]
    assert all(h.endswith("-hi") for h in highs)
    with pytest.raises(InboxFull, match="2 places of high-priority headroom"):
        bus.send_message("alice", "bob", "t", {"v": "h2"}, priority="high")
    assert bus.get_inbox_size("bob") == 6
    assert [m["payload"]["v"] for m in bus.consume_messages("bob", 1)] == ["h0"]  # high first
    with pytest.raises(InboxFull):  # 5 held: still past the capacity a normal send may fill
        bus.send_message("alice", "bob", "t", {"v": "n"})
    bus.send_message("alice", "bob", "t", {"v": "h3"}, priority="high")
    bus.consume_messages("bob", 3)  # h1, h3 and 0
    bus.send_message("alice", "bob", "t", {"v": "n"})
    assert bus.get_inbox_size("bob") == 4


def test_consumers_take_high_first_but_no_more_than_the_ratio_in_a_row(backend: str, make_bus) -> None:
    bus = _bus_with(make_bus, cap=100, headroom_pct=10, priority_ratio=3)
    for i in range(4):
        bus.send_message("alice", "bob", "t", {"v": f"n{i}"})
    for i in range(7):
        bus.send_message("alice", "bob", "t", {"v": f"h{i}"}, priority="high")
    got = [m["payload"]["v"] for m in bus.consume_messages("bob", 2)]
    got += [m["payload"]["v"] for m in bus.consume_messages("bob")]
    assert got == ["h0", "h1", "h2", "n0", "h3", "h4", "h5", "n1", "h6", "n2", "n3"]
    # in a later read, a high message that arrived meanwhile still goes first
    for i in range(3):
        bus.send_message("alice", "bob", "t", {"v": f"m{i}"})
    assert [m["payload"]["v"] for m in bus.consume_messages("bob", 1)] == ["m0"]
    bus.send_message("alice", "bob", "t", {"v": "late"}, priority="high")
    assert [m["payload"]["v"] for m in bus.consume_messages("bob", 1)] == ["late"]
    # what receive_messages shows stays in time order, whatever the priority
    assert [m["payload"]["v"] for m in bus.receive_messages("bob")] == ["m1", "m2"]


def test_claims_come_back_with_their_priority(backend: str, make_bus) -> None:
    bus = _bus_with(make_bus, cap=10, headroom_pct=10)
    bus.send_message("alice", "bob", "t", {"v": "n"})
    bus.send_message("alice", "bob", "t", {"v": "h"}, priority="high")
    claimed = bus.claim_messages("bob", 1)
    assert [m["payload"]["v"] for m in claimed] == ["h"] and claimed[0]["priority"] == "high"
    assert bus.storage.put_back("bob", [(claimed[0]["msg_id"] + ".json").encode()]) == 1
    assert [m["payload"]["v"] for m in bus.consume_messages("bob", 1)] == ["h"]


def test_priority_comes_from_the_call_the_environment_or_the_cli(backend: str, make_bus,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    bus = _bus_with(make_bus, cap=1, headroom_pct=100)
    with pytest.raises(InvalidArgument):
        bus.send_message("alice", "bob", "t", 1, priority="urgent")
    with pytest.raises(ConfigError, match="CFN_PRIORITY"):
        Config.from_env({"CFN_PRIORITY": "urgent"})
    monkeypatch.setenv("MAX_INBOX_SIZE", "1")
    monkeypatch.setenv("CFN_PRIORITY_HEADROOM_PCT", "100")

    def cli(*args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cfn_fast", *args], capture_output=True, text=True,
                              timeout=60, env=dict(os.environ, **env))

    assert cli("bus", "send", "a", "bob", "t", "1").returncode == 0
    assert cli("bus", "send", "a", "bob", "t", "2").returncode == 1
    r = cli("bus", "send", "a", "bob", "t", "3", CFN_PRIORITY="high")  # the drop-in's way
    assert r.returncode == 0 and r.stdout.strip().endswith("-hi")
    r = cli("bus", "send", "--priority", "high", "a", "bob", "t", "4")
    assert r.returncode == 1 and "1 places of high-priority headroom" in r.stderr  # the one is taken
    assert cli("bus", "send", "--priority", "normal", "a", "bob", "t", "5", CFN_PRIORITY="high").returncode == 1
    got = json.loads(cli("bus", "consume", "bob").stdout)
    assert [m["payload"] for m in got] == [3, 1] and got[0]["priority"] == "high" and "priority" not in got[1]


def test_a_bash_reader_reads_high_messages_in_time_order(base: Path, workdir: Path, make_bus) -> None:
    bus = _bus_with(make_bus, cap=10, headroom_pct=10)
    ids = [bus.send_message("alice", "bob", "t", 0),
           bus.send_message("alice", "bob", "t", 1, priority="high"),
           bus.send_message("alice", "bob", "t", 2)]
    count, messages = bash_receive("bob", workdir)
    assert count == 3 and [m["msg_id"] for m in messages] == ids  # sorted by timestamp, then sequence
    assert list(messages[1]) == FIELDS[:7] + ["priority"] + FIELDS[7:]
    assert sorted(n for n in os.listdir(base / "bob" / "inbox") if n.endswith(".json")) == [f"{i}.json" for i in ids]


def _mixed_sender(rank: int, high: bool, n: int, out: "mp.Queue[tuple[int, bool, list[int]]]") -> None:
    bus = MessageBus(config=Config.from_env().replace(max_inbox_size=20, priority_headroom_pct=25,
                                                      backpressure_wait_ms=5, backpressure_max_retries=20_000))
    waited = []
    for i in range(n):
        res = bus.deliver(f"s{rank}", "bob", "t", {"s": rank, "i": i}, priority="high" if high else "normal")
        waited.append(res.waited_ns)
        if high:
            time.sleep(0.1)  # the high lane: occasional and urgent
    out.put((rank, high, waited))


def _slow_consumer(stop: "mp.Event", ready: "mp.Event", out: "mp.Queue[list[tuple[int, int]]]") -> None:
    bus = MessageBus(config=Config.from_env().replace(priority_ratio=4))
    got: list[tuple[int, int]] = []
    while True:
        batch = bus.consume_messages("bob", 1)
        ready.set()  # draining: the high lane starts now, not while this process still starts up
        got += [(m["payload"]["s"], m["payload"]["i"]) for m in batch]
        if not batch and stop.is_set():
            break
        time.sleep(0.002)
    out.put(got)


def test_eight_processes_of_mixed_priorities_never_pass_capacity_plus_headroom(backend: str, make_bus,
                                                                              base: Path) -> None:
    bus = _bus_with(make_bus, cap=20, headroom_pct=25)  # 5 places of headroom
    peaks = {"all": 0, "normal": 0}
    stop_sampling = threading.Event()

    def sample() -> None:
        while not stop_sampling.is_set():
            if backend == "file":
                names = [n for n in os.listdir(base / "bob" / "inbox") if n.endswith(".json")]
                peaks["normal"] = max(peaks["normal"], sum(not n.endswith("-hi.json") for n in names))
                peaks["all"] = max(peaks["all"], len(names))
            else:
                peaks["all"] = max(peaks["all"], bus.get_inbox_size("bob"))
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    results: "mp.Queue[tuple[int, bool, list[int]]]" = CTX.Queue()
    consumed: "mp.Queue[list[tuple[int, int]]]" = CTX.Queue()
    stop, ready = CTX.Event(), CTX.Event()
    consumer = CTX.Process(target=_slow_consumer, args=(stop, ready, consumed))
    senders = [CTX.Process(target=_mixed_sender, args=(r, r >= 4, 5 if r >= 4 else 30, results)) for r in range(8)]
    for p in senders[:4]:
        p.start()
    time.sleep(0.3)  # normal traffic fills the inbox before anyone drains it
    consumer.start()
    assert ready.wait(60)
    for p in senders[4:]:
        p.start()
    outcomes = [results.get(timeout=120) for _ in senders]
    stop.set()
    got = consumed.get(timeout=60)
    for p in senders + [consumer]:
        p.join(30)
    stop_sampling.set()
    sampler.join()
    assert sorted(got) == sorted((r, i) for r in range(8) for i in range(5 if r >= 4 else 30))  # each once
    assert 20 <= peaks["all"] <= 25, peaks
    assert peaks["normal"] <= 20
    high_waits = [w for _, high, ws in outcomes if high for w in ws]
    normal_waits = [w for _, high, ws in outcomes if not high for w in ws]
    assert sum(normal_waits) > 0  # the normal lane was held back...
    assert sorted(high_waits)[len(high_waits) * 9 // 10] == 0  # ...while the high lane went straight in
