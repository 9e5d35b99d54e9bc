/*
 * internal.h - what the C files share and Python never sees: the layout of the
 * mapped state file, the process-local handle, and the functions behind the
 * boundary (api.c), grouped by the file that holds them.
 */
#ifndef CFN_INTERNAL_H
#define CFN_INTERNAL_H

#define _GNU_SOURCE 1
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <sys/types.h>

#include "cfn_fast.h"

_Static_assert(ATOMIC_LLONG_LOCK_FREE == 2, "64-bit atomics must be lock-free in shared memory");
_Static_assert(ATOMIC_INT_LOCK_FREE == 2, "32-bit atomics must be lock-free in shared memory");

#define CFN_MAGIC 0x31545341464e4643ULL  /* "CFNFAST1" */
#define CFN_STATE_NAME ".cfn-fast.shm"
#define CFN_CONSUMERS_DIR ".consumers"    /* <base>/.consumers/<id>.lock: a live consumer holds it */
#define CFN_COUNT_UNKNOWN INT64_MIN      /* slot never scanned */
#define CFN_HEADER_SIZE 4096
#define CFN_COOLDOWN_OFF 4096
#define CFN_SLOTS_OFF 32768
#define CFN_SLOT_SIZE 512
#define CFN_TMPFS_DIRENT 20              /* tmpfs adds this to a folder's size per entry */
#define DIR_FLAGS (O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)

/* EMPTY ends a probe; TOMB (a freed slot) is skipped by lookups and reused by inserts. */
enum { SLOT_EMPTY = 0, SLOT_BUSY = 1, SLOT_READY = 2, SLOT_TOMB = 3 };

/* One inbox's shared state. Every field a process may change at any time is
 * atomic; `agent` and `hash` are written once, while the slot is BUSY. */
