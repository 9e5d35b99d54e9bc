/*
 * cfn_fast.h - everything Python may call. This header is the contract:
 * csrc/ffi_build.py feeds it to cffi's cdef() with the preprocessor lines
 * dropped, so declare nothing here with a macro and nothing twice elsewhere.
 *
 * Conventions: a function returns 0 (or a count) on success, and on failure
 * a negative code: -errno for a failed system call (errno values are below
 * 1000), or one of CFN_E_* below. The cfn_err the caller passes gets the code
 * and a short text naming the operation and the object that failed.
 */
#ifndef CFN_FAST_H
#define CFN_FAST_H

#include <stddef.h>
#include <stdint.h>

enum {
    CFN_E_FULL = -1001,      /* inbox at capacity */
    CFN_E_TIMEOUT = -1002,   /* backpressure: retries or time budget spent */
    CFN_E_NOINBOX = -1003,   /* the agent has no inbox */
    CFN_E_BADID = -1004,     /* agent id fails validation */
    CFN_E_BADJSON = -1005,   /* payload is not strict RFC 8259 JSON */
    CFN_E_TOOBIG = -1006,    /* payload over the configured byte limit */
    CFN_E_BADTYPE = -1007,   /* message type empty, too long or not UTF-8 */
    CFN_E_BADSTATE = -1008,  /* shared-memory state file foreign or damaged */
    CFN_E_NOSLOT = -1009,    /* state file has no free inbox slot */
    CFN_E_BADARG = -1010,    /* an option out of range */
    CFN_E_UNSAFE = -1011,    /* symlink, wrong owner or wrong file kind */
    CFN_E_LOCKED = -1012,    /* another process held a lock past the call's budget */
    CFN_E_CLOSED = -1013,    /* the handle was closed */
    CFN_E_CIRCUIT = -1014    /* the recipient's circuit is open: refused without touching the inbox */
};

enum {
    CFN_AGENT_MAX = 128,     /* longest agent id, in bytes */
    CFN_TYPE_MAX = 256,      /* longest message type, in bytes */
    CFN_MSG_ID_MAX = 80,     /* room for a message id and its NUL */
    CFN_ERR_TEXT = 512,      /* room for an error text and its NUL */
    CFN_SLOTS = 16384,       /* inbox slots in one state file */
    CFN_COUNTERS = 64,       /* shared event counters */
    CFN_COOLDOWNS = 1024,    /* shared alert cooldown entries */
    CFN_TOP_SENDERS = 8,     /* heaviest senders an inbox keeps count of */
    CFN_LAYOUT_VERSION = 3,
    CFN_JSON_INT_DIGITS = 4300,  /* longest integer a payload may hold (Python's int limit) */
    CFN_JSON_PAYLOAD_DEPTH = 256,/* deepest nesting of a payload */
    CFN_JSON_FILE_DEPTH = 257    /* a message file: the payload inside its envelope */
};

/* What a reader must know about a message's numbers (cfn_read_messages'
 * per-record flags): a number to decode exactly, or a string to keep as it is. */
enum {
    CFN_JSON_BIG_INT = 1,        /* an integer of more than CFN_JSON_INT_DIGITS digits */
    CFN_JSON_HUGE_NUMBER = 2,    /* a number beyond a double's range (1e400) */
    CFN_JSON_LONE_SURROGATE = 4  /* a \ud800-\udfff escape without its pair */
};

enum { CFN_BACKOFF_FIXED = 0, CFN_BACKOFF_EXPONENTIAL = 1, CFN_BACKOFF_DECORRELATED = 2 };

/* A send's priority (cfn_send_opts.priority). */
enum { CFN_PRIORITY_NORMAL = 0, CFN_PRIORITY_HIGH = 1 };

