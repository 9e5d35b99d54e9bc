"""The native cfn-fast (csrc/cli/): hot commands served in C, exactly as the
Python path serves them, and everything else handed to Python unchanged.

Each parity test runs one command through both entries, the native program
and `python -m cfn_fast`, from the same starting state, and compares the exit
code, stdout, stderr and every file under the test's folder, with only times
and random id tails blanked. The test_cli.py tests of the hot commands run
again here through real processes of both entries.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import pytest

import native_entry as ne
from cfn_fast import BackpressureTimeout, Config, MessageBus, commands, telemetry
from native_entry import ENTRIES, HANDED_OVER, HANDOVER, argv, child_env, handed_over, handover_stub, \
    native_program, normal, tree

NATIVE = "native"


# -- which calls the program serves, and which it hands over ------------------------------

HOT_CALLS = {
    "get-size": ["get-size", "bob"],
    "check-capacity": ["check-capacity", "bob"],
    "get-utilization": ["get-utilization", "bob"],
    "send-backpressure": ["send-backpressure", "alice", "bob", "task", '{"k":[1,2]}'],
    "bus send": ["bus", "send", "alice", "bob", "task", "-2.5e3"],
    "bus count": ["bus", "count", "bob"],
    "bus count outbox": ["bus", "count", "alice", "outbox"],
}


@pytest.fixture
def stub(tmp_path: Path) -> tuple[dict, Path]:
    """An environment whose Python is the recording stub, and the stub's log."""
    interpreter, log = handover_stub(tmp_path)
    return {"CFN_FAST_PYTHON": str(interpreter)}, log


def test_the_program_serves_every_hot_command_of_the_table():
    served = {" ".join(c.path) for c in commands.COMMANDS if c.hot}
    assert {" ".join(a[:2]) if a[0] == "bus" else a[0] for a in HOT_CALLS.values()} == served


@pytest.mark.parametrize("name", sorted(HOT_CALLS))
def test_a_plain_hot_call_never_starts_python(bus, stub, name):
    env, log = stub
    r = ne.run(NATIVE, *HOT_CALLS[name], env=env)
    assert r.returncode == 0, r.stderr
    assert handed_over(log) is None


@pytest.mark.parametrize("args", [
    [],
    ["get-size"],
    ["get-size", "bob", "extra"],
    ["get-size", "--help"],
    ["get-size", "-h"],
    ["--help"],
    ["--version"],
    ["bus"],
    ["bus", "send", "alice", "bob", "--", "{}"],
    ["bus", "send", "alice", "bob", "task", "-x"],
    ["bus", "send", "alice", "bob", "task", "-"],
    ["bus", "count", "bob", "attic"],
    ["bus", "count", "bob", "inbox", "extra"],
    ["get-stats"],
    ["bus", "receive", "bob"],
    ["bus", "init", "bob"],
    ["monitor-overflow", "1"],
    ["shell", "--path"],
    ["no-such-command"],
    ["send-backpressure", "alice", "bob", "task", "-\u0661"],    # is '١' a digit? str.isdigit() says
    ["get-size", "b\u00f6b"],                                 # agent_bytes words this with repr()
    [b"bus", b"send", b"alice", b"bob", b"task", b'"\xff"'],  # not UTF-8: str.encode() words it
], ids=lambda a: " ".join(x if isinstance(x, str) else repr(x) for x in a) or "nothing")
def test_anything_else_reaches_the_python_cli_unchanged(bus, stub, args):
    env, log = stub
    r = ne.run(NATIVE, *args, env=env)
    assert r.returncode == HANDED_OVER, r.stderr
    assert handed_over(log) == [*HANDOVER, *(os.fsencode(a) for a in args)]
    assert r.stdout == b"" and r.stderr == b""


@pytest.mark.parametrize("env", [
    {"MAX_INBOX_SIZE": "abc"},
    {"CFN_GROUP": "root"},                      # a group name: Python looks it up
    {"PYTHONIOENCODING": "latin-1"},            # Python would write other bytes
    {"LC_ALL": "en_US.ISO-8859-1"},
    {"MESSAGE_BASE_DIR": b"/tmp/\xff"},         # not UTF-8: Python prints it escaped
    {"MESSAGE_BUS_URL": "redis://127.0.0.1:1/0"},  # the Redis backend is Python's
    {"REDIS_PASSWORD": "secret"},
], ids=lambda e: ",".join(f"{k}={v!r}" for k, v in e.items()))
def test_a_case_only_python_words_exactly_is_handed_over(bus, stub, env):
    stub_env, log = stub
    r = ne.run(NATIVE, "get-size", "bob", env={**stub_env, **env})
    assert r.returncode == HANDED_OVER, r.stderr
    assert handed_over(log) == [*HANDOVER, b"get-size", b"bob"]