struct cfn_slot {
    _Atomic uint32_t state;
    _Atomic uint32_t wake_seq;      /* futex word: bumped whenever room appears */
    _Atomic uint32_t gen;           /* bumped when the slot is freed: cached indexes check it */
    uint32_t hash;
    _Atomic uint64_t waiters;       /* epoch << 32 | senders asleep; a reset starts a new epoch */
    _Atomic int64_t count;          /* files + reservations + claims */
    _Atomic int64_t claimed;        /* messages in this inbox's claim folders */
    _Atomic int64_t reconcile_gen;  /* bumped by every reconciling scan */
    _Atomic int64_t reconcile_ns;   /* CLOCK_REALTIME of the last scan */
    _Atomic int64_t capacity;       /* the inbox's capacity: set by init, lowered by any process told less */
    /* what the last full scan saw, so an unchanged folder need not be read again
     * and a folder changed behind our back (a bash sender) is noticed */
    _Atomic int64_t scan_mtime_ns;  /* the folder's mtime before that scan */
    _Atomic int64_t scan_start_ns;  /* CLOCK_REALTIME when that scan began */
    _Atomic int64_t scan_files;     /* *.json entries it counted */
    _Atomic int64_t scan_ino;       /* the folder's inode, and whether temp files remained (-1) */
    _Atomic int64_t scan_dirsize;   /* the folder's st_size then (tmpfs: 20 bytes an entry) */
    _Atomic int64_t reserved[2];
    char agent[136];
    /* ---- flow control (flow.c): the second half of the slot, layout 3 ---- */
    /* places freed (taken or acked) per second of CLOCK_MONOTONIC, the current
     * second and the one before: second << 40 | places. retry_after comes from it. */
    _Atomic uint64_t drain[2];
    /* the circuit breaker: state:2 | probe limit:6 | probes:6 | failures:10 |
     * until:40, until being CLOCK_MONOTONIC ms (open: when probes may go;
     * half-open: when this round of probes has to have reported). Every
     * transition is one CAS of this word. */
    _Atomic uint64_t circuit;
    /* the failure rate's sliding window: per bucket, window index:24 | failures:20 | calls:20 */
    _Atomic uint64_t circuit_win[2];
    _Atomic int64_t circuit_rejected;  /* sends refused while open */
    /* high-priority messages delivered: a consumer holding a listing of the
     * inbox reads it again when this moved, so they go first */
    _Atomic int64_t high_sent;
    /* fair wake: senders that found the inbox full wait their turn in a line
     * of tickets; only the head waits for room (on wake_seq) */
    _Atomic uint32_t line_next;     /* the next ticket handed out */
    _Atomic uint32_t line_head;     /* futex word: the ticket whose turn it is */
    _Atomic int64_t line_beat_ns;   /* CLOCK_MONOTONIC: the head's last sign of life */
    _Atomic uint64_t line_gone;     /* bit t % 64: ticket t left before its turn */
    /* the adaptive limit: set by consumers from the sojourn of what they take */
    _Atomic int64_t limit;          /* the effective limit of normal sends; 0: none */
    _Atomic int64_t limit_until_ns; /* CLOCK_MONOTONIC: it lapses then, unless set again */
    _Atomic int64_t sojourn_sum_us; /* this interval's samples: their sum and number */
    _Atomic int64_t sojourn_n;
    _Atomic int64_t sojourn_us;     /* the mean of the last interval measured */
    _Atomic int64_t adapt_ns;       /* CLOCK_MONOTONIC: when this interval began */
    /* overload attribution: the heaviest senders (space-saving, 8 entries on
     * one cache line), each key:40 | count:24, counts halved every window */
    _Atomic uint64_t senders[CFN_TOP_SENDERS];
    _Atomic uint64_t senders_window;  /* the window the counts are of */
    /* arrivals: consumers waiting for a message sleep on this word, which
     * every delivery (and claim put back) bumps */
    _Atomic uint32_t arrive_seq;
    _Atomic uint32_t arrive_waiters;  /* consumers asleep on it: a sender wakes them only then */
    _Atomic int64_t flow_reserved2[6];
};
_Static_assert(sizeof(struct cfn_slot) == CFN_SLOT_SIZE, "slot layout");
_Static_assert(offsetof(struct cfn_slot, senders) % 64 == 0, "the top senders share one cache line");

struct cfn_cooldown {
    _Atomic uint64_t key;           /* hash of "type\0subject"; 0 empty */
    _Atomic int64_t last_ns;        /* when that alert last went out */
};

struct cfn_header {
    uint64_t magic;
    uint32_t version;
    uint32_t header_size;
    uint32_t slot_count;
    uint32_t slot_size;
    uint64_t total_size;
    uint32_t cooldown_count;
    uint32_t counter_count;
    _Atomic int64_t created_ns;
    /* live rate-limit settings, written by apply_dynamic_rate_limit */
    _Atomic int64_t rl_batch_size;
    _Atomic int64_t rl_wait_ms;
    _Atomic int64_t rl_load_milli;
    _Atomic int64_t rl_interval_ms;
    _Atomic int64_t rl_updated_ns;
    _Atomic int64_t reserved[16];
    _Atomic int64_t counters[CFN_COUNTERS];
};
_Static_assert(sizeof(struct cfn_header) <= CFN_HEADER_SIZE, "header layout");
_Static_assert(CFN_COOLDOWN_OFF + CFN_COOLDOWNS * sizeof(struct cfn_cooldown) <= CFN_SLOTS_OFF,
               "cooldown table layout");

#define CFN_STATE_SIZE ((size_t)CFN_SLOTS_OFF + (size_t)CFN_SLOTS * CFN_SLOT_SIZE)

/* One mapping of the state file. When the file is deleted or replaced under
 * a running process, the handle maps the new one and keeps the old mapping
 * (threads may still be reading it) until the handle closes. */
struct cfn_region {
    struct cfn_header *hdr;
    struct cfn_slot *slots;
    struct cfn_cooldown *cooldowns;
    int fd;
    struct cfn_region *older;
};

