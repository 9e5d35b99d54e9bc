"""The Redis backend: the ``Storage`` interface over one Redis server or one
Redis Cluster, selected by MESSAGE_BUS_URL. The only module that talks to
redis-py; it is imported only when a URL is given.

Layout (see redis_scripts.py for each key): every key of inbox A is named
``<prefix>:{A}:<what>``; the braces make A the hash tag, so one inbox lives in
one Cluster slot and each of its scripts is one atomic step there. State that
is not an inbox's (the shared totals, the alert cooldown, the published rate
limit) lives under ``<prefix>:{.g}:`` (no agent id starts with '.').

What the file backend keeps in files maps this way: an inbox folder is a
sorted set of msg_ids (score 0, so ordered by name, which is (timestamp,
sequence)) and a hash of their bytes; a claim folder is a hash msg_id ->
consumer plus a lease per consumer that its process renews (the kernel's lock
on the consumer's lock file, in the file backend); the pair's sequence file is
a hash field; the outbox is a sorted set and hash under the sender's tag. A
record's name is ``<msg_id>.json``, as the file's. Telemetry files and monitor
pid files stay local, in MESSAGE_BASE_DIR, per host (a FileStorage on it).
"""
from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from typing import Any, Optional, Union
from urllib.parse import parse_qs, unquote, urlsplit

from cfn_fast import redis_scripts as S
from cfn_fast import storage
from cfn_fast.config import Config, redact_url
from cfn_fast.errors import (
    BackendUnavailable,
    BackpressureTimeout,
    CfnError,
    CircuitOpen,
    ConfigError,
    InboxFull,
    InboxNotFound,
    InvalidArgument,
    InvalidMessageType,
    PayloadTooLarge,
)
from cfn_fast.storage import CircuitInfo, FileStorage, RateSettings, ReconcileResult, Record, SendResult, SlotInfo

_INBOX = (b"i", b"q", b"b", b"v", b"c", b"cn", b"l", b"s", b"w", b"wd", b"r")
# The shared counters an inbox's own scripts keep (in its meta hash, so a send
# is one step in one slot); the others live in the global hash.
_INBOX_COUNTERS = ("sent", "consumed", "send_full", "backpressure_wait", "backpressure_success",
                   "backpressure_failure", "recovered", "quarantined", "metrics", "circuit_opened",
                   "circuit_closed", "circuit_rejected")
_TRIM = b" \t\r\n"
_SHA: dict[str, str] = {}  # script name -> its SHA1, as EVALSHA names it
_LIB = S.library()  # (name, text, script name -> function name): the direct path's FCALLs
_BATCH = 256           # payloads per batch step
_BATCH_BYTES = 4 << 20  # and at most this much payload per step


class _Packed:
    """Arguments a step passes again and again (a send's sender, recipient
    and type; its settings), packed once: one item of a step's arguments
    that stands for all of them."""

    __slots__ = ("args", "bulks")

    def __init__(self, args: list[Union[bytes, str, int]]) -> None:
        self.args = args
        self.bulks = _bulks(None, [a.encode() if isinstance(a, str) else a for a in args])  # a str subclass too


def _bulks(conn: Any, args: list[Any]) -> bytes:
    """args as the protocol's bulk strings, encoded as redis-py's Encoder
    does (bytes as they are, str as UTF-8, int by repr; anything else, and
    bool, through the connection's encoder, which refuses what it refuses)."""
    out = []
    for a in args:
        t = type(a)
        if t is bytes:
            b = a
        elif t is str:
            b = a.encode()
        elif t is int:
            b = b"%d" % a
        elif t is _Packed:
            out.append(a.bulks)
            continue
        else:
            b = bytes(conn.encoder.encode(a))
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def _unpacked(args: list[Any]) -> list[Any]:
    """args with each _Packed item replaced by the arguments it stands for."""
    out: list[Any] = []
    for a in args:
        if type(a) is _Packed:
            out.extend(a.args)
        else:
            out.append(a)
    return out


def _escape_type(mtype: bytes) -> bytes:
    """The type as the C core checks and escapes it (cfn_json_escape)."""
    if not 0 < len(mtype) <= storage.TYPE_MAX or b"\0" in mtype:
        raise InvalidMessageType(f"message type must be 1 to {storage.TYPE_MAX} bytes of UTF-8 text without NUL")
    try:
        mtype.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidMessageType(f"message type must be 1 to {storage.TYPE_MAX} bytes of UTF-8 text without NUL") \
            from None
    return storage.json_escape(mtype)


class Target:
    """Where MESSAGE_BUS_URL points, parsed for redis-py; ``shown`` never holds the password."""

    def __init__(self, url: str, config: Config) -> None:
        u = urlsplit(url)
        q = {k: v[0] for k, v in parse_qs(u.query).items()}
        self.shown = redact_url(url)
        self.cluster = u.scheme.endswith("+cluster")
        self.prefix: str = q.get("prefix", "cfn")
        secs = config.redis_timeout_ms / 1000
        password = unquote(u.password) if u.password else config.redis_password
        kw: dict[str, Any] = dict(socket_timeout=secs, socket_connect_timeout=secs,
                                  username=unquote(u.username) if u.username else None, password=password)
        if u.scheme == "unix":
            kw["unix_socket_path"] = unquote(u.path)
            kw["db"] = int(q.get("db", "0"))
        else:
            kw["host"] = u.hostname
            kw["port"] = u.port or 6379
            if u.scheme.startswith("rediss"):
                kw["ssl"] = True
            if not self.cluster:
                kw["db"] = int(u.path.strip("/") or q.get("db", "0"))
        self.kwargs = kw
        self.secret = password or ""


