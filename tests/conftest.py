"""Every test gets a private base folder (on tmpfs when there is one, as in
production) and private metrics and alert files, through the environment, so
module-level functions and child processes see the same isolated bus. No test
touches the real /dev/shm/cfn-mvp."""
from __future__ import annotations

import gc
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cfn_fast import Config, MessageBus, _core
from cfn_fast.config import SETTINGS
from faults import faultshim  # noqa: F401  (the session fixture; see tests/faults/__init__.py)
from redis_fixtures import _redis_root, backend, redis_cluster, redis_server, redis_url  # noqa: F401  (real Redis)

# A child forked from the test process (multiprocessing's fork context) holds
# the whole pytest heap: every module, every earlier test's objects. A full
# collection in the child walked all of it (a watchdog caught one take in
# test_priority's consumer spending 189 ms of CPU there, and the test's high
# senders waited behind it). Frozen at the fork, the inherited objects stay
# out of the child's collections; what the child makes is collected as usual.
os.register_at_fork(after_in_child=gc.freeze)

_TMPFS = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


@pytest.fixture
def workdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="cfn-test-", dir=_TMPFS))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(autouse=True)
def isolated_env(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    settings = {s.env for s in SETTINGS}  # every variable the bus reads, so none leaks in from the shell
    for name in list(os.environ):
        if (name in settings or name.startswith(("BACKPRESSURE_", "RATE_LIMIT_", "CFN_", "MAX_INBOX", "MAX_MESSAGE",
                                                  "ALERT_", "METRICS_", "REDIS_"))) and name != "CFN_REQUIRE_REDIS":
            monkeypatch.delenv(name)
    base = workdir / "messages"
    monkeypatch.setenv("MESSAGE_BASE_DIR", str(base))
    monkeypatch.setenv("METRICS_FILE", str(workdir / "metrics.jsonl"))
    monkeypatch.setenv("ALERT_LOG_FILE", str(workdir / "alerts.jsonl"))
    return base


@pytest.fixture
def base(isolated_env: Path) -> Path:
    return isolated_env


@pytest.fixture
def make_bus(base: Path) -> Iterator:
    """make_bus(**settings) -> MessageBus on the test's base folder."""
    made: list[MessageBus] = []

    def make(**settings: object) -> MessageBus:
        cfg = Config.from_env().replace(**settings) if settings else Config.from_env()
        b = MessageBus(config=cfg)
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()


@pytest.fixture
def bus(make_bus) -> MessageBus:
    b = make_bus()
    b.init_message_bus("alice")
    b.init_message_bus("bob")
    return b


@pytest.fixture
def one_senders_window(request: pytest.FixtureRequest) -> None:
    """Starts the test where the next 4 s lie in one window of the inboxes'
    top-senders tables, whose counts halve at every window boundary (10 s),
    on both clocks that place them: the C core's CLOCK_MONOTONIC and a local
    Redis server's wall clock. A test that compares counts or shares then
    never sees them halved half-way through its sends. Waits at most ~10 s:
    of the two gaps between the clocks' boundaries, one is at least 5 s."""
    if "backend" in request.fixturenames:
        request.getfixturevalue("backend")  # a Redis Cluster started now would eat into the window
    window = _core.lib.CFN_SENDERS_HALF_LIFE_MS / 1000
    need = 4.0
    for _ in range(4):
        left = min(window - time.monotonic() % window, window - time.time() % window)
        if left >= need:
            return
        time.sleep(left + 0.02)