/* Process-local cache of one agent's open folders. */
struct cfn_ent {
    char agent[CFN_AGENT_MAX + 1];
    bool used;
    bool dynamic;                   /* heap-allocated overflow entry */
    bool private;                   /* one caller's alone: its descriptors are not shared */
    bool tmpfs;                     /* the inbox is on tmpfs: its size counts its entries */
    int agentfd;                    /* <base>/<agent> */
    int inboxfd;                    /* <base>/<agent>/inbox, or -1 */
    int lockfd;                     /* <inbox>/.lock: the inbox's gate */
    _Atomic int outboxfd;           /* <base>/<agent>/outbox once seen, else -1 */
    int pins;                       /* callers using it now; never evicted then */
    int holders;                    /* threads holding the gate shared */
    pthread_mutex_t gate_mu;
    /* the inbox's slot as last looked up: valid while the region and the slot's gen match */
    pthread_mutex_t slot_mu;        /* guards the three below (never held while waiting) */
    uint32_t slot;
    uint32_t slot_gen;
    struct cfn_region *slot_region;
    uint64_t tick;
    /* this process's consumer side: the inbox's names, oldest first, from its
     * last read, taken from until used up, so a consume does not read the
     * whole folder each time; and this handle's claim folder */
    pthread_mutex_t list_mu;
    char **list;
    size_t list_n, list_next;
    char **hlist;                   /* the high-priority names, oldest first, taken before list's */
    size_t hlist_n, hlist_next;
    int64_t list_high;              /* the slot's high_sent when the listing was read */
    int high_run;                   /* high messages taken in a row since the last normal one */
    int claimfd;
    bool outbox_tmpfs;              /* the outbox is on tmpfs: its size counts its entries */
    uint64_t sender_key;            /* cfn_sender_key of the agent: its entry in inboxes' top senders */
    int64_t outbox_missing_ns;      /* CLOCK_MONOTONIC when the outbox was last found missing */
    int64_t outbox_sends;           /* sends since the outbox was last measured (not tmpfs) */
};

/* Process-local cache of one sender->recipient sequence file. */
struct cfn_pair {
    char key[2 * CFN_AGENT_MAX + 2];
    bool used;
    bool dynamic;
    int lockfd;                     /* <base>/<from>/.sequences/<to>.lock */
    int seqfd;                      /* <base>/<from>/.sequences/<to> */
    int pins;
    pthread_mutex_t mu;             /* flock is per open file: threads need this too */
    uint64_t tick;
    /* sequence numbers this process reserved in the file and has not used:
     * next..limit (empty when next > limit); the next reservation takes grant */
    int64_t next, limit, grant;
};

#define CFN_SEQ_BLOCK_MAX 64            /* most sequence numbers one reservation takes */
#define CFN_CACHE 64

