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
check "a payload that is not JSON is sent as a JSON string" quiet send_message sender agent1 test '{"a":'
check "and read back as that string" contains "$(receive_messages agent1 2>/dev/null)" '"payload": "{\"a\":"'
check "with CFN_TEXT_PAYLOADS=0 it is bad input (2)" fails_with 2 env CFN_TEXT_PAYLOADS=0 bash -c \
    'source <(cfn-fast shell); MESSAGE_BASE_DIR="$1"; send_message sender agent1 test "{\"a\":"' _ "$MESSAGE_BASE_DIR"
clear_inbox agent1 2>/dev/null
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

# 10. plain text, and numbers a double cannot hold, come back as written
check "a plain-text payload is sent" quiet send_with_backpressure sender agent1 note 'hello "world"'
check "a number beyond a double is sent" quiet send_message sender agent1 big '{"n": 1e400}'
got="$(receive_messages agent1 2>/dev/null)"
check "receive is strict JSON" is_json <<<"$got"
check "the text came back as a JSON string" contains "$got" '"payload": "hello \"world\""'
check "1e400 came back as written, never Infinity" contains "$got" '"n": 1e400'
clear_inbox agent1 2>/dev/null

# 11. what sourcing the original also defined
check "MESSAGE_VERSION is 1.1" test "$MESSAGE_VERSION" = 1.1
check "CFN_BASE_DIR has the original's default" test "$CFN_BASE_DIR" = /dev/shm/cfn
check "ALERT_QUEUE_DEPTH has the original's default" test "$ALERT_QUEUE_DEPTH" = 1000
check "log_info writes the original's line on stderr" matches "$(log_info "hi there" 2>&1 >/dev/null)" \
    '^\[[0-9]{2}:[0-9]{2}:[0-9]{2}\] \[MESSAGE-BUS\] hi there$'
check "log_error says ERROR" matches "$(log_error oops 2>&1)" '^\[[0-9:]{8}\] \[MESSAGE-BUS\] ERROR: oops$'
check "log_rate_limit" matches "$(log_rate_limit slow 2>&1)" '^\[[0-9:]{8}\] \[RATE-LIMIT\] slow$'
check "generate_message_id prints an id of the bus's form" matches "$(generate_message_id)" \
    '^msg-[0-9]{10}-0000000000-[0-9a-f]{16}$'
check "two ids differ" test "$(generate_message_id)" != "$(generate_message_id)"
send_message sender agent1 t 1 >/dev/null 2>&1
seq_now="$(get_next_sequence sender agent1)"
id="$(send_message sender agent1 t 2 2>/dev/null)"
check "get_next_sequence advances the pair's sequence, and the next send follows it" \
    matches "$id" "^msg-[0-9]{10}-$(printf %010d $((seq_now + 1)))-"
clear_inbox agent1 2>/dev/null

last_metric() { tail -n 1 "$METRICS_FILE"; }
metric_is() {  # metric_is <name> <value> <unit> <tags JSON>: the last metric line, field by field
    "$PYTHON" -c 'import json, sys
m = json.loads(sys.argv[1])
ok = (m["metric"], m["value"], m["unit"], m["tags"]) == (sys.argv[2], json.loads(sys.argv[3]), sys.argv[4],
                                                           json.loads(sys.argv[5]))
sys.exit(0 if ok else 1)' "$(last_metric)" "$@"
}
emit_coordination_time 1500 3 'p"h'
check "emit_coordination_time" metric_is coordination.time 1500 milliseconds '{"phase":"p\"h","agent_count":3}'
emit_agent_count 4
check "emit_agent_count" metric_is coordination.agents 4 count '{"status":"active"}'
emit_delivery_rate 95 20 19
check "emit_delivery_rate" metric_is coordination.delivery_rate 95 percent '{"total":20,"delivered":19,"target":90}'
emit_message_count 7 received agent2
check "emit_message_count" metric_is coordination.messages 7 count '{"direction":"received","agent":"agent2"}'
emit_consensus_score 92 5
check "emit_consensus_score" metric_is consensus.score 92 percent '{"validators":5,"phase":"validation","target":90}'
emit_confidence_score 80 agent3 2
check "emit_confidence_score" metric_is agent.confidence 80 percent '{"agent":"agent3","iteration":2,"target":75}'
check "a helper given a non-number is bad input (2)" fails_with 2 emit_agent_count lots
init_message_bus metrics-collector 2>/dev/null
emit_coordination_metric custom.metric 12 ms '{"k":1}' agent2
check "emit_coordination_metric emits the metric" metric_is custom.metric 12 ms '{"k":1}'
check "and tells metrics-collector" contains "$(receive_messages metrics-collector 2>/dev/null)" \
    '"payload": {"metric":"custom.metric","value":12,"unit":"ms","tags":{"k":1},"source":"metrics-system"}'
check "get_metrics_stats names the file" contains "$(get_metrics_stats 2>/dev/null)" "Metrics file: $METRICS_FILE"

# the checks read the last 60 metric lines and alert past the ALERT_* thresholds
emit_coordination_time 20000
check "check_coordination_time alerts past ALERT_COORDINATION_TIME_MS" quiet check_coordination_time
check "with coordination_time_exceeded in the alert log" contains "$(tail -n 1 "$ALERT_LOG_FILE")" \
    '"alert":"coordination_time_exceeded"'
emit_delivery_rate 50 10 5
check "check_thresholds runs them all" quiet check_thresholds
check "delivery_rate_low among them" contains "$(cat "$ALERT_LOG_FILE")" '"alert":"delivery_rate_low"'
summary="$(get_alert_summary 60)"
check "get_alert_summary is JSON with a total" is_json <<<"$summary"
check "get_alert_summary counts the alerts" contains "$summary" '"coordination_time_exceeded": 1'
check "clear_old_alerts keeps the recent ones" quiet clear_old_alerts 1
check "so the summary is unchanged" test "$(get_alert_summary 60)" = "$summary"
check "clear_metrics --force empties the metrics file" quiet clear_metrics --force
check "and it is empty" test ! -s "$METRICS_FILE"

cleanup_message_bus_system 2>/dev/null
check "cleanup_message_bus_system removes the base folder" test ! -e "$MESSAGE_BASE_DIR"

echo "1..$n"
[[ "$failed" -eq 0 ]]
