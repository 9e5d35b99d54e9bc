"""`cfn-fast cleanup` signals a monitor it can prove is one, and nothing else.

With CFN_GROUP the base folder is shared with a group, so its members can
reach whatever sits in it. The monitors' pid files are kept out of their
reach (a 0700 folder of the caller's, 0600 files), and cleanup signals a pid
only when its file passes the same checks and the pid still names the process
that wrote it: same start time and same command line. These tests plant pid
files naming live processes that are not monitors and check that no signal
reaches them, and that a real monitor is still stopped.
"""
from __future__ import annotations

import grp
import hashlib
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import cfn_fast
from cfn_fast import lifecycle
from cfn_fast.storage import proc_start
from cfn_fast import monitors
from cfn_fast.errors import UnsafePath

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="giving a file to another uid needs root")


def wait_for(cond, timeout: float = 20.0, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def start_monitor(base: Path, *, umask: int = -1) -> subprocess.Popen:
    """`python -m cfn_fast monitor-overflow 0.05`, as a user starts one; returns once its pid file is there."""
    p = subprocess.Popen([sys.executable, "-m", "cfn_fast", "monitor-overflow", "0.05"],
                         env=dict(os.environ, MESSAGE_BASE_DIR=str(base)), umask=umask,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    pidfile = base / ".monitors" / f"overflow-{p.pid}.pid"
    try:
        wait_for(lambda: pidfile.exists() or p.poll() is not None, what=str(pidfile))
    except AssertionError:
        p.kill()
        raise
    assert p.poll() is None, p.communicate()[1]
    return p


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen]]:
    """Processes a test starts; whatever still runs at its end is killed."""
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait()


@pytest.fixture
def sleeper(procs) -> subprocess.Popen:
    """An unrelated live process: the victim a forged pid file points at."""
    p = subprocess.Popen(["sleep", "30"])
    procs.append(p)
    wait_for(lambda: lifecycle._proc_cmdline(p.pid) == cmdline_hash(b"sleep\x0030\x00"), what="sleep to exec")
    return p


