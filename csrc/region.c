/*
 * region.c - the shared-memory state file <base>/.cfn-fast.shm and the table
 * of inbox slots in it.
 *
 * The file is built whole under no name (O_TMPFILE, or a temporary name),
 * every byte allocated (so a full /dev/shm is an error here, never a SIGBUS
 * later), its header written, and only then linked into place: no process
 * ever sees it half made. An existing file is checked (kind, owner, mode,
 * size, magic, layout) before it is mapped; anything else is refused, never
 * re-initialised. A handle notices when its file is removed or replaced
 * under it and maps the one now in place.
 */
#include "internal.h"

#include <fcntl.h>
#include <inttypes.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

static void header_init(struct cfn_header *h)
{
    h->version = CFN_LAYOUT_VERSION;
    h->header_size = CFN_HEADER_SIZE;
    h->slot_count = CFN_SLOTS;
    h->slot_size = CFN_SLOT_SIZE;
    h->total_size = CFN_STATE_SIZE;
    h->cooldown_count = CFN_COOLDOWNS;
    h->counter_count = CFN_COUNTERS;
    atomic_store(&h->created_ns, cfn_now_ns());
    atomic_store_explicit((_Atomic uint64_t *)&h->magic, CFN_MAGIC, memory_order_release);
}

static int header_check(const struct cfn_header *h, const char *path, cfn_err *err)
{
    if (h->magic != CFN_MAGIC)
        return cfn_fail(err, CFN_E_BADSTATE, "%s is not a cfn-fast state file (bad magic); "
                        "remove it when no cfn-fast process uses this base folder", path);
    if (h->version != CFN_LAYOUT_VERSION)
        return cfn_fail(err, CFN_E_BADSTATE, "%s has layout version %u, this build reads %u; "
                        "stop the other cfn-fast version or remove the file", path,
                        (unsigned)h->version, (unsigned)CFN_LAYOUT_VERSION);
    if (h->header_size != CFN_HEADER_SIZE || h->slot_count != CFN_SLOTS ||
        h->slot_size != CFN_SLOT_SIZE || h->total_size != CFN_STATE_SIZE ||
        h->cooldown_count != CFN_COOLDOWNS || h->counter_count != CFN_COUNTERS)
        return cfn_fail(err, CFN_E_BADSTATE, "%s has a layout this build does not know", path);
    return 0;
}

/* posix_fallocate returns an error number rather than setting errno. */
static int allocate(int fd, const char *path, cfn_err *err)
{
    int e = posix_fallocate(fd, 0, (off_t)CFN_STATE_SIZE);
    if (e == 0 || e == EOPNOTSUPP || e == EINVAL)
        return 0;  /* a filesystem without fallocate: nothing to reserve ahead */
    errno = e;
    if (e == ENOSPC)
        return cfn_fail(err, -ENOSPC, "no room for the %zu-byte state file %s (the filesystem is full)",
                        (size_t)CFN_STATE_SIZE, path);
    return cfn_fail_sys(err, "allocate %s", path);
}

