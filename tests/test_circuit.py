"""The circuit breaker of an inbox, kept in shared state: failed sends open
it (CFN_BREAKER_FAILURES in a row, or a failure rate over a sliding window),
and then every process's sends to that inbox fail at once with CircuitOpen,
without touching the inbox, until the cooldown ends and probes go: one
success closes it, one failure opens it again. A plain send refused because
the inbox is full is backpressure at work, not a failure; a caller's short
deadline is not one either."""
from __future__ import annotations

import fcntl
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cfn_fast import BackpressureTimeout, CfnError, Config, InboxFull, MessageBus
from cfn_fast.errors import CircuitOpen

CTX = mp.get_context("fork")
# sends that fail fast: a full inbox of one, two 1 ms retries
FAST_FAIL = dict(max_inbox_size=1, backpressure_wait_ms=1, backpressure_max_retries=2, breaker_failures=3)


def _trip(results: "mp.Queue[list[str]]", cooldown_ms: int) -> None:
    """Another process: three failed backpressure sends to bob, then what a fourth gets."""
    bus = MessageBus(config=Config.from_env().replace(**FAST_FAIL, breaker_cooldown_ms=cooldown_ms))
    got = []
    for _ in range(4):
        try:
            bus.send_with_backpressure("tripper", "bob", "t", 1)
            got.append("sent")
        except CfnError as e:
            got.append(type(e).__name__)
    results.put(got)


def _until_probes_may_go(bus: MessageBus, agent: str = "bob") -> None:
    """Polls until the circuit's cooldown (or half-open round) is over, instead
    of sleeping a fixed time that a loaded runner may overshoot or undershoot."""
    deadline = time.monotonic() + 30
    while bus.circuit_status(agent).retry_after > 0:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def _open_from_another_process(cooldown_ms: int) -> list[str]:
    q: "mp.Queue[list[str]]" = CTX.Queue()
    p = CTX.Process(target=_trip, args=(q, cooldown_ms))
    p.start()
    got = q.get(timeout=60)
    p.join(30)
    return got


@pytest.fixture
def full_bob(backend: str, make_bus) -> MessageBus:
    bus = make_bus(**FAST_FAIL, breaker_cooldown_ms=60_000)
    bus.init_message_bus("bob")
    bus.send_message("alice", "bob", "t", 0)
    return bus


def test_tripped_in_one_process_obeyed_in_another(full_bob: MessageBus) -> None:
    assert _open_from_another_process(60_000) == ["BackpressureTimeout"] * 3 + ["CircuitOpen"]
    c = full_bob.circuit_status("bob")
    assert c.state == "open" and 50 < c.retry_after <= 60
    # this process was told nothing: the shared state refuses its sends, plain and waiting alike
    for send in (full_bob.send_message, full_bob.send_with_backpressure):
        t0 = time.monotonic()
        with pytest.raises(CircuitOpen) as info:
            send("alice", "bob", "t", 1)
        assert time.monotonic() - t0 < 0.5 and 50 < info.value.retry_after <= 60
        assert "retry after" in str(info.value)
    assert full_bob.receive_messages("bob")[0]["payload"] == 0 and full_bob.get_inbox_size("bob") == 1
    assert full_bob.circuit_status("bob").rejected >= 3  # the tripper's fourth, and these two
    assert full_bob.reset_circuit("bob") == "open"
    assert full_bob.circuit_status("bob").state == "closed"
    with pytest.raises(InboxFull):  # the inbox as it was: still full
        full_bob.send_message("alice", "bob", "t", 1)


