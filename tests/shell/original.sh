#!/usr/bin/env bash
# What the bash original's message-bus.sh does on disk, as functions a test can source, so that
# interop and attack tests have a real bash writer beside cfn-fast. It follows
# /work/shared/spec/bash-original.md ("On-disk layout") and the seed; tests/bash_original.py
# drives it from Python and tests/test_bash_original.py checks it against the spec.
#
#   source tests/shell/original.sh          (MESSAGE_BASE_DIR from the environment)
#   init_message_bus <agent>
#   send_message <from> <to> <type> <payload>      prints the msg_id
#   stalled_send <from> <to> <type> <payload>      send_message that stops itself holding <inbox>/.lock
#   clear_inbox <agent>
#   message_count <agent> [inbox|outbox]
#
# Kept from the original, because they are what a bash agent really does to the folders:
#   - the sequence file <base>/<from>/.sequences/<to> is a plain integer, rewritten in place under
#     `flock -x` on <to>.lock;
#   - the message is written under `flock -x` on <inbox>/.lock, to <msg_id>.json.tmp, then `mv`ed
#     to <msg_id>.json; the sender's outbox, when it exists, gets the same bytes;
#   - the file is the original's heredoc: one field per line, payload embedded raw, mode from the
#     umask (0644 usually), folders 0755;
#   - clear_inbox is a plain `rm` of *.json, with no lock.
# Left out on purpose:
#   - EVICTION: the original deletes the oldest *.json (by mtime) before writing whenever the
#     inbox holds >= 100 files, whatever MAX_INBOX_SIZE says (defect 1 of the spec). Tests do not
#     want that loss reproduced, so this emulation never evicts.
#   - the two whole-system `sync` calls per message (defect 11): they change timing, not the files;
#   - metrics, message signing and log-line timing.
# Made deterministic where the original races, so tests are not flaky:
#   - msg_id is msg-<unix-seconds>-<3 digits> as in the original, but chosen under the inbox lock
#     and drawn again while <msg_id>.json exists in the inbox or the sender's outbox (the original
#     overwrote: defect 2); the timestamp field is the same clock reading as the id's seconds;
#   - the sequence file is created (as "0") under its lock, not before taking it;
#   - the outbox copy is written from the message text, not `cp`ed from the inbox, where a fast
#     consumer may already have taken the file.

: "${MESSAGE_BASE_DIR:=/dev/shm/cfn-mvp/messages}"
ORIGINAL_MESSAGE_VERSION="1.1"

_orig_log() {
    local now
    printf -v now '%(%H:%M:%S)T' -1
    printf '[%s] [MESSAGE-BUS] %s\n' "$now" "$*" >&2
}

init_message_bus() {
    local agent="${1:-}"
    [[ -n "$agent" ]] || { _orig_log "ERROR: Agent ID required"; return 1; }
    mkdir -p "$MESSAGE_BASE_DIR/$agent/inbox" "$MESSAGE_BASE_DIR/$agent/outbox"
    chmod 755 "$MESSAGE_BASE_DIR/$agent" "$MESSAGE_BASE_DIR/$agent/inbox" "$MESSAGE_BASE_DIR/$agent/outbox"
    _orig_log "Initialized message bus for $agent"
}

# _orig_next_sequence <from> <to>: advances the pair's sequence file under its lock; sets ORIG_SEQ.
_orig_next_sequence() {
    local dir="$MESSAGE_BASE_DIR/$1/.sequences"
    local seq_file="$dir/$2" current
    [[ -d "$dir" ]] || mkdir -p "$dir"
    {
        flock -x 200
        [[ -f "$seq_file" ]] || echo "0" > "$seq_file"
        current=""
        read -r current < "$seq_file" || true
        ORIG_SEQ=$((${current:-0} + 1))
        echo "$ORIG_SEQ" > "$seq_file"
    } 200>"$seq_file.lock"
}

