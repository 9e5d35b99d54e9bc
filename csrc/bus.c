/*
 * bus.c - the handle Python owns: the base folder's descriptor, the mapped
 * state, this handle's consumer identity, and small caches of open folder and
 * sequence-file descriptors so a send opens exactly one new file. Every path
 * below the base folder is opened relative to a descriptor, one component at
 * a time, with O_NOFOLLOW.
 *
 * Calls into a handle are counted (cfn_enter/cfn_leave): cfn_bus_close waits
 * for the calls in flight, so it never unmaps state under a running call;
 * the memory of the handle itself is freed only by cfn_bus_free, which its
 * owner runs when nothing can call any more.
 */
#include "internal.h"

#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

int cfn_check_agent(const char *agent, cfn_err *err)
{
    size_t n = strnlen(agent, CFN_AGENT_MAX + 1);
    if (n == 0)
        return cfn_fail(err, CFN_E_BADID, "agent id is empty");
    if (n > CFN_AGENT_MAX)
        return cfn_fail(err, CFN_E_BADID, "agent id is longer than %d bytes", CFN_AGENT_MAX);
    if (agent[0] == '.')
        return cfn_fail(err, CFN_E_BADID, "agent id '%.*s' starts with '.'", (int)n, agent);
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)agent[i];
        bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                  c == '.' || c == '_' || c == '-';
        if (!ok)
            return cfn_fail(err, CFN_E_BADID,
                            "agent id has a character that is not allowed (byte 0x%02x at %zu); "
                            "use letters, digits, '.', '_' and '-'", c, i);
    }
    return 0;
}

/* ---- calls in flight, fork ------------------------------------------------- */

static void caches_init(cfn_bus *bus);
static void ent_close(struct cfn_ent *e);
static void pair_close(struct cfn_pair *p);

static void seed_ids(cfn_bus *bus)
{
    uint64_t seed;
    if (getrandom(&seed, sizeof seed, GRND_NONBLOCK) != (ssize_t)sizeof seed)
        seed = (uint64_t)cfn_now_ns() ^ ((uint64_t)getpid() << 32);
    bus->id_seed = seed;
    atomic_store(&bus->id_counter, 0);
    bus->pid = getpid();
    bus->start_ticks = cfn_proc_start_ticks(bus->pid);
}

/* A forked child shares its parent's open file descriptions, and so its
 * flock locks: it must not use the parent's cached descriptors, nor pass
 * for the parent's consumer. Python's threads do not survive fork, so
 * nothing in the caches is in use in the child. */
static void after_fork(cfn_bus *bus)
{
    for (int i = 0; i < CFN_CACHE; i++) {
        ent_close(&bus->ents[i]);
        pair_close(&bus->pairs[i]);
    }
    caches_init(bus);
    pthread_mutex_init(&bus->consumer_mu, NULL);
    if (bus->consumer_lockfd >= 0)
        (void)close(bus->consumer_lockfd);  /* our copy only: the parent keeps its lock */
    bus->consumer_lockfd = -1;
    bus->consumer_id[0] = '\0';
    atomic_store(&bus->inflight, 0);
    seed_ids(bus);
}

void cfn_bus_fork_check(cfn_bus *bus)
{
    if (bus->fork_guard ? *bus->fork_guard != 0 : bus->pid == getpid())
        return;
    after_fork(bus);
    if (bus->fork_guard)
        *bus->fork_guard = 1;
}

/* false when the handle is closing: the caller returns CFN_E_CLOSED. */
bool cfn_enter(cfn_bus *bus)
{
    cfn_bus_fork_check(bus);
    atomic_fetch_add(&bus->inflight, 1);
    if (atomic_load(&bus->closing)) {
        atomic_fetch_sub(&bus->inflight, 1);
        return false;
    }
    return true;
}

void cfn_leave(cfn_bus *bus)
{
    atomic_fetch_sub(&bus->inflight, 1);
}

bool cfn_closing(cfn_bus *bus)
{
    return atomic_load_explicit(&bus->closing, memory_order_relaxed) != 0;
}

/* ---- the handle ------------------------------------------------------------ */

