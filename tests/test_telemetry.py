"""Metrics and alerts: the original's JSONL formats, shared totals, and the
alert cooldown shared by every process on the base folder."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import cfn_fast
from cfn_fast import alerts
from cfn_fast import telemetry
from cfn_fast.errors import BackpressureTimeout, CfnError, InvalidArgument

STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def lines(path: str | Path) -> list[dict]:
    p = Path(path)
    return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []


def metrics_file() -> str:
    return os.environ["METRICS_FILE"]


def alerts_file() -> str:
    return os.environ["ALERT_LOG_FILE"]


def run_children(code: str, n: int, *args: str) -> list[str]:
    """Starts n interpreters running code (argv[1] is the child's index), lets
    them all go at once (each waits for a line on stdin), returns their stdout."""
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), str(i), *args],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(n)]
    for p in procs:
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "ready", p.stderr.read() if p.stderr else ""
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        outs.append(out)
    return outs


# --- metrics -------------------------------------------------------------------
def test_metric_line_has_the_original_format(bus):
    assert cfn_fast.emit_metric("inbox.size", 7, "count", {"agent": "bob"}) is True
    raw = Path(metrics_file()).read_text()
    assert raw.endswith("\n") and raw.count("\n") == 1
    rec = json.loads(raw)
    assert list(rec) == ["timestamp", "metric", "value", "unit", "tags"]
    assert STAMP.match(rec["timestamp"])
    assert rec == {"timestamp": rec["timestamp"], "metric": "inbox.size", "value": 7, "unit": "count",
                   "tags": {"agent": "bob"}}


def test_metric_defaults_and_values(bus):
    telemetry.emit_metric("a.b", 1.5)
    telemetry.emit_metric("a.c", "12")  # the CLI passes text
    telemetry.emit_metric("a.d", 3, "ms", '{"x":"y"}')  # JSON object text, as the CLI passes it
    recs = lines(metrics_file())
    assert [(r["metric"], r["value"], r["unit"], r["tags"]) for r in recs] == [
        ("a.b", 1.5, "count", {}), ("a.c", 12, "count", {}), ("a.d", 3, "ms", {"x": "y"})]


@pytest.mark.parametrize("args", [
    ("", 1), ("x", float("nan")), ("x", True), ("x", "abc"), ("x", None),
    ("x", 1, "count", {"bad": float("inf")}), ("x", 1, "count", "[1]"), ("x", 1, "count", "{nope"),
    ("x", 1, "count", ["not", "a", "dict"]), ("x\0y", 1),
])
def test_bad_metrics_are_refused_and_nothing_is_written(bus, args):
    with pytest.raises(InvalidArgument):
        telemetry.emit_metric(*args)
    assert lines(metrics_file()) == []


def test_metrics_off_writes_nothing(base, monkeypatch):
    monkeypatch.setenv("CFN_METRICS", "0")
    assert telemetry.emit_metric("x", 1) is False
    assert not Path(metrics_file()).exists()


def test_counter_metrics_are_totalled_in_shared_memory(bus):
    for v in (3, 4):
        telemetry.emit_metric("coordination.message_sent", v, tags={"agent": "alice"})
    telemetry.emit_metric("coordination.latency", 12, "milliseconds")
    telemetry.emit_metric("coordination.latency", 30, "milliseconds")
    telemetry.emit_metric("something.else", 99)
    other = cfn_fast.MessageBus()  # another handle on the same state sees the totals
    try:
        c = telemetry.counters(other)
    finally:
        other.close()
    assert c["coordination_message_sent"] == 7
    assert c["coordination_latency_samples"] == 2 and c["coordination_latency_ms_total"] == 42
    assert c["metrics"] == 5


def test_metrics_stats_and_clear(bus):
    for i in range(5):
        telemetry.emit_metric("m", i)
    st = telemetry.metrics_stats()
    assert st["lines"] == 5 and st["exists"] and st["size_bytes"] == Path(metrics_file()).stat().st_size
    assert st["counters"]["metrics"] == 5
    telemetry.clear_metrics()
    assert Path(metrics_file()).stat().st_size == 0
    telemetry.emit_metric("after", 1)  # the open O_APPEND descriptor carries on at the new end
    assert [r["metric"] for r in lines(metrics_file())] == ["after"]
    assert telemetry.metrics_stats()["counters"]["metrics"] == 6  # totals are cumulative


def test_metrics_stats_without_a_file_or_base(base):
    st = telemetry.metrics_stats()
    assert st["exists"] is False and st["lines"] == 0 and st["counters"]["metrics"] == 0
    telemetry.clear_metrics()  # nothing to clear: no error


def test_line_template_matches_the_c_format(bus):
    t = telemetry.LineTemplate("inbox.utilization", "percent", "agent")
    t.refresh()
    got = json.loads(t.line(87, "agent-1.x_y"))
    ref = json.loads(telemetry.format_metric("inbox.utilization", 87, "percent", {"agent": "agent-1.x_y"}))
    got.pop("timestamp"), ref.pop("timestamp")
    assert got == ref
    assert t.line(5, "a").startswith(b'{"timestamp":"') and t.line(5, "a").endswith(b"}\n")
    for odd in ('we"ird', "back\\slash", "caf\u00e9", "tab\there"):  # escaped by the C path instead
        assert json.loads(t.line(1, odd))["tags"] == {"agent": odd}


@pytest.mark.slow
def test_eight_processes_append_at_once_and_no_line_is_torn_or_lost(bus):
    per = 1500
    run_children("""
        import sys
        from cfn_fast import telemetry
        me = int(sys.argv[1])
        pad = "x" * 300  # long lines make a torn write likelier
        print("ready", flush=True); sys.stdin.readline()
        for i in range(%d):
            telemetry.emit_metric("load.test", i, "count", {"proc": me, "i": i, "pad": pad})
    """ % per, 8)
    raw = Path(metrics_file()).read_bytes()
    assert raw.endswith(b"\n")
    recs = [json.loads(x) for x in raw.split(b"\n")[:-1]]  # every line valid JSON
    assert len(recs) == 8 * per
    assert {(r["tags"]["proc"], r["tags"]["i"]) for r in recs} == {(p, i) for p in range(8) for i in range(per)}
    assert telemetry.counters(bus)["metrics"] == 8 * per


# --- alerts --------------------------------------------------------------------
def test_alert_line_format_and_log_record(bus, caplog, capsys):
    assert cfn_fast.emit_alert("disk_low", "Only 5% left", "warning", {"agent": "bob", "free": 5}) is True
    (rec,) = lines(alerts_file())
    assert list(rec) == ["timestamp", "alert", "message", "severity", "metadata"]
    assert STAMP.match(rec["timestamp"])
    assert rec["alert"] == "disk_low" and rec["message"] == "Only 5% left" and rec["severity"] == "warning"
    assert rec["metadata"] == {"agent": "bob", "free": 5}
    (logged,) = [r for r in caplog.records if r.name == "cfn_fast.alerts"]  # logged, not printed
    assert logged.levelname == "WARNING" and logged.getMessage().endswith("[warning] disk_low: Only 5% left")
    assert logged.alert == "disk_low" and logged.metadata == {"agent": "bob", "free": 5}
    assert capsys.readouterr().err == ""  # a library does not print


def test_alert_defaults_and_validation(bus):
    assert telemetry.emit_alert("note", "hi") is True
    assert lines(alerts_file())[0]["severity"] == "info" and lines(alerts_file())[0]["metadata"] == {}
    for bad in [("", "m"), ("t", "m", "loud"), ("t", "m", "info", [1]), ("t", 5)]:
        with pytest.raises(InvalidArgument):
            telemetry.emit_alert(*bad)


def test_cooldown_is_keyed_by_type_and_subject(bus):
    assert telemetry.emit_alert("inbox_overflow", "full", "critical", {"agent": "a"})
    assert not telemetry.emit_alert("inbox_overflow", "full again", "critical", {"agent": "a"})
    assert telemetry.emit_alert("inbox_overflow", "other inbox", "critical", {"agent": "b"})
    assert telemetry.emit_alert("inbox_high_utilization", "other type", "warning", {"agent": "a"})
    # a send's subject is its recipient: same key as the monitor's alert for that inbox
    assert not telemetry.emit_alert("inbox_overflow", "send failed", "critical", {"from": "x", "to": "a"})
    assert len(lines(alerts_file())) == 3
    c = telemetry.counters(bus)
    assert c["alerts"] == 3 and c["alerts_suppressed"] == 2 and c["alerts_inbox_overflow"] == 2


def test_zero_cooldown_never_suppresses(base, make_bus):
    b = make_bus(alert_cooldown_seconds=0)
    b.init_message_bus("a")
    assert all(telemetry.emit_alert("t", "m", metadata={"agent": "a"}, bus=b) for _ in range(3))


def test_an_alert_before_the_base_folder_exists_makes_it_and_shares_its_cooldown(base, monkeypatch):
    monkeypatch.setattr(alerts, "_local_cooldowns", {})
    assert not base.exists()
    assert telemetry.emit_alert("t", "m", metadata={"agent": "a"})
    assert base.is_dir() and (base.stat().st_mode & 0o7777) == 0o700  # as init-system makes it
    monkeypatch.setattr(alerts, "_local_cooldowns", {})  # forget this process's own record
    assert not telemetry.emit_alert("t", "m", metadata={"agent": "a"})  # the shared table holds it


@pytest.mark.slow
def test_cooldown_holds_across_two_processes(bus):
    assert telemetry.emit_alert("inbox_overflow", "full", "critical", {"agent": "alice"})
    code = """
        import sys
        from cfn_fast import telemetry
        print("ready", flush=True); sys.stdin.readline()
        print(telemetry.emit_alert("inbox_overflow", "full", "critical", {"agent": "alice"}),
              telemetry.emit_alert("inbox_overflow", "full", "critical", {"agent": "bob"}))
    """
    (out,) = run_children(code, 1)
    assert out.split() == ["False", "True"]
    assert [r["metadata"]["agent"] for r in lines(alerts_file())] == ["alice", "bob"]


@pytest.mark.slow
def test_of_many_racing_processes_exactly_one_alerts(bus):
    outs = run_children("""
        import sys
        from cfn_fast import telemetry
        print("ready", flush=True); sys.stdin.readline()
        print(sum(telemetry.emit_alert("inbox_overflow", "full", "critical", {"agent": "bob"}) for _ in range(20)))
    """, 6)
    assert sum(int(o) for o in outs) == 1
    assert len(lines(alerts_file())) == 1


def test_backpressure_failure_gives_one_metric_each_and_one_alert_per_cooldown(make_bus):
    b = make_bus(max_inbox_size=1, backpressure_max_retries=2, backpressure_wait_ms=1,
                 backpressure_max_total_ms=60000)  # retries, not the time budget, end each send
    b.init_message_bus("alice")
    b.init_message_bus("bob")
    b.send_message("alice", "bob", "t", 1)
    for _ in range(3):
        with pytest.raises(BackpressureTimeout):
            b.send_with_backpressure("alice", "bob", "t", 2)
    fails = [r for r in lines(metrics_file()) if r["metric"] == "backpressure.send.failure"]
    assert len(fails) == 3
    assert fails[0]["tags"] == {"from": "alice", "to": "bob", "retries": 2}
    (alert,) = lines(alerts_file())
    assert alert["alert"] == "inbox_overflow" and alert["severity"] == "critical"
    meta = alert["metadata"]
    top = meta.pop("top_senders")  # who filled it (its count halves at a 10 s boundary: not compared)
    assert meta == {"from": "alice", "to": "bob", "retries": 2, "max_size": 1}
    assert [(t["sender"], t["share"]) for t in top] == [("alice", 1.0)]
    assert telemetry.counters(b)["backpressure_failure"] == 3


def test_alert_backpressure_failure_never_raises(bus, monkeypatch):
    monkeypatch.setenv("ALERT_LOG_FILE", "/nonexistent-dir/alerts.jsonl")
    b = cfn_fast.MessageBus()
    try:
        assert telemetry.alert_backpressure_failure(b, "alice", "bob") is False
    finally:
        b.close()
    with pytest.raises(CfnError):  # emit_alert itself reports the failure
        telemetry.emit_alert("t", "m", metadata={"agent": "zz"})


def test_alerts_summary_groups_by_severity_and_type(bus):
    path = Path(alerts_file())
    old = {"timestamp": "2020-01-01T00:00:00.000Z", "alert": "inbox_overflow", "message": "old",
           "severity": "critical", "metadata": {}}
    path.write_text(json.dumps(old) + "\nnot json\n")
    telemetry.emit_alert("inbox_overflow", "m", "critical", {"agent": "a"})
    telemetry.emit_alert("inbox_overflow", "m", "critical", {"agent": "b"})
    telemetry.emit_alert("inbox_high_utilization", "m", "warning", {"agent": "a"})
    telemetry.emit_alert("inbox_overflow", "m", "critical", {"agent": "a"})  # suppressed
    s = cfn_fast.alerts_summary()
    assert s["total"] == 4 and s["invalid_lines"] == 1 and s["suppressed"] == 1
    assert s["by_severity"] == {"critical": 3, "warning": 1}
    assert list(s["by_severity"]) == ["critical", "warning"]  # most severe first
    assert s["by_type"] == {"inbox_overflow": 3, "inbox_high_utilization": 1}
    assert s["by_severity_and_type"] == {"critical": {"inbox_overflow": 3},
                                         "warning": {"inbox_high_utilization": 1}}
    recent = cfn_fast.alerts_summary(10)
    assert recent["total"] == 3 and recent["by_severity"] == {"critical": 2, "warning": 1}
    assert STAMP.match(recent["since"])
    with pytest.raises(InvalidArgument):
        cfn_fast.alerts_summary(-1)


def test_alerts_summary_without_a_file(base):
    s = telemetry.alerts_summary(5)
    assert s["total"] == 0 and s["by_severity"] == {} and s["by_type"] == {}


def test_counter_table_stays_inside_the_shared_area():
    own = [v for k, v in telemetry.COUNTERS.items() if k not in cfn_fast._core.COUNTERS]
    assert min(own) == cfn_fast._core.lib.CFN_CTR_FIRST_FREE and max(own) < 64 and len(set(telemetry.COUNTERS.values())) == len(telemetry.COUNTERS)


def test_cooldown_still_holds_in_process_when_the_shared_table_is_full(bus, monkeypatch):
    monkeypatch.setattr(alerts, "_local_cooldowns", {})
    h = bus.storage.handle()
    old = 1_000_000_000  # long expired, but the C table never frees an entry
    for i in range(1024):
        cfn_fast._core.cooldown_try(h, f"filler-{i}".encode(), old, 1)
    assert telemetry.emit_alert("inbox_overflow", "full", "critical", {"agent": "late"})
    assert not telemetry.emit_alert("inbox_overflow", "full", "critical", {"agent": "late"})
    assert telemetry.emit_alert("inbox_overflow", "full", "critical", {"agent": "later"})
    assert len(lines(alerts_file())) == 2
    assert telemetry.counters(bus)["alerts_suppressed"] == 1


def test_the_recording_probe_is_not_counted_as_a_suppression(bus):
    assert telemetry.emit_alert("t", "m", metadata={"agent": "a"})
    assert telemetry.counters(bus)["alerts_suppressed"] == 0


def test_cooldown_table_reuses_expired_entries(bus) -> None:
    """Old alerts must not fill the shared table: once 1,024 keys have gone
    quiet, a new key is still held to its cooldown."""
    from cfn_fast import _core

    h = bus.storage.handle()
    hour = 3600 * 10**9
    for i in range(1024):
        assert _core.cooldown_try(h, f"old-{i}".encode(), 1, hour)
    now = 10 * hour
    assert _core.cooldown_try(h, b"new", now, hour) is True
    assert _core.cooldown_try(h, b"new", now + 1, hour) is False


@pytest.fixture
def cli_stderr():
    """The command line's stderr handler on the cfn_fast logger, as `cfn-fast` installs it."""
    import logging

    from cfn_fast import logs

    handler = logs.stderr_handler()
    logger = logging.getLogger("cfn_fast")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_the_alert_line_on_stderr_is_the_originals(bus, capsys, cli_stderr, monkeypatch):
    """[ALERT <iso>] [<severity>] <type>: <message>, coloured as the original only on a terminal."""
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert telemetry.emit_alert("queue_depth_high", "depth 1200 > 1000", "warning", {"agent": "x"}, bus=bus)
    line = capsys.readouterr().err.strip()
    assert re.fullmatch(r"\[ALERT \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\] \[warning\] queue_depth_high: "
                        r"depth 1200 > 1000", line), line
    monkeypatch.setenv("FORCE_COLOR", "1")
    for severity, colour in (("critical", "\033[0;31m"), ("warning", "\033[1;33m"), ("info", "\033[0;34m")):
        telemetry.emit_alert(f"t_{severity}", "m", severity, {"agent": "y"}, bus=bus)
        err = capsys.readouterr().err
        assert err.startswith(colour + "[ALERT ") and err.endswith("\033[0m\n")


def test_the_command_line_prints_the_alerts_the_library_logs(bus) -> None:
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "cfn_fast", "alerts", "emit", "probe", "hello", "info"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and re.fullmatch(r"\[ALERT [^\]]+\] \[info\] probe: hello\n", r.stderr), r.stderr
