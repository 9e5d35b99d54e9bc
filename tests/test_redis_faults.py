"""The Redis backend when the server is away, restarted or paused, and when
MESSAGE_BUS_URL is wrong: a clear error within the deadline (BackendUnavailable,
CLI exit 1 with one line; a bad URL is a ConfigError, exit 2), never a hang,
never a password in an error, a log or a metric; and the bus carries on by
itself once the server is back."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cfn_fast import BackendUnavailable, CfnError, Config, ConfigError, InboxFull, MessageBus
from redis_fixtures import Cluster, Server, need_redis

pytestmark = pytest.mark.slow


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cfn_fast", *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **env})


def test_a_paused_server_fails_calls_within_their_deadline_and_the_bus_carries_on(redis_server: Server,
                                                                                    make_bus) -> None:
    redis_server.flush()
    bus = make_bus(bus_url=redis_server.url(), redis_timeout_ms=300, max_inbox_size=100_000)
    bus.init_message_bus("bob")
    longest = [0.0]
    errors: list[BaseException] = []
    stop = threading.Event()

    def send() -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                bus.send_with_backpressure("alice", "bob", "t", 1)
            except BackendUnavailable as e:
                errors.append(e)
            longest[0] = max(longest[0], time.monotonic() - t0)

    threads = [threading.Thread(target=send) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    redis_server.pause()
    try:
        time.sleep(2.0)
    finally:
        redis_server.resume()
    time.sleep(0.3)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert errors and all("unavailable" in str(e) for e in errors)
    assert longest[0] < 0.3 + 0.7  # REDIS_TIMEOUT_MS and a margin for a busy machine; never the 2 s pause
    # the same bus, no restart of any client: it works again
    before = bus.get_inbox_size("bob")
    bus.send_message("alice", "bob", "t", 2)
    assert bus.get_inbox_size("bob") == before + 1


def test_nothing_acknowledged_is_lost_across_a_restart_with_aof_always(tmp_path: Path, make_bus) -> None:
    need_redis()
    server = Server(tmp_path / "aof", aof=True)
    try:
        bus = make_bus(bus_url=server.url(), redis_timeout_ms=2000)
        bus.init_message_bus("bob")
        ids = [bus.send_message("alice", "bob", "t", i) for i in range(100)]
        done = [m["msg_id"] for m in bus.consume_messages("bob", 20)]
        claimed = bus.claim_messages("bob", 10)
        assert bus.ack_messages("bob", claimed) == 10
        server.restart()  # SIGKILL, then the same folder and port
        deadline = time.monotonic() + 10
        while True:  # the client reconnects on its own; the first call may find the server still loading
            try:
                held = [m["msg_id"] for m in bus.receive_messages("bob")]
                break
            except BackendUnavailable:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert held == ids[30:]
        assert not set(held) & set(done + [m["msg_id"] for m in claimed])
        assert bus.get_inbox_size("bob") == 70
        assert bus.send_message("alice", "bob", "t", 100)  # sequences go on after the restart
        assert bus.receive_messages("bob")[-1]["sequence"] == 101
    finally:
        server.stop()


def test_an_unreachable_server_is_a_clear_error_in_time(make_bus, base: Path) -> None:
    need_redis()
    from redis_fixtures import _free_port

    url = f"redis://127.0.0.1:{_free_port()}/0"
    bus = make_bus(bus_url=url, redis_timeout_ms=500)
    t0 = time.monotonic()
    with pytest.raises(BackendUnavailable, match="unavailable"):
        bus.send_message("a", "b", "t", "1")
    assert time.monotonic() - t0 < 2
    r = _cli({"MESSAGE_BUS_URL": url, "REDIS_TIMEOUT_MS": "500"}, "bus", "send", "a", "b", "t", "1")
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1 and "unavailable" in r.stderr
    r = _cli({"MESSAGE_BUS_URL": url, "REDIS_TIMEOUT_MS": "500"}, "get-stats")
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1
    assert not base.exists()  # nothing written, not even the local base folder


BAD_URLS = [
    ("http://127.0.0.1:6379/0", "scheme"), ("redis://127.0.0.1:99999/0", "port"),
    ("redis://127.0.0.1:0/0", "port"), ("redis://:6379/0", "host"), ("redis://127.0.0.1:6379/x", "database"),
    ("redis://127.0.0.1:6379/0?evil=1", "query"), ("redis+cluster://127.0.0.1:6379/3", "database"),
    ("redis://127.0.0.1:6379/0?prefix=a*b", "prefix"), ("unix://", "path"), ("redis://u:s3cret@h:70000", "port"),
]


@pytest.mark.parametrize(("url", "word"), BAD_URLS)
def test_a_bad_url_is_one_config_error_naming_the_variable(url: str, word: str, base: Path) -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_env({"MESSAGE_BUS_URL": url})
    assert "MESSAGE_BUS_URL" in str(info.value) and word in str(info.value) and "s3cret" not in str(info.value)
    r = _cli({"MESSAGE_BUS_URL": url}, "bus", "send", "a", "b", "t", "1")
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and "MESSAGE_BUS_URL" in r.stderr
    assert "s3cret" not in r.stderr and not base.exists()


def test_bad_credentials_are_refused_and_never_shown(tmp_path: Path, base: Path) -> None:
    need_redis()
    server = Server(tmp_path / "auth", password="right-pass")
    try:
        for env in ({"MESSAGE_BUS_URL": f"redis://:wrong-s3cret@127.0.0.1:{server.port}/0"},
                    {"MESSAGE_BUS_URL": f"redis://127.0.0.1:{server.port}/0", "REDIS_PASSWORD": "wrong-s3cret"},
                    {"MESSAGE_BUS_URL": f"redis://127.0.0.1:{server.port}/0"}):
            r = _cli(env, "bus", "init", "bob")
            assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, r.stderr
            assert "wrong-s3cret" not in r.stderr + r.stdout and "right-pass" not in r.stderr
            assert "auth" in r.stderr.lower() or "password" in r.stderr.lower()
        assert server.client().dbsize() == 0  # type: ignore[attr-defined]  # nothing written
        assert not base.exists()
        # the right password, from the URL or the setting, works; and is shown nowhere
        for env in ({"MESSAGE_BUS_URL": f"redis://:right-pass@127.0.0.1:{server.port}/0"},
                    {"MESSAGE_BUS_URL": f"redis://127.0.0.1:{server.port}/0", "REDIS_PASSWORD": "right-pass"}):
            assert _cli(env, "bus", "init", "bob").returncode == 0
            out = _cli(env, "env").stdout + repr(Config.from_env(env)) + repr(MessageBus(config=Config.from_env(env)))
            assert "right-pass" not in out and "***" in out
        _cli({"MESSAGE_BUS_URL": f"redis://:right-pass@127.0.0.1:{server.port}/0"}, "bus", "send", "a", "bob",
             "t", "1")
        r = _cli({"MESSAGE_BUS_URL": f"redis://:right-pass@127.0.0.1:{server.port}/0", "MAX_INBOX_SIZE": "1",
                  "BACKPRESSURE_WAIT_MS": "1", "BACKPRESSURE_MAX_RETRIES": "1"},
                 "send-backpressure", "a", "bob", "t", "1")
        assert r.returncode == 1 and "right-pass" not in r.stderr
        for f in os.listdir(base) if base.exists() else []:
            p = base / f
            if p.is_file():
                assert b"right-pass" not in p.read_bytes()
    finally:
        server.stop()


def test_without_the_client_the_url_names_the_extra(base: Path) -> None:
    code = ("import sys; sys.modules['redis'] = None\n"
            "from cfn_fast.__main__ import main\n"
            "sys.exit(main(['bus', 'send', 'a', 'b', 't', '1']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "MESSAGE_BUS_URL": "redis://127.0.0.1:1/0"})
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1
    assert "cfn-fast[redis]" in r.stderr
    import cfn_fast.redis_storage as rs

    saved = sys.modules.get("redis")
    sys.modules["redis"] = None  # type: ignore[assignment]  # what an import of a missing package finds
    try:
        with pytest.raises(ConfigError, match=r"cfn-fast\[redis\]"):
            rs.RedisStorage(Config(), "redis://127.0.0.1:1/0")
    finally:
        if saved is not None:
            sys.modules["redis"] = saved
        else:
            del sys.modules["redis"]


def test_a_full_inbox_on_redis_is_inbox_full_not_a_backend_error(redis_server: Server, make_bus) -> None:
    redis_server.flush()
    bus = make_bus(bus_url=redis_server.url(), max_inbox_size=1)
    bus.init_message_bus("bob")
    bus.send_message("a", "bob", "t", 1)
    with pytest.raises(InboxFull):
        bus.send_message("a", "bob", "t", 2)


def test_a_connection_the_server_dropped_is_remade_before_the_next_step(redis_server: Server, make_bus) -> None:
    """Script steps go over the process's own connection (not the client's
    pool): when the server closes it (CLIENT KILL, an idle timeout), the next
    send finds out before it sends and goes on a fresh one, with no error."""
    redis_server.flush()
    bus = make_bus(bus_url=redis_server.url())
    bus.init_message_bus("bob")
    bus.send_message("alice", "bob", "t", 0)
    admin = redis_server.client()
    assert admin.client_kill_filter(_type="normal", skipme=True) >= 1  # type: ignore[attr-defined]
    time.sleep(0.05)
    bus.send_message("alice", "bob", "t", 1)
    assert [m["payload"] for m in bus.consume_messages("bob")] == [0, 1]


def test_scripts_flushed_from_the_server_are_loaded_again_once(redis_server: Server, make_bus) -> None:
    """SCRIPT FLUSH (or a restart without persistence) drops the loaded
    scripts: the next step gets NOSCRIPT, which means it did not run, loads
    the script and runs it once; nothing is delivered twice."""
    redis_server.flush()
    bus = make_bus(bus_url=redis_server.url())
    bus.init_message_bus("bob")
    bus.send_message("alice", "bob", "t", 0)
    admin = redis_server.client()
    admin.script_flush()  # type: ignore[attr-defined]
    bus.send_message("alice", "bob", "t", 1)
    assert bus.get_inbox_size("bob") == 2
    assert [m["payload"] for m in bus.consume_messages("bob")] == [0, 1]


def _calls(admin: object, cmd: str) -> int:
    return int(admin.info("commandstats").get(f"cmdstat_{cmd}", {}).get("calls", 0))  # type: ignore[attr-defined]


def test_steps_on_one_server_are_the_library_s_functions_loaded_once(redis_server: Server, make_bus) -> None:
    """On one Redis 7 server a process's steps are FCALLs of one function
    library, loaded by the first step that finds it missing; the scripts'
    EVALSHA is not used. Two versions of the library (another hash) would
    sit side by side: the name is the library's own."""
    from cfn_fast import redis_storage

    redis_server.flush()
    admin = redis_server.client()
    admin.function_flush()  # type: ignore[attr-defined]
    admin.config_resetstat()  # type: ignore[attr-defined]
    bus = make_bus(bus_url=redis_server.url())
    bus.init_message_bus("bob")
    for i in range(3):
        bus.send_message("alice", "bob", "t", i)
    libs = [dict(zip(lib[::2], lib[1::2]))[b"library_name"] for lib in admin.function_list()]  # type: ignore
    assert libs == [redis_storage._LIB[0].encode()]
    assert _calls(admin, "fcall") >= 4 and _calls(admin, "evalsha") == 0
    assert _calls(admin, "function|load") == 1
    assert [m["payload"] for m in bus.consume_messages("bob")] == [0, 1, 2]


