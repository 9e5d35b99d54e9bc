"""Every setting has a range, and a value outside it (or not a plain ASCII
number at all) is a ConfigError naming the variable, the value and the range:
through Config.from_env(), through Config(**values), and on the command line
as one stderr line and exit 2, never a traceback or a later overflow in C."""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Optional

import pytest

from cfn_fast import Config
from cfn_fast.config import GID_MAX, SETTINGS, Setting
from cfn_fast.errors import ConfigError

NUMERIC = [s for s in SETTINGS if s.kind in ("int", "float")]
BY_ENV = {s.env: s for s in SETTINGS}

# Values no numeric setting takes: not ASCII digits, not finite, or far too big.
NOT_NUMBERS = ["abc", "", "   ", "1_000", "\u0661\u0662\u0663", "\uff11\uff12", "nan", "inf", "-inf",
               "0x10", "1,000"]
TOO_BIG = [str(2**63), str(2**64), str(2**63 - 1), "9" * 5000]


def _plain(v: Optional[float]) -> str:
    assert v is not None
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def bad_values(s: Setting) -> list[str]:
    """The values this setting must refuse."""
    if s.kind in ("int", "float"):
        assert s.maximum is not None
        out = NOT_NUMBERS + TOO_BIG + ["-1", "1e300", "-1e300"]
        out.append(str(int(s.maximum) + 1) if s.kind == "int" else _plain(s.maximum * 1.001))  # just above
        if s.kind == "int":
            out += ["1e9", "1.0", "12abc"]
        if s.minimum is not None and s.minimum > 0:
            out.append("0")
        return out
    if s.kind == "group":
        return ["-1", str(GID_MAX + 1), str(2**32), str(2**63), str(2**64), "\u0661\u0662\u0663",
                "no-such-group-cfn-test"]
    if s.kind == "bool":
        return ["abc", "2", "-1", "\u0661", "nan", "yes please"]
    if s.kind == "backoff":
        return ["abc", "", "   ", "linear", "FIXED"]
    return ["", "   "]  # paths


CASES = [(s.env, v) for s in SETTINGS for v in bad_values(s)]


def companions(env: str, value: str) -> dict[str, str]:
    """What else must be set for a value to be valid on its own: the medium
    load threshold may not be above the high one."""
    if env == "RATE_LIMIT_HIGH_LOAD_THRESHOLD":
        return {"RATE_LIMIT_MEDIUM_LOAD_THRESHOLD": "0"}
    if env == "RATE_LIMIT_MEDIUM_LOAD_THRESHOLD":
        return {"RATE_LIMIT_HIGH_LOAD_THRESHOLD": "1000"}
    return {}


def test_every_setting_is_tested_and_every_numeric_one_is_bounded():
    assert {env for env, _ in CASES} == {s.env for s in SETTINGS}
    for s in NUMERIC:
        assert s.minimum is not None and s.maximum is not None and s.minimum <= s.default <= s.maximum, s.env


@pytest.mark.parametrize("s", NUMERIC + [BY_ENV["CFN_GROUP"]], ids=lambda s: s.env)
def test_every_bounded_setting_states_its_range_in_its_help(s: Setting):
    assert s.range_text() in s.help


@pytest.mark.parametrize(("env", "value"), CASES, ids=[f"{e}={v[:24]!r}" for e, v in CASES])
def test_a_bad_value_is_a_config_error_naming_the_variable(env: str, value: str):
    with pytest.raises(ConfigError) as info:
        Config.from_env({env: value, **companions(env, value)})
    text = str(info.value)
    assert env in text
    if BY_ENV[env].kind in ("int", "float"):
        assert repr(value)[:40].rstrip("'") in text  # the value as given
        if "out of range" in text:
            assert f"({BY_ENV[env].range_text()})" in text


@pytest.mark.parametrize(("env", "value", "words"), [
    ("MAX_INBOX_SIZE", str(2**63), f"MAX_INBOX_SIZE='{2**63}' is out of range (1 to 1000000000)"),
    ("BACKPRESSURE_WAIT_MS", str(2**64), "is out of range (0 to 3600000)"),
    ("ALERT_COOLDOWN_SECONDS", "1e300", "ALERT_COOLDOWN_SECONDS='1e300' is out of range (0 to 31536000)"),
    ("RATE_LIMIT_CHECK_INTERVAL", "1e300", "is out of range (0.001 to 86400)"),
    ("CFN_GROUP", str(2**32), "CFN_GROUP='4294967296' is out of range (0 to 2147483647)"),
    ("MAX_MESSAGE_BYTES", str(2**63 - 1), "is out of range (1 to 268435456)"),
    ("MAX_INBOX_SIZE", "1_000", "MAX_INBOX_SIZE='1_000' is not a whole number"),
    ("MAX_INBOX_SIZE", "\u0661\u0662\u0663", "is not a whole number"),
    ("RATE_LIMIT_CHECK_INTERVAL", "1_0", "is not a number"),
    ("RATE_LIMIT_CHECK_INTERVAL", "inf", "is not a finite number"),
    ("MAX_INBOX_SIZE", "0", "it must be at least 1"),
    ("BACKPRESSURE_WAIT_MS", "-1", "it must not be negative"),
])
def test_the_issues_examples_read_as_they_should(env: str, value: str, words: str):
    with pytest.raises(ConfigError) as info:
        Config.from_env({env: value})
    assert words in str(info.value)


