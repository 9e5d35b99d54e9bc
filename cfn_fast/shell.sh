# cfn-fast bash drop-in: the functions of the original message-bus.sh,
# rate-limiting.sh, metrics.sh and alerting.sh, with their arguments, output
# and return codes, backed by the cfn-fast command.
#
#   source <(cfn-fast shell)          # or: source "$(cfn-fast shell --path)"
#
# Safe under `set -euo pipefail`. Like the original, the settings may be plain
# shell variables (MAX_INBOX_SIZE=10, not exported): each call hands the ones
# that are set to cfn-fast. Return codes: 0 yes/success, 1 the original's "no"
# (full, failed after retries, not found), 2 bad usage or bad input.
#
# `cfn-fast` must be on PATH. Put the installing interpreter's bin folder first:
# a version manager's shim in front of it (pyenv's) costs ~70 ms per call.

# The variables cfn-fast reads (cfn_fast/config.py SETTINGS; a test keeps this list in step).
_CFN_FAST_SETTINGS=(MESSAGE_BASE_DIR MAX_INBOX_SIZE BACKPRESSURE_WAIT_MS BACKPRESSURE_MAX_RETRIES
    BACKPRESSURE_BACKOFF BACKPRESSURE_MAX_TOTAL_MS MAX_MESSAGE_BYTES RATE_LIMIT_CHECK_INTERVAL
    RATE_LIMIT_HIGH_LOAD_THRESHOLD RATE_LIMIT_MEDIUM_LOAD_THRESHOLD CFN_BATCH_SIZE METRICS_FILE
    ALERT_LOG_FILE ALERT_COOLDOWN_SECONDS CFN_METRICS CFN_FSYNC CFN_GROUP LOCK_TIMEOUT_MS OUTBOX_MAX
    METRICS_MAX_BYTES CFN_TEXT_PAYLOADS ALERT_COORDINATION_TIME_MS ALERT_DELIVERY_RATE_PCT
    ALERT_MEMORY_GROWTH_PCT ALERT_FD_GROWTH ALERT_ERROR_RATE_PCT ALERT_QUEUE_DEPTH MESSAGE_BUS_URL REDIS_PASSWORD
    REDIS_TIMEOUT_MS CFN_CLAIM_TIMEOUT_MS CFN_BREAKER_FAILURES CFN_BREAKER_FAILURE_RATE CFN_BREAKER_WINDOW_MS
    CFN_BREAKER_MIN_CALLS CFN_BREAKER_COOLDOWN_MS CFN_BREAKER_PROBES CFN_PRIORITY CFN_PRIORITY_HEADROOM_PCT
    CFN_PRIORITY_RATIO CFN_ADAPTIVE_LIMIT CFN_ADAPTIVE_TARGET_MS CFN_ADAPTIVE_INTERVAL_MS CFN_ADAPTIVE_FLOOR)

# Runs cfn-fast in a subshell that exports every setting the caller has set.
_cfn_fast() {
    (
        local _cfn_name
        for _cfn_name in "${_CFN_FAST_SETTINGS[@]}"; do
            if [[ -n "${!_cfn_name+x}" ]]; then
                export "${_cfn_name?}"
            fi
        done
        exec cfn-fast "$@"
    )
}

# -- message bus (message-bus.sh) ---------------------------------------------
init_message_bus() { _cfn_fast bus init "$@"; }
send_message() { _cfn_fast bus send "$@"; }
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
send_with_backpressure() { _cfn_fast send-backpressure "$@"; }
monitor_inbox_overflow() { _cfn_fast monitor-overflow "$@"; }
monitor_dynamic_rate_limit() { _cfn_fast monitor-rate-limit "$@"; }
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

# -- telemetry (metrics.sh, alerting.sh) ---------------------------------------
emit_metric() { _cfn_fast metrics emit "$@"; }
emit_alert() { _cfn_fast alerts emit "$@"; }

# -- flow control (cfn-fast's own): 0 when the inbox's circuit is closed, 1 when open
circuit_status() { _cfn_fast circuit status "$@"; }

# The original exported the batch size when sourced.
export CFN_BATCH_SIZE="${CFN_BATCH_SIZE:-10}"
