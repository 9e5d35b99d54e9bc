"""Configuration: the bash original's environment variables, with its defaults.

``SETTINGS`` is the one table of every variable: its attribute name, default
and bounds. ``Config.from_env()`` reads them and raises ConfigError naming the
variable when one is invalid; ``Config(**values)`` applies the same checks to
Python values. Importing this module never reads the environment.

Every numeric setting has a maximum as well as a minimum, chosen so that what
the C core later computes from it fits an int64 of nanoseconds with room to
spare: the longest wait, 3,600,000 ms, shifted by the exponential backoff's
2**20 is 3.8e18 ns; the default budget, WAIT_MS x MAX_RETRIES, is at most
3.6e18 ns; the longest alert cooldown is 3.2e16 ns. An int64 holds 9.2e18.
"""
from __future__ import annotations

import os
from typing import Mapping, NamedTuple, Optional, Union

from cfn_fast.errors import ConfigError

BACKOFFS = ("fixed", "exponential", "decorrelated")
PRIORITIES = ("normal", "high")
ADAPTIVE_MODES = ("off", "delay")
# The settings whose value is one word of a list, by kind.
CHOICES: dict[str, tuple[str, ...]] = {"backoff": BACKOFFS, "priority": PRIORITIES, "adaptive": ADAPTIVE_MODES}


class Setting(NamedTuple):
    attr: str
    env: str
    default: Union[int, float, str, None]
    kind: str  # "int", "float", "str", "path", "bool", "group", "url", "secret", or one of CHOICES
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    help: str = ""

    def shown(self, value: object) -> str:
        """The value as logs and listings may show it: secrets masked, a URL's password too."""
        if value is None:
            return ""
        if self.kind == "secret":
            return "***"
        if self.kind == "url":
            return redact_url(str(value))
        return str(value)

    def range_text(self) -> str:
        """The allowed range as error messages and help show it: "1 to 1000000000"."""
        return f"{_num(self.minimum)} to {_num(self.maximum)}"


def _num(v: Optional[float]) -> str:
    if v is None:
        return "?"
    return str(int(v)) if float(v).is_integer() else repr(float(v))


GID_MAX = 2**31 - 1  # a gid travels to C as an int32; -1 means "no group"

