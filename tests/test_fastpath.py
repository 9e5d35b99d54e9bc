"""The fast path: hot commands run before click is imported, and agree with click.

Cold-start cost itself is measured in bench/bench_startup.py, never asserted here.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Optional

import pytest
from click.testing import CliRunner

from cfn_fast import _fastpath, commands
from cfn_fast.cli import cli

HOT = [c for c in commands.COMMANDS if c.hot]

# One plain call of every hot command (bob's inbox exists, see `agents`).
HOT_CALLS = {
    "get-size": ["get-size", "bob"],
    "check-capacity": ["check-capacity", "bob"],
    "get-utilization": ["get-utilization", "bob"],
    "send-backpressure": ["send-backpressure", "alice", "bob", "task", '{"k":[1,2]}'],
    "send": ["bus", "send", "alice", "bob", "task", "-2.5e3"],
    "count": ["bus", "count", "bob", "outbox"],
}


def cfn(*args: str, input: Optional[str] = None, code: Optional[str] = None) -> subprocess.CompletedProcess:
    """cfn-fast in a fresh interpreter, as an agent script runs it (bytecode cached
    in a private folder, so each call does not recompile the package)."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = os.path.join(tempfile.gettempdir(), "cfn-fast-test-pycache")
    argv = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "cfn_fast", *args]
    return subprocess.run(argv, input=input, capture_output=True, text=True, env=env, timeout=60)


@pytest.fixture
def agents(bus) -> None:
    """alice and bob have inboxes (conftest's `bus` fixture makes them)."""
    bus.init_message_bus("bob")


def test_the_hot_commands_are_the_ones_the_issue_names():
    assert {" ".join(c.path) for c in HOT} == {
        "get-size", "check-capacity", "get-utilization", "send-backpressure", "bus send", "bus count"}
    assert {c.path[-1] for c in HOT} == set(HOT_CALLS)


@pytest.mark.parametrize("cmd", HOT, ids=lambda c: " ".join(c.path))
def test_every_hot_command_has_a_handler_and_only_arguments_the_fast_path_parses(cmd):
    assert callable(cmd.handler) and cmd.handler.__module__ == "cfn_fast.handlers"
    assert all(p.choices for p in cmd.params if p.option)  # positionals, and --name CHOICE options


def test_a_hot_call_with_a_choice_option_runs_on_the_fast_path(agents, capsys):
    assert _fastpath.run(["bus", "send", "--priority", "high", "alice", "bob", "task", "1"]) == 0
    assert capsys.readouterr().out.strip().endswith("-hi")
    assert _fastpath.run(["bus", "send", "--priority", "urgent", "alice", "bob", "task", "1"]) is None
    assert _fastpath.run(["bus", "send", "alice", "bob", "task", "1", "--priority", "high"]) is None


@pytest.mark.parametrize("name", sorted(HOT_CALLS))
def test_a_plain_hot_call_runs_on_the_fast_path(agents, capsys, name):
    assert _fastpath.run(HOT_CALLS[name]) is not None


@pytest.mark.parametrize("argv", [
    [],
    ["get-size"],
    ["get-size", "bob", "extra"],
    ["get-size", "--help"],
    ["get-size", "-h"],
    ["bus", "send", "alice", "bob", "--", "{}"],
    ["bus", "send", "alice", "bob", "task", "-x"],
    ["bus", "count", "bob", "attic"],
    ["bus"],
    ["get-stats"],
    ["bus", "receive", "bob"],
    ["no-such-command"],
], ids=lambda a: " ".join(a) or "nothing")
def test_anything_else_is_left_to_click(argv):
    assert _fastpath.run(argv) is None


@pytest.mark.parametrize("name", sorted(HOT_CALLS))
def test_hot_commands_import_neither_click_psutil_nor_json(agents, name):
    probe = (
        "import sys\n"
        "from cfn_fast.__main__ import main\n"
        "rc = main(sys.argv[1:])\n"
        "sys.stdout.flush()\n"
        "sys.stderr.write('LOADED=' + ','.join(m for m in ('click', 'psutil', 'json') if m in sys.modules))\n"
        "sys.exit(rc)\n"
    )
    r = cfn(*HOT_CALLS[name], code=probe)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().splitlines()[-1] == "LOADED="