/* Indexes of the shared event counters (cfn_counter_*). */
enum {
    CFN_CTR_SENT = 0,            /* messages delivered */
    CFN_CTR_CONSUMED = 1,        /* messages consumed (acked) */
    CFN_CTR_SEND_FULL = 2,       /* plain sends refused: inbox full */
    CFN_CTR_BP_WAIT = 3,         /* backpressure waits (one per retry) */
    CFN_CTR_BP_SUCCESS = 4,      /* backpressure sends delivered */
    CFN_CTR_BP_FAILURE = 5,      /* backpressure sends failed after retries */
    CFN_CTR_RECONCILE = 6,       /* reconciling scans done */
    CFN_CTR_QUARANTINED = 7,     /* bad message files moved aside */
    CFN_CTR_RECOVERED = 8,       /* claimed messages returned to an inbox */
    CFN_CTR_STALE_TMP = 9,       /* stale temporary files removed */
    CFN_CTR_METRICS = 10,        /* metric lines written */
    CFN_CTR_ALERTS = 11,         /* alert lines written */
    CFN_CTR_ALERTS_SUPPRESSED = 12, /* alerts held back by a cooldown */
    CFN_CTR_LOCK_TIMEOUTS = 13,  /* calls that gave up on a lock another process held */
    CFN_CTR_TAKE_ERRORS = 14,    /* messages a consume could not delete (left in the inbox) */
    CFN_CTR_STATE_REATTACHED = 15, /* state file replaced or removed under a process, re-mapped */
    CFN_CTR_SLOTS_FREED = 16,    /* inbox slots of removed agents freed */
    CFN_CTR_OUTBOX_PRUNED = 17,  /* outbox copies removed to keep OUTBOX_MAX */
    CFN_CTR_CIRCUIT_OPENED = 18, /* circuits opened (tripped, or a probe failed) */
    CFN_CTR_CIRCUIT_CLOSED = 19, /* circuits closed again (a probe succeeded, or a reset) */
    CFN_CTR_CIRCUIT_REJECTED = 20, /* sends refused by an open circuit */
    CFN_CTR_SENT_HIGH = 21,      /* high-priority messages delivered */
    CFN_CTR_FIRST_FREE = 22      /* 22..CFN_COUNTERS-1: free for later use */
};

/* A recipient's circuit (cfn_circuit_info.state). */
enum { CFN_CIRCUIT_CLOSED = 0, CFN_CIRCUIT_OPEN = 1, CFN_CIRCUIT_HALF_OPEN = 2 };

/* How cfn_read_messages reads: every message, leaving the files (PEEK); the
 * next ones from this handle's listing, leaving the files for cfn_take to
 * delete once the caller holds them (NEXT); or moving them into this
 * handle's claim folder until cfn_take from the claims (CLAIM, at-least-once). */
enum { CFN_READ_PEEK = 0, CFN_READ_NEXT = 1, CFN_READ_CLAIM = 2 };

/* Where cfn_take deletes from, and cfn_put_back moves back from. */
enum { CFN_FROM_INBOX = 0, CFN_FROM_CLAIMS = 1 };

/* Bits for cfn_bus_open's flags. */
enum { CFN_OPEN_CREATE = 1 };

typedef struct cfn_bus cfn_bus;     /* one base folder, mapped; owned by Python */

typedef struct {
    int code;                       /* the return code, repeated */
    int sys_errno;                  /* errno of the failed call, or 0 */
    char what[512];                 /* "renameat inbox/x.json: ..." */
} cfn_err;

typedef struct {
    uint32_t dir_mode;              /* mode of created folders (0700, 02770 with a group) */
    int32_t gid;                    /* CFN_GROUP, or -1 */
    int64_t lock_timeout_ms;        /* LOCK_TIMEOUT_MS: longest wait for another process's lock */
} cfn_bus_opts;

