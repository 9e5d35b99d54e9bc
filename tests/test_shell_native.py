"""The bash drop-in on the native program, and on the Python path.

`cfn-fast shell` (native) writes the program's absolute path into the drop-in,
so a venv need not be activated; sourced as a file, the drop-in finds the
program in its own prefix. Plain shell variables still configure each call,
and stay plain. A monitor started with `&` is one process: `$!`, which
`kill $!` stops. The original's scenarios (tests/shell/dropin_scenarios.sh,
under `set -euo pipefail`) pass on both entries.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import native_entry as ne
from cfn_fast.handlers import shell_path
from cfn_fast.config import SETTINGS

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")

SCENARIOS = Path(__file__).parent / "shell" / "dropin_scenarios.sh"
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"


def bindir_for(which: str, workdir: Path) -> str:
    """A folder whose cfn-fast is the entry: the native program's own, or a stand-in for python -m cfn_fast."""
    if which == "native":
        return os.path.dirname(ne.native_program())
    d = workdir / "python-bin"
    d.mkdir(exist_ok=True)
    stand_in = d / "cfn-fast"
    stand_in.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m cfn_fast "$@"\n')
    stand_in.chmod(0o755)
    return str(d)


def shell_env(path: str) -> dict[str, str]:
    """No bus setting exported (the scripts set them as plain variables), and this PATH."""
    env = {k: v for k, v in ne.child_env().items() if k not in {s.env for s in SETTINGS}}
    env["PATH"] = path
    return env


def bash(script: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", "set -euo pipefail\n" + script], env=env, capture_output=True, text=True,
                          timeout=timeout)


def plain_settings(workdir: Path) -> str:
    return (f'MESSAGE_BASE_DIR="{workdir}/messages"\nMETRICS_FILE="{workdir}/metrics.jsonl"\n'
            f'ALERT_LOG_FILE="{workdir}/alerts.jsonl"\n')


@pytest.mark.parametrize("which", ne.ENTRIES)
def test_the_originals_scenarios_pass_under_strict_mode(which, workdir):
    env = shell_env(bindir_for(which, workdir) + os.pathsep + SYSTEM_PATH)
    r = subprocess.run(["bash", str(SCENARIOS), str(workdir / "run"), sys.executable], env=env,
                       capture_output=True, text=True, timeout=180)
    failures = [ln for ln in r.stdout.splitlines() if ln.startswith("not ok")]
    assert r.returncode == 0 and not failures, r.stdout + r.stderr
    assert re.search(r"^1\.\.(\d+)$", r.stdout, re.M), r.stdout + r.stderr


def test_the_drop_in_works_from_a_venv_that_is_neither_active_nor_on_path(workdir):
    program = ne.native_program()
    r = bash(f'source <("{program}" shell)\n' + plain_settings(workdir) + """
init_message_bus_system 2>/dev/null
init_message_bus bob 2>/dev/null
send_with_backpressure alice bob task '{"n":1}' >/dev/null
test "$(get_inbox_size bob)" = 1
printf '%s' "$_CFN_FAST_BIN"
""", shell_env(SYSTEM_PATH))
    assert r.returncode == 0, r.stderr
    assert r.stdout == os.path.realpath(program)


def test_the_file_sourced_directly_finds_the_program_of_its_prefix(tmp_path: Path):
    """cfn-fast shell --path gives <prefix>/lib/pythonX.Y/site-packages/cfn_fast/shell.sh."""
    prefix = tmp_path / "venv"
    package = prefix / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages" / "cfn_fast"
    package.mkdir(parents=True)
    shutil.copy2(shell_path(), package / "shell.sh")
    (prefix / "bin").mkdir()
    shutil.copy2(ne.native_program(), prefix / "bin" / "cfn-fast")
    for source in (str(package / "shell.sh"), os.path.relpath(package / "shell.sh", tmp_path)):
        r = subprocess.run(["bash", "-c", f'set -euo pipefail; source "{source}"; printf %s "$_CFN_FAST_BIN"'],
                           env=shell_env(SYSTEM_PATH), cwd=tmp_path, capture_output=True, text=True, timeout=30)
        assert (r.returncode, r.stdout) == (0, str(prefix / "bin" / "cfn-fast")), r.stderr