def _click(argv: list[str]) -> tuple[int, str, str]:
    r = CliRunner().invoke(cli, argv)
    return r.exit_code, r.stdout, r.stderr


def _fast(argv: list[str], capsys) -> tuple[int, str, str]:
    code = _fastpath.run(argv)
    assert code is not None
    got = capsys.readouterr()
    return code, got.out, got.err


@pytest.mark.parametrize("argv", [
    ["get-size", "bob"],
    ["get-size", "ghost"],
    ["get-utilization", "bob"],
    ["check-capacity", "bob"],
    ["bus", "count", "bob"],
    ["bus", "count", "alice", "outbox"],
    ["get-size", "..bad"],
    ["bus", "send", "alice", "ghost", "task", "{}"],
    ["bus", "send", "alice", "bob", "task", "{oops"],
    ["send-backpressure", "alice", "bob", "task", "nan"],
], ids=lambda a: " ".join(a))
def test_fast_path_and_click_give_the_same_answer(bus, capsys, monkeypatch, argv):
    monkeypatch.setenv("MAX_INBOX_SIZE", "3")
    for i in range(3):
        bus.send_message("alice", "bob", "task", {"i": i})
    assert _fast(argv, capsys) == _click(argv)


# -- exit codes of a real process -------------------------------------------------------

def test_a_real_process_prints_the_size(agents, bus):
    bus.send_message("alice", "bob", "t", 1)
    r = cfn("get-size", "bob")
    assert (r.returncode, r.stdout, r.stderr) == (0, "1\n", "")


def test_a_real_send_prints_the_id_and_delivers(agents, bus):
    r = cfn("bus", "send", "alice", "bob", "task", '{"a":1}')
    assert r.returncode == 0
    assert bus.receive_messages("bob")[0]["msg_id"] == r.stdout.strip()


@pytest.mark.parametrize("argv, code", [
    (["bus", "send", "alice", "ghost", "task", "{}"], 1),   # no inbox: the original's "no"
    (["bus", "send", "alice", "bob", "task", "{x"], 2),     # not JSON: bad input
    (["get-size", "../x"], 2),                               # bad agent id
    (["get-size"], 2),                                       # missing argument
    (["no-such-command"], 2),                                # the original printed usage, exit 1
    (["check-capacity", "full"], 1),                         # full
    (["send-backpressure", "alice", "full", "task", "{}"], 1),  # still full after the retries
])
def test_a_real_process_fails_with_the_right_code_and_one_line(bus, monkeypatch, argv, code):
    monkeypatch.setenv("MAX_INBOX_SIZE", "1")
    monkeypatch.setenv("BACKPRESSURE_WAIT_MS", "5")
    monkeypatch.setenv("BACKPRESSURE_MAX_RETRIES", "2")
    bus.init_message_bus("full")
    bus.send_message("alice", "full", "t", 0)
    r = cfn(*argv)
    assert r.returncode == code
    assert r.stdout == ""
    # the one line that explains the answer (check-capacity's is the original's log line;
    # a failed backpressure send also prints its inbox_overflow alert)
    explaining = [ln for ln in r.stderr.splitlines() if ln.startswith("cfn-fast") or "at capacity" in ln]
    assert len(explaining) == 1, r.stderr
    if code == 2:
        assert len(r.stderr.strip().splitlines()) == 1


def test_help_from_a_real_process(agents):
    r = cfn("get-size", "--help")
    assert r.returncode == 0 and "AGENT" in r.stdout and r.stderr == ""


def test_a_closed_pipe_is_not_a_traceback(agents, bus):
    for i in range(200):
        bus.send_message("alice", "bob", "t", {"i": i, "pad": "x" * 200})
    env = dict(os.environ)
    p = subprocess.run(f"'{sys.executable}' -m cfn_fast bus receive bob | head -c 10 >/dev/null",
                       shell=True, capture_output=True, text=True, env=env, timeout=60)
    assert "Traceback" not in p.stderr


def test_json_payload_round_trips_through_a_real_process(agents, bus):
    payload = {"text": "héllo \"quoted\" \\ back", "n": [1, 2.5, None, True]}
    r = cfn("send-backpressure", "alice", "bob", "task", json.dumps(payload, ensure_ascii=False))
    assert r.returncode == 0
    assert bus.receive_messages("bob")[0]["payload"] == payload