struct cfn_bus {
    int basefd;
    _Atomic(struct cfn_region *) region;
    pthread_mutex_t mu;             /* guards the caches below and region changes */
    /* A private page the kernel zeroes in a forked child (MADV_WIPEONFORK):
     * a child notices the fork without a getpid() per call. */
    volatile uint32_t *fork_guard;
    _Atomic int inflight;           /* calls inside the handle now; close waits for none */
    _Atomic int closing;
    pid_t pid;
    uint64_t start_ticks;           /* this process's start time, for temp names */
    _Atomic uint64_t id_counter;
    uint64_t id_seed;
    _Atomic int metrics_fd;
    _Atomic int link_mode;          /* how unnamed files get their name: LINK_* in util.c */
    uint64_t tick;
    int32_t gid;                    /* CFN_GROUP, or -1 */
    uint32_t file_mode;             /* 0600, or 0660 with a group */
    uint32_t dir_mode;
    int64_t lock_timeout_ms;        /* longest wait for a lock another process holds */
    cfn_probe_fn probe;             /* asked while waiting whether to give up (Python's signals) */
    cfn_flow_opts flow;             /* this handle's consumer settings */
    _Atomic uint32_t wait_ctl;      /* private futex word: cfn_wait_interrupt moves it */
    /* this handle's consumer identity: claims live in <agent>/.claims/<consumer_id>/
     * and are its own while it holds <base>/.consumers/<consumer_id>.lock */
    pthread_mutex_t consumer_mu;
    char consumer_id[40];
    int consumer_lockfd;
    int64_t region_checked_ns;      /* last time the state file's identity was checked */
    struct cfn_ent ents[CFN_CACHE];
    struct cfn_pair pairs[CFN_CACHE];
    char base_path[4096];
    /* METRICS_FILE as cfn_set_metrics gave it (logfile.c); metrics_fd is its descriptor */
    _Atomic int metrics_state;      /* metrics_mu: 0 not set up, 1 being set up, 2 ready */
    pthread_mutex_t metrics_mu;     /* one metrics write at a time: a rotation swaps metrics_fd */
    int64_t metrics_max;            /* METRICS_MAX_BYTES; 0 never rotates */
    uint32_t metrics_mode;          /* for a file started afresh */
    int32_t metrics_gid;
    dev_t metrics_dev;              /* the file metrics_fd is open on */
    ino_t metrics_ino;
    pid_t metrics_pid;              /* the process that opened it: a forked child reopens */
    char metrics_path[4096];        /* "" when metrics are off */
};

/* What cfn_json_scan found in a JSON text. */
struct cfn_json_info {
    int64_t ts, seq;                /* a top-level object's integer timestamp and sequence */
    bool has_ts, has_seq;
    uint32_t flags;                 /* CFN_JSON_* */
    const char *why;                /* when invalid: what, and where */
    size_t err_at;
};

static inline struct cfn_region *cfn_reg(cfn_bus *bus)
{
    return atomic_load_explicit(&bus->region, memory_order_acquire);
}

/* Bounds every setting must respect: each later computation then fits an
 * int64 of nanoseconds. cfn_fast/config.py holds the same ranges for the
 * environment variables. */
#define CFN_CAPACITY_MAX 1000000000LL       /* MAX_INBOX_SIZE */
#define CFN_WAIT_MS_MAX 3600000LL           /* BACKPRESSURE_WAIT_MS: an hour */
#define CFN_RETRIES_MAX 1000000LL           /* BACKPRESSURE_MAX_RETRIES */
#define CFN_TOTAL_MS_MAX 604800000LL        /* BACKPRESSURE_MAX_TOTAL_MS: a week */
#define CFN_PAYLOAD_MAX 268435456LL         /* MAX_MESSAGE_BYTES: 256 MiB */
#define CFN_TMP_PREFIX ".cfn-"              /* our temporary names: .cfn-<pid>-<ticks>-<hex>.tmp */

