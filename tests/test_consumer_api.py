"""Consumers as Python developers expect them: ``consume(agent, max, timeout)``
sleeps on the inbox's arrival futex until a message comes (senders bump it
after linking; no polling), ``for msg in bus.messages(agent)`` iterates as
they come, ``nack_messages`` puts a claimed message back for the next
consumer, messages are a typed ``Message``, ``Config.from_env(**overrides)``
keeps the environment's paths, and alerts and warnings go through the
``cfn_fast`` logger."""
from __future__ import annotations

import multiprocessing as mp
import os
import resource
import time
from pathlib import Path

import pytest

import bash_original as orig
from cfn_fast import Config, MessageBus

CTX = mp.get_context("fork")


def _wait_for_one(timeout: float, out: "mp.Queue[tuple[list, float, float]]") -> None:
    bus = MessageBus(config=Config.from_env())
    bus.consume_messages("bob")  # warm: open the inbox before the clock starts
    cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    got = bus.consume("bob", timeout=timeout)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    out.put(([m["payload"] for m in got], time.monotonic(),
             (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)))


def test_consume_sleeps_until_a_message_arrives_from_another_process(backend: str, make_bus) -> None:
    bus = make_bus()
    bus.init_message_bus("bob")
    out: "mp.Queue[tuple[list, float, float]]" = CTX.Queue()
    p = CTX.Process(target=_wait_for_one, args=(30.0, out))
    p.start()
    time.sleep(1.0)  # the consumer sleeps a second: a poller would burn CPU meanwhile
    sent_at = time.monotonic()
    bus.send_message("alice", "bob", "t", {"n": 1})
    payloads, woke_at, cpu_s = out.get(timeout=30)
    p.join(30)
    assert payloads == [{"n": 1}]
    assert woke_at - sent_at < 0.5  # woken by the delivery, not by a timer
    assert cpu_s < 0.1, cpu_s  # a second's wait cost next to no CPU: no polling


def test_consume_returns_nothing_when_its_timeout_runs_out(backend: str, make_bus) -> None:
    bus = make_bus()
    bus.init_message_bus("bob")
    t0 = time.monotonic()
    assert bus.consume("bob", timeout=0.2) == []
    assert 0.2 <= time.monotonic() - t0 < 1.0
    bus.send_message("alice", "bob", "t", 1)
    assert [m["payload"] for m in bus.consume("bob", max=5, timeout=0)] == [1]


def test_a_bash_sender_wakes_a_waiting_consumer(make_bus, base: Path) -> None:
    bus = make_bus()
    bus.init_message_bus("bob")
    out: "mp.Queue[tuple[list, float, float]]" = CTX.Queue()
    p = CTX.Process(target=_wait_for_one, args=(30.0, out))
    p.start()
    time.sleep(0.3)
    orig.send(base, "alice", "bob", "task", '{"from": "bash"}')  # no futex: the folder grew
    payloads, _, _ = out.get(timeout=30)
    p.join(30)
    assert payloads == [{"from": "bash"}]


def _iterate(until_idle: float, out: "mp.Queue[list[int]]") -> None:
    bus = MessageBus(config=Config.from_env())
    out.put([m["payload"] for m in bus.messages("bob", batch=3, timeout=until_idle)])


def test_two_iterating_consumers_get_each_message_once(backend: str, make_bus) -> None:
    bus = make_bus()
    bus.init_message_bus("bob")
    out: "mp.Queue[list[int]]" = CTX.Queue()
    consumers = [CTX.Process(target=_iterate, args=(1.0, out)) for _ in range(2)]
    for p in consumers:
        p.start()
    for i in range(60):
        bus.send_message("alice", "bob", "t", i)
        if i % 20 == 19:
            time.sleep(0.1)
    got = [out.get(timeout=30) for _ in consumers]
    for p in consumers:
        p.join(30)
    assert sorted(got[0] + got[1]) == list(range(60))
    for g in got:
        assert g == sorted(g)  # each in the inbox's order


def _claim_and_wait(out: "mp.Queue[list]") -> None:
    bus = MessageBus(config=Config.from_env())
    out.put([m["payload"] for m in bus.consume("bob", timeout=30)])


def test_a_nacked_message_goes_back_and_wakes_a_waiting_consumer(backend: str, make_bus) -> None:
    bus = make_bus()
    bus.init_message_bus("bob")
    bus.send_message("alice", "bob", "t", ["first"])
    bus.send_message("alice", "bob", "t", ["second"])
    claimed = bus.claim_messages("bob")
    assert [m["payload"] for m in claimed] == [["first"], ["second"]] and bus.consume_messages("bob") == []
    out: "mp.Queue[list]" = CTX.Queue()
    p = CTX.Process(target=_claim_and_wait, args=(out,))
    p.start()
    time.sleep(0.3)  # it waits: the inbox is empty, both are claimed
    assert bus.nack_messages("bob", claimed[:1]) == 1
    assert out.get(timeout=30) == [["first"]]
    p.join(30)
    assert bus.release_messages("bob", [claimed[1]["msg_id"]]) == 1
    assert [m["payload"] for m in bus.consume_messages("bob")] == [["second"]]
    assert bus.ack_messages("bob", claimed) == 0  # they are no longer this consumer's claims


def test_from_env_with_overrides_keeps_the_environments_paths(base: Path) -> None:
    cfg = Config.from_env(max_inbox_size=7)
    assert cfg.max_inbox_size == 7 and cfg.base_dir == str(base)
    assert cfg.metrics_file == os.environ["METRICS_FILE"] and cfg.alert_log_file == os.environ["ALERT_LOG_FILE"]
    assert Config(max_inbox_size=7).base_dir != str(base)  # the plain constructor: every other default
    with pytest.raises(Exception, match="unknown setting"):
        Config.from_env(no_such_setting=1)


def test_messages_are_typed_dicts_of_the_envelope(bus: MessageBus) -> None:
    from typing import get_type_hints

    from cfn_fast import Message

    bus.send_message("alice", "bob", "t", {"x": 1}, priority="high")
    (m,) = bus.consume_messages("bob")
    assert isinstance(m, dict) and m["from"] == "alice" and m["priority"] == "high"
    hints = get_type_hints(Message)
    assert {"msg_id", "from", "to", "payload", "priority"} <= set(hints)
    assert "priority" in Message.__optional_keys__ and "msg_id" in Message.__required_keys__


def test_a_message_named_twice_in_one_ack_is_taken_once(backend: str, make_bus) -> None:
    """ack_messages([m, m]) deletes m once and says 1; the inbox's count and
    the shared 'consumed' total move by one, whichever backend."""
    bus = make_bus()
    bus.init_message_bus("bob")
    for i in range(3):
        bus.send_message("alice", "bob", "t", i)
    first, second = bus.claim_messages("bob", 2)
    before = bus.storage.counters().get("consumed", 0)
    assert bus.ack_messages("bob", [first, first["msg_id"], second]) == 2
    assert bus.ack_messages("bob", [first]) == 0  # gone: nothing to take the second time
    assert bus.storage.counters().get("consumed", 0) == before + 2
    assert bus.get_inbox_size("bob") == 1
    assert [m["payload"] for m in bus.consume_messages("bob")] == [2]
