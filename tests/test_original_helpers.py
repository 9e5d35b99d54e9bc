"""The rest of what sourcing the original gave a script, on the library and
command-line side: alerting.sh's threshold checks, get_alert_summary's
shape, clear_old_alerts, get_next_sequence, and plain-text payloads."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import bash_original as orig
from cfn_fast import InvalidPayload, MessageBus, checks, telemetry


def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cfn_fast", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})


def alert_lines() -> list[dict]:
    path = Path(os.environ["ALERT_LOG_FILE"])
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize(("metric", "values", "alert", "severity"), [
    ("coordination.time", [100, 12000, 300], "coordination_time_exceeded", "critical"),
    ("coordination.delivery_rate", [99, 80, 95], "delivery_rate_low", "warning"),
    ("system.memory_mb", [100, 105, 111], "memory_growth_high", "warning"),
    ("system.open_fds", [10, 50, 111], "fd_growth_high", "warning"),
    ("coordination.error_rate", [1, 6, 2], "error_rate_high", "critical"),
    ("coordination.queue_depth", [10, 1001, 5], "queue_depth_high", "warning"),
])
def test_each_check_alerts_when_its_metric_crosses_its_threshold(bus: MessageBus, metric: str, values: list[int],
                                                                 alert: str, severity: str) -> None:
    for v in values[:-1]:
        telemetry.emit_metric(metric, v, bus=bus)
    telemetry.emit_metric(metric, values[-1], bus=bus)
    results = checks.run(bus.storage)
    assert [(r["metric"], r["crossed"], r["alerted"]) for r in results] == [(metric, True, True)]
    assert [(a["alert"], a["severity"]) for a in alert_lines()] == [(alert, severity)]
    assert alert_lines()[0]["metadata"]["threshold"] == results[0]["threshold"]
    assert checks.run(bus.storage)[0]["alerted"] is False  # the shared cooldown holds


def test_values_inside_the_thresholds_alert_nothing_and_only_the_last_60_lines_count(bus: MessageBus) -> None:
    telemetry.emit_metric("coordination.time", 99999, bus=bus)   # crossed, but 60 lines ago
    for _ in range(60):
        telemetry.emit_metric("coordination.time", 10, bus=bus)
    assert checks.run(bus.storage)[0]["crossed"] is False and alert_lines() == []


def test_the_thresholds_are_the_alert_settings(make_bus) -> None:
    bus = make_bus(alert_queue_depth=5)
    telemetry.emit_metric("coordination.queue_depth", 6, bus=bus)
    assert checks.run(bus.storage, ["queue-depth"])[0]["alerted"] is True


def test_the_cli_checks_a_given_file_and_warns_when_there_is_none(bus: MessageBus, tmp_path: Path) -> None:
    other = tmp_path / "other.jsonl"
    other.write_text(telemetry.format_metric("coordination.error_rate", 50, "percent").decode())
    out = cli("alerts", "check", str(other))
    assert out.returncode == 0 and "[critical] error_rate_high" in out.stderr
    out = cli("alerts", "check", str(tmp_path / "missing.jsonl"))
    assert out.returncode == 0 and "metrics file not found" in out.stderr


def test_get_alert_summary_has_the_originals_shape(bus: MessageBus) -> None:
    telemetry.emit_alert("a", "m", "warning", {"agent": "x"}, bus=bus)
    out = cli("alerts", "summary", "--minutes", "60", "--brief")
    assert json.loads(out.stdout) == {"total": 1, "by_severity": {"warning": 1}, "by_type": {"a": 1}}


def test_clear_old_alerts_keeps_the_newer_lines(bus: MessageBus) -> None:
    path = Path(os.environ["ALERT_LOG_FILE"])
    old = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(time.time() - 3 * 86400))
    telemetry.emit_alert("new", "m", bus=bus)
    with open(path, "a") as f:
        f.write(json.dumps({"timestamp": old, "alert": "old", "message": "m", "severity": "info",
                            "metadata": {}}) + "\n")
    assert checks.clear_old_alerts(bus.storage, 24) == (1, 1)
    assert [a["alert"] for a in alert_lines()] == ["new"]
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_get_next_sequence_advances_what_sends_use_and_bash_agrees(bus: MessageBus, base: Path) -> None:
    assert bus.get_next_sequence("alice", "bob") == 1
    first = bus.send_message("alice", "bob", "t", 1)
    orig.send(base, "alice", "bob", "t", "2")            # the bash original on the same pair
    assert cli("bus", "next-sequence", "alice", "bob").stdout == "4\n"
    last = bus.send_message("alice", "bob", "t", 3)
    seqs = sorted(m["sequence"] for m in bus.receive_messages("bob"))
    assert seqs == [2, 3, 5] and first.split("-")[2] == "0000000002" and last.split("-")[2] == "0000000005"


def test_plain_text_payloads_are_sent_as_json_strings_when_asked(make_bus) -> None:
    strict = make_bus()
    strict.init_message_bus("bob")
    with pytest.raises(InvalidPayload):
        strict.send_message("alice", "bob", "t", "hello world")
    lenient = make_bus(text_payloads=True)
    lenient.send_message("alice", "bob", "t", "hello world")
    lenient.send_message("alice", "bob", "t", '{"still": "json"}')
    got = [m["payload"] for m in lenient.receive_messages("bob")]
    assert got == ["hello world", {"still": "json"}]
    out = cli("bus", "send", "alice", "bob", "t", "it's plain: text", CFN_TEXT_PAYLOADS="1")
    assert out.returncode == 0, out.stderr
    assert lenient.receive_messages("bob")[-1]["payload"] == "it's plain: text"
