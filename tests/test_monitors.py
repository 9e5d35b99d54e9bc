"""Dynamic rate limiting shared by every process, the overflow monitor, inbox
statistics, and the monitors' lifecycle (signals, pid files, cleanup)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import cfn_fast
from cfn_fast import _core, monitors, telemetry
from cfn_fast.errors import BackpressureTimeout, InvalidArgument


def metric_lines(name: str | None = None) -> list[dict]:
    p = Path(os.environ["METRICS_FILE"])
    recs = [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []
    return [r for r in recs if name is None or r["metric"] == name]


def alert_lines() -> list[dict]:
    p = Path(os.environ["ALERT_LOG_FILE"])
    return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []


def spawn(code: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(cond, timeout: float = 15.0, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def write_bash_message(inbox: Path, n: int) -> None:
    """Message files as a bash agent writes them, behind cfn-fast's back."""
    for i in range(n):
        (inbox / f"msg-{1700000000 + i}-{i:03d}.json").write_text('{"version":"1.1"}')


# --- tiers and thresholds ------------------------------------------------------
@pytest.mark.parametrize("load,tier", [
    (0.0, "low"), (0.5, "low"), (0.51, "medium"), (0.8, "medium"), (0.81, "high"), (3.7, "high"),
])
def test_seed_tiers_and_default_thresholds(load, tier):
    t = monitors.choose_tier(load, cfn_fast.Config())
    assert t.name == tier
    assert (t.batch_size, t.wait_ms) == {"high": (5, 200), "medium": (10, 100), "low": (20, 50)}[tier]


def test_thresholds_are_load_per_cpu_and_may_exceed_one(monkeypatch):
    monkeypatch.setenv("RATE_LIMIT_HIGH_LOAD_THRESHOLD", "2.5")
    monkeypatch.setenv("RATE_LIMIT_MEDIUM_LOAD_THRESHOLD", "1.5")
    cfg = cfn_fast.Config.from_env()
    assert [monitors.choose_tier(x, cfg).name for x in (1.2, 1.6, 2.5, 2.6)] == ["low", "medium", "medium", "high"]


def test_system_load_is_per_cpu_with_two_decimals():
    load = cfn_fast.get_system_load()
    assert isinstance(load, float) and load >= 0 and round(load, 2) == load
    expected = os.getloadavg()[0] / len(os.sched_getaffinity(0))
    assert abs(load - expected) < 0.5  # the load may move between the two reads


def test_apply_publishes_emits_and_returns_the_tier(base):
    r = cfn_fast.apply_dynamic_rate_limit(load_per_cpu=0.9)
    assert (r["load_per_cpu"], r["batch_size"], r["wait_ms"], r["tier"]) == (0.9, 5, 200, "high")
    assert cfn_fast.get_batch_size() == 5
    assert monitors.current_rate_limit()["wait_ms"] == 200
    got = {m["metric"]: (m["value"], m["unit"]) for m in metric_lines()}
    assert got == {"system.load_per_cpu": (90, "percent"), "rate_limit.batch_size": (5, "count"),
                   "rate_limit.backpressure_wait_ms": (200, "milliseconds")}
    r = cfn_fast.apply_dynamic_rate_limit()  # the measured load
    assert r["batch_size"] in (5, 10, 20) and r["wait_ms"] in (50, 100, 200)
    with pytest.raises(InvalidArgument):
        cfn_fast.apply_dynamic_rate_limit(load_per_cpu=-1)


def test_batch_size_is_configured_until_published(base, monkeypatch):
    monkeypatch.setenv("CFN_BATCH_SIZE", "17")
    assert cfn_fast.get_batch_size() == 17  # no base folder yet
    cfn_fast.init_message_bus_system()
    assert cfn_fast.get_batch_size() == 17  # nothing published
    cfn_fast.apply_dynamic_rate_limit(load_per_cpu=0.0)
    assert cfn_fast.get_batch_size() == 20


