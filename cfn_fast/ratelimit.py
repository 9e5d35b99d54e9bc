"""Dynamic rate limiting: the seed's three load tiers, published in the shared
state so every sender on the machine uses the new retry wait on its next
retry (the original ``export``ed it inside the monitor's own shell: defect 8),
and the monitor that applies them periodically.
"""
from __future__ import annotations

import os
import threading
import time
from typing import TYPE_CHECKING, Any, NamedTuple, Optional

from cfn_fast import metrics
from cfn_fast.defaults import resolve
from cfn_fast.errors import CfnError, CfnOSError, InvalidArgument
from cfn_fast.lifecycle import Lifecycle, check_interval, check_iterations, report
from cfn_fast.storage import RateSettings, rate_fresh

if TYPE_CHECKING:
    from cfn_fast.bus import MessageBus
    from cfn_fast.config import Config


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1  # what nproc prints
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def get_system_load() -> float:
    """The 1-minute load average per CPU, two decimals (may exceed 1)."""
    try:
        one = os.getloadavg()[0]
    except (AttributeError, OSError):
        try:
            import psutil  # only where the OS call is missing

            one = psutil.getloadavg()[0]
        except Exception as e:  # ImportError, or psutil's own failure
            raise CfnOSError(0, f"cannot read the system load average: {e}") from None
    return round(one / _cpu_count(), 2)


class Tier(NamedTuple):
    name: str
    batch_size: int
    wait_ms: int


TIERS: dict[str, Tier] = {
    "high": Tier("high", 5, 200),
    "medium": Tier("medium", 10, 100),
    "low": Tier("low", 20, 50),
}


def choose_tier(load_per_cpu: float, config: "Config") -> Tier:
    """The seed's tiers: above the high threshold, above the medium one, else low."""
    if load_per_cpu > config.rate_limit_high_load_threshold:
        return TIERS["high"]
    if load_per_cpu > config.rate_limit_medium_load_threshold:
        return TIERS["medium"]
    return TIERS["low"]


def _stale_after_ms(config: "Config") -> int:
    """Readers take published settings as stale three check intervals after
    their update (the publisher's three, when longer: storage.rate_fresh, the
    rule the C send loop applies)."""
    return int(config.rate_limit_check_interval * 3000)


def _fresh(rs: RateSettings, config: "Config", now_ns: Optional[int] = None) -> bool:
    return rate_fresh(rs, _stale_after_ms(config), time.time_ns() if now_ns is None else now_ns)


def apply_dynamic_rate_limit(*, bus: Optional["MessageBus"] = None, load_per_cpu: Optional[float] = None,
                             interval: Optional[float] = None) -> dict[str, Any]:
    """One load check: picks the tier, publishes its batch size and wait in the
    shared state (every sender's next retry uses the wait; ``get_batch_size``
    returns the batch size) and emits system.load_per_cpu,
    rate_limit.batch_size and rate_limit.backpressure_wait_ms.
    ``load_per_cpu`` overrides the measured load (for tests and what-ifs)."""
    b = resolve(bus)
    cfg = b.config
    if load_per_cpu is None:
        load = get_system_load()
    else:
        if isinstance(load_per_cpu, bool) or not isinstance(load_per_cpu, (int, float)) or \
                not (0 <= load_per_cpu < float("inf")):
            raise InvalidArgument(f"load_per_cpu must be a finite number >= 0, not {load_per_cpu!r}")
        load = float(load_per_cpu)
    every = cfg.rate_limit_check_interval if interval is None else check_interval(interval)
    tier = choose_tier(load, cfg)
    now = time.time_ns()
    b.storage.rate_publish(RateSettings(tier.batch_size, tier.wait_ms, int(round(load * 1000)), now,
                                        int(every * 1000)))
    b.storage.counter_add("rate_limit_adjustments", 1)
    lines = b"".join((
        metrics.format_metric("system.load_per_cpu", int(round(load * 100)), "percent"),
        metrics.format_metric("rate_limit.batch_size", tier.batch_size, "count"),
        metrics.format_metric("rate_limit.backpressure_wait_ms", tier.wait_ms, "milliseconds"),
    ))
    metrics.write_lines(b.storage, lines, 3)
    return {"load_per_cpu": load, "batch_size": tier.batch_size, "wait_ms": tier.wait_ms,
            "tier": tier.name, "updated_ns": now}


