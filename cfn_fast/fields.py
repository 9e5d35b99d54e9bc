"""Checks for the fields of metric and alert lines: text, numbers, JSON
objects, and the original's timestamps."""
from __future__ import annotations

import time
from typing import Any, Mapping, Optional, Union

from cfn_fast import storage
from cfn_fast.errors import CfnError, InvalidArgument

Number = Union[int, float]
Tags = Union[Mapping[str, Any], str, bytes, None]


def text(value: object, what: str, limit: int) -> bytes:
    """value as UTF-8, refusing what is not text without NUL or is over limit bytes."""
    if not isinstance(value, str) or "\0" in value:
        raise InvalidArgument(f"{what} must be a str without NUL, not {value!r}")
    try:
        data = value.encode("utf-8", "strict")
    except UnicodeEncodeError:
        raise InvalidArgument(f"{what} is not valid Unicode text") from None
    if len(data) > limit:
        raise InvalidArgument(f"{what} is over {limit} bytes")
    return data


def number(value: object) -> Number:
    """A finite int or float (a str is parsed), never a bool."""
    if isinstance(value, bool):
        raise InvalidArgument(f"metric value must be a number, not {value!r}")
    if isinstance(value, (int, float)):
        v: Number = value
    elif isinstance(value, str):
        try:
            v = int(value.strip(), 10)
        except ValueError:
            try:
                v = float(value)
            except ValueError:
                raise InvalidArgument(f"metric value {value!r} is not a number") from None
    else:
        raise InvalidArgument(f"metric value must be a number, not {type(value).__name__}")
    if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
        raise InvalidArgument(f"metric value must be finite, not {value!r}")
    return v


def json_object(obj: Tags, what: str) -> bytes:
    """A dict (or JSON object text, as the CLI passes it) as compact JSON bytes."""
    if obj is None:
        return b"{}"
    if isinstance(obj, (str, bytes)):
        data = text(obj, what, 1 << 20) if isinstance(obj, str) else obj
        try:
            storage.check_json(data)
        except CfnError:
            raise InvalidArgument(f"{what} is not valid JSON: {data[:80]!r}") from None
        if not data.strip().startswith(b"{"):
            raise InvalidArgument(f"{what} must be a JSON object")
        return data.strip()
    if not isinstance(obj, Mapping):
        raise InvalidArgument(f"{what} must be a dict, not {type(obj).__name__}")
    import json

    try:
        return json.dumps(dict(obj), separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    except (TypeError, ValueError) as e:
        raise InvalidArgument(f"{what} cannot be written as JSON: {e}") from None


def now_iso(ns: Optional[int] = None) -> str:
    """UTC time as the original writes it: 2026-11-28T10:01:55.123Z."""
    t = time.time_ns() if ns is None else ns
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t // 1_000_000_000)) + \
        f".{t // 1_000_000 % 1000:03d}Z"


__all__ = ["Number", "Tags", "json_object", "now_iso", "number", "text"]
