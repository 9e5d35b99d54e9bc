"""Overload attribution: each inbox counts its heaviest senders in shared
state (a space-saving table of eight in the slot, halved every 10 s; on
Redis a sorted set), so whichever process looks, the inbox_overflow alerts
and `get-stats --senders` name who filled it, with their shares."""
from __future__ import annotations

import json
import multiprocessing as mp
import subprocess
import sys

import pytest

from cfn_fast import Config, InboxFull, MessageBus
from cfn_fast.overflow import OverflowMonitor

CTX = mp.get_context("fork")


def _send(sender: str, n: int) -> None:
    bus = MessageBus(config=Config.from_env().replace(max_inbox_size=1000))
    for i in range(n):
        bus.send_message(sender, "sink", "t", i)


def _flood(senders: dict[str, int]) -> None:
    procs = [CTX.Process(target=_send, args=(who, n)) for who, n in senders.items()]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0


@pytest.mark.usefixtures("one_senders_window")
def test_the_heaviest_senders_are_named_by_any_process(backend: str, make_bus) -> None:
    bus = make_bus(max_inbox_size=1000)
    bus.init_message_bus("sink")
    _flood({"flooder": 300, "steady": 100, "light": 20})
    top = bus.storage.top_senders("sink")  # this process sent nothing: the counts are shared
    assert [t.sender for t in top[:3]] == ["flooder", "steady", "light"]
    assert top[0].count == 300
    assert top[0].share == pytest.approx(300 / 420, abs=0.01)
    assert sum(t.share for t in top) == pytest.approx(1, abs=0.01)


@pytest.mark.usefixtures("one_senders_window")
def test_a_space_saving_table_keeps_the_heavy_among_many_light(make_bus) -> None:
    bus = make_bus(max_inbox_size=10_000)
    bus.init_message_bus("sink")
    for round_ in range(20):
        for _ in range(8):  # 8 of every 38: above 1/8, what eight entries are sure to keep
            bus.send_message("flooder", "sink", "t", round_)
        for light in range(30):  # thirty light senders churn the other seven entries
            bus.send_message(f"l{light}", "sink", "t", round_)
    top = bus.storage.top_senders("sink")
    assert len(top) == 8 and top[0].sender == "flooder" and top[0].count >= 80


@pytest.mark.usefixtures("one_senders_window")
def test_the_overflow_alerts_name_the_top_senders(backend: str, make_bus) -> None:
    bus = make_bus(max_inbox_size=40, backpressure_wait_ms=1, backpressure_max_retries=1, breaker_failures=0)
    bus.init_message_bus("sink")
    for i in range(30):
        bus.send_message("flooder", "sink", "t", i)
    for i in range(10):
        bus.send_message("steady", "sink", "t", i)
    with pytest.raises(InboxFull):
        bus.send_with_backpressure("late", "sink", "t", 0)
    OverflowMonitor(bus, 0.01).run_pass(reconcile=True)
    alerts = [json.loads(x) for x in open(Config.from_env().alert_log_file)]
    assert [a["alert"] for a in alerts] == ["inbox_overflow"]  # one per cooldown: the send's
    (alert,) = alerts
    assert "top senders: flooder 75%, steady 25%" in alert["message"]
    first = alert["metadata"]["top_senders"][0]
    assert (first["sender"], first["share"]) == ("flooder", 0.75)
    bus.config = bus.config.replace(alert_cooldown_seconds=0)
    bus.storage.config = bus.config
    OverflowMonitor(bus, 0.01).run_pass(reconcile=True)
    monitor_alert = json.loads(open(Config.from_env().alert_log_file).readlines()[-1])
    assert monitor_alert["message"].startswith("Inbox of sink is full: 40/40 messages (100%); top senders: flooder")


@pytest.mark.usefixtures("one_senders_window")
def test_get_stats_lists_the_senders(backend: str, make_bus) -> None:
    bus = make_bus()
    bus.init_message_bus("sink")
    bus.init_message_bus("quiet")
    for i in range(30):
        bus.send_message("a", "sink", "t", i)
    for i in range(10):
        bus.send_message("b", "sink", "t", i)
    r = subprocess.run([sys.executable, "-m", "cfn_fast", "get-stats", "--senders"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    stats = {s["agent"]: s for s in json.loads(r.stdout)}
    top = stats["sink"]["top_senders"]
    assert [(t["sender"], t["share"]) for t in top] == [("a", 0.75), ("b", 0.25)]
    assert (top[0]["count"], top[1]["count"]) == (30, 10)
    assert stats["quiet"]["top_senders"] == []
    plain = json.loads(subprocess.run([sys.executable, "-m", "cfn_fast", "get-stats"], capture_output=True,
                                      text=True, timeout=60).stdout)
    assert "top_senders" not in plain[0]  # the original's output, unchanged without the flag
