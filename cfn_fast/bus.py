"""MessageBus: the bash original's message-bus and rate-limiting functions
over one place where messages live (a ``Storage``; by default the base folder
the C core maps, ``FileStorage``).

Everything here is argument handling and turning message files into dicts;
what happens to files, counters and locks is the storage's. The bus reports
what it notices through alerts (a failed backpressure send, a quarantined
file, a message it could not take), which sit below it, so imports run one
way: storage, then metrics and alerts, then the bus, then the monitors and
the command line.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Iterable, Iterator, Optional, Union

from cfn_fast import alerts, storage
from cfn_fast.codec import Message, Payload, decode_message, encode_payload, encode_type
from cfn_fast.config import PRIORITIES, Config
from cfn_fast.errors import BackpressureTimeout, CfnError, InvalidArgument, InvalidPayload
from cfn_fast.storage import FileStorage, Storage


def open_storage(config: Config, url: Optional[str] = None) -> Storage:
    """The Storage the settings select: Redis when MESSAGE_BUS_URL (or url)
    is set, else the base folder's files."""
    target = url or config.bus_url
    if target:
        from cfn_fast.redis_storage import RedisStorage

        return RedisStorage(config, target)
    return FileStorage(config)

# A message file holds the payload plus ~300 bytes of envelope; allow for escaping headroom.
_ENVELOPE_BYTES = 64 * 1024