typedef struct {
    int64_t capacity;               /* MAX_INBOX_SIZE (the inbox's, when smaller, wins) */
    int64_t wait_ms;                /* BACKPRESSURE_WAIT_MS: base retry wait */
    int64_t max_retries;            /* BACKPRESSURE_MAX_RETRIES; -1: plain send */
    int64_t max_total_ms;           /* time budget; 0: wait_ms * max_retries */
    int64_t max_payload;            /* MAX_MESSAGE_BYTES */
    int64_t stale_after_ms;         /* shared wait override goes stale after this */
    int32_t backoff;                /* CFN_BACKOFF_* */
    int32_t fsync;                  /* 1: fsync file then folder before returning */
    uint32_t file_mode;             /* mode of message files (0600) */
    uint32_t dir_mode;              /* mode of created folders (0700) */
    int64_t outbox_max;             /* OUTBOX_MAX: copies kept in the outbox; 0 unbounded */
    int64_t deadline_ns;            /* CLOCK_MONOTONIC time the whole call must end by; 0: none */
    /* the recipient's circuit breaker: what this sender counts as tripping it.
     * An open circuit refuses every sender, whatever its own settings. */
    int32_t breaker_failures;       /* consecutive failed sends that open it; 0: never by count */
    int32_t breaker_rate_pct;       /* failure rate (%) over the window that opens it; 0: never by rate */
    int32_t breaker_min_calls;      /* sends in the window before the rate counts */
    int32_t breaker_probes;         /* sends a half-open circuit admits (1 to 63; 0: 1) */
    int64_t breaker_window_ms;      /* the rate's sliding window */
    int64_t breaker_cooldown_ms;    /* an opened circuit refuses this long, then admits probes */
    /* the priority lane: a high-priority send may fill the inbox past its
     * capacity by headroom_pct % of it (rounded up); a normal one never */
    int32_t priority;               /* CFN_PRIORITY_* */
    int32_t headroom_pct;           /* 0 to 100 */
} cfn_send_opts;

typedef struct {
    char msg_id[80];
    int64_t sequence;
    int64_t timestamp;
    int64_t retries;                /* waits that ended without room */
    int64_t wakeups;                /* waits ended early by a consumer's wake */
    int64_t waited_ns;              /* time spent waiting in total */
    int32_t outbox_copied;          /* 1 when the sender's outbox got a copy */
    int32_t locked;                 /* 1 when the send failed waiting for a lock, not for room */
    int32_t deadline;               /* 1 when the call's own deadline ended it, not its retries */
    int32_t circuit;                /* this send moved the recipient's circuit: 1 opened it, 2 closed it */
    int64_t retry_after_ns;         /* refused for want of room: when a place is expected, from the
                                     * inbox's drain over the last second (the base retry wait
                                     * when nothing drained in it); else 0 */
} cfn_send_result;

typedef struct {
    int64_t count;                  /* occupancy after the scan */
    int64_t files;                  /* *.json entries in the inbox */
    int64_t claimed;                /* messages held in claim folders */
    int64_t before;                 /* counter before the scan (-1: unknown) */
    int64_t stale_tmp_removed;
    int64_t recovered;              /* claims of dead consumers returned */
    int32_t scanned;                /* 0 when a concurrent reconcile made it moot */
} cfn_reconcile_result;

/* Messages read by cfn_read_messages: `count` records, oldest first, each
 * a little-endian u32 name length, the file's name, a u32 of CFN_JSON_* flags,
 * a u32 byte length and the file's bytes. */
typedef struct {
    char *data;
    size_t len;
    int64_t count;
    int64_t quarantined;            /* bad files moved aside during the call */
} cfn_blob;

typedef struct {
    int64_t count;                  /* counter value; -1 when never scanned */
    int64_t capacity;               /* the inbox's capacity; 0 unknown */
    int64_t waiters;                /* senders asleep on the inbox now */
    int64_t reconcile_ns;           /* CLOCK_REALTIME of the last scan; 0 never */
    char agent[136];
} cfn_slot_info;

/* One of an inbox's heaviest senders: the key of its id (cfn_sender_key)
 * and its count, halved every CFN_SENDERS_HALF_LIFE_MS since. */
typedef struct {
    uint64_t key;
    int64_t count;
} cfn_sender_share;

enum { CFN_SENDERS_HALF_LIFE_MS = 10000 };

/* A recipient's circuit breaker as every process sees it (cfn_circuit_get). */
typedef struct {
    int32_t state;                  /* CFN_CIRCUIT_* */
    int32_t failures;               /* closed: consecutive failed sends */
    int32_t probes;                 /* half-open: sends admitted in this round */
    int32_t probe_limit;            /* half-open: sends the round admits */
    int64_t retry_after_ns;         /* open: until probes go; half-open: until the round ends */
    int64_t rejected;               /* sends refused while it was open, since the slot was made */
} cfn_circuit_info;

/* Live rate-limit settings, shared by every process on the base folder. */
typedef struct {
    int64_t batch_size;
    int64_t wait_ms;
    int64_t load_milli;             /* 1-minute load per CPU x 1000 */
    int64_t updated_ns;             /* CLOCK_REALTIME of the update; 0 never */
    int64_t interval_ms;            /* the publisher's check interval */
} cfn_rate_settings;

