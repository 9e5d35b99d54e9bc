"""Configuration: the bash original's environment variables, with its defaults.

``SETTINGS`` is the one table of every variable: its attribute name, default
and bounds. ``Config.from_env()`` reads them and raises ConfigError naming the
variable when one is invalid. Importing this module never reads the
environment.
"""
from __future__ import annotations

import os
from typing import Mapping, NamedTuple, Optional, Union

from cfn_fast.errors import ConfigError

BACKOFFS = ("fixed", "exponential", "decorrelated")


class Setting(NamedTuple):
    attr: str
    env: str
    default: Union[int, float, str, None]
    kind: str  # "int", "float", "str", "path", "backoff", "bool", "group"
    minimum: Optional[float] = None
    help: str = ""


SETTINGS: tuple[Setting, ...] = (
    Setting("base_dir", "MESSAGE_BASE_DIR", "/dev/shm/cfn-mvp/messages", "path", None,
            "folder holding one folder per agent"),
    Setting("max_inbox_size", "MAX_INBOX_SIZE", 1000, "int", 1, "messages an inbox holds at most"),
    Setting("backpressure_wait_ms", "BACKPRESSURE_WAIT_MS", 100, "int", 0, "wait between retries, ms"),
    Setting("backpressure_max_retries", "BACKPRESSURE_MAX_RETRIES", 50, "int", 0,
            "retries before a backpressure send fails"),
    Setting("backpressure_backoff", "BACKPRESSURE_BACKOFF", "fixed", "backoff", None,
            "retry waits: fixed, exponential or decorrelated"),
    Setting("backpressure_max_total_ms", "BACKPRESSURE_MAX_TOTAL_MS", 0, "int", 0,
            "total wait budget in ms; 0 means WAIT_MS x MAX_RETRIES"),
    Setting("max_message_bytes", "MAX_MESSAGE_BYTES", 1048576, "int", 1, "largest payload, bytes"),
    Setting("rate_limit_check_interval", "RATE_LIMIT_CHECK_INTERVAL", 5.0, "float", 0.001,
            "seconds between load checks"),
    Setting("rate_limit_high_load_threshold", "RATE_LIMIT_HIGH_LOAD_THRESHOLD", 0.8, "float", 0,
            "load per CPU above which the high tier applies"),
    Setting("rate_limit_medium_load_threshold", "RATE_LIMIT_MEDIUM_LOAD_THRESHOLD", 0.5, "float", 0,
            "load per CPU above which the medium tier applies"),
    Setting("batch_size", "CFN_BATCH_SIZE", 10, "int", 1, "default batch size"),
    Setting("metrics_file", "METRICS_FILE", "/dev/shm/cfn-metrics.jsonl", "path", None,
            "JSONL file metrics are appended to"),
    Setting("alert_log_file", "ALERT_LOG_FILE", "/dev/shm/cfn-alerts.jsonl", "path", None,
            "JSONL file alerts are appended to"),
    Setting("alert_cooldown_seconds", "ALERT_COOLDOWN_SECONDS", 300.0, "float", 0,
            "an alert for one type and agent is sent at most once per this many seconds"),
    Setting("metrics_enabled", "CFN_METRICS", True, "bool", None, "write metric lines (1) or not (0)"),
    Setting("fsync", "CFN_FSYNC", False, "bool", None, "fsync each delivery, then its folder (for disks)"),
    Setting("group", "CFN_GROUP", None, "group", None,
            "open folders and files to this group (name or gid) for multi-user swarms"),
)

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _parse(s: Setting, raw: str) -> object:
    text = raw.strip()
    if s.kind == "int":
        try:
            value: Union[int, float] = int(text, 10)
        except ValueError:
            raise ConfigError(f"{s.env}={raw!r} is not a whole number") from None
    elif s.kind == "float":
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"{s.env}={raw!r} is not a number") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{s.env}={raw!r} is not a finite number")
    elif s.kind == "backoff":
        if text not in BACKOFFS:
            raise ConfigError(f"{s.env}={raw!r} is not one of {', '.join(BACKOFFS)}")
        return text
    elif s.kind == "bool":
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ConfigError(f"{s.env}={raw!r} is not a boolean (use 1 or 0)")
    elif s.kind == "group":
        return _parse_group(s, text)
    else:  # path / str
        if not text:
            raise ConfigError(f"{s.env} is set but empty")
        if "\0" in raw:
            raise ConfigError(f"{s.env} contains a NUL byte")
        return raw
    if s.minimum is not None and value < s.minimum:
        if s.minimum == 1:
            raise ConfigError(f"{s.env}={raw!r} must be at least 1")
        if s.minimum == 0:
            raise ConfigError(f"{s.env}={raw!r} must not be negative")
        raise ConfigError(f"{s.env}={raw!r} must be greater than 0")
    return value


