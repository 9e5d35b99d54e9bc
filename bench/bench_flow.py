"""Flow control on the hot path (issue 13): what an open circuit costs a
sender, against a lock-free counter read through the public API: the check
itself (cfn_send through cffi, refused by one atomic load of the slot's
circuit word) and the module API's refusal (that, plus building and raising
CircuitOpen with its message and retry_after).

The other half of the hot-path target, that send_message with every flow
control at its defaults costs at most 1.1x what it did before them, is the
send rows of bench_send.py: the same send against the same plain-``os``
floor (targets.py has the row; before flow control the ratio was 1.01x).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from conftest import PAYLOAD, new_bus


def open_circuit(workdir: Path) -> Any:
    """A bus whose inbox b is full and its circuit open for an hour."""
    from cfn_fast import BackpressureTimeout

    bus = new_bus(workdir, max_inbox_size=1, breaker_failures=1, backpressure_wait_ms=1,
                  backpressure_max_retries=1, breaker_cooldown_ms=3_600_000)
    bus.init_message_bus("a")
    bus.init_message_bus("b")
    bus.send_message("a", "b", "t", PAYLOAD)
    try:
        bus.send_with_backpressure("a", "b", "t", PAYLOAD)  # stays full: trips the breaker
    except BackpressureTimeout:
        pass
    assert bus.circuit_status("b").state == "open"
    return bus


def test_circuit_refusal(benchmark: Any, record: Any, workdir: Path, pick: Any) -> None:
    """send_message to an inbox whose circuit is open: CircuitOpen, the inbox untouched."""
    from cfn_fast import CircuitOpen

    bus = open_circuit(workdir)
    refused = calls = 0

    def send() -> None:
        nonlocal refused, calls
        calls += 1
        try:
            bus.send_message("a", "b", "t", "{}")
        except CircuitOpen:
            refused += 1

    benchmark.group = "flow control"
    benchmark.pedantic(send, rounds=pick(20_000, 5), warmup_rounds=pick(1_000, 0))
    assert refused == calls >= 1 and bus.get_inbox_size("b") == 1
    record(benchmark, "circuit.refused")


def test_circuit_check(benchmark: Any, record: Any, workdir: Path, pick: Any) -> None:
    """The check itself: cfn_send through cffi, refused by the slot's circuit word."""
    from cfn_fast import _core

    bus = open_circuit(workdir)
    h, opts = bus.storage._h(), bus.storage._plain
    err, res = _core.ffi.new("cfn_err *"), _core.ffi.new("cfn_send_result *")
    codes: set[int] = set()

    def check() -> None:
        codes.add(_core.lib.cfn_send(h, b"a", b"b", b"t", 1, b"{}", 2, opts, res, err))

    benchmark.group = "flow control"
    benchmark.pedantic(check, rounds=pick(20_000, 5), warmup_rounds=pick(1_000, 0))
    assert codes == {_core.lib.CFN_E_CIRCUIT} and bus.get_inbox_size("b") == 1
    record(benchmark, "circuit.check")


def test_counter_read(benchmark: Any, record: Any, workdir: Path, pick: Any) -> None:
    """The reference: get_inbox_size, one lock-free read of the same slot."""
    bus = new_bus(workdir)
    bus.init_message_bus("b")
    benchmark.group = "flow control"
    benchmark.pedantic(bus.get_inbox_size, args=("b",), rounds=pick(20_000, 5), warmup_rounds=pick(1_000, 0))
    record(benchmark, "size.counter")