# _orig_new_id <inbox> <outbox>: sets ORIG_NOW and ORIG_ID to a msg-<secs>-<3 digits> not in use.
# Called under the inbox lock, so no other bash writer can pick the same name meanwhile.
_orig_new_id() {
    local tries=0
    printf -v ORIG_NOW '%(%s)T' -1
    while :; do
        printf -v ORIG_ID 'msg-%s-%03d' "$ORIG_NOW" $((RANDOM % 1000))
        [[ -e "$1/$ORIG_ID.json" || -e "$2/$ORIG_ID.json" ]] || return 0
        tries=$((tries + 1))
        if ((tries % 2000 == 0)); then  # this second's names are nearly all taken: wait for the next
            sleep 0.05
            printf -v ORIG_NOW '%(%s)T' -1
        fi
    done
}

# _orig_send <stall> <from> <to> <type> <payload>: the original's send; with stall=1, prints
# "locked" once it holds <inbox>/.lock and stops itself (SIGSTOP) there, before writing anything.
# A SIGCONT lets it finish the send; a SIGKILL releases the lock (the kernel drops it).
_orig_send() {
    local stall="$1" from="${2:-}" to="${3:-}" type="${4:-}" payload="${5:-}"
    if [[ -z "$from" || -z "$to" || -z "$type" ]]; then
        _orig_log "ERROR: Usage: send_message <from> <to> <type> <payload-json>"
        return 1
    fi
    local inbox="$MESSAGE_BASE_DIR/$to/inbox"
    local outbox="$MESSAGE_BASE_DIR/$from/outbox"
    if [[ ! -d "$inbox" ]]; then
        _orig_log "ERROR: Recipient inbox not found: $to"
        return 1
    fi
    # (the original evicted the oldest message here when the inbox held >= 100: not reproduced)
    _orig_next_sequence "$from" "$to"
    local message
    {
        flock -x 201
        if [[ "$stall" == 1 ]]; then
            echo "locked"
            kill -STOP "$BASHPID"
        fi
        _orig_new_id "$inbox" "$outbox"
        message="{
  \"version\": \"$ORIGINAL_MESSAGE_VERSION\",
  \"msg_id\": \"$ORIG_ID\",
  \"from\": \"$from\",
  \"to\": \"$to\",
  \"timestamp\": $ORIG_NOW,
  \"sequence\": $ORIG_SEQ,
  \"type\": \"$type\",
  \"payload\": $payload,
  \"requires_ack\": false
}"
        printf '%s\n' "$message" > "$inbox/$ORIG_ID.json.tmp"
        mv "$inbox/$ORIG_ID.json.tmp" "$inbox/$ORIG_ID.json"
    } 201>"$inbox/.lock"
    if [[ -d "$outbox" ]]; then
        printf '%s\n' "$message" > "$outbox/$ORIG_ID.json"
    fi
    _orig_log "Sent message: $from -> $to [$type] ($ORIG_ID)"
    echo "$ORIG_ID"
}

send_message() { _orig_send 0 "$@"; }
stalled_send() { _orig_send 1 "$@"; }

clear_inbox() {
    local agent="${1:-}"
    [[ -n "$agent" ]] || { _orig_log "ERROR: Agent ID required"; return 1; }
    local inbox="$MESSAGE_BASE_DIR/$agent/inbox"
    if [[ ! -d "$inbox" ]]; then
        _orig_log "ERROR: Inbox not found for agent: $agent"
        return 1
    fi
    local n
    n=$(find "$inbox" -maxdepth 1 -name "*.json" -type f 2>/dev/null | wc -l)
    if ((n > 0)); then
        rm -f "$inbox"/*.json
        _orig_log "Cleared $n messages from $agent inbox"
    fi
}

message_count() {
    local agent="${1:-}" box="${2:-inbox}"
    [[ -n "$agent" ]] || { _orig_log "ERROR: Agent ID required"; return 1; }
    if [[ ! -d "$MESSAGE_BASE_DIR/$agent/$box" ]]; then
        echo "0"
        return 0
    fi
    find "$MESSAGE_BASE_DIR/$agent/$box" -maxdepth 1 -name "*.json" -type f 2>/dev/null | wc -l
}