SETTINGS: tuple[Setting, ...] = (
    Setting("base_dir", "MESSAGE_BASE_DIR", "/dev/shm/cfn-mvp/messages", "path", None, None,
            "folder holding one folder per agent"),
    Setting("max_inbox_size", "MAX_INBOX_SIZE", 1000, "int", 1, 1_000_000_000,
            "messages an inbox holds at most; 1 to 1000000000"),
    Setting("backpressure_wait_ms", "BACKPRESSURE_WAIT_MS", 100, "int", 0, 3_600_000,
            "wait between retries, ms; 0 to 3600000 (an hour)"),
    Setting("backpressure_max_retries", "BACKPRESSURE_MAX_RETRIES", 50, "int", 0, 1_000_000,
            "retries before a backpressure send fails; 0 to 1000000"),
    Setting("backpressure_backoff", "BACKPRESSURE_BACKOFF", "fixed", "backoff", None, None,
            "retry waits: fixed, exponential or decorrelated"),
    Setting("backpressure_max_total_ms", "BACKPRESSURE_MAX_TOTAL_MS", 0, "int", 0, 604_800_000,
            "total wait budget in ms, 0 meaning WAIT_MS x MAX_RETRIES; 0 to 604800000 (7 days)"),
    Setting("max_message_bytes", "MAX_MESSAGE_BYTES", 1048576, "int", 1, 268_435_456,
            "largest payload, bytes; 1 to 268435456 (256 MiB)"),
    Setting("rate_limit_check_interval", "RATE_LIMIT_CHECK_INTERVAL", 5.0, "float", 0.001, 86_400,
            "seconds between load checks; 0.001 to 86400 (a day)"),
    Setting("rate_limit_high_load_threshold", "RATE_LIMIT_HIGH_LOAD_THRESHOLD", 0.8, "float", 0, 1000,
            "load per CPU above which the high tier applies; 0 to 1000"),
    Setting("rate_limit_medium_load_threshold", "RATE_LIMIT_MEDIUM_LOAD_THRESHOLD", 0.5, "float", 0, 1000,
            "load per CPU above which the medium tier applies; 0 to 1000"),
    Setting("batch_size", "CFN_BATCH_SIZE", 10, "int", 1, 1_000_000, "default batch size; 1 to 1000000"),
    Setting("metrics_file", "METRICS_FILE", None, "path", None, None,
            "JSONL file metrics are appended to (default <MESSAGE_BASE_DIR>/.cfn-metrics.jsonl)"),
    Setting("alert_log_file", "ALERT_LOG_FILE", None, "path", None, None,
            "JSONL file alerts are appended to (default <MESSAGE_BASE_DIR>/.cfn-alerts.jsonl)"),
    Setting("alert_cooldown_seconds", "ALERT_COOLDOWN_SECONDS", 300.0, "float", 0, 31_536_000,
            "an alert for one type and agent is sent at most once per this many seconds; "
            "0 to 31536000 (a year)"),
    Setting("metrics_enabled", "CFN_METRICS", True, "bool", None, None, "write metric lines (1) or not (0)"),
    Setting("metrics_top_agents", "METRICS_TOP_AGENTS", 20, "int", 0, 16384,
            "inboxes exported to Prometheus with their own agent label (the fullest); the rest are "
            "summed as agent=\"other\"; 0 to 16384"),
    Setting("fsync", "CFN_FSYNC", False, "bool", None, None, "fsync each delivery, then its folder (for disks)"),
    Setting("group", "CFN_GROUP", None, "group", 0, GID_MAX,
            "open folders and files to this group for multi-user swarms: a group name, "
            "or a gid 0 to 2147483647"),
    Setting("lock_timeout_ms", "LOCK_TIMEOUT_MS", 10000, "int", 1, 3_600_000,
            "longest wait, ms, for an inbox's .lock held by another process before a call fails "
            "with InboxLocked; 1 to 3600000 (an hour)"),
    Setting("outbox_max", "OUTBOX_MAX", 1000, "int", 0, 1_000_000_000,
            "outbox copies kept per sender, oldest pruned first, 0 meaning unbounded; 0 to 1000000000"),
    Setting("metrics_max_bytes", "METRICS_MAX_BYTES", 64 << 20, "int", 0, 1 << 40,
            "METRICS_FILE is rotated to METRICS_FILE.1 past this size, 0 meaning never; "
            "0 to 1099511627776 (1 TiB)"),
    Setting("text_payloads", "CFN_TEXT_PAYLOADS", False, "bool", None, None,
            "a payload that is not JSON is sent as a JSON string (1) or refused (0); "
            "the bash drop-in sets 1, as the original took plain text"),
    # the thresholds of the original's alerting.sh checks (alerts check)
    Setting("alert_coordination_time_ms", "ALERT_COORDINATION_TIME_MS", 10000, "int", 0, 86_400_000,
            "coordination.time above this (ms) alerts coordination_time_exceeded; 0 to 86400000"),
    Setting("alert_delivery_rate_pct", "ALERT_DELIVERY_RATE_PCT", 90.0, "float", 0, 100,
            "coordination.delivery_rate below this (%) alerts delivery_rate_low; 0 to 100"),
    Setting("alert_memory_growth_pct", "ALERT_MEMORY_GROWTH_PCT", 10.0, "float", 0, 1_000_000,
            "system.memory_mb growth above this (%) alerts memory_growth_high; 0 to 1000000"),
    Setting("alert_fd_growth", "ALERT_FD_GROWTH", 100, "int", 0, 1_000_000_000,
            "system.open_fds growth above this alerts fd_growth_high; 0 to 1000000000"),
    Setting("alert_error_rate_pct", "ALERT_ERROR_RATE_PCT", 5.0, "float", 0, 100,
            "coordination.error_rate above this (%) alerts error_rate_high; 0 to 100"),
    Setting("alert_queue_depth", "ALERT_QUEUE_DEPTH", 1000, "int", 0, 1_000_000_000,
            "coordination.queue_depth above this alerts queue_depth_high; 0 to 1000000000"),
    Setting("bus_url", "MESSAGE_BUS_URL", None, "url", None, None,
            "where messages live when not in MESSAGE_BASE_DIR: redis://host:port/db, rediss://, "
            "unix:///path?db=N, redis+cluster://host:port (Redis Cluster); ?prefix=NAME names the bus. "
            "Needs cfn-fast[redis]"),
    Setting("redis_password", "REDIS_PASSWORD", None, "secret", None, None,
            "password for MESSAGE_BUS_URL's server when the URL carries none; never shown"),
    Setting("redis_timeout_ms", "REDIS_TIMEOUT_MS", 5000, "int", 1, 3_600_000,
            "longest wait, ms, for the Redis server to answer before a call fails with BackendUnavailable; "
            "1 to 3600000 (an hour)"),
    Setting("claim_timeout_ms", "CFN_CLAIM_TIMEOUT_MS", 30000, "int", 100, 86_400_000,
            "Redis backend: claims of a consumer that stopped renewing them (dead, or paused) return to the "
            "inbox after this many ms; 100 to 86400000 (a day)"),
    # flow control (README: Flow control)
    Setting("breaker_failures", "CFN_BREAKER_FAILURES", 5, "int", 0, 1000,
            "failed sends in a row to one inbox that open its circuit (sends then fail at once with "
            "CircuitOpen), 0 meaning never by count; 0 to 1000"),
    Setting("breaker_failure_rate", "CFN_BREAKER_FAILURE_RATE", 0, "int", 0, 100,
            "share of failed sends (%) over CFN_BREAKER_WINDOW_MS that opens an inbox's circuit, 0 meaning "
            "never by rate; 0 to 100"),
    Setting("breaker_window_ms", "CFN_BREAKER_WINDOW_MS", 10000, "int", 100, 3_600_000,
            "the sliding window of the failure rate, ms; 100 to 3600000 (an hour)"),
    Setting("breaker_min_calls", "CFN_BREAKER_MIN_CALLS", 10, "int", 1, 1_000_000,
            "sends in the window before the failure rate counts; 1 to 1000000"),
    Setting("breaker_cooldown_ms", "CFN_BREAKER_COOLDOWN_MS", 5000, "int", 1, 3_600_000,
            "an opened circuit refuses sends this long, then lets probe sends through; 1 to 3600000 (an hour)"),
    Setting("breaker_probes", "CFN_BREAKER_PROBES", 1, "int", 1, 63,
            "probe sends a half-open circuit lets through: one success closes it, one failure opens it "
            "again; 1 to 63"),
    Setting("priority", "CFN_PRIORITY", "normal", "priority", None, None,
            "the priority of sends that name none: normal, or high (they may use the inbox's headroom, "
            "and consumers take them first)"),
    Setting("priority_headroom_pct", "CFN_PRIORITY_HEADROOM_PCT", 10, "int", 0, 100,
            "places above an inbox's capacity, in % of it (rounded up), that only high-priority sends may "
            "fill; 0 to 100"),
    Setting("priority_ratio", "CFN_PRIORITY_RATIO", 4, "int", 0, 1000,
            "high-priority messages a consumer takes in a row while normal ones wait, 0 meaning no limit "
            "(normal ones may starve); 0 to 1000"),
    Setting("adaptive_limit", "CFN_ADAPTIVE_LIMIT", "off", "adaptive", None, None,
            "off, or delay: consumers lower an inbox's effective limit while the age of the messages they "
            "take stays above CFN_ADAPTIVE_TARGET_MS, and raise it back when it falls (every sender obeys it)"),
    Setting("adaptive_target_ms", "CFN_ADAPTIVE_TARGET_MS", 50, "int", 1, 600_000,
            "the queueing delay (a message's age when taken) the adaptive limit aims at, ms; 1 to 600000"),
    Setting("adaptive_interval_ms", "CFN_ADAPTIVE_INTERVAL_MS", 100, "int", 10, 60_000,
            "how often the adaptive limit moves, ms; 10 to 60000"),
    Setting("adaptive_floor", "CFN_ADAPTIVE_FLOOR", 1, "int", 1, 1_000_000_000,
            "the adaptive limit never goes below this many messages; 1 to 1000000000"),
)