GOOD = [(s.env, _plain(v)) for s in NUMERIC for v in (s.minimum, s.maximum)] + [
    ("MAX_INBOX_SIZE", " 7 "), ("MAX_INBOX_SIZE", "+7"), ("ALERT_COOLDOWN_SECONDS", "1e3"),
    ("RATE_LIMIT_CHECK_INTERVAL", ".5"), ("CFN_GROUP", "0"), ("CFN_GROUP", str(GID_MAX)), ("CFN_GROUP", ""),
    ("METRICS_MAX_BYTES", "0"), ("OUTBOX_MAX", "0"),
]


@pytest.mark.parametrize(("env", "value"), GOOD, ids=[f"{e}={v}" for e, v in GOOD])
def test_the_ends_of_every_range_are_accepted(env: str, value: str):
    s = BY_ENV[env]
    cfg = Config.from_env({env: value, **companions(env, value)})
    got = getattr(cfg, s.attr)
    if value.strip():
        assert got == (float(value) if s.kind == "float" else int(value))
    # and the same value as Python data, through Config(...) and replace()
    if value.strip():
        assert getattr(Config().replace(**{s.attr: got, **{BY_ENV[k].attr: float(v) for k, v in
                                                            companions(env, value).items()}}), s.attr) == got


@pytest.mark.parametrize("s", NUMERIC, ids=lambda s: s.env)
def test_config_from_python_values_has_the_same_bounds(s: Setting):
    lo, hi = s.minimum, s.maximum
    assert lo is not None and hi is not None
    extra = {"rate_limit_high_load_threshold": 1000.0} if s.attr == "rate_limit_medium_load_threshold" else {}
    if s.attr == "rate_limit_high_load_threshold":
        extra = {"rate_limit_medium_load_threshold": 0.0}
    step = 1 if s.kind == "int" else hi * 0.001
    for bad in (hi + step, lo - step, 2**63, 2**64, True, False, float("nan"), "1_000"):
        with pytest.raises(ConfigError, match=s.env):
            Config(**{s.attr: bad}, **extra)
    if s.kind == "int":
        with pytest.raises(ConfigError, match=s.env):
            Config(**{s.attr: float(lo)})  # a float is not a whole number, even 1.0
    else:
        for bad_float in (float("inf"), 1e300, 10**400):
            with pytest.raises(ConfigError, match=s.env):
                Config(**{s.attr: bad_float}, **extra)


def test_group_from_python_values_is_bounded():
    for bad in (-1, GID_MAX + 1, 2**64, True):
        with pytest.raises(ConfigError, match="CFN_GROUP"):
            Config(group=bad)
    assert Config(group=0).group == 0 and Config(group=None).group is None


def test_boolean_settings_from_python_values():
    assert Config(metrics_enabled=False).metrics_enabled is False and Config(fsync=1).fsync is True
    for bad in (2, -1, 0.5, "maybe", [True]):
        with pytest.raises(ConfigError, match="CFN_METRICS"):
            Config(metrics_enabled=bad)


def test_the_new_settings_and_their_defaults():
    c = Config.from_env({})
    assert (c.lock_timeout_ms, c.outbox_max, c.metrics_max_bytes) == (10000, 1000, 64 << 20)
    c = Config.from_env({"LOCK_TIMEOUT_MS": "1", "OUTBOX_MAX": "0", "METRICS_MAX_BYTES": str(2**40)})
    assert (c.lock_timeout_ms, c.outbox_max, c.metrics_max_bytes) == (1, 0, 2**40)


# -- the command line: exit 2, one line, no traceback ------------------------------------------

def worst(s: Setting) -> str:
    """The value of this setting most likely to slip through to an overflow."""
    if s.kind in ("int", "float", "group"):
        return str(2**64)
    return {"bool": "abc", "backoff": "linear"}.get(s.kind, "")


CLI_CASES = [(s.env, worst(s)) for s in SETTINGS] + [
    ("MAX_INBOX_SIZE", str(2**63)), ("BACKPRESSURE_WAIT_MS", "18446744073709551616"),
    ("ALERT_COOLDOWN_SECONDS", "1e300"), ("RATE_LIMIT_CHECK_INTERVAL", "1e300"), ("CFN_GROUP", "4294967296"),
    ("MAX_MESSAGE_BYTES", "9223372036854775807"), ("MAX_INBOX_SIZE", "1_000"),
    ("MAX_INBOX_SIZE", "\u0661\u0662\u0663"), ("ALERT_COOLDOWN_SECONDS", "nan"),
]


COMMANDS = {"fast-path": ("get-size", "x"), "click": ("get-stats",)}


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str, str], subprocess.CompletedProcess]:
    """Every CLI case run once, all at once (a hundred interpreters one after
    another would add seconds to the suite)."""
    work = tmp_path_factory.mktemp("cli")
    base_env = {k: v for k, v in os.environ.items() if k not in BY_ENV}
    base_env.update(MESSAGE_BASE_DIR=str(work / "messages"))
    procs = {}
    for env, value in CLI_CASES:
        for name, command in COMMANDS.items():
            procs[(env, value, name)] = subprocess.Popen(
                [sys.executable, "-m", "cfn_fast", *command], env=dict(base_env, **{env: value}),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = {}
    for key, p in procs.items():
        out, err = p.communicate(timeout=120)
        done[key] = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    return done


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize(("env", "value"), CLI_CASES, ids=[f"{e}={v[:24]!r}" for e, v in CLI_CASES])
def test_the_cli_exits_2_with_one_line_naming_the_variable(cli_runs, env: str, value: str, command: str):
    r = cli_runs[(env, value, command)]
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and env in lines[0], r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
