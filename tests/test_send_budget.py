"""The backpressure loop at the edges of its settings: a huge wait honours
the total budget, a zero wait retries at once up to the retry count, and
out-of-range options are refused at the C boundary, never overflowed."""
from __future__ import annotations

import time

import pytest

from cfn_fast import BackpressureTimeout, InvalidArgument, _core
from cfn_fast.telemetry import counters


@pytest.fixture
def full(make_bus):
    def make(**settings: object):
        bus = make_bus(max_inbox_size=1, **settings)
        bus.init_message_bus("bob")
        bus.send_message("alice", "bob", "t", 0)
        return bus
    return make


@pytest.mark.parametrize("backoff", ["fixed", "exponential", "decorrelated"])
def test_an_hour_long_wait_still_honours_the_total_budget(full, backoff: str) -> None:
    bus = full(backpressure_wait_ms=3_600_000, backpressure_max_retries=1_000_000,
               backpressure_max_total_ms=200, backpressure_backoff=backoff)
    t0 = time.monotonic()
    with pytest.raises(BackpressureTimeout) as info:
        bus.send_with_backpressure("alice", "bob", "t", 1)
    took = time.monotonic() - t0
    assert 0.15 < took < 5
    assert info.value.waited_ns >= 150_000_000
    assert counters(bus)["backpressure_wait"] < 10  # a few waits, not millions


def test_a_zero_wait_retries_at_once_up_to_the_retry_count(full) -> None:
    bus = full(backpressure_wait_ms=0, backpressure_max_retries=7)
    t0 = time.monotonic()
    with pytest.raises(BackpressureTimeout) as info:
        bus.send_with_backpressure("alice", "bob", "t", 1)
    assert info.value.retries == 7 and time.monotonic() - t0 < 2


@pytest.mark.parametrize(("option", "value"), [("capacity", 2**40), ("capacity", 0), ("wait_ms", 10**10),
                                               ("max_total_ms", 2**62), ("max_payload", 2**40),
                                               ("max_retries", 2**40), ("wait_ms", -1)])
def test_out_of_range_options_are_refused_at_the_c_boundary(full, option: str, value: int) -> None:
    bus = full()
    opts = _core.new_send_opts(capacity=10, wait_ms=1, max_retries=1, max_payload=100, dir_mode=0o700,
                               file_mode=0o600)
    setattr(opts, option, value)
    with pytest.raises(InvalidArgument):
        _core.send(bus.storage.handle(), b"alice", b"bob", b"t", b"1", opts)