URL_SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster")


def redact_url(url: str) -> str:
    """The URL with its password (if any) replaced by ***."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    auth, at, host = rest.rpartition("@")
    if not at or "/" in auth:
        return url
    user, colon, _ = auth.partition(":")
    return f"{scheme}://{user}{':***' if colon else ''}@{host}" if user or colon else f"{scheme}://***@{host}"


def _parse_url(s: Setting, raw: str) -> str:
    """A bus URL, checked for what can be checked without a server: scheme,
    host, port, database and query. Errors never repeat the password."""
    from urllib.parse import parse_qs, urlsplit

    shown = repr(redact_url(raw))
    if "\0" in raw or any(c in raw for c in _SPACE):
        raise ConfigError(f"{s.env}={shown} contains a space or a control character")
    try:
        u = urlsplit(raw)
        port = u.port
        query = parse_qs(u.query, keep_blank_values=True, strict_parsing=bool(u.query))
    except ValueError as e:
        why = "port out of range 1-65535" if "port" in str(e).lower() else "not a URL"
        raise ConfigError(f"{s.env}={shown} is not a valid URL ({why})") from None
    if u.scheme not in URL_SCHEMES:
        raise ConfigError(f"{s.env}={shown}: scheme must be one of {', '.join(URL_SCHEMES)}")
    if u.scheme == "unix":
        if not u.path:
            raise ConfigError(f"{s.env}={shown}: a unix:// URL needs the socket's path")
    else:
        if not u.hostname:
            raise ConfigError(f"{s.env}={shown}: no host")
        if port == 0:
            raise ConfigError(f"{s.env}={shown} is not a valid URL (port out of range 1-65535)")
        db = u.path.strip("/")
        if db and (not _DIGITS.issuperset(db) or len(db) > 5 or "cluster" in u.scheme and db != "0"):
            raise ConfigError(f"{s.env}={shown}: the database must be a number (0 only with Redis Cluster)")
    for key, values in query.items():
        if key not in ("db", "prefix") or len(values) != 1:
            raise ConfigError(f"{s.env}={shown}: unknown or repeated query parameter {key!r} (db, prefix)")
    if "db" in query and not (query["db"][0] and _DIGITS.issuperset(query["db"][0]) and len(query["db"][0]) < 6):
        raise ConfigError(f"{s.env}={shown}: db must be a number")
    prefix = query.get("prefix", ["cfn"])[0]
    if not prefix or len(prefix) > 64 or not _PREFIX_CHARS.issuperset(prefix):
        raise ConfigError(f"{s.env}={shown}: prefix must be 1 to 64 of [A-Za-z0-9._-]")
    return raw

# Settings whose default is a file in the base folder (dotfiles: never taken for an agent).
_IN_BASE = {"metrics_file": ".cfn-metrics.jsonl", "alert_log_file": ".cfn-alerts.jsonl"}

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_SPACE = " \t\n\r\f\v"
_DIGITS = frozenset("0123456789")
_FLOAT_CHARS = frozenset("0123456789+-.eE")
_NOT_FINITE = {"nan", "inf", "infinity"}
_PREFIX_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def default_path(attr: str, base_dir: str) -> str:
    """Where a file setting left unset lives: <base_dir>/.cfn-metrics.jsonl, ..."""
    return os.path.join(base_dir, _IN_BASE[attr])


def _parse(s: Setting, raw: str) -> object:
    """A setting's value from its environment text."""
    text = raw.strip(_SPACE)
    if s.kind == "int":
        body = text[1:] if text[:1] in ("+", "-") else text
        if not body or not _DIGITS.issuperset(body):  # not int(): it takes "1_000" and non-ASCII digits
            raise ConfigError(f"{s.env}={_short(raw)} is not a whole number")
        if len(body) > 30:  # far out of range; int() of a huge text costs, and may refuse it
            raise _out_of_range(s, raw, text.startswith("-"))
        return _in_range(s, int(text, 10), raw)
    if s.kind == "float":
        if text.lstrip("+-").lower() in _NOT_FINITE:
            raise ConfigError(f"{s.env}={raw!r} is not a finite number")
        if not text or not _FLOAT_CHARS.issuperset(text):  # not float(): it takes "1_0", "inf", "١"
            raise ConfigError(f"{s.env}={_short(raw)} is not a number")
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"{s.env}={_short(raw)} is not a number") from None
        return _in_range(s, value, raw)  # 1e400 is inf: out of range
    if s.kind in CHOICES:
        if text not in CHOICES[s.kind]:
            raise ConfigError(f"{s.env}={_short(raw)} is not one of {', '.join(CHOICES[s.kind])}")
        return text
    if s.kind == "bool":
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ConfigError(f"{s.env}={_short(raw)} is not a boolean (use 1 or 0)")
    if s.kind == "group":
        return _parse_group(s, text, raw)
    if s.kind == "url":
        if not text:
            raise ConfigError(f"{s.env} is set but empty")
        return _parse_url(s, text)
    if s.kind == "secret":
        if not raw.strip(_SPACE) or "\0" in raw:
            raise ConfigError(f"{s.env} is set but empty or contains a NUL byte")
        return raw
    # path / str
    if not text:
        raise ConfigError(f"{s.env} is set but empty")
    if "\0" in raw:
        raise ConfigError(f"{s.env} contains a NUL byte")
    return raw


