"""The click app: every command of the bash original, its output and exit codes.

Exit codes everywhere: 0 success, 1 the original's "no" (full, failed after
retries, not found), 2 bad usage or bad input, with one line on stderr.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from cfn_fast import commands
from cfn_fast.cli import cli
from cfn_fast.config import SETTINGS


@pytest.fixture
def run():
    runner = CliRunner()

    def invoke(*args: str, input: str | None = None) -> Result:
        return runner.invoke(cli, list(args), input=input, catch_exceptions=False)

    return invoke


@pytest.fixture
def agents(run) -> None:
    for agent in ("alice", "bob"):
        assert run("bus", "init", agent).exit_code == 0


def fill(run, to: str, n: int) -> list[str]:
    ids = []
    for i in range(n):
        r = run("bus", "send", "alice", to, "task", json.dumps({"i": i}))
        assert r.exit_code == 0, r.stderr
        ids.append(r.stdout.strip())
    return ids


def one_line(r: Result) -> str:
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


# -- the command table and click agree --------------------------------------------

def _click_paths(group: click.Group, prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    paths = set()
    for name, sub in group.commands.items():
        if isinstance(sub, click.Group):
            paths |= _click_paths(sub, prefix + (name,))
        else:
            paths.add(prefix + (name,))
    return paths


def test_click_has_exactly_the_commands_of_the_table():
    assert _click_paths(cli) == {c.path for c in commands.COMMANDS}


@pytest.mark.parametrize("cmd", commands.COMMANDS, ids=lambda c: " ".join(c.path))
def test_every_command_has_help_naming_its_arguments_and_exit_codes(run, cmd):
    r = run(*cmd.path, "--help")
    assert r.exit_code == 0
    assert cmd.help.split("\n")[0] in " ".join(r.stdout.split())
    for p in cmd.params:
        assert (f"--{p.name.replace('_', '-')}" if p.option else p.metavar) in r.stdout
    assert "Exit status" in r.stdout


@pytest.mark.parametrize("group", sorted(commands.GROUPS))
def test_every_group_has_help(run, group):
    r = run(group, "-h")
    assert r.exit_code == 0 and commands.GROUPS[group].split(":")[0] in r.stdout


# -- usage errors: exit 2, one line ---------------------------------------------------

@pytest.mark.parametrize("args", [
    ("no-such-command",),
    ("bus", "no-such-command"),
    ("get-size",),
    ("get-size", "a", "b"),
    ("bus", "count", "alice", "attic"),
    ("monitor-overflow", "-3"),
    ("metrics", "emit", "x", "not-a-number"),
])
def test_bad_usage_exits_2_with_one_line(run, args):
    r = run(*args)
    assert r.exit_code == 2
    assert "--help" in one_line(r)
    assert r.stdout == ""


@pytest.mark.parametrize("args", [
    ("get-size", "../etc"),
    ("bus", "init", "a/b"),
    ("bus", "send", "alice", "bob", "task", "{not json"),
    ("bus", "send", "alice", "bob", "", "{}"),
    ("metrics", "emit", "x", "1", "count", "[1]"),
])
def test_bad_input_exits_2_with_one_line(run, agents, args):
    r = run(*args)
    assert r.exit_code == 2
    one_line(r)


# -- message bus ---------------------------------------------------------------------

def test_init_creates_inbox_and_outbox_logging_only_to_stderr(run, base):
    r = run("bus", "init", "carol")
    assert r.exit_code == 0 and r.stdout == ""
    assert "Initialized message bus for carol" in r.stderr
    assert (base / "carol" / "inbox").is_dir() and (base / "carol" / "outbox").is_dir()


def test_send_prints_the_message_id_and_receive_returns_them_oldest_first(run, agents):
    ids = fill(run, "bob", 3)
    assert all(re.fullmatch(r"msg-\d+-\S+", i) for i in ids)
    r = run("bus", "receive", "bob")
    assert r.exit_code == 0
    messages = json.loads(r.stdout)
    assert [m["msg_id"] for m in messages] == ids
    assert [m["payload"] for m in messages] == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert list(messages[0]) == ["version", "msg_id", "from", "to", "timestamp", "sequence", "type",
                                 "payload", "requires_ack"]
    assert run("bus", "count", "bob").stdout == "3\n"  # receive removes nothing


def test_receive_of_an_empty_inbox_prints_an_empty_array(run, agents):
    r = run("bus", "receive", "bob")
    assert r.exit_code == 0 and json.loads(r.stdout) == []


def test_receive_without_an_inbox_exits_1(run, agents):
    r = run("bus", "receive", "nobody")
    assert r.exit_code == 1 and r.stdout == ""
    one_line(r)


def test_send_to_a_missing_inbox_exits_1(run, agents):
    r = run("bus", "send", "alice", "nobody", "task", "{}")
    assert r.exit_code == 1
    assert "nobody" in one_line(r)


def test_send_to_a_full_inbox_exits_1_and_evicts_nothing(run, agents, monkeypatch):
    monkeypatch.setenv("MAX_INBOX_SIZE", "2")
    first = fill(run, "bob", 2)
    r = run("bus", "send", "alice", "bob", "task", "{}")
    assert r.exit_code == 1
    one_line(r)
    assert [m["msg_id"] for m in json.loads(run("bus", "receive", "bob").stdout)] == first


def test_a_negative_number_is_a_payload_not_an_option(run, agents):
    assert run("bus", "send", "alice", "bob", "n", "-1").exit_code == 0
    assert json.loads(run("bus", "receive", "bob").stdout)[0]["payload"] == -1


def test_consume_prints_a_json_array_and_takes_the_messages(run, agents):
    ids = fill(run, "bob", 3)
    r = run("bus", "consume", "bob", "--max", "2")
    assert r.exit_code == 0
    assert [m["msg_id"] for m in json.loads(r.stdout)] == ids[:2]
    assert [m["msg_id"] for m in json.loads(run("bus", "consume", "bob").stdout)] == ids[2:]
    assert json.loads(run("bus", "consume", "bob").stdout) == []


def test_count_counts_the_inbox_by_default_and_the_outbox_on_request(run, agents):
    fill(run, "bob", 2)
    assert run("bus", "count", "bob").stdout == "2\n"
    assert run("bus", "count", "alice", "outbox").stdout == "2\n"
    assert run("bus", "count", "nobody").stdout == "0\n"


def test_clear_empties_the_inbox_and_exits_1_without_one(run, agents):
    fill(run, "bob", 2)
    assert run("bus", "clear", "bob").exit_code == 0
    assert run("bus", "count", "bob").stdout == "0\n"
    r = run("bus", "clear", "nobody")
    assert r.exit_code == 1
    one_line(r)


def test_cleanup_removes_the_agent_and_is_fine_when_repeated(run, agents, base):
    assert run("bus", "cleanup", "bob").exit_code == 0
    assert not (base / "bob").exists()
    r = run("bus", "cleanup", "bob")
    assert r.exit_code == 0 and "No message bus to cleanup" in r.stderr


def test_init_system_and_cleanup_system(run, base):
    assert run("bus", "init-system").exit_code == 0 and base.is_dir()
    assert run("bus", "cleanup-system").exit_code == 0 and not base.exists()


def test_send_batch_sends_every_good_line_and_names_the_bad_ones(run, agents):
    lines = ['{"n":1}', "", "not json", '{"n":2}', "[3]"]
    r = run("bus", "send-batch", "alice", "bob", "task", input="\n".join(lines) + "\n")
    assert r.exit_code == 1
    assert len(r.stdout.split()) == 3
    errors = [ln for ln in r.stderr.splitlines() if "line " in ln and "send-batch" in ln]
    assert len(errors) == 1 and "line 3:" in errors[0]
    payloads = [m["payload"] for m in json.loads(run("bus", "receive", "bob").stdout)]
    assert payloads == [{"n": 1}, {"n": 2}, [3]]


def test_send_batch_reports_a_line_that_is_not_text_and_goes_on(agents):
    r = CliRunner().invoke(cli, ["bus", "send-batch", "alice", "bob", "task"], input=b'1\n\xff\xfe\n3\n')
    assert r.exit_code == 1 and len(r.stdout.split()) == 2
    assert "line 2:" in r.stderr


def test_no_command_shows_the_help_on_stderr_and_exits_2(run):
    r = run()
    assert r.exit_code == 2 and r.stdout == "" and "Commands:" in r.stderr


def test_send_batch_of_good_lines_exits_0(run, agents):
    r = run("bus", "send-batch", "alice", "bob", "task", input="".join(f"{i}\n" for i in range(20)))
    assert r.exit_code == 0 and len(r.stdout.split()) == 20


def test_send_batch_waits_for_room_rather_than_failing(run, agents, monkeypatch, make_bus):
    """With backpressure, a batch larger than the inbox only fails after the retries."""
    monkeypatch.setenv("MAX_INBOX_SIZE", "3")
    monkeypatch.setenv("BACKPRESSURE_WAIT_MS", "5")
    monkeypatch.setenv("BACKPRESSURE_MAX_RETRIES", "2")
    r = run("bus", "send-batch", "alice", "bob", "task", input="1\n2\n3\n4\n5\n")
    assert r.exit_code == 1
    assert len(r.stdout.split()) == 3
    assert sorted(ln.split(": ")[1] for ln in r.stderr.splitlines() if "send-batch:" in ln) == [
        "line 4", "line 5"]


# -- rate limiting --------------------------------------------------------------------

def test_capacity_size_and_utilization_follow_the_inbox(run, agents, monkeypatch):
    monkeypatch.setenv("MAX_INBOX_SIZE", "8")
    assert run("check-capacity", "bob").exit_code == 0
    assert run("get-size", "bob").stdout == "0\n"
    fill(run, "bob", 5)
    assert run("get-size", "bob").stdout == "5\n"
    assert run("get-utilization", "bob").stdout == "62\n"  # 5*100/8, rounded down
    fill(run, "bob", 3)
    r = run("check-capacity", "bob")
    assert r.exit_code == 1 and r.stdout == ""
    assert "at capacity: 8/8" in r.stderr


def test_an_agent_without_an_inbox_has_room_and_size_0(run):
    assert run("check-capacity", "ghost").exit_code == 0
    assert run("get-size", "ghost").stdout == "0\n"
    assert run("get-utilization", "ghost").stdout == "0\n"


def test_get_size_sees_a_file_removed_by_a_bash_agent(run, agents, base):
    """The CLI counts the folder, not just the shared counter: rm is seen at once."""
    fill(run, "bob", 3)
    victim = sorted((base / "bob" / "inbox").glob("*.json"))[0]
    victim.unlink()
    assert run("get-size", "bob").stdout == "2\n"


def test_send_backpressure_delivers_and_prints_the_id(run, agents):
    r = run("send-backpressure", "alice", "bob", "task", '{"x":1}')
    assert r.exit_code == 0
    assert json.loads(run("bus", "receive", "bob").stdout)[0]["msg_id"] == r.stdout.strip()


def test_send_backpressure_exits_1_after_its_retries(run, agents, monkeypatch):
    monkeypatch.setenv("MAX_INBOX_SIZE", "1")
    monkeypatch.setenv("BACKPRESSURE_WAIT_MS", "5")
    monkeypatch.setenv("BACKPRESSURE_MAX_RETRIES", "3")
    fill(run, "bob", 1)
    r = run("send-backpressure", "alice", "bob", "task", "{}")
    assert r.exit_code == 1 and r.stdout == ""
    assert "send-backpressure" in r.stderr


def test_get_stats_prints_the_originals_json(run, agents, monkeypatch):
    monkeypatch.setenv("MAX_INBOX_SIZE", "10")
    fill(run, "bob", 3)
    r = run("get-stats")
    assert r.exit_code == 0
    assert json.loads(r.stdout) == [
        {"agent": "alice", "size": 0, "utilization": 0, "max_size": 10},
        {"agent": "bob", "size": 3, "utilization": 30, "max_size": 10},
    ]


def test_get_load_prints_a_number_with_two_decimals(run):
    r = run("get-load")
    assert r.exit_code == 0 and re.fullmatch(r"\d+\.\d\d\n", r.stdout)


def test_apply_rate_limit_prints_nothing_but_exports_on_request(run):
    assert run("apply-rate-limit").stdout == ""
    r = run("apply-rate-limit", "--export")
    assert r.exit_code == 0
    values = dict(re.findall(r"^export (\w+)=(\d+)$", r.stdout, re.M))
    assert (int(values["CFN_BATCH_SIZE"]), int(values["BACKPRESSURE_WAIT_MS"])) in [
        (5, 200), (10, 100), (20, 50)]


def test_cleanup_with_no_monitors_running(run):
    r = run("cleanup")
    assert r.exit_code == 0 and "0 monitors stopped" in r.stderr


# -- metrics and alerts -------------------------------------------------------------------

def test_metrics_emit_appends_one_line_in_the_originals_format(run, isolated_env, workdir):
    assert run("metrics", "emit", "coordination.time", "150", "milliseconds", '{"phase":"x"}').exit_code == 0
    line = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])
    assert list(line) == ["timestamp", "metric", "value", "unit", "tags"]
    assert (line["metric"], line["value"], line["unit"], line["tags"]) == (
        "coordination.time", 150, "milliseconds", {"phase": "x"})


def test_metrics_stats_and_clear(run, workdir):
    r = run("metrics", "stats")
    assert r.exit_code == 1 and "does not exist" in one_line(r)
    run("metrics", "emit", "a", "1")
    run("metrics", "emit", "b", "2.5")
    r = run("metrics", "stats")
    assert r.exit_code == 0 and "Entries: 2" in r.stdout
    assert json.loads(run("metrics", "stats", "--json").stdout)["lines"] == 2
    r = run("metrics", "clear", input="n\n")
    assert "cancelled" in r.stdout and (workdir / "metrics.jsonl").stat().st_size > 0
    assert run("metrics", "clear", "--force").exit_code == 0
    assert (workdir / "metrics.jsonl").stat().st_size == 0


def test_alerts_emit_and_summary(run, workdir):
    r = run("alerts", "emit", "inbox_overflow", "bob is full", "critical", '{"agent":"bob"}')
    assert r.exit_code == 0
    line = json.loads((workdir / "alerts.jsonl").read_text().splitlines()[-1])
    assert list(line) == ["timestamp", "alert", "message", "severity", "metadata"]
    summary = json.loads(run("alerts", "summary").stdout)
    assert summary["total"] == 1 and summary["by_severity"] == {"critical": 1}


# -- the rest -----------------------------------------------------------------------------

def test_env_lists_every_setting(run):
    names = [ln.split("=")[0] for ln in run("env").stdout.splitlines()]
    assert names == [s.env for s in SETTINGS]


def test_shell_prints_the_drop_in_and_its_path(run):
    path = run("shell", "--path").stdout.strip()
    assert os.path.isfile(path)
    assert run("shell").stdout == Path(path).read_text()


def test_version(run):
    r = run("--version")
    assert r.exit_code == 0 and "cfn-fast" in r.stdout


# -- monitors run in the foreground until signalled ------------------------------------------

def _start(*args: str) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = os.path.join(tempfile.gettempdir(), "cfn-fast-test-pycache")
    return subprocess.Popen([sys.executable, "-m", "cfn_fast", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_pidfile(base: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 20
    while not list((base / ".monitors").glob(f"*-{proc.pid}.pid")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the monitor never wrote its pid file"
        time.sleep(0.02)


@pytest.mark.parametrize("command", [("monitor-overflow", "0.05"), ("monitor-rate-limit", "0.05")])
def test_a_monitor_runs_until_sigterm_and_then_exits_0(run, agents, base, command):
    proc = _start(*command)
    try:
        _wait_for_pidfile(base, proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "Starting" in err


def test_cleanup_stops_the_monitors_of_this_base_folder(run, agents, base):
    proc = _start("monitor-overflow", "0.05")
    try:
        _wait_for_pidfile(base, proc)
        r = run("cleanup")
        assert r.exit_code == 0 and "1 monitors stopped" in r.stderr
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


# -- the demo ---------------------------------------------------------------------------------

def _report_numbers(text: str) -> dict[str, int]:
    return {m[0]: int(m[1]) for m in re.findall(r"^  (sent|delivered|waited|failed|lost|inbox peak)\s+(\d+)",
                                                  text, re.M)}


def test_demo_floods_a_slow_consumer_and_loses_nothing(run, workdir, monkeypatch):
    from cfn_fast import demo

    private = workdir / "demo-base"
    monkeypatch.setattr(demo, "_private_base", lambda: (private.mkdir(), str(private))[1])
    r = run("demo", "--senders", "2", "--messages", "30", "--capacity", "5", "--batch", "3",
            "--consume-delay-ms", "5", "--quiet")
    assert r.exit_code == 0, r.output
    got = _report_numbers(r.stdout)
    assert (got["sent"], got["delivered"], got["failed"], got["lost"]) == (60, 60, 0, 0)
    assert got["waited"] > 0            # backpressure engaged
    assert got["inbox peak"] <= 5       # and held the capacity
    assert re.search(r"p50 [\d.]+ ms, p99 [\d.]+ ms", r.stdout)
    assert not private.exists()         # the private base folder is removed


def test_the_demo_report_computes_lost_from_what_was_sent_and_received():
    from cfn_fast.demo import DemoSettings, SenderResult, summarize

    results = [SenderResult(0, sent=[0, 1, 2], latencies_ns=[1_000_000] * 3),
               SenderResult(1, sent=[0, 2], failed=1, waited=2, latencies_ns=[3_000_000] * 3)]
    received = [(0, 0), (0, 2), (1, 0), (1, 0), (1, 2)]  # (0, 1) never arrived; (1, 0) twice
    r = summarize(DemoSettings(), results, received, peak=4, elapsed_s=0.5)
    assert (r.sent, r.delivered, r.lost, r.duplicates, r.failed, r.waited) == (5, 4, 1, 1, 1, 2)
    assert (r.p50_ms, r.p99_ms, r.throughput) == (1.0, 3.0, 8.0)


@pytest.mark.parametrize("option", ["--senders", "--messages", "--capacity", "--batch"])
def test_demo_rejects_a_size_of_zero(run, option):
    r = run("demo", option, "0", "--quiet")
    assert r.exit_code == 2
    one_line(r)