def test_published_settings_go_stale_after_three_intervals(bus, monkeypatch):
    monkeypatch.setenv("RATE_LIMIT_CHECK_INTERVAL", "1.0")  # stale after 3 s
    b = cfn_fast.default_bus()
    h = b.storage.handle(create=True)
    now = time.time_ns()
    _core.rate_publish(h, _core.RateSettings(5, 200, 900, now - 2_000_000_000, 100))  # a second to spare
    assert cfn_fast.get_batch_size() == 5
    assert monitors.current_rate_limit()["published"] is True
    _core.rate_publish(h, _core.RateSettings(5, 200, 900, now - 3_010_000_000, 100))
    assert cfn_fast.get_batch_size() == 10  # CFN_BATCH_SIZE's default again
    assert monitors.current_rate_limit() | {"age_ms": 0} == {
        "published": False, "batch_size": 10, "wait_ms": 100, "load_per_cpu": 0.9, "age_ms": 0,
        "stale_after_ms": 3000}


def test_senders_use_a_fresh_published_wait_and_the_configured_one_once_stale(make_bus):
    b = make_bus(max_inbox_size=1, backpressure_wait_ms=200, backpressure_max_retries=2,
                 rate_limit_check_interval=0.1)
    b.init_message_bus("alice")
    b.init_message_bus("bob")
    b.send_message("alice", "bob", "t", 1)
    h = b.storage.handle()

    def timed_failure() -> float:
        t0 = time.monotonic()
        with pytest.raises(BackpressureTimeout):
            b.send_with_backpressure("alice", "bob", "t", 2)
        return time.monotonic() - t0

    _core.rate_publish(h, _core.RateSettings(5, 1, 0, time.time_ns(), 100))
    assert timed_failure() < 0.2  # two 1 ms waits, not two of 200 ms
    _core.rate_publish(h, _core.RateSettings(5, 1, 0, time.time_ns() - 400_000_000, 100))
    assert timed_failure() >= 0.39  # stale: the configured 200 ms applies again


@pytest.mark.slow
def test_an_adjustment_is_seen_by_another_process_within_100_ms(bus):
    """A reader spinning in another process: no read that starts after the
    publish returns sees the old settings, and the first read of the new
    ones comes well inside 100 ms (best of three rounds, so that one
    descheduling of the spinning child on a busy machine does not count)."""
    child = spawn("""
        import time
        import cfn_fast
        from cfn_fast import _core
        h = cfn_fast.default_bus().storage.handle()
        have = _core.rate_read(h).updated_ns
        print("ready", flush=True)
        for _ in range(3):
            last_old = time.time_ns()
            while True:
                t = time.time_ns()
                rs = _core.rate_read(h)
                if rs.updated_ns != have:
                    break
                last_old = t
            have = rs.updated_ns
            print(rs.batch_size, t, last_old, cfn_fast.get_batch_size(), flush=True)
    """)
    try:
        assert child.stdout.readline().strip() == "ready"
        h = bus.storage.handle()
        latencies = []
        for batch in (101, 102, 103):
            time.sleep(0.03)
            _core.rate_publish(h, _core.RateSettings(batch, 50, 0, time.time_ns(), 5000))
            done = time.time_ns()
            seen, t_new, t_last_old, api = (int(x) for x in child.stdout.readline().split())
            assert seen == api == batch
            assert t_last_old <= done  # every read begun after the publish saw it
            latencies.append(t_new - done)
        assert min(latencies) < 100_000_000, latencies
    finally:
        child.kill()
        child.wait()