def test_elsewhere_the_file_takes_the_cfn_fast_on_path_when_sourced(tmp_path: Path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    shutil.copy2(ne.native_program(), bindir / "cfn-fast")
    loose = tmp_path / "shell.sh"
    shutil.copy2(shell_path(), loose)
    script = f'set -euo pipefail; source "{loose}"; printf %s "$_CFN_FAST_BIN"'
    r = subprocess.run(["bash", "-c", script], env=shell_env(f"{bindir}:{SYSTEM_PATH}"), capture_output=True,
                       text=True, timeout=30)
    assert (r.returncode, r.stdout) == (0, str(bindir / "cfn-fast")), r.stderr
    r = subprocess.run(["bash", "-c", script], env=shell_env(SYSTEM_PATH), capture_output=True, text=True,
                       timeout=30)
    assert (r.returncode, r.stdout) == (0, "cfn-fast"), r.stderr  # not found: a call fails as a missing command


@pytest.mark.parametrize("which", ne.ENTRIES)
def test_plain_variables_configure_each_call_and_stay_plain(which, workdir):
    r = bash(f'source <(cfn-fast shell)\n' + plain_settings(workdir) + """
MAX_INBOX_SIZE=2
readonly BACKPRESSURE_WAIT_MS=1
BACKPRESSURE_MAX_RETRIES=1
init_message_bus bob 2>/dev/null
send_message alice bob task 1 >/dev/null 2>&1
send_message alice bob task 2 >/dev/null 2>&1
check_inbox_capacity bob 2>/dev/null && exit 10          # full at 2: the plain variable reached it
test "$(get_inbox_utilization bob)" = 100 || exit 11
send_with_backpressure alice bob task 3 >/dev/null 2>&1 && exit 12   # the readonly wait, 1 retry
declare -p MAX_INBOX_SIZE BACKPRESSURE_MAX_RETRIES MESSAGE_BASE_DIR
env | grep -c -E '^(MAX_INBOX_SIZE|BACKPRESSURE_MAX_RETRIES|MESSAGE_BASE_DIR)=' || true
""", shell_env(bindir_for(which, workdir) + os.pathsep + SYSTEM_PATH))
    assert r.returncode == 0, (r.returncode, r.stderr)
    lines = r.stdout.splitlines()
    assert all(ln.startswith("declare -- ") for ln in lines[:3]), lines  # not exported after the calls
    assert lines[3] == "0"


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace to count forks")
def test_a_call_in_a_command_substitution_costs_one_fork(workdir, tmp_path: Path):
    """No subshell of the drop-in's own: bash execs the program in the substitution's process."""
    program = ne.native_program()
    script = tmp_path / "calls.sh"
    script.write_text(f'source <("{program}" shell)\n' + plain_settings(workdir) + "MAX_INBOX_SIZE=5\n"
                      'x=$(get_inbox_size bob); y=$(get_inbox_size bob); z=$(check_inbox_capacity bob)\n')
    trace = tmp_path / "trace"
    r = subprocess.run(["strace", "-f", "-qq", "-o", str(trace), "-e", "trace=clone,clone3,fork,vfork",
                        "bash", str(script)], env=shell_env(SYSTEM_PATH), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    forks = re.findall(r"\b(clone3?|v?fork)\(", trace.read_text())
    assert len(forks) == 1 + 3  # the process substitution that prints the drop-in, then one per call


def wait_for(predicate, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


@pytest.mark.parametrize("which", ne.ENTRIES)
@pytest.mark.parametrize("start", [
    "monitor_inbox_overflow 0.05 &",
    "monitor_dynamic_rate_limit 0.05 &",
    "( monitor_inbox_overflow 0.05 ) &",
], ids=["overflow", "rate-limit", "overflow-in-a-subshell"])
def test_a_background_monitor_is_one_process_that_kill_stops(which, start, workdir):
    """$! is the monitor itself: its pid file names it, kill $! stops it, and no
    cfn-fast is left running with parent 1."""
    base = workdir / "messages"
    r = bash(f'source <(cfn-fast shell)\n' + plain_settings(workdir) + f"""
init_message_bus bob 2>/dev/null
{start}
pid=$!
for _ in $(seq 1 1500); do
    compgen -G "$MESSAGE_BASE_DIR/.monitors/*-$pid.pid" >/dev/null && break
    sleep 0.02
done
compgen -G "$MESSAGE_BASE_DIR/.monitors/*-$pid.pid" >/dev/null || {{ echo "no pid file for $pid" >&2; exit 3; }}
tr '\\0' ' ' < /proc/$pid/cmdline
kill "$pid"
status=0
wait "$pid" || status=$?
echo
echo "status=$status"
""", shell_env(bindir_for(which, workdir) + os.pathsep + SYSTEM_PATH))
    assert r.returncode == 0, r.stdout + r.stderr
    cmdline, status = r.stdout.splitlines()
    assert "cfn_fast" in cmdline or "cfn-fast" in cmdline  # $! is the monitor, not a bash holding it
    assert status == "status=0"
    wait_for(lambda: not list((base / ".monitors").glob("*.pid")), "the monitor left its pid file")
    left = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _monitors_of(p, base)]
    assert not left, "a monitor outlived kill $!"


def _monitors_of(proc: Path, base: Path) -> bool:
    try:
        cmdline = (proc / "cmdline").read_bytes()
        environ = (proc / "environ").read_bytes()
    except OSError:
        return False
    return b"monitor-" in cmdline and f"MESSAGE_BASE_DIR={base}".encode() in environ.split(b"\0")


# -- cfn-fast shell ------------------------------------------------------------------------------

def test_shell_prints_the_drop_in_with_the_programs_path():
    r = ne.run("native", "shell")
    assert r.returncode == 0 and r.stderr == b""
    text = Path(shell_path()).read_bytes()
    assert b"\n_CFN_FAST_BIN=''\n" in text
    program = os.path.realpath(ne.native_program()).encode()
    assert r.stdout == text.replace(b"\n_CFN_FAST_BIN=''\n", b"\n_CFN_FAST_BIN='" + program + b"'\n", 1)


def test_a_path_with_a_quote_is_quoted_for_bash(tmp_path: Path):
    odd = tmp_path / "it's here"
    odd.mkdir()
    shutil.copy2(ne.native_program(), odd / "cfn-fast")
    r = subprocess.run([str(odd / "cfn-fast"), "shell"], capture_output=True, env=ne.child_env(), timeout=30)
    assert r.returncode == 0
    got = subprocess.run(["bash", "-c", 'source /dev/stdin; printf %s "$_CFN_FAST_BIN"'], input=r.stdout,
                         capture_output=True, timeout=30)
    assert got.stdout.decode() == str(odd / "cfn-fast")