static void ent_close(struct cfn_ent *e)
{
    if (e->agentfd >= 0) (void)close(e->agentfd);
    if (e->inboxfd >= 0) (void)close(e->inboxfd);
    if (e->lockfd >= 0) (void)close(e->lockfd);
    int ob = atomic_exchange(&e->outboxfd, -1);
    if (ob >= 0) (void)close(ob);
    if (e->claimfd >= 0) (void)close(e->claimfd);
    e->claimfd = -1;
    cfn_listing_free(e);
    e->high_run = 0;
    e->agentfd = e->inboxfd = e->lockfd = -1;
    e->slot_region = NULL;
    e->used = false;
}

static void pair_close(struct cfn_pair *p)
{
    if (p->lockfd >= 0) (void)close(p->lockfd);
    if (p->seqfd >= 0) (void)close(p->seqfd);
    p->lockfd = p->seqfd = -1;
    p->used = false;
}

static void ent_init(struct cfn_ent *e)
{
    memset(e, 0, sizeof *e);
    e->agentfd = e->inboxfd = e->lockfd = e->claimfd = -1;
    atomic_store(&e->outboxfd, -1);
    pthread_mutex_init(&e->gate_mu, NULL);
    pthread_mutex_init(&e->list_mu, NULL);
    pthread_mutex_init(&e->slot_mu, NULL);
}

static void caches_init(cfn_bus *bus)
{
    pthread_mutex_init(&bus->mu, NULL);
    for (int i = 0; i < CFN_CACHE; i++) {
        ent_init(&bus->ents[i]);
        struct cfn_pair *p = &bus->pairs[i];
        memset(p, 0, sizeof *p);
        p->lockfd = p->seqfd = -1;
        pthread_mutex_init(&p->mu, NULL);
    }
}

/* mkdir -p of an absolute or relative path, each new component with `mode`. */
static int mkdirs(const char *path, uint32_t mode, cfn_err *err)
{
    char buf[4096];
    size_t n = strlen(path);
    if (n >= sizeof buf)
        return cfn_fail(err, -ENAMETOOLONG, "base folder path is too long");
    memcpy(buf, path, n + 1);
    for (size_t i = 1; i <= n; i++) {
        if (buf[i] == '/' || buf[i] == '\0') {
            char c = buf[i];
            buf[i] = '\0';
            if (mkdir(buf, (mode_t)mode) != 0 && errno != EEXIST)
                return cfn_fail_sys(err, "mkdir %s", buf);
            buf[i] = c;
        }
    }
    return 0;
}

static int open_base(const char *base_dir, int flags, const cfn_bus_opts *o, cfn_err *err)
{
    cfn_bus probe = {.gid = o->gid};
    if ((flags & CFN_OPEN_CREATE) && mkdirs(base_dir, o->dir_mode, err) != 0)
        return -1;
    int fd = open(base_dir, DIR_FLAGS);
    if (fd < 0) {
        if (errno == ELOOP || errno == ENOTDIR)
            cfn_fail(err, CFN_E_UNSAFE, "base folder %s is a symlink or not a folder; refusing it", base_dir);
        else
            cfn_fail_sys(err, "open base folder %s", base_dir);
        return -1;
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
        cfn_fail_sys(err, "fstat base folder %s", base_dir);
        (void)close(fd);
        return -1;
    }
    if (o->gid >= 0 && st.st_uid == geteuid() && st.st_gid != (gid_t)o->gid &&
        (fchown(fd, (uid_t)-1, (gid_t)o->gid) != 0 || fchmod(fd, (mode_t)o->dir_mode) != 0 || fstat(fd, &st) != 0)) {
        cfn_fail_sys(err, "give base folder %s to group %d", base_dir, (int)o->gid);
        (void)close(fd);
        return -1;
    }
    if (!cfn_owner_ok(&probe, st.st_uid, st.st_gid, st.st_mode)) {
        cfn_fail(err, CFN_E_UNSAFE, "base folder %s belongs to uid %u, not to this user (uid %u)%s; refusing it",
                 base_dir, (unsigned)st.st_uid, (unsigned)geteuid(),
                 o->gid >= 0 ? " nor, unwritable by others, to CFN_GROUP" : "");
        (void)close(fd);
        return -1;
    }
    return fd;
}