@pytest.mark.slow
def test_a_blocked_sender_in_another_process_picks_up_a_published_wait(base, monkeypatch):
    """The seed's wait is 100 ms, so the sender's next retry, at most 100 ms
    away, uses the published wait; then it retries every 5 ms."""
    monkeypatch.setenv("MAX_INBOX_SIZE", "1")
    monkeypatch.setenv("BACKPRESSURE_MAX_RETRIES", "100000")
    monkeypatch.setenv("BACKPRESSURE_MAX_TOTAL_MS", "60000")
    b = cfn_fast.MessageBus()
    b.init_message_bus("alice")
    b.init_message_bus("bob")
    b.send_message("alice", "bob", "t", 1)
    h = b.storage.handle()
    child = spawn("""
        import cfn_fast
        print(cfn_fast.send_with_backpressure("alice", "bob", "t", 2), flush=True)
    """)
    try:
        wait_for(lambda: any(s.waiters for s in _core.slots(h)), what="the sender to block")
        waits = telemetry.COUNTERS["backpressure_wait"]
        c0 = _core.counter_get(h, waits)
        t0 = time.monotonic()
        _core.rate_publish(h, _core.RateSettings(10, 5, 0, time.time_ns(), 5000))
        wait_for(lambda: _core.counter_get(h, waits) >= c0 + 20, what="20 retries")
        elapsed = time.monotonic() - t0
        assert elapsed < 1.0  # 20 retries at the configured 100 ms would take 2 s
        b.consume_messages("bob")  # room: the child delivers and exits
        out, err = child.communicate(timeout=15)
        assert child.returncode == 0, err
        assert out.startswith("msg-")
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        b.close()


# --- overflow monitor ------------------------------------------------------------
def test_monitor_pass_emits_size_and_utilization_for_every_inbox(make_bus):
    b = make_bus(max_inbox_size=10)
    for a in ("a1", "a2", "a3"):
        b.init_message_bus(a)
    for i in range(4):
        b.send_message("a1", "a2", "t", i)
    assert cfn_fast.monitor_inbox_overflow(0, 1, bus=b) == 1
    sizes = {m["tags"]["agent"]: m["value"] for m in metric_lines("inbox.size")}
    utils = {m["tags"]["agent"]: (m["value"], m["unit"]) for m in metric_lines("inbox.utilization")}
    assert sizes == {"a1": 0, "a2": 4, "a3": 0}
    assert utils["a2"] == (40, "percent")
    assert alert_lines() == []


@pytest.mark.parametrize("n,expect", [(8, None), (9, ("inbox_high_utilization", "warning")),
                                      (10, ("inbox_overflow", "critical"))])
def test_monitor_alert_severities_as_the_seed(make_bus, n, expect):
    b = make_bus(max_inbox_size=10)
    b.init_message_bus("src")
    b.init_message_bus("dst")
    for i in range(n):
        b.send_message("src", "dst", "t", i)
    cfn_fast.monitor_inbox_overflow(0, 3, bus=b)  # three passes, one alert: the cooldown
    got = [(a["alert"], a["severity"]) for a in alert_lines()]
    assert got == ([] if expect is None else [expect])
    if expect:
        meta = alert_lines()[0]["metadata"]
        top = meta.pop("top_senders")  # who filled it (its count halves at a 10 s boundary: not compared)
        assert meta == {"agent": "dst", "size": n, "max_size": 10, "utilization": n * 10}
        assert [(t["sender"], t["share"]) for t in top] == [("src", 1.0)]


@pytest.mark.parametrize("extra", [0, 40])  # per-agent reads, and one slots() call past 32 inboxes
@pytest.mark.usefixtures("one_senders_window")
def test_utilization_is_of_the_inboxs_own_capacity_not_the_monitors(make_bus, extra):
    """An inbox made with capacity 4 is full at 4 messages, whatever
    MAX_INBOX_SIZE the monitor runs with: its sends are refused there."""
    small = make_bus(max_inbox_size=4)
    small.init_message_bus("tiny")
    for i in range(4):
        small.send_message("src", "tiny", "t", i)
    monitor = make_bus(max_inbox_size=1000)
    for i in range(extra):
        monitor.init_message_bus(f"x{i:02d}")
    cfn_fast.monitor_inbox_overflow(0, 1, bus=monitor)
    utils = {m["tags"]["agent"]: m["value"] for m in metric_lines("inbox.utilization")}
    assert utils["tiny"] == 100
    (alert,) = alert_lines()
    assert alert["alert"] == "inbox_overflow"
    assert alert["metadata"] == {"agent": "tiny", "size": 4, "max_size": 4, "utilization": 100,
                                 "top_senders": [{"sender": "src", "share": 1.0, "count": 4}]}
    by = {s["agent"]: s for s in cfn_fast.get_all_inbox_stats(bus=monitor)}
    assert by["tiny"] == {"agent": "tiny", "size": 4, "utilization": 100, "max_size": 4}
    assert all(by[f"x{i:02d}"]["max_size"] == 1000 for i in range(extra))