class MessageBus:
    """One base folder of agent inboxes.

    ``MessageBus()`` uses ``Config.from_env()``; ``MessageBus(base_dir)``
    overrides MESSAGE_BASE_DIR; ``url=`` (or MESSAGE_BUS_URL) puts it on
    Redis; ``storage=`` puts the bus on another Storage.
    Methods are safe to call from many threads.
    """

    def __init__(self, base_dir: Optional[Union[str, os.PathLike[str]]] = None,
                 config: Optional[Config] = None, storage: Optional[Storage] = None,
                 url: Optional[str] = None) -> None:
        cfg = config if config is not None else (storage.config if storage is not None else Config.from_env())
        if base_dir is not None:
            cfg = cfg.replace(base_dir=os.fspath(base_dir))
        if url is not None:
            cfg = cfg.replace(bus_url=url)
            url = None
        self.config: Config = cfg
        self.base_dir: str = cfg.base_dir
        self.storage: Storage = storage if storage is not None else open_storage(cfg, url)
        self._max_file = cfg.max_message_bytes + _ENVELOPE_BYTES
        # claimed files whose name is not "<msg_id>.json" (written by other tools): msg_id -> name
        self._claimed_names: dict[str, bytes] = {}

    @property
    def metrics_error(self) -> Optional[CfnError]:
        """Why metrics are off for this bus (METRICS_FILE refused), or None."""
        return self.storage.metrics_error

    def close(self) -> None:
        """Releases the folders and the shared state once calls in flight in
        other threads have returned (a call starting meanwhile raises
        BusClosed). A later call opens the bus again."""
        self.storage.close()

    def __enter__(self) -> "MessageBus":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if self.config.bus_url:
            from cfn_fast.config import redact_url

            return f"MessageBus(url={redact_url(self.config.bus_url)!r})"
        return f"MessageBus({self.base_dir!r})"

    # -- message bus ---------------------------------------------------------
    def init_message_bus_system(self) -> None:
        """Creates the base folder (0700) and its shared state file."""
        self.storage.create()

    def cleanup_message_bus_system(self) -> None:
        """Removes the base folder and everything in it."""
        self.storage.destroy()

    def init_message_bus(self, agent_id: str) -> None:
        """Creates the agent's inbox and outbox, and sets the inbox's capacity
        to MAX_INBOX_SIZE. Idempotent."""
        self.storage.init_agent(agent_id, self.config.max_inbox_size)

    def cleanup_message_bus(self, agent_id: str) -> None:
        """Removes the agent's folder and every message in it."""
        self.storage.remove_agent(agent_id)

    def send_message(self, from_agent: str, to_agent: str, msg_type: str, payload: Payload, *,
                     priority: Optional[str] = None) -> str:
        """Delivers one message; raises InboxFull at once when the inbox is full
        (CircuitOpen when its circuit is). ``priority="high"`` (default
        CFN_PRIORITY) may use the inbox's headroom, and consumers take it first."""
        return self.deliver(from_agent, to_agent, msg_type, payload, False, priority=priority).msg_id

    def _payload(self, payload: Payload) -> bytes:
        """The payload's JSON text; with CFN_TEXT_PAYLOADS=1 (the drop-in's
        setting, as the original took plain text) a str that is not JSON is
        sent as a JSON string, so no file is ever written that is not JSON."""
        data = encode_payload(payload)
        if self.config.text_payloads and isinstance(payload, str):
            try:
                storage.check_json(data)
            except InvalidPayload:
                import json

                # as C escapes the envelope's type: DEL too, which json.dumps leaves raw
                return json.dumps(payload, ensure_ascii=False).replace("\x7f", "\\u007f").encode()
        return data

    def get_next_sequence(self, from_agent: str, to_agent: str) -> int:
        """Advances from->to's sequence number as a send does and returns it
        (the original's get_next_sequence)."""
        return self.storage.next_sequence(from_agent, to_agent)

    def send_with_backpressure(self, from_agent: str, to_agent: str, msg_type: str,
                               payload: Payload, *, timeout: Optional[float] = None,
                               priority: Optional[str] = None) -> str:
        """Delivers one message, waiting for room while the inbox is full;
        raises BackpressureTimeout after the last retry. ``timeout`` (seconds)
        bounds the whole call: a wait that cannot end before it is not
        started, and the error's ``retry_after`` says when room is expected.
        ``priority="high"`` draws on the inbox's headroom: it waits only when
        that is full too."""
        return self.deliver(from_agent, to_agent, msg_type, payload, timeout=timeout, priority=priority).msg_id

    def _high(self, priority: Optional[str]) -> bool:
        if priority is None:
            return self.config.priority == "high"
        if priority not in PRIORITIES:
            raise InvalidArgument(f"priority must be one of {', '.join(PRIORITIES)}, not {priority!r}")
        return priority == "high"

    def deliver(self, from_agent: str, to_agent: str, msg_type: str, payload: Payload,
                backpressure: bool = True, *, timeout: Optional[float] = None,
                priority: Optional[str] = None, last_try: bool = False) -> storage.SendResult:
        """send_with_backpressure (or, with backpressure=False, send_message),
        returning what happened: msg_id, sequence, timestamp, retries, wakeups,
        waited_ns and outbox_copied. ``last_try`` (aio: the waits were awaited
        elsewhere) makes one try, a full inbox its BackpressureTimeout."""
        deadline = _deadline(timeout)
        high = self._high(priority)
        mtype, data = encode_type(msg_type), self._payload(payload)
        try:
            res = self.storage.deliver(from_agent, to_agent, mtype, data, backpressure, deadline, high, last_try)
        except CfnError as e:
            self._on_failed_send(from_agent, to_agent, e, backpressure)
            raise
        self._on_delivered(from_agent, to_agent, res.circuit)
        return res

    def _on_delivered(self, from_agent: str, to_agent: str, circuit: int) -> None:
        """A delivery that closed the recipient's half-open circuit (circuit 2) says so."""
        if circuit:
            alerts.circuit_closed(self.storage, to_agent, f"a probe send from {from_agent} got through")

    def _on_failed_send(self, from_agent: str, to_agent: str, e: CfnError, backpressure: bool) -> None:
        # a locked inbox is not an overflow (the error says who holds it), nor is a caller's short deadline
        if backpressure and type(e) is BackpressureTimeout and not e.locked and not e.deadline:
            alerts.backpressure_failure(self.storage, from_agent, to_agent, e.retries)
        if e.circuit:
            alerts.circuit_opened(self.storage, from_agent, to_agent, f"{type(e).__name__}: {e}")

    def flow_status(self, agent_id: str) -> storage.FlowInfo:
        """The inbox's flow control as every process sees it: count, capacity,
        the adaptive limit in force (0: none), the mean sojourn (ms) of what
        consumers took in the last interval, the places it freed over the last
        second, the senders waiting their turn, and high-priority sends."""
        return self.storage.flow(agent_id)

    def circuit_status(self, agent_id: str) -> storage.CircuitInfo:
        """The inbox's circuit breaker, as every process sees it: state
        ("closed", "open", "half-open"), failures in a row, probes, retry_after
        (seconds until probes go, or until the half-open round ends) and the
        sends it refused."""
        return self.storage.circuit(agent_id)

    def reset_circuit(self, agent_id: str) -> str:
        """Closes the inbox's circuit at once, for every process; returns the
        state it had (a circuit_closed alert says so when it was not closed)."""
        was = self.storage.circuit_reset(agent_id)
        if was != "closed":
            alerts.circuit_closed(self.storage, agent_id, f"reset by an operator; it was {was}")
        return was

    def send_batch(self, from_agent: str, to_agent: str, msg_type: str, payloads: Iterable[Payload],
                   backpressure: bool = True, *, priority: Optional[str] = None) -> list[Union[str, CfnError]]:
        """Sends each payload in order (with backpressure unless told not to):
        each one's msg_id, or the error that refused it. A backend that can
        (Redis) delivers many in one step."""
        high = self._high(priority)
        mtype = encode_type(msg_type)
        data: list[bytes] = []
        early: dict[int, CfnError] = {}
        for i, p in enumerate(payloads):
            try:
                data.append(encode_payload(p))
            except CfnError as e:
                early[i] = e
                data.append(b"")
        keep = [i for i in range(len(data)) if i not in early]
        got = self.storage.deliver_many(from_agent, to_agent, mtype, [data[i] for i in keep], backpressure, high)
        out: list[Union[str, CfnError]] = [early.get(i, CfnError("not sent")) for i in range(len(data))]
        for i, r in zip(keep, got):
            if isinstance(r, CfnError):
                self._on_failed_send(from_agent, to_agent, r, backpressure)
                out[i] = r
            else:
                self._on_delivered(from_agent, to_agent, r.circuit)
                out[i] = r.msg_id
        return out

    def receive_messages(self, agent_id: str) -> list[Message]:
        """Every message in the inbox, oldest first; removes nothing."""
        recs, bad = self.storage.read(agent_id, storage.READ_PEEK, -1, self._max_file)
        return self._decoded(agent_id, storage.FROM_INBOX, recs, bad)[0]

    def receive_raw(self, agent_id: str) -> list[bytes]:
        """Every message file's bytes (each one JSON object, as written), oldest first."""
        recs, bad = self.storage.read(agent_id, storage.READ_PEEK, -1, self._max_file)
        if bad:
            self._on_quarantine(agent_id, bad)
        return [r.data for r in recs]

    def consume_messages(self, agent_id: str, max_messages: Optional[int] = None) -> list[Message]:
        """Takes up to max_messages (all when None), oldest first. Each message
        goes to exactly one caller, however many consume at once. A message is
        deleted only once it is decoded here; if anything fails first, it stays
        in the inbox, counted."""
        n = _max_arg(max_messages)
        if n == 0:
            storage.check_agent(agent_id)
            return []
        recs, bad = self.storage.read(agent_id, storage.READ_NEXT, n, self._max_file)
        messages, names = self._decoded(agent_id, storage.FROM_INBOX, recs, bad)
        return self._take(agent_id, messages, names)

    def consume_raw(self, agent_id: str, max_messages: Optional[int] = None) -> list[bytes]:
        """consume_messages without decoding: each message file's bytes, as
        written (one JSON object each, checked by C), for callers that parse
        themselves or pass the text on."""
        n = _max_arg(max_messages)
        if n == 0:
            storage.check_agent(agent_id)
            return []
        recs, bad = self.storage.read(agent_id, storage.READ_NEXT, n, self._max_file)
        if bad:
            self._on_quarantine(agent_id, bad)
        return self._take(agent_id, [r.data for r in recs], [r.name for r in recs])

    def _take(self, agent_id: str, items: list[Any], names: list[bytes]) -> list[Any]:
        taken, failure = self.storage.take(agent_id, storage.FROM_INBOX, names)
        if failure is not None:
            # it stays in the inbox, counted, and comes again; say so once per cooldown
            alerts.quietly(self.storage, "consume_error",
                           f"a message in the inbox of {agent_id} could not be taken and stays: {failure}",
                           "warning", {"agent": agent_id})
        return [item for item, ok in zip(items, taken) if ok]

    def consume(self, agent_id: str, max: Optional[int] = None, timeout: Optional[float] = None) -> list[Message]:
        """consume_messages that waits for a message when the inbox is empty:
        it sleeps on the inbox's arrival futex (woken by the next delivery,
        from any process; no polling) for up to ``timeout`` seconds (None:
        until one comes), and returns [] only when that ran out."""
        deadline = _deadline(timeout) if timeout is not None else None
        while True:
            seen = self.storage.arrivals(agent_id)  # before looking: an arrival after this wakes the wait
            got = self.consume_messages(agent_id, max)
            if got:
                return got
            left = -1 if deadline is None else deadline - time.monotonic_ns()
            if deadline is not None and left <= 0:
                return []
            self.storage.wait_arrival(agent_id, seen, left)

    def messages(self, agent_id: str, batch: int = 10, timeout: Optional[float] = None) -> Iterator[Message]:
        """The inbox's messages as they come, each to exactly one consumer:
        ``for msg in bus.messages("worker"): ...``. Takes up to ``batch`` at a
        time and waits for more when it is empty; with ``timeout`` the
        iteration ends when none came for that long."""
        while True:
            got = self.consume(agent_id, batch, timeout)
            if not got:
                return
            yield from got

    def claim_messages(self, agent_id: str, max_messages: Optional[int] = None) -> list[Message]:
        """At-least-once: moves up to max_messages (all when None), oldest
        first, into this bus's claim folder and returns them. They still count
        against capacity until ``ack_messages``; if this process dies first
        (or the bus is closed), the next reconcile puts them back in the inbox."""
        n = _max_arg(max_messages)
        if n == 0:
            storage.check_agent(agent_id)
            return []
        recs, bad = self.storage.read(agent_id, storage.READ_CLAIM, n, self._max_file)
        try:
            messages, names = self._decoded(agent_id, storage.FROM_CLAIMS, recs, bad)
        except BaseException:
            self.storage.put_back(agent_id, [r.name for r in recs])  # nobody got them: back to the inbox
            raise
        for m, name in zip(messages, names):
            mid = m.get("msg_id")
            if isinstance(mid, str) and name != mid.encode("utf-8", "surrogateescape") + b".json":
                self._claimed_names[mid] = name
        return messages

    def ack_messages(self, agent_id: str, msg_ids: Iterable[Union[str, Message]]) -> int:
        """Deletes claimed messages for good (ids, or the dicts claim returned); returns how many."""
        names = self._claimed_files(agent_id, msg_ids, "")
        if not names:
            return 0
        taken, failure = self.storage.take(agent_id, storage.FROM_CLAIMS, names)
        if failure is not None:
            raise failure
        return sum(taken)

    def nack_messages(self, agent_id: str, msg_ids: Iterable[Union[str, Message]]) -> int:
        """Releases claimed messages back to the inbox, unprocessed (ids, or the
        dicts claim returned): the next consumer gets them, in their place in
        the inbox's order, and waiting consumers wake. Returns how many."""
        names = self._claimed_files(agent_id, msg_ids, ".json")
        return self.storage.put_back(agent_id, names) if names else 0

    def _claimed_files(self, agent_id: str, msg_ids: Iterable[Union[str, Message]], suffix: str) -> list[bytes]:
        """The claim folder's file names of messages given by id or by the
        dict claim returned: the name claim saw when it differs from the id's
        (a bash writer's), else the id with ``suffix``."""
        storage.check_agent(agent_id)
        names = []
        for m in msg_ids:
            mid = m.get("msg_id") if isinstance(m, dict) else m
            if not isinstance(mid, str) or not mid or "/" in mid or "\0" in mid:
                raise InvalidArgument(f"not a message id: {mid!r}")
            name = self._claimed_names.pop(mid, None)
            names.append(name if name is not None else (mid + suffix).encode("utf-8", "surrogateescape"))
        return names

    release_messages = nack_messages

    def recover(self, agent_id: Optional[str] = None,
                progress: Optional[Callable[[int, int], None]] = None) -> int:
        """Returns messages claimed by dead consumers to their inboxes (one
        agent, or every agent of the base folder); returns how many.
        ``progress(done, total)`` is called after each inbox."""
        agents = [agent_id] if agent_id is not None else self.list_agents()
        total = 0
        for done, a in enumerate(agents, 1):
            try:
                total += self.storage.reconcile(a, True).recovered
            except CfnError as e:
                if agent_id is not None or not isinstance(e, FileNotFoundError):
                    raise
            if progress is not None:
                progress(done, len(agents))
        return total

    def list_agents(self) -> list[str]:
        """Agents of the base folder that have an inbox, sorted."""
        return self.storage.list_agents()

    def _decoded(self, agent_id: str, where: int, recs: list[storage.Record],
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
                messages.append(decode_message(r.data, bool(r.flags & storage.JSON_EXACT)))
            except (ValueError, RecursionError):
                poison.append(r.name)
                continue
            names.append(r.name)
        if poison:
            bad += self.storage.quarantine(agent_id, where, poison)
        if bad:
            self._on_quarantine(agent_id, bad)
        return messages, names

    def _on_quarantine(self, agent_id: str, count: int) -> None:
        """Bad message files (not JSON, symlinks, not regular files) were moved to
        <agent>/.quarantine: say so once per cooldown, never silently."""
        alerts.emit(self.storage, "message_quarantined",
                    f"{count} bad message file(s) in the inbox of {agent_id} moved to "
                    f"{os.path.join(self.base_dir, agent_id, '.quarantine')}",
                    "warning", {"agent": agent_id, "count": count})

    def clear_inbox(self, agent_id: str) -> int:
        """Deletes every message in the inbox; returns how many."""
        return self.storage.clear(agent_id)

    def message_count(self, agent_id: str, box: str = "inbox") -> int:
        """Counts *.json files by a directory scan (authoritative); 0 when missing."""
        return self.storage.count_files(agent_id, box)

    # -- capacity ------------------------------------------------------------
    def get_inbox_size(self, agent_id: str) -> int:
        """Messages in the inbox (with sends in flight), from the shared counter: O(1)."""
        return self.storage.size(agent_id)

    def get_inbox_capacity(self, agent_id: str) -> int:
        """The capacity that holds for the inbox, the same for every process:
        the MAX_INBOX_SIZE init set, or a smaller one some process used since."""
        return self.storage.capacity(agent_id, self.config.max_inbox_size)

    def check_inbox_capacity(self, agent_id: str) -> bool:
        """True when the inbox has room (or does not exist yet)."""
        return self.get_inbox_size(agent_id) < self.get_inbox_capacity(agent_id)

    def get_inbox_utilization(self, agent_id: str) -> int:
        """size * 100 // capacity, as the original."""
        return self.get_inbox_size(agent_id) * 100 // self.get_inbox_capacity(agent_id)

    def reconcile(self, agent_id: str, force: bool = True) -> storage.ReconcileResult:
        """Sets the inbox's counter from a directory scan; with force, also
        returns claims of dead consumers and removes stale temporary files."""
        return self.storage.reconcile(agent_id, force)


def _deadline(timeout: Optional[float]) -> int:
    """The CLOCK_MONOTONIC ns (time.monotonic_ns) by which a call with this timeout must end; 0: none."""
    if timeout is None:
        return 0
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 <= timeout <= 604_800:
        raise InvalidArgument(f"timeout must be a number of seconds from 0 to 604800 (7 days), not {timeout!r}")
    return time.monotonic_ns() + max(1, int(timeout * 1e9))


def _max_arg(max_messages: Optional[int]) -> int:
    if max_messages is None:
        return -1
    if isinstance(max_messages, bool) or not isinstance(max_messages, int) or max_messages < 0:
        raise InvalidArgument(f"max_messages must be a whole number >= 0 or None, not {max_messages!r}")
    return max_messages


__all__ = ["Message", "MessageBus", "Payload", "open_storage"]