cfn_bus *cfn_bus_open(const char *base_dir, int flags, const cfn_bus_opts *o, cfn_err *err)
{
    if (strlen(base_dir) >= sizeof(((cfn_bus *)0)->base_path)) {
        cfn_fail(err, -ENAMETOOLONG, "base folder path is too long");
        return NULL;
    }
    if (o->lock_timeout_ms < 1 || o->lock_timeout_ms > 86400000LL) {
        cfn_fail(err, CFN_E_BADARG, "lock timeout must be 1 ms to 1 day, not %" PRId64 " ms", o->lock_timeout_ms);
        return NULL;
    }
    int fd = open_base(base_dir, flags, o, err);
    if (fd < 0)
        return NULL;
    cfn_bus *bus = calloc(1, sizeof *bus);
    if (!bus) {
        cfn_fail(err, -ENOMEM, "allocating the bus handle");
        (void)close(fd);
        return NULL;
    }
    bus->basefd = fd;
    bus->gid = o->gid;
    bus->dir_mode = o->dir_mode;
    bus->file_mode = o->gid >= 0 ? 0660 : 0600;
    bus->lock_timeout_ms = o->lock_timeout_ms;
    bus->consumer_lockfd = -1;
    atomic_store(&bus->metrics_fd, -1);
    snprintf(bus->base_path, sizeof bus->base_path, "%s", base_dir);
    caches_init(bus);
    pthread_mutex_init(&bus->consumer_mu, NULL);
    seed_ids(bus);
    void *page = mmap(NULL, (size_t)sysconf(_SC_PAGESIZE), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (page != MAP_FAILED && madvise(page, (size_t)sysconf(_SC_PAGESIZE), MADV_WIPEONFORK) == 0) {
        bus->fork_guard = page;
        *bus->fork_guard = 1;
    } else if (page != MAP_FAILED) {
        (void)munmap(page, (size_t)sysconf(_SC_PAGESIZE));  /* an old kernel: getpid() per call instead */
    }
    if (cfn_region_open(bus, err) != 0) {
        cfn_bus_free(bus);
        return NULL;
    }
    return bus;
}

int cfn_bus_set_probe(cfn_bus *bus, cfn_probe_fn probe)
{
    bus->probe = probe;  /* set right after open, before any call waits */
    return 0;
}

int cfn_bus_set_flow(cfn_bus *bus, const cfn_flow_opts *o, cfn_err *err)
{
    if (o->priority_ratio < 0 || o->adaptive_target_ms < 0 || o->adaptive_interval_ms < 0 || o->adaptive_floor < 0)
        return cfn_fail(err, CFN_E_BADARG, "flow settings must not be negative");
    bus->flow = *o;  /* set right after open, before any other call */
    return 0;
}

/* Releases everything once the calls in flight have returned. Idempotent. */
void cfn_bus_close(cfn_bus *bus)
{
    if (!bus || atomic_exchange(&bus->closing, 1))
        return;
    cfn_bus_fork_check(bus);
    while (atomic_load(&bus->inflight) > 0) {
        struct timespec ts = {0, 200000};
        (void)nanosleep(&ts, NULL);
    }
    for (int i = 0; i < CFN_CACHE; i++) {
        ent_close(&bus->ents[i]);
        pair_close(&bus->pairs[i]);
    }
    cfn_metrics_close(bus);
    cfn_region_close(bus);
    if (bus->consumer_lockfd >= 0)
        (void)close(bus->consumer_lockfd);
    bus->consumer_lockfd = -1;
    if (bus->basefd >= 0)
        (void)close(bus->basefd);
    bus->basefd = -1;
}

void cfn_bus_free(cfn_bus *bus)
{
    if (!bus)
        return;
    cfn_bus_close(bus);
    for (int i = 0; i < CFN_CACHE; i++) {
        pthread_mutex_destroy(&bus->ents[i].gate_mu);
        pthread_mutex_destroy(&bus->ents[i].list_mu);
        pthread_mutex_destroy(&bus->ents[i].slot_mu);
        pthread_mutex_destroy(&bus->pairs[i].mu);
    }
    pthread_mutex_destroy(&bus->mu);
    pthread_mutex_destroy(&bus->consumer_mu);
    if (bus->fork_guard)
        (void)munmap((void *)bus->fork_guard, (size_t)sysconf(_SC_PAGESIZE));
    free(bus);
}

/* Opens (creating) a lock or sequence file that other processes, and with
 * CFN_GROUP other users, share: mode 0600/0660, never through a symlink. */
int cfn_open_shared_file(cfn_bus *bus, int dirfd, const char *name)
{
    int fd = openat(dirfd, name, O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, (mode_t)bus->file_mode);
    if (fd >= 0 && bus->gid >= 0) {
        struct stat st;
        if (fstat(fd, &st) == 0 && st.st_uid == geteuid() && (st.st_mode & 0777) != bus->file_mode)
            (void)fchmod(fd, (mode_t)bus->file_mode);  /* umask took the group bits: give them back */
    }
    return fd;
}

/* ---- this handle's consumer identity ------------------------------------------ */

/* Makes sure this handle has a consumer identity and holds its lock:
 * <base>/.consumers/<id>.lock, flocked exclusive for the handle's life. The
 * kernel drops the lock when the process dies, whatever PID namespace it
 * lives in, so a claim folder's owner is alive exactly while its lock is
 * held. The lock is taken before any claim folder of the id exists. */
int cfn_consumer_ready(cfn_bus *bus, cfn_err *err)
{
    int rc = 0;
    pthread_mutex_lock(&bus->consumer_mu);
    if (bus->consumer_lockfd >= 0)
        goto out;
    if (mkdirat(bus->basefd, CFN_CONSUMERS_DIR, (mode_t)bus->dir_mode) != 0 && errno != EEXIST) {
        rc = cfn_fail_sys(err, "mkdir %s/" CFN_CONSUMERS_DIR, bus->base_path);
        goto out;
    }
    int dfd = openat(bus->basefd, CFN_CONSUMERS_DIR, DIR_FLAGS);
    if (dfd < 0) {
        rc = errno == ELOOP || errno == ENOTDIR
                 ? cfn_fail(err, CFN_E_UNSAFE, "%s/" CFN_CONSUMERS_DIR " is a symlink or not a folder", bus->base_path)
                 : cfn_fail_sys(err, "open %s/" CFN_CONSUMERS_DIR, bus->base_path);
        goto out;
    }
    char id[40], name[48];
    snprintf(id, sizeof id, "c%016" PRIx64, cfn_random64(bus));
    snprintf(name, sizeof name, "%s.lock", id);
    int fd = openat(dfd, name, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, (mode_t)bus->file_mode);
    if (fd < 0) {
        rc = cfn_fail_sys(err, "create %s/" CFN_CONSUMERS_DIR "/%s", bus->base_path, name);
    } else if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
        rc = cfn_fail_sys(err, "lock %s/" CFN_CONSUMERS_DIR "/%s", bus->base_path, name);
        (void)unlinkat(dfd, name, 0);
        (void)close(fd);
    } else {
        bus->consumer_lockfd = fd;
        snprintf(bus->consumer_id, sizeof bus->consumer_id, "%s", id);
    }
    (void)close(dfd);
out:
    pthread_mutex_unlock(&bus->consumer_mu);
    return rc;
}