def test_functions_flushed_from_the_server_are_loaded_again_once(redis_server: Server, make_bus) -> None:
    """FUNCTION FLUSH (or a restart without persistence) drops the library:
    the next step's FCALL finds no function, which means it did not run; the
    library is loaded and the step runs once, nothing delivered twice."""
    redis_server.flush()
    admin = redis_server.client()
    bus = make_bus(bus_url=redis_server.url())
    bus.init_message_bus("bob")
    bus.send_message("alice", "bob", "t", 0)
    admin.function_flush()  # type: ignore[attr-defined]
    bus.send_message("alice", "bob", "t", 1)
    assert bus.get_inbox_size("bob") == 2
    assert [m["payload"] for m in bus.consume_messages("bob")] == [0, 1]


@pytest.mark.parametrize("denied", ["function", "fcall"])
def test_a_user_denied_functions_runs_the_same_steps_as_scripts(redis_server: Server, make_bus,
                                                                 denied: str) -> None:
    """A user who may not load functions (ACL -function), or not call them
    (-fcall), as on a Redis 6.2 server that has neither: the steps go as
    EVALSHA of the scripts, each once, with the same answers (capacity,
    order, exactly once)."""
    redis_server.flush()
    admin = redis_server.client()
    admin.function_flush()  # type: ignore[attr-defined]
    admin.execute_command("ACL", "SETUSER", "limited", "reset", "on", ">pw", "~*", "&*", "+@all",  # type: ignore
                          f"-{denied}")
    try:
        admin.config_resetstat()  # type: ignore[attr-defined]
        bus = make_bus(bus_url=f"redis://limited:pw@127.0.0.1:{redis_server.port}/0", max_inbox_size=2)
        bus.init_message_bus("bob")
        bus.send_message("alice", "bob", "t", 0)
        bus.send_message("alice", "bob", "t", 1)
        with pytest.raises(InboxFull):
            bus.send_message("alice", "bob", "t", 2)
        assert [m["payload"] for m in bus.consume_messages("bob")] == [0, 1]
        assert bus.get_inbox_size("bob") == 0
        assert admin.function_list() == []  # type: ignore[attr-defined]
        assert _calls(admin, "evalsha") >= 6
        assert bus.storage._fcall is False
    finally:
        admin.execute_command("ACL", "DELUSER", "limited")  # type: ignore[attr-defined]


