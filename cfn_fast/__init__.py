"""cfn-fast: a C-accelerated, rate-limited, backpressured message bus for agent
swarms on the local filesystem, compatible with the bash original's folders,
files and commands.

Module-level functions act on the bus that the environment describes
(``MESSAGE_BASE_DIR`` and friends; see ``defaults.py`` for how a change is
noticed); ``MessageBus(base_dir)`` gives the same methods on any base folder.

Importing this package loads only the exception classes: everything else
(the compiled core, configuration, typing) is loaded on first use.
"""
from __future__ import annotations

from cfn_fast.errors import (
    BackendUnavailable,
    BackpressureTimeout,
    BusClosed,
    CfnError,
    CircuitOpen,
    CfnOSError,
    ConfigError,
    InboxFull,
    InboxLocked,
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

TYPE_CHECKING = False
if TYPE_CHECKING:  # for type checkers only: at run time these load on first use (PEP 562)
    from typing import Any, Optional

    from cfn_fast.bus import Message, MessageBus, Payload
    from cfn_fast.config import Config
    from cfn_fast.monitors import (
        apply_dynamic_rate_limit,
        cleanup_rate_limiting,
        get_all_inbox_stats,
        get_batch_size,
        get_system_load,
        monitor_dynamic_rate_limit,
        monitor_inbox_overflow,
    )
    from cfn_fast.telemetry import alerts_summary, clear_metrics, emit_alert, emit_metric, metrics_stats

__version__ = "0.1.0"

# name -> module that defines it; resolved on first use (PEP 562)
_LAZY = {
    "Message": "cfn_fast.codec",
    "MessageBus": "cfn_fast.bus",
    "Payload": "cfn_fast.codec",
    "Config": "cfn_fast.config",
    "emit_metric": "cfn_fast.telemetry",
    "emit_alert": "cfn_fast.telemetry",
    "metrics_stats": "cfn_fast.telemetry",
    "clear_metrics": "cfn_fast.telemetry",
    "alerts_summary": "cfn_fast.telemetry",
    "monitor_inbox_overflow": "cfn_fast.monitors",
    "monitor_dynamic_rate_limit": "cfn_fast.monitors",
    "apply_dynamic_rate_limit": "cfn_fast.monitors",
    "get_system_load": "cfn_fast.monitors",
    "get_batch_size": "cfn_fast.monitors",
    "get_all_inbox_stats": "cfn_fast.monitors",
    "cleanup_rate_limiting": "cfn_fast.monitors",
}


def __getattr__(name: str) -> "Any":
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cfn_fast' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def default_bus() -> "MessageBus":
    """The bus the environment describes; built again when one of its variables changes."""
    global default_bus
    from cfn_fast.defaults import default_bus as cached

    default_bus = cached  # later calls go straight to it (and so do the functions below)
    return cached()


def init_message_bus_system() -> None:
    default_bus().init_message_bus_system()


def cleanup_message_bus_system() -> None:
    default_bus().cleanup_message_bus_system()


def init_message_bus(agent_id: str) -> None:
    default_bus().init_message_bus(agent_id)


def cleanup_message_bus(agent_id: str) -> None:
    default_bus().cleanup_message_bus(agent_id)


def send_message(from_agent: str, to_agent: str, msg_type: str, payload: "Payload", *,
                 priority: "Optional[str]" = None) -> str:
    return default_bus().send_message(from_agent, to_agent, msg_type, payload, priority=priority)


def send_with_backpressure(from_agent: str, to_agent: str, msg_type: str, payload: "Payload", *,
                           timeout: "Optional[float]" = None, priority: "Optional[str]" = None) -> str:
    return default_bus().send_with_backpressure(from_agent, to_agent, msg_type, payload, timeout=timeout,
                                                priority=priority)


def receive_messages(agent_id: str) -> "list[Message]":
    return default_bus().receive_messages(agent_id)


def consume_messages(agent_id: str, max_messages: "Optional[int]" = None) -> "list[Message]":
    return default_bus().consume_messages(agent_id, max_messages)


def consume(agent_id: str, max: "Optional[int]" = None, timeout: "Optional[float]" = None) -> "list[Message]":
    return default_bus().consume(agent_id, max, timeout)


def nack_messages(agent_id: str, msg_ids: "Any") -> int:
    return default_bus().nack_messages(agent_id, msg_ids)


def claim_messages(agent_id: str, max_messages: "Optional[int]" = None) -> "list[Message]":
    return default_bus().claim_messages(agent_id, max_messages)


def ack_messages(agent_id: str, msg_ids: "Any") -> int:
    return default_bus().ack_messages(agent_id, msg_ids)


def recover(agent_id: "Optional[str]" = None) -> int:
    return default_bus().recover(agent_id)


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
    "BackendUnavailable",
    "BackpressureTimeout",
    "CircuitOpen",
    "BusClosed",
    "CfnError",
    "CfnOSError",
    "Config",
    "ConfigError",
    "InboxFull",
    "InboxLocked",
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
    "ack_messages",
    "alerts_summary",
    "apply_dynamic_rate_limit",
    "check_inbox_capacity",
    "claim_messages",
    "cleanup_message_bus",
    "cleanup_message_bus_system",
    "cleanup_rate_limiting",
    "clear_inbox",
    "clear_metrics",
    "consume",
    "consume_messages",
    "default_bus",
    "emit_alert",
    "emit_metric",
    "get_all_inbox_stats",
    "get_batch_size",
    "get_inbox_size",
    "get_inbox_utilization",
    "get_system_load",
    "init_message_bus",
    "init_message_bus_system",
    "message_count",
    "metrics_stats",
    "monitor_dynamic_rate_limit",
    "monitor_inbox_overflow",
    "nack_messages",
    "receive_messages",
    "recover",
    "send_message",
    "send_with_backpressure",
]