def _out_of_range(s: Setting, shown: object, below: bool) -> ConfigError:
    text = f"{s.env}={_short(shown)} is out of range ({s.range_text()})"
    if below:
        text += ": it must not be negative" if s.minimum == 0 else f": it must be at least {_num(s.minimum)}"
    return ConfigError(text)


def _short(value: object) -> str:
    """A value as an error shows it: repr, cut short when it is long."""
    text = repr(value)
    return text if len(text) <= 60 else text[:50] + "...(" + str(len(text)) + " chars)"


def _in_range(s: Setting, value: Union[int, float], shown: object) -> Union[int, float]:
    if value != value:
        raise ConfigError(f"{s.env}={_short(shown)} is not a finite number")
    if s.minimum is not None and value < s.minimum:
        raise _out_of_range(s, shown, True)
    if s.maximum is not None and value > s.maximum:
        raise _out_of_range(s, shown, False)
    return value


def _parse_group(s: Setting, text: str, raw: str) -> Optional[int]:
    if not text:
        return None
    body = text[1:] if text[:1] in ("+", "-") else text
    if body and _DIGITS.issuperset(body):  # a gid (ASCII digits only: "١٢٣" is a name, and none exists)
        if len(body) > 30:
            raise _out_of_range(s, raw, text.startswith("-"))
        return int(_in_range(s, int(text, 10), raw))
    import grp

    try:
        gid = grp.getgrnam(text).gr_gid
    except KeyError:
        raise ConfigError(f"{s.env}={_short(raw)} names no group on this machine") from None
    return int(_in_range(s, gid, raw))


