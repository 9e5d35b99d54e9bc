/*
 * internal.h - what the C files share and Python never sees: the layout of the
 * mapped state file and the process-local handle.
 */
#ifndef CFN_INTERNAL_H
#define CFN_INTERNAL_H

#define _GNU_SOURCE 1
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <sys/types.h>

#include "cfn_fast.h"

_Static_assert(ATOMIC_LLONG_LOCK_FREE == 2, "64-bit atomics must be lock-free in shared memory");
_Static_assert(ATOMIC_INT_LOCK_FREE == 2, "32-bit atomics must be lock-free in shared memory");

#define CFN_MAGIC 0x31545341464e4643ULL  /* "CFNFAST1" */
#define CFN_STATE_NAME ".cfn-fast.shm"
#define CFN_COUNT_UNKNOWN INT64_MIN      /* slot never scanned */
#define CFN_HEADER_SIZE 4096
#define CFN_COOLDOWN_OFF 4096
#define CFN_SLOTS_OFF 32768
#define CFN_SLOT_SIZE 256

enum { SLOT_EMPTY = 0, SLOT_BUSY = 1, SLOT_READY = 2 };

/* One inbox's shared state. Every field a process may change at any time is
 * atomic; `agent` and `hash` are written once, before state turns READY. */
struct cfn_slot {
    _Atomic uint32_t state;
    _Atomic uint32_t wake_seq;      /* futex word: bumped whenever room appears */
    _Atomic uint32_t waiters;       /* senders asleep on wake_seq */
    uint32_t hash;
    _Atomic int64_t count;          /* files + reservations + claims */
    _Atomic int64_t claimed;        /* messages in this inbox's claim folders */
    _Atomic int64_t reconcile_gen;  /* bumped by every reconciling scan */
    _Atomic int64_t reconcile_ns;   /* CLOCK_REALTIME of the last scan */
    _Atomic int64_t capacity;       /* capacity last used by a sender */
    /* what the last full scan saw, so an unchanged folder need not be read again */
    _Atomic int64_t scan_mtime_ns;  /* the folder's mtime before that scan */
    _Atomic int64_t scan_start_ns;  /* CLOCK_REALTIME when that scan began */
    _Atomic int64_t scan_files;     /* *.json entries it counted */
    _Atomic int64_t scan_ino;       /* the folder's inode, and whether temp files remained (bit 63) */
    _Atomic int64_t reserved[4];    /* room for per-inbox counters */
    char agent[136];
};
_Static_assert(sizeof(struct cfn_slot) == CFN_SLOT_SIZE, "slot layout");

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

/* Process-local cache of one agent's open folders. */
struct cfn_ent {
    char agent[CFN_AGENT_MAX + 1];
    bool used;
    bool dynamic;                   /* heap-allocated overflow entry */
    bool private;                   /* one caller's alone: its descriptors are not shared */
    int agentfd;                    /* <base>/<agent> */
    int inboxfd;                    /* <base>/<agent>/inbox, or -1 */
    int lockfd;                     /* <inbox>/.lock: the inbox's gate */
    _Atomic int outboxfd;           /* <base>/<agent>/outbox once seen, else -1 */
    int pins;                       /* callers using it now; never evicted then */
    int holders;                    /* threads holding the gate shared */
    pthread_mutex_t gate_mu;
    uint32_t slot;
    uint64_t tick;
    /* this process's consumer side: the inbox's names, oldest first, from its
     * last read, taken from until used up, so a consume does not read the
     * whole folder each time; and this process's claim folder */
    pthread_mutex_t list_mu;
    char **list;
    size_t list_n, list_next;
    int claimfd;
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
};

#define CFN_CACHE 64

struct cfn_bus {
    int basefd;
    int statefd;
    struct cfn_header *hdr;
    struct cfn_slot *slots;
    struct cfn_cooldown *cooldowns;
    pthread_mutex_t mu;             /* guards the caches below */
    pid_t pid;                      /* a forked child rebuilds its caches */
    uint64_t start_ticks;           /* this process's start time, for claim owners */
    _Atomic uint64_t id_counter;
    uint64_t id_seed;
    _Atomic int metrics_fd;
    _Atomic int link_mode;          /* how unnamed files get their name: LINK_* in inbox.c */
    uint64_t tick;
    int32_t gid;                    /* CFN_GROUP, or -1 */
    uint32_t file_mode;             /* 0600, or 0660 with a group */
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
    char metrics_path[4096];        /* "" when metrics_fd came from cfn_set_metrics_fd */
};

/* err.c */
int cfn_fail(cfn_err *err, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
int cfn_fail_sys(cfn_err *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* util.c */
int cfn_owner_ok(const cfn_bus *bus, uid_t uid, gid_t gid, mode_t mode);
int64_t cfn_now_ns(void);
int64_t cfn_mono_ns(void);
uint32_t cfn_hash32(const char *s, size_t n);
uint64_t cfn_hash64(const char *s, size_t n);
uint64_t cfn_random64(cfn_bus *bus);
bool cfn_is_json_name(const char *name, size_t n);
int cfn_pid_alive(pid_t pid, uint64_t start_ticks);
uint64_t cfn_proc_start_ticks(pid_t pid);
int cfn_futex_wait(_Atomic uint32_t *addr, uint32_t expected, int64_t timeout_ns);
void cfn_futex_wake(_Atomic uint32_t *addr, int n);
int cfn_write_all(int fd, const char *buf, size_t len);

/* json.c */
int cfn_json_check(const char *buf, size_t len, int64_t *ts, int64_t *seq);
size_t cfn_json_escape(char *out, const char *s, size_t n);
int cfn_utf8_check(const char *s, size_t n);

/* region.c */
int cfn_region_open(cfn_bus *bus, cfn_err *err);
void cfn_region_close(cfn_bus *bus);
int cfn_slot_find(cfn_bus *bus, const char *agent, bool create, uint32_t *index, cfn_err *err);
void cfn_slot_wake(struct cfn_slot *s, int n);
void cfn_slot_sub(struct cfn_slot *s, int64_t n);

/* bus.c: agent folder cache */
void cfn_bus_fork_check(cfn_bus *bus);
int cfn_open_shared_file(cfn_bus *bus, int dirfd, const char *name);
int cfn_ent_get(cfn_bus *bus, const char *agent, bool need_inbox, struct cfn_ent **out, cfn_err *err);
void cfn_ent_put(cfn_bus *bus, struct cfn_ent *e);
void cfn_ent_drop(cfn_bus *bus, struct cfn_ent *e);
int cfn_gate_shared(struct cfn_ent *e, cfn_err *err);
void cfn_gate_release(struct cfn_ent *e);
int cfn_pair_get(cfn_bus *bus, struct cfn_ent *from, const char *to, uint32_t dir_mode,
                 struct cfn_pair **out, cfn_err *err);
void cfn_pair_put(cfn_bus *bus, struct cfn_pair *p);

/* logfile.c: write(2) for the metrics file (len, or -1 and errno), following its rotation */
ssize_t cfn_metrics_append(cfn_bus *bus, const char *line, size_t len);

/* inbox.c */
int cfn_reconcile_ent(cfn_bus *bus, struct cfn_ent *e, int force, int64_t seen_gen,
                      cfn_reconcile_result *res, cfn_err *err);
int cfn_ent_open_private(cfn_bus *bus, const char *agent, struct cfn_ent *e, cfn_err *err);
void cfn_ent_close_private(struct cfn_ent *e);

#endif