def counter(bus, agent: str) -> int:
    """The shared counter as it stands (a size read would heal it first)."""
    return next(s.count for s in bus.storage.slots() if s.agent == agent)


def test_monitor_reconciles_on_a_slower_cadence_and_finds_bash_inboxes(make_bus, base):
    b = make_bus(max_inbox_size=100)
    for a in ("a", "b", "c", "d"):
        b.init_message_bus(a)
    mon = monitors.OverflowMonitor(b, interval=0, reconcile_every=2)
    assert mon.run_pass().reconciled == 4  # the first pass reconciles everything
    for a in ("a", "d"):
        write_bash_message(base / a / "inbox", 5)  # behind the counters' backs
    assert mon.run_pass(reconcile=False).inboxes == 4
    assert counter(b, "a") == 0  # a counter pass trusts the counters
    # then each pass reconciles half of the folders (reconcile_every=2), in name order
    assert mon.run_pass().reconciled == 2
    assert (counter(b, "a"), counter(b, "d")) == (5, 0)
    (base / "bash-agent" / "inbox").mkdir(parents=True)  # an inbox made by a bash agent, mid-round
    write_bash_message(base / "bash-agent" / "inbox", 2)
    (base / "no-inbox").mkdir()
    assert mon.run_pass().reconciled == 2
    assert counter(b, "d") == 5
    r = mon.run_pass()  # a new round: a, b, bash-agent (c, d, no-inbox next time)
    assert r.reconciled == 3 and r.inboxes == 5
    last = {m["tags"]["agent"]: m["value"] for m in metric_lines("inbox.size")[-5:]}
    assert last == {"a": 5, "b": 0, "c": 0, "d": 5, "bash-agent": 2}
    assert telemetry.counters(b)["inbox_drift"] == 2
    assert mon.reconcile_all(everyone=True) == 5


def test_every_pass_reconciles_a_slice_and_every_inbox_once_per_round(make_bus):
    b = make_bus()
    for i in range(25):
        b.init_message_bus(f"agent-{i:02d}")
    mon = monitors.OverflowMonitor(b, interval=0, reconcile_every=4)
    mon.run_pass()
    h = b.storage.handle()
    before = {s.agent: s.reconcile_ns for s in _core.slots(h)}
    slices = [mon.run_pass().reconciled for _ in range(4)]
    assert slices == [7, 7, 7, 4]
    after = {s.agent: s.reconcile_ns for s in _core.slots(h)}
    assert all(after[a] > before[a] for a in before)


def test_monitor_drops_inboxes_removed_behind_its_back(make_bus, base):
    import shutil

    b = make_bus()
    b.init_message_bus("keep")
    b.init_message_bus("gone")
    mon = monitors.OverflowMonitor(b, interval=0, reconcile_every=2)
    assert mon.run_pass().inboxes == 2
    shutil.rmtree(base / "gone")  # as the bash cleanup does
    mon.run_pass()
    assert mon.run_pass().inboxes == 1


def test_monitor_skips_inboxes_another_process_just_reconciled(make_bus):
    b = make_bus()
    for a in ("a", "b"):
        b.init_message_bus(a)
    mon = monitors.OverflowMonitor(b, interval=5, reconcile_every=12)
    b.reconcile("a")
    assert mon.run_pass().reconciled == 1  # only "b"
    assert mon.reconcile_all(everyone=True) == 2


def test_monitor_without_a_base_folder_waits_quietly(base):
    assert cfn_fast.monitor_inbox_overflow(0, 2) == 2
    assert not base.exists()


