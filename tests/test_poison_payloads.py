"""Whatever send accepts, every reader returns intact; what a reader could not
return, send refuses with InvalidPayload. And a payload written behind
cfn-fast's back (by a bash agent) never costs the messages around it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from cfn_fast import InvalidPayload, MessageBus


def cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "cfn_fast", *args], capture_output=True, timeout=60)


def exact(text: bytes) -> object:
    """JSON text parsed with nothing lost: any integer, every float a Decimal."""
    return json.loads(text, parse_int=lambda s: int(Decimal(s)), parse_float=Decimal)


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# -- refused at send: no reader could give them back --------------------------------

@pytest.mark.parametrize(("payload", "words"), [
    ("1" * 6000, "more than 4300 digits"),
    ('{"n": -' + "9" * 4301 + "}", "more than 4300 digits"),
    ('"\\ud800"', "unpaired UTF-16 surrogate"),
    ('{"k": "a\\udc00b"}', "unpaired UTF-16 surrogate"),
    (nested(257), "nested too deep"),
])
def test_send_refuses_what_a_reader_could_not_return(bus: MessageBus, payload: str, words: str) -> None:
    with pytest.raises(InvalidPayload, match=words):
        bus.send_message("alice", "bob", "t", payload)
    assert bus.message_count("bob") == 0 and bus.get_inbox_size("bob") == 0


# -- accepted at send: every reader gives them back -------------------------------------

@pytest.mark.parametrize(("payload", "expect"), [
    ("1" * 4300, int("1" * 4300)),
    ("1e400", Decimal("1e400")),                     # never float('inf')
    ("-2.5E+999", Decimal("-2.5E+999")),
    ("1.7976931348623157e308", 1.7976931348623157e308),  # the largest double is still a float
    ('"\\ud83d\\ude00"', "\U0001F600"),              # a surrogate pair is one character
    (nested(256), json.loads(nested(256))),          # the deepest payload, inside its envelope
])
def test_every_reader_returns_an_accepted_payload_intact(bus: MessageBus, payload: str, expect: object) -> None:
    for _ in range(3):
        bus.send_message("alice", "bob", "t", payload)
    got = bus.receive_messages("bob")[0]["payload"]
    assert got == expect and type(got) is type(expect)
    assert bus.claim_messages("bob", 1)[0]["payload"] == expect
    assert bus.consume_messages("bob", 1)[0]["payload"] == expect
    out = cli("bus", "consume", "bob")
    assert out.returncode == 0, out.stderr
    assert payload.encode() in out.stdout  # as written: 1e400 is not Infinity, \ud83d stays escaped
    assert exact(out.stdout)[0]["payload"] == exact(payload.encode())  # type: ignore[index]


# -- written behind cfn-fast's back ----------------------------------------------------

def original_file(inbox: Path, seq: int, payload: str) -> str:
    msg_id = f"msg-1700000000-{seq:03d}"
    (inbox / f"{msg_id}.json").write_text(
        f'{{\n  "version": "1.1",\n  "msg_id": "{msg_id}",\n  "from": "carol",\n  "to": "bob",\n'
        f'  "timestamp": 1700000000,\n  "sequence": {seq},\n  "type": "t",\n  "payload": {payload},\n'
        f'  "requires_ack": false\n}}\n')
    return msg_id


@pytest.fixture
def poisoned(bus: MessageBus, base: Path) -> list[str]:
    """Good messages around ones the original wrote unvalidated, which send would refuse."""
    inbox = base / "bob" / "inbox"
    return [original_file(inbox, 1, '{"good": 1}'), original_file(inbox, 2, "9" * 6000),
            original_file(inbox, 3, '"\\ud800"'), original_file(inbox, 4, '{"good": 4}')]


def test_library_readers_return_a_bash_writers_odd_payloads_intact(bus: MessageBus, poisoned: list[str]) -> None:
    got = bus.receive_messages("bob")
    assert [m["msg_id"] for m in got] == poisoned
    assert got[1]["payload"] == int(Decimal("9" * 6000)) and got[2]["payload"] == "\ud800"
    taken = bus.consume_messages("bob")
    assert [m["msg_id"] for m in taken] == poisoned
    assert bus.message_count("bob") == 0 == bus.get_inbox_size("bob")


def test_cli_readers_print_them_as_written_and_never_half_way(bus: MessageBus, poisoned: list[str]) -> None:
    for _ in range(2):  # receive leaves them, so it works every time
        out = cli("bus", "receive", "bob")
        assert out.returncode == 0 and b"Traceback" not in out.stderr, out.stderr
        assert [m["msg_id"] for m in exact(out.stdout)] == poisoned  # type: ignore[attr-defined]
        assert b'"\\ud800"' in out.stdout and b"9" * 6000 in out.stdout
    out = cli("bus", "consume", "bob")
    assert out.returncode == 0 and b"Traceback" not in out.stderr, out.stderr
    assert [m["msg_id"] for m in exact(out.stdout)] == poisoned  # type: ignore[attr-defined]
    assert bus.message_count("bob") == 0


def test_a_payload_the_decoder_refuses_is_quarantined_and_costs_no_neighbour(
        bus: MessageBus, base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """C checks the grammar; if Python's decoder still refuses a file (a
    recursion limit set low, say), that file goes aside, never the batch."""
    for i in range(3):
        bus.send_message("alice", "bob", "t", {"i": i})
    original_file(base / "bob" / "inbox", 999, nested(200))  # sorts last
    monkeypatch.setattr(sys, "getrecursionlimit", sys.getrecursionlimit)  # restored after the test
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(150)
    try:
        got = bus.consume_messages("bob")
    finally:
        sys.setrecursionlimit(old)
    assert [m["payload"]["i"] for m in got] == [0, 1, 2]
    assert os.listdir(base / "bob" / ".quarantine")[0].startswith("msg-1700000000-999.json")
    assert bus.message_count("bob") == 0 == bus.get_inbox_size("bob")


def test_a_decoder_that_runs_out_of_memory_takes_nothing(bus: MessageBus, monkeypatch: pytest.MonkeyPatch) -> None:
    from cfn_fast import bus as bus_module

    for i in range(5):
        bus.send_message("alice", "bob", "t", {"i": i})
    real = bus_module.decode_message
    calls = []

    def flaky(data: bytes, flags: int = 0) -> dict:
        calls.append(1)
        if len(calls) == 3:
            raise MemoryError
        return real(data, flags)

    monkeypatch.setattr(bus_module, "decode_message", flaky)
    with pytest.raises(MemoryError):
        bus.consume_messages("bob", 5)
    monkeypatch.setattr(bus_module, "decode_message", real)
    assert bus.message_count("bob") == 5 == bus.get_inbox_size("bob")
    with pytest.raises(MemoryError):
        monkeypatch.setattr(bus_module, "decode_message", flaky)
        calls.clear()
        bus.claim_messages("bob", 5)
    monkeypatch.setattr(bus_module, "decode_message", real)
    assert bus.message_count("bob") == 5 == bus.get_inbox_size("bob")  # claims put back
    assert sorted(m["payload"]["i"] for m in bus.consume_messages("bob")) == [0, 1, 2, 3, 4]