/* What a handle's consumers do (cfn_bus_set_flow); all zero until set. */
typedef struct {
    int32_t priority_ratio;         /* high messages taken in a row while normal ones wait; 0: no limit */
    int32_t adaptive;               /* 1: adapt each inbox's effective limit to its queueing delay */
    int64_t adaptive_target_ms;     /* the sojourn (age when taken) the limit aims at */
    int64_t adaptive_interval_ms;   /* how often the limit moves */
    int64_t adaptive_floor;         /* the limit never goes below this */
} cfn_flow_opts;

/* An inbox's flow-control state as every process sees it (cfn_flow_get). */
typedef struct {
    int64_t count;                  /* messages and reservations; -1 when never counted */
    int64_t capacity;               /* 0: not known yet */
    int64_t limit;                  /* the effective limit the delay set, in force now; 0: none */
    int64_t sojourn_us;             /* mean age of the messages taken in the last interval measured */
    int64_t drained;                /* places freed over the last second */
    int64_t waiting;                /* senders in the line for room */
    int64_t high_sent;              /* high-priority messages delivered, ever */
} cfn_flow_info;

/* --- handle ------------------------------------------------------------- */
/* opts->gid >= 0 opens the bus to that group (CFN_GROUP): new folders dir_mode
 * with the group, new files 0660, and folders or files of other users accepted
 * when they belong to that group and are not writable by everyone.
 * cfn_bus_close releases the folders and the mapping once the calls in flight
 * have returned; later calls fail with CFN_E_CLOSED. cfn_bus_free (the owner's
 * finaliser, when nothing can call any more) frees the handle itself. */
cfn_bus *cfn_bus_open(const char *base_dir, int flags, const cfn_bus_opts *opts, cfn_err *err);
/* While a call waits (for a lock, or for room), it asks probe every 50 ms
 * whether to give up: nonzero makes it return -EINTR. Python's probe is the
 * moment its pending signal handlers run, so Ctrl-C ends a wait even when the
 * signal came between two system calls, not during one. NULL: no probe. */
typedef int (*cfn_probe_fn)(void);
int cfn_bus_set_probe(cfn_bus *bus, cfn_probe_fn probe);
/* Sets the handle's consumer settings (right after open, before other calls). */
int cfn_bus_set_flow(cfn_bus *bus, const cfn_flow_opts *opts, cfn_err *err);
void cfn_bus_close(cfn_bus *bus);
void cfn_bus_free(cfn_bus *bus);

/* --- processes ------------------------------------------------------------ */
/* A process's start time in clock ticks since boot (with its pid, it names one
 * process: a reused pid has another); 0 when it is gone or a zombie. */
uint64_t cfn_proc_start(int32_t pid);

/* --- validation --------------------------------------------------------- */
int cfn_check_agent(const char *agent, cfn_err *err);
int cfn_check_json(const char *buf, size_t len, cfn_err *err);
/* A stored message's bytes as a reader sees them (a record from a store
 * other than the files, whose reader scans in cfn_read_messages): its
 * CFN_JSON_* flags, or -1 when they are not one JSON value of at most
 * CFN_JSON_FILE_DEPTH levels (the decoder then refuses them). */
int cfn_json_flags(const char *buf, size_t len);
/* Writes s (valid UTF-8) as the inside of a JSON string, as the envelope's
 * type is written: quotes, backslashes and control characters (DEL too)
 * escaped. Returns the bytes written; out needs room for 6 * n. */
size_t cfn_json_escape(char *out, const char *s, size_t n);

/* --- folders ------------------------------------------------------------ */
/* Creates the agent's folders and records capacity (> 0) as its inbox's. */
int cfn_init_agent(cfn_bus *bus, const char *agent, int64_t capacity, cfn_err *err);
/* After the agent's folder is removed: forgets it and frees its inbox slot. */
int cfn_forget_agent(cfn_bus *bus, const char *agent, cfn_err *err);

/* --- sending ------------------------------------------------------------ */
int cfn_send(cfn_bus *bus, const char *from, const char *to,
             const char *type, size_t type_len,
             const char *payload, size_t payload_len,
             const cfn_send_opts *opts, cfn_send_result *res, cfn_err *err);

/* Advances the sender->recipient sequence as a send does, and returns the new
 * number (the original's get_next_sequence). */