def current_rate_limit(*, bus: Optional["MessageBus"] = None) -> dict[str, Any]:
    """The settings in force now: published ones while fresh, else the configured ones."""
    b = resolve(bus)
    cfg = b.config
    rs = b.storage.rate_read() or RateSettings(0, 0, 0, 0, 0)
    fresh = _fresh(rs, cfg)
    return {
        "published": fresh,
        "batch_size": rs.batch_size if fresh and rs.batch_size > 0 else cfg.batch_size,
        "wait_ms": rs.wait_ms if fresh and rs.wait_ms > 0 else cfg.backpressure_wait_ms,
        "load_per_cpu": rs.load_milli / 1000 if rs.updated_ns else None,
        "age_ms": (time.time_ns() - rs.updated_ns) // 1_000_000 if rs.updated_ns else None,
        "stale_after_ms": max(_stale_after_ms(cfg), 3 * rs.interval_ms),
    }


def get_batch_size(*, bus: Optional["MessageBus"] = None) -> int:
    """The published batch size while fresh (updated within three check
    intervals), else the configured CFN_BATCH_SIZE."""
    b = resolve(bus)
    rs = b.storage.rate_read()
    if rs is not None and rs.batch_size > 0 and _fresh(rs, b.config):
        return int(rs.batch_size)
    return b.config.batch_size



def monitor_dynamic_rate_limit(interval: Optional[float] = None, iterations: Optional[int] = None, *,
                               pidfile: bool = False, bus: Optional["MessageBus"] = None,
                               stop: Optional[threading.Event] = None) -> int:
    """Runs ``apply_dynamic_rate_limit`` every ``interval`` seconds (default
    RATE_LIMIT_CHECK_INTERVAL) until ``iterations`` are done, SIGTERM/SIGINT
    arrives (in the main thread) or ``stop`` is set. With ``pidfile``, writes <base>/.monitors/rate-<pid>.pid. Returns
    the number of checks.

    Readers treat the settings as stale three RATE_LIMIT_CHECK_INTERVALs after
    their last update; when ``interval`` is longer than that interval, the
    monitor re-stamps its last settings in between, so they hold as long as it
    runs and lapse only when it stops."""
    b = resolve(bus)
    every = b.config.rate_limit_check_interval if interval is None else check_interval(interval)
    count = check_iterations(iterations)
    beat = min(every, b.config.rate_limit_check_interval)
    done = 0
    errors: set[str] = set()
    with Lifecycle(b, "rate", pidfile, stop) as life:
        while not life.orphaned() and (count is None or done < count):
            t0 = time.monotonic()
            try:
                apply_dynamic_rate_limit(bus=b, interval=every)
            except (CfnError, OSError) as e:
                report("rate limit", e, errors)
            done += 1
            if count is not None and done >= count:
                break
            while not life.orphaned():
                left = every - (time.monotonic() - t0)
                if left <= beat:
                    life.sleep(left)
                    break
                life.sleep(beat)
                _restamp(b)
    return done


def _restamp(bus: "MessageBus") -> None:
    """Refreshes the published settings' time stamp, keeping them as they are."""
    rs = bus.storage.rate_read()
    if rs is not None and rs.updated_ns:
        bus.storage.rate_publish(rs._replace(updated_ns=time.time_ns()))


__all__ = ["TIERS", "Tier", "apply_dynamic_rate_limit", "choose_tier", "current_rate_limit", "get_batch_size",
           "get_system_load", "monitor_dynamic_rate_limit"]
