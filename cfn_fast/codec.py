"""Payloads into bytes for the C core, and message files back into dicts.

C checks every payload at send (one JSON value that every reader returns
intact) and every file at read (one JSON object); what is left here is
Python's side of it: values to JSON text, and numbers decoded exactly when C
flags them (an integer longer than int() takes, a number beyond a double).
"""
from __future__ import annotations

from typing import Any, TypedDict, Union

from cfn_fast.errors import InvalidMessageType, InvalidPayload

Payload = Union[str, bytes, bytearray, dict[str, Any], list[Any], int, float, bool, None]

# A message as read back: the original's envelope (a dict at run time, so
# m["payload"] and json.dumps(m) work as before). "from" is a keyword, hence
# the functional form; "priority" is there only on a high-priority message.
_Envelope = TypedDict("_Envelope", {
    "version": str,
    "msg_id": str,
    "from": str,
    "to": str,
    "timestamp": int,
    "sequence": int,
    "type": str,
    "payload": Any,
    "requires_ack": bool,
})


class Message(_Envelope, total=False):
    priority: str

_INT_DIGITS = 4300  # Python's default limit for int(str); C refuses longer integers at send


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


def decode_message(data: bytes, exact: bool = False) -> Message:
    """One message file's bytes (checked by C as one JSON object) as a dict;
    ``exact`` when C flagged numbers a plain decoding would refuse or round."""
    import json

    value: Message = json.loads(data, parse_int=_exact_int, parse_float=_exact_float) if exact else json.loads(data)
    return value  # a file another tool wrote may lack envelope fields: the type says what cfn-fast writes


__all__ = ["Message", "Payload", "decode_message", "encode_payload", "encode_type"]
