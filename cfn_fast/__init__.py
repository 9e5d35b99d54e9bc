"""cfn-fast: a C-accelerated, rate-limited, backpressured message bus for agent
swarms on the local filesystem, compatible with the bash original's folders,
files and commands.

Module-level functions act on the bus that the environment describes
(``MESSAGE_BASE_DIR`` and friends, read by ``Config.from_env()`` whenever the
environment changes); ``MessageBus(base_dir)`` gives the same methods on any
base folder.
"""
from __future__ import annotations

import os
import threading
from typing import Optional

from cfn_fast.bus import Message, MessageBus, Payload
from cfn_fast.config import Config
from cfn_fast.errors import (
    BackpressureTimeout,
    CfnError,
    CfnOSError,
    ConfigError,
    InboxFull,
    InboxNotFound,
    InvalidAgentId,
    InvalidArgument,
    InvalidMessageType,
    InvalidPayload,
    PayloadTooLarge,
    StateFileError,
    TooManyAgents,
    UnsafePath,
)

__version__ = "0.1.0"

_ENV_KEYS: Optional[tuple[str, ...]] = None
_default_lock = threading.Lock()
_default: tuple[tuple[Optional[str], ...], Optional[MessageBus]] = ((), None)


def default_bus() -> MessageBus:
    """The bus the environment describes; rebuilt when a setting changes."""
    global _default, _ENV_KEYS
    if _ENV_KEYS is None:
        from cfn_fast.config import SETTINGS

        _ENV_KEYS = tuple(s.env for s in SETTINGS)
    env = os.environ
    key = tuple(env.get(k) for k in _ENV_KEYS)
    have_key, bus = _default
    if bus is not None and have_key == key:
        return bus
    with _default_lock:
        if _default[1] is None or _default[0] != key:
            _default = (key, MessageBus(config=Config.from_env()))
        return _default[1]  # type: ignore[return-value]


def init_message_bus_system() -> None:
    default_bus().init_message_bus_system()


def cleanup_message_bus_system() -> None:
    default_bus().cleanup_message_bus_system()


def init_message_bus(agent_id: str) -> None:
    default_bus().init_message_bus(agent_id)


def cleanup_message_bus(agent_id: str) -> None:
    default_bus().cleanup_message_bus(agent_id)


def send_message(from_agent: str, to_agent: str, msg_type: str, payload: Payload) -> str:
    return default_bus().send_message(from_agent, to_agent, msg_type, payload)


def send_with_backpressure(from_agent: str, to_agent: str, msg_type: str, payload: Payload) -> str:
    return default_bus().send_with_backpressure(from_agent, to_agent, msg_type, payload)


def receive_messages(agent_id: str) -> list[Message]:
    return default_bus().receive_messages(agent_id)


def consume_messages(agent_id: str, max_messages: Optional[int] = None) -> list[Message]:
    return default_bus().consume_messages(agent_id, max_messages)


def clear_inbox(agent_id: str) -> int:
    return default_bus().clear_inbox(agent_id)


def message_count(agent_id: str, box: str = "inbox") -> int:
    return default_bus().message_count(agent_id, box)


def check_inbox_capacity(agent_id: str) -> bool:
    return default_bus().check_inbox_capacity(agent_id)


def get_inbox_size(agent_id: str) -> int:
    return default_bus().get_inbox_size(agent_id)


def get_inbox_utilization(agent_id: str) -> int:
    return default_bus().get_inbox_utilization(agent_id)


__all__ = [
    "BackpressureTimeout",
    "CfnError",
    "CfnOSError",
    "Config",
    "ConfigError",
    "InboxFull",
    "InboxNotFound",
    "InvalidAgentId",
    "InvalidArgument",
    "InvalidMessageType",
    "InvalidPayload",
    "Message",
    "MessageBus",
    "Payload",
    "PayloadTooLarge",
    "StateFileError",
    "TooManyAgents",
    "UnsafePath",
    "check_inbox_capacity",
    "cleanup_message_bus",
    "cleanup_message_bus_system",
    "clear_inbox",
    "consume_messages",
    "default_bus",
    "get_inbox_size",
    "get_inbox_utilization",
    "init_message_bus",
    "init_message_bus_system",
    "message_count",
    "receive_messages",
    "send_message",
    "send_with_backpressure",
]
