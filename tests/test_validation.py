"""Bad input gets a clear error naming the problem, and nothing is written."""
from __future__ import annotations

import json
import os
import re
import string
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cfn_fast import (
    Config,
    ConfigError,
    InvalidAgentId,
    InvalidMessageType,
    InvalidPayload,
    MessageBus,
    PayloadTooLarge,
)

BAD_IDS = ["../x", "a/b", "", ".x", ".", "..", "x" * 300, "a\0b", "a\nb", "agé", "a b", "a*", 7, None]
VALID_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")


def snapshot(base: Path) -> list[tuple[str, int]]:
    """Every file and folder under base with its size (the state file's bytes
    change as counters move, but no file may appear or grow)."""
    out = []
    for root, dirs, files in os.walk(base):
        for name in dirs + files:
            p = os.path.join(root, name)
            if name == ".cfn-fast.shm":
                continue
            out.append((os.path.relpath(p, base), os.path.getsize(p) if name in files else -1))
    return sorted(out)


@pytest.mark.parametrize("bad", BAD_IDS, ids=repr)
def test_bad_agent_ids_are_refused_everywhere(bus: MessageBus, base: Path, bad: object) -> None:
    before = snapshot(base)
    calls = [
        lambda: bus.init_message_bus(bad),  # type: ignore[arg-type]
        lambda: bus.send_message("alice", bad, "t", "{}"),  # type: ignore[arg-type]
        lambda: bus.send_message(bad, "bob", "t", "{}"),  # type: ignore[arg-type]
        lambda: bus.send_with_backpressure("alice", bad, "t", "{}"),  # type: ignore[arg-type]
        lambda: bus.receive_messages(bad),  # type: ignore[arg-type]
        lambda: bus.consume_messages(bad),  # type: ignore[arg-type]
        lambda: bus.clear_inbox(bad),  # type: ignore[arg-type]
        lambda: bus.message_count(bad),  # type: ignore[arg-type]
        lambda: bus.get_inbox_size(bad),  # type: ignore[arg-type]
        lambda: bus.check_inbox_capacity(bad),  # type: ignore[arg-type]
        lambda: bus.get_inbox_utilization(bad),  # type: ignore[arg-type]
        lambda: bus.cleanup_message_bus(bad),  # type: ignore[arg-type]
    ]
    for call in calls:
        with pytest.raises(InvalidAgentId) as info:
            call()
        assert "agent id" in str(info.value) or "sender" in str(info.value) or "recipient" in str(info.value)
    assert snapshot(base) == before
    assert not (base.parent / "x").exists()


@pytest.mark.parametrize(
    "payload",
    ["", "   ", "{", '{"a":1} x', "NaN", '{"a": NaN}', "Infinity", "{'a': 1}", "[1,]", '{"a":1,}',
     "01", "1.", '"\x01"', '"\\x"', b"\xff\xfe", '{"a"}', "tru", float("nan"), {1, 2}],
    ids=repr,
)
def test_payload_must_be_strict_json(bus: MessageBus, base: Path, payload: object) -> None:
    before = snapshot(base)
    with pytest.raises(InvalidPayload):
        bus.send_message("alice", "bob", "t", payload)  # type: ignore[arg-type]
    with pytest.raises(InvalidPayload):
        bus.send_with_backpressure("alice", "bob", "t", payload)  # type: ignore[arg-type]
    assert snapshot(base) == before


def test_payload_size_limit(make_bus, base: Path) -> None:
    bus = make_bus(max_message_bytes=100)
    bus.init_message_bus("bob")
    bus.send_message("alice", "bob", "t", '"' + "x" * 98 + '"')
    before = snapshot(base)
    with pytest.raises(PayloadTooLarge, match="MAX_MESSAGE_BYTES"):
        bus.send_message("alice", "bob", "t", '"' + "x" * 99 + '"')
    assert snapshot(base) == before


@pytest.mark.parametrize("mtype", ["", "x" * 257, "a\0b", 5], ids=repr)
def test_bad_message_types(bus: MessageBus, base: Path, mtype: object) -> None:
    before = snapshot(base)
    with pytest.raises(InvalidMessageType):
        bus.send_message("alice", "bob", mtype, "{}")  # type: ignore[arg-type]
    assert snapshot(base) == before


