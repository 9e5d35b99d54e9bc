"""MessageBus: the bash original's message-bus and rate-limiting functions,
over one base folder, backed by the C core.

Storage sits behind the compiled handle (``_core``): the folder layout, the
shared counters and the send loop. Everything here is argument handling,
configuration and turning message files into dicts.
"""
from __future__ import annotations

import errno
import os
import threading
from typing import Any, Iterable, Optional, Union

from cfn_fast import _core
from cfn_fast.config import Config
from cfn_fast.errors import (
    BackpressureTimeout,
    CfnError,
    CfnOSError,
    InboxNotFound,
    InvalidArgument,
    InvalidMessageType,
    InvalidPayload,
)

Payload = Union[str, bytes, bytearray, dict, list, int, float, bool, None]
Message = dict[str, Any]

# A message file holds the payload plus ~300 bytes of envelope; allow for escaping headroom.
_ENVELOPE_BYTES = 64 * 1024
_INT_DIGITS = 4300  # Python's default limit for int(str); C refuses longer integers at send


def _exact_int(text: str) -> int:
    """An integer literal of any length (Python's int() stops at 4,300 digits)."""
    if len(text) <= _INT_DIGITS:
        return int(text)
    from decimal import Decimal

    return int(Decimal(text))


def _exact_float(text: str) -> Any:
    """A float, or, for a number beyond a double's range (1e400), the exact
    decimal.Decimal: never infinity, which no JSON writer can give back."""
    value = float(text)
    if value in (float("inf"), float("-inf")):
        from decimal import Decimal

        return Decimal(text)
    return value


def decode_message(data: bytes, flags: int = 0) -> Message:
    """One message file's bytes (checked by C as one JSON object) as a dict.
    ``flags`` (from C) says when numbers need the exact decoders."""
    import json

    if flags & _core.JSON_EXACT:
        return json.loads(data, parse_int=_exact_int, parse_float=_exact_float)
    return json.loads(data)


def encode_payload(payload: Payload) -> bytes:
    """JSON text (str/bytes) passes as it is (C checks it); other values are serialised."""
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, bytearray):
        return bytes(payload)
    if isinstance(payload, str):
        try:
            return payload.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InvalidPayload(f"payload is not valid Unicode text: {e.reason}") from None
    import json

    try:
        return json.dumps(payload, allow_nan=False, separators=(",", ":"), ensure_ascii=False).encode()
    except (TypeError, ValueError) as e:
        raise InvalidPayload(f"payload cannot be serialised as strict JSON: {e}") from None


def encode_type(msg_type: object) -> bytes:
    if not isinstance(msg_type, str):
        raise InvalidMessageType(f"message type must be a str, not {type(msg_type).__name__}")
    try:
        return msg_type.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidMessageType("message type is not valid Unicode text") from None