class RedisStorage:
    """The bus on Redis (one server, or a Cluster with ``redis+cluster://``).
    Safe to use from many threads; a forked child gets its own connections
    and its own consumer identity at its first call."""

    def __init__(self, config: Config, url: Optional[str] = None) -> None:
        target = url or config.bus_url
        if not target:
            raise ConfigError("the Redis backend needs MESSAGE_BUS_URL")
        try:
            import redis
        except ImportError:
            raise ConfigError("MESSAGE_BUS_URL needs the Redis client: pip install 'cfn-fast[redis]'") from None
        self._redis = redis
        self.config = config
        self.base_dir = config.base_dir
        self.target = Target(target, config)
        self._local = FileStorage(config)  # this host's telemetry files, pid files and base folder
        p = self.target.prefix
        self._pre = p.encode()
        self._g = f"{p}:{{.g}}:".encode()
        self._lock = threading.Lock()
        self._client: Any = None
        self._pid = -1
        self._keys: dict[str, list[bytes]] = {}
        self._outbox: dict[str, tuple[bool, float]] = {}
        self._okeys: dict[tuple[str, str], list[bytes]] = {}
        self._kpack: dict[tuple[bytes, ...], bytes] = {}  # (target, *keys) -> the step's packed head and keys
        # (sender, to, type) checked -> sender, recipient and escaped type, packed for DELIVER's ARGV
        self._checked: dict[tuple[str, str, bytes], _Packed] = {}
        self._claims: dict[str, int] = {}
        self._reads: dict[tuple[int, str], list[bytes]] = {}
        self._beat: Optional[threading.Thread] = None
        self._beat_stop = threading.Event()
        self.consumer = ""
        self._ttl = max(1000, 2 * config.redis_timeout_ms)  # a woken sender's reservation; a read's visibility
        c = config
        self._budget_ns = (c.backpressure_max_total_ms * 1_000_000 if c.backpressure_max_total_ms
                           else c.backpressure_wait_ms * 1_000_000 * max(0, c.backpressure_max_retries))
        self._timed = c.backpressure_max_total_ms > 0 or c.backpressure_wait_ms > 0
        self._cb = (f"{c.breaker_failures},{c.breaker_failure_rate},{c.breaker_window_ms},{c.breaker_min_calls},"
                    f"{c.breaker_cooldown_ms},{c.breaker_probes},{c.priority_headroom_pct}")
        self._adapt = (f"{c.adaptive_target_ms},{c.adaptive_interval_ms},{c.adaptive_floor}"
                       if c.adaptive_limit == "delay" else "")
        errors = redis.exceptions
        self._unavailable: tuple[type[BaseException], ...] = (
            errors.ConnectionError, errors.TimeoutError, getattr(errors, "ClusterDownError", errors.ConnectionError),
            getattr(errors, "RedisClusterException", errors.ConnectionError), OSError)
        self._redis_error: type[BaseException] = errors.RedisError
        self._scripts: dict[str, Any] = {}
        # this process's own connection for script steps on one server (not a
        # Cluster): see _run_direct. None until first use; False: none here.
        self._direct: Any = None
        self._direct_lock = threading.Lock()
        # the rest of a send's arguments without backpressure (DELIVER's ARGV)
        # but for the payload and the token: 5-7 us a send to pack one by one
        self._fixed = _Packed(["", c.max_inbox_size, 0, 0, 0, self._ttl, 0])
        self._tails = {hi: _Packed([self._cb, 0, 0, int(hi), c.outbox_max]) for hi in (False, True)}
        self._fcall = True  # the direct path calls the library's functions; False: EVALSHA (see _fcall_missing)

    # -- the connection ------------------------------------------------------------
    @property
    def metrics_error(self) -> Optional[CfnError]:
        return self._local.metrics_error

    @metrics_error.setter
    def metrics_error(self, value: Optional[CfnError]) -> None:
        self._local.metrics_error = value

    def _new_client(self) -> Any:
        r = self._redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        kw = dict(self.target.kwargs)
        # no silent retries: a command whose answer was lost may have run, and a send must not run twice
        kw["retry"] = Retry(NoBackoff(), 0)
        try:
            if self.target.cluster:
                from redis.cluster import RedisCluster

                return RedisCluster(**kw)
            return r.Redis(**kw)
        except self._unavailable as e:
            raise self._down(e) from None

    def _c(self) -> Any:
        """The client of this process (made again in a forked child)."""
        pid = os.getpid()
        if self._pid != pid:
            with self._lock:
                if self._pid != pid:
                    self._client = None
                    self._direct = None  # the parent's socket is the parent's
                    self._direct_lock = threading.Lock()
                    self._claims, self._reads, self._outbox = {}, {}, {}
                    self._beat = None
                    self._beat_stop = threading.Event()
                    self.consumer = f"{socket.gethostname()}.{pid}.{os.urandom(4).hex()}"
                    self._pid = pid
        c = self._client
        if c is None:
            with self._lock:
                if self._client is None:
                    self._client = self._new_client()
                    self._scripts = {}
                c = self._client
        return c

    def _down(self, e: BaseException) -> BackendUnavailable:
        text = str(e) or type(e).__name__
        secret = self.target.secret
        if secret:
            text = text.replace(secret, "***")
        if isinstance(e, self._redis.exceptions.AuthenticationError) or "WRONGPASS" in text or "NOAUTH" in text:
            text = f"authentication failed ({text}); check the URL's credentials or REDIS_PASSWORD"
        return BackendUnavailable(f"Redis at {self.target.shown} unavailable: {text.splitlines()[0] if text else ''}")

    def _fail(self, e: BaseException) -> CfnError:
        if isinstance(e, self._unavailable):
            return self._down(e)
        text = str(e)
        if text.startswith(("LOADING", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN", "BUSY", "NOAUTH", "WRONGPASS")):
            return self._down(e)
        secret = self.target.secret
        low = text.lower()
        if "unknown redis command called from" in low or ("unknown command" in low and "zmscore" in low):
            # the scripts' newest command is ZMSCORE (6.2); an older server knows the others
            return CfnError(f"Redis at {self.target.shown} lacks a command the bus's scripts use (ZMSCORE): "
                            "cfn-fast needs Redis 6.2 or newer")
        return CfnError(f"Redis at {self.target.shown}: {text.replace(secret, '***') if secret else text}")

    def _run(self, name: str, keys: list[bytes], args: list[Any]) -> Any:
        """One script, by name, on the slot of keys[0]."""
        c = self._c()
        if self._direct is not False and self._direct_lock.acquire(blocking=False):
            try:
                return self._run_direct(c, name, keys, args)
            finally:
                self._direct_lock.release()
        return self._run_script(c, name, keys, args)

    def _run_direct(self, client: Any, name: str, keys: list[bytes], args: list[Any]) -> Any:
        """A script step on this process's own connection to a single server:
        FCALL of the step's function in the library (redis_scripts.library;
        EVALSHA of its script where the server has no functions or this user
        may not load them), packed, sent and its answer read, with none of the
        client's per-call work (pool checkout and return, the retry wrapper,
        the observability hooks): ~50 us of a ~250 us step on loopback. The
        same rules as the client's path: a connection the server closed (its
        restart) is remade before the step, never after it (an answer lost
        mid-step is BackendUnavailable: the step may have run, so it is not
        sent twice); an answer that says the step's code is not there
        (NOSCRIPT, "Function not found": it did not run) loads it and sends
        the step again. One thread at a time uses it; another meanwhile takes
        the client's path."""
        conn = self._direct
        if conn is None:
            if self.target.cluster:
                self._direct = False
                return self._run_script(client, name, keys, args)
            pool = client.connection_pool
            conn = self._direct = pool.connection_class(**pool.connection_kwargs)

        def ask(packed: list[bytes]) -> Any:
            conn.send_packed_command(packed, check_health=False)
            return conn.read_response()

        try:
            if conn._sock is not None:
                try:
                    stale = conn.can_read(timeout=0)  # readable now: closed by the server, or a stray answer
                except self._unavailable:
                    stale = True  # the read of the close itself raises
                if stale:
                    conn.disconnect()  # sent on a fresh one
            if self._fcall:
                step = self._packed(conn, b"FCALL", _LIB[2][name].encode(), keys, args)
                try:
                    return ask(step)
                except self._redis.exceptions.ResponseError as e:
                    if not self._fcall_missing(e, conn, ask):
                        raise
                if self._fcall:
                    return ask(step)  # the library is there now; the step did not run before
            sha = _SHA.get(name) or _SHA.setdefault(name, hashlib.sha1(getattr(S, name).encode()).hexdigest())
            step = self._packed(conn, b"EVALSHA", sha.encode(), keys, args)
            try:
                return ask(step)
            except self._redis.exceptions.NoScriptError:
                ask(conn.pack_command("SCRIPT", "LOAD", getattr(S, name)))  # its SHA is sha: SHA1 of the text
                return ask(step)
        except self._redis_error as e:
            raise self._fail(e) from None
        except OSError as e:
            conn.disconnect()
            raise self._down(e) from None

    def _fcall_missing(self, e: BaseException, conn: Any, ask: Any) -> bool:
        """Whether an FCALL's error says only that its function was not there
        to run (the server lost or never had the library; no FCALL or no
        FUNCTION for this server or user): the library is loaded, or this
        storage goes on with EVALSHA for good. False: the step's own error."""
        text = str(e)
        low = text.lower()
        if ("unknown command" in low and "fcall" in low) or "no permissions to run the 'fcall'" in low:
            self._fcall = False  # Redis 6.2, or FCALL denied to this user
            return True
        if not text.startswith("Function not found"):
            return False
        try:
            ask(conn.pack_command("FUNCTION", "LOAD", _LIB[1]))
        except self._redis.exceptions.ResponseError as load:
            if "already exists" not in str(load):
                self._fcall = False  # FUNCTION refused (not this user's, or no room): the scripts instead
        return True

    def _packed(self, conn: Any, cmd: bytes, target: bytes, keys: list[bytes], args: list[Any]) -> list[bytes]:
        """cmd (EVALSHA or FCALL) target keys args as the protocol's bytes
        (what conn.pack_command makes), with the head and the keys' part made
        once per target and key list: a send's 14 keys and 17 arguments cost
        ~11 us to pack one by one, on every step."""
        kt = (target, *keys)
        kp = self._kpack.get(kt)
        if kp is None:
            kp = b"$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(cmd), cmd, len(target), target) + _bulks(conn, [len(keys), *keys])
            if len(self._kpack) > 4096:
                self._kpack.clear()
            self._kpack[kt] = kp
        n = 3 + len(keys) + len(args)
        for a in args:
            if type(a) is _Packed:
                n += len(a.args) - 1
        return [b"*%d\r\n" % n + kp + _bulks(conn, args)]

    def _run_script(self, client: Any, name: str, keys: list[bytes], args: list[Any]) -> Any:
        script = self._scripts.get(name)
        if script is None:
            script = self._scripts[name] = client.register_script(getattr(S, name))
        try:
            return script(keys=keys, args=_unpacked(args))
        except self._redis_error as e:
            raise self._fail(e) from None

    def _do(self, fn: Any, *args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except self._redis_error as e:
            raise self._fail(e) from None

    def ping(self) -> bool:
        return bool(self._do(self._c().ping))

    def _ikeys(self, agent: str) -> list[bytes]:
        k = self._keys.get(agent)
        if k is None:
            p = self._pre + b":{" + agent.encode("ascii") + b"}:"
            k = [p + s for s in _INBOX]
            if len(self._keys) > 4096:
                self._keys.clear()
            self._keys[agent] = k
        return k

    def _agent(self, agent: str, role: str = "agent id") -> str:
        storage.check_agent(agent, role)
        return agent

    # -- the place itself ---------------------------------------------------------------
    def exists(self) -> bool:
        return bool(self._do(self._c().exists, self._g + b"sys"))

    def create(self) -> None:
        self._local.create()
        self._do(self._c().set, self._g + b"sys", b"1")

    def close(self) -> None:
        """Returns this process's claims to their inboxes (as the file
        backend's do once their consumer is gone) and drops the connections."""
        self._beat_stop.set()
        if self._pid == os.getpid() and self._client is not None:
            for agent, n in list(self._claims.items()):
                if n > 0:
                    try:
                        self._run("PUT_BACK", self._ikeys(agent), [self.consumer, 1])
                    except CfnError:
                        pass  # the lease lapses and recovery returns them
            self._claims.clear()
        with self._lock:
            c, self._client = self._client, None
            d, self._direct = self._direct, None
        if d and self._pid == os.getpid():
            d.disconnect()
        if c is not None:
            try:
                c.close()
            except Exception:  # noqa: BLE001 - closing a dead connection may fail any way
                pass
        self._local.close()

    def destroy(self) -> None:
        """Removes every key of this bus (its prefix) and the local base folder."""
        c = self._c()
        pattern = self._pre + b":{*"
        batch: list[bytes] = []
        for key in self._do(lambda: list(c.scan_iter(match=pattern, count=1000))):
            batch.append(key)
            if len(batch) >= 500:
                self._unlink(batch)
                batch = []
        if batch:
            self._unlink(batch)
        self.close()
        self._local.destroy()

    def _unlink(self, keys: list[bytes]) -> None:
        c = self._c()
        pipe = c.pipeline(transaction=False)
        for k in keys:
            pipe.unlink(k)
        self._do(pipe.execute)

    # -- agents -----------------------------------------------------------------------------
    def init_agent(self, agent: str, capacity: int) -> None:
        self._agent(agent)
        self._run("INIT", self._ikeys(agent), [capacity, int(time.time() * 1000)])
        self._do(self._c().set, self._g + b"sys", b"1")
        self._outbox[agent] = (True, time.monotonic())

    def remove_agent(self, agent: str) -> None:
        self._agent(agent)
        vals = self._run("REMOVE", self._ikeys(agent), list(_INBOX_COUNTERS))
        c = self._c()
        moved = [(n, int(v)) for n, v in zip(_INBOX_COUNTERS, vals) if v]
        if moved:  # the removed inbox's share of the totals stays in them
            pipe = c.pipeline(transaction=False)
            for n, v in moved:
                pipe.hincrby(self._g + b"ctr", n, v)
            self._do(pipe.execute)
        self._outbox.pop(agent, None)
        self._keys.pop(agent, None)

    def list_agents(self) -> list[str]:
        """Every inbox of the bus, cluster-wide (SCAN on every master), sorted."""
        c = self._c()
        pattern = self._pre + b":{*}:i"
        skip = len(self._pre) + 2
        out = set()
        for key in self._do(lambda: list(c.scan_iter(match=pattern, count=1000))):
            name = key[skip:-3]
            try:
                text = name.decode("ascii")
                storage.check_agent(text)
            except (CfnError, UnicodeDecodeError):
                continue
            out.add(text)
        return sorted(out)

    def list_names(self) -> list[str]:
        return self.list_agents()

    def has_inbox(self, agent: str) -> bool:
        return bool(self._do(self._c().exists, self._ikeys(self._agent(agent))[0]))

    def has_agent(self, agent: str) -> bool:
        k = self._ikeys(self._agent(agent))
        return bool(self._do(self._c().exists, k[0])) or bool(self._do(self._c().exists, k[1]))

    # -- sending ------------------------------------------------------------------------------
    def _message(self, sender: str, to: str, mtype: bytes, payload: bytes) -> tuple[_Packed, bytes]:
        """The sender, recipient and escaped type, packed (the type is
        lead.args[2]), and the payload's JSON, all checked: the ids and type
        once per (sender, recipient, type) a storage has seen pass (a bounded
        memo of str, str, bytes, so nothing else is taken for one)."""
        memo = type(sender) is str and type(to) is str and type(mtype) is bytes
        lead = self._checked.get((sender, to, mtype)) if memo else None
        if lead is None:
            storage.check_agent(sender, "sender")
            storage.check_agent(to, "recipient")
            lead = _Packed([sender, to, _escape_type(mtype)])
            if memo:
                if len(self._checked) > 4096:
                    self._checked.clear()
                self._checked[(sender, to, mtype)] = lead
        return lead, self._payload(payload)

    def _payload(self, payload: bytes) -> bytes:
        if len(payload) > self.config.max_message_bytes:
            raise PayloadTooLarge(f"payload is {len(payload)} bytes, over the limit of "
                                  f"{self.config.max_message_bytes} (MAX_MESSAGE_BYTES)")
        storage.check_json(payload)
        return payload.strip(_TRIM)

    def _metric_on(self) -> bool:
        return self.config.metrics_enabled and self._local.metrics_error is None

    def _bp_metric(self, name: str, sender: str, to: str, key: str, n: int) -> None:
        """The send loop's metric lines, in this host's METRICS_FILE (as the C loop writes them)."""
        if not self._metric_on():
            return
        tags = b'{"from":"%s","to":"%s","%s":%d}' % (sender.encode(), to.encode(), key.encode(), n)
        try:
            self._local.metrics_write(storage.metric_line(name.encode(), 1, b"count", tags), 1)
        except CfnError:
            pass

    def _has_outbox(self, sender: str) -> bool:
        """Whether the sender was initialised (has an outbox): asked at most once a second."""
        got = self._outbox.get(sender)
        now = time.monotonic()
        if got is not None and now - got[1] < 1.0:
            return got[0]
        yes = bool(self._do(self._c().exists, self._ikeys(sender)[0]))
        if len(self._outbox) > 4096:
            self._outbox.clear()
        self._outbox[sender] = (yes, now)
        return yes

    def _send_keys(self, sender: str, to: str) -> list[bytes]:
        """The inbox's keys, and after them the sender's meta and outbox keys
        when the delivering script may touch them (one server, or a sender
        in the recipient's slot): then the outbox copy is made in the same
        step as the delivery, one round trip for both."""
        keys = self._ikeys(to)
        if self.target.cluster and sender != to:
            return keys
        out = self._okeys.get((sender, to))
        if out is None:
            k = self._ikeys(sender)[0]
            out = keys + [k, k[:-1] + b"o", k[:-1] + b"ob"]
            if len(self._okeys) > 4096:
                self._okeys.clear()
            self._okeys[(sender, to)] = out
        return out

    def _copied(self, sender: str, to: str, etype: bytes, data: bytes, r: list[Any], at: int,
                high: bool = False) -> bool:
        """Whether the send's outbox copy was made: by the script itself
        (r[at] is 1 or 0, r[at + 1] the copies its bound pruned), or, when it
        could not reach the sender's keys (-1: another Cluster slot), now."""
        copied = int(r[at])
        if copied >= 0:
            if r[at + 1]:
                self.counter_add("outbox_pruned", int(r[at + 1]))
            return copied == 1
        return self._copy_out(sender, to, etype, data, r[1], int(r[2]), int(r[3]), high)

    def _copy_out(self, sender: str, to: str, etype: bytes, data: bytes, mid: bytes, seq: int, ts: int,
                  high: bool = False) -> bool:
        if not self._has_outbox(sender):
            return False
        pri = b'",\n  "priority": "high' if high else b""
        body = (b'{\n  "version": "1.1",\n  "msg_id": "%s",\n  "from": "%s",\n  "to": "%s",\n  "timestamp": %d,\n'
                b'  "sequence": %d,\n  "type": "%s%s",\n  "payload": %s,\n  "requires_ack": false\n}\n'
                % (mid, sender.encode(), to.encode(), ts, seq, etype, pri, data))
        k = self._ikeys(sender)
        pruned = self._run("OUTBOX", [k[0][:-1] + b"o", k[0][:-1] + b"ob"], [mid, body, self.config.outbox_max])
        if pruned:
            self.counter_add("outbox_pruned", int(pruned))
        return True

    def next_sequence(self, sender: str, to: str) -> int:
        """Advances sender->to's sequence as a send does (the inbox's sequence hash)."""
        self._agent(sender, "sender")
        keys = self._ikeys(self._agent(to, "recipient"))
        return int(self._do(self._c().hincrby, keys[_INBOX.index(b"s")], sender, 1))

    def deliver(self, sender: str, to: str, mtype: bytes, payload: bytes, backpressure: bool,
                deadline_ns: int = 0, high: bool = False, last_try: bool = False) -> SendResult:
        lead, data = self._message(sender, to, mtype, payload)
        etype: bytes = lead.args[2]  # type: ignore[assignment]
        keys = self._send_keys(sender, to)
        tok = os.urandom(8).hex()
        if not backpressure:
            r = self._run("DELIVER", keys, [lead, data, self._fixed, tok, self._tails[bool(high)]])
            if r[0] == 1:
                head = f", and its {int(r[4])} places of high-priority headroom" if int(r[4]) else ""
                e = InboxFull(f"inbox of '{to}' is full ({r[1]} messages{head})")
                e.set_retry_after(self._retry_after_ns(int(r[2])) / 1e9)
                raise e
            self._refused(r, to)
            copied = self._copied(sender, to, etype, data, r, 5, high)
            return SendResult(r[1].decode(), r[2], r[3], 0, 0, 0, copied, int(r[4]))
        return self._deliver_waiting(sender, to, etype, data, keys, tok, deadline_ns, high, last_try)

    @staticmethod
    def _refused(r: list[Any], to: str) -> None:
        """Raises what a DELIVER step's answer says, when it refused for want of an inbox or an open circuit."""
        if r[0] == 2:
            raise InboxNotFound(f"agent '{to}' has no inbox (run init for it first)")
        if r[0] == 3:
            e = CircuitOpen(f"circuit of '{to}' is open: sends to it fail at once for {int(r[1])} ms more")
            e.set_retry_after(int(r[1]) / 1000)
            raise e

    def _retry_after_ns(self, eta_ms: int) -> int:
        """The server's estimate of when room comes, or (nothing drained in the
        last second) the base retry wait, as the C core says it."""
        return eta_ms * 1_000_000 if eta_ms >= 0 else self._next_wait(0, 0, 0, fixed=True)[0]

    def _deliver_waiting(self, sender: str, to: str, etype: bytes, data: bytes, keys: list[bytes],
                         tok: str, deadline_ns: int, high: bool = False, last_try: bool = False) -> SendResult:
        """send_with_backpressure: the C loop's rules (retries, backoff, total
        budget, deadline), waiting on the server: a full inbox queues this
        sender's token, and a consumer that frees a place hands it to the first
        in the queue and pushes on its wake list, which this sender BLPOPs."""
        cfg = self.config
        cap = cfg.max_inbox_size
        ml = 1 if self._metric_on() else 0
        start = time.monotonic_ns()
        retries = wakeups = waited = prev = 0
        wake = keys[0][:-1] + b"k:" + tok.encode()
        margin = 2 * cfg.redis_timeout_ms + 1000
        doomed = ""  # why this send gives up at its next (final) step, when it must
        admitted = False  # its first step passed the circuit: later steps are the same send
        while True:
            left = self._budget_ns - waited
            now = time.monotonic_ns()
            if deadline_ns and now >= deadline_ns and not doomed:
                doomed = f"inbox of '{to}' stayed full until the send's deadline ({(now - start) // 1_000_000} ms, " \
                         f"{retries} retries)"
            final = retries >= cfg.backpressure_max_retries or (self._timed and left <= 0) or bool(doomed) \
                or last_try
            wait_left = left if not deadline_ns else min(left, deadline_ns - now)
            r = self._run("DELIVER", keys, [sender, to, etype, data, tok, cap, 1, 1 if final else 0,
                                            max(0, wait_left) // 1_000_000 + margin, self._ttl, ml, tok,
                                            self._cb, 1 if admitted else 0, 0 if doomed else 1,
                                            1 if high else 0, cfg.outbox_max])
            admitted = True
            if r[0] == 0:
                self._bp_metric("backpressure.send.success", sender, to, "retries", retries)
                if r[4]:
                    self._bp_metric("circuit.closed", sender, to, "retries", retries)
                copied = self._copied(sender, to, etype, data, r, 5, high)
                return SendResult(r[1].decode(), r[2], r[3], retries, wakeups, waited, copied, int(r[4]))
            self._refused(r, to)
            eta = int(r[2]) * 1_000_000 if int(r[2]) >= 0 else -1
            if final:
                self._bp_metric("backpressure.send.failure", sender, to, "retries", retries)
                e = BackpressureTimeout(doomed or f"inbox of '{to}' stayed full after {retries} retries "
                                        f"({(time.monotonic_ns() - start) // 1_000_000} ms)")
                e.retries, e.waited_ns, e.deadline, e.circuit = retries, waited, bool(doomed), int(r[3])
                if e.circuit:
                    self._bp_metric("circuit.opened", sender, to, "retries", retries)
                e.set_retry_after(self._retry_after_ns(int(r[2])) / 1e9)
                raise e
            w, prev = self._next_wait(retries, prev, left if self._timed else 0)
            if deadline_ns:
                # a wait that cannot end before the deadline is not started (the C loop's rule)
                dl_left = deadline_ns - time.monotonic_ns()
                expect = eta if eta >= 0 else w
                if expect > dl_left:
                    doomed = (f"inbox of '{to}' cannot have room before the send's deadline (room expected in "
                              f"{expect // 1_000_000} ms, {max(0, dl_left) // 1_000_000} ms left)")
                    continue
                w = min(w, dl_left)
            self._bp_metric("backpressure.wait", sender, to, "retry", retries + wakeups + 1)
            if w <= 0:
                retries += 1  # BACKPRESSURE_WAIT_MS=0: retry at once, as the original
                continue
            woke, spent = self._block(wake, w)
            waited += spent
            if woke:
                wakeups += 1
            else:
                retries += 1

    def _next_wait(self, retries: int, prev: int, left: int, fixed: bool = False) -> tuple[int, int]:
        """The next wait in ns and the new ``prev`` (the C core's next_wait_ns)."""
        cfg = self.config
        base_ms = cfg.backpressure_wait_ms
        rs = self.rate_read()
        if rs is not None and 0 < rs.wait_ms <= 3_600_000 and \
                storage.rate_fresh(rs, int(cfg.rate_limit_check_interval * 3000), time.time_ns()):
            base_ms = rs.wait_ms
        base = w = base_ms * 1_000_000
        if fixed:
            pass
        elif cfg.backpressure_backoff == "exponential":
            w = base << min(retries, 40)
        elif cfg.backpressure_backoff == "decorrelated" and base > 0:
            hi = min(prev * 3 if prev > 0 else base, base * 32)
            w = base + int.from_bytes(os.urandom(8), "little") % (hi - base + 1) if hi > base else base
            prev = w
        return (min(w, left) if left else w), prev

    def _block(self, key: bytes, wait_ns: int) -> tuple[bool, int]:
        """Waits on the server for a wake on ``key`` (BLPOP), up to wait_ns:
        True when woken. The wait's end is timed here, not by the server
        (which checks blocked clients' timeouts only hz times a second): past
        it the connection is closed, which ends the BLPOP on the server. A wake
        lost that way loses nothing: the reservation it announced stays.
        Returns whether it was woken, and the ns spent waiting."""
        c = self._c()
        try:
            if self.target.cluster:
                pool = c.get_redis_connection(c.get_node_from_key(key)).connection_pool
            else:
                pool = c.connection_pool
            conn = pool.get_connection()
        except self._redis_error as e:
            raise self._fail(e) from None
        secs = wait_ns / 1e9
        try:
            conn.send_command("BLPOP", key, int(secs) + 2)
            t0 = time.monotonic_ns()
            if conn.can_read(timeout=secs):
                return conn.read_response() is not None, time.monotonic_ns() - t0
            spent = time.monotonic_ns() - t0
            conn.disconnect()
            return False, spent
        except self._redis_error as e:
            conn.disconnect()
            raise self._fail(e) from None
        finally:
            pool.release(conn)

    def deliver_many(self, sender: str, to: str, mtype: bytes, payloads: list[bytes],
                     backpressure: bool, high: bool = False) -> list[Union[SendResult, CfnError]]:
        """Each payload's SendResult, or the error that refused it, in order.
        As many as fit go in one server step per batch; the rest wait as
        deliver does, one by one, until room comes."""
        out: list[Union[SendResult, CfnError, None]] = [None] * len(payloads)
        try:
            storage.check_agent(sender, "sender")
            storage.check_agent(to, "recipient")
            etype = _escape_type(mtype)
        except CfnError as e:
            return [e] * len(payloads)
        todo: list[tuple[int, bytes]] = []
        for i, p in enumerate(payloads):
            try:
                todo.append((i, self._payload(p)))
            except CfnError as e:
                out[i] = e
        keys = self._send_keys(sender, to)
        cap = self.config.max_inbox_size
        pos = 0
        while pos < len(todo):
            chunk: list[tuple[int, bytes, str]] = []
            size = 0
            rnd = os.urandom(8 * min(_BATCH, len(todo) - pos)).hex()  # each msg_id's 16 hex digits
            while pos + len(chunk) < len(todo) and len(chunk) < _BATCH and size < _BATCH_BYTES:
                i, d = todo[pos + len(chunk)]
                k = 16 * len(chunk)
                chunk.append((i, d, rnd[k:k + 16]))
                size += len(d)
            args: list[Any] = [sender, to, etype, cap, self._ttl, self._cb, 1 if high else 0, self.config.outbox_max]
            for _, d, h in chunk:
                args += [h, d]
            try:
                r = self._run("DELIVER_MANY", keys, args)
            except CfnError as e:
                for i, _, _ in chunk:
                    out[i] = e
                pos += len(chunk)
                continue
            if r[0] < 0:
                refused: CfnError = InboxNotFound(f"agent '{to}' has no inbox (run init for it first)")
                if r[0] == -2:
                    try:
                        self._refused([3, r[1]], to)
                    except CircuitOpen as e:
                        refused = e
                for i, _ in todo[pos:]:
                    out[i] = refused
                break
            n = int(r[0])
            inline, pruned = int(r[2 + 3 * n]), int(r[3 + 3 * n])
            if pruned:
                self.counter_add("outbox_pruned", pruned)
            for j in range(n):
                i, d, _ = chunk[j]
                mid, seq, ts = r[2 + 3 * j], int(r[3 + 3 * j]), int(r[4 + 3 * j])
                copied = inline == 1 if inline >= 0 else self._copy_out(sender, to, etype, d, mid, seq, ts, high)
                out[i] = SendResult(mid.decode(), seq, ts, 0, 0, 0, copied, int(r[1]) if j == 0 else 0)
            pos += n
            if n < len(chunk):  # full: the next one waits (or fails) as a single send does
                i, d = todo[pos]
                try:
                    out[i] = self.deliver(sender, to, mtype, d, backpressure, 0, high)
                except CfnError as e:
                    out[i] = e
                pos += 1
        return [x if x is not None else CfnError("not sent") for x in out]

    # -- counting ------------------------------------------------------------------------------
    def size(self, agent: str) -> int:
        r = self._run("SIZE", self._ikeys(self._agent(agent)), [])
        return int(r[1])

    def capacity(self, agent: str, own: int) -> int:
        cap = int(self._run("CAPACITY", self._ikeys(self._agent(agent)), [own]))
        return cap or own

    def count_files(self, agent: str, box: str) -> int:
        if box not in ("inbox", "outbox"):
            raise InvalidArgument(f"box must be 'inbox' or 'outbox', not {box!r}")
        k = self._ikeys(self._agent(agent))
        key = k[1] if box == "inbox" else k[0][:-1] + b"o"
        return int(self._do(self._c().zcard, key))

    def reconcile(self, agent: str, force: bool) -> ReconcileResult:
        r = self._run("RECONCILE", self._ikeys(self._agent(agent)), [1 if force else 0, self._ttl])
        if r[0] < 0:
            raise InboxNotFound(f"agent '{agent}' has no inbox")
        n = int(r[0])
        return ReconcileResult(n, int(r[1]), int(r[2]), n, 0, int(r[3]), True)

    def slots(self, reuse: bool = False) -> list[SlotInfo]:
        """Every inbox of the bus with its count, capacity and waiting senders."""
        agents = self.list_agents()
        if not agents:
            return []
        pipe = self._c().pipeline(transaction=False)
        for a in agents:
            k = self._ikeys(a)
            pipe.hmget(k[0], "cap", "rec")
            pipe.zcard(k[1])
            pipe.hlen(k[4])
            pipe.llen(k[8])
        got = self._do(pipe.execute)
        out = []
        for j, a in enumerate(agents):
            meta, q, c, w = got[4 * j: 4 * j + 4]
            if meta[0] is None:
                continue  # removed since the listing
            out.append(SlotInfo(a, int(q) + int(c), int(meta[0]), int(w), int(meta[1] or 0) * 1_000_000))
        return out

    def sweep(self) -> int:
        return 0  # nothing to free: a removed inbox's keys went with it

    # -- reading -------------------------------------------------------------------------------------
    @staticmethod
    def _records(r: list[Any]) -> list[Record]:
        out = []
        for j in range(int(r[0])):
            mid, data = r[1 + 2 * j], r[2 + 2 * j]
            if data is None:
                continue
            out.append(Record(mid + b".json", storage.exact_flags(data), data))
        return out

    def read(self, agent: str, mode: int, max_messages: int, max_bytes: int) -> tuple[list[Record], int]:
        keys = self._ikeys(self._agent(agent))
        if mode == storage.READ_PEEK:
            r = self._run("PEEK", keys, [])
        else:
            claim = mode == storage.READ_CLAIM
            self._c()
            ttl = self.config.claim_timeout_ms if claim else self._ttl
            r = self._run("READ", keys, [max_messages, self.consumer, ttl, 1 if claim else 0,
                                         self.config.priority_ratio])
        if r[0] < 0:
            raise InboxNotFound(f"agent '{agent}' has no inbox (run init for it first)")
        recs = self._records(r)
        if mode == storage.READ_CLAIM and recs:
            with self._lock:
                self._claims[agent] = self._claims.get(agent, 0) + len(recs)
            self._heartbeat()
        elif mode == storage.READ_NEXT:
            self._reads[(threading.get_ident(), agent)] = [x.name[:-5] for x in recs]
        return recs, 0

    def take(self, agent: str, where: int, names: list[bytes]) -> tuple[list[bool], Optional[CfnError]]:
        keys = self._ikeys(self._agent(agent))
        ids = [n[:-5] if n.endswith(b".json") else n for n in names]
        claims = where == storage.FROM_CLAIMS
        read = [] if claims else self._reads.pop((threading.get_ident(), agent), [])
        if read:
            named = set(ids)
            rel = [x for x in read if x not in named]  # read by this thread but not taken: released
        else:
            rel = []
        if not ids and not rel:
            return [], None
        self._c()
        r = self._run("TAKE", keys, [self.consumer, 1 if claims else 0, self._ttl, self._adapt, len(rel), *rel,
                                     *ids])
        if r and r[0] == -1 and len(ids) + len(rel) > 0 and len(r) == 1 and ids:
            raise InboxNotFound(f"agent '{agent}' has no inbox")
        taken = [bool(x) for x in r]
        if claims:
            with self._lock:
                left = self._claims.get(agent, 0) - sum(taken)
                if left > 0:
                    self._claims[agent] = left
                else:
                    self._claims.pop(agent, None)
        return taken, None

    def put_back(self, agent: str, names: list[bytes]) -> int:
        ids = [n[:-5] if n.endswith(b".json") else n for n in names]
        if not ids:
            return 0
        self._c()
        n = int(self._run("PUT_BACK", self._ikeys(self._agent(agent)), [self.consumer, 0, *ids]))
        with self._lock:
            left = self._claims.get(agent, 0) - n
            if left > 0:
                self._claims[agent] = left
            else:
                self._claims.pop(agent, None)
        return n

    def arrivals(self, agent: str) -> int:
        n = int(self._run("ARRIVE", self._ikeys(self._agent(agent)), ["look"]))
        if n < 0:
            raise InboxNotFound(f"agent '{agent}' has no inbox (run init for it first)")
        return n

    def wait_arrival(self, agent: str, seen: int, timeout_ns: int) -> bool:
        """Blocks on the server (BLPOP on the inbox's arrival list, pushed by
        each delivery while consumers wait), timed here as a waiting sender's is."""
        keys = self._ikeys(self._agent(agent))
        if int(self._run("ARRIVE", keys, ["enter", seen])):
            return True
        try:
            deadline = None if timeout_ns < 0 else time.monotonic_ns() + timeout_ns
            while True:
                left = 3_600_000_000_000 if deadline is None else deadline - time.monotonic_ns()
                if left <= 0:
                    return self.arrivals(agent) != seen
                woke, _ = self._block(keys[0][:-1] + b"ar", min(left, 1_000_000_000))
                if woke or self.arrivals(agent) != seen:
                    return True
        finally:
            try:
                self._run("ARRIVE", keys, ["leave"])
            except CfnError:
                pass  # the count only wakes a consumer more often

    def quarantine(self, agent: str, where: int, names: list[bytes]) -> int:
        ids = [n[:-5] if n.endswith(b".json") else n for n in names]
        if not ids:
            return 0
        return int(self._run("QUARANTINE", self._ikeys(self._agent(agent)),
                             [1 if where == storage.FROM_CLAIMS else 0, *ids]))

    def clear(self, agent: str) -> int:
        n = int(self._run("CLEAR", self._ikeys(self._agent(agent)), [self._ttl]))
        return max(n, 0)

    # -- claims' leases ----------------------------------------------------------------------------------
    def _heartbeat(self) -> None:
        """Keeps renewing this consumer's leases while it holds claims."""
        if self._beat is not None and self._beat.is_alive():
            return
        with self._lock:
            if self._beat is not None and self._beat.is_alive():
                return
            self._beat_stop = threading.Event()
            self._beat = threading.Thread(target=self._renew_loop, args=(self._beat_stop,), daemon=True,
                                          name="cfn-fast-claims")
            self._beat.start()

    def _renew_loop(self, stop: threading.Event) -> None:
        lease = self.config.claim_timeout_ms
        while not stop.wait(lease / 3000):
            with self._lock:
                held = [a for a, n in self._claims.items() if n > 0]
            if not held:
                return
            for a in held:
                try:
                    if not self._run("RENEW", self._ikeys(a), [self.consumer, lease]):
                        with self._lock:
                            self._claims.pop(a, None)  # lapsed and recovered: they are someone else's now
                except CfnError:
                    pass  # the server is away; try again next beat

    # -- state shared by every process -----------------------------------------------------------------
    def counter_add(self, name: str, delta: int = 1) -> None:
        if name not in storage.COUNTERS:
            raise InvalidArgument(f"no shared counter {name!r}")
        self._do(self._c().hincrby, self._g + b"ctr", name, delta)

    def counters(self) -> dict[str, int]:
        """Every shared counter, cluster-wide: the global hash plus each inbox's share."""
        got = self._do(self._c().hgetall, self._g + b"ctr")
        out = {name: 0 for name in storage.COUNTERS}
        for k, v in got.items():
            name = k.decode()
            if name in out:
                out[name] += int(v)
        agents = self.list_agents()
        if agents:
            pipe = self._c().pipeline(transaction=False)
            for a in agents:
                pipe.hmget(self._ikeys(a)[0], *_INBOX_COUNTERS)
            for vals in self._do(pipe.execute):
                for name, v in zip(_INBOX_COUNTERS, vals):
                    if v is not None:
                        out[name] += int(v)
        return out

    def rate_publish(self, s: RateSettings) -> None:
        self._do(self._c().hset, self._g + b"rate", mapping=s._asdict())

    def rate_read(self) -> Optional[RateSettings]:
        got = self._do(self._c().hgetall, self._g + b"rate")
        if not got:
            return RateSettings(0, 0, 0, 0, 0)
        f = {k.decode(): int(v) for k, v in got.items()}
        return RateSettings(*(f.get(n, 0) for n in RateSettings._fields))

    def cooldown_try(self, key: bytes, now_ns: int, cooldown_ns: int) -> Optional[bool]:
        if cooldown_ns <= 0:
            return True
        return bool(self._run("COOLDOWN", [self._g + b"cd:" + key.hex().encode(), self._g + b"ctr"],
                              [max(1, cooldown_ns // 1_000_000)]))

    # -- flow control ----------------------------------------------------------------------------------
    def circuit(self, agent: str) -> CircuitInfo:
        r = self._run("CIRCUIT", self._ikeys(self._agent(agent)), [])
        states = ("closed", "open", "half-open")
        return CircuitInfo(states[int(r[0])], int(r[1]), int(r[2]) if r[0] == 2 else 0,
                           int(r[3]) if r[0] == 2 else 0, int(r[4]) / 1000, int(r[5]))

    def flow(self, agent: str) -> storage.FlowInfo:
        r = self._run("FLOW", self._ikeys(self._agent(agent)), [])
        if r[0] == -1:
            return storage.FlowInfo(-1, 0, 0, 0.0, 0, 0, 0)
        return storage.FlowInfo(int(r[0]), int(r[1]), int(r[2]), int(r[3]) / 1000, int(r[4]), int(r[5]), int(r[6]))

    def top_senders(self, agent: str) -> list[storage.SenderShare]:
        r = self._run("SENDERS", self._ikeys(self._agent(agent)), [])
        return storage.shares([(r[j].decode(), int(r[j + 1])) for j in range(0, len(r), 2)])

    def circuit_reset(self, agent: str) -> str:
        return ("closed", "open", "half-open")[int(self._run("CIRCUIT_RESET", self._ikeys(self._agent(agent)), []))]

    # -- telemetry files: this host's -------------------------------------------------------------------
    def metrics_write(self, data: bytes, nlines: int) -> bool:
        ok = self._local.metrics_write(data, nlines)
        if ok and nlines:
            self.counter_add("metrics", nlines)
        return ok

    def open_log(self, path: str) -> int:
        return self._local.open_log(path)

    def open_log_read(self, path: str) -> Optional[int]:
        return self._local.open_log_read(path)


__all__ = ["RedisStorage", "Target"]
