"""The bash drop-in: a script written for the original runs unchanged on cfn-fast.

tests/shell/dropin_scenarios.sh sources `cfn-fast shell` under `set -euo
pipefail` and runs the original's scenarios; this drives it and checks that
the drop-in defines every function of the original.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from cfn_fast.handlers import shell_path
from cfn_fast.config import SETTINGS

SCENARIOS = Path(__file__).parent / "shell" / "dropin_scenarios.sh"

ORIGINAL_FUNCTIONS = [
    "init_message_bus", "send_message", "receive_messages", "clear_inbox", "message_count",
    "cleanup_message_bus", "init_message_bus_system", "cleanup_message_bus_system",
    "check_inbox_capacity", "get_inbox_size", "get_inbox_utilization", "send_with_backpressure",
    "monitor_inbox_overflow", "apply_dynamic_rate_limit", "monitor_dynamic_rate_limit",
    "get_system_load", "get_all_inbox_stats", "cleanup_rate_limiting", "emit_metric", "emit_alert",
    # the helpers its sourcing defined, and the rest of metrics.sh and alerting.sh
    "log_info", "log_error", "log_rate_limit", "generate_message_id", "get_next_sequence",
    "emit_coordination_metric", "emit_coordination_time", "emit_agent_count", "emit_delivery_rate",
    "emit_message_count", "emit_consensus_score", "emit_confidence_score", "get_metrics_stats",
    "clear_metrics", "check_thresholds", "check_coordination_time", "check_delivery_rate",
    "check_memory_growth", "check_fd_growth", "check_error_rate", "check_queue_depth",
    "get_alert_summary", "clear_old_alerts",
]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


@pytest.fixture
def shell_env(workdir: Path) -> dict[str, str]:
    """An environment whose PATH finds cfn-fast (the installed script, else a
    two-line stand-in) and which does NOT export the bus settings: the script
    sets them as plain shell variables, as the original's users do."""
    bindir = os.path.dirname(sys.executable)
    if not os.access(os.path.join(bindir, "cfn-fast"), os.X_OK):
        bindir = str(workdir / "bin")
        os.makedirs(bindir)
        stand_in = os.path.join(bindir, "cfn-fast")
        with open(stand_in, "w") as f:
            f.write(f'#!/bin/sh\nexec "{sys.executable}" -m cfn_fast "$@"\n')
        os.chmod(stand_in, 0o755)
    env = {k: v for k, v in os.environ.items() if k not in {s.env for s in SETTINGS}}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = os.path.join(tempfile.gettempdir(), "cfn-fast-test-pycache")
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    return env


def test_the_originals_scenarios_pass_under_strict_mode(workdir, shell_env):
    r = subprocess.run(["bash", str(SCENARIOS), str(workdir / "run"), sys.executable],
                       env=shell_env, capture_output=True, text=True, timeout=120)
    failures = [ln for ln in r.stdout.splitlines() if ln.startswith("not ok")]
    assert r.returncode == 0 and not failures, r.stdout + r.stderr
    assert re.search(r"^1\.\.(\d+)$", r.stdout, re.M), r.stdout + r.stderr


def test_the_drop_in_defines_every_function_of_the_original(shell_env):
    names = " ".join(ORIGINAL_FUNCTIONS)
    script = f'set -euo pipefail; source "{shell_path()}"; for f in {names}; do declare -F "$f" >/dev/null; done'
    r = subprocess.run(["bash", "-c", script], env=shell_env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


def test_the_drop_in_hands_over_every_setting_cfn_fast_reads():
    text = Path(shell_path()).read_text()
    listed = re.search(r"_CFN_FAST_SETTINGS=\(([^)]*)\)", text)
    assert listed is not None
    assert listed.group(1).split() == [s.env for s in SETTINGS]


def test_the_defaults_it_sets_are_cfn_fasts():
    """Sourcing sets the original's settings when unset; each value means
    what cfn-fast's own default means, so setting it changes nothing."""
    from cfn_fast.config import Config

    text = Path(shell_path()).read_text()
    given = dict(re.findall(r'^: "\$\{([A-Z_]+):=([^}]*)\}"$', text, re.M))
    by_env = {s.env: s for s in SETTINGS}
    assert {"MESSAGE_BASE_DIR", "MAX_INBOX_SIZE", "BACKPRESSURE_WAIT_MS", "BACKPRESSURE_MAX_RETRIES",
            "RATE_LIMIT_CHECK_INTERVAL", "RATE_LIMIT_HIGH_LOAD_THRESHOLD", "RATE_LIMIT_MEDIUM_LOAD_THRESHOLD",
            "CFN_BASE_DIR"} <= set(given)
    default = Config.from_env({})
    for env, value in given.items():
        if env in by_env:
            attr = by_env[env].attr
            assert getattr(Config.from_env({env: value}), attr) == getattr(default, attr), env
    assert "METRICS_FILE" not in given and "ALERT_LOG_FILE" not in given  # they follow MESSAGE_BASE_DIR


def _options(script: str, env: dict[str, str], *bash_args: str) -> str:
    r = subprocess.run(["bash", *bash_args, "-c", script], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("strict, interactive, expect", [
    (None, False, "on"),     # a script: as the original, set -euo pipefail
    (None, True, "off"),     # a terminal: a "no" must not end the session
    ("1", True, "on"),
    ("0", False, "off"),
])
def test_strict_mode_is_the_originals_in_scripts(shell_env, strict, interactive, expect):
    env = dict(shell_env)
    if strict is not None:
        env["CFN_DROPIN_STRICT"] = strict
    script = (f'source "{shell_path()}"; '
              'if [[ $- == *e* && $- == *u* ]] && shopt -qo pipefail; then echo on; else echo off; fi')
    assert _options(script, env, *(["-i"] if interactive else [])) == expect


@pytest.mark.parametrize("inherit", ["-u", "-s"])
def test_a_call_hands_over_the_set_settings_only_and_leaves_the_shell_as_it_was(shell_env, workdir, inherit):
    """One `local -x` of every setting's name (localvar_inherit, bash 5+):
    the set ones reach the command with their values, an unset one stays out of
    its environment, and the caller's options and variables are as before; a
    readonly setting (which cannot be made local) takes the subshell instead."""
    given = ('_cfn_fast | grep -E "^(MESSAGE_BASE_DIR|MAX_INBOX_SIZE|CFN_FSYNC|CFN_GROUP)=" | sort | tr "\\n" " "; '
             'echo; ')
    script = (f'shopt {inherit} localvar_inherit; source "{shell_path()}"; '
              f'MESSAGE_BASE_DIR="{workdir}/b"; MAX_INBOX_SIZE=7; unset CFN_FSYNC; _CFN_FAST_BIN=env; '
              + given + 'readonly CFN_GROUP=; ' + given +
              'shopt -q localvar_inherit && echo inherit-on || echo inherit-off; '
              'declare -p MAX_INBOX_SIZE; [[ -z "${CFN_FSYNC+x}" ]] && echo fsync-unset')
    r = subprocess.run(["bash", "-c", script], env=shell_env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    fast, readonly, inherit_state, declared, fsync = r.stdout.strip().splitlines()
    assert fast.split() == ["MAX_INBOX_SIZE=7", f"MESSAGE_BASE_DIR={workdir}/b"]
    assert readonly.split() == ["CFN_GROUP=", "MAX_INBOX_SIZE=7", f"MESSAGE_BASE_DIR={workdir}/b"]
    assert inherit_state == ("inherit-on" if inherit == "-s" else "inherit-off")
    assert declared == 'declare -- MAX_INBOX_SIZE="7"' and fsync == "fsync-unset"
