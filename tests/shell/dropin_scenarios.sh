#!/usr/bin/env bash
# The bash original's scenarios, run against the cfn-fast drop-in under strict mode.
# Usage: dropin_scenarios.sh <work-dir> <python>    (driven by tests/test_shell_dropin.py)
# Prints TAP lines; exits 1 when any scenario failed.
set -euo pipefail

WORK="$1"
PYTHON="$2"

source <(cfn-fast shell)

# As the original's tests did: plain shell variables, not exported.
MESSAGE_BASE_DIR="$WORK/messages"
METRICS_FILE="$WORK/metrics.jsonl"
ALERT_LOG_FILE="$WORK/alerts.jsonl"
MAX_INBOX_SIZE=10
BACKPRESSURE_WAIT_MS=20
BACKPRESSURE_MAX_RETRIES=3

n=0
failed=0
check() {
    local desc="$1"
    shift
    n=$((n + 1))
    if "$@"; then
        echo "ok $n - $desc"
    else
        failed=$((failed + 1))
        echo "not ok $n - $desc"
    fi
}
fails_with() {  # fails_with <code> <command...>: the command returns exactly <code>
    local want="$1" got=0
    shift
    "$@" >/dev/null 2>&1 || got=$?
    [[ "$got" -eq "$want" ]]
}
quiet() { "$@" >/dev/null 2>&1; }
matches() { [[ "$1" =~ $2 ]]; }          # matches <text> <regex>
contains() { [[ "$1" == *"$2"* ]]; }     # contains <text> <part>
is_json() { "$PYTHON" -c 'import json, sys; json.load(sys.stdin)'; }

init_message_bus_system 2>/dev/null
for agent in agent1 agent2 agent3 agent4 sender; do
    init_message_bus "$agent" 2>/dev/null
done
check "plain shell settings reach cfn-fast (inboxes under MESSAGE_BASE_DIR)" test -d "$WORK/messages/agent1/inbox"

# 1. empty inbox
check "empty inbox has capacity" check_inbox_capacity agent1
check "empty inbox size is 0" test "$(get_inbox_size agent1)" = 0
check "empty inbox utilisation is 0" test "$(get_inbox_utilization agent1)" = 0
check "receive of an empty inbox prints []" test "$(receive_messages agent1 2>/dev/null)" = "[]"
check "an agent without an inbox has capacity" check_inbox_capacity nobody-yet

# 2. fill to capacity
for i in $(seq 1 10); do
    send_message sender agent2 test "{\"msg\":$i}" >/dev/null 2>&1
done
check "full inbox reports no capacity (1)" fails_with 1 check_inbox_capacity agent2
check "full inbox size is 10" test "$(get_inbox_size agent2)" = 10
check "full inbox utilisation is 100" test "$(get_inbox_utilization agent2)" = 100
check "a plain send to a full inbox fails (1) and evicts nothing" fails_with 1 send_message sender agent2 test '{"msg":11}'
check "still 10 messages after the refused send" test "$(message_count agent2)" = 10
check "the sender's outbox kept copies" test "$(message_count sender outbox)" = 10
check "receive prints the 10 messages as one JSON array" is_json < <(receive_messages agent2 2>/dev/null)

# 3. backpressure: failure on a full inbox, success once a bash agent cleared it
init_message_bus bp-sender 2>/dev/null
for i in $(seq 1 10); do
    send_message bp-sender agent3 test "{\"msg\":$i}" >/dev/null 2>&1
done
check "backpressure fails (1) after its retries on a full inbox" fails_with 1 send_with_backpressure bp-sender agent3 test '{"overflow":true}'
rm -f "$MESSAGE_BASE_DIR/agent3/inbox"/*.json
check "backpressure succeeds after the inbox was cleared with rm" quiet send_with_backpressure bp-sender agent3 test '{"success":true}'
check "and the message is there" test "$(get_inbox_size agent3)" = 1

# 4. dynamic rate limiting, seen by this shell
apply_dynamic_rate_limit 2>/dev/null
check "CFN_BATCH_SIZE within 5..20" test "$CFN_BATCH_SIZE" -ge 5 -a "$CFN_BATCH_SIZE" -le 20
check "BACKPRESSURE_WAIT_MS is a tier's wait" matches "$BACKPRESSURE_WAIT_MS" '^(50|100|200)$'
check "CFN_BATCH_SIZE is exported" contains "$(declare -p CFN_BATCH_SIZE)" "-x CFN_BATCH_SIZE"
check "BACKPRESSURE_WAIT_MS is exported" contains "$(declare -p BACKPRESSURE_WAIT_MS)" "-x BACKPRESSURE_WAIT_MS"
BACKPRESSURE_WAIT_MS=20

# 5. stats
stats="$(get_all_inbox_stats 2>/dev/null)"
check "statistics are valid JSON" is_json <<<"$stats"
check "statistics hold agent2 full" contains "$stats" '{"agent":"agent2","size":10,"utilization":100,"max_size":10}'

# 6. 80 % utilisation
for i in $(seq 1 8); do
    send_message sender agent4 test "{\"msg\":$i}" >/dev/null 2>&1
done
check "8 of 10 is 80 % utilisation" test "$(get_inbox_utilization agent4)" = 80

# 7. system load
check "system load is a number with two decimals" matches "$(get_system_load)" '^[0-9]+\.[0-9]{2}$'

# 8. the rest of the original's functions
check "clear_inbox empties the inbox" quiet clear_inbox agent4
check "after clear_inbox the size is 0" test "$(get_inbox_size agent4)" = 0
check "clear_inbox of a missing inbox fails (1)" fails_with 1 clear_inbox nobody
check "receive of a missing inbox fails (1)" fails_with 1 receive_messages nobody
check "a payload that is not JSON is bad input (2)" fails_with 2 send_message sender agent1 test '{"a":'
check "a path as an agent id is bad input (2)" fails_with 2 get_inbox_size ../etc
check "emit_metric appends a line" emit_metric test.metric 42 count '{"k":"v"}'
check "the metric line is JSON" is_json < <(tail -n 1 "$METRICS_FILE")
check "emit_alert appends a line" quiet emit_alert test_alert "hello" warning '{"agent":"agent1"}'
check "the alert line is JSON" is_json < <(tail -n 1 "$ALERT_LOG_FILE")
check "cleanup_message_bus removes the agent" quiet cleanup_message_bus agent4
check "the agent's folder is gone" test ! -e "$MESSAGE_BASE_DIR/agent4"

# 9. a monitor in the background, stopped by cleanup_rate_limiting (by pid file, not by name)
monitor_inbox_overflow 0.05 2>/dev/null &
monitor_pid=$!
for _ in $(seq 1 600); do  # up to 30 s on a busy machine
    compgen -G "$MESSAGE_BASE_DIR/.monitors/*.pid" >/dev/null && break
    sleep 0.05
done
check "the monitor wrote its pid file" compgen -G "$MESSAGE_BASE_DIR/.monitors/*.pid"
check "cleanup_rate_limiting stops the monitor" quiet cleanup_rate_limiting
monitor_status=0
kill -0 "$monitor_pid" 2>/dev/null && { sleep 1; kill -KILL "$monitor_pid" 2>/dev/null || true; }
wait "$monitor_pid" || monitor_status=$?
check "the monitor exited cleanly (status $monitor_status)" test "$monitor_status" -eq 0

cleanup_message_bus_system 2>/dev/null
check "cleanup_message_bus_system removes the base folder" test ! -e "$MESSAGE_BASE_DIR"

echo "1..$n"
[[ "$failed" -eq 0 ]]