/* 1 while the consumer `id` lives (its lock is held), 0 when it is gone. */
int cfn_consumer_alive(cfn_bus *bus, const char *id)
{
    char name[NAME_MAX + 1];
    if (strlen(id) > 40 || strchr(id, '/'))
        return 0;
    snprintf(name, sizeof name, CFN_CONSUMERS_DIR "/%s.lock", id);
    int fd = openat(bus->basefd, name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0)
        return errno == ENOENT || errno == ELOOP ? 0 : 1;  /* cannot tell: never take a live consumer's claims */
    int alive = flock(fd, LOCK_SH | LOCK_NB) != 0 && errno == EWOULDBLOCK;
    if (!alive)
        (void)unlinkat(bus->basefd, name, 0);  /* its owner is gone: the lock file goes too */
    (void)close(fd);
    return alive;
}

/* ---- the folder cache ----------------------------------------------------------- */

/* Opens <base>/<agent> and, when asked, its inbox and gate. */
static int ent_open(cfn_bus *bus, struct cfn_ent *e, const char *agent, bool need_inbox, cfn_err *err)
{
    e->agentfd = e->inboxfd = e->lockfd = -1;
    e->claimfd = -1;
    e->slot_region = NULL;
    e->tmpfs = false;
    e->outbox_sends = 0;
    e->outbox_missing_ns = 0;
    atomic_store(&e->outboxfd, -1);
    e->agentfd = openat(bus->basefd, agent, DIR_FLAGS);
    if (e->agentfd < 0) {
        if (errno == ENOENT)
            return cfn_fail(err, CFN_E_NOINBOX, "agent '%s' has no folder (run init for it first)", agent);
        if (errno == ELOOP || errno == ENOTDIR)
            return cfn_fail(err, CFN_E_UNSAFE, "%s/%s is a symlink or not a folder; refusing it",
                            bus->base_path, agent);
        return cfn_fail_sys(err, "open %s/%s", bus->base_path, agent);
    }
    e->inboxfd = openat(e->agentfd, "inbox", DIR_FLAGS);
    if (e->inboxfd < 0) {
        int rc;
        if (errno == ENOENT) {
            if (!need_inbox)
                goto done;
            rc = cfn_fail(err, CFN_E_NOINBOX, "agent '%s' has no inbox (run init for it first)", agent);
        } else if (errno == ELOOP || errno == ENOTDIR) {
            rc = cfn_fail(err, CFN_E_UNSAFE, "%s/%s/inbox is a symlink or not a folder; refusing it",
                          bus->base_path, agent);
        } else {
            rc = cfn_fail_sys(err, "open %s/%s/inbox", bus->base_path, agent);
        }
        ent_close(e);
        return rc;
    }
    e->lockfd = cfn_open_shared_file(bus, e->inboxfd, ".lock");
    if (e->lockfd < 0) {
        int rc = errno == ELOOP ? cfn_fail(err, CFN_E_UNSAFE, "%s/%s/inbox/.lock is a symlink; refusing it",
                                           bus->base_path, agent)
                                : cfn_fail_sys(err, "open %s/%s/inbox/.lock", bus->base_path, agent);
        ent_close(e);
        return rc;
    }
    e->tmpfs = cfn_is_tmpfs(e->inboxfd);
done:
    snprintf(e->agent, sizeof e->agent, "%s", agent);
    e->sender_key = cfn_sender_key_of(agent, strlen(agent));
    return 0;
}

