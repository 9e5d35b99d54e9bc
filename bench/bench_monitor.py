"""Overflow-monitor speed and memory, against references measured in the same run.

Run: python -m pytest bench/bench_monitor.py --benchmark-enable -s
(the project's addopts disable benchmarks, so a plain test run only smoke-tests this file).

- A counter pass over 1,000 inboxes (trusted counters; emits inbox.size and
  inbox.utilization for each, one write) vs one os.listdir per inbox.
  Target < 5 ms; the seed's budget is 50 ms.
- A full reconciling scan of 1,000 inboxes holding 100,000 messages vs one
  os.listdir per inbox. Target < 50 ms and <= 0.5x the listdir reference.
- A pass on the monitor's default schedule: the counter pass plus 1/12 of
  the reconciling scan.
- RSS of a monitor process after 10,000 passes, beside the bare interpreter's.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

INBOXES = 1000
PER_INBOX = 100  # 100,000 messages in all
ROUNDS = 30
_TMPFS = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
_ENV = ("MESSAGE_BASE_DIR", "METRICS_FILE", "ALERT_LOG_FILE", "MAX_INBOX_SIZE", "CFN_METRICS")
RESULTS: dict[str, float] = {}


def median_ms(fn: Callable[[], object], rounds: int = ROUNDS) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


@contextlib.contextmanager
def _build_farm(n: int, per_inbox: int, name: Callable[[int, int], str]) -> Iterator[tuple[object, Path, list[Path]]]:
    """n inboxes of per_inbox small message files each, written directly (the
    scans only count names), in a private base folder named by the
    environment; counters reconciled once. Restores the environment after."""
    saved = {k: os.environ.get(k) for k in _ENV}
    work = Path(tempfile.mkdtemp(prefix="cfn-bench-mon-", dir=_TMPFS))
    base = work / "messages"
    os.environ.update(MESSAGE_BASE_DIR=str(base), METRICS_FILE=str(work / "metrics.jsonl"),
                      ALERT_LOG_FILE=str(work / "alerts.jsonl"), MAX_INBOX_SIZE="1000")
    os.environ.pop("CFN_METRICS", None)
    from cfn_fast import MessageBus, monitors

    bus = MessageBus()
    inboxes = []
    body = b'{"version":"1.1","payload":{}}'
    for i in range(n):
        agent = f"agent-{i:05d}"
        bus.init_message_bus(agent)
        inbox = base / agent / "inbox"
        inboxes.append(inbox)
        for j in range(per_inbox):
            fd = os.open(inbox / name(i, j), os.O_WRONLY | os.O_CREAT, 0o600)
            os.write(fd, body)
            os.close(fd)
    mon = monitors.OverflowMonitor(bus, interval=5)
    assert mon.reconcile_all(everyone=True) == n
    try:
        yield mon, work, inboxes
    finally:
        bus.close()
        shutil.rmtree(work, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def farm() -> Iterator[tuple[object, Path, list[Path]]]:
    """1,000 inboxes of 100 messages each, once per module."""
    with _build_farm(INBOXES, PER_INBOX, lambda i, j: f"msg-1764324115-{i:04d}{j:04d}.json") as f:
        yield f


def listdir_each(inboxes: list[Path]) -> Callable[[], int]:
    paths = [str(p) for p in inboxes]

    def run() -> int:
        return sum(len(os.listdir(p)) for p in paths)

    return run


def test_counter_pass_over_1000_inboxes(benchmark, farm):
    mon, work, inboxes = farm
    metrics = work / "metrics.jsonl"

    def one_pass() -> object:
        r = mon.run_pass(reconcile=False)
        assert r.inboxes == INBOXES and r.lines == 2 * INBOXES
        return r

    def fresh_file() -> None:
        os.truncate(metrics, 0) if metrics.exists() else None

    fresh_file()
    benchmark.pedantic(one_pass, setup=fresh_file, rounds=ROUNDS, iterations=1, warmup_rounds=2)
    ours = median_ms(one_pass, 10)
    ref = median_ms(listdir_each(inboxes), 10)
    RESULTS.update(pass_ms=ours, listdir_ms=ref)
    benchmark.extra_info.update(pass_ms=round(ours, 3), listdir_each_ms=round(ref, 3),
                                ratio=round(ours / ref, 3))
    print(f"\ncounter pass, {INBOXES} inboxes: {ours:.2f} ms; one os.listdir per inbox: {ref:.2f} ms; "
          f"ratio {ours / ref:.3f} (target < 5 ms, seed budget 50 ms)")


def test_full_reconciling_scan_of_100000_messages(benchmark, farm):
    mon, _work, inboxes = farm
    h = mon.bus.storage.handle()

    def scan() -> int:
        n = mon.reconcile_all(everyone=True)
        assert n == INBOXES
        return n

    benchmark.pedantic(scan, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    ours = median_ms(scan, 10)
    ref = median_ms(listdir_each(inboxes), 10)
    total = sum(s.count for s in __import__("cfn_fast")._core.slots(h))
    assert total == INBOXES * PER_INBOX
    RESULTS.update(reconcile_ms=ours, listdir_ms=ref)
    benchmark.extra_info.update(reconcile_ms=round(ours, 3), listdir_each_ms=round(ref, 3),
                                ratio=round(ours / ref, 3))
    print(f"\nfull reconcile, {INBOXES} inboxes / {total} messages: {ours:.2f} ms; "
          f"one os.listdir per inbox: {ref:.2f} ms; ratio {ours / ref:.3f} (target < 50 ms, <= 0.5x)")


def test_scheduled_pass_with_its_reconcile_slice(benchmark, farm):
    """What a monitor pass costs on its default schedule after the first: the
    counter pass plus a 1/12 slice of the reconciling scan (interval 0 here, so
    no inbox counts as freshly reconciled by someone else)."""
    from cfn_fast import monitors

    mon0, work, inboxes = farm
    mon = monitors.OverflowMonitor(mon0.bus, interval=0, reconcile_every=12)
    mon.run_pass()  # the first pass: a full sweep
    metrics = work / "metrics.jsonl"

    def one_pass() -> object:
        r = mon.run_pass()
        assert r.inboxes == INBOXES and 0 < r.reconciled <= -(-INBOXES // 12)
        return r

    benchmark.pedantic(one_pass, setup=lambda: os.truncate(metrics, 0), rounds=36, iterations=1)
    ours = median_ms(one_pass, 24)
    ref = median_ms(listdir_each(inboxes), 10)
    benchmark.extra_info.update(pass_ms=round(ours, 3), listdir_each_ms=round(ref, 3), ratio=round(ours / ref, 3))
    print(f"\nscheduled pass (counters + 1/12 reconcile), {INBOXES} inboxes / {INBOXES * PER_INBOX} messages: "
          f"{ours:.2f} ms; one os.listdir per inbox: {ref:.2f} ms; ratio {ours / ref:.3f} (seed budget 50 ms)")


RSS_CHILD = """
    import resource, sys
    def mem_kb():
        # VmRSS = RssAnon (private) + RssFile + RssShmem (the mapped shared state, counted once it is touched)
        got = {}
        for line in open("/proc/self/status"):
            key = line.split(":")[0]
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                got[key] = int(line.split()[1])
        return [got["VmRSS"], got["RssAnon"], got["RssFile"], got["RssShmem"]]
    if sys.argv[1] == "bare":
        print(*mem_kb()); sys.exit()
    import cfn_fast
    from cfn_fast import monitors
    if sys.argv[1] == "import":
        print(*mem_kb()); sys.exit()
    bus = cfn_fast.MessageBus()
    for i in range(int(sys.argv[2])):
        bus.init_message_bus(f"agent-{i:04d}")
    monitors.monitor_inbox_overflow(0, 1000, bus=bus)
    warm = mem_kb()
    monitors.monitor_inbox_overflow(0, 9000, bus=bus)
    print(*warm, *mem_kb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_monitor_rss_after_10000_passes(benchmark):
    inboxes = int(os.environ.get("CFN_BENCH_RSS_INBOXES", "100"))
    work = Path(tempfile.mkdtemp(prefix="cfn-bench-rss-", dir=_TMPFS))
    # /dev/null is no longer taken as METRICS_FILE (not a regular file); rotation keeps this one small
    env = dict(os.environ, MESSAGE_BASE_DIR=str(work / "messages"), METRICS_FILE=str(work / "metrics.jsonl"),
               METRICS_MAX_BYTES=str(1 << 20), ALERT_LOG_FILE=str(work / "alerts.jsonl"))
    code = textwrap.dedent(RSS_CHILD)

    def run(*args: str) -> list[int]:
        out = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True,
                             text=True, check=True, timeout=900)
        return [int(x) for x in out.stdout.split()]

    try:
        bare = run("bare")
        imported = run("import")
        t0 = time.perf_counter()
        got = benchmark.pedantic(run, args=("monitor", str(inboxes)), rounds=1, iterations=1)
        secs = time.perf_counter() - t0
    finally:
        shutil.rmtree(work, ignore_errors=True)
    warm, after, peak = got[0:4], got[4:8], got[8]
    mib = lambda kb: f"{kb / 1024:.1f} MiB"  # noqa: E731
    benchmark.extra_info.update(bare_kb=bare, import_kb=imported, after_1000_kb=warm, after_10000_kb=after,
                                peak_kb=peak, fields="VmRSS RssAnon RssFile RssShmem")
    print(f"\nRSS (VmRSS / private RssAnon / shared-state RssShmem): bare interpreter {mib(bare[0])} / "
          f"{mib(bare[1])}; after import cfn_fast {mib(imported[0])} / {mib(imported[1])}; monitor over "
          f"{inboxes} inboxes (metrics rotated at 1 MiB) after 1,000 passes {mib(warm[0])} / {mib(warm[1])} / "
          f"{mib(warm[3])}, after 10,000 passes {mib(after[0])} / {mib(after[1])} / {mib(after[3])}; "
          f"peak VmRSS {mib(peak)}; private memory over the interpreter {mib(after[1] - bare[1])}, "
          f"growth over the last 9,000 passes {after[0] - warm[0]} KiB; {secs:.1f} s")
    assert after[0] - warm[0] < 1024  # flat: under 1 MiB over 9,000 passes
    assert after[1] - bare[1] < 10 * 1024  # the seed's budget, for the monitor's own (private) memory


