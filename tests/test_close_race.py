"""close() while other threads are inside calls on the same bus: they finish
or fail with BusClosed; nothing touches released state (no crash)."""
from __future__ import annotations

import os
import subprocess
import sys

CODE = r"""
import threading, time
from cfn_fast import MessageBus, CfnError, Config
bus = MessageBus(config=Config.from_env().replace(max_inbox_size=100000))
bus.init_message_bus("bob")
stop = threading.Event()
errors, calls = [], [0]

def hammer(kind):
    while not stop.is_set():
        try:
            if kind == 0:
                bus.send_message("alice", "bob", "t", 1)
            elif kind == 1:
                bus.get_inbox_size("bob")
            elif kind == 2:
                bus.consume_messages("bob", 5)
            else:
                bus.claim_messages("bob", 2)
            calls[0] += 1
        except CfnError as e:
            errors.append(type(e).__name__)

threads = [threading.Thread(target=hammer, args=(k % 4,)) for k in range(6)]
for t in threads:
    t.start()
for _ in range(300):
    time.sleep(0.001)
    bus.close()                    # the next call opens it again
stop.set()
for t in threads:
    t.join()
bus.close()
print(calls[0], sorted(set(errors)))
"""


def test_close_under_calls_in_flight_never_crashes(base) -> None:
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "MESSAGE_BASE_DIR": str(base)})
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])  # -11 was a segfault
    calls, _, kinds = out.stdout.partition(" ")
    assert int(calls) > 300
    assert set(eval(kinds)) <= {"BusClosed"}, kinds