/* The inbox's slot, found (made) again when the state file was re-mapped or
 * the slot freed since it was cached. NULL with err set when there is none. */
struct cfn_slot *cfn_ent_slot(cfn_bus *bus, struct cfn_ent *e, cfn_err *err)
{
    struct cfn_region *r = cfn_reg(bus);
    pthread_mutex_lock(&e->slot_mu);
    struct cfn_slot *s = NULL;
    if (e->slot_region == r) {
        s = &r->slots[e->slot];
        if (atomic_load_explicit(&s->gen, memory_order_acquire) != e->slot_gen ||
            atomic_load_explicit(&s->state, memory_order_acquire) != SLOT_READY)
            s = NULL;
    }
    if (!s) {
        uint32_t idx, gen;
        if (cfn_slot_find(bus, r, e->agent, true, &idx, &gen, err) == 0) {
            e->slot = idx;
            e->slot_gen = gen;
            e->slot_region = r;
            s = &r->slots[idx];
        }
    }
    pthread_mutex_unlock(&e->slot_mu);
    return s;
}

/* Pins the cached entry for agent, opening it on a miss. A cached entry
 * without an inbox is reopened when the caller needs one (init may have run). */
int cfn_ent_get(cfn_bus *bus, const char *agent, bool need_inbox, struct cfn_ent **out, cfn_err *err)
{
    pthread_mutex_lock(&bus->mu);
    struct cfn_ent *victim = NULL;
    for (int i = 0; i < CFN_CACHE; i++) {
        struct cfn_ent *e = &bus->ents[i];
        if (e->used && strcmp(e->agent, agent) == 0) {
            if (need_inbox && e->inboxfd < 0) {
                if (e->pins > 0) {
                    victim = NULL;  /* in use without an inbox: take a private entry below */
                    break;
                }
                ent_close(e);
                victim = e;
                break;
            }
            e->pins++;
            e->tick = ++bus->tick;
            pthread_mutex_unlock(&bus->mu);
            *out = e;
            return 0;
        }
        if (e->pins == 0 && (!victim || !e->used || (victim->used && e->tick < victim->tick)))
            victim = e;
    }
    if (victim) {
        if (victim->used)
            ent_close(victim);
        victim->pins = 1;  /* reserved while we open, outside the lock */
        victim->tick = ++bus->tick;
    }
    pthread_mutex_unlock(&bus->mu);
    struct cfn_ent *e = victim;
    if (!e) {  /* every entry pinned by other threads: use a private one */
        e = malloc(sizeof *e);
        if (!e)
            return cfn_fail(err, -ENOMEM, "allocating a folder cache entry");
        ent_init(e);
        e->dynamic = true;
        e->pins = 1;
    }
    int rc = ent_open(bus, e, agent, need_inbox, err);
    if (rc) {
        if (e->dynamic) {
            pthread_mutex_destroy(&e->gate_mu);
            pthread_mutex_destroy(&e->list_mu);
            pthread_mutex_destroy(&e->slot_mu);
            free(e);
        } else {
            pthread_mutex_lock(&bus->mu);
            e->pins = 0;
            e->used = false;
            pthread_mutex_unlock(&bus->mu);
        }
        return rc;
    }
    e->holders = 0;
    pthread_mutex_lock(&bus->mu);
    e->used = true;
    pthread_mutex_unlock(&bus->mu);
    *out = e;
    return 0;
}

