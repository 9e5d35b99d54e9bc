"""The bus for asyncio: ``AsyncMessageBus`` has MessageBus's API as
coroutines. What never waits (a plain send, a consume, a count) runs in the
event loop as it is (tens of microseconds of file work, as a socket write
would be). What waits (``send_with_backpressure`` for room, ``consume`` for a
message) never blocks the loop and takes no thread of its own: each try is
made in the loop, and between tries the coroutine awaits a future that one
waiter thread per bus resolves. That thread sleeps in one ``futex_waitv``
on every inbox word some coroutine waits for (a word moves when a consumer
frees a place, or a message arrives), so a thousand blocked sends cost one
thread and one system call. A word that moves wakes the coroutine that has
waited longest on it (first come, first served within the loop), and a
coroutine that got its place passes the turn to the next. Cancelling a
waiting send leaves nothing behind: a place is only ever reserved inside a
try, which is one call that delivers or gives the place back.

On Redis (MESSAGE_BUS_URL) there is no futex to share: waiting calls run in
a bounded pool of threads (``REDIS_WAIT_THREADS``), which keeps the loop
free but lets no more than that many wait on the server at once.
"""
from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, AsyncIterator, Iterable, Optional, Union

from cfn_fast.bus import MessageBus, Payload
from cfn_fast.codec import Message
from cfn_fast.config import Config
from cfn_fast.errors import BackpressureTimeout, CfnError, CircuitOpen, InboxFull, InvalidArgument
from cfn_fast.storage import CircuitInfo, FileStorage, FlowInfo, SendResult, Storage

REDIS_WAIT_THREADS = 8
_Key = tuple[str, int]  # (agent, FileStorage.WORD_ROOM or WORD_ARRIVAL)


class _Waiter:
    """One thread sleeping on every inbox word the bus's coroutines wait for;
    each move of a word resolves the oldest future waiting on it."""

    def __init__(self, store: FileStorage, loop: asyncio.AbstractEventLoop) -> None:
        self._store, self._loop = store, loop
        self.loop = loop
        self._lock = threading.Lock()
        self._queues: dict[_Key, deque[asyncio.Future[bool]]] = {}
        self._seen: dict[_Key, int] = {}
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="cfn-fast-aio", daemon=True)
        self._thread.start()

    def word(self, key: _Key) -> int:
        return self._store.word(*key)

    def waiting(self, key: _Key) -> int:
        """How many coroutines of this loop wait on key (a newcomer queues behind them)."""
        with self._lock:
            return len(self._queues.get(key, ()))

    async def wait(self, key: _Key, seen: int, timeout: Optional[float], front: bool = False) -> bool:
        """True when the word moved past ``seen`` and it is this coroutine's
        turn; False when ``timeout`` (seconds) ran out first."""
        fut: asyncio.Future[bool] = self._loop.create_future()
        with self._lock:
            q = self._queues.setdefault(key, deque())
            (q.appendleft if front else q.append)(fut)
            fresh = key not in self._seen
            self._seen[key] = seen
        if self.word(key) != seen:
            self.fire(key)  # it moved before we were counted: no wake will come for it
        elif fresh:
            self._store.wait_interrupt()  # the thread waits on one word more now
        taken = False
        try:
            done, _ = await asyncio.wait({fut}, timeout=timeout)
            taken = bool(done)
            return taken
        finally:
            with self._lock:
                handed = fut.done() and not fut.cancelled()  # fire() gave this coroutine the turn
                if not fut.done():
                    fut.cancel()
                try:
                    q.remove(fut)
                except ValueError:
                    pass
                if not q and self._queues.get(key) is q:
                    del self._queues[key]
                    self._seen.pop(key, None)
            if handed and not taken:
                # cancelled (or timed out) in the same step the turn came: the move it was
                # woken for is not lost, the next in the queue gets it
                self.fire(key)

    def fire(self, key: _Key) -> None:
        """The next waiter of key (the oldest) goes: in the loop's thread."""
        with self._lock:
            q = self._queues.get(key)
            while q:
                fut = q.popleft()
                if not fut.done():
                    fut.set_result(True)
                    return

    def close(self) -> None:
        with self._lock:
            self._stop = True
        self._store.wait_interrupt()
        if self._thread is not threading.current_thread():
            self._thread.join(5)  # it wakes at once; the bus is closed only after it left the handle

    def _run(self) -> None:
        store, loop = self._store, self._loop
        polled = time.monotonic()
        while True:
            ctl = store.wait_ctl()  # before the set is read: a change after this wakes the wait
            with self._lock:
                if self._stop:
                    return
                keys = [k for k, q in self._queues.items() if q][:store.WAIT_WORDS_MAX]
                seen = [self._seen[k] for k in keys]
            try:
                moved = store.wait_words(keys, seen, ctl, max(0, int((polled + 1.0 - time.monotonic()) * 1e9)))
            except CfnError:
                moved = [True] * len(keys)  # an inbox gone, say: its waiters try and see why
                time.sleep(0.01)
            # once a second the oldest waiter of each word tries again, moved or not: a bash
            # sender bumps no arrival word; room left when another process's line emptied (this
            # loop's senders defer to it), and words beyond the first 127, wake nothing here
            poll = time.monotonic() - polled >= 1.0
            if poll:
                moved, polled = [True] * len(keys), time.monotonic()
            elif moved is None:
                continue  # (a kernel without futex_waitv times out each 10 ms slice)
            for k, m in zip(keys, moved):
                if m:
                    try:
                        now = store.word(*k)
                    except CfnError:
                        now = -1
                    with self._lock:
                        if k in self._seen:
                            self._seen[k] = now
                    try:
                        loop.call_soon_threadsafe(self.fire, k)
                    except RuntimeError:  # the loop is closed
                        return