def test_monitor_arguments_are_checked(base):
    for bad in (-1, "5", float("nan"), True):
        with pytest.raises(InvalidArgument):
            cfn_fast.monitor_inbox_overflow(bad, 1)
    with pytest.raises(InvalidArgument):
        cfn_fast.monitor_dynamic_rate_limit(0, -1)
    with pytest.raises(InvalidArgument):
        monitors.OverflowMonitor(cfn_fast.default_bus(), 1, reconcile_every=0)


def test_rate_monitor_runs_its_iterations(base, monkeypatch):
    monkeypatch.setenv("RATE_LIMIT_CHECK_INTERVAL", "0.01")
    assert cfn_fast.monitor_dynamic_rate_limit(iterations=3) == 3
    assert len(metric_lines("rate_limit.batch_size")) == 3
    assert telemetry.counters()["rate_limit_adjustments"] == 3


# --- stats -----------------------------------------------------------------------
@pytest.mark.parametrize("extra", [0, 40])  # few agents: one call each; many: one snapshot
def test_get_all_inbox_stats_shape(make_bus, base, extra):
    b = make_bus(max_inbox_size=8)
    for a in ["zed", "alpha"] + [f"x{i:02d}" for i in range(extra)]:
        b.init_message_bus(a)
    for i in range(6):
        b.send_message("zed", "alpha", "t", i)
    (base / "bash-made" / "inbox").mkdir(parents=True)
    write_bash_message(base / "bash-made" / "inbox", 3)
    (base / "sender-only").mkdir()
    stats = cfn_fast.get_all_inbox_stats(bus=b)
    assert [s["agent"] for s in stats] == sorted(s["agent"] for s in stats)
    by = {s["agent"]: s for s in stats}
    assert "sender-only" not in by and len(stats) == 3 + extra
    assert by["alpha"] == {"agent": "alpha", "size": 6, "utilization": 75, "max_size": 8}
    assert by["bash-made"]["size"] == 3


def test_get_all_inbox_stats_without_a_base(base):
    assert cfn_fast.get_all_inbox_stats() == []


# --- lifecycle -------------------------------------------------------------------
MONITOR = """
    import sys
    import cfn_fast
    kind = sys.argv[1] if len(sys.argv) > 1 else "overflow"
    if kind == "overflow":
        cfn_fast.monitor_inbox_overflow(0.05, pidfile=True)
    else:
        cfn_fast.monitor_dynamic_rate_limit(0.05, pidfile=True)
    print("stopped", flush=True)
"""


def start_monitor(kind: str, base_dir: Path) -> subprocess.Popen:
    env = dict(os.environ, MESSAGE_BASE_DIR=str(base_dir))
    p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(MONITOR), kind], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pidfile = base_dir / ".monitors" / f"{kind}-{p.pid}.pid"
    wait_for(pidfile.exists, what=f"{pidfile}")
    return p


def alive(p: subprocess.Popen) -> bool:
    return p.poll() is None


@pytest.mark.slow
@pytest.mark.parametrize("kind,sig", [("overflow", signal.SIGTERM), ("rate", signal.SIGINT)])
def test_monitors_stop_cleanly_on_signals(base, kind, sig):
    p = start_monitor(kind, base)
    try:
        time.sleep(0.1)
        p.send_signal(sig)
        out, err = p.communicate(timeout=10)
        assert p.returncode == 0, err
        assert out.strip() == "stopped" and "Traceback" not in err
        assert list((base / ".monitors").glob("*.pid")) == []
    finally:
        if alive(p):
            p.kill()
            p.wait()


