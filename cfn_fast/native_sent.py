"""The end of a send the native ``cfn-fast`` program made whose report needs
Python: an alert (a backpressure send that gave up names the inbox's heaviest
senders; a send that opened or closed the recipient's circuit says so). The
send is done and is not made again: the program hands its result over
(``python -P -m cfn_fast _native-sent <fields>``), and this reports it as the
Python command line would have: the alert, then the msg_id or the error line,
and the exit code. Only these rare endings pay for starting Python.
"""
from __future__ import annotations

from typing import Sequence

FIELDS = ("where", "rc", "what", "retries", "waited_ns", "locked", "deadline", "circuit", "retry_after_ns",
          "backpressure", "from", "to", "type", "msg_id")


def report(args: Sequence[str]) -> int:
    from cfn_fast import handlers, storage
    from cfn_fast.bus import MessageBus
    from cfn_fast.errors import InvalidArgument
    from cfn_fast.output import EXIT_OK, fail, out

    if len(args) != len(FIELDS):
        return fail(("_native-sent",), InvalidArgument(f"expected {len(FIELDS)} fields ({', '.join(FIELDS)})"))
    f = dict(zip(FIELDS, args))
    path = f["where"].split()[1:]
    try:
        rc, circuit = int(f["rc"]), int(f["circuit"])
        retries, waited, after = int(f["retries"]), int(f["waited_ns"]), int(f["retry_after_ns"])
    except ValueError as e:
        return fail(("_native-sent",), InvalidArgument(str(e)))
    backpressure, sender, to = f["backpressure"] == "1", f["from"], f["to"]
    with MessageBus() as bus:
        if rc:
            exc = storage.send_failure(rc, f["what"], retries, waited, f["locked"] == "1", f["deadline"] == "1",
                                       circuit, after)
            bus._on_failed_send(sender, to, exc, backpressure)
            return fail(path, exc)
        bus._on_delivered(sender, to, circuit)
    if backpressure:
        out(f["msg_id"])
    else:
        handlers.sent(sender, to, f["type"], f["msg_id"])
    return EXIT_OK
