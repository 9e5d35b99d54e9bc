"""The monitors, as the public API has them. Everything a monitor decides
lives in the base folder's shared state, so it holds for every process on
the machine. The work is in three modules: ratelimit.py (load tiers and the
rate-limit monitor), overflow.py (the overflow monitor and inbox statistics)
and lifecycle.py (starting, stopping and finding monitors)."""
from __future__ import annotations

from cfn_fast.lifecycle import PID_DIR, cleanup_rate_limiting, list_monitors
from cfn_fast.overflow import HIGH_UTILIZATION, OverflowMonitor, PassResult, get_all_inbox_stats, \
    monitor_inbox_overflow
from cfn_fast.ratelimit import TIERS, Tier, apply_dynamic_rate_limit, choose_tier, current_rate_limit, \
    get_batch_size, get_system_load, monitor_dynamic_rate_limit

__all__ = [
    "HIGH_UTILIZATION",
    "OverflowMonitor",
    "PID_DIR",
    "PassResult",
    "TIERS",
    "Tier",
    "apply_dynamic_rate_limit",
    "choose_tier",
    "cleanup_rate_limiting",
    "current_rate_limit",
    "get_all_inbox_stats",
    "get_batch_size",
    "get_system_load",
    "list_monitors",
    "monitor_dynamic_rate_limit",
    "monitor_inbox_overflow",
]
