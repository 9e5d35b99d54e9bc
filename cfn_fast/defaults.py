"""The bus the environment describes: what the module-level functions
(``cfn_fast.send_message`` and friends) and the ``bus=None`` of the monitors
and telemetry act on.

It is built once and kept while the environment's settings stay as they were.
Noticing a change costs one look at each setting's variable in the process's
environment block (a dict lookup each, no decoding), not a new Config per
call, so a module-level call costs what the method costs.
"""
from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any, Optional

from cfn_fast.config import SETTINGS

if TYPE_CHECKING:
    from cfn_fast.bus import MessageBus

_KEYS = tuple(s.env for s in SETTINGS)
# os.environ keeps its variables, encoded, in a plain dict: looking there is a
# dict lookup per name. Elsewhere (another Python), os.environ.get does it.
_data: Any = getattr(os.environ, "_data", None)
if isinstance(_data, dict):
    _encode = os.environ.encodekey
    _LOOKUPS = tuple(_encode(k) for k in _KEYS)
    _get = _data.get
else:  # pragma: no cover - not CPython's os.environ
    _LOOKUPS = _KEYS
    _get = os.environ.get

_lock = threading.Lock()
_key: tuple[Any, ...] = ()
_bus: Optional["MessageBus"] = None


def default_bus() -> "MessageBus":
    """The bus the environment describes; built again when one of its variables changes."""
    global _key, _bus
    key = tuple(map(_get, _LOOKUPS))
    bus = _bus
    if bus is not None and key == _key:
        return bus
    from cfn_fast.bus import MessageBus
    from cfn_fast.config import Config

    with _lock:
        if _bus is None or key != _key:
            _bus, _key = MessageBus(config=Config.from_env()), key
        return _bus


def resolve(bus: Optional["MessageBus"]) -> "MessageBus":
    """``bus``, or the default one."""
    return bus if bus is not None else default_bus()


__all__ = ["default_bus", "resolve"]