CURVE = (10, 100, 1000, 10_000)


@pytest.fixture(scope="module", params=CURVE, ids=lambda n: f"{n}-inboxes")
def sized_farm(request) -> Iterator[tuple[object, Path, list[Path]]]:
    """n inboxes of 10 messages each, for the growth curve of the counter pass."""
    with _build_farm(request.param, 10, lambda i, j: f"msg-1764324115-{j:010d}-{i:016x}.json") as f:
        yield f


def test_counter_pass_growth(benchmark, sized_farm):
    """The monitor's counter pass at 10 to 10,000 inboxes, against one
    os.listdir per inbox and the seed's 50 ms budget."""
    mon, work, inboxes = sized_farm
    n = len(inboxes)
    metrics = work / "metrics.jsonl"

    def one_pass() -> object:
        r = mon.run_pass(reconcile=False)
        assert r.inboxes == n
        return r

    def fresh_file() -> None:
        os.truncate(metrics, 0) if metrics.exists() else None

    fresh_file()
    benchmark.pedantic(one_pass, setup=fresh_file, rounds=10, iterations=1, warmup_rounds=1)
    ours = median_ms(one_pass, 5)
    ref = median_ms(listdir_each(inboxes), 5)
    benchmark.extra_info.update(inboxes=n, pass_ms=round(ours, 3), listdir_each_ms=round(ref, 3),
                                ratio=round(ours / ref, 3), budget_ratio=round(ours / 50.0, 4))
    print(f"\ncounter pass, {n} inboxes: {ours:.3f} ms; one os.listdir per inbox: {ref:.3f} ms; "
          f"ratio {ours / ref:.3f}; {ours / 50.0:.1%} of the seed's 50 ms budget")