def test_threads_of_one_process_share_the_bus_and_its_capacity(redis_server: Server, make_bus) -> None:
    """Eight threads send through one bus: one at a time takes the process's
    own connection, the others the client's pool meanwhile. The capacity holds
    exactly and every delivered message is there once."""
    redis_server.flush()
    bus = make_bus(bus_url=redis_server.url(), max_inbox_size=150)
    bus.init_message_bus("bob")
    sent: list[str] = []
    full = [0]
    lock = threading.Lock()

    def send(who: int) -> None:
        for i in range(40):
            try:
                mid = bus.send_message(f"s{who}", "bob", "t", i)
            except InboxFull:
                with lock:
                    full[0] += 1
                continue
            with lock:
                sent.append(mid)

    threads = [threading.Thread(target=send, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(sent) == 150 and full[0] == 8 * 40 - 150
    got = [m["msg_id"] for m in bus.consume_messages("bob")]
    assert sorted(got) == sorted(sent) and len(set(got)) == 150


def test_a_server_older_than_6_2_is_named_and_nothing_is_lost(tmp_path: Path, make_bus) -> None:
    """A server without ZMSCORE (older than 6.2; here a real one with the
    command renamed away) makes a consume fail with one error that says what
    is needed, and the messages it read stay in the inbox."""
    need_redis()
    server = Server(tmp_path / "old", extra=("--rename-command", "ZMSCORE", ""))
    try:
        bus = make_bus(bus_url=server.url())
        bus.init_message_bus("bob")
        bus.send_message("alice", "bob", "t", 1)
        with pytest.raises(CfnError, match=r"lacks a command .*\(ZMSCORE\): cfn-fast needs Redis 6\.2 or newer"):
            bus.consume_messages("bob")
        assert bus.get_inbox_size("bob") == 1
        assert [m["payload"] for m in bus.receive_messages("bob")] == [1]
    finally:
        server.stop()


def test_a_paused_cluster_master_fails_its_inboxes_calls_in_time_and_the_bus_carries_on(
        redis_cluster: Cluster, make_bus) -> None:
    """On a Cluster, the master holding bob's slot SIGSTOPped for 2 s: sends to
    bob fail with BackendUnavailable within the deadline, never hang; carol,
    whose slot another master holds, is served throughout; after SIGCONT the
    same bus reaches bob again, no client restarted."""
    redis_cluster.flush()
    bus = make_bus(bus_url=redis_cluster.url(), redis_timeout_ms=300, max_inbox_size=100_000)
    for agent in ("bob", "carol", "dave", "erin"):
        bus.init_message_bus(agent)
    owner = redis_cluster.owner(b"cfn:{bob}:i")
    other = next(a for a in ("carol", "dave", "erin") if redis_cluster.owner(f"cfn:{{{a}}}:i".encode()) is not owner)
    longest = [0.0]
    errors: list[BaseException] = []
    served = [0]
    stop = threading.Event()

    def send(to: str) -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                bus.send_message("alice", to, "t", 1)
                if to == other:
                    served[0] += 1
            except BackendUnavailable as e:
                errors.append(e)
            longest[0] = max(longest[0], time.monotonic() - t0)

    threads = [threading.Thread(target=send, args=(to,)) for to in ("bob", "bob", other)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    owner.pause()
    try:
        time.sleep(1.0)
        during = served[0]
        time.sleep(1.0)
        during = served[0] - during
    finally:
        owner.resume()
    time.sleep(0.3)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert errors and all("unavailable" in str(e) for e in errors)
    assert longest[0] < 0.3 + 0.7  # REDIS_TIMEOUT_MS and a margin for a busy machine; never the 2 s pause
    assert during > 0  # the other masters' inboxes kept working while bob's was away
    before = bus.get_inbox_size("bob")
    bus.send_message("alice", "bob", "t", 2)
    assert bus.get_inbox_size("bob") == before + 1


def test_a_step_goes_on_the_wire_as_redis_py_would_send_it(redis_server: Server, make_bus) -> None:
    """Script steps are packed by the storage (the head and the keys' part
    once per target and key list), not by redis-py: the bytes must be
    exactly what redis-py's pack_command makes for the same EVALSHA or
    FCALL, for every kind of argument the steps pass, two scripts or
    functions on one key list keep their own name, and an argument redis-py
    refuses (a bool) is a CfnError, sent nowhere."""
    from cfn_fast import redis_storage

    redis_server.flush()
    bus = make_bus(bus_url=redis_server.url())
    bus.init_message_bus("bob")
    bus.send_message("alice", "bob", "t", 0)  # opens the process's own connection
    st = bus.storage
    conn = st._direct
    keys = st._ikeys("bob")
    args = [b"", b"a\r\nb", "", "h\u00e9llo \U0001f600", 0, -1, 2**63, 10**30, 1.5, bytearray(b"xy"),
            memoryview(b"mv"), b"x" * 70_000]
    for cmd, target in (("EVALSHA", "a" * 40), ("EVALSHA", "b" * 40), ("FCALL", "cfn_x_deliver"), ("FCALL", "f")):
        want = b"".join(conn.pack_command(cmd, target, len(keys), *keys, *args))
        assert b"".join(st._packed(conn, cmd.encode(), target.encode(), keys, args)) == want
    # arguments packed once (a send's sender, recipient and type; its settings) stand for themselves
    Sub = type("Sub", (str,), {})
    fixed = [Sub("alice"), "h\u00e9", b"t\r\n", 0, 2**63]
    mixed = [redis_storage._Packed(fixed), b"payload", redis_storage._Packed([""]), "tok", redis_storage._Packed([])]
    want = b"".join(conn.pack_command("FCALL", "f", len(keys), *keys, *fixed, b"payload", "", "tok"))
    assert b"".join(st._packed(conn, b"FCALL", b"f", keys, mixed)) == want
    assert redis_storage._unpacked(mixed) == [*fixed, b"payload", "", "tok"]
    with pytest.raises(CfnError, match="bool"):
        st._run("SIZE", keys, [True])
    assert bus.get_inbox_size("bob") == 1  # the connection is still in step with the server