def _check(s: Setting, value: object) -> object:
    """A value given to Config(...) as Python data, held to the rules of the
    environment's text: text is parsed as if read from the environment."""
    if isinstance(value, str) and s.kind not in ("path", "secret"):
        return _parse(s, value)
    if s.kind == "secret":
        if not isinstance(value, str):
            raise ConfigError(f"{s.env} must be a str")
        return _parse(s, value)
    if s.kind in ("int", "group"):
        if isinstance(value, bool) or not isinstance(value, int):  # 5.0 is not a whole number either
            raise ConfigError(f"{s.env}={_short(value)} is not a whole number")
        return _in_range(s, value, value)
    if s.kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{s.env}={_short(value)} is not a number")
        try:
            number = float(value)
        except OverflowError:  # an int too large for a float
            raise _out_of_range(s, value, False) from None
        return _in_range(s, number, value)
    if s.kind == "bool":
        if value in (0, 1) and isinstance(value, int):  # True, False, 1 or 0, as the environment's 1 or 0
            return bool(value)
        raise ConfigError(f"{s.env}={_short(value)} is not a boolean (use True or False)")
    if s.kind in CHOICES:
        raise ConfigError(f"{s.env}={_short(value)} is not one of {', '.join(CHOICES[s.kind])}")
    # path
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise ConfigError(f"{s.env}={_short(value)} is not a path")
    if not value.strip(_SPACE):
        raise ConfigError(f"{s.env} is empty")
    if "\0" in value:
        raise ConfigError(f"{s.env} contains a NUL byte")
    return value