def test_handed_over_calls_keep_the_environment(bus, tmp_path: Path):
    stub = tmp_path / "python-stub"
    out = tmp_path / "env"
    stub.write_text(f'#!/bin/sh\nenv > "{out}"\nexit 99\n')
    stub.chmod(0o755)
    r = ne.run(NATIVE, "get-stats", env={"CFN_FAST_PYTHON": str(stub), "CFN_TEST_MARK": "a b\tc"})
    assert r.returncode == HANDED_OVER
    assert "CFN_TEST_MARK=a b\tc" in out.read_text().splitlines()


def test_a_handed_over_call_imports_nothing_from_the_current_folder(bus, tmp_path: Path):
    """As the console script it replaces: a click.py where cfn-fast runs is not imported."""
    (tmp_path / "click.py").write_text("raise SystemExit('the click.py of the current folder was imported')\n")
    (tmp_path / "cfn_fast").mkdir()
    (tmp_path / "cfn_fast" / "__init__.py").write_text("raise SystemExit('a cfn_fast of the current folder')\n")
    r = subprocess.run([native_program(), "get-stats"], cwd=tmp_path, capture_output=True, text=True,
                       env=child_env(), timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("["), r.stderr


# -- finding the interpreter --------------------------------------------------------------

def test_the_python_beside_the_program_comes_first(tmp_path: Path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    program = bindir / "cfn-fast"
    shutil.copy2(native_program(), program)
    name = f"python{sys.version_info[0]}.{sys.version_info[1]}{getattr(sys, 'abiflags', '')}"
    interpreter, log = handover_stub(tmp_path)
    shutil.copy2(interpreter, bindir / name)
    r = subprocess.run([str(program), "get-stats"], capture_output=True, env=child_env(), timeout=30)
    assert r.returncode == HANDED_OVER and handed_over(log) == [*HANDOVER, b"get-stats"]


def test_without_one_beside_it_the_building_interpreter_serves(tmp_path: Path):
    program = tmp_path / "cfn-fast"
    shutil.copy2(native_program(), program)
    r = subprocess.run([str(program), "env"], capture_output=True, text=True, env=child_env(), timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("MESSAGE_BASE_DIR=")


def test_an_interpreter_that_will_not_start_is_one_line_and_exit_1(tmp_path: Path):
    r = ne.run(NATIVE, "get-stats", env={"CFN_FAST_PYTHON": str(tmp_path / "nothing-here")})
    assert r.returncode == 1 and r.stdout == b""
    lines = r.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cfn-fast: cannot start the Python CLI") and \
        "nothing-here" in lines[0] and "CFN_FAST_PYTHON" in lines[0]


# -- parity: the same command, the same state, both entries --------------------------------

Setup = Callable[[Path], None]


def three_in_bob(base: Path) -> None:
    """alice and bob have inboxes; bob holds 3 messages (MAX_INBOX_SIZE is 3 in these tests)."""
    with MessageBus(config=Config.from_env()) as b:
        for a in ("alice", "bob"):
            b.init_message_bus(a)
        for i in range(3):
            b.send_message("alice", "bob", "task", {"i": i})
        forget_metrics(b)


def empty_inboxes(base: Path) -> None:
    with MessageBus(config=Config.from_env()) as b:
        for a in ("alice", "bob"):
            b.init_message_bus(a)
        forget_metrics(b)


def forget_metrics(b: MessageBus) -> None:
    """The setup's metric lines are not the command's."""
    Path(b.config.metrics_file).unlink(missing_ok=True)


def nothing(base: Path) -> None:
    pass


def bob_inbox_is_a_symlink(base: Path) -> None:
    empty_inboxes(base)
    elsewhere = base.parent / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    shutil.rmtree(base / "bob" / "inbox")
    (base / "bob" / "inbox").symlink_to(elsewhere)


def base_is_a_symlink(base: Path) -> None:
    real = base.parent / "real-base"
    real.mkdir(exist_ok=True)
    base.symlink_to(real)


def state_file_damaged(base: Path) -> None:
    empty_inboxes(base)
    state = base / ".cfn-fast.shm"
    with open(state, "r+b") as f:
        f.write(b"NOTCFN!!")


def bash_wrote_one(base: Path) -> None:
    """A message file the counter does not know, as a bash agent writes it."""
    three_in_bob(base)
    (base / "bob" / "inbox" / "msg-1-bash.json").write_text('{"msg_id":"msg-1-bash","payload":{}}')


def rm_one(base: Path) -> None:
    three_in_bob(base)
    sorted((base / "bob" / "inbox").glob("*.json"))[0].unlink()


PARITY: list[tuple[str, list[str], Setup, dict]] = [
    ("size", ["get-size", "bob"], three_in_bob, {}),
    ("size of no inbox", ["get-size", "ghost"], three_in_bob, {}),
    ("size, no base folder", ["get-size", "bob"], nothing, {}),
    ("size after a bash write", ["get-size", "bob"], bash_wrote_one, {}),
    ("size after a bash rm", ["get-size", "bob"], rm_one, {}),
    ("utilization", ["get-utilization", "bob"], three_in_bob, {"MAX_INBOX_SIZE": "8"}),  # the inbox's 3 holds
    ("utilization, full", ["get-utilization", "bob"], three_in_bob, {}),
    ("capacity, full", ["check-capacity", "bob"], three_in_bob, {}),
    ("capacity, the inbox's own", ["check-capacity", "bob"], three_in_bob, {"MAX_INBOX_SIZE": "4"}),
    ("capacity, room", ["check-capacity", "bob"], empty_inboxes, {}),
    ("capacity of no inbox", ["check-capacity", "ghost"], three_in_bob, {}),
    ("count", ["bus", "count", "bob"], three_in_bob, {}),
    ("count outbox", ["bus", "count", "alice", "outbox"], three_in_bob, {}),
    ("count, no base folder", ["bus", "count", "bob"], nothing, {}),
    ("send", ["bus", "send", "alice", "bob", "task", '{"a": [1, 2.5, null]}'], empty_inboxes, {}),
    ("send a negative number", ["bus", "send", "alice", "bob", "n", "-2.5e3"], empty_inboxes, {}),
    ("send, unicode type and payload", ["bus", "send", "alice", "bob", "t\u00e2che", '"h\u00e9llo \\u00e9"'],
     empty_inboxes, {}),
    ("send from a new sender", ["bus", "send", "carol", "bob", "task", "{}"], empty_inboxes, {}),
    ("send to a full inbox", ["bus", "send", "alice", "bob", "task", "{}"], three_in_bob, {}),
    ("send to no inbox", ["bus", "send", "alice", "ghost", "task", "{}"], three_in_bob, {}),
    ("send, no base folder", ["bus", "send", "alice", "bob", "task", "{}"], nothing, {}),
    ("send not JSON", ["bus", "send", "alice", "bob", "task", "{oops"], empty_inboxes, {}),
    ("send NaN", ["send-backpressure", "alice", "bob", "task", "nan"], empty_inboxes, {}),
    ("send an empty type", ["bus", "send", "alice", "bob", "", "{}"], empty_inboxes, {}),
    ("send too big", ["bus", "send", "alice", "bob", "task", '"123456"'], empty_inboxes,
     {"MAX_MESSAGE_BYTES": "5"}),
    ("send a lone surrogate", ["bus", "send", "alice", "bob", "task", '"\\ud800"'], empty_inboxes, {}),
    ("send plain text", ["bus", "send", "alice", "bob", "t", 'say "hi"\\ \n\tto \x01 b\u00e9b\u00e9 \x7f'],
     empty_inboxes, {"CFN_TEXT_PAYLOADS": "1"}),
    ("send plain text, backpressure", ["send-backpressure", "alice", "bob", "t", "hello world"], empty_inboxes,
     {"CFN_TEXT_PAYLOADS": "1"}),
    ("send JSON with text payloads on", ["bus", "send", "alice", "bob", "t", ' {"a": 1} '], empty_inboxes,
     {"CFN_TEXT_PAYLOADS": "1"}),
    ("send a lone surrogate as text", ["bus", "send", "alice", "bob", "t", '"\\ud800"'], empty_inboxes,
     {"CFN_TEXT_PAYLOADS": "1"}),
    ("send plain text, refused", ["bus", "send", "alice", "bob", "t", "hello"], empty_inboxes,
     {"CFN_TEXT_PAYLOADS": "0"}),
    ("backpressure send", ["send-backpressure", "alice", "bob", "task", '{"x":1}'], empty_inboxes, {}),
    ("backpressure send after a bash rm", ["send-backpressure", "alice", "bob", "task", "{}"], rm_one,
     {"BACKPRESSURE_WAIT_MS": "5", "BACKPRESSURE_MAX_RETRIES": "2"}),
    ("backpressure send, full", ["send-backpressure", "alice", "bob", "task", "{}"], three_in_bob,
     {"BACKPRESSURE_WAIT_MS": "5", "BACKPRESSURE_MAX_RETRIES": "2"}),
    ("backpressure send, full, no metrics", ["send-backpressure", "alice", "bob", "task", "{}"], three_in_bob,
     {"BACKPRESSURE_WAIT_MS": "1", "BACKPRESSURE_MAX_RETRIES": "1", "CFN_METRICS": "0"}),
    ("backpressure send, full, colour", ["send-backpressure", "alice", "bob", "task", "{}"], three_in_bob,
     {"BACKPRESSURE_WAIT_MS": "1", "BACKPRESSURE_MAX_RETRIES": "1", "FORCE_COLOR": "1"}),
    ("bad id", ["get-size", "../etc"], three_in_bob, {}),
    ("bad id, dot", ["get-size", ".hidden"], three_in_bob, {}),
    ("bad id with a newline", ["get-size", "a\nb"], three_in_bob, {}),
    ("bad id, too long", ["get-size", "a" * 129], three_in_bob, {}),
    ("bad sender", ["bus", "send", "al/ice", "bob", "task", "{}"], three_in_bob, {}),
    ("bad recipient and bad JSON", ["bus", "send", "alice", "b b", "task", "{x"], three_in_bob, {}),
    ("bad id and a bad setting", ["get-size", "../x"], three_in_bob, {"MAX_INBOX_SIZE": "0"}),
    ("a bad setting", ["get-size", "bob"], three_in_bob, {"MAX_INBOX_SIZE": "1e9"}),
    ("an inbox symlinked elsewhere", ["get-size", "bob"], bob_inbox_is_a_symlink, {}),
    ("a send into a symlinked inbox", ["bus", "send", "alice", "bob", "task", "{}"], bob_inbox_is_a_symlink, {}),
    ("a symlinked base folder", ["get-size", "bob"], base_is_a_symlink, {}),
    ("a damaged state file", ["bus", "send", "alice", "bob", "task", "{}"], state_file_damaged, {}),
    ("a metrics file that is a folder", ["send-backpressure", "alice", "bob", "task", "{}"], empty_inboxes,
     {"METRICS_FILE": "/"}),
    # flow control: the priority lane's headroom (a third of 3 rounded up: one place), its settings
    ("high-priority send into the headroom", ["bus", "send", "alice", "bob", "task", "{}"], three_in_bob,
     {"CFN_PRIORITY": "high", "CFN_PRIORITY_HEADROOM_PCT": "34"}),
    ("high-priority send, no headroom", ["bus", "send", "alice", "bob", "task", "{}"], three_in_bob,
     {"CFN_PRIORITY": "high", "CFN_PRIORITY_HEADROOM_PCT": "0"}),
    ("high-priority backpressure send", ["send-backpressure", "alice", "bob", "task", "{}"], three_in_bob,
     {"CFN_PRIORITY": "high"}),
    ("a priority that is not one", ["bus", "send", "alice", "bob", "task", "{}"], empty_inboxes,
     {"CFN_PRIORITY": "urgent"}),
    ("an adaptive mode that is not one", ["get-size", "bob"], three_in_bob, {"CFN_ADAPTIVE_LIMIT": "fast"}),
    ("a breaker setting out of range", ["bus", "send", "alice", "bob", "task", "{}"], empty_inboxes,
     {"CFN_BREAKER_PROBES": "64"}),
]


def outcome(which: str, args: list[str], setup: Setup, env: dict, workdir: Path, base: Path,
            **kw: object) -> tuple[int, bytes, bytes, dict[str, bytes]]:
    for child in workdir.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    saved = dict(os.environ)
    os.environ["MAX_INBOX_SIZE"] = "3"
    try:
        setup(base)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    if args[0] == "send-backpressure":
        time.sleep(0.03)  # past the heal interval: a sender heals before waiting, however fast it starts
    r = ne.run(which, *args, env={"MAX_INBOX_SIZE": "3", **env}, **kw)
    return r.returncode, normal(r.stdout), normal(r.stderr or b""), tree(workdir)


@pytest.mark.parametrize("args, setup, env", [p[1:] for p in PARITY], ids=[p[0] for p in PARITY])
def test_both_entries_answer_alike(workdir, base, args, setup, env):
    native = outcome(NATIVE, args, setup, env, workdir, base)
    python = outcome("python", args, setup, env, workdir, base)
    assert native == python
    code, out, err, _ = native
    if code:  # a failure is one line (a full backpressure send also prints its alert first)
        assert out == b""
        explaining = [ln for ln in err.splitlines() if ln.startswith(b"cfn-fast") or b"at capacity" in ln]
        assert len(explaining) == 1, err


@pytest.mark.parametrize("unbuffered", ["", "1"], ids=["buffered", "PYTHONUNBUFFERED"])
def test_stdout_and_stderr_interleave_alike(workdir, base, unbuffered):
    """2>&1 through one pipe. Buffered, the log line comes first (stderr is
    unbuffered, stdout is written at exit); with PYTHONUNBUFFERED, the id first."""
    args = ["bus", "send", "alice", "bob", "task", "{}"]
    got = {e: outcome(e, args, empty_inboxes, {"PYTHONUNBUFFERED": unbuffered}, workdir, base,
                      stderr=subprocess.STDOUT)[1] for e in ENTRIES}
    assert got[NATIVE] == got["python"]
    log_first = got[NATIVE].index(b"[MESSAGE-BUS]") < got[NATIVE].index(b"msg-")
    assert log_first == (not unbuffered)


def shared_counters() -> dict[str, int]:
    with MessageBus(config=Config.from_env()) as b:
        return telemetry.counters(b)


def test_a_failed_backpressure_send_alerts_and_counts_alike(workdir, base):
    """The inbox_overflow alert: its stderr line, its file line, the shared
    counters, and one per cooldown whichever entry fails next."""
    env = {"BACKPRESSURE_WAIT_MS": "1", "BACKPRESSURE_MAX_RETRIES": "1"}
    args = ["send-backpressure", "alice", "bob", "task", "{}"]
    results = {}
    for e in ENTRIES:
        outcome(e, args, three_in_bob, env, workdir, base)
        counters = shared_counters()
        time.sleep(0.03)  # past the heal interval, as in outcome()
        again = ne.run(e, *args, env={"MAX_INBOX_SIZE": "3", **env})  # within the cooldown
        after = shared_counters()
        results[e] = (counters, normal(again.stderr), {k: after[k] - counters[k] for k in after})
    assert results[NATIVE] == results["python"]
    counters, second, delta = results[NATIVE]
    assert counters["alerts_inbox_overflow"] == counters["alerts"] == 1
    assert b"ALERT" not in second and delta["alerts_suppressed"] == 1


def test_a_refused_alert_file_is_counted_alike(workdir, base):
    env = {"BACKPRESSURE_WAIT_MS": "1", "BACKPRESSURE_MAX_RETRIES": "1",
           "ALERT_LOG_FILE": str(workdir / "alerts-fifo")}
    got = {}
    for e in ENTRIES:
        def setup(b: Path) -> None:
            three_in_bob(b)
            os.mkfifo(workdir / "alerts-fifo")
        code, out, err, files = outcome(e, ["send-backpressure", "alice", "bob", "task", "{}"], setup, env,
                                        workdir, base)
        got[e] = (code, err, shared_counters()["alert_write_errors"])
    assert got[NATIVE] == got["python"]
    assert got[NATIVE][0] == 1 and got[NATIVE][2] == 1


# -- the test_cli.py tests of the hot commands, through real processes of both entries --------
# Imported, they are collected here too, where `run` and `agents` are these fixtures.
from test_cli import (  # noqa: E402,F401
    test_a_negative_number_is_a_payload_not_an_option,
    test_an_agent_without_an_inbox_has_room_and_size_0,
    test_bad_input_exits_2_with_one_line,
    test_bad_usage_exits_2_with_one_line,
    test_capacity_size_and_utilization_follow_the_inbox,
    test_count_counts_the_inbox_by_default_and_the_outbox_on_request,
    test_get_size_sees_a_file_removed_by_a_bash_agent,
    test_send_backpressure_delivers_and_prints_the_id,
    test_send_backpressure_exits_1_after_its_retries,
    test_send_prints_the_message_id_and_receive_returns_them_oldest_first,
    test_send_to_a_full_inbox_exits_1_and_evicts_nothing,
    test_send_to_a_missing_inbox_exits_1,
)


class Result:
    """What test_cli.py reads of click's Result, from a real process."""

    def __init__(self, r: subprocess.CompletedProcess) -> None:
        self.exit_code = r.returncode
        self.stdout = r.stdout.decode()
        self.stderr = r.stderr.decode()
        self.output = self.stdout + self.stderr


@pytest.fixture(params=ENTRIES)
def run(request):
    def invoke(*args: str, input: Optional[str] = None) -> Result:
        return Result(ne.run(request.param, *args, input=None if input is None else input.encode()))
    return invoke


@pytest.fixture
def agents(base) -> None:
    """alice and bob have inboxes (made in process: `bus init` is not what these test)."""
    with MessageBus(config=Config.from_env()) as b:
        for agent in ("alice", "bob"):
            b.init_message_bus(agent)


# -- signals and a closed reader --------------------------------------------------------------

@pytest.mark.parametrize("which", ENTRIES)
def test_ctrl_c_during_a_backpressure_wait_is_interrupted_and_130(which, workdir, base):
    three_in_bob(base)
    env = {"MAX_INBOX_SIZE": "3", "BACKPRESSURE_WAIT_MS": "60000", "BACKPRESSURE_MAX_RETRIES": "5"}
    metrics = Path(os.environ["METRICS_FILE"])
    p = subprocess.Popen([*argv(which), "send-backpressure", "alice", "bob", "task", "{}"], env=child_env(env),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not (metrics.exists() and b"backpressure.wait" in metrics.read_bytes()):
            assert p.poll() is None and time.monotonic() < deadline, "the send never started waiting"
            time.sleep(0.01)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert (p.returncode, out, err) == (130, b"", b"cfn-fast: interrupted\n")


@pytest.mark.parametrize("unbuffered", ["", "1"], ids=["buffered", "PYTHONUNBUFFERED"])
@pytest.mark.parametrize("args", [["get-size", "bob"], ["bus", "send", "alice", "bob", "task", "{}"], ["shell"]],
                         ids=" ".join)
def test_a_reader_that_went_away_ends_the_command_alike(workdir, base, args, unbuffered):
    """Buffered, the failed write shows at exit: exit 1, nothing said. Unbuffered,
    it fails the command where it happens: one line, exit 1 (and no log line after)."""
    got = {}
    for e in ENTRIES:
        three_in_bob(base)
        r_fd, w_fd = os.pipe()
        os.close(r_fd)
        try:
            r = subprocess.run([*argv(e), *args], env=child_env({"PYTHONUNBUFFERED": unbuffered}), stdout=w_fd,
                               stderr=subprocess.PIPE, timeout=60)
        finally:
            os.close(w_fd)
        got[e] = (r.returncode, normal(r.stderr))
        shutil.rmtree(base)
    assert got[NATIVE] == got["python"]
    assert got[NATIVE][0] == 1
    if unbuffered and args[0] != "bus":
        assert got[NATIVE][1].endswith(b": [Errno 32] Broken pipe\n")


# -- the settings bus.py applies ------------------------------------------------------------------

def test_cfn_group_applies_alike(workdir, base):
    """With CFN_GROUP, what a send makes (message files, a new sender's folder,
    the metrics file) gets the group's modes and the group, as Python makes them."""
    gid = os.getgid()
    made = {}
    for e in ENTRIES:
        def setup(b: Path) -> None:
            with MessageBus(config=Config.from_env().replace(group=gid)) as bus:
                bus.init_message_bus("bob")
                forget_metrics(bus)
        code, _, err, _ = outcome(e, ["bus", "send", "carol", "bob", "task", "{}"], setup,
                                  {"CFN_GROUP": str(gid)}, workdir, base)
        assert code == 0, err
        made[e] = sorted((normal(os.fsencode(p.relative_to(workdir))), p.stat().st_mode, p.stat().st_gid)
                         for p in workdir.rglob("*"))
    assert made[NATIVE] == made["python"]
    msg = next((base / "bob" / "inbox").glob("*.json"))
    assert (msg.stat().st_mode & 0o777, msg.stat().st_gid) == (0o660, gid)
    assert Path(os.environ["METRICS_FILE"]).stat().st_mode & 0o777 == 0o660


@pytest.mark.parametrize("which", ENTRIES)
def test_outbox_max_prunes_the_senders_copies(which, workdir, base):
    empty_inboxes(base)
    env = {"OUTBOX_MAX": "2", "MAX_INBOX_SIZE": "100"}
    for i in range(25):
        assert ne.run(which, "bus", "send", "alice", "bob", "task", str(i), env=env).returncode == 0
    kept = len(list((base / "alice" / "outbox").glob("*.json")))
    assert 2 <= kept <= 3  # measured every tenth of OUTBOX_MAX sends: up to a tenth more per process
    assert len(list((base / "bob" / "inbox").glob("*.json"))) == 25


@pytest.mark.parametrize("which", ENTRIES)
def test_metrics_go_to_the_base_folder_by_default_and_rotate(which, workdir, base, monkeypatch):
    monkeypatch.delenv("METRICS_FILE")
    empty_inboxes(base)
    default = base / ".cfn-metrics.jsonl"
    default.unlink(missing_ok=True)
    for _ in range(3):
        assert ne.run(which, "send-backpressure", "alice", "bob", "task", "{}",
                   env={"METRICS_MAX_BYTES": "200"}).returncode == 0
    assert b"backpressure.send.success" in default.read_bytes()
    assert (base / ".cfn-metrics.jsonl.1").exists()  # past 200 bytes it was rotated


@pytest.mark.parametrize("which", ENTRIES)
def test_cfn_metrics_0_writes_no_metric_line(which, workdir, base):
    empty_inboxes(base)
    assert ne.run(which, "send-backpressure", "alice", "bob", "task", "{}", env={"CFN_METRICS": "0"}).returncode == 0
    assert not Path(os.environ["METRICS_FILE"]).exists()


HOLD = "import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); " \
       "time.sleep(60)"


def test_lock_timeout_ms_bounds_the_wait_for_a_held_inbox_lock_alike(workdir, base):
    """A bash sender that stalls holding the inbox's .lock: the send fails
    after LOCK_TIMEOUT_MS with InboxLocked, naming the file and the holder."""
    lines = {}
    for e in ENTRIES:
        empty_inboxes(base)
        lock = base / "bob" / "inbox" / ".lock"
        holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE)
        try:
            assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
            t0 = time.monotonic()
            r = ne.run(e, "bus", "send", "alice", "bob", "task", "{}", env={"LOCK_TIMEOUT_MS": "300"})
            waited = time.monotonic() - t0
        finally:
            holder.kill()
            holder.wait()
        assert r.returncode == 1 and waited >= 0.3
        lines[e] = re.sub(rb"\d+", b"N", normal(r.stderr))
    assert lines[NATIVE] == lines["python"]
    assert b".lock" in lines[NATIVE]


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
@pytest.mark.parametrize("fsync, calls", [("1", 3), ("0", 0)])
def test_cfn_fsync_makes_a_native_delivery_durable(workdir, base, tmp_path, fsync, calls):
    empty_inboxes(base)
    trace = tmp_path / "trace"
    r = subprocess.run(["strace", "-f", "-qq", "-o", str(trace), "-e", "trace=fsync,fdatasync,sync,syncfs",
                        native_program(), "bus", "send", "alice", "bob", "task", "{}"],
                       env=child_env({"CFN_FSYNC": fsync}), capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert re.findall(r"\b(fsync|fdatasync|sync|syncfs)\(", trace.read_text()) == ["fsync"] * calls


# -- flow control: the priority lane natively; what needs an alert, reported by Python -----

def test_a_high_priority_send_never_starts_python(bus, stub):
    env, log = stub
    bus.init_message_bus("alice")
    for i in range(3):
        bus.send_message("alice", "bob", "task", {"i": i})
    r = ne.run(NATIVE, "bus", "send", "alice", "bob", "task", "{}",
               env={**env, "MAX_INBOX_SIZE": "3", "CFN_PRIORITY": "high"})
    assert r.returncode == 0, r.stderr
    assert handed_over(log) is None
    assert r.stdout.strip().endswith(b"-hi")


def circuit_env(**more: str) -> dict[str, str]:
    return {"CFN_BREAKER_FAILURES": "1", "BACKPRESSURE_WAIT_MS": "1", "BACKPRESSURE_MAX_RETRIES": "1", **more}


def bob_circuit_open(base: Path) -> None:
    """bob full and its circuit opened by a failed backpressure send (outcome()
    gives the environment back after the setup)."""
    three_in_bob(base)
    os.environ.update(circuit_env(CFN_BREAKER_COOLDOWN_MS=os.environ.get("CFN_BREAKER_COOLDOWN_MS", "5000")))
    with MessageBus(config=Config.from_env()) as b:
        with pytest.raises(BackpressureTimeout):
            b.send_with_backpressure("alice", "bob", "task", {})
        assert b.circuit_status("bob").state == "open"
        forget_metrics(b)


def bob_circuit_half_open_with_room(base: Path) -> None:
    os.environ["CFN_BREAKER_COOLDOWN_MS"] = "1"
    bob_circuit_open(base)
    with MessageBus(config=Config.from_env()) as b:
        b.consume_messages("bob", max_messages=1)
        time.sleep(0.01)  # past the 1 ms cool-down: the next send is the probe
        forget_metrics(b)


def later(o: tuple[int, bytes, bytes, dict[str, bytes]]) -> tuple[int, bytes, bytes, dict[str, bytes]]:
    """An outcome with the times an open circuit names (ms left, retry after) blanked."""
    def blank(data: bytes) -> bytes:
        data = re.sub(rb"for \d+ ms more", b"for <n> ms more", data)
        return re.sub(rb"retry after [0-9.e+-]+ s", b"retry after <s> s", data)
    return o[0], o[1], blank(o[2]), {k: blank(v) for k, v in o[3].items()}


def test_an_open_circuit_refuses_alike(workdir, base):
    args = ["bus", "send", "alice", "bob", "task", "{}"]
    got = {e: later(outcome(e, args, bob_circuit_open, circuit_env(), workdir, base)) for e in ENTRIES}
    assert got[NATIVE] == got["python"]
    code, out, err, _ = got[NATIVE]
    assert (code, out) == (1, b"")
    assert err.startswith(b"cfn-fast bus send: circuit of 'bob' is open") and err.count(b"\n") == 1, err


def test_a_send_that_opens_the_circuit_alerts_alike(workdir, base):
    """The failed backpressure send's inbox_overflow alert (naming bob's heaviest
    sender), the circuit_open alert, then the error line: the native program
    hands the finished send to Python for them, and nothing is sent twice."""
    args = ["send-backpressure", "alice", "bob", "task", "{}"]
    got = {e: later(outcome(e, args, three_in_bob, circuit_env(), workdir, base)) for e in ENTRIES}
    assert got[NATIVE] == got["python"]
    code, out, err, files = got[NATIVE]
    assert code == 1 and out == b""
    lines = err.splitlines()
    assert [ln.split(b"]")[2].split(b":")[0].strip() for ln in lines[:2]] == [b"inbox_overflow", b"circuit_open"]
    assert b"top senders: alice 100%" in lines[0]
    assert lines[2].startswith(b"cfn-fast send-backpressure: ")
    assert sum(1 for k in files if "/bob/inbox/" in k and k.endswith(".json")) == 3


def test_a_probe_that_closes_the_circuit_alerts_alike(workdir, base):
    args = ["bus", "send", "alice", "bob", "task", "{}"]
    env = circuit_env(CFN_BREAKER_COOLDOWN_MS="1")
    got = {e: later(outcome(e, args, bob_circuit_half_open_with_room, env, workdir, base)) for e in ENTRIES}
    assert got[NATIVE] == got["python"]
    code, out, err, files = got[NATIVE]
    assert code == 0 and out.startswith(b"msg-") and out.count(b"\n") == 1
    assert b"circuit_closed: Circuit of bob closed (a probe send from alice got through)" in err
    assert b"[MESSAGE-BUS] Sent message: alice -> bob [task]" in err
    assert sum(1 for k in files if "/bob/inbox/" in k and k.endswith(".json")) == 3