int64_t cfn_next_sequence(cfn_bus *bus, const char *from, const char *to, cfn_err *err);

/* The recipient's circuit, and a reset of it to closed (returns the state it
 * had). A circuit opens after breaker_failures failed sends in a row, or a
 * failure rate over the window: a backpressure send whose retries or budget
 * ran out (not its caller's deadline), a lock held past its wait, a failed
 * write. A plain send refused because the inbox is full is not a failure. */
int cfn_circuit_get(cfn_bus *bus, const char *agent, cfn_circuit_info *out, cfn_err *err);
int cfn_circuit_reset(cfn_bus *bus, const char *agent, cfn_err *err);

int cfn_flow_get(cfn_bus *bus, const char *agent, cfn_flow_info *out, cfn_err *err);

/* The inbox's heaviest senders over the last windows (a space-saving table:
 * a newcomer takes the least-counted entry, so a count may include that
 * entry's past), heaviest first; returns how many (at most cap). */
int cfn_senders_get(cfn_bus *bus, const char *agent, cfn_sender_share *out, int cap, cfn_err *err);
/* The key an agent id has in those tables (40 bits of its hash; never 0). */
uint64_t cfn_sender_key(const char *agent);

/* --- counting ----------------------------------------------------------- */
/* The inbox's size from the shared counter, healed by a scan first when the
 * folder changed behind cfn-fast's back or the counter says full. */
int64_t cfn_inbox_size(cfn_bus *bus, const char *agent, cfn_err *err);
/* The capacity that holds for the inbox, the same for every process: the
 * smallest any process has used since init set it (this call's `fallback`,
 * the caller's own, counts as used). */
int64_t cfn_inbox_capacity(cfn_bus *bus, const char *agent, int64_t fallback, cfn_err *err);
int64_t cfn_scan_count(cfn_bus *bus, const char *agent, const char *box, cfn_err *err);
int cfn_reconcile(cfn_bus *bus, const char *agent, int force,
                  cfn_reconcile_result *res, cfn_err *err);
/* Fills out[0..cap) with every inbox slot in use; returns how many. */
int64_t cfn_slots_snapshot(cfn_bus *bus, cfn_slot_info *out, int64_t cap);
/* Frees the slots of inboxes whose folder is gone; returns how many. */
int64_t cfn_slots_sweep(cfn_bus *bus, cfn_err *err);

/* --- receiving ---------------------------------------------------------- */
/* Waiting for a message without polling: read cfn_arrivals before looking in
 * the inbox, and if it was empty, cfn_wait_arrival with what it said: it
 * returns 0 at once if a message arrived since (every delivery, and every
 * claim put back, moves it), else when one does, CFN_E_TIMEOUT after
 * timeout_ns (< 0: none), -EINTR when the probe says stop. */
int64_t cfn_arrivals(cfn_bus *bus, const char *agent, cfn_err *err);
int cfn_wait_arrival(cfn_bus *bus, const char *agent, uint32_t seen, int64_t timeout_ns, cfn_err *err);

/* --- waiting from an event loop (cfn_fast.aio) ----------------------------
 * One thread waits for many inboxes at once, on their words: ROOM moves when
 * a consumer frees a place, ARRIVAL when a message arrives. cfn_word reads
 * one (before the attempt that failed); cfn_wait_words sleeps (futex_waitv:
 * one system call for up to 127 words, and the handle's control word, which
 * cfn_wait_interrupt moves when the set to wait on changed) until one of them
 * is not what seen says, or timeout_ns (< 0: none). changed[i] says which;
 * returns how many, CFN_E_TIMEOUT, or -EINTR. */
enum { CFN_WORD_ROOM = 0, CFN_WORD_ARRIVAL = 1, CFN_WAIT_WORDS_MAX = 127 };
int64_t cfn_word(cfn_bus *bus, const char *agent, int kind, cfn_err *err);
uint32_t cfn_wait_ctl(cfn_bus *bus);
void cfn_wait_interrupt(cfn_bus *bus);
int cfn_wait_words(cfn_bus *bus, const char *names, size_t names_len, const int32_t *kinds, const uint32_t *seen,
                   int32_t n, uint32_t ctl_seen, int64_t timeout_ns, uint8_t *changed, cfn_err *err);