/* An entry outside the cache, for one caller (a reconcile sweep over many
 * inboxes would only churn the cache). Its lock descriptor is its own, so it
 * can take the gate exclusive directly. */
int cfn_ent_open_private(cfn_bus *bus, const char *agent, struct cfn_ent *e, cfn_err *err)
{
    ent_init(e);
    e->private = true;
    int rc = ent_open(bus, e, agent, true, err);
    if (rc)
        cfn_ent_close_private(e);
    return rc;
}

void cfn_ent_close_private(struct cfn_ent *e)
{
    ent_close(e);
    pthread_mutex_destroy(&e->gate_mu);
    pthread_mutex_destroy(&e->list_mu);
    pthread_mutex_destroy(&e->slot_mu);
}

void cfn_ent_put(cfn_bus *bus, struct cfn_ent *e)
{
    if (e->dynamic) {
        ent_close(e);
        pthread_mutex_destroy(&e->gate_mu);
        pthread_mutex_destroy(&e->list_mu);
        pthread_mutex_destroy(&e->slot_mu);
        free(e);
        return;
    }
    pthread_mutex_lock(&bus->mu);
    e->pins--;
    pthread_mutex_unlock(&bus->mu);
}

/* Releases the pin and forgets the entry (its folder went away). */
void cfn_ent_drop(cfn_bus *bus, struct cfn_ent *e)
{
    if (e->dynamic) {
        cfn_ent_put(bus, e);
        return;
    }
    pthread_mutex_lock(&bus->mu);
    if (--e->pins == 0)
        ent_close(e);
    else
        e->agent[0] = '\0';  /* others still use it; stop handing it out */
    pthread_mutex_unlock(&bus->mu);
}

/* The inbox's gate, shared, waiting no later than deadline for a holder of
 * it exclusive (a reconcile, a bash writer). flock belongs to the open file,
 * which all threads of this process share, so the first thread in takes it
 * and the last out drops it. */
int cfn_gate_shared(cfn_bus *bus, struct cfn_ent *e, int64_t deadline, cfn_err *err)
{
    int rc = 0;
    pthread_mutex_lock(&e->gate_mu);
    if (e->holders == 0)
        rc = cfn_flock_until(bus, e->lockfd, LOCK_SH, deadline, err, "%s/%s/inbox/.lock", bus->base_path, e->agent);
    if (rc == 0)
        e->holders++;
    pthread_mutex_unlock(&e->gate_mu);
    return rc;
}

void cfn_gate_release(struct cfn_ent *e)
{
    pthread_mutex_lock(&e->gate_mu);
    if (--e->holders == 0)
        (void)flock(e->lockfd, LOCK_UN);  /* cannot fail on a valid descriptor */
    pthread_mutex_unlock(&e->gate_mu);
}

/* ---- the sequence-file cache ------------------------------------------------------ */

static int pair_open(cfn_bus *bus, struct cfn_pair *p, struct cfn_ent *from, const char *to, cfn_err *err)
{
    int seqdir = openat(from->agentfd, ".sequences", DIR_FLAGS);
    if (seqdir < 0 && errno == ENOENT) {
        if (mkdirat(from->agentfd, ".sequences", (mode_t)bus->dir_mode) != 0 && errno != EEXIST)
            return cfn_fail_sys(err, "mkdir %s/.sequences", from->agent);
        seqdir = openat(from->agentfd, ".sequences", DIR_FLAGS);
    }
    if (seqdir < 0)
        return errno == ELOOP || errno == ENOTDIR
                   ? cfn_fail(err, CFN_E_UNSAFE, "%s/.sequences is a symlink or not a folder", from->agent)
                   : cfn_fail_sys(err, "open %s/.sequences", from->agent);
    char lockname[CFN_AGENT_MAX + 8];
    snprintf(lockname, sizeof lockname, "%s.lock", to);
    int rc = 0;
    p->lockfd = cfn_open_shared_file(bus, seqdir, lockname);
    if (p->lockfd < 0) {
        rc = errno == ELOOP ? cfn_fail(err, CFN_E_UNSAFE, "%s/.sequences/%s is a symlink", from->agent, lockname)
                            : cfn_fail_sys(err, "open %s/.sequences/%s", from->agent, lockname);
        goto out;
    }
    p->seqfd = cfn_open_shared_file(bus, seqdir, to);
    if (p->seqfd < 0) {
        rc = errno == ELOOP ? cfn_fail(err, CFN_E_UNSAFE, "%s/.sequences/%s is a symlink", from->agent, to)
                            : cfn_fail_sys(err, "open %s/.sequences/%s", from->agent, to);
        (void)close(p->lockfd);
        p->lockfd = -1;
    }
out:
    (void)close(seqdir);
    return rc;
}