def _parse_group(s: Setting, text: str) -> Optional[int]:
    if not text:
        return None
    if text.isdigit():
        return int(text)
    import grp

    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise ConfigError(f"{s.env}={text!r} names no group on this machine") from None


class Config:
    """The settings in force for one bus. Build it with ``Config.from_env()``,
    or pass keyword arguments named as the attributes of ``SETTINGS``."""

    __slots__ = tuple(s.attr for s in SETTINGS)

    base_dir: str
    max_inbox_size: int
    backpressure_wait_ms: int
    backpressure_max_retries: int
    backpressure_backoff: str
    backpressure_max_total_ms: int
    max_message_bytes: int
    rate_limit_check_interval: float
    rate_limit_high_load_threshold: float
    rate_limit_medium_load_threshold: float
    batch_size: int
    metrics_file: str
    alert_log_file: str
    alert_cooldown_seconds: float
    metrics_enabled: bool
    fsync: bool
    group: Optional[int]

    def __init__(self, **values: object) -> None:
        known = {s.attr: s for s in SETTINGS}
        for name in values:
            if name not in known:
                raise ConfigError(f"unknown setting {name!r}")
        for s in SETTINGS:
            value = values.get(s.attr, s.default)
            if s.attr in values and value is not None and s.kind not in ("path", "backoff", "bool", "group"):
                value = _parse(s, str(value))
            elif s.kind == "backoff" and value not in BACKOFFS:
                raise ConfigError(f"{s.env}={value!r} is not one of {', '.join(BACKOFFS)}")
            object.__setattr__(self, s.attr, value)
        self._check()

    def _check(self) -> None:
        if self.rate_limit_medium_load_threshold > self.rate_limit_high_load_threshold:
            raise ConfigError(
                "RATE_LIMIT_MEDIUM_LOAD_THRESHOLD "
                f"({self.rate_limit_medium_load_threshold}) is above RATE_LIMIT_HIGH_LOAD_THRESHOLD "
                f"({self.rate_limit_high_load_threshold})"
            )

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Config is immutable; use replace()")

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> "Config":
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for s in SETTINGS:
            raw = env.get(s.env)
            if raw is not None:
                values[s.attr] = _parse(s, raw)
        return cls._trusted(values)

    @classmethod
    def _trusted(cls, values: Mapping[str, object]) -> "Config":
        self = cls.__new__(cls)
        for s in SETTINGS:
            object.__setattr__(self, s.attr, values.get(s.attr, s.default))
        self._check()
        return self

    def replace(self, **changes: object) -> "Config":
        values = {s.attr: getattr(self, s.attr) for s in SETTINGS}
        values.update(changes)
        return Config(**values)

    def as_dict(self) -> dict[str, object]:
        return {s.attr: getattr(self, s.attr) for s in SETTINGS}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Config) and self.as_dict() == other.as_dict()

    def __hash__(self) -> int:
        return hash(tuple(self.as_dict().items()))

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.as_dict().items())
        return f"Config({inner})"

    @property
    def dir_mode(self) -> int:
        """0700 by default: /dev/shm is shared by every local user. 02770 with CFN_GROUP."""
        return 0o2770 if self.group is not None else 0o700

    @property
    def file_mode(self) -> int:
        return 0o660 if self.group is not None else 0o600


__all__ = ["BACKOFFS", "Config", "SETTINGS", "Setting"]