@pytest.mark.slow
def test_cleanup_stops_only_its_own_base_folders_monitors(base, workdir):
    other = workdir / "other-messages"
    mine = [start_monitor("overflow", base), start_monitor("rate", base)]
    theirs = start_monitor("overflow", other)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        pids = base / ".monitors"
        (pids / "overflow-999999999.pid").write_text("999999999 12345 overflow\n")  # long dead
        (pids / f"rate-{bystander.pid}.pid").write_text(f"{bystander.pid} 1 rate\n")  # pid reused
        (pids / "overflow-garbage.pid").write_text("not a pid file")
        assert len(monitors.list_monitors()) == 2
        assert cfn_fast.cleanup_rate_limiting() == 2
        for p in mine:
            p.wait(timeout=10)
            assert p.returncode == 0 and p.stdout.read().strip() == "stopped"
        assert alive(theirs) and alive(bystander)
        assert list(pids.iterdir()) == []  # stale pid files removed too
        assert cfn_fast.cleanup_rate_limiting() == 0
        other_bus = cfn_fast.MessageBus(other)
        try:
            assert cfn_fast.cleanup_rate_limiting(bus=other_bus) == 1
        finally:
            other_bus.close()
        theirs.wait(timeout=10)
        assert alive(bystander)
    finally:
        for p in mine + [theirs, bystander]:
            if alive(p):
                p.kill()
                p.wait()


def test_cleanup_without_monitors(base):
    assert cfn_fast.cleanup_rate_limiting() == 0
    cfn_fast.init_message_bus_system()
    assert cfn_fast.cleanup_rate_limiting() == 0


def test_pidfile_in_process_is_removed_after_the_run(base):
    assert cfn_fast.monitor_inbox_overflow(0, 2, pidfile=True) == 2
    assert list((base / ".monitors").iterdir()) == []
    assert "monitors" not in [a for a in cfn_fast.default_bus().list_agents()]


def test_a_slow_rate_monitor_keeps_its_settings_fresh(base, monkeypatch):
    """Checking every 0.3 s while readers call 0.03 s intervals stale after
    0.09 s: the monitor re-stamps in between, so its settings never lapse."""
    monkeypatch.setenv("RATE_LIMIT_CHECK_INTERVAL", "0.03")
    import threading

    b = cfn_fast.MessageBus()
    b.init_message_bus_system()
    seen: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.append(cfn_fast.get_batch_size(bus=b))
            time.sleep(0.005)

    t = threading.Thread(target=watch)
    with_load = monitors.apply_dynamic_rate_limit  # keep the tier fixed whatever the machine's load
    monkeypatch.setattr(monitors, "apply_dynamic_rate_limit",
                        lambda **kw: with_load(load_per_cpu=0.95, **kw))
    try:
        monitors.apply_dynamic_rate_limit(bus=b)
        t.start()
        assert cfn_fast.monitor_dynamic_rate_limit(0.3, 2, bus=b) == 2
    finally:
        stop.set()
        t.join()
        b.close()
    assert len(seen) > 20 and set(seen) == {5}
    assert len(metric_lines("rate_limit.batch_size")) == 3  # re-stamps emit nothing


@pytest.mark.slow
def test_a_monitor_whose_base_folder_is_removed_stops_by_itself(base):
    import shutil

    p = start_monitor("overflow", base)
    try:
        shutil.rmtree(base)  # as cleanup-system does: no pid file is left to stop it by
        out, err = p.communicate(timeout=10)
        assert p.returncode == 0 and out.strip() == "stopped", err
    finally:
        if alive(p):
            p.kill()
            p.wait()


def test_monitors_in_threads_stop_when_asked(base):
    import threading

    cfn_fast.init_message_bus_system()
    stop = threading.Event()
    done: dict[str, int] = {}
    threads = [
        threading.Thread(target=lambda: done.__setitem__(
            "overflow", cfn_fast.monitor_inbox_overflow(0.02, stop=stop))),
        threading.Thread(target=lambda: done.__setitem__(
            "rate", cfn_fast.monitor_dynamic_rate_limit(5, stop=stop))),
    ]
    for t in threads:
        t.start()
    time.sleep(0.15)
    t0 = time.monotonic()
    stop.set()
    for t in threads:
        t.join(timeout=10)
    assert time.monotonic() - t0 < 2  # a 5 s sleep is cut short
    assert done["overflow"] >= 2 and done["rate"] == 1