/* Pins the sequence files of from->to, holding its mutex (callers then take
 * the flock to reserve numbers). A cached file that was deleted (its agent
 * cleaned up) is reopened before numbers are read from it again. */
int cfn_pair_get(cfn_bus *bus, struct cfn_ent *from, const char *to, struct cfn_pair **out, cfn_err *err)
{
    char key[sizeof(((struct cfn_pair *)0)->key)];
    snprintf(key, sizeof key, "%s/%s", from->agent, to);
    pthread_mutex_lock(&bus->mu);
    struct cfn_pair *victim = NULL, *p = NULL;
    for (int i = 0; i < CFN_CACHE; i++) {
        struct cfn_pair *q = &bus->pairs[i];
        if (q->used && strcmp(q->key, key) == 0) {
            p = q;
            break;
        }
        if (q->pins == 0 && (!victim || !q->used || (victim->used && q->tick < victim->tick)))
            victim = q;
    }
    bool fresh = false;
    if (p) {
        p->pins++;
    } else if (victim) {
        if (victim->used)
            pair_close(victim);
        p = victim;
        p->pins = 1;
        fresh = true;
    }
    if (p)
        p->tick = ++bus->tick;
    pthread_mutex_unlock(&bus->mu);
    if (!p) {
        p = calloc(1, sizeof *p);
        if (!p)
            return cfn_fail(err, -ENOMEM, "allocating a sequence cache entry");
        p->dynamic = true;
        p->pins = 1;
        p->lockfd = p->seqfd = -1;
        pthread_mutex_init(&p->mu, NULL);
        fresh = true;
    }
    pthread_mutex_lock(&p->mu);
    if (!fresh && p->next > p->limit) {
        /* about to read the file: one whose agent was cleaned up is opened again */
        struct stat st;
        if (fstat(p->seqfd, &st) != 0 || st.st_nlink == 0) {
            pair_close(p);
            fresh = true;
        }
    }
    if (fresh) {
        p->next = 1;
        p->limit = 0;
        p->grant = 1;
        int rc = pair_open(bus, p, from, to, err);
        if (rc) {
            pthread_mutex_unlock(&p->mu);
            if (p->dynamic) {
                pthread_mutex_destroy(&p->mu);
                free(p);
            } else {
                pthread_mutex_lock(&bus->mu);
                p->pins--;
                p->used = false;
                pthread_mutex_unlock(&bus->mu);
            }
            return rc;
        }
        snprintf(p->key, sizeof p->key, "%s", key);
        p->used = true;
    }
    *out = p;
    return 0;
}

void cfn_pair_put(cfn_bus *bus, struct cfn_pair *p)
{
    pthread_mutex_unlock(&p->mu);
    if (p->dynamic) {
        pair_close(p);
        pthread_mutex_destroy(&p->mu);
        free(p);
        return;
    }
    pthread_mutex_lock(&bus->mu);
    p->pins--;
    pthread_mutex_unlock(&bus->mu);
}

/* ---- agents ------------------------------------------------------------------------ */

/* Creates <base>/<agent>/{inbox,outbox} with the bus's folder mode (and group),
 * refusing symlinks on the way, and records capacity as the inbox's. Idempotent. */
