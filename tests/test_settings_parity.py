"""One settings table, held to one behaviour on both entries.

The native program's table is generated from cfn_fast/config.py SETTINGS at
build time, and its parser takes a value only when Python takes it, with the
same meaning; any other value it hands, unchanged, to the Python path, which
prints the error (so its text is written once, in config.py). Tried here:
every setting with every bad value of test_settings.py and of the issue's
list, non-UTF-8 bytes, and random text (Hypothesis), by exit code and stderr
line; and every good value, by what the command then prints.
"""
from __future__ import annotations

import os
import string
import subprocess
from pathlib import Path
from typing import Optional, Union

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import native_entry as ne
from cfn_fast import Config, MessageBus, _fastpath
from cfn_fast.config import CHOICES, SETTINGS, Setting
from cfn_fast.errors import ConfigError
from test_settings import BY_ENV, GOOD, bad_values, companions

Value = Union[str, bytes]

# The issue's list, tried on every numeric setting (test_settings.bad_values adds each one's own).
ISSUE_VALUES = ["abc", "0", "-1", "1e9", "", "   ", "1_000", "\u0661\u0662\u0663", "\uff11\uff12", str(2**63),
                "1e300", "nan", "-nan", "inf", "Infinity", "0x10", "+", "-", "1e", ".", "1.2.3", "+-1", "1 0",
                "1e-400x", "\u00a01"]
NOT_UTF8 = [b"\xff", b"1\xff", b"\xc3"]


def python_verdict(env: str, value: Value) -> Optional[str]:
    """The ConfigError Python raises for this value (None when it takes it)."""
    text = value if isinstance(value, str) else os.fsdecode(value)
    try:
        Config.from_env({env: text, **companions(env, text)})
    except ConfigError as e:
        return str(e)
    return None


def refused_cases() -> list[tuple[str, Value]]:
    cases: list[tuple[str, Value]] = []
    for s in SETTINGS:
        values: list[Value] = list(bad_values(s))
        if s.kind in ("int", "float"):
            values += ISSUE_VALUES
        if s.kind != "path":
            values += NOT_UTF8
        for v in dict.fromkeys(values):
            if python_verdict(s.env, v) is not None:
                cases.append((s.env, v))
    return cases


REFUSED = refused_cases()


def case_id(c: tuple[str, Value]) -> str:
    return f"{c[0]}={c[1]!r}"[:60]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A base folder where bob holds 7 messages, and the environment that finds it."""
    work = tmp_path_factory.mktemp("parity")
    env = {"MESSAGE_BASE_DIR": str(work / "messages"), "METRICS_FILE": str(work / "metrics.jsonl"),
           "ALERT_LOG_FILE": str(work / "alerts.jsonl")}
    with MessageBus(config=Config(base_dir=env["MESSAGE_BASE_DIR"], metrics_file=env["METRICS_FILE"],
                                  alert_log_file=env["ALERT_LOG_FILE"])) as b:
        b.init_message_bus("bob")
        for i in range(7):
            b.send_message("alice", "bob", "t", i)
    return env


def clean_env(lab: dict[str, str], extra: dict[str, Value]) -> dict:
    """The lab's environment, none of the settings inherited, plus extra."""
    env: dict = {k: v for k, v in ne.child_env().items() if k not in BY_ENV}
    env.update(lab)
    if any(isinstance(v, bytes) for v in extra.values()):
        env = {os.fsencode(k): os.fsencode(v) for k, v in env.items()}
        env.update({os.fsencode(k): os.fsencode(v) for k, v in extra.items()})
    else:
        env.update(extra)
    return env