/* util.c */
int cfn_fail(cfn_err *err, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
int cfn_fail_sys(cfn_err *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
int cfn_owner_ok(const cfn_bus *bus, uid_t uid, gid_t gid, mode_t mode);
int64_t cfn_now_ns(void);
int64_t cfn_mono_ns(void);
int64_t cfn_mul_sat(int64_t a, int64_t b);
int64_t cfn_add_sat(int64_t a, int64_t b);
int64_t cfn_deadline(int64_t timeout_ms);
uint32_t cfn_hash32(const char *s, size_t n);
uint64_t cfn_hash64(const char *s, size_t n);
uint64_t cfn_random64(cfn_bus *bus);
bool cfn_is_json_name(const char *name, size_t n);
bool cfn_is_tmpfs(int fd);
int cfn_pid_alive(pid_t pid, uint64_t start_ticks);
uint64_t cfn_proc_start_ticks(pid_t pid);
int cfn_futex_wait(_Atomic uint32_t *addr, uint32_t expected, int64_t timeout_ns);
void cfn_futex_wake(_Atomic uint32_t *addr, int n);
int cfn_futex_wait_bits(_Atomic uint32_t *addr, uint32_t expected, int64_t timeout_ns, uint32_t bits);
void cfn_futex_wake_bits(_Atomic uint32_t *addr, uint32_t bits);
void cfn_futex_wake_private(_Atomic uint32_t *addr);
int cfn_write_all(int fd, const char *buf, size_t len);
void cfn_lock_holder(int fd, char *out, size_t cap);
int cfn_flock_until(cfn_bus *bus, int fd, int op, int64_t deadline, cfn_err *err, const char *what, ...)
    __attribute__((format(printf, 6, 7)));
bool cfn_probe_says_stop(cfn_bus *bus, int64_t *last_ns);
int cfn_link_unnamed(cfn_bus *bus, int fd, int dirfd, const char *name);
int cfn_link_mode_unnamed(cfn_bus *bus);
void cfn_link_mode_none(cfn_bus *bus);

/* json.c */
int cfn_json_scan(const char *buf, size_t len, int max_depth, struct cfn_json_info *info);
int cfn_utf8_check(const char *s, size_t n);

/* region.c: the state file, slots, waiters, counters */
int cfn_region_open(cfn_bus *bus, cfn_err *err);
int cfn_region_check(cfn_bus *bus, cfn_err *err);
void cfn_region_close(cfn_bus *bus);
int cfn_slot_find(cfn_bus *bus, struct cfn_region *r, const char *agent, bool create, uint32_t *index,
                  uint32_t *gen, cfn_err *err);
int64_t cfn_slots_sweep_in(cfn_bus *bus, struct cfn_region *r);
void cfn_slot_forget(struct cfn_region *r, const char *agent);
uint32_t cfn_waiter_enter(struct cfn_slot *s);
void cfn_waiter_leave(struct cfn_slot *s, uint32_t epoch);
void cfn_waiters_reset(struct cfn_slot *s);
int64_t cfn_waiters(struct cfn_slot *s);
void cfn_slot_wake(struct cfn_slot *s, int n);
void cfn_slot_sub(struct cfn_slot *s, int64_t n);
void cfn_region_counter_add(struct cfn_region *r, int index, int64_t delta);
void cfn_region_rate_publish(struct cfn_region *r, const cfn_rate_settings *s);
void cfn_region_rate_read(struct cfn_region *r, cfn_rate_settings *out);
int cfn_region_cooldown_try(struct cfn_region *r, const char *key, size_t key_len, int64_t now_ns,
                            int64_t cooldown_ns);

/* flow.c: flow control in the slot */
void cfn_flow_clear(struct cfn_slot *s);
void cfn_arrived(struct cfn_slot *s);
int64_t cfn_arrivals_in(cfn_bus *bus, const char *agent, cfn_err *err);
int cfn_wait_arrival_in(cfn_bus *bus, const char *agent, uint32_t seen, int64_t timeout_ns, cfn_err *err);
int64_t cfn_word_in(cfn_bus *bus, const char *agent, int kind, cfn_err *err);
int cfn_wait_words_in(cfn_bus *bus, const char *names, size_t names_len, const int32_t *kinds, const uint32_t *seen,
                      int32_t n, uint32_t ctl_seen, int64_t timeout_ns, uint8_t *changed, cfn_err *err);
void cfn_drain_add(struct cfn_slot *s, int64_t n, int64_t mono_ns);
int64_t cfn_drain_rate(struct cfn_slot *s, int64_t mono_ns);
int64_t cfn_eta_ns(struct cfn_slot *s, int64_t need, int64_t mono_ns);
int64_t cfn_headroom(int64_t cap, int32_t pct);
uint32_t cfn_line_join(struct cfn_slot *s, int64_t mono_ns);
int cfn_line_turn(struct cfn_slot *s, uint32_t ticket);
bool cfn_line_clear(struct cfn_slot *s, int64_t mono_ns);
int64_t cfn_line_ahead(struct cfn_slot *s, const uint32_t *ticket);
void cfn_line_beat(struct cfn_slot *s, int64_t mono_ns);
void cfn_line_leave(struct cfn_slot *s, uint32_t ticket, int64_t mono_ns);
void cfn_line_reset(struct cfn_slot *s);
int64_t cfn_effective_limit(struct cfn_slot *s, int64_t cap);
bool cfn_sojourn_of(const char *name, int64_t now_ns, int64_t *sojourn_us);
void cfn_sojourn_add(struct cfn_slot *s, int64_t sum_us, int64_t n);
void cfn_adapt(struct cfn_slot *s, const cfn_flow_opts *f, int64_t mono_ns);
int cfn_flow_get_in(cfn_bus *bus, const char *agent, cfn_flow_info *out);
uint64_t cfn_sender_key_of(const char *agent, size_t n);
void cfn_senders_add(struct cfn_slot *s, uint64_t key, int64_t mono_ns);
int cfn_senders_get_in(cfn_bus *bus, const char *agent, cfn_sender_share *out, int cap);
uint32_t cfn_line_bit(uint32_t ticket);
enum { CFN_ADMIT = 0, CFN_ADMIT_PROBE = 1, CFN_REFUSE = 2 };
int cfn_circuit_peek(struct cfn_slot *s, int64_t mono_ns, int64_t *retry_after_ns);
int cfn_circuit_admit(struct cfn_slot *s, const cfn_send_opts *o, int64_t mono_ns, int64_t *retry_after_ns);
int cfn_circuit_record(struct cfn_slot *s, const cfn_send_opts *o, bool failed, int64_t mono_ns);
void cfn_circuit_read(struct cfn_slot *s, int64_t mono_ns, cfn_circuit_info *out);
int cfn_circuit_clear(struct cfn_slot *s);
struct cfn_slot *cfn_slot_lookup(cfn_bus *bus, const char *agent);
int cfn_circuit_get_in(cfn_bus *bus, const char *agent, cfn_circuit_info *out);
int cfn_circuit_reset_in(cfn_bus *bus, const char *agent);

/* bus.c: the handle, calls in flight, the consumer identity, the folder caches */
void cfn_bus_fork_check(cfn_bus *bus);
bool cfn_enter(cfn_bus *bus);
void cfn_leave(cfn_bus *bus);
bool cfn_closing(cfn_bus *bus);
int cfn_open_shared_file(cfn_bus *bus, int dirfd, const char *name);
int cfn_consumer_ready(cfn_bus *bus, cfn_err *err);
int cfn_consumer_alive(cfn_bus *bus, const char *id);
int cfn_ent_get(cfn_bus *bus, const char *agent, bool need_inbox, struct cfn_ent **out, cfn_err *err);
void cfn_ent_put(cfn_bus *bus, struct cfn_ent *e);
void cfn_ent_drop(cfn_bus *bus, struct cfn_ent *e);
int cfn_ent_open_private(cfn_bus *bus, const char *agent, struct cfn_ent *e, cfn_err *err);
void cfn_ent_close_private(struct cfn_ent *e);
struct cfn_slot *cfn_ent_slot(cfn_bus *bus, struct cfn_ent *e, cfn_err *err);
int cfn_gate_shared(cfn_bus *bus, struct cfn_ent *e, int64_t deadline, cfn_err *err);
void cfn_gate_release(struct cfn_ent *e);
int cfn_pair_get(cfn_bus *bus, struct cfn_ent *from, const char *to, struct cfn_pair **out, cfn_err *err);
void cfn_pair_put(cfn_bus *bus, struct cfn_pair *p);
int cfn_init_agent_in(cfn_bus *bus, const char *agent, int64_t capacity, cfn_err *err);
int cfn_forget_agent_in(cfn_bus *bus, const char *agent, cfn_err *err);

/* scan.c: scanning, reconciling, claims of dead consumers, drift */
typedef int (*cfn_scan_cb)(void *ctx, int dfd, const char *name, size_t len, unsigned char type);
int cfn_scan_fd(int dfd, cfn_scan_cb cb, void *ctx, cfn_err *err, const char *what);
int cfn_scan_dir(int dirfd, cfn_scan_cb cb, void *ctx, cfn_err *err, const char *what);
unsigned char cfn_entry_type(int dfd, const char *name, unsigned char type);
/* deadline: CLOCK_MONOTONIC ns for the exclusive lock; 0 means LOCK_TIMEOUT_MS from now */
int cfn_reconcile_ent(cfn_bus *bus, struct cfn_ent *e, int force, int64_t seen_gen, int64_t deadline,
                      cfn_reconcile_result *res, cfn_err *err);
int cfn_inbox_drift(struct cfn_ent *e, struct cfn_slot *s, int64_t *entries_since_scan);
int cfn_reconcile_in(cfn_bus *bus, const char *agent, int force, cfn_reconcile_result *res, cfn_err *err);
int64_t cfn_inbox_size_in(cfn_bus *bus, const char *agent, cfn_err *err);
int64_t cfn_inbox_capacity_in(cfn_bus *bus, const char *agent, int64_t own, cfn_err *err);
int64_t cfn_scan_count_in(cfn_bus *bus, const char *agent, const char *box, cfn_err *err);
int cfn_slot_info_in(cfn_bus *bus, int64_t index, cfn_slot_info *out);

/* send.c: delivery and the send loop */
int64_t cfn_capacity_for(struct cfn_slot *s, int64_t own);
int cfn_write_file(cfn_bus *bus, int dirfd, const char *name, const char *buf, size_t len,
                   const cfn_send_opts *o, bool *retry, cfn_err *err, const char *where);
int64_t cfn_next_sequence_in(cfn_bus *bus, const char *from, const char *to, cfn_err *err);
int cfn_send_in(cfn_bus *bus, const char *from, const char *to, const char *type, size_t type_len,
                const char *payload, size_t payload_len, const cfn_send_opts *o, cfn_send_result *res,
                cfn_err *err);

/* consume.c: reading, taking, claims, clearing */
void cfn_listing_free(struct cfn_ent *e);
int cfn_read_messages_in(cfn_bus *bus, const char *agent, int mode, int64_t max, int64_t max_bytes,
                         cfn_blob *out, cfn_err *err);
int64_t cfn_take_in(cfn_bus *bus, const char *agent, int from, const char *names, size_t names_len,
                    uint8_t *taken, cfn_err *err);
int64_t cfn_put_back_in(cfn_bus *bus, const char *agent, const char *names, size_t names_len, cfn_err *err);
int64_t cfn_quarantine_in(cfn_bus *bus, const char *agent, int from, const char *names, size_t names_len,
                          cfn_err *err);
int64_t cfn_clear_inbox_in(cfn_bus *bus, const char *agent, cfn_err *err);

/* logfile.c: write(2) for the metrics file (len, or -1 and errno), following its rotation */
ssize_t cfn_metrics_append(cfn_bus *bus, const char *line, size_t len);
int64_t cfn_metrics_write_in(cfn_bus *bus, const char *data, size_t len, int64_t nlines, cfn_err *err);
int cfn_set_metrics_in(cfn_bus *bus, const char *path, int64_t max_bytes, uint32_t mode, int32_t gid, cfn_err *err);
void cfn_metrics_close(cfn_bus *bus);

/* metrics.c */
int cfn_metric_emit_in(cfn_bus *bus, const char *name, double value, const char *unit,
                       const char *tags_json, size_t tags_len, cfn_err *err);

#endif