class AsyncMessageBus:
    """MessageBus's API as coroutines (see the module's text). Build it inside
    the running loop it will be used from."""

    def __init__(self, base_dir: Optional[Union[str, "os.PathLike[str]"]] = None, config: Optional[Config] = None,
                 storage: Optional[Storage] = None, url: Optional[str] = None, *,
                 bus: Optional[MessageBus] = None) -> None:
        self.bus: MessageBus = bus if bus is not None else MessageBus(base_dir, config, storage, url)
        self.config: Config = self.bus.config
        self._waiter: Optional[_Waiter] = None
        self._pool: Optional[ThreadPoolExecutor] = None

    async def __aenter__(self) -> "AsyncMessageBus":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._waiter is not None:
            self._waiter.close()
            self._waiter = None
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
        self.bus.close()

    def _futex_waiter(self) -> Optional[_Waiter]:
        store = self.bus.storage
        if not isinstance(store, FileStorage):
            return None
        loop = asyncio.get_running_loop()
        if self._waiter is None:
            store.create()
            self._waiter = _Waiter(store, loop)
        elif self._waiter.loop is not loop:
            raise RuntimeError("an AsyncMessageBus serves the event loop it first waited in; make one per loop")
        return self._waiter

    async def _in_pool(self, fn: Any, *args: Any, **kw: Any) -> Any:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(REDIS_WAIT_THREADS, thread_name_prefix="cfn-fast-aio")
        return await asyncio.get_running_loop().run_in_executor(self._pool, partial(fn, *args, **kw))

    def waiting(self, agent_id: str) -> int:
        """How many of this bus's coroutines wait for room in the inbox now.
        They wait in this process, not in the inbox's shared line
        (``flow_status().waiting``): each of their tries defers to senders
        waiting there."""
        w = self._waiter
        return 0 if w is None else w.waiting((agent_id, FileStorage.WORD_ROOM))

    # -- sending ---------------------------------------------------------------------------------
    async def send_message(self, from_agent: str, to_agent: str, msg_type: str, payload: Payload, *,
                           priority: Optional[str] = None) -> str:
        return self.bus.send_message(from_agent, to_agent, msg_type, payload, priority=priority)

    async def send_with_backpressure(self, from_agent: str, to_agent: str, msg_type: str, payload: Payload, *,
                                     timeout: Optional[float] = None, priority: Optional[str] = None) -> str:
        res = await self.deliver(from_agent, to_agent, msg_type, payload, timeout=timeout, priority=priority)
        return res.msg_id

    async def deliver(self, from_agent: str, to_agent: str, msg_type: str, payload: Payload,
                      backpressure: bool = True, *, timeout: Optional[float] = None,
                      priority: Optional[str] = None) -> SendResult:
        """send_with_backpressure as a coroutine: the waits for room are awaits.
        The retries, the wait (BACKPRESSURE_WAIT_MS, fixed or exponential), the
        budget and ``timeout`` bound it as they bound the blocking call."""
        if not backpressure:
            return self.bus.deliver(from_agent, to_agent, msg_type, payload, False, priority=priority)
        waiter = self._futex_waiter()
        if waiter is None:
            res: SendResult = await self._in_pool(self.bus.deliver, from_agent, to_agent, msg_type, payload,
                                                  timeout=timeout, priority=priority)
            return res
        cfg = self.config
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not 0 <= timeout <= 604_800):
            raise InvalidArgument(f"timeout must be a number of seconds from 0 to 604800 (7 days), not {timeout!r}")
        start = time.monotonic_ns()
        deadline = None if timeout is None else start + int(timeout * 1e9)
        wait_ns = cfg.backpressure_wait_ms * 1_000_000
        budget = cfg.backpressure_max_total_ms * 1_000_000 or wait_ns * cfg.backpressure_max_retries
        timed = cfg.backpressure_max_total_ms > 0 or wait_ns > 0
        key: _Key = (to_agent, FileStorage.WORD_ROOM)
        retries = waited = 0
        turn = False
        while True:
            seen = waiter.word(key)
            spent = retries >= cfg.backpressure_max_retries or (timed and waited >= budget)
            past = deadline is not None and time.monotonic_ns() >= deadline
            if not (turn or spent or past) and waiter.waiting(key) > 0:
                # others of this loop wait for this inbox already: behind them, without a try (a
                # thousand sends started at once cost a thousand cheap queueings, not file work);
                # what waiting in the queue costs counts against the budget as waits do
                t0 = time.monotonic_ns()
                limit = [budget - waited] if timed else []
                if deadline is not None:
                    limit.append(deadline - t0)
                turn = await waiter.wait(key, seen, max(0, min(limit)) / 1e9 if limit else None)
                waited += time.monotonic_ns() - t0
                if not turn and wait_ns:
                    retries = max(retries, waited // wait_ns)
                continue
            try:
                if spent:  # a backpressure send with no wait left: its failure counts, as the blocking call's
                    res = self.bus.deliver(from_agent, to_agent, msg_type, payload, True, priority=priority,
                                           last_try=True)
                elif past:  # the caller's deadline: its failure is the caller's, not the inbox's
                    res = self.bus.deliver(from_agent, to_agent, msg_type, payload, True, priority=priority,
                                           timeout=0)
                else:
                    res = self.bus.deliver(from_agent, to_agent, msg_type, payload, False, priority=priority)
            except CircuitOpen:
                waiter.fire(key)  # the next one waiting fails at once too, not after its wait
                raise
            except InboxFull as e:
                if spent or past:
                    if isinstance(e, BackpressureTimeout):
                        e.retries, e.waited_ns = retries, waited
                    raise
            except BaseException:
                if turn:
                    waiter.fire(key)  # this call ends without using the turn: the next gets it
                raise
            else:
                waiter.fire(key)  # got in: the next one waiting may find room too
                return res
            w = wait_ns << min(retries, 40) if cfg.backpressure_backoff == "exponential" else wait_ns
            if timed:
                w = min(w, budget - waited)
            if deadline is not None:
                w = min(w, deadline - time.monotonic_ns())
            t0 = time.monotonic_ns()
            woke = await waiter.wait(key, seen, max(w, 0) / 1e9, front=turn)
            waited += time.monotonic_ns() - t0
            turn = woke  # its turn came: if the try fails, it keeps its place at the front
            if not woke:
                retries += 1

    async def send_batch(self, from_agent: str, to_agent: str, msg_type: str, payloads: Iterable[Payload],
                         backpressure: bool = True, *,
                         priority: Optional[str] = None) -> list[Union[str, CfnError]]:
        out: list[Union[str, CfnError]] = []
        for p in payloads:
            try:
                out.append((await self.deliver(from_agent, to_agent, msg_type, p, backpressure,
                                               priority=priority)).msg_id)
            except CfnError as e:
                out.append(e)
        return out

    # -- receiving -------------------------------------------------------------------------------
    async def consume(self, agent_id: str, max: Optional[int] = None, timeout: Optional[float] = None) -> list[Message]:
        """MessageBus.consume as a coroutine: the wait for a message is an await."""
        waiter = self._futex_waiter()
        if waiter is None:
            got: list[Message] = await self._in_pool(self.bus.consume, agent_id, max, timeout)
            return got
        deadline = None if timeout is None else time.monotonic() + timeout
        key: _Key = (agent_id, FileStorage.WORD_ARRIVAL)
        turn = False
        while True:
            seen = waiter.word(key)
            try:
                msgs = self.bus.consume_messages(agent_id, max)
            except BaseException:
                if turn:
                    waiter.fire(key)  # this call ends without using its turn: the next gets it
                raise
            if msgs:
                waiter.fire(key)  # more may be there for the next consumer waiting
                return msgs
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return []
            turn = await waiter.wait(key, seen, left, front=turn)

    async def messages(self, agent_id: str, batch: int = 10, timeout: Optional[float] = None) -> AsyncIterator[Message]:
        """``async for msg in bus.messages(agent)``: as they come; with
        ``timeout``, ends when none came for that long."""
        while True:
            got = await self.consume(agent_id, batch, timeout)
            if not got:
                return
            for m in got:
                yield m

    async def consume_messages(self, agent_id: str, max_messages: Optional[int] = None) -> list[Message]:
        return self.bus.consume_messages(agent_id, max_messages)

    async def receive_messages(self, agent_id: str) -> list[Message]:
        return self.bus.receive_messages(agent_id)

    async def claim_messages(self, agent_id: str, max_messages: Optional[int] = None) -> list[Message]:
        return self.bus.claim_messages(agent_id, max_messages)

    async def ack_messages(self, agent_id: str, msg_ids: Iterable[Union[str, Message]]) -> int:
        return self.bus.ack_messages(agent_id, msg_ids)

    async def nack_messages(self, agent_id: str, msg_ids: Iterable[Union[str, Message]]) -> int:
        return self.bus.nack_messages(agent_id, msg_ids)

    # -- inboxes ---------------------------------------------------------------------------------
    async def init_message_bus_system(self) -> None:
        self.bus.init_message_bus_system()

    async def init_message_bus(self, agent_id: str) -> None:
        self.bus.init_message_bus(agent_id)

    async def cleanup_message_bus(self, agent_id: str) -> None:
        self.bus.cleanup_message_bus(agent_id)

    async def clear_inbox(self, agent_id: str) -> int:
        return self.bus.clear_inbox(agent_id)

    async def message_count(self, agent_id: str, box: str = "inbox") -> int:
        return self.bus.message_count(agent_id, box)

    async def get_inbox_size(self, agent_id: str) -> int:
        return self.bus.get_inbox_size(agent_id)

    async def get_inbox_capacity(self, agent_id: str) -> int:
        return self.bus.get_inbox_capacity(agent_id)

    async def get_inbox_utilization(self, agent_id: str) -> int:
        return self.bus.get_inbox_utilization(agent_id)

    async def check_inbox_capacity(self, agent_id: str) -> bool:
        return self.bus.check_inbox_capacity(agent_id)

    async def circuit_status(self, agent_id: str) -> CircuitInfo:
        return self.bus.circuit_status(agent_id)

    async def reset_circuit(self, agent_id: str) -> str:
        return self.bus.reset_circuit(agent_id)

    async def flow_status(self, agent_id: str) -> FlowInfo:
        return self.bus.flow_status(agent_id)


__all__ = ["AsyncMessageBus", "REDIS_WAIT_THREADS"]