int cfn_read_messages(cfn_bus *bus, const char *agent, int mode, int64_t max,
                      int64_t max_bytes, cfn_blob *out, cfn_err *err);
/* `names` is NUL-terminated file names back to back (a name may also be a
 * message id: ".json" is added). cfn_take deletes them from the inbox or
 * this handle's claim folder, setting taken[i] to 1 for each it deleted and
 * 0 for one another consumer had or that could not be deleted (the first
 * such failure is in err, and the message stays where it was, counted);
 * returns how many it deleted. cfn_put_back moves claimed messages back into
 * the inbox; cfn_quarantine moves bad ones to <agent>/.quarantine. */
int64_t cfn_take(cfn_bus *bus, const char *agent, int from, const char *names, size_t names_len,
                 uint8_t *taken, cfn_err *err);
int64_t cfn_put_back(cfn_bus *bus, const char *agent, const char *names, size_t names_len, cfn_err *err);
int64_t cfn_quarantine(cfn_bus *bus, const char *agent, int from, const char *names, size_t names_len,
                       cfn_err *err);
void cfn_blob_free(cfn_blob *blob);
int64_t cfn_clear_inbox(cfn_bus *bus, const char *agent, cfn_err *err);

/* --- shared counters and settings ---------------------------------------- */
int cfn_counter_add(cfn_bus *bus, int index, int64_t delta);
int cfn_counter_get(cfn_bus *bus, int index, int64_t *out);
int cfn_rate_publish(cfn_bus *bus, const cfn_rate_settings *s);
int cfn_rate_read(cfn_bus *bus, cfn_rate_settings *out);
/* 1 while published settings hold: updated within stale_after_ms (three of
 * the reader's check intervals) or three of the publisher's, whichever is longer. */
int cfn_rate_fresh(const cfn_rate_settings *s, int64_t stale_after_ms, int64_t now_ns);
int cfn_cooldown_try(cfn_bus *bus, const char *key, size_t key_len,
                     int64_t now_ns, int64_t cooldown_ns);

/* --- metrics: one JSONL line, one write(2) on an O_APPEND descriptor ------ */
/* Formats a metric line (newline included) into out, as the send loop writes it;
 * returns its length, or a negative code (CFN_E_BADARG, or -ERANGE when cap is short). */
int64_t cfn_metric_format(char *out, size_t cap, const char *name, double value, const char *unit,
                          const char *tags_json, size_t tags_len, cfn_err *err);

/* --- telemetry files: METRICS_FILE and ALERT_LOG_FILE (logfile.c) ------------
 * They may sit where every local user writes (/dev/shm), so they are opened
 * under one rule: O_NOFOLLOW|O_NONBLOCK (a FIFO planted there never hangs a
 * writer), then refused (CFN_E_UNSAFE, naming the path and why) unless the
 * descriptor is a regular file of this user, or with gid >= 0 of that group,
 * and not writable by everyone. A file created here gets `mode` (and the group). */
/* Opens for appending (O_WRONLY|O_APPEND|O_CREAT|O_CLOEXEC); returns the descriptor. */
int cfn_log_open(const char *path, uint32_t mode, int32_t gid, cfn_err *err);
/* Opens an existing file for reading under the same rule; -ENOENT when there is none. */
int cfn_log_open_read(const char *path, int32_t gid, cfn_err *err);
/* Gives the handle its METRICS_FILE (path NULL: metrics off, its file closed),
 * written by cfn_metrics_write and by the send loop's metric lines alike. When
 * a write would take the file past max_bytes (0: never), it is renamed
 * <path>.1 (replacing an older one) and a fresh file started; which process
 * rotates is decided under a non-blocking flock, and every writer that finds
 * the path naming another file than its descriptor's reopens it. */
int cfn_set_metrics(cfn_bus *bus, const char *path, int64_t max_bytes, uint32_t mode, int32_t gid,
                    cfn_err *err);
/* Appends `nlines` whole lines (len bytes, the last ending in a newline), each
 * write(2) holding whole lines only; returns nlines (counted in CFN_CTR_METRICS),
 * 0 when metrics are off, or a negative code. */
int64_t cfn_metrics_write(cfn_bus *bus, const char *data, size_t len, int64_t nlines, cfn_err *err);

#endif