class Config:
    """The settings in force for one bus. Build it with ``Config.from_env()``,
    or pass keyword arguments named as the attributes of ``SETTINGS`` (None
    means the default). ``metrics_file`` and ``alert_log_file`` left unset
    follow ``base_dir``: ``Config(base_dir=b).metrics_file`` is
    ``b/.cfn-metrics.jsonl``, and so after ``replace(base_dir=...)``."""

    __slots__ = tuple(s.attr for s in SETTINGS) + ("_unset",)

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
    metrics_top_agents: int
    fsync: bool
    group: Optional[int]
    lock_timeout_ms: int
    outbox_max: int
    metrics_max_bytes: int
    text_payloads: bool
    alert_coordination_time_ms: int
    alert_delivery_rate_pct: float
    alert_memory_growth_pct: float
    alert_fd_growth: int
    alert_error_rate_pct: float
    alert_queue_depth: int
    bus_url: Optional[str]
    redis_password: Optional[str]
    redis_timeout_ms: int
    claim_timeout_ms: int
    breaker_failures: int
    breaker_failure_rate: int
    breaker_window_ms: int
    breaker_min_calls: int
    breaker_cooldown_ms: int
    breaker_probes: int
    priority: str
    priority_headroom_pct: int
    priority_ratio: int
    adaptive_limit: str
    adaptive_target_ms: int
    adaptive_interval_ms: int
    adaptive_floor: int
    _unset: frozenset[str]  # file settings that follow base_dir

    def __init__(self, **values: object) -> None:
        known = {s.attr: s for s in SETTINGS}
        for name in values:
            if name not in known:
                raise ConfigError(f"unknown setting {name!r}")
        self._fill({s.attr: _check(s, values[s.attr]) for s in SETTINGS if values.get(s.attr) is not None})

    def _fill(self, values: Mapping[str, object]) -> None:
        base = values.get("base_dir", SETTINGS[0].default)
        assert isinstance(base, str)
        unset = []
        for s in SETTINGS:
            if s.attr in values:
                value = values[s.attr]
            elif s.attr in _IN_BASE:
                value = default_path(s.attr, base)
                unset.append(s.attr)
            else:
                value = s.default
            object.__setattr__(self, s.attr, value)
        object.__setattr__(self, "_unset", frozenset(unset))
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
    def from_env(cls, environ: Optional[Mapping[str, str]] = None, **overrides: object) -> "Config":
        """The settings the environment gives (``environ``, else os.environ),
        with ``overrides`` (attribute names, as Config(...) takes them) over
        them: ``Config.from_env(max_inbox_size=10)`` keeps MESSAGE_BASE_DIR
        and the telemetry files' places, where ``Config(max_inbox_size=10)``
        is every other setting's default."""
        if overrides:
            return cls.from_env(environ).replace(**overrides)
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for s in SETTINGS:
            raw = env.get(s.env)
            if raw is not None:
                value = _parse(s, raw)
                if value is not None:  # CFN_GROUP="" is unset
                    values[s.attr] = value
        self = cls.__new__(cls)
        self._fill(values)
        return self

    def replace(self, **changes: object) -> "Config":
        values = {s.attr: getattr(self, s.attr) for s in SETTINGS if s.attr not in self._unset}
        values.update(changes)
        return Config(**values)

    def as_dict(self) -> dict[str, object]:
        return {s.attr: getattr(self, s.attr) for s in SETTINGS}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Config) and self.as_dict() == other.as_dict()

    def __hash__(self) -> int:
        return hash(tuple(self.as_dict().items()))

    def __repr__(self) -> str:
        inner = ", ".join(f"{s.attr}={s.shown(getattr(self, s.attr))!r}" if s.kind in ("url", "secret")
                          else f"{s.attr}={getattr(self, s.attr)!r}" for s in SETTINGS)
        return f"Config({inner})"

    @property
    def dir_mode(self) -> int:
        """0700 by default: /dev/shm is shared by every local user. 02770 with CFN_GROUP."""
        return 0o2770 if self.group is not None else 0o700

    @property
    def file_mode(self) -> int:
        return 0o660 if self.group is not None else 0o600


__all__ = ["ADAPTIVE_MODES", "BACKOFFS", "CHOICES", "PRIORITIES", "Config", "SETTINGS", "Setting", "URL_SCHEMES", "default_path", "redact_url"]
