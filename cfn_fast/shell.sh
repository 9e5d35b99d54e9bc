# cfn-fast bash drop-in: the functions of the original message-bus.sh,
# rate-limiting.sh, metrics.sh and alerting.sh, with their arguments, output
# and return codes, backed by the cfn-fast command.
#
#   source <(/path/to/venv/bin/cfn-fast shell)    # or: source "$(cfn-fast shell --path)"
#
# Like the original, the settings may be plain shell variables
# (MAX_INBOX_SIZE=10, not exported): each call hands the ones that are set to
# cfn-fast. Return codes: 0 yes/success, 1 the original's "no" (full, failed
# after retries, not found), 2 bad usage or bad input.
#
# Strict mode: the original's rate-limiting.sh ran `set -euo pipefail` in the
# shell that sourced it, and scripts written for it rely on that, so a script
# that sources this gets it too. An interactive shell does not (the first "no"
# would end the session). CFN_DROPIN_STRICT=1 turns it on there as well,
# CFN_DROPIN_STRICT=0 leaves the caller's options alone everywhere.
#
# Plain-text payloads: the original wrote whatever it was given into the file;
# here a payload that is not JSON is sent as a JSON string (CFN_TEXT_PAYLOADS=1,
# unless the caller set it), so no file is ever written that readers cannot parse.
#
# Every function runs the native cfn-fast by its absolute path, so the venv it
# was installed in need not be on PATH or activated. `cfn-fast shell` writes
# that path on the next line; sourced as a file (`cfn-fast shell --path`), the
# file finds the program in the bin folder of the prefix it is installed in,
# and failing that takes the cfn-fast on PATH when it is sourced.
_CFN_FAST_BIN=''
if [[ -z "$_CFN_FAST_BIN" ]]; then
    _cfn_fast_here="${BASH_SOURCE[0]:-}"
    [[ "$_cfn_fast_here" == /* ]] || _cfn_fast_here="$PWD/$_cfn_fast_here"
    # <prefix>/lib/pythonX.Y/site-packages/cfn_fast/shell.sh -> <prefix>/bin/cfn-fast
    if [[ "$_cfn_fast_here" == */lib*/python*/*-packages/cfn_fast/shell.sh &&
          -x "${_cfn_fast_here%/lib*/python*/*-packages/cfn_fast/shell.sh}/bin/cfn-fast" ]]; then
        _CFN_FAST_BIN="${_cfn_fast_here%/lib*/python*/*-packages/cfn_fast/shell.sh}/bin/cfn-fast"
    else
        _CFN_FAST_BIN="$(type -P cfn-fast || true)"
    fi
    unset _cfn_fast_here
    : "${_CFN_FAST_BIN:=cfn-fast}"  # not found: a call fails as a missing command does
fi

case "${CFN_DROPIN_STRICT:-}" in
    1) set -euo pipefail ;;
    0) ;;
    *) [[ $- == *i* ]] || set -euo pipefail ;;
esac

# The variables cfn-fast reads (cfn_fast/config.py SETTINGS; a test keeps this list in step).
_CFN_FAST_SETTINGS=(MESSAGE_BASE_DIR MAX_INBOX_SIZE BACKPRESSURE_WAIT_MS BACKPRESSURE_MAX_RETRIES
    BACKPRESSURE_BACKOFF BACKPRESSURE_MAX_TOTAL_MS MAX_MESSAGE_BYTES RATE_LIMIT_CHECK_INTERVAL
    RATE_LIMIT_HIGH_LOAD_THRESHOLD RATE_LIMIT_MEDIUM_LOAD_THRESHOLD CFN_BATCH_SIZE METRICS_FILE
    ALERT_LOG_FILE ALERT_COOLDOWN_SECONDS CFN_METRICS METRICS_TOP_AGENTS CFN_FSYNC CFN_GROUP LOCK_TIMEOUT_MS OUTBOX_MAX
    METRICS_MAX_BYTES CFN_TEXT_PAYLOADS ALERT_COORDINATION_TIME_MS ALERT_DELIVERY_RATE_PCT
    ALERT_MEMORY_GROWTH_PCT ALERT_FD_GROWTH ALERT_ERROR_RATE_PCT ALERT_QUEUE_DEPTH MESSAGE_BUS_URL REDIS_PASSWORD
    REDIS_TIMEOUT_MS CFN_CLAIM_TIMEOUT_MS CFN_BREAKER_FAILURES CFN_BREAKER_FAILURE_RATE CFN_BREAKER_WINDOW_MS
    CFN_BREAKER_MIN_CALLS CFN_BREAKER_COOLDOWN_MS CFN_BREAKER_PROBES CFN_PRIORITY CFN_PRIORITY_HEADROOM_PCT
    CFN_PRIORITY_RATIO CFN_ADAPTIVE_LIMIT CFN_ADAPTIVE_TARGET_MS CFN_ADAPTIVE_INTERVAL_MS CFN_ADAPTIVE_FLOOR)

# Exports every setting the caller has set (in a subshell about to exec cfn-fast).
_cfn_fast_export() {
    local _cfn_name
    for _cfn_name in "${_CFN_FAST_SETTINGS[@]}"; do
        if [[ -n "${!_cfn_name+x}" ]]; then
            export "${_cfn_name?}"
        fi
    done
}

# Runs cfn-fast with every setting the caller has set in its environment. The
# settings are exported as locals of this function (gone, and the caller's
# variables as they were, when it returns), not in a subshell: the command is
# then the function's last, and in `$(...)` bash execs it in the substitution's
# own process, so a call costs one fork, as `$(/bin/true)` does. From bash 5.0
# a `local` can start with the value of the variable it shadows (shopt
# localvar_inherit, set for that one builtin): one `local -x` of every
# setting's name then exports the set ones (an unset one stays unset, out of
# the environment), at half the cost of a loop over them. A readonly setting
# cannot be made local; then a subshell exports them all, as before.
_cfn_fast() {
    local _cfn_name _cfn_rc=0 _cfn_was=1
    if (( BASH_VERSINFO[0] >= 5 )); then
        shopt -q localvar_inherit || { _cfn_was=; shopt -s localvar_inherit; }
        local -x "${_CFN_FAST_SETTINGS[@]}" 2>/dev/null || _cfn_rc=$?
        [[ -n "$_cfn_was" ]] || shopt -u localvar_inherit
    else
        for _cfn_name in "${_CFN_FAST_SETTINGS[@]}"; do
            if [[ -n "${!_cfn_name+x}" ]]; then
                if [[ "${!_cfn_name@a}" == *r* ]]; then
                    _cfn_rc=1
                    break
                fi
                local -x "$_cfn_name=${!_cfn_name}"
            fi
        done
    fi
    if (( _cfn_rc )); then  # a readonly setting
        (_cfn_fast_export && exec "$_CFN_FAST_BIN" "$@")
        return
    fi
    "$_CFN_FAST_BIN" "$@"
}

# A monitor, which runs until signalled. Started in the background (`&`) or in
# any subshell, the subshell becomes it (exec), as the original's loop was that
# subshell: one process, so `$!` is the monitor and `kill $!` stops it. In the
# shell itself it runs as a child, so Ctrl-C returns to the prompt.
_cfn_fast_monitor() {
    if [[ "$BASHPID" != "$$" ]]; then
        _cfn_fast_export
        exec "$_CFN_FAST_BIN" "$@"
    fi
    _cfn_fast "$@"
}

# -- message bus (message-bus.sh) ---------------------------------------------
init_message_bus() { _cfn_fast bus init "$@"; }
send_message() { CFN_TEXT_PAYLOADS="${CFN_TEXT_PAYLOADS-1}" _cfn_fast bus send "$@"; }
receive_messages() { _cfn_fast bus receive "$@"; }
clear_inbox() { _cfn_fast bus clear "$@"; }
message_count() { _cfn_fast bus count "$@"; }
cleanup_message_bus() { _cfn_fast bus cleanup "$@"; }
init_message_bus_system() { _cfn_fast bus init-system "$@"; }
cleanup_message_bus_system() { _cfn_fast bus cleanup-system "$@"; }

# -- rate limiting (rate-limiting.sh) -------------------------------------------
check_inbox_capacity() { _cfn_fast check-capacity "$@"; }
get_inbox_size() { _cfn_fast get-size "$@"; }
get_inbox_utilization() { _cfn_fast get-utilization "$@"; }
send_with_backpressure() { CFN_TEXT_PAYLOADS="${CFN_TEXT_PAYLOADS-1}" _cfn_fast send-backpressure "$@"; }
monitor_inbox_overflow() { _cfn_fast_monitor monitor-overflow "$@"; }
monitor_dynamic_rate_limit() { _cfn_fast_monitor monitor-rate-limit "$@"; }
get_system_load() { _cfn_fast get-load "$@"; }
get_all_inbox_stats() { _cfn_fast get-stats "$@"; }
cleanup_rate_limiting() { _cfn_fast cleanup "$@"; }

# Publishes the tier for the current load to every sender on the base folder,
# and sets CFN_BATCH_SIZE and BACKPRESSURE_WAIT_MS in this shell, as the original did.
apply_dynamic_rate_limit() {
    local _cfn_exports
    _cfn_exports="$(_cfn_fast apply-rate-limit --export "$@")" || return $?
    eval "$_cfn_exports"
}

# The original's helpers: its log lines on stderr, a message id, a pair's next sequence.
log_info() { printf '[%(%H:%M:%S)T] [MESSAGE-BUS] %s\n' -1 "$*" >&2; }
log_error() { printf '[%(%H:%M:%S)T] [MESSAGE-BUS] ERROR: %s\n' -1 "$*" >&2; }
log_rate_limit() { printf '[%(%H:%M:%S)T] [RATE-LIMIT] %s\n' -1 "$*" >&2; }
get_next_sequence() { _cfn_fast bus next-sequence "$@"; }
# A new id in the bus's form (msg-<unix seconds>-<sequence>-<16 hex digits>);
# not tied to a pair, so its sequence part is 0. No process is started.
generate_message_id() {
    local _cfn_r="${SRANDOM:-}"
    if [[ -n "$_cfn_r" ]]; then
        printf 'msg-%(%s)T-0000000000-%08x%08x\n' -1 "$SRANDOM" "$SRANDOM"
    else  # bash before 5.1: no SRANDOM
        printf 'msg-%(%s)T-0000000000-%04x%04x%04x%04x\n' -1 "$RANDOM" "$RANDOM" "$RANDOM" "$RANDOM"
    fi
}

# -- telemetry (metrics.sh) -----------------------------------------------------
emit_metric() { _cfn_fast metrics emit "$@"; }
get_metrics_stats() { _cfn_fast metrics stats "$@"; }
clear_metrics() { _cfn_fast metrics clear "$@"; }

# A JSON string of $1 (for the tags the original's helpers build from arguments).
_cfn_json() {
    local s="${1-}" c out="" i
    for ((i = 0; i < ${#s}; i++)); do
        c="${s:i:1}"
        case "$c" in
            '"') out+='\"' ;;
            '\') out+='\\' ;;
            $'\n') out+='\n' ;;
            $'\r') out+='\r' ;;
            $'\t') out+='\t' ;;
            [[:cntrl:]]) printf -v c '\\u%04x' "'$c"; out+="$c" ;;
            *) out+="$c" ;;
        esac
    done
    printf '"%s"' "$out"
}

# The original's metric helpers: one emit_metric each, with its name, unit and
# tags. A number argument that is not a number is refused (exit 2), as emit_metric does.
emit_coordination_time() {
    emit_metric coordination.time "${1-}" milliseconds \
        "{\"phase\":$(_cfn_json "${3:-coordination}"),\"agent_count\":${2:-1}}"
}
emit_agent_count() { emit_metric coordination.agents "${1-}" count "{\"status\":$(_cfn_json "${2:-active}")}"; }
emit_delivery_rate() {
    emit_metric coordination.delivery_rate "${1-}" percent \
        "{\"total\":${2:-0},\"delivered\":${3:-0},\"target\":90}"
}
emit_message_count() {
    emit_metric coordination.messages "${1-}" count \
        "{\"direction\":$(_cfn_json "${2:-sent}"),\"agent\":$(_cfn_json "${3:-unknown}")}"
}
emit_consensus_score() {
    emit_metric consensus.score "${1-}" percent \
        "{\"validators\":${2:-0},\"phase\":$(_cfn_json "${3:-validation}"),\"target\":90}"
}
emit_confidence_score() {
    emit_metric agent.confidence "${1-}" percent \
        "{\"agent\":$(_cfn_json "${2:-unknown}"),\"iteration\":${3:-1},\"target\":75}"
}
# emit_coordination_metric <name> <value> [unit=count] [tags={}] [agent=coordinator]:
# the metric, and a metric.emitted message from agent to metrics-collector (best effort).
emit_coordination_metric() {
    local name="${1-}" value="${2-}" unit="${3:-count}" tags="${4:-"{}"}" agent="${5:-coordinator}"
    emit_metric "$name" "$value" "$unit" "$tags" || return $?
    send_message "$agent" metrics-collector metric.emitted \
        "{\"metric\":$(_cfn_json "$name"),\"value\":$value,\"unit\":$(_cfn_json "$unit"),\"tags\":$tags,\"source\":\"metrics-system\"}" \
        >/dev/null 2>&1 || true
}

# -- alerts (alerting.sh) -------------------------------------------------------
emit_alert() { _cfn_fast alerts emit "$@"; }
check_thresholds() { _cfn_fast alerts check "$@"; }
check_coordination_time() { _cfn_fast alerts check --only coordination-time "$@"; }
check_delivery_rate() { _cfn_fast alerts check --only delivery-rate "$@"; }
check_memory_growth() { _cfn_fast alerts check --only memory-growth "$@"; }
check_fd_growth() { _cfn_fast alerts check --only fd-growth "$@"; }
check_error_rate() { _cfn_fast alerts check --only error-rate "$@"; }
check_queue_depth() { _cfn_fast alerts check --only queue-depth "$@"; }
get_alert_summary() { _cfn_fast alerts summary --brief --minutes "${1:-60}"; }
clear_old_alerts() { _cfn_fast alerts clear-old --hours "${1:-24}"; }

# -- what sourcing the original also set --------------------------------------------
# Its settings, with its defaults, when unset (plain variables, as it set them;
# cfn-fast's defaults are the same, and a test keeps the two in step).
# METRICS_FILE and ALERT_LOG_FILE stay unset: they follow MESSAGE_BASE_DIR
# (<base>/.cfn-metrics.jsonl, <base>/.cfn-alerts.jsonl), not the original's
# files in world-writable /dev/shm.
: "${MESSAGE_BASE_DIR:=/dev/shm/cfn-mvp/messages}"
: "${MAX_INBOX_SIZE:=1000}"
: "${BACKPRESSURE_WAIT_MS:=100}"
: "${BACKPRESSURE_MAX_RETRIES:=50}"
: "${RATE_LIMIT_CHECK_INTERVAL:=5}"
: "${RATE_LIMIT_HIGH_LOAD_THRESHOLD:=0.8}"
: "${RATE_LIMIT_MEDIUM_LOAD_THRESHOLD:=0.5}"
: "${ALERT_COOLDOWN_SECONDS:=300}"
: "${ALERT_COORDINATION_TIME_MS:=10000}"
: "${ALERT_DELIVERY_RATE_PCT:=90}"
: "${ALERT_MEMORY_GROWTH_PCT:=10}"
: "${ALERT_FD_GROWTH:=100}"
: "${ALERT_ERROR_RATE_PCT:=5}"
: "${ALERT_QUEUE_DEPTH:=1000}"
: "${CFN_BASE_DIR:=/dev/shm/cfn}"
: "${METRICS_VERSION:=1.0}"
MESSAGE_VERSION="1.1"
# -- flow control (cfn-fast's own): 0 when the inbox's circuit is closed, 1 when open
circuit_status() { _cfn_fast circuit status "$@"; }

# The original exported the batch size when sourced.
export CFN_BATCH_SIZE="${CFN_BATCH_SIZE:-10}"