def test_an_open_circuit_refuses_without_touching_the_inbox(make_bus, base: Path) -> None:
    bus = make_bus(**FAST_FAIL, breaker_cooldown_ms=60_000, lock_timeout_ms=3000)
    bus.init_message_bus("bob")
    bus.send_message("alice", "bob", "t", 0)
    _open_from_another_process(60_000)
    with open(base / "bob" / "inbox" / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a stalled bash writer holds the inbox's lock
        t0 = time.monotonic()
        with pytest.raises(CircuitOpen):
            bus.send_message("alice", "bob", "t", 1)
        assert time.monotonic() - t0 < 0.5  # not LOCK_TIMEOUT_MS: the lock was never asked for


def test_after_the_cooldown_one_probe_goes_and_its_success_closes_it(full_bob: MessageBus, make_bus,
                                                                     base: Path) -> None:
    _open_from_another_process(1000)  # long enough to be refused once, however slow the runner
    bus = make_bus(**FAST_FAIL, breaker_cooldown_ms=1000)
    with pytest.raises(CircuitOpen):
        bus.send_message("alice", "bob", "t", 1)
    _until_probes_may_go(bus)
    bus.consume_messages("bob")  # the consumer is back
    res = bus.deliver("alice", "bob", "t", 1)
    assert res.circuit == 2 and bus.circuit_status("bob").state == "closed"
    alerts = [json.loads(x) for x in open(Config.from_env().alert_log_file)]
    assert [a["alert"] for a in alerts if a["alert"].startswith("circuit")] == ["circuit_open", "circuit_closed"]
    assert bus.storage.counters()["circuit_opened"] == 1 and bus.storage.counters()["circuit_closed"] == 1


def test_a_failed_probe_opens_it_again_and_the_half_open_round_admits_only_its_probes(make_bus) -> None:
    bus = make_bus(**FAST_FAIL, breaker_cooldown_ms=200, breaker_probes=2)
    bus.init_message_bus("bob")
    bus.send_message("alice", "bob", "t", 0)
    for _ in range(3):
        with pytest.raises(BackpressureTimeout):
            bus.send_with_backpressure("alice", "bob", "t", 1)
    time.sleep(0.25)
    # two probes are admitted (plain sends to the still-full inbox: refused as full, so they report nothing)
    for _ in range(2):
        with pytest.raises(InboxFull):
            bus.send_message("alice", "bob", "t", 1)
    c = bus.circuit_status("bob")
    assert (c.state, c.probes, c.probe_limit) == ("half-open", 2, 2)
    with pytest.raises(CircuitOpen):  # a third is not
        bus.send_message("alice", "bob", "t", 1)
    time.sleep(0.25)  # the round ended with no probe reporting: a new round
    with pytest.raises(BackpressureTimeout) as info:  # whose probe fails
        bus.send_with_backpressure("alice", "bob", "t", 1)
    assert info.value.circuit == 1 and bus.circuit_status("bob").state == "open"


def _probe_and_hang(ready: "mp.Event") -> None:
    bus = MessageBus(config=Config.from_env().replace(max_inbox_size=1, backpressure_wait_ms=60_000,
                                            backpressure_max_retries=1, breaker_cooldown_ms=1000))
    ready.set()
    bus.send_with_backpressure("prober", "bob", "t", 1)  # admitted as the probe, then waits for room


def test_a_killed_probe_does_not_hold_the_circuit_half_open(backend: str, make_bus) -> None:
    bus = make_bus(**FAST_FAIL, breaker_cooldown_ms=1000)  # the probe's round: killed and refused within it
    bus.init_message_bus("bob")
    bus.send_message("alice", "bob", "t", 0)
    for _ in range(3):
        with pytest.raises(BackpressureTimeout):
            bus.send_with_backpressure("alice", "bob", "t", 1)
    _until_probes_may_go(bus)
    ready = CTX.Event()
    p = CTX.Process(target=_probe_and_hang, args=(ready,))
    p.start()
    ready.wait(30)
    deadline = time.monotonic() + 10
    while bus.circuit_status("bob").state != "half-open":
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.kill(p.pid, signal.SIGKILL)
    p.join(30)
    with pytest.raises(CircuitOpen):
        bus.send_message("alice", "bob", "t", 1)
    _until_probes_may_go(bus)  # the dead probe's round is over: a new probe is let through (the full inbox refuses it)
    with pytest.raises(InboxFull):
        bus.send_message("alice", "bob", "t", 1)
    c = bus.circuit_status("bob")
    assert (c.state, c.probes) == ("half-open", 1)


def test_what_is_not_a_failure(make_bus) -> None:
    bus = make_bus(**FAST_FAIL, breaker_cooldown_ms=60_000)
    bus.init_message_bus("bob")
    bus.send_message("alice", "bob", "t", 0)
    for _ in range(20):  # backpressure at work
        with pytest.raises(InboxFull):
            bus.send_message("alice", "bob", "t", 1)
    for _ in range(5):  # the caller's own deadline
        with pytest.raises(BackpressureTimeout):
            bus.send_with_backpressure("alice", "bob", "t", 1, timeout=0.001)
    assert bus.circuit_status("bob").state == "closed" and bus.circuit_status("bob").failures == 0
    # failures must come in a row: a success in between starts the count again
    for _ in range(2):
        with pytest.raises(BackpressureTimeout):
            bus.send_with_backpressure("alice", "bob", "t", 1)
    bus.consume_messages("bob")
    bus.send_message("alice", "bob", "t", 0)
    assert bus.circuit_status("bob").failures == 0
    for _ in range(2):
        with pytest.raises(BackpressureTimeout):
            bus.send_with_backpressure("alice", "bob", "t", 1)
    assert bus.circuit_status("bob").state == "closed"


def test_a_lock_held_past_its_wait_is_a_failure(make_bus, base: Path) -> None:
    bus = make_bus(breaker_failures=2, breaker_cooldown_ms=60_000, lock_timeout_ms=20)
    bus.init_message_bus("bob")
    with open(base / "bob" / "inbox" / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for _ in range(2):
            with pytest.raises(CfnError, match="held by"):
                bus.send_message("alice", "bob", "t", 1)
    assert bus.circuit_status("bob").state == "open"


def test_a_failure_rate_over_the_window_opens_it(backend: str, make_bus) -> None:
    # never by count; 40 % of at least 10 sends in the window (an hour: the test never straddles two)
    bus = make_bus(**{**FAST_FAIL, "breaker_failures": 0}, breaker_failure_rate=40, breaker_min_calls=10,
                   breaker_window_ms=3_600_000, breaker_cooldown_ms=60_000)
    bus.init_message_bus("bob")
    for _ in range(10):
        bus.send_message("alice", "bob", "t", 1)
        bus.consume_messages("bob")
    bus.send_message("alice", "bob", "t", 1)  # 11 sends, none failed; the inbox is full now
    for failed in range(1, 9):
        with pytest.raises(BackpressureTimeout):
            bus.send_with_backpressure("alice", "bob", "t", 1)
        state = bus.circuit_status("bob").state
        assert state == ("open" if failed / (11 + failed) >= 0.4 else "closed"), failed  # opens at 8 of 19
    with pytest.raises(CircuitOpen):
        bus.send_message("alice", "bob", "t", 1)


def test_the_cli_status_reset_and_one_line(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in {"MAX_INBOX_SIZE": "1", "BACKPRESSURE_WAIT_MS": "1", "BACKPRESSURE_MAX_RETRIES": "1",
                 "CFN_BREAKER_FAILURES": "1", "CFN_BREAKER_COOLDOWN_MS": "60000"}.items():
        monkeypatch.setenv(k, v)

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cfn_fast", *args], capture_output=True, text=True,
                              timeout=60)

    assert cli("bus", "init", "bob").returncode == 0
    r = cli("circuit", "status", "bob")
    assert r.returncode == 0 and json.loads(r.stdout)["state"] == "closed"
    assert cli("bus", "send", "a", "bob", "t", "1").returncode == 0
    assert cli("send-backpressure", "a", "bob", "t", "2").returncode == 1
    r = cli("bus", "send", "a", "bob", "t", "3")
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1
    assert r.stderr.startswith("cfn-fast bus send: circuit of 'bob' is open") and "retry after" in r.stderr
    r = cli("circuit", "status", "bob")
    assert r.returncode == 1 and json.loads(r.stdout)["state"] == "open"
    assert [c["agent"] for c in json.loads(cli("circuit", "status").stdout)] == ["bob"]
    r = cli("circuit", "reset", "bob")
    assert r.returncode == 0 and "was open" in r.stderr
    assert cli("circuit", "status", "bob").returncode == 0


def test_the_drop_in_says_whether_a_circuit_is_closed(make_bus, tmp_path: Path) -> None:
    bus = make_bus(**FAST_FAIL, breaker_cooldown_ms=60_000)
    bus.init_message_bus("bob")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "cfn-fast").write_text(f"#!/bin/sh\nexec {sys.executable} -m cfn_fast \"$@\"\n")
    (bindir / "cfn-fast").chmod(0o755)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}")
    script = 'source <(cfn-fast shell); circuit_status bob >/dev/null && echo closed || echo open'
    run = lambda: subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env,  # noqa: E731
                                 timeout=60).stdout.strip()
    assert run() == "closed"
    bus.send_message("alice", "bob", "t", 0)
    _open_from_another_process(60_000)
    assert run() == "open"


def test_an_agent_made_again_starts_with_a_closed_circuit(make_bus) -> None:
    bus = make_bus(**FAST_FAIL, breaker_cooldown_ms=60_000)
    bus.init_message_bus("bob")
    bus.send_message("alice", "bob", "t", 0)
    _open_from_another_process(60_000)
    assert bus.circuit_status("bob").state == "open"
    bus.cleanup_message_bus("bob")  # its slot is freed...
    bus.init_message_bus("bob")     # ...and taken again
    assert bus.circuit_status("bob").state == "closed" and bus.storage.top_senders("bob") == []
    bus.send_message("alice", "bob", "t", 1)