int cfn_init_agent_in(cfn_bus *bus, const char *agent, int64_t capacity, cfn_err *err)
{
    int rc = 0;
    if (capacity < 0 || capacity > CFN_CAPACITY_MAX)
        return cfn_fail(err, CFN_E_BADARG, "capacity must be 1 to %lld, not %" PRId64,
                        (long long)CFN_CAPACITY_MAX, capacity);
    if (mkdirat(bus->basefd, agent, (mode_t)bus->dir_mode) != 0 && errno != EEXIST)
        return cfn_fail_sys(err, "mkdir %s/%s", bus->base_path, agent);
    int afd = openat(bus->basefd, agent, DIR_FLAGS);
    if (afd < 0)
        return errno == ELOOP || errno == ENOTDIR
                   ? cfn_fail(err, CFN_E_UNSAFE, "%s/%s is a symlink or not a folder; refusing it",
                              bus->base_path, agent)
                   : cfn_fail_sys(err, "open %s/%s", bus->base_path, agent);
    static const char *const subs[] = {"inbox", "outbox"};
    for (int i = 0; i < 2 && rc == 0; i++) {
        if (mkdirat(afd, subs[i], (mode_t)bus->dir_mode) != 0 && errno != EEXIST) {
            rc = cfn_fail_sys(err, "mkdir %s/%s/%s", bus->base_path, agent, subs[i]);
            break;
        }
        int fd = openat(afd, subs[i], DIR_FLAGS);
        if (fd < 0) {
            rc = errno == ELOOP || errno == ENOTDIR
                     ? cfn_fail(err, CFN_E_UNSAFE, "%s/%s/%s is a symlink or not a folder; refusing it",
                                bus->base_path, agent, subs[i])
                     : cfn_fail_sys(err, "open %s/%s/%s", bus->base_path, agent, subs[i]);
            break;
        }
        if (bus->gid >= 0 && fchown(fd, (uid_t)-1, (gid_t)bus->gid) != 0)
            rc = cfn_fail_sys(err, "chgrp %s/%s/%s", bus->base_path, agent, subs[i]);
        else if (bus->gid >= 0 && fchmod(fd, (mode_t)bus->dir_mode) != 0)
            rc = cfn_fail_sys(err, "chmod %s/%s/%s", bus->base_path, agent, subs[i]);
        (void)close(fd);
    }
    if (rc == 0 && bus->gid >= 0) {
        if (fchown(afd, (uid_t)-1, (gid_t)bus->gid) != 0 || fchmod(afd, (mode_t)bus->dir_mode) != 0)
            rc = cfn_fail_sys(err, "chgrp/chmod %s/%s", bus->base_path, agent);
    }
    (void)close(afd);
    if (rc == 0 && capacity > 0) {
        uint32_t idx, gen;
        struct cfn_region *r = cfn_reg(bus);
        if ((rc = cfn_slot_find(bus, r, agent, true, &idx, &gen, err)) == 0)
            atomic_store(&r->slots[idx].capacity, capacity);
    }
    return rc;
}

/* After the agent's folder is removed: close cached descriptors and free its
 * slot, so a re-created inbox is counted afresh and the slot serves another. */
int cfn_forget_agent_in(cfn_bus *bus, const char *agent, cfn_err *err)
{
    (void)err;
    pthread_mutex_lock(&bus->mu);
    size_t n = strlen(agent);
    for (int i = 0; i < CFN_CACHE; i++) {
        struct cfn_ent *e = &bus->ents[i];
        if (e->used && strcmp(e->agent, agent) == 0) {
            if (e->pins == 0) ent_close(e);
            else e->agent[0] = '\0';
        }
        struct cfn_pair *p = &bus->pairs[i];
        if (p->used && p->pins == 0 && strncmp(p->key, agent, n) == 0 && p->key[n] == '/')
            pair_close(p);
    }
    pthread_mutex_unlock(&bus->mu);
    char path[CFN_AGENT_MAX + 8];
    snprintf(path, sizeof path, "%s/inbox", agent);
    struct stat st;
    struct cfn_region *r = cfn_reg(bus);
    if (fstatat(bus->basefd, path, &st, AT_SYMLINK_NOFOLLOW) != 0 && errno == ENOENT) {
        cfn_slot_forget(r, agent);
    } else {
        uint32_t idx, gen;
        if (cfn_slot_find(bus, r, agent, false, &idx, &gen, NULL) == 0) {
            struct cfn_slot *s = &r->slots[idx];
            atomic_store(&s->count, CFN_COUNT_UNKNOWN);  /* made again already: count it afresh */
            atomic_store(&s->claimed, 0);
            cfn_slot_wake(s, INT32_MAX);
        }
    }
    return 0;
}
