"""METRICS_FILE and ALERT_LOG_FILE are a trust boundary: they may sit where
every local user writes (/dev/shm). A FIFO planted there must not hang a
send or a read, and a symlink, another user's file or a file anyone may
write must not receive the lines. (The README says what a refused
METRICS_FILE does: sends go on, metrics are off, emit_metric says why.)"""
from __future__ import annotations

import grp
import json
import multiprocessing as mp
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import cfn_fast
from cfn_fast import telemetry
from cfn_fast.errors import UnsafePath

OTHER_UID = 65534  # nobody
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")


def json_lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def cfn(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    """The CLI in a child process: a hang fails the test instead of the suite."""
    return subprocess.run([sys.executable, "-m", "cfn_fast", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def python(code: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout)


def a_group_that_is_not_ours() -> grp.struct_group:
    for g in grp.getgrall():
        if g.gr_gid not in (0, os.getgid()):
            return g
    pytest.skip("no second group on this machine")


# -- a FIFO at the path ---------------------------------------------------------------------------

@pytest.fixture
def fifo(workdir: Path) -> Path:
    path = workdir / "planted.fifo"
    os.mkfifo(path, 0o666)
    return path


@pytest.mark.parametrize("reader", [False, True], ids=["nobody-reading", "someone-reading"])
def test_a_fifo_at_metrics_file_fails_emit_metric_fast_and_sends_go_on(bus, fifo, monkeypatch, reader):
    monkeypatch.setenv("METRICS_FILE", str(fifo))
    held = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK) if reader else None  # then open(2) would not block
    try:
        r = python("""
            import cfn_fast
            from cfn_fast import telemetry
            from cfn_fast.errors import UnsafePath
            bus = cfn_fast.MessageBus(config=cfn_fast.Config.from_env().replace(
                max_inbox_size=1, backpressure_wait_ms=1, backpressure_max_retries=2))
            bus.send_with_backpressure("alice", "bob", "t", "1")       # sends go on
            print(bus.get_inbox_size("bob"))
            print(type(bus.metrics_error).__name__)
            try:
                telemetry.emit_metric("x", 1, bus=bus)
            except UnsafePath as e:
                print("refused:", e)
        """)
    finally:
        if held is not None:
            os.close(held)
    assert r.returncode == 0, r.stderr
    size, why, refused = r.stdout.splitlines()
    assert size == "1" and why == "UnsafePath"
    assert refused.startswith("refused: ") and str(fifo) in refused and "FIFO" in refused


def test_a_fifo_at_metrics_file_hangs_no_command(bus, fifo, monkeypatch):
    env = dict(os.environ, METRICS_FILE=str(fifo))
    r = cfn("send-backpressure", "alice", "bob", "t", "{}", env=env)  # fast path
    assert r.returncode == 0 and r.stdout.startswith("msg-"), r.stderr
    r = cfn("get-size", "bob", env=env)
    assert (r.returncode, r.stdout) == (0, "1\n"), r.stderr
    r = cfn("bus", "send", "alice", "bob", "t", "{}", env=env)
    assert r.returncode == 0, r.stderr
    r = cfn("metrics", "emit", "x", "1", env=env)  # asked for a metric: says why it cannot
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1 and str(fifo) in r.stderr, r.stderr
    r = cfn("metrics", "stats", env=env)
    assert r.returncode == 1 and "FIFO" in r.stderr, r.stderr


def test_a_fifo_at_alert_log_file_fails_fast(bus, fifo, monkeypatch):
    env = dict(os.environ, ALERT_LOG_FILE=str(fifo))
    r = cfn("alerts", "emit", "t", "m", env=env)
    assert r.returncode == 1 and str(fifo) in r.stderr and "FIFO" in r.stderr, r.stderr
    r = cfn("alerts", "summary", env=env)
    assert r.returncode == 1 and "FIFO" in r.stderr, r.stderr


# -- other things at the path ----------------------------------------------------------------------

def plant_symlink(path: Path) -> Path:
    target = path.parent / "target.jsonl"
    target.write_text("")
    path.symlink_to(target)
    return target


def plant_other_users(path: Path) -> None:
    path.write_text("")
    os.chown(path, OTHER_UID, -1)


def plant_world_writable(path: Path) -> None:
    path.write_text("")
    os.chmod(path, 0o666)


def plant_folder(path: Path) -> None:
    path.mkdir()


PLANTS = [
    pytest.param(plant_symlink, "symlink", id="symlink"),
    pytest.param(plant_other_users, f"belongs to uid {OTHER_UID}", id="other-user", marks=as_root),
    pytest.param(plant_world_writable, "writable by everyone", id="mode-0666"),
    pytest.param(plant_folder, "folder", id="folder"),
]


@pytest.mark.parametrize(("plant", "words"), PLANTS)
def test_metrics_file_is_refused(bus, workdir, monkeypatch, plant, words):
    path = workdir / "metrics-planted.jsonl"
    monkeypatch.setenv("METRICS_FILE", str(path))
    plant(path)
    with pytest.raises(UnsafePath) as info:
        telemetry.emit_metric("x", 1)
    assert str(path) in str(info.value) and words in str(info.value)
    with pytest.raises(UnsafePath):
        telemetry.metrics_stats()
    if path.is_file() and not path.is_symlink():
        assert path.read_text() == ""  # nothing was written to it
    if plant is plant_symlink:
        assert (workdir / "target.jsonl").read_text() == ""


@pytest.mark.parametrize(("plant", "words"), PLANTS)
def test_alert_log_file_is_refused(bus, workdir, monkeypatch, plant, words):
    path = workdir / "alerts-planted.jsonl"
    monkeypatch.setenv("ALERT_LOG_FILE", str(path))
    plant(path)
    with pytest.raises(UnsafePath) as info:
        telemetry.emit_alert("t", "m", metadata={"agent": "a"})
    assert str(path) in str(info.value) and words in str(info.value)
    with pytest.raises(UnsafePath):
        telemetry.alerts_summary()
    assert telemetry.counters()["alert_write_errors"] == 1


def test_a_send_with_a_refused_metrics_file_is_delivered_and_says_why(make_bus, workdir, monkeypatch):
    path = workdir / "m.jsonl"
    plant_world_writable(path)
    monkeypatch.setenv("METRICS_FILE", str(path))
    b = make_bus()
    b.init_message_bus("bob")
    assert b.send_with_backpressure("alice", "bob", "t", "{}").startswith("msg-")
    assert isinstance(b.metrics_error, UnsafePath) and "writable by everyone" in str(b.metrics_error)
    assert path.read_text() == ""


def test_our_own_file_readable_by_others_is_fine(bus, workdir, monkeypatch):
    path = workdir / "m.jsonl"
    path.write_text("")
    os.chmod(path, 0o644)  # what the bash original's >> leaves behind
    monkeypatch.setenv("METRICS_FILE", str(path))
    assert telemetry.emit_metric("x", 1)
    assert [r["metric"] for r in json_lines(path)] == ["x"]


def test_new_files_are_private(bus, workdir):
    telemetry.emit_metric("x", 1)
    telemetry.emit_alert("t", "m")
    for name in ("METRICS_FILE", "ALERT_LOG_FILE"):
        assert (os.stat(os.environ[name]).st_mode & 0o777) == 0o600


@as_root
def test_with_cfn_group_a_group_file_of_another_user_is_accepted(base, workdir, monkeypatch):
    g = a_group_that_is_not_ours()
    monkeypatch.setenv("CFN_GROUP", g.gr_name)
    for name, attr in (("METRICS_FILE", "m"), ("ALERT_LOG_FILE", "a")):
        path = workdir / f"{attr}-shared.jsonl"
        path.write_text("")
        os.chown(path, OTHER_UID, g.gr_gid)
        os.chmod(path, 0o660)
        monkeypatch.setenv(name, str(path))
    assert telemetry.emit_metric("x", 1)
    assert telemetry.emit_alert("t", "m")
    assert len(json_lines(workdir / "m-shared.jsonl")) == 1 and len(json_lines(workdir / "a-shared.jsonl")) == 1
    # ... but not one of another group, nor one the group shares with everyone
    other = workdir / "other-group.jsonl"
    other.write_text("")
    os.chown(other, OTHER_UID, 0 if g.gr_gid != 0 else 1)
    os.chmod(other, 0o660)
    monkeypatch.setenv("ALERT_LOG_FILE", str(other))
    with pytest.raises(UnsafePath, match="nor to CFN_GROUP"):
        telemetry.emit_alert("t2", "m")
    os.chown(other, OTHER_UID, g.gr_gid)
    os.chmod(other, 0o666)
    with pytest.raises(UnsafePath, match="writable by everyone"):
        telemetry.emit_alert("t3", "m")


@as_root
def test_with_cfn_group_new_files_are_the_groups(base, workdir, monkeypatch):
    g = a_group_that_is_not_ours()
    monkeypatch.setenv("CFN_GROUP", str(g.gr_gid))
    assert telemetry.emit_metric("x", 1)
    assert telemetry.emit_alert("t", "m")
    for name in ("METRICS_FILE", "ALERT_LOG_FILE"):
        st = os.stat(os.environ[name])
        assert st.st_gid == g.gr_gid and (st.st_mode & 0o777) == 0o660


def test_clear_metrics_refuses_a_planted_file(bus, workdir, monkeypatch):
    path = workdir / "m.jsonl"
    plant_world_writable(path)
    path.write_text("someone else's\n")
    monkeypatch.setenv("METRICS_FILE", str(path))
    with pytest.raises(UnsafePath):
        telemetry.clear_metrics()
    assert path.read_text() == "someone else's\n"


def test_the_module_functions_follow_the_environment(bus, workdir, monkeypatch):
    """A refused file is remembered per bus; a new METRICS_FILE gives a new bus."""
    path = workdir / "m.jsonl"
    plant_world_writable(path)
    monkeypatch.setenv("METRICS_FILE", str(path))
    with pytest.raises(UnsafePath):
        cfn_fast.emit_metric("x", 1)
    monkeypatch.setenv("METRICS_FILE", str(workdir / "fine.jsonl"))
    assert cfn_fast.emit_metric("x", 1)


# -- by default the files live in the base folder --------------------------------------------------

@pytest.fixture
def default_files(base: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    monkeypatch.delenv("METRICS_FILE")
    monkeypatch.delenv("ALERT_LOG_FILE")
    return base / ".cfn-metrics.jsonl", base / ".cfn-alerts.jsonl"


def test_the_files_default_to_dotfiles_in_the_base_folder(default_files):
    metrics, alerts = default_files
    cfg = cfn_fast.Config.from_env()
    assert (cfg.metrics_file, cfg.alert_log_file) == (str(metrics), str(alerts))
    moved = cfg.replace(base_dir="/elsewhere")  # they follow the base folder...
    assert (moved.metrics_file, moved.alert_log_file) == ("/elsewhere/.cfn-metrics.jsonl",
                                                          "/elsewhere/.cfn-alerts.jsonl")
    pinned = cfg.replace(metrics_file="/x/m.jsonl").replace(base_dir="/y")  # ...unless set
    assert pinned.metrics_file == "/x/m.jsonl" and pinned.alert_log_file == "/y/.cfn-alerts.jsonl"


def test_a_metric_or_alert_before_the_base_folder_exists_makes_it(base, default_files):
    metrics, alerts = default_files
    assert not base.exists()
    assert telemetry.emit_metric("x", 1)
    assert base.is_dir() and (base.stat().st_mode & 0o7777) == 0o700  # as init-system makes it
    assert telemetry.emit_alert("t", "m", metadata={"agent": "a"})
    assert not telemetry.emit_alert("t", "m", metadata={"agent": "a"})  # the cooldown holds
    assert [r["metric"] for r in json_lines(metrics)] == ["x"]
    assert [r["alert"] for r in json_lines(alerts)] == ["t"]
    assert (metrics.stat().st_mode & 0o777) == 0o600 and (alerts.stat().st_mode & 0o777) == 0o600


def test_the_files_are_never_taken_for_agents(base, default_files):
    b = cfn_fast.MessageBus()
    try:
        b.init_message_bus("bob")
        b.send_message("alice", "bob", "t", "{}")
        telemetry.emit_metric("x", 1, bus=b)
        telemetry.emit_alert("t", "m", bus=b)
        assert all(p.exists() for p in default_files)
        assert b.list_agents() == ["bob"]
        from cfn_fast import monitors

        assert [s["agent"] for s in monitors.get_all_inbox_stats(bus=b)] == ["bob"]
    finally:
        b.close()


def test_env_shows_where_the_files_are(base, default_files):
    env = {k: v for k, v in os.environ.items() if k not in ("METRICS_FILE", "ALERT_LOG_FILE")}
    out = cfn("env", env=env).stdout
    assert f"METRICS_FILE={default_files[0]}\t" in out and f"ALERT_LOG_FILE={default_files[1]}\t" in out


def test_the_originals_paths_still_work(bus, monkeypatch, workdir):
    """METRICS_FILE=/dev/shm/cfn-metrics.jsonl, as the original, under the same checks."""
    path = workdir / "cfn-metrics.jsonl"  # the original's name, in this test's own /dev/shm folder
    monkeypatch.setenv("METRICS_FILE", str(path))
    assert telemetry.emit_metric("x", 1) and [r["metric"] for r in json_lines(path)] == ["x"]


# -- METRICS_FILE is bounded ------------------------------------------------------------------------

def whole_lines(path: Path) -> list[dict]:
    """Every line of the file, each of which must be one whole JSON object."""
    raw = path.read_bytes() if path.exists() else b""
    assert raw == b"" or raw.endswith(b"\n"), f"{path} ends in a torn line"
    return [json.loads(x) for x in raw.split(b"\n")[:-1]]


def run_writers(n: int, per: int, pad: int = 200) -> None:
    """n processes, let go at once, each emitting `per` metric lines tagged with its index and count."""
    code = textwrap.dedent("""
        import sys
        from cfn_fast import telemetry
        me, per, pad = int(sys.argv[1]), int(sys.argv[2]), "x" * int(sys.argv[3])
        print("ready", flush=True); sys.stdin.readline()
        for i in range(per):
            telemetry.emit_metric("load.test", i, "count", {"proc": me, "i": i, "pad": pad})
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(i), str(per), str(pad)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(n)]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready", p.communicate()
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err


def test_one_writer_rotates_past_the_limit_and_keeps_the_newest_lines(bus, monkeypatch):
    monkeypatch.setenv("METRICS_MAX_BYTES", "4000")
    path = Path(os.environ["METRICS_FILE"])
    for i in range(200):
        telemetry.emit_metric("m", i, tags={"pad": "x" * 100})
    now, old = whole_lines(path), whole_lines(Path(f"{path}.1"))
    assert path.stat().st_size <= 4000 and Path(f"{path}.1").stat().st_size <= 4000
    assert now[-1]["value"] == 199  # the newest line is in the file, the one before it in .1
    assert [r["value"] for r in old + now] == list(range(200 - len(old) - len(now), 200))
    assert telemetry.counters(bus)["metrics"] == 200


@pytest.mark.slow
def test_many_processes_rotating_at_once_leave_whole_lines_and_lose_none_in_one_rotation(bus, monkeypatch):
    """One rotation: the lines written must all be in the file or in .1, whole, exactly once."""
    n, per = 6, 300
    line = len(telemetry.format_metric("load.test", 299, "count", {"proc": 5, "i": 299, "pad": "x" * 200}))
    monkeypatch.setenv("METRICS_MAX_BYTES", str(int(n * per * line * 0.6)))  # once past 60 %, never again
    path = Path(os.environ["METRICS_FILE"])
    run_writers(n, per)
    recs = whole_lines(Path(f"{path}.1")) + whole_lines(path)
    assert Path(f"{path}.1").exists()
    got = sorted((r["tags"]["proc"], r["tags"]["i"]) for r in recs)
    assert got == [(p, i) for p in range(n) for i in range(per)]


@pytest.mark.slow
def test_many_processes_rotating_many_times_keep_the_file_bounded_and_whole(bus, monkeypatch):
    limit = 20_000
    monkeypatch.setenv("METRICS_MAX_BYTES", str(limit))
    path = Path(os.environ["METRICS_FILE"])
    run_writers(6, 400)
    telemetry.emit_metric("last", 1)  # after every writer is done
    now, old = whole_lines(path), whole_lines(Path(f"{path}.1"))
    assert now[-1]["metric"] == "last"
    assert old and all(r["metric"] == "load.test" for r in old)
    biggest = 400  # one line: a write never starts a file that cannot take it, but may end one over the limit
    assert path.stat().st_size <= limit + biggest and Path(f"{path}.1").stat().st_size <= limit + biggest
    # the file holds the newest lines: each writer's lines in it come after its lines in .1
    for p in range(6):
        in_old = [r["tags"]["i"] for r in old if r["tags"]["proc"] == p]
        in_now = [r["tags"]["i"] for r in now if r["metric"] == "load.test" and r["tags"]["proc"] == p]
        if in_old and in_now:
            assert max(in_old) < max(in_now)


def _forked_writer(me: int, per: int, go: Any) -> None:
    go.wait(30)
    for i in range(per):
        telemetry.emit_metric("load.test", i, "count", {"proc": me, "i": i, "pad": "x" * 200})


@pytest.mark.slow
def test_forked_writers_rotate_on_their_own_descriptors_and_lose_nothing(bus, monkeypatch):
    """Children forked after the parent opened the metrics file share its open
    file, and so its flock: each must open the file again before it takes
    part in a rotation, or two processes rotate at once and lines are lost.
    One rotation; every line whole, in the file or in .1, exactly once."""
    n, per = 5, 300
    line = len(telemetry.format_metric("load.test", 299, "count", {"proc": 4, "i": 299, "pad": "x" * 200}))
    monkeypatch.setenv("METRICS_MAX_BYTES", str(int((n * per + 1) * line * 0.6)))
    path = Path(os.environ["METRICS_FILE"])
    telemetry.emit_metric("load.test", 0, "count", {"proc": n, "i": 0, "pad": "x" * 200})  # the parent's descriptor
    ctx = mp.get_context("fork")
    go = ctx.Event()
    procs = [ctx.Process(target=_forked_writer, args=(p, per, go)) for p in range(n)]
    for p in procs:
        p.start()
    go.set()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    recs = whole_lines(Path(f"{path}.1")) + whole_lines(path)
    assert Path(f"{path}.1").exists()
    got = sorted((r["tags"]["proc"], r["tags"]["i"]) for r in recs)
    assert got == [(p, i) for p in range(n) for i in range(per)] + [(n, 0)]


def test_a_writer_follows_a_rotation_done_by_another(make_bus, monkeypatch):
    """Two handles on one file, as two processes: the C send loop's lines of the
    one that did not rotate go to the new file, not to .1."""
    monkeypatch.setenv("METRICS_MAX_BYTES", "3000")
    path = Path(os.environ["METRICS_FILE"])
    a = make_bus(max_inbox_size=1, backpressure_wait_ms=1, backpressure_max_retries=1)
    a.init_message_bus("bob")
    a.send_message("alice", "bob", "t", 1)
    assert telemetry.emit_metric("from.a", 1, bus=a)
    b = make_bus()
    while not Path(f"{path}.1").exists():
        telemetry.emit_metric("from.b", 1, tags={"pad": "x" * 100}, bus=b)
    with pytest.raises(cfn_fast.BackpressureTimeout):
        a.send_with_backpressure("alice", "bob", "t", 2)  # C writes backpressure.send.failure
    assert "backpressure.send.failure" in [r["metric"] for r in whole_lines(path)]
    assert "from.a" in [r["metric"] for r in whole_lines(Path(f"{path}.1"))]


def test_a_second_rotation_replaces_the_older_file(bus, monkeypatch):
    monkeypatch.setenv("METRICS_MAX_BYTES", "1000")
    path = Path(os.environ["METRICS_FILE"])
    Path(f"{path}.1").write_text("the oldest\n")
    for i in range(40):
        telemetry.emit_metric("m", i, tags={"pad": "x" * 100})
    assert "the oldest" not in Path(f"{path}.1").read_text()
    assert not Path(f"{path}.2").exists()


def test_metrics_max_bytes_0_never_rotates(bus, monkeypatch):
    monkeypatch.setenv("METRICS_MAX_BYTES", "0")
    path = Path(os.environ["METRICS_FILE"])
    for i in range(300):
        telemetry.emit_metric("m", i, tags={"pad": "x" * 1000})
    assert path.stat().st_size > 300_000 and len(whole_lines(path)) == 300
    assert not Path(f"{path}.1").exists()


def test_a_writer_reopens_a_file_removed_under_it(bus):
    path = Path(os.environ["METRICS_FILE"])
    telemetry.emit_metric("before", 1)
    path.unlink()
    telemetry.emit_metric("after", 1)
    assert [r["metric"] for r in whole_lines(path)] == ["after"]