def start(argv: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def ended(p: subprocess.Popen) -> tuple[int, bytes, bytes]:
    out, err = p.communicate(timeout=60)
    return p.returncode, out, err


# -- the table ------------------------------------------------------------------------------------

def test_the_native_table_is_generated_from_the_settings():
    header = ne.BUILD.generate_header()
    for i, s in enumerate(SETTINGS):
        assert f"CLI_SET_{s.attr.upper()} = {i}," in header
        row = next(ln for ln in header.splitlines() if ln.startswith(f'    {{"{s.env}", '))
        if s.kind in CHOICES:  # a word out of a list: its words are the row's
            assert "CLI_KIND_CHOICE" in row and f"CLI_CHOICES_{s.kind.upper()}" in row
            words = ", ".join(f'"{w}"' for w in CHOICES[s.kind])
            assert f"CLI_CHOICES_{s.kind.upper()}[] = {{{words}, NULL}};" in header
        else:
            assert f"CLI_KIND_{s.kind.upper()}" in row
        if s.maximum is not None:
            assert repr(float(s.maximum)) in row


# -- every value Python refuses: handed over, so the line is Python's ------------------------------

def test_every_refused_value_is_handed_to_python_unchanged(lab, tmp_path: Path):
    """The program takes none of them: each call reaches the (recording) interpreter as it was."""
    assert len(REFUSED) > 250
    procs = {}
    for i, (env, value) in enumerate(REFUSED):
        d = tmp_path / str(i)
        d.mkdir()
        stub, log = ne.handover_stub(d)
        extra = {env: value, **companions(env, value if isinstance(value, str) else ""), "CFN_FAST_PYTHON": str(stub)}
        procs[(env, value)] = (start([ne.native_program(), "get-size", "bob"], clean_env(lab, extra)), log)
    wrong = []
    for case, (p, log) in procs.items():
        out, err = p.communicate(timeout=60)
        if p.returncode != ne.HANDED_OVER or ne.handed_over(log) != [*ne.HANDOVER, b"get-size", b"bob"]:
            wrong.append((case_id(case), p.returncode, out, err))
    assert not wrong


# Through the real chain (native -> exec python -> the line) for a sample; the
# test above shows every other refused value takes the same road.
END_TO_END = [("MAX_INBOX_SIZE", v) for v in ("abc", "0", "-1", "1e9", "", "1_000", "\u0661\u0662\u0663", str(2**63),
                                               "1e300", "nan", str(10**9 + 1))] + \
             [("BACKPRESSURE_WAIT_MS", b"1\xff"), ("RATE_LIMIT_CHECK_INTERVAL", "1e300"),
              ("ALERT_COOLDOWN_SECONDS", "nan"), ("CFN_GROUP", "no-such-group-cfn-test"),
              ("BACKPRESSURE_BACKOFF", "FIXED"), ("CFN_METRICS", "yes please"), ("MESSAGE_BASE_DIR", "  "),
              ("RATE_LIMIT_MEDIUM_LOAD_THRESHOLD", "0.9")]


def test_the_issues_values_give_the_same_exit_code_and_line_on_both_entries(lab):
    procs = {}
    for env, value in END_TO_END:
        for which in ne.ENTRIES:
            procs[(env, value, which)] = start([*ne.argv(which), "get-size", "bob"], clean_env(lab, {env: value}))
    got = {k: ended(p) for k, p in procs.items()}
    for env, value in END_TO_END:
        native, python = got[(env, value, "native")], got[(env, value, "python")]
        assert native == python, (env, value)
        code, out, err = native
        assert code == 2 and out == b"" and err.startswith(b"cfn-fast get-size: ") and err.count(b"\n") == 1
        assert env.encode() in err


# -- every value Python takes: served natively, with the same meaning ------------------------------

TAKEN = GOOD + [("MAX_INBOX_SIZE", v) for v in ("7", "+7", " 7 ", "\t7\n", "007", "8", "100", "1000000000")] + [
    ("BACKPRESSURE_BACKOFF", v) for v in ("fixed", " exponential ", "decorrelated")] + [
    ("CFN_METRICS", v) for v in ("1", "0", "TRUE", " yes ", "Off", "", "on")] + [
    ("CFN_FSYNC", "false"), ("RATE_LIMIT_CHECK_INTERVAL", "1e-3"), ("RATE_LIMIT_CHECK_INTERVAL", "+.5e1"),
    ("RATE_LIMIT_CHECK_INTERVAL", "5."), ("ALERT_COOLDOWN_SECONDS", "1e-400"), ("CFN_GROUP", "+0"),
    ("METRICS_FILE", " /tmp/with spaces "), ("MESSAGE_BASE_DIR", None)]


def test_every_value_python_takes_is_served_natively_with_the_same_meaning(lab, tmp_path: Path, monkeypatch,
                                                                          capsys):
    """The native answer against the Python path's, run in this process (cheap).
    Each value reads its own inbox of 7 messages: a smaller MAX_INBOX_SIZE
    lowers the capacity of the inbox it is used on, for every process after."""
    stub, log = ne.handover_stub(tmp_path)
    with MessageBus(config=Config(base_dir=lab["MESSAGE_BASE_DIR"], metrics_file=lab["METRICS_FILE"],
                                  alert_log_file=lab["ALERT_LOG_FILE"])) as b:
        for i in range(len(TAKEN)):
            b.init_message_bus(f"u{i}")
            for k in range(7):
                b.send_message("alice", f"u{i}", "t", k)
    procs = {}
    for i, (env, value) in enumerate(TAKEN):
        extra = {} if value is None else {env: value, **companions(env, value)}
        if env == "METRICS_FILE":
            extra[env] = str(tmp_path / "m x.jsonl")
        e = clean_env(lab, {**extra, "CFN_FAST_PYTHON": str(stub)})
        procs[(env, value)] = (start([ne.native_program(), "get-utilization", f"u{i}"], e), extra, f"u{i}")
    for (env, value), (p, extra, inbox) in procs.items():
        with monkeypatch.context() as mp:
            for name in BY_ENV:
                mp.delenv(name, raising=False)
            for name, v in {**lab, **extra}.items():
                mp.setenv(name, v)
            assert value is None or python_verdict(env, extra[env]) is None
            code = _fastpath.run(["get-utilization", inbox])
        python = (code, *(x.encode() for x in capsys.readouterr()))
        assert ended(p) == python, (env, value)
        assert python[0] == 0
    assert ne.handed_over(log) is None
    by_value = {(env, value): ended(p) for (env, value), (p, _, _) in procs.items()}
    assert by_value[("MAX_INBOX_SIZE", " 7 ")][1] == b"100\n"
    assert by_value[("MAX_INBOX_SIZE", "8")][1] == b"87\n"


# -- random text ---------------------------------------------------------------------------------

TEXT = st.text(alphabet=st.sampled_from(list(string.digits + "+-.eE _xafinINtrueyso\t") + ["\u0661", "\u00a0",
                                                                                          "\uff11"]),
               max_size=24)
TEXT_SETTINGS = [s for s in SETTINGS if s.kind in ("int", "float", "bool", "backoff")]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(s=st.sampled_from(TEXT_SETTINGS), value=TEXT)
def test_the_program_takes_exactly_what_python_takes(lab, tmp_path: Path, s: Setting, value: str):
    stub, log = ne.handover_stub(tmp_path)
    extra = {s.env: value, **companions(s.env, value), "CFN_FAST_PYTHON": str(stub)}
    r = subprocess.run([ne.native_program(), "get-size", "bob"], env=clean_env(lab, extra), capture_output=True,
                       timeout=60)
    handed = ne.handed_over(log) is not None
    assert handed == (python_verdict(s.env, value) is not None), (r.returncode, r.stderr)
    if not handed:
        assert (r.returncode, r.stdout) == (0, b"7\n")