static int map_checked(int fd, const char *path, struct cfn_region **out, cfn_err *err)
{
    void *map = mmap(NULL, CFN_STATE_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (map == MAP_FAILED)
        return cfn_fail_sys(err, "mmap %s", path);
    int rc = header_check(map, path, err);
    struct cfn_region *r = rc ? NULL : calloc(1, sizeof *r);
    if (!r) {
        (void)munmap(map, CFN_STATE_SIZE);
        return rc ? rc : cfn_fail(err, -ENOMEM, "allocating a region");
    }
    r->hdr = map;
    r->cooldowns = (struct cfn_cooldown *)((char *)map + CFN_COOLDOWN_OFF);
    r->slots = (struct cfn_slot *)((char *)map + CFN_SLOTS_OFF);
    r->fd = fd;
    *out = r;
    return 0;
}

/* Opens and checks the state file in place; -ENOENT when there is none. */
static int attach_existing(cfn_bus *bus, const char *path, struct cfn_region **out, cfn_err *err)
{
    int fd = openat(bus->basefd, CFN_STATE_NAME, O_RDWR | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) {
        if (errno == ENOENT)
            return -ENOENT;
        if (errno == ELOOP)
            return cfn_fail(err, CFN_E_UNSAFE, "%s is a symlink; refusing it", path);
        return cfn_fail_sys(err, "open %s", path);
    }
    struct stat st;
    int rc = 0;
    if (fstat(fd, &st) != 0)
        rc = cfn_fail_sys(err, "fstat %s", path);
    else if (!S_ISREG(st.st_mode))
        rc = cfn_fail(err, CFN_E_UNSAFE, "%s is not a regular file; refusing it", path);
    else if (!cfn_owner_ok(bus, st.st_uid, st.st_gid, st.st_mode))
        rc = cfn_fail(err, CFN_E_UNSAFE, "%s belongs to uid %u, not to this user (uid %u); refusing it",
                      path, (unsigned)st.st_uid, (unsigned)geteuid());
    else if (st.st_mode & 0777 & ~bus->file_mode)
        rc = cfn_fail(err, CFN_E_UNSAFE, "%s has mode %04o, open to more than mode %04o allows; refusing it "
                      "(remove it when no cfn-fast process uses this base folder)",
                      path, (unsigned)(st.st_mode & 07777), (unsigned)bus->file_mode);
    else if ((uint64_t)st.st_size != CFN_STATE_SIZE)
        /* checked before mapping: touching a mapping past the end of a short file is SIGBUS */
        rc = cfn_fail(err, CFN_E_BADSTATE, "%s has %lld bytes, expected %zu (truncated or foreign); "
                      "remove it when no cfn-fast process uses this base folder",
                      path, (long long)st.st_size, (size_t)CFN_STATE_SIZE);
    /* A file built whole (create_fresh) has every page already: on tmpfs,
     * st_blocks counts exactly the pages allocated, and fallocate over 4 MiB of
     * them would cost every cold process a quarter of a millisecond. */
    if (rc == 0 && !((uint64_t)st.st_blocks * 512 >= CFN_STATE_SIZE && cfn_is_tmpfs(fd)))
        rc = allocate(fd, path, err);
    if (rc == 0)
        rc = map_checked(fd, path, out, err);
    if (rc != 0)
        (void)close(fd);
    return rc;
}

/* Builds a complete state file under no name and links it into place.
 * 0 when ours is in place, -EEXIST when another process's won the race. */
static int create_fresh(cfn_bus *bus, const char *path, cfn_err *err)
{
    char tmp[96] = "";
    int fd = -1;
    if (cfn_link_mode_unnamed(bus) != 0) {
        fd = openat(bus->basefd, ".", O_TMPFILE | O_RDWR | O_CLOEXEC, (mode_t)bus->file_mode);
        if (fd < 0 && errno != EOPNOTSUPP && errno != EISDIR && errno != EINVAL)
            return cfn_fail_sys(err, "create %s", path);
    }
    if (fd < 0) {
        snprintf(tmp, sizeof tmp, ".cfn-%d-%" PRIu64 "-%016" PRIx64 ".tmp", (int)bus->pid,
                 bus->start_ticks, cfn_random64(bus));
        fd = openat(bus->basefd, tmp, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, (mode_t)bus->file_mode);
        if (fd < 0)
            return cfn_fail_sys(err, "create a temporary state file beside %s", path);
    }
    int rc = 0;
    if (bus->gid >= 0 && (fchown(fd, (uid_t)-1, (gid_t)bus->gid) != 0 || fchmod(fd, (mode_t)bus->file_mode) != 0))
        rc = cfn_fail_sys(err, "give %s to group %d", path, (int)bus->gid);
    if (rc == 0 && ftruncate(fd, (off_t)CFN_STATE_SIZE) != 0)
        rc = cfn_fail_sys(err, "size %s", path);
    if (rc == 0)
        rc = allocate(fd, path, err);
    if (rc == 0) {
        void *map = mmap(NULL, CFN_STATE_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (map == MAP_FAILED) {
            rc = cfn_fail_sys(err, "mmap %s", path);
        } else {
            header_init(map);
            (void)munmap(map, CFN_STATE_SIZE);  /* mapped again once it has its name */
        }
    }
    if (rc == 0) {
        int l = tmp[0] ? (renameat2(bus->basefd, tmp, bus->basefd, CFN_STATE_NAME, RENAME_NOREPLACE) == 0 ? 0 : -errno)
                       : cfn_link_unnamed(bus, fd, bus->basefd, CFN_STATE_NAME);
        if (l == -EEXIST) {
            rc = -EEXIST;
        } else if (l != 0) {
            errno = -l;
            rc = cfn_fail_sys(err, "link %s into place", path);
        }
    }
    if (tmp[0] && rc != 0)
        (void)unlinkat(bus->basefd, tmp, 0);
    (void)close(fd);
    return rc;
}

static int region_attach(cfn_bus *bus, struct cfn_region **out, cfn_err *err)
{
    char path[4200];
    snprintf(path, sizeof path, "%s/" CFN_STATE_NAME, bus->base_path);
    for (int attempt = 0; attempt < 8; attempt++) {
        int rc = attach_existing(bus, path, out, err);
        if (rc != -ENOENT)
            return rc;
        rc = create_fresh(bus, path, err);
        if (rc != 0 && rc != -EEXIST)
            return rc;
        /* ours, or a racing process's, is in place now: map it */
    }
    return cfn_fail(err, CFN_E_BADSTATE, "%s keeps disappearing while it is opened", path);
}

int cfn_region_open(cfn_bus *bus, cfn_err *err)
{
    struct cfn_region *r;
    int rc = region_attach(bus, &r, err);
    if (rc == 0)
        atomic_store_explicit(&bus->region, r, memory_order_release);
    return rc;
}

/* The state file was removed or replaced when the mapped one has no name left.
 * Then the handle maps the one in place now (making it if there is none);
 * the old mapping stays until close, for threads still inside a call. */
int cfn_region_check(cfn_bus *bus, cfn_err *err)
{
    struct cfn_region *r = cfn_reg(bus);
    struct stat st;
    if (fstat(r->fd, &st) == 0 && st.st_nlink > 0)
        return 0;
    pthread_mutex_lock(&bus->mu);
    int rc = 0;
    if (cfn_reg(bus) == r) {
        struct cfn_region *fresh;
        rc = region_attach(bus, &fresh, err);
        if (rc == 0) {
            fresh->older = r;
            atomic_store_explicit(&bus->region, fresh, memory_order_release);
            atomic_fetch_add_explicit(&fresh->hdr->counters[CFN_CTR_STATE_REATTACHED], 1, memory_order_relaxed);
        }
    }
    pthread_mutex_unlock(&bus->mu);
    return rc;
}

void cfn_region_close(cfn_bus *bus)
{
    struct cfn_region *r = atomic_exchange(&bus->region, NULL);
    while (r) {
        struct cfn_region *older = r->older;
        (void)munmap(r->hdr, CFN_STATE_SIZE);  /* nothing to do if it fails: the process keeps the mapping */
        (void)close(r->fd);
        free(r);
        r = older;
    }
}

/* ---- slots ------------------------------------------------------------------ */

static bool slot_is(struct cfn_slot *s, uint32_t h, const char *agent, size_t n)
{
    return s->hash == h && memcmp(s->agent, agent, n + 1) == 0;
}

/* The state of s once no claimer is copying a name into it. A claimer killed
 * in those few instructions would leave it BUSY for good: after ~1 s of
 * waiting it is taken for another agent's slot. */
static uint32_t settled_state(struct cfn_slot *s)
{
    for (int spins = 0;; spins++) {
        uint32_t st = atomic_load_explicit(&s->state, memory_order_acquire);
        if (st != SLOT_BUSY || spins > 100000)
            return st;
        sched_yield();
    }
}

/* Frees slot s (READY -> TOMB): its gen moves on, so every cached index of
 * it is stale, and its sleepers wake to look again. */
static bool slot_free(struct cfn_region *r, struct cfn_slot *s)
{
    uint32_t want = SLOT_READY;
    if (!atomic_compare_exchange_strong(&s->state, &want, SLOT_BUSY))
        return false;
    atomic_fetch_add(&s->gen, 1);
    atomic_store(&s->count, CFN_COUNT_UNKNOWN);
    atomic_store(&s->claimed, 0);
    atomic_store(&s->capacity, 0);
    atomic_store(&s->scan_ino, -1);
    s->agent[0] = '\0';
    atomic_store_explicit(&s->state, SLOT_TOMB, memory_order_release);
    cfn_waiters_reset(s);
    cfn_line_reset(s);
    cfn_slot_wake(s, INT32_MAX);
    atomic_fetch_add_explicit(&r->hdr->counters[CFN_CTR_SLOTS_FREED], 1, memory_order_relaxed);
    return true;
}

/* Of two slots made for one agent at once, the one earlier in its probe
 * order wins; the later one is freed. Returns the winner's index. */
static uint32_t dedupe(struct cfn_region *r, uint32_t mine, uint32_t h, const char *agent, size_t n)
{
    for (uint32_t probe = 0; probe < CFN_SLOTS; probe++) {
        uint32_t i = (h + probe) & (CFN_SLOTS - 1);
        if (i == mine)
            return mine;
        struct cfn_slot *s = &r->slots[i];
        uint32_t st = settled_state(s);
        if (st == SLOT_EMPTY)
            return mine;
        if (st == SLOT_READY && slot_is(s, h, agent, n)) {
            slot_free(r, &r->slots[mine]);
            return i;
        }
    }
    return mine;
}

/* Finds the agent's slot in region r; with create, takes a free one (EMPTY
 * or TOMB -> BUSY -> READY). *gen gets the slot's generation. */
static int slot_find_in(struct cfn_region *r, const char *agent, bool create, uint32_t *index, uint32_t *gen,
                        cfn_err *err)
{
    size_t n = strlen(agent);
    uint32_t h = cfn_hash32(agent, n);
    for (int restart = 0; restart < 1000; restart++) {
        int64_t tomb = -1;
        uint32_t probe;
        for (probe = 0; probe < CFN_SLOTS; probe++) {
            uint32_t i = (h + probe) & (CFN_SLOTS - 1);
            struct cfn_slot *s = &r->slots[i];
            uint32_t st = settled_state(s);
            if (st == SLOT_READY) {
                uint32_t g = atomic_load_explicit(&s->gen, memory_order_acquire);
                if (slot_is(s, h, agent, n) &&
                    atomic_load_explicit(&s->state, memory_order_acquire) == SLOT_READY &&
                    atomic_load_explicit(&s->gen, memory_order_acquire) == g) {
                    *index = i;
                    *gen = g;
                    return 0;
                }
                continue;  /* someone else's slot: probe on */
            }
            if (st == SLOT_TOMB) {
                if (tomb < 0)
                    tomb = i;
                continue;
            }
            if (st == SLOT_EMPTY)
                break;
        }
        if (!create)
            return cfn_fail(err, CFN_E_NOINBOX, "no slot for agent '%s'", agent);
        if (tomb < 0 && probe == CFN_SLOTS)
            return cfn_fail(err, CFN_E_NOSLOT, "state file has no free slot for agent '%s' (%d inboxes at "
                            "most; removed agents' slots are freed by cleanup)", agent, CFN_SLOTS);
        uint32_t i = tomb >= 0 ? (uint32_t)tomb : (h + probe) & (CFN_SLOTS - 1);
        struct cfn_slot *s = &r->slots[i];
        uint32_t want = tomb >= 0 ? SLOT_TOMB : SLOT_EMPTY;
        if (!atomic_compare_exchange_strong(&s->state, &want, SLOT_BUSY))
            continue;  /* lost the race for it: look again */
        s->hash = h;
        memcpy(s->agent, agent, n + 1);
        atomic_store(&s->count, CFN_COUNT_UNKNOWN);
        atomic_store(&s->claimed, 0);
        atomic_store(&s->capacity, 0);
        atomic_store(&s->scan_ino, -1);
        cfn_flow_clear(s);  /* a freed slot taken again: nothing of the agent it served before */
        uint32_t g = atomic_load(&s->gen);
        atomic_store_explicit(&s->state, SLOT_READY, memory_order_release);
        uint32_t won = dedupe(r, i, h, agent, n);
        if (won != i)
            g = atomic_load(&r->slots[won].gen);
        *index = won;
        *gen = g;
        return 0;
    }
    return cfn_fail(err, CFN_E_BADSTATE, "inbox slots of agent '%s' keep changing", agent);
}

int cfn_slot_find(cfn_bus *bus, struct cfn_region *r, const char *agent, bool create, uint32_t *index,
                  uint32_t *gen, cfn_err *err)
{
    int rc = slot_find_in(r, agent, create, index, gen, err);
    if (rc == CFN_E_NOSLOT && cfn_slots_sweep_in(bus, r) > 0)
        rc = slot_find_in(r, agent, create, index, gen, err);
    return rc;
}

/* Frees the slots whose inbox folder is gone (removed by cleanup, or by a
 * bash agent's rm -rf); returns how many. */
int64_t cfn_slots_sweep_in(cfn_bus *bus, struct cfn_region *r)
{
    int64_t freed = 0;
    for (uint32_t i = 0; i < CFN_SLOTS; i++) {
        struct cfn_slot *s = &r->slots[i];
        if (atomic_load_explicit(&s->state, memory_order_acquire) != SLOT_READY)
            continue;
        char path[CFN_AGENT_MAX + 16];
        uint32_t g = atomic_load(&s->gen);
        memcpy(path, s->agent, CFN_AGENT_MAX + 1);
        path[CFN_AGENT_MAX] = '\0';
        if (atomic_load(&s->gen) != g || cfn_check_agent(path, NULL) != 0)
            continue;
        strcat(path, "/inbox");
        struct stat st;
        if (fstatat(bus->basefd, path, &st, AT_SYMLINK_NOFOLLOW) != 0 && errno == ENOENT &&
            atomic_load(&s->gen) == g && slot_free(r, s))
            freed++;
    }
    return freed;
}

/* Frees the agent's slot if it has one (its folder was removed). */
void cfn_slot_forget(struct cfn_region *r, const char *agent)
{
    uint32_t i, g;
    if (slot_find_in(r, agent, false, &i, &g, NULL) == 0 && atomic_load(&r->slots[i].gen) == g)
        slot_free(r, &r->slots[i]);
}

/* ---- waiters ------------------------------------------------------------------ */

/* A sender going to sleep on the slot: returns the epoch it counted itself in. */
uint32_t cfn_waiter_enter(struct cfn_slot *s)
{
    return (uint32_t)(atomic_fetch_add(&s->waiters, 1) >> 32);
}

/* The sender woke: uncount it, unless a reset started a new epoch meanwhile. */
void cfn_waiter_leave(struct cfn_slot *s, uint32_t epoch)
{
    uint64_t w = atomic_load(&s->waiters);
    while ((uint32_t)(w >> 32) == epoch && (uint32_t)w > 0 &&
           !atomic_compare_exchange_weak(&s->waiters, &w, w - 1))
        ;
}

/* Forgets every counted sleeper (killed sleepers never uncount themselves);
 * the caller wakes them all, and the live ones count themselves again. */
void cfn_waiters_reset(struct cfn_slot *s)
{
    uint64_t w = atomic_load(&s->waiters);
    while (!atomic_compare_exchange_weak(&s->waiters, &w, ((w >> 32) + 1) << 32))
        ;
}

int64_t cfn_waiters(struct cfn_slot *s)
{
    return (int64_t)(uint32_t)atomic_load_explicit(&s->waiters, memory_order_acquire);
}

/* Room appeared for n messages: bump the futex word, wake up to n sleepers. */
void cfn_slot_wake(struct cfn_slot *s, int n)
{
    atomic_fetch_add_explicit(&s->wake_seq, 1, memory_order_release);
    if (cfn_waiters(s) > 0)
        cfn_futex_wake(&s->wake_seq, n);
}

/* count -= n, never below zero, leaving an unknown (or untrusted) count alone. */
void cfn_slot_sub(struct cfn_slot *s, int64_t n)
{
    int64_t c = atomic_load(&s->count);
    for (;;) {
        if (c < 0)
            return;
        int64_t next = c - n < 0 ? 0 : c - n;
        if (atomic_compare_exchange_weak(&s->count, &c, next))
            return;
    }
}

/* ---- counters, published settings, alert cooldowns ----------------------------- */

void cfn_region_counter_add(struct cfn_region *r, int index, int64_t delta)
{
    if (index >= 0 && index < CFN_COUNTERS)
        atomic_fetch_add_explicit(&r->hdr->counters[index], delta, memory_order_relaxed);
}

/* updated_ns is written last (release) and read first (acquire), so a reader
 * that sees a fresh stamp sees the settings that came with it. */
void cfn_region_rate_publish(struct cfn_region *r, const cfn_rate_settings *s)
{
    struct cfn_header *h = r->hdr;
    atomic_store_explicit(&h->rl_batch_size, s->batch_size, memory_order_relaxed);
    atomic_store_explicit(&h->rl_wait_ms, s->wait_ms, memory_order_relaxed);
    atomic_store_explicit(&h->rl_load_milli, s->load_milli, memory_order_relaxed);
    atomic_store_explicit(&h->rl_interval_ms, s->interval_ms, memory_order_relaxed);
    atomic_store_explicit(&h->rl_updated_ns, s->updated_ns ? s->updated_ns : cfn_now_ns(),
                          memory_order_release);
}

int cfn_rate_fresh(const cfn_rate_settings *s, int64_t stale_after_ms, int64_t now_ns)
{
    int64_t stale_ms = stale_after_ms;
    if (s->interval_ms > 0 && s->interval_ms < INT64_MAX / 3 && 3 * s->interval_ms > stale_ms)
        stale_ms = 3 * s->interval_ms;
    return s->updated_ns > 0 && stale_after_ms > 0 && now_ns - s->updated_ns <= cfn_mul_sat(stale_ms, 1000000);
}

void cfn_region_rate_read(struct cfn_region *r, cfn_rate_settings *out)
{
    struct cfn_header *h = r->hdr;
    out->updated_ns = atomic_load_explicit(&h->rl_updated_ns, memory_order_acquire);
    out->batch_size = atomic_load_explicit(&h->rl_batch_size, memory_order_relaxed);
    out->wait_ms = atomic_load_explicit(&h->rl_wait_ms, memory_order_relaxed);
    out->load_milli = atomic_load_explicit(&h->rl_load_milli, memory_order_relaxed);
    out->interval_ms = atomic_load_explicit(&h->rl_interval_ms, memory_order_relaxed);
}

/* 1: the caller may send the alert now (and the cooldown restarts); 0: it is
 * inside its cooldown. One CAS decides, so of many processes exactly one wins.
 * A key not in the table takes an empty entry, or one whose own cooldown has
 * long run out, so the table never fills up with old alerts. */
int cfn_region_cooldown_try(struct cfn_region *r, const char *key, size_t key_len, int64_t now_ns,
                            int64_t cooldown_ns)
{
    uint64_t k = cfn_hash64(key, key_len);
    for (int pass = 0; pass < 2; pass++) {
        for (uint32_t probe = 0; probe < CFN_COOLDOWNS; probe++) {
            struct cfn_cooldown *c = &r->cooldowns[(k + probe) & (CFN_COOLDOWNS - 1)];
            uint64_t have = atomic_load(&c->key);
            if (have != k) {
                bool takeable = have == 0 ||
                                (pass == 1 && now_ns - atomic_load(&c->last_ns) > cooldown_ns);
                if (!takeable)
                    continue;
                if (!atomic_compare_exchange_strong(&c->key, &have, k) && have != k)
                    continue;  /* taken by another key meanwhile */
                if (pass == 1)
                    atomic_store(&c->last_ns, 0);
            }
            int64_t last = atomic_load(&c->last_ns);
            for (;;) {
                if (last != 0 && now_ns - last < cooldown_ns) {
                    atomic_fetch_add_explicit(&r->hdr->counters[CFN_CTR_ALERTS_SUPPRESSED], 1,
                                              memory_order_relaxed);
                    return 0;
                }
                if (atomic_compare_exchange_weak(&c->last_ns, &last, now_ns))
                    return 1;
            }
        }
    }
    return 1;  /* every entry busy and fresh: never silence an alert for want of room */
}