def test_type_with_quotes_and_control_characters_is_escaped(bus: MessageBus, base: Path) -> None:
    nasty = 'say "hi"\n\tback\\slash \x01 \x7f é'
    msg_id = bus.send_message("alice", "bob", nasty, "{}")
    msg = json.loads((base / "bob" / "inbox" / f"{msg_id}.json").read_text())
    assert msg["type"] == nasty


@given(st.text(min_size=0, max_size=140))
@settings(max_examples=300, deadline=None)
def test_agent_id_rule(candidate: str) -> None:
    from cfn_fast import _core

    expected = bool(VALID_ID.fullmatch(candidate)) and not candidate.startswith(".")
    try:
        _core.check_agent(_core.agent_bytes(candidate))
        accepted = True
    except InvalidAgentId:
        accepted = False
    assert accepted == expected


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
type_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), min_size=1, max_size=40
).filter(lambda s: len(s.encode()) <= 256)


@given(value=json_values, mtype=type_text, sender=st.text(string.ascii_letters + string.digits + "_-", min_size=1, max_size=20))
@settings(max_examples=150, deadline=None)
def test_round_trip(tmp_path_factory: pytest.TempPathFactory, value: object, mtype: str, sender: str) -> None:
    bus = MessageBus(str(tmp_path_factory.mktemp("rt")), Config.from_env())
    bus.init_message_bus("rcpt")
    text = json.dumps(value)
    msg_id = bus.send_message(sender, "rcpt", mtype, text)
    (msg,) = bus.consume_messages("rcpt")
    assert msg["msg_id"] == msg_id and msg["type"] == mtype and msg["from"] == sender
    assert msg["payload"] == json.loads(text)
    bus.close()


@pytest.mark.parametrize(
    ("var", "value", "words"),
    [
        ("MAX_INBOX_SIZE", "abc", "not a whole number"),
        ("MAX_INBOX_SIZE", "0", "at least 1"),
        ("MAX_INBOX_SIZE", "-1", "at least 1"),
        ("BACKPRESSURE_WAIT_MS", "-5", "must not be negative"),
        ("BACKPRESSURE_MAX_RETRIES", "1.5", "not a whole number"),
        ("BACKPRESSURE_BACKOFF", "linear", "fixed, exponential, decorrelated"),
        ("RATE_LIMIT_CHECK_INTERVAL", "0", "at least 0.001"),
        ("RATE_LIMIT_HIGH_LOAD_THRESHOLD", "nan", "finite"),
        ("MAX_MESSAGE_BYTES", "0", "at least 1"),
        ("ALERT_COOLDOWN_SECONDS", "-1", "must not be negative"),
        ("CFN_FSYNC", "maybe", "boolean"),
        ("CFN_GROUP", "no-such-group-here", "names no group"),
    ],
)
def test_config_errors_name_the_variable(monkeypatch: pytest.MonkeyPatch, var: str, value: str, words: str) -> None:
    monkeypatch.setenv(var, value)
    import cfn_fast  # importing never fails because of the environment

    with pytest.raises(ConfigError) as info:
        Config.from_env()
    assert var in str(info.value) and words in str(info.value)
    with pytest.raises(ConfigError):
        cfn_fast.get_inbox_size("a")


def test_config_defaults_are_the_seeds(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("MESSAGE_BASE_DIR", "METRICS_FILE", "ALERT_LOG_FILE"):
        monkeypatch.delenv(var, raising=False)
    c = Config.from_env()
    assert (c.max_inbox_size, c.backpressure_wait_ms, c.backpressure_max_retries) == (1000, 100, 50)
    assert c.base_dir == "/dev/shm/cfn-mvp/messages"
    assert (c.rate_limit_check_interval, c.rate_limit_high_load_threshold,
            c.rate_limit_medium_load_threshold, c.batch_size) == (5, 0.8, 0.5, 10)
    assert c.backpressure_backoff == "fixed" and c.alert_cooldown_seconds == 300
    assert c.max_message_bytes == 1 << 20


def test_medium_threshold_above_high_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RATE_LIMIT_MEDIUM_LOAD_THRESHOLD", "0.9")
    with pytest.raises(ConfigError, match="RATE_LIMIT_MEDIUM_LOAD_THRESHOLD"):
        Config.from_env()
