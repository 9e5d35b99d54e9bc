"""Fuzzing the C core's inputs with hypothesis: the JSON validator against a
strict reference parser, and message files of arbitrary bytes against the
readers (which must quarantine, never crash or raise)."""
from __future__ import annotations

import json
import os
from decimal import Decimal

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cfn_fast import Config, InvalidAgentId, InvalidMessageType, InvalidPayload, MessageBus, _core


def _has_lone_surrogate(value: object) -> bool:
    if isinstance(value, str):
        return any("\ud800" <= ch <= "\udfff" for ch in value)
    if isinstance(value, list):
        return any(_has_lone_surrogate(v) for v in value)
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    return False


def reference_accepts(data: bytes, send: bool = True) -> bool:
    """RFC 8259 strictly (UTF-8, one value, no NaN/Infinity, no control
    characters in strings). The send policy (send=True) takes only what every
    reader returns intact besides: no unpaired surrogate escape, no integer
    Python's int() refuses. A reader (send=False) takes any such JSON."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return False

    def no_constants(name: str) -> None:
        raise ValueError(name)

    try:
        value = json.loads(text, parse_constant=no_constants,
                           **({} if send else {"parse_int": lambda s: int(Decimal(s))}))
    except (ValueError, RecursionError):
        return False
    return text.strip(" \t\n\r") != "" and not (send and _has_lone_surrogate(value))


def c_accepts(data: bytes) -> bool:
    try:
        _core.check_json(data)
        return True
    except InvalidPayload:
        return False


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)


@st.composite
def mutated_json(draw: st.DrawFn) -> bytes:
    text = json.dumps(draw(json_values), ensure_ascii=draw(st.booleans())).encode()
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["insert", "delete", "replace"]))
        junk = draw(st.binary(min_size=1, max_size=3) | st.sampled_from(
            [b"{", b"}", b"[", b"]", b",", b":", b'"', b"\\", b"e", b"-", b".", b"0", b" ", b"\x00", b"\xc3"]))
        if op == "insert":
            text = text[:at] + junk + text[at:]
        elif op == "delete":
            text = text[:at] + text[at + 1:]
        else:
            text = text[:at] + junk + text[at + len(junk):]
    return text


@given(mutated_json() | st.binary(max_size=64))
@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(b'"\\ud800"')  # a lone surrogate escape is grammatical JSON, but not text: refused
@example(b'"\\ud83d\\ude00"')  # a surrogate pair is one character: accepted
@example(b"1e999")
@example(b"-0")
@example(b'"\xed\xa0\x80"')  # a surrogate encoded in UTF-8 is not UTF-8
@example(b"\xef\xbb\xbf{}")  # no byte-order mark
def test_validator_agrees_with_a_strict_reference(data: bytes) -> None:
    assert c_accepts(data) == reference_accepts(data)


@given(st.lists(st.binary(max_size=300) | mutated_json(), min_size=1, max_size=8))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_readers_survive_arbitrary_message_files(tmp_path_factory, blobs: list[bytes]) -> None:
    base = tmp_path_factory.mktemp("fuzz")
    bus = MessageBus(str(base), Config.from_env().replace(metrics_enabled=False))
    bus.init_message_bus("x")
    inbox = base / "x" / "inbox"
    for i, blob in enumerate(blobs):
        (inbox / f"msg-{i}-{i:03d}.json").write_bytes(blob)
    objects = sum(1 for b in blobs if reference_accepts(b, send=False) and b.strip(b" \t\r\n").startswith(b"{"))
    got = bus.receive_messages("x")
    assert len(got) == objects
    assert len(bus.consume_messages("x")) == objects
    assert bus.message_count("x") == 0
    quarantine = base / "x" / ".quarantine"
    assert (len(os.listdir(quarantine)) if quarantine.exists() else 0) == len(blobs) - objects
    bus.close()


ID_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


@given(st.binary(max_size=200).filter(lambda b: b"\0" not in b))
@settings(max_examples=500, deadline=None)
def test_agent_ids_of_arbitrary_bytes(agent: bytes) -> None:
    expected = 0 < len(agent) <= 128 and not agent.startswith(b".") and set(agent) <= ID_CHARS
    try:
        _core.check_agent(agent)
        accepted = True
    except InvalidAgentId:
        accepted = False
    assert accepted == expected


@given(st.binary(min_size=1, max_size=300))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_message_types_of_arbitrary_bytes(tmp_path_factory, mtype: bytes) -> None:
    base = tmp_path_factory.mktemp("types")
    bus = MessageBus(str(base), Config.from_env().replace(metrics_enabled=False))
    bus.init_message_bus("x")
    h = bus.storage.handle()
    try:
        text = mtype.decode("utf-8")
        valid = len(mtype) <= 256 and "\0" not in text
    except UnicodeDecodeError:
        valid = False
    try:
        _core.send(h, b"y", b"x", mtype, b"{}", bus.storage._plain)
        sent = True
    except InvalidMessageType:
        sent = False
    assert sent == valid
    if sent:
        (msg,) = bus.receive_messages("x")  # escaped: the file is still valid JSON
        assert msg["type"] == mtype.decode("utf-8")
    bus.close()
