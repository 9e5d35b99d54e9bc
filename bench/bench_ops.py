"""The operator's view under 10,000 inboxes: one Prometheus scrape and one
`cfn-fast top` frame, against the seed's 50 ms budget and against `get-stats`
(get_all_inbox_stats, the existing way to read every inbox) measured in the
same run.

Run: pytest bench/bench_ops.py --benchmark-only -s
(the smoke pass, a plain `pytest bench/`, builds 500 inboxes and runs each once).

- collect: the exporter's collector turned into the text exposition
  (generate_latest), in process: what a scrape costs the exporter.
- scrape: the same over loopback, a real HTTP GET against `exporter.serve`
  running in a thread, parsed by nothing (the client's share is the socket).
- top frame: a snapshot, the view rendered and printed to a 200 x 60 console
  (no terminal), as `cfn-fast top` does each interval.

Inboxes hold different fills (the fullest at capacity), so the top-N sort
has work to do. No timed assertion: the figures and their ratios go into
extra_info and onto the terminal; bench/README.md keeps the latest.
"""
from __future__ import annotations

import io
import statistics
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from conftest import new_bus

pytest.importorskip("prometheus_client", reason="the 'prom' extra is not installed")
pytest.importorskip("rich", reason="the 'top' extra is not installed")

BUDGET_S = 0.050  # the seed's monitor budget, held to a scrape and a frame too
RESULTS: dict[str, float] = {}


@pytest.fixture(scope="module")
def farm(module_workdir: Path, full: bool) -> Iterator[tuple[Any, int]]:
    """10,000 inboxes (500 in the smoke pass), every one counted, 1 in 10 holding messages."""
    n = 10_000 if full else 500
    bus = new_bus(module_workdir, max_inbox_size=50)
    for i in range(n):
        agent = f"agent-{i:05d}"
        bus.init_message_bus(agent)
        if i % 10 == 0:
            for _ in range(i % 51):
                bus.send_message("filler", agent, "t", 1)
        else:
            bus.get_inbox_size(agent)  # counted: a fresh inbox is not until something looks
    try:
        yield bus, n
    finally:
        bus.close()


def median_s(fn: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _report(benchmark: Any, name: str, n: int, ours: float, ref: float) -> None:
    RESULTS[name] = ours
    benchmark.extra_info.update(inboxes=n, median_ms=round(ours * 1e3, 3), get_stats_ms=round(ref * 1e3, 3),
                                ratio_to_get_stats=round(ours / ref, 3), budget_ratio=round(ours / BUDGET_S, 3))
    print(f"\n{name}, {n:,} inboxes: {ours * 1e3:.2f} ms median; get_all_inbox_stats {ref * 1e3:.2f} ms "
          f"(ratio {ours / ref:.2f}); {ours / BUDGET_S:.0%} of the 50 ms budget")


def _get_stats(bus: Any) -> Callable[[], object]:
    from cfn_fast import monitors

    return lambda: monitors.get_all_inbox_stats(bus=bus)


def test_exporter_collect(benchmark: Any, farm: tuple[Any, int], full: bool) -> None:
    from cfn_fast import exporter

    bus, n = farm
    reg = exporter.registry(bus)
    from prometheus_client import generate_latest

    body = benchmark.pedantic(lambda: generate_latest(reg), rounds=30 if full else 1, iterations=1,
                              warmup_rounds=2 if full else 0)
    assert b'cfn_inboxes ' in body and b'agent="other"' in body
    if full:
        _report(benchmark, "exporter collect", n, median_s(lambda: generate_latest(reg), 20),
                median_s(_get_stats(bus), 10))


def test_exporter_scrape_over_loopback(benchmark: Any, farm: tuple[Any, int], full: bool) -> None:
    from cfn_fast import exporter

    bus, n = farm
    stop = threading.Event()
    port: list[int] = []
    import socket

    with socket.socket() as s:  # a free port for the server thread
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    t = threading.Thread(target=lambda: port.append(exporter.serve(bus, free, "127.0.0.1", stop=stop)),
                         daemon=True)
    t.start()
    url = f"http://127.0.0.1:{free}/metrics"
    deadline = time.monotonic() + 10
    while True:
        try:
            urllib.request.urlopen(url, timeout=5).read()
            break
        except OSError:
            assert time.monotonic() < deadline, "the exporter did not start"
            time.sleep(0.05)

    def scrape() -> bytes:
        with urllib.request.urlopen(url, timeout=10) as r:
            return bytes(r.read())

    try:
        body = benchmark.pedantic(scrape, rounds=30 if full else 1, iterations=1, warmup_rounds=2 if full else 0)
        assert b"cfn_inbox_messages" in body
        if full:
            _report(benchmark, "loopback scrape", n, median_s(scrape, 20), median_s(_get_stats(bus), 10))
    finally:
        stop.set()
        t.join(10)


def test_top_frame(benchmark: Any, farm: tuple[Any, int], full: bool) -> None:
    from rich.console import Console

    from cfn_fast import top

    bus, n = farm
    viewer = top.Viewer(bus, 1.0)

    def frame() -> str:
        buf = io.StringIO()
        console = Console(file=buf, width=200, height=60, force_terminal=True, color_system="256")
        console.print(top.render(viewer.frame(), 200, 60), crop=True)
        return buf.getvalue()

    screen = benchmark.pedantic(frame, rounds=30 if full else 1, iterations=1, warmup_rounds=2 if full else 0)
    assert f"{n:,} inboxes" in screen
    if full:
        _report(benchmark, "top frame", n, median_s(frame, 20), median_s(_get_stats(bus), 10))