class MessageBus:
    """One base folder of agent inboxes.

    ``MessageBus()`` uses ``Config.from_env()``; ``MessageBus(base_dir)``
    overrides MESSAGE_BASE_DIR. Methods are safe to call from many threads.
    """

    def __init__(self, base_dir: Optional[Union[str, os.PathLike[str]]] = None,
                 config: Optional[Config] = None) -> None:
        cfg = config if config is not None else Config.from_env()
        if base_dir is not None:
            cfg = cfg.replace(base_dir=os.fspath(base_dir))
        self.config: Config = cfg
        self.base_dir: str = cfg.base_dir
        self._handle: Optional[_core.Handle] = None
        self._lock = threading.Lock()
        # claimed files whose name is not "<msg_id>.json" (written by other tools): msg_id -> name
        self._claimed_names: dict[str, bytes] = {}
        self.metrics_error: Optional[CfnError] = None
        common = dict(
            capacity=cfg.max_inbox_size,
            wait_ms=cfg.backpressure_wait_ms,
            max_total_ms=cfg.backpressure_max_total_ms,
            max_payload=cfg.max_message_bytes,
            stale_after_ms=int(cfg.rate_limit_check_interval * 3000),
            outbox_max=getattr(cfg, "outbox_max", 1000),
            backoff=_core.BACKOFF_CODES[cfg.backpressure_backoff],
            fsync=1 if cfg.fsync else 0,
            file_mode=cfg.file_mode,
            dir_mode=cfg.dir_mode,
        )
        self._plain_opts = _core.new_send_opts(max_retries=-1, **common)
        self._bp_opts = _core.new_send_opts(max_retries=cfg.backpressure_max_retries, **common)
        self._max_file = cfg.max_message_bytes + _ENVELOPE_BYTES

    # -- the handle ----------------------------------------------------------
    def _bus(self, create: bool = False) -> Optional[_core.Handle]:
        """The mapped state, opened on first use. Without ``create``, a base
        folder that does not exist yet gives None (nothing is made by a read)."""
        h = self._handle
        if h is not None:
            return h
        with self._lock:
            if self._handle is None:
                try:
                    self._handle = _core.open_bus(self.base_dir, create, self.config.dir_mode, self.config.group,
                                                  getattr(self.config, "lock_timeout_ms", 10000))
                except CfnOSError as e:
                    if create or e.errno != errno.ENOENT:
                        raise
                    return None
                self._on_open(self._handle)
            return self._handle

    def _on_open(self, handle: _core.Handle) -> None:
        """Gives the C core METRICS_FILE: the send loop's backpressure metrics
        and telemetry's lines share one writer, which rotates the file past
        METRICS_MAX_BYTES. A file the trust rule refuses (a FIFO, a symlink,
        another user's) or that cannot be opened turns metrics off for this
        bus, and nothing else: sends go on; ``metrics_error`` says why."""
        cfg = self.config
        if cfg.metrics_enabled and self.metrics_error is None:
            try:
                _core.set_metrics(handle, cfg.metrics_file, cfg.metrics_max_bytes, cfg.file_mode, cfg.group)
            except CfnError as e:
                self.metrics_error = e

    def metrics_handle(self) -> Optional[_core.Handle]:
        """The handle metric lines are written through (opening the bus, and
        creating its base folder, on first use); None when metrics are off
        (CFN_METRICS=0). Raises ``metrics_error`` when METRICS_FILE was refused."""
        if not self.config.metrics_enabled:
            return None
        h = self._bus(create=True)
        e = self.metrics_error
        if e is not None:
            raise type(e)(*e.args)  # a fresh one: re-raising e would grow its traceback each time
        return h

    def _need(self, agent: bytes) -> _core.Handle:
        h = self._bus()
        if h is None:
            raise InboxNotFound(f"agent '{agent.decode()}' has no inbox (base folder {self.base_dir} does not exist)")
        return h

    def close(self) -> None:
        """Releases the folders and the mapped state once calls in flight in
        other threads have returned (a call starting meanwhile raises
        BusClosed). A later call opens the bus again."""
        with self._lock:
            h, self._handle = self._handle, None
            if h is not None:
                # waits for the calls in flight (they hold h, so it is not freed under
                # them), then closes METRICS_FILE and the mapping
                _core.close_bus(h)

    def __enter__(self) -> "MessageBus":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"MessageBus({self.base_dir!r})"

    # -- message bus ---------------------------------------------------------
    def init_message_bus_system(self) -> None:
        """Creates the base folder (0700) and its shared state file."""
        self._bus(create=True)

    def cleanup_message_bus_system(self) -> None:
        """Removes the base folder and everything in it."""
        self.close()
        _rmtree(self.base_dir)

    def init_message_bus(self, agent_id: str) -> None:
        """Creates the agent's inbox and outbox. Idempotent."""
        agent = _core.agent_bytes(agent_id)
        h = self._bus(create=True)
        _core.init_agent(h, agent, self.config.max_inbox_size)

    def cleanup_message_bus(self, agent_id: str) -> None:
        """Removes the agent's folder and every message in it."""
        agent = _core.agent_bytes(agent_id)
        _core.check_agent(agent)  # before any path is built from it: "" or ".." must not reach rmtree
        h = self._bus()
        if h is None:
            return
        _rmtree(os.path.join(self.base_dir, agent_id))
        _core.forget_agent(h, agent)

    def send_message(self, from_agent: str, to_agent: str, msg_type: str, payload: Payload) -> str:
        """Delivers one message; raises InboxFull at once when the inbox is full."""
        return self._send(from_agent, to_agent, msg_type, payload, self._plain_opts).msg_id

    def send_with_backpressure(self, from_agent: str, to_agent: str, msg_type: str,
                               payload: Payload) -> str:
        """Delivers one message, waiting for room while the inbox is full;
        raises BackpressureTimeout after the last retry."""
        return self.deliver(from_agent, to_agent, msg_type, payload).msg_id

    def deliver(self, from_agent: str, to_agent: str, msg_type: str, payload: Payload,
                backpressure: bool = True) -> _core.SendResult:
        """send_with_backpressure (or, with backpressure=False, send_message),
        returning what happened: msg_id, sequence, timestamp, retries, wakeups,
        waited_ns and outbox_copied."""
        if not backpressure:
            return self._send(from_agent, to_agent, msg_type, payload, self._plain_opts)
        try:
            return self._send(from_agent, to_agent, msg_type, payload, self._bp_opts)
        except BackpressureTimeout as e:
            if not e.locked:  # a locked inbox is not an overflow: the error says who holds it
                self._on_backpressure_failure(from_agent, to_agent, e.retries)
            raise

    def _on_backpressure_failure(self, from_agent: str, to_agent: str, retries: int) -> None:
        """The C loop has written the backpressure.send.failure metric; the
        inbox_overflow alert (one per cooldown per recipient) is the telemetry layer's."""
        from cfn_fast import telemetry

        telemetry.alert_backpressure_failure(self, from_agent, to_agent, retries)

    def _send(self, from_agent: str, to_agent: str, msg_type: str, payload: Payload,
              opts: Any) -> _core.SendResult:
        sender = _core.agent_bytes(from_agent, "sender")
        to = _core.agent_bytes(to_agent, "recipient")
        data = encode_payload(payload)
        mtype = encode_type(msg_type)
        return _core.send(self._need(to), sender, to, mtype, data, opts)

    def receive_messages(self, agent_id: str) -> list[Message]:
        """Every message in the inbox, oldest first; removes nothing."""
        agent = _core.agent_bytes(agent_id)
        recs, bad = _core.read_messages(self._need(agent), agent, _core.READ_PEEK, -1, self._max_file)
        return self._decoded(agent_id, _core.FROM_INBOX, recs, bad)[0]

    def receive_raw(self, agent_id: str) -> list[bytes]:
        """Every message file's bytes (each one JSON object, as written), oldest first."""
        agent = _core.agent_bytes(agent_id)
        recs, bad = _core.read_messages(self._need(agent), agent, _core.READ_PEEK, -1, self._max_file)
        if bad:
            self._on_quarantine(agent_id, bad)
        return [r.data for r in recs]

    def consume_messages(self, agent_id: str, max_messages: Optional[int] = None) -> list[Message]:
        """Takes up to max_messages (all when None), oldest first. Each message
        goes to exactly one caller, however many consume at once. A message is
        deleted only once it is decoded here; if anything fails first, it stays
        in the inbox, counted."""
        agent = _core.agent_bytes(agent_id)
        n = _max_arg(max_messages)
        if n == 0:
            return []
        h = self._need(agent)
        recs, bad = _core.read_messages(h, agent, _core.READ_NEXT, n, self._max_file)
        messages, names = self._decoded(agent_id, _core.FROM_INBOX, recs, bad)
        return self._take(h, agent_id, agent, messages, names)

    def consume_raw(self, agent_id: str, max_messages: Optional[int] = None) -> list[bytes]:
        """consume_messages without decoding: each message file's bytes, as
        written (one JSON object each, checked by C), for callers that parse
        themselves or pass the text on."""
        agent = _core.agent_bytes(agent_id)
        n = _max_arg(max_messages)
        if n == 0:
            return []
        h = self._need(agent)
        recs, bad = _core.read_messages(h, agent, _core.READ_NEXT, n, self._max_file)
        if bad:
            self._on_quarantine(agent_id, bad)
        return self._take(h, agent_id, agent, [r.data for r in recs], [r.name for r in recs])

    def _take(self, h: _core.Handle, agent_id: str, agent: bytes, items: list[Any],
              names: list[bytes]) -> list[Any]:
        taken, failure = _core.take(h, agent, _core.FROM_INBOX, names)
        if failure is not None:
            self._on_take_error(agent_id, failure)
        return [item for item, ok in zip(items, taken) if ok]

    def claim_messages(self, agent_id: str, max_messages: Optional[int] = None) -> list[Message]:
        """At-least-once: moves up to max_messages (all when None), oldest
        first, into this bus's claim folder and returns them. They still count
        against capacity until ``ack_messages``; if this process dies first
        (or the bus is closed), the next reconcile puts them back in the inbox."""
        agent = _core.agent_bytes(agent_id)
        n = _max_arg(max_messages)
        if n == 0:
            return []
        h = self._need(agent)
        recs, bad = _core.read_messages(h, agent, _core.READ_CLAIM, n, self._max_file)
        try:
            messages, names = self._decoded(agent_id, _core.FROM_CLAIMS, recs, bad)
        except BaseException:
            _core.put_back(h, agent, [r.name for r in recs])  # nobody got them: back to the inbox
            raise
        for m, name in zip(messages, names):
            mid = m.get("msg_id")
            if isinstance(mid, str) and name != mid.encode("utf-8", "surrogateescape") + b".json":
                self._claimed_names[mid] = name
        return messages

    def ack_messages(self, agent_id: str, msg_ids: Iterable[Union[str, Message]]) -> int:
        """Deletes claimed messages for good (ids, or the dicts claim returned); returns how many."""
        agent = _core.agent_bytes(agent_id)
        names = []
        for m in msg_ids:
            mid = m.get("msg_id") if isinstance(m, dict) else m
            if not isinstance(mid, str) or not mid or "/" in mid or "\0" in mid:
                raise InvalidArgument(f"not a message id: {mid!r}")
            name = self._claimed_names.pop(mid, None)
            names.append(name if name is not None else mid.encode("utf-8", "surrogateescape"))
        if not names:
            return 0
        taken, failure = _core.take(self._need(agent), agent, _core.FROM_CLAIMS, names)
        if failure is not None:
            raise failure
        return sum(taken)

    def recover(self, agent_id: Optional[str] = None) -> int:
        """Returns messages claimed by dead consumers to their inboxes (one
        agent, or every agent of the base folder); returns how many."""
        agents = [agent_id] if agent_id is not None else self.list_agents()
        total = 0
        for a in agents:
            try:
                total += self.reconcile(a, force=True).recovered
            except InboxNotFound:
                if agent_id is not None:
                    raise
        return total

    def list_agents(self) -> list[str]:
        """Agents of the base folder that have an inbox, sorted."""
        try:
            names = os.listdir(self.base_dir)
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            if name.startswith("."):
                continue
            try:
                _core.check_agent(name.encode("ascii", "replace"))
            except Exception:
                continue
            inbox = os.path.join(self.base_dir, name, "inbox")
            if os.path.isdir(inbox) and not os.path.islink(inbox) and not os.path.islink(
                    os.path.join(self.base_dir, name)):
                out.append(name)
        return sorted(out)

    def _decoded(self, agent_id: str, where: int, recs: list[_core.Record],
                 bad: int) -> tuple[list[Message], list[bytes]]:
        """The records as dicts, with their names. One this decoder refuses
        (C passed it, so only a file written by another tool) is quarantined,
        never lost; an error that is not the file's fault (MemoryError)
        propagates with nothing taken."""
        messages: list[Message] = []
        names: list[bytes] = []
        poison: list[bytes] = []
        for r in recs:
            try:
                messages.append(decode_message(r.data, r.flags))
            except (ValueError, RecursionError):
                poison.append(r.name)
                continue
            names.append(r.name)
        if poison:
            agent = _core.agent_bytes(agent_id)
            bad += _core.quarantine(self._need(agent), agent, where, poison)
        if bad:
            self._on_quarantine(agent_id, bad)
        return messages, names

    def _on_take_error(self, agent_id: str, failure: Exception) -> None:
        """A message could not be deleted after it was read (EIO, say): it stays
        in the inbox, counted, and comes again; say so once per cooldown."""
        from cfn_fast import telemetry

        try:
            telemetry.emit_alert(
                "consume_error", f"a message in the inbox of {agent_id} could not be taken and stays: {failure}",
                severity="warning", metadata={"agent": agent_id}, bus=self)
        except (CfnError, OSError):
            pass

    def _on_quarantine(self, agent_id: str, count: int) -> None:
        """Bad message files (not JSON, symlinks, not regular files) were moved to
        <agent>/.quarantine: say so once per cooldown, never silently."""
        from cfn_fast import telemetry

        telemetry.emit_alert(
            "message_quarantined",
            f"{count} bad message file(s) in the inbox of {agent_id} moved to "
            f"{os.path.join(self.base_dir, agent_id, '.quarantine')}",
            severity="warning",
            metadata={"agent": agent_id, "count": count},
            bus=self,
        )

    def clear_inbox(self, agent_id: str) -> int:
        """Deletes every message in the inbox; returns how many."""
        agent = _core.agent_bytes(agent_id)
        h = self._bus()
        if h is None:
            return 0
        try:
            return _core.clear_inbox(h, agent)
        except InboxNotFound:
            return 0

    def message_count(self, agent_id: str, box: str = "inbox") -> int:
        """Counts *.json files by a directory scan (authoritative); 0 when missing."""
        agent = _core.agent_bytes(agent_id)
        if box not in ("inbox", "outbox"):
            raise InvalidArgument(f"box must be 'inbox' or 'outbox', not {box!r}")
        h = self._bus()
        return 0 if h is None else _core.scan_count(h, agent, box.encode())

    # -- capacity ------------------------------------------------------------
    def get_inbox_size(self, agent_id: str) -> int:
        """Messages in the inbox (with sends in flight), from the shared counter: O(1)."""
        agent = _core.agent_bytes(agent_id)
        h = self._bus()
        return 0 if h is None else _core.inbox_size(h, agent)

    def get_inbox_capacity(self, agent_id: str) -> int:
        """The capacity that holds for the inbox: the MAX_INBOX_SIZE recorded
        when it was made (or by its first sender), else this bus's."""
        agent = _core.agent_bytes(agent_id)
        h = self._bus()
        fallback = self.config.max_inbox_size
        return fallback if h is None else _core.inbox_capacity(h, agent, fallback)

    def check_inbox_capacity(self, agent_id: str) -> bool:
        """True when the inbox has room (or does not exist yet)."""
        return self.get_inbox_size(agent_id) < self.get_inbox_capacity(agent_id)

    def get_inbox_utilization(self, agent_id: str) -> int:
        """size * 100 // capacity, as the original."""
        return self.get_inbox_size(agent_id) * 100 // self.get_inbox_capacity(agent_id)

    def reconcile(self, agent_id: str, force: bool = True) -> _core.ReconcileResult:
        """Sets the inbox's counter from a directory scan; with force, also
        returns claims of dead consumers and removes stale temporary files."""
        agent = _core.agent_bytes(agent_id)
        return _core.reconcile(self._need(agent), agent, force)


def _max_arg(max_messages: Optional[int]) -> int:
    if max_messages is None:
        return -1
    if isinstance(max_messages, bool) or not isinstance(max_messages, int) or max_messages < 0:
        raise InvalidArgument(f"max_messages must be a whole number >= 0 or None, not {max_messages!r}")
    return max_messages


def _rmtree(path: str) -> None:
    # rmtree uses the fd-based walk on Linux: it never follows a planted symlink.
    import shutil  # here, not at the top: shutil pulls in re, bz2 and lzma, ~5 ms for every CLI call

    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass


__all__ = ["Message", "MessageBus", "Payload"]
