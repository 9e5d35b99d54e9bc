"""Shared machinery of the cfn-fast benchmarks (see bench/README.md).

* ``bench_*.py`` files are collected here (pytest's default only takes
  ``test_*.py``), so a plain ``pytest`` run of tests/ never sees them.
* pyproject's addopts carry ``--benchmark-disable``: ``pytest bench/`` is the
  quick smoke pass (every benchmark once, small sizes), and
  ``pytest bench/ --benchmark-only`` is the measured run (``--benchmark-only``
  turns the benchmarks back on here instead of clashing with addopts).
* Every figure is recorded under a key (``record``); bench/targets.py pairs
  keys into the issue's rows, and the ratio of each row measured in this run
  goes into the benchmark's ``extra_info`` and into a table printed at the end.
* Every bus lives in a fresh tmpfs folder that is removed afterwards; nothing
  here touches /dev/shm/cfn-mvp.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from targets import ROWS, table

TMPFS = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None

# 1 KiB of JSON text: the payload of every send and every peer's message.
PAYLOAD = '{"data":"' + "x" * (1024 - 11) + '"}'
assert len(PAYLOAD) == 1024

_VALUES: dict[str, float] = {}
_INFOS: dict[str, list[dict[str, Any]]] = {}  # key -> extra_info dicts that recorded it
NOTES: list[str] = []  # printed under the table (peers skipped, and why)


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> Optional[pytest.Module]:
    # files named on the command line are collected by pytest itself
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    # runs before pytest-benchmark's (trylast) configure reads the options
    if config.getoption("benchmark_only", False) and config.getoption("benchmark_disable", False):
        config.option.benchmark_enable = True


def measuring(config: pytest.Config) -> bool:
    """False in the smoke pass (benchmarks disabled: each runs once, sizes shrink)."""
    bs = getattr(config, "_benchmarksession", None)
    return bs is not None and not bs.disabled


@pytest.fixture(scope="session")
def full(pytestconfig: pytest.Config) -> bool:
    return measuring(pytestconfig)


@pytest.fixture(scope="session")
def pick(full: bool) -> Callable[[Any, Any], Any]:
    """pick(measured_value, smoke_value)."""
    return lambda measured, smoke: measured if full else smoke


def _mkdtemp(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix, dir=TMPFS))


@pytest.fixture
def workdir() -> Iterator[Path]:
    d = _mkdtemp("cfnbench-")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def module_workdir() -> Iterator[Path]:
    d = _mkdtemp("cfnbench-")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def bus_config(workdir: Path, **settings: Any) -> Any:
    """A Config on workdir, independent of the caller's environment."""
    from cfn_fast import Config

    return Config(base_dir=str(workdir / "messages"), metrics_file=str(workdir / "metrics.jsonl"),
                  alert_log_file=str(workdir / "alerts.jsonl"), **settings)


def new_bus(workdir: Path, **settings: Any) -> Any:
    from cfn_fast import MessageBus

    bus = MessageBus(config=bus_config(workdir, **settings))
    bus.init_message_bus_system()
    return bus


def fill(bus: Any, agent: str, n: int, sender: str = "filler") -> None:
    """Puts n messages in agent's inbox through cfn-fast (counter exact). The
    filler has no outbox, so no copies pile up elsewhere."""
    for _ in range(n):
        bus.send_message(sender, agent, "fill", PAYLOAD)


@pytest.fixture(scope="session")
def record() -> Callable[..., Optional[float]]:
    """record(benchmark, key, value=None, **extra): stores a figure under key
    (by default the benchmark's median, in seconds) and the ratios of every
    row whose two figures are now both known."""

    def rec(benchmark: Any, key: str, value: Optional[float] = None, **extra: Any) -> Optional[float]:
        info = benchmark.extra_info
        info.update(extra)
        if value is None:
            stats = getattr(benchmark, "stats", None)
            if stats is None:  # smoke pass: nothing was timed
                return None
            value = float(stats.stats.median)
        # one benchmark may record several figures (the round-robin throughput test)
        info.setdefault("values", {})[key] = value
        _VALUES[key] = value
        _INFOS.setdefault(key, []).append(info)
        _fill_ratios()
        return value

    return rec


def _fill_ratios() -> None:
    for r in ROWS:
        q = r.ratio(_VALUES)
        if q is None:
            continue
        for info in _INFOS.get(r.key, []):
            info.setdefault("ratios", {})[f"{r.key} / {r.ref}"] = q
            info.setdefault("targets", {})[f"{r.key} / {r.ref}"] = r.target


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> Iterator[None]:
    _fill_ratios()  # before pytest-benchmark writes its JSON
    yield


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    tr = terminalreporter
    tr.section("cfn-fast against its references (same run; medians)")
    if not measuring(config):
        tr.write_line("smoke pass (--benchmark-disable): each benchmark ran once; no timings, no ratios.")
        tr.write_line("Measure with: pytest bench/ --benchmark-only")
        return
    for line in table(_VALUES):
        tr.write_line(line)
    for line in dict.fromkeys(NOTES):
        tr.write_line(line)
