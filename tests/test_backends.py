"""The contract both backends keep: the same API, errors, envelope, msg_id
format, ordering, capacity, consumption and CLI, run on the base folder's
files, on one Redis server and on a Redis Cluster (the ``backend`` fixture
sets MESSAGE_BUS_URL, or not). Nothing here looks at how a backend stores
anything: only at what the bus gives back."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import subprocess
import sys
import threading
import time

import pytest

import cfn_fast
from cfn_fast import (
    BackpressureTimeout,
    Config,
    InboxFull,
    InboxNotFound,
    InvalidAgentId,
    InvalidArgument,
    InvalidMessageType,
    InvalidPayload,
    MessageBus,
    PayloadTooLarge,
)

CTX = mp.get_context("fork")
MSG_ID = re.compile(r"^msg-\d{10}-\d{10}-[0-9a-f]{16}$")
FIELDS = ["version", "msg_id", "from", "to", "timestamp", "sequence", "type", "payload", "requires_ack"]


@pytest.fixture
def nbus(backend: str, make_bus):
    """A bus on the backend under test, with alice and bob initialised."""
    b = make_bus()
    b.init_message_bus("alice")
    b.init_message_bus("bob")
    return b


def test_both_backends_write_the_same_bytes(backend: str, make_bus) -> None:
    bus = make_bus()
    bus.init_message_bus("bob")
    mid = bus.send_message("alice", "bob", "t\u00e9\"", ' [1, {"a": 2}] ')
    msg = json.loads(bus.receive_raw("bob")[0])
    expected = ('{\n  "version": "1.1",\n  "msg_id": "%s",\n  "from": "alice",\n  "to": "bob",\n'
                '  "timestamp": %d,\n  "sequence": 1,\n  "type": "t\u00e9\\"",\n  "payload": [1, {"a": 2}],\n'
                '  "requires_ack": false\n}\n' % (mid, msg["timestamp"])).encode()
    assert bus.receive_raw("bob")[0] == expected  # the original's bytes, to the space


def _shape(raw: bytes) -> tuple[bytes, int, int, str]:
    """A message's bytes with its msg_id, timestamp and sequence put aside (and checked
    against each other: the id names the second and the zero-padded sequence)."""
    msg = json.loads(raw)
    mid, ts, seq = msg["msg_id"], msg["timestamp"], msg["sequence"]
    assert MSG_ID.match(mid.removesuffix("-hi")), mid
    assert mid.split("-")[1] == str(ts) and mid.split("-")[2] == "%010d" % seq, (mid, ts, seq)
    rest = raw.replace(mid.encode(), b"ID").replace(b'"timestamp": %d,' % ts, b'"timestamp": T,')
    return rest.replace(b'"sequence": %d,' % seq, b'"sequence": S,'), ts, seq, mid


@pytest.mark.parametrize("priority", ["normal", "high"])
def test_a_batch_writes_what_single_sends_write(backend: str, make_bus, priority: str) -> None:
    """send_batch (one step per batch on Redis, its ids and bodies built apart from a
    single send's) writes the same bytes as send_message, message for message: the
    envelope, the id's shape, a sequence that counts on across both paths."""
    bus = make_bus(max_inbox_size=100)
    bus.init_message_bus("bob")
    payload = ' [1, {"a": "\u00e9"}] '
    bus.send_message("alice", "bob", "t\u00e9\"", payload, priority=priority)
    ids = bus.send_batch("alice", "bob", "t\u00e9\"", [payload] * 3, priority=priority)
    assert all(isinstance(i, str) for i in ids), ids
    shapes = [_shape(raw) for raw in bus.receive_raw("bob")]
    assert [s[2] for s in shapes] == [1, 2, 3, 4]
    assert [s[3] for s in shapes[1:]] == ids
    assert all(s[0] == shapes[0][0] for s in shapes), shapes
    assert all(s[3].endswith("-hi") == (priority == "high") for s in shapes)


def test_the_envelope_and_msg_id_are_the_original_format(nbus: MessageBus) -> None:
    before = int(time.time())
    mid = nbus.send_message("alice", "bob", "ta\"sk\n", '{"action": "process"}')
    assert MSG_ID.match(mid)
    (raw,) = nbus.receive_raw("bob")
    assert raw.startswith(b'{\n  "version": "1.1",\n  "msg_id": "') and raw.endswith(b'  "requires_ack": false\n}\n')
    msg = json.loads(raw)
    assert list(msg) == FIELDS
    assert (msg["msg_id"], msg["from"], msg["to"], msg["type"], msg["sequence"]) == \
        (mid, "alice", "bob", 'ta"sk\n', 1)
    assert msg["payload"] == {"action": "process"} and abs(msg["timestamp"] - before) <= 2
    assert int(mid.split("-")[1]) == msg["timestamp"]


def test_the_sender_keeps_a_copy_only_when_it_has_an_outbox(backend: str, make_bus) -> None:
    bus = make_bus(outbox_max=3)
    bus.init_message_bus("alice")
    bus.init_message_bus("bob")
    bus.send_message("alice", "bob", "t", "1")             # one step
    bus.send_with_backpressure("alice", "bob", "t", "2")   # the waiting path
    bus.send_batch("alice", "bob", "t", ["3", "4"])         # the batch path
    bus.send_message("carol", "bob", "t", "5")             # carol was never initialised
    bus.send_message("bob", "bob", "t", "6")               # to oneself: inbox and outbox in one slot
    assert bus.message_count("bob") == 6
    assert bus.message_count("alice", "outbox") == 3       # OUTBOX_MAX: the oldest copy went
    assert bus.message_count("carol", "outbox") == 0
    assert bus.message_count("bob", "outbox") == 1
    assert bus.storage.counters()["outbox_pruned"] == 1


def test_sequences_are_per_pair_and_ids_sort_in_send_order(nbus: MessageBus) -> None:
    ids = [nbus.send_message("alice", "bob", "t", i) for i in range(50)]
    nbus.send_message("bob", "alice", "t", 0)
    assert sorted(ids) == ids and len(set(ids)) == 50
    got = nbus.receive_messages("bob")
    assert [m["sequence"] for m in got] == list(range(1, 51))
    assert nbus.receive_messages("alice")[0]["sequence"] == 1


def test_receive_consume_claim_ack(nbus: MessageBus) -> None:
    for i in range(5):
        nbus.send_message("alice", "bob", "t", {"i": i})
    assert [m["payload"]["i"] for m in nbus.receive_messages("bob")] == list(range(5))
    assert [m["payload"] for m in nbus.consume_messages("bob", 2)] == [{"i": 0}, {"i": 1}]
    assert nbus.get_inbox_size("bob") == 3 and nbus.message_count("bob") == 3
    claimed = nbus.claim_messages("bob", 2)
    assert [m["payload"]["i"] for m in claimed] == [2, 3]
    assert nbus.message_count("bob") == 1 and nbus.get_inbox_size("bob") == 3  # claims hold their places
    assert nbus.ack_messages("bob", claimed) == 2
    assert nbus.ack_messages("bob", [m["msg_id"] for m in claimed]) == 0
    assert nbus.get_inbox_size("bob") == 1
    assert [m["payload"]["i"] for m in nbus.consume_messages("bob")] == [4]
    assert nbus.consume_messages("bob") == [] and nbus.consume_messages("bob", 0) == []
    with pytest.raises(InvalidArgument):
        nbus.consume_messages("bob", -1)


def test_raw_reads_give_the_bytes_as_written(nbus: MessageBus) -> None:
    nbus.send_message("alice", "bob", "t", '  {"big": 1e400, "s": "\\ud83d\\ude00"}  ')
    (m,) = nbus.receive_messages("bob")
    assert str(m["payload"]["big"]) == "1E+400"  # exact, never infinity
    (raw,) = nbus.consume_raw("bob")
    assert b'{"big": 1e400, "s": "\\ud83d\\ude00"},\n  "requires_ack"' in raw


def test_full_inbox_refuses_and_never_evicts(backend: str, make_bus) -> None:
    bus = make_bus(max_inbox_size=3)
    bus.init_message_bus("bob")
    ids = [bus.send_message("alice", "bob", "t", i) for i in range(3)]
    with pytest.raises(InboxFull):
        bus.send_message("alice", "bob", "t", 3)
    assert [m["msg_id"] for m in bus.receive_messages("bob")] == ids
    assert not bus.check_inbox_capacity("bob") and bus.get_inbox_utilization("bob") == 100
    # no sequence number was spent on the refused send
    bus.consume_messages("bob", 1)
    assert bus.receive_messages("bob")[-1]["sequence"] == 3
    assert json.loads(bus.receive_raw("bob")[0])["sequence"] == 2
    assert bus.send_message("alice", "bob", "t", 9) and bus.receive_messages("bob")[-1]["sequence"] == 4


def test_one_capacity_per_inbox_the_smallest_since_init(backend: str, make_bus) -> None:
    big, small = make_bus(max_inbox_size=10), make_bus(max_inbox_size=4)
    big.init_message_bus("bob")
    assert big.get_inbox_capacity("bob") == 10
    for i in range(4):
        small.send_message("alice", "bob", "t", i)
    with pytest.raises(InboxFull):
        big.send_message("alice", "bob", "t", 5)  # the smaller capacity holds for everyone
    assert big.get_inbox_capacity("bob") == 4
    big.init_message_bus("bob")  # init sets it again
    assert big.get_inbox_capacity("bob") == 10


def test_missing_inbox(nbus: MessageBus) -> None:
    for call in (lambda: nbus.send_message("alice", "nobody", "t", "{}"),
                 lambda: nbus.send_with_backpressure("alice", "nobody", "t", "{}"),
                 lambda: nbus.receive_messages("nobody"), lambda: nbus.consume_messages("nobody"),
                 lambda: nbus.claim_messages("nobody")):
        with pytest.raises(InboxNotFound):
            call()
    assert nbus.get_inbox_size("nobody") == 0 and nbus.check_inbox_capacity("nobody")
    assert nbus.message_count("nobody") == 0 and nbus.clear_inbox("nobody") == 0


BAD_IDS = ["", ".hidden", "a/b", "..", "a b", "x" * 129, "é", "a\0b", "-" * 0, 7, None]


@pytest.mark.parametrize("bad", BAD_IDS, ids=repr)
def test_hostile_ids_are_refused_alike(nbus: MessageBus, bad: object) -> None:
    for call in (lambda: nbus.send_message(bad, "bob", "t", "1"),  # type: ignore[arg-type]
                 lambda: nbus.send_message("alice", bad, "t", "1"),  # type: ignore[arg-type]
                 lambda: nbus.init_message_bus(bad),  # type: ignore[arg-type]
                 lambda: nbus.consume_messages(bad),  # type: ignore[arg-type]
                 lambda: nbus.get_inbox_size(bad),  # type: ignore[arg-type]
                 lambda: nbus.cleanup_message_bus(bad)):  # type: ignore[arg-type]
        with pytest.raises(InvalidAgentId):
            call()
    assert nbus.list_agents() == ["alice", "bob"]


BAD_PAYLOADS = ["", "{", "nan", "[1,]", "{'a':1}", '"\\ud800"', "1" * 4301, "[" * 300 + "]" * 300,
                b"\xff", '{"a":1}{"b":2}']


@pytest.mark.parametrize("payload", BAD_PAYLOADS, ids=lambda p: repr(p)[:30])
def test_hostile_payloads_are_refused_alike(nbus: MessageBus, payload: object) -> None:
    with pytest.raises(InvalidPayload):
        nbus.send_message("alice", "bob", "t", payload)  # type: ignore[arg-type]
    assert nbus.get_inbox_size("bob") == 0 and nbus.receive_messages("bob") == []


@pytest.mark.parametrize("mtype", ["", "x" * 257, "a\0b", 5])
def test_bad_types_are_refused_alike(nbus: MessageBus, mtype: object) -> None:
    with pytest.raises(InvalidMessageType):
        nbus.send_message("alice", "bob", mtype, "1")  # type: ignore[arg-type]
    assert nbus.get_inbox_size("bob") == 0


def test_payload_size_limit(backend: str, make_bus) -> None:
    bus = make_bus(max_message_bytes=100)
    bus.init_message_bus("bob")
    bus.send_message("alice", "bob", "t", '"' + "x" * 98 + '"')
    with pytest.raises(PayloadTooLarge):
        bus.send_message("alice", "bob", "t", '"' + "x" * 99 + '"')


def test_backpressure_gives_up_after_its_retries(backend: str, make_bus) -> None:
    # the retries bound it here (a total budget far above 4 x 5 ms), so a busy machine cannot change the count
    bus = make_bus(max_inbox_size=1, backpressure_wait_ms=5, backpressure_max_retries=4,
                   backpressure_max_total_ms=10_000)
    bus.init_message_bus("bob")
    bus.send_message("alice", "bob", "t", 0)
    with pytest.raises(BackpressureTimeout, match="after 4 retries") as info:
        bus.send_with_backpressure("alice", "bob", "t", 1)
    assert info.value.retries == 4 and not info.value.locked
    assert bus.get_inbox_size("bob") == 1


def test_exponential_backoff_stays_inside_the_total_budget(backend: str, make_bus) -> None:
    bus = make_bus(max_inbox_size=1, backpressure_wait_ms=10, backpressure_max_retries=50,
                   backpressure_backoff="exponential")
    bus.init_message_bus("bob")
    bus.send_message("alice", "bob", "t", 0)
    with pytest.raises(BackpressureTimeout, match="after 6 retries"):
        bus.send_with_backpressure("alice", "bob", "t", 1)


def test_a_consumer_wakes_a_waiting_sender(backend: str, make_bus) -> None:
    # the configured wait is a minute: only a wake can let this finish in time
    bus = make_bus(max_inbox_size=1, backpressure_wait_ms=60_000, backpressure_max_retries=1)
    bus.init_message_bus("bob")
    bus.send_message("alice", "bob", "t", 0)
    result: list = []
    sender = threading.Thread(target=lambda: result.append(bus.deliver("alice", "bob", "t", "1")))
    sender.start()
    while not any(s.agent == "bob" and s.waiters for s in bus.storage.slots()):
        time.sleep(0.001)
    assert [m["payload"] for m in bus.consume_messages("bob")] == [0]
    sender.join(timeout=30)
    assert not sender.is_alive()
    (res,) = result
    assert res.retries == 0 and res.wakeups >= 1
    assert [m["payload"] for m in bus.receive_messages("bob")] == [1]


def _plain_sender(rank: int, n: int, results: "mp.Queue[tuple[int, int]]") -> None:
    bus = MessageBus(config=Config.from_env().replace(max_inbox_size=60))
    ok = full = 0
    for i in range(n):
        try:
            bus.send_message(f"s{rank}", "sink", "t", i)
            ok += 1
        except InboxFull:
            full += 1
    results.put((ok, full))


def test_many_processes_never_overfill(backend: str, make_bus) -> None:
    bus = make_bus()
    bus.init_message_bus("sink")
    results: "mp.Queue[tuple[int, int]]" = CTX.Queue()
    procs = [CTX.Process(target=_plain_sender, args=(r, 40, results)) for r in range(6)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert sum(ok for ok, _ in outcomes) == 60 and sum(f for _, f in outcomes) == 6 * 40 - 60
    assert bus.message_count("sink") == 60 == bus.get_inbox_size("sink")


def _bp_sender(rank: int, per: int) -> None:
    bus = MessageBus(config=Config.from_env().replace(max_inbox_size=20, backpressure_wait_ms=5,
                                                      backpressure_max_retries=4000))
    for i in range(per):
        bus.send_with_backpressure(f"s{rank}", "sink", "t", {"s": rank, "i": i})


def _consumer(out: "mp.Queue[list[tuple[int, int, int]]]", stop: "mp.Event", claims: bool) -> None:
    bus = MessageBus()
    got: list[tuple[int, int, int]] = []
    while True:
        if claims:
            batch = bus.claim_messages("sink", 5)
            bus.ack_messages("sink", batch)
        else:
            batch = bus.consume_messages("sink", 7)
        got += [(m["payload"]["s"], m["payload"]["i"], m["sequence"]) for m in batch]
        if not batch:
            if stop.is_set() and bus.get_inbox_size("sink") == 0:
                break
            time.sleep(0.001)
    out.put(got)


@pytest.mark.parametrize("claims", [False, True], ids=["consume", "claim-ack"])
def test_exactly_once_among_concurrent_consumers(backend: str, make_bus, claims: bool) -> None:
    senders, per = 3, 100
    bus = make_bus()
    bus.init_message_bus("sink")
    out: "mp.Queue[list[tuple[int, int, int]]]" = CTX.Queue()
    stop = CTX.Event()
    consumers = [CTX.Process(target=_consumer, args=(out, stop, claims)) for _ in range(3)]
    procs = [CTX.Process(target=_bp_sender, args=(r, per)) for r in range(senders)]
    for p in consumers + procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    stop.set()
    results = [out.get(timeout=60) for _ in consumers]
    for p in consumers:
        p.join(timeout=30)
    everything = [x for r in results for x in r]
    assert sorted((s, i) for s, i, _ in everything) == [(s, i) for s in range(senders) for i in range(per)]
    for got in results:  # each consumer's share of one sender comes in that sender's order
        for s in range(senders):
            seqs = [q for snd, _, q in got if snd == s]
            assert seqs == sorted(seqs)


def test_send_batch_delivers_in_order_and_names_the_bad_ones(backend: str, make_bus) -> None:
    bus = make_bus(max_inbox_size=5, backpressure_wait_ms=5, backpressure_max_retries=2)
    bus.init_message_bus("bob")
    got = bus.send_batch("alice", "bob", "t", ["1", "[2", "3", "4", "5", "6", "7"])
    assert isinstance(got[1], InvalidPayload)
    assert [isinstance(x, str) for x in got] == [True, False, True, True, True, True, False]
    assert isinstance(got[6], BackpressureTimeout)
    assert [m["payload"] for m in bus.receive_messages("bob")] == [1, 3, 4, 5, 6]
    assert [m["msg_id"] for m in bus.receive_messages("bob")] == [x for x in got if isinstance(x, str)]


def test_big_batches_keep_order_outbox_bound_and_exactly_once(backend: str, make_bus) -> None:
    """Past the sizes a server step takes at once (256 payloads, 512
    arguments a call): 1,300 sent in one batch from a sender with an outbox
    bounded at 700, read, claimed and acked in hundreds: every message once,
    in send order, and the outbox cut to its bound."""
    bus = make_bus(max_inbox_size=5000, outbox_max=700)
    bus.init_message_bus("alice")
    bus.init_message_bus("bob")
    ids = bus.send_batch("alice", "bob", "t", [str(i) for i in range(1300)])
    assert all(isinstance(x, str) for x in ids)
    assert [m["msg_id"] for m in bus.receive_messages("bob")] == ids
    assert [m["sequence"] for m in bus.receive_messages("bob")] == list(range(1, 1301))
    first = bus.consume_raw("bob", 600)
    assert [json.loads(b)["payload"] for b in first] == list(range(600))
    claimed = bus.claim_messages("bob", 600)
    assert [m["payload"] for m in claimed] == list(range(600, 1200))
    assert bus.ack_messages("bob", claimed) == 600
    assert [m["payload"] for m in bus.consume_messages("bob")] == list(range(1200, 1300))
    assert bus.get_inbox_size("bob") == 0
    assert 700 - 70 <= bus.storage.count_files("alice", "outbox") <= 700 + 70  # OUTBOX_MAX, within a tenth


def test_clear_cleanup_and_the_system(nbus: MessageBus) -> None:
    for i in range(4):
        nbus.send_message("alice", "bob", "t", i)
    assert nbus.clear_inbox("bob") == 4 and nbus.get_inbox_size("bob") == 0
    nbus.send_message("alice", "bob", "t", 1)
    nbus.cleanup_message_bus("bob")
    assert nbus.list_agents() == ["alice"] and nbus.get_inbox_size("bob") == 0
    with pytest.raises(InboxNotFound):
        nbus.send_message("alice", "bob", "t", 1)
    nbus.init_message_bus("bob")
    assert nbus.get_inbox_size("bob") == 0
    nbus.cleanup_message_bus_system()
    assert nbus.list_agents() == []
    nbus.init_message_bus_system()


def test_module_functions_follow_the_environment(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cfn_fast.init_message_bus("a")
    cfn_fast.init_message_bus("b")
    mid = cfn_fast.send_with_backpressure("a", "b", "t", '{"x":1}')
    assert cfn_fast.get_inbox_size("b") == 1 and cfn_fast.receive_messages("b")[0]["msg_id"] == mid
    monkeypatch.setenv("MAX_INBOX_SIZE", "1")
    assert not cfn_fast.check_inbox_capacity("b")
    with pytest.raises(InboxFull):
        cfn_fast.send_message("a", "b", "t", "{}")
    assert [m["msg_id"] for m in cfn_fast.consume_messages("b")] == [mid]


def test_shared_state_counters_rate_and_cooldown(nbus: MessageBus) -> None:
    from cfn_fast import monitors, telemetry

    nbus.send_message("alice", "bob", "t", 1)
    nbus.consume_messages("bob")
    c = telemetry.counters(nbus)
    assert c["sent"] >= 1 and c["consumed"] >= 1
    telemetry.count(nbus, "monitor_passes", 2)
    assert telemetry.counters(nbus)["monitor_passes"] == c["monitor_passes"] + 2
    r = monitors.apply_dynamic_rate_limit(bus=nbus, load_per_cpu=0.95)
    assert r["tier"] == "high" and monitors.get_batch_size(bus=nbus) == 5
    assert telemetry.emit_alert("probe", "one", "info", {"agent": "bob"}, bus=nbus)
    assert not telemetry.emit_alert("probe", "two", "info", {"agent": "bob"}, bus=nbus)
    assert telemetry.emit_alert("probe", "three", "info", {"agent": "alice"}, bus=nbus)
    stats = monitors.get_all_inbox_stats(bus=nbus)
    assert [s["agent"] for s in stats] == ["alice", "bob"]


def test_overflow_monitor_sees_every_inbox(backend: str, make_bus) -> None:
    from cfn_fast.overflow import OverflowMonitor

    bus = make_bus(max_inbox_size=4)
    for a in ("a1", "a2"):
        bus.init_message_bus(a)
    for i in range(4):
        bus.send_message("x", "a1", "t", i)
    res = OverflowMonitor(bus, 0.01).run_pass(reconcile=True)
    assert res.inboxes == 2 and res.alerts == 1


def _cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cfn_fast", *args], input=stdin, capture_output=True,
                          text=True, timeout=60)


def test_the_cli_has_the_same_commands_output_and_exit_codes(backend: str) -> None:
    assert _cli("bus", "init", "bob").returncode == 0
    r = _cli("bus", "send", "alice", "bob", "task", '{"n":1}')
    assert r.returncode == 0 and MSG_ID.match(r.stdout.strip())
    r = _cli("send-backpressure", "alice", "bob", "task", "2")
    assert r.returncode == 0 and MSG_ID.match(r.stdout.strip())
    assert _cli("get-size", "bob").stdout == "2\n"
    assert _cli("bus", "count", "bob").stdout == "2\n"
    assert _cli("check-capacity", "bob").returncode == 0
    assert _cli("get-utilization", "bob").stdout == "0\n"
    r = _cli("bus", "send-batch", "alice", "bob", "task", stdin="3\nnot json\n4\n")
    assert r.returncode == 1 and len(r.stdout.split()) == 2 and "line 2:" in r.stderr
    r = _cli("bus", "consume", "bob", "--max", "3")
    assert r.returncode == 0 and [m["payload"] for m in json.loads(r.stdout)] == [{"n": 1}, 2, 3]
    assert json.loads(_cli("bus", "receive", "bob").stdout)[0]["payload"] == 4
    stats = json.loads(_cli("get-stats").stdout)
    assert stats == [{"agent": "bob", "size": 1, "utilization": 0, "max_size": 1000}]
    assert _cli("bus", "recover").stdout == "0\n"
    r = _cli("bus", "send", "alice", "nobody", "t", "1")
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1
    r = _cli("bus", "send", "alice", "../x", "t", "1")
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1
    r = _cli("bus", "send", "alice", "bob", "t", "{bad")
    assert r.returncode == 2
    assert _cli("bus", "clear", "bob").returncode == 0 and _cli("get-size", "bob").stdout == "0\n"
    assert _cli("bus", "clear", "nobody").returncode == 1
    assert _cli("bus", "cleanup", "bob").returncode == 0
    assert json.loads(_cli("get-stats").stdout) == []


def test_the_cli_full_inbox_is_exit_1(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAX_INBOX_SIZE", "1")
    monkeypatch.setenv("BACKPRESSURE_WAIT_MS", "1")
    monkeypatch.setenv("BACKPRESSURE_MAX_RETRIES", "2")
    assert _cli("bus", "init", "bob").returncode == 0
    assert _cli("bus", "send", "a", "bob", "t", "1").returncode == 0
    r = _cli("bus", "send", "a", "bob", "t", "1")
    assert r.returncode == 1 and "full" in r.stderr
    r = _cli("send-backpressure", "a", "bob", "t", "1")
    assert r.returncode == 1 and "retries" in r.stderr.splitlines()[-1]
    assert _cli("check-capacity", "bob").returncode == 1


def test_the_drop_in_works_on_both(backend: str, tmp_path) -> None:
    script = ('source <(python -m cfn_fast shell); init_message_bus bob; '
              'send_with_backpressure alice bob task \'{"job":1}\' >/dev/null; get_inbox_size bob')
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "cfn-fast").write_text(f"#!/bin/sh\nexec {sys.executable} -m cfn_fast \"$@\"\n")
    (bindir / "cfn-fast").chmod(0o755)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}")
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "1"


def test_an_arrival_between_the_look_and_the_wait_ends_the_wait_at_once(backend: str, make_bus) -> None:
    """A consumer reads the arrivals before it looks in the inbox, then waits
    on them: whatever arrived in between (a send, a batch, a claim nacked
    back) must end that wait at once, or the consumer sleeps through it."""
    bus = make_bus()
    bus.init_message_bus("bob")
    st = bus.storage
    bus.send_message("a", "bob", "t", 0)
    claimed = bus.claim_messages("bob", 1)
    arrive = {
        "send": lambda: bus.send_message("a", "bob", "t", 1),
        "batch": lambda: bus.send_batch("a", "bob", "t", [2, 3]),
        "nack": lambda: bus.nack_messages("bob", claimed),
    }
    for how, act in arrive.items():
        seen = st.arrivals("bob")
        act()
        assert st.arrivals("bob") != seen, how
        t0 = time.monotonic()
        assert st.wait_arrival("bob", seen, 5_000_000_000) is True, how
        assert time.monotonic() - t0 < 2.5, how  # ended by the arrival, not by its 5 s timeout
    seen = st.arrivals("bob")
    assert st.wait_arrival("bob", seen, 50_000_000) is False  # nothing arrived: the wait runs out