def cmdline_hash(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def record_of(pid: int) -> str:
    """A perfect record for ``pid``: what a monitor with that pid would have written."""
    return f"{pid} {proc_start(pid)} overflow {lifecycle._proc_cmdline(pid)}\n"


def plant(base: Path, name: str, text: str, mode: int = 0o600) -> Path:
    d = base / ".monitors"
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    f = d / name
    f.write_text(text)
    f.chmod(mode)
    return f


def still_running(p: subprocess.Popen) -> bool:
    time.sleep(0.1)  # a SIGTERM, had one been sent, kills sleep at once
    return p.poll() is None


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


# --- a real monitor ----------------------------------------------------------------------------
def test_a_real_monitors_pid_file_is_honoured_and_the_monitor_stops(base, procs, caplog):
    p = start_monitor(base)
    procs.append(p)
    pidfile = base / ".monitors" / f"overflow-{p.pid}.pid"
    with open(f"/proc/{p.pid}/cmdline", "rb") as f:
        cmdline = f.read()
    assert pidfile.read_text().split() == [str(p.pid), str(proc_start(p.pid)), "overflow",
                                           cmdline_hash(cmdline)]
    assert monitors.list_monitors() == [{"pid": p.pid, "kind": "overflow", "pidfile": str(pidfile)}]
    assert cfn_fast.cleanup_rate_limiting() == 1
    assert p.wait(timeout=10) == 0  # SIGTERM: it finished its pass and exited cleanly
    assert not pidfile.exists()
    assert "refused" not in caplog.text


# --- forged pid files ------------------------------------------------------------------------------
def test_a_pid_file_rewritten_to_name_a_live_unrelated_process_is_not_signalled(base, procs, sleeper, caplog):
    """The monitor's own file, rewritten in place to the sleeper's pid and real
    start time: owner, mode and start time all pass; only the command line
    the monitor recorded gives the forgery away."""
    monitor = start_monitor(base)
    procs.append(monitor)
    pidfile = base / ".monitors" / f"overflow-{monitor.pid}.pid"
    _pid, _start, kind, cmdline = pidfile.read_text().split()
    pidfile.write_text(f"{sleeper.pid} {proc_start(sleeper.pid)} {kind} {cmdline}\n")
    assert mode_of(pidfile) == 0o600 and pidfile.stat().st_uid == os.geteuid()

    assert monitors.list_monitors() == []
    assert cfn_fast.cleanup_rate_limiting() == 0
    assert still_running(sleeper)
    assert not pidfile.exists()
    err = caplog.text
    assert f"refused pid file {pidfile}" in err and "command line" in err
    # the monitor finds its pid file gone and stops by itself, unsignalled
    assert monitor.wait(timeout=10) == 0


@pytest.mark.parametrize("tamper", [
    pytest.param("none", id="control: a sound file is honoured"),
    pytest.param("group-writable", id="group-writable"),
    pytest.param("other-writable", id="other-writable"),
    pytest.param("another-uid", id="owned by uid 65534", marks=needs_root),
    pytest.param("symlink", id="a symlink to a sound file"),
])
def test_a_pid_file_that_fails_the_file_checks_is_refused(base, workdir, sleeper, caplog, tamper):
    """Each file holds a perfect record of the sleeper (its pid, start time and
    command line), so only the file checks stand between it and a SIGTERM;
    the control shows the record alone would get it signalled."""
    name = f"overflow-{sleeper.pid}.pid"
    if tamper == "symlink":
        target = workdir / "elsewhere.pid"
        target.write_text(record_of(sleeper.pid))
        target.chmod(0o600)
        (base / ".monitors").mkdir(mode=0o700, parents=True)
        pidfile = base / ".monitors" / name
        pidfile.symlink_to(target)
    else:
        mode = {"group-writable": 0o620, "other-writable": 0o602}.get(tamper, 0o600)
        pidfile = plant(base, name, record_of(sleeper.pid), mode)
        if tamper == "another-uid":
            os.chown(pidfile, 65534, -1)

    listed = monitors.list_monitors()
    stopped = cfn_fast.cleanup_rate_limiting(timeout=10)
    err = caplog.text
    if tamper == "none":
        assert [m["pid"] for m in listed] == [sleeper.pid] and stopped == 1
        assert sleeper.wait(timeout=10) == -signal.SIGTERM
        assert "refused" not in err
    else:
        assert listed == [] and stopped == 0
        assert still_running(sleeper)
        assert f"refused pid file {pidfile}" in err
    assert not os.path.lexists(pidfile)
    if tamper == "symlink":
        assert target.exists()  # the link is removed, not what it points at


@pytest.mark.parametrize("what", ["fifo", "folder", "old format", "garbage"])
def test_other_planted_pid_files_are_refused_without_hanging(base, sleeper, what):
    """A FIFO must not block cleanup on open; a folder cannot be unlinked and
    is left; a three-field record (as an older cfn-fast wrote) has no command
    line to check. Run through the command line with a timeout, so a hang
    fails the test."""
    d = base / ".monitors"
    d.mkdir(mode=0o700, parents=True)
    pidfile = d / f"overflow-{sleeper.pid}.pid"
    if what == "fifo":
        os.mkfifo(pidfile, 0o600)
    elif what == "folder":
        pidfile.mkdir(0o700)
    else:
        pidfile.write_text(f"{sleeper.pid} {proc_start(sleeper.pid)} overflow\n"
                           if what == "old format" else "\x00\xff not a pid file")
        pidfile.chmod(0o600)
    r = subprocess.run([sys.executable, "-m", "cfn_fast", "cleanup"], capture_output=True, text=True,
                       timeout=30, env=dict(os.environ, MESSAGE_BASE_DIR=str(base)))
    assert r.returncode == 0, r.stderr
    assert f"refused pid file {pidfile}" in r.stderr
    assert "(0 monitors stopped)" in r.stderr
    assert still_running(sleeper)
    assert os.path.lexists(pidfile) == (what == "folder")


# --- the .monitors folder ------------------------------------------------------------------------
@pytest.mark.parametrize("what", [
    "symlink", "file", pytest.param("another-uid", marks=needs_root),
])
def test_a_monitors_folder_that_is_not_this_users_is_refused(base, workdir, what):
    cfn_fast.init_message_bus_system()
    d = base / ".monitors"
    decoy = workdir / "decoy"
    decoy.mkdir(mode=0o700)
    if what == "symlink":
        d.symlink_to(decoy)
    elif what == "file":
        d.write_text("")
    else:
        d.mkdir(mode=0o700)
        os.chown(d, 65534, -1)
    with pytest.raises(UnsafePath, match=r"\.monitors"):
        cfn_fast.monitor_inbox_overflow(0, 1, pidfile=True)
    with pytest.raises(UnsafePath, match=r"\.monitors"):
        cfn_fast.cleanup_rate_limiting()
    with pytest.raises(UnsafePath):
        monitors.list_monitors()
    assert list(decoy.iterdir()) == []  # nothing written through the link
    r = subprocess.run([sys.executable, "-m", "cfn_fast", "cleanup"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1 and ".monitors" in r.stderr and len(r.stderr.splitlines()) == 1


# --- modes -----------------------------------------------------------------------------------------
def existing_group() -> int:
    for name in ("nogroup", "root"):
        try:
            return grp.getgrnam(name).gr_gid
        except KeyError:
            continue
    return os.getegid()


@pytest.mark.parametrize("group", [None, existing_group()], ids=["no CFN_GROUP", "CFN_GROUP"])
def test_pid_files_are_0600_in_a_0700_folder_whatever_the_umask_and_the_group(base, procs, monkeypatch,
                                                                             group):
    if group is not None:
        monkeypatch.setenv("CFN_GROUP", str(group))
        # a .monitors folder as an older cfn-fast left it, open to the group: tightened on use
        b = cfn_fast.MessageBus()
        b.init_message_bus_system()
        b.close()
        (base / ".monitors").mkdir()
        os.chmod(base / ".monitors", 0o2770)
    p = start_monitor(base, umask=0)
    procs.append(p)
    pidfile = base / ".monitors" / f"overflow-{p.pid}.pid"
    if group is not None:
        assert mode_of(base) == 0o2770  # CFN_GROUP was in force: shared folders are group-writable
    assert mode_of(base / ".monitors") == 0o700
    assert mode_of(pidfile) == 0o600
    assert os.stat(base / ".monitors").st_uid == pidfile.stat().st_uid == os.geteuid()
    assert [f.name for f in (base / ".monitors").iterdir()] == [pidfile.name]  # no temp file left
    assert cfn_fast.cleanup_rate_limiting() == 1
    assert p.wait(timeout=10) == 0
