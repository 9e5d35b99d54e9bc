/*
 * region.c - the shared-memory state file <base>/.cfn-fast.shm: created 0600,
 * checked (magic, layout version, size, owner) before it is mapped, and its
 * open-addressed table of inbox slots, claimed lock-free.
 */
#include "internal.h"

#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <sys/file.h>
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

int cfn_region_open(cfn_bus *bus, cfn_err *err)
{
    const char *path = bus->base_path;
    int fd = openat(bus->basefd, CFN_STATE_NAME, O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, (mode_t)bus->file_mode);
    if (fd < 0) {
        if (errno == ELOOP)
            return cfn_fail(err, CFN_E_UNSAFE, "%s/" CFN_STATE_NAME " is a symlink; refusing it", path);
        return cfn_fail_sys(err, "open %s/" CFN_STATE_NAME, path);
    }
    int rc = 0;
    /* Creation and checking happen under an exclusive lock on the file itself,
     * so two processes never both initialise it. */
    while (flock(fd, LOCK_EX) != 0) {
        if (errno != EINTR) { rc = cfn_fail_sys(err, "flock %s/" CFN_STATE_NAME, path); goto out; }
    }
    struct stat st;
    if (fstat(fd, &st) != 0) { rc = cfn_fail_sys(err, "fstat %s/" CFN_STATE_NAME, path); goto unlock; }
    if (!S_ISREG(st.st_mode)) {
        rc = cfn_fail(err, CFN_E_UNSAFE, "%s/" CFN_STATE_NAME " is not a regular file", path);
        goto unlock;
    }
    if (!cfn_owner_ok(bus, st.st_uid, st.st_gid, st.st_mode)) {
        rc = cfn_fail(err, CFN_E_UNSAFE, "%s/" CFN_STATE_NAME " belongs to uid %u, not to this user (uid %u)",
                      path, (unsigned)st.st_uid, (unsigned)geteuid());
        goto unlock;
    }
    bool fresh = st.st_size == 0;
    if (fresh && bus->gid >= 0 &&
        (fchown(fd, (uid_t)-1, (gid_t)bus->gid) != 0 || fchmod(fd, (mode_t)bus->file_mode) != 0)) {
        rc = cfn_fail_sys(err, "give %s/" CFN_STATE_NAME " to group %d", path, (int)bus->gid);
        goto unlock;
    }
    if (fresh) {
        if (ftruncate(fd, (off_t)CFN_STATE_SIZE) != 0) {
            rc = cfn_fail_sys(err, "ftruncate %s/" CFN_STATE_NAME, path);
            goto unlock;
        }
    } else if ((uint64_t)st.st_size != CFN_STATE_SIZE) {
        /* Checked before mapping: touching a mapping past the end of a short
         * file would be SIGBUS, not an error. */
        rc = cfn_fail(err, CFN_E_BADSTATE, "%s/" CFN_STATE_NAME " has %lld bytes, expected %zu "
                      "(truncated or foreign); remove it when no cfn-fast process uses this base folder",
                      path, (long long)st.st_size, (size_t)CFN_STATE_SIZE);
        goto unlock;
    }
    void *map = mmap(NULL, CFN_STATE_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (map == MAP_FAILED) { rc = cfn_fail_sys(err, "mmap %s/" CFN_STATE_NAME, path); goto unlock; }
    struct cfn_header *h = map;
    if (fresh)
        header_init(h);
    char full[4200];
    snprintf(full, sizeof full, "%s/" CFN_STATE_NAME, path);
    if ((rc = header_check(h, full, err)) != 0) {
        (void)munmap(map, CFN_STATE_SIZE);
        goto unlock;
    }
    bus->hdr = h;
    bus->cooldowns = (struct cfn_cooldown *)((char *)map + CFN_COOLDOWN_OFF);
    bus->slots = (struct cfn_slot *)((char *)map + CFN_SLOTS_OFF);
    bus->statefd = fd;
unlock:
    (void)flock(fd, LOCK_UN);
out:
    if (rc != 0)
        (void)close(fd);
    return rc;
}

void cfn_region_close(cfn_bus *bus)
{
    if (bus->hdr)
        (void)munmap(bus->hdr, CFN_STATE_SIZE);  /* nothing to do if it fails: the process keeps the mapping */
    if (bus->statefd >= 0)
        (void)close(bus->statefd);
    bus->hdr = NULL;
    bus->statefd = -1;
}

/* Finds the agent's slot; with create, claims an empty one (state EMPTY ->
 * BUSY -> READY; readers spin past BUSY, which lasts a few instructions). */
int cfn_slot_find(cfn_bus *bus, const char *agent, bool create, uint32_t *index, cfn_err *err)
{
    size_t n = strlen(agent);
    uint32_t h = cfn_hash32(agent, n);
    for (uint32_t probe = 0; probe < CFN_SLOTS; probe++) {
        uint32_t i = (h + probe) & (CFN_SLOTS - 1);
        struct cfn_slot *s = &bus->slots[i];
        for (int spins = 0;; spins++) {
            uint32_t st = atomic_load_explicit(&s->state, memory_order_acquire);
            if (st == SLOT_READY) {
                if (s->hash == h && memcmp(s->agent, agent, n + 1) == 0) {
                    *index = i;
                    return 0;
                }
                break;  /* someone else's slot: probe on */
            }
            if (st == SLOT_EMPTY) {
                if (!create)
                    return cfn_fail(err, CFN_E_NOINBOX, "no slot for agent '%s'", agent);
                uint32_t want = SLOT_EMPTY;
                if (!atomic_compare_exchange_strong(&s->state, &want, SLOT_BUSY))
                    continue;  /* lost the race: look at what the winner wrote */
                s->hash = h;
                memcpy(s->agent, agent, n + 1);
                atomic_store(&s->count, CFN_COUNT_UNKNOWN);
                atomic_store(&s->claimed, 0);
                atomic_store_explicit(&s->state, SLOT_READY, memory_order_release);
                *index = i;
                return 0;
            }
            /* BUSY: a claimer is copying the name. A claimer killed right
             * here would leave it BUSY; give up after ~1 s rather than hang. */
            if (spins > 100000)
                return cfn_fail(err, CFN_E_BADSTATE, "inbox slot %u stuck while claimed", i);
            sched_yield();
        }
    }
    return cfn_fail(err, CFN_E_NOSLOT, "state file has no free slot for agent '%s' (%d agents at most)",
                    agent, CFN_SLOTS);
}

/* Room appeared for n messages: bump the futex word, wake up to n sleepers. */
void cfn_slot_wake(struct cfn_slot *s, int n)
{
    atomic_fetch_add_explicit(&s->wake_seq, 1, memory_order_release);
    if (atomic_load_explicit(&s->waiters, memory_order_acquire) > 0)
        cfn_futex_wake(&s->wake_seq, n);
}

/* count -= n, never below zero, leaving an unknown count unknown. */
void cfn_slot_sub(struct cfn_slot *s, int64_t n)
{
    int64_t c = atomic_load(&s->count);
    for (;;) {
        if (c == CFN_COUNT_UNKNOWN)
            return;
        int64_t next = c - n < 0 ? 0 : c - n;
        if (atomic_compare_exchange_weak(&s->count, &c, next))
            return;
    }
}

int64_t cfn_counter_add(cfn_bus *bus, int index, int64_t delta)
{
    if (index < 0 || index >= CFN_COUNTERS)
        return CFN_E_BADARG;
    return atomic_fetch_add_explicit(&bus->hdr->counters[index], delta, memory_order_relaxed) + delta;
}

int64_t cfn_counter_get(cfn_bus *bus, int index)
{
    if (index < 0 || index >= CFN_COUNTERS)
        return CFN_E_BADARG;
    return atomic_load_explicit(&bus->hdr->counters[index], memory_order_relaxed);
}

/* updated_ns is written last (release) and read first (acquire), so a reader
 * that sees a fresh stamp sees the settings that came with it. */
void cfn_rate_publish(cfn_bus *bus, const cfn_rate_settings *s)
{
    struct cfn_header *h = bus->hdr;
    atomic_store_explicit(&h->rl_batch_size, s->batch_size, memory_order_relaxed);
    atomic_store_explicit(&h->rl_wait_ms, s->wait_ms, memory_order_relaxed);
    atomic_store_explicit(&h->rl_load_milli, s->load_milli, memory_order_relaxed);
    atomic_store_explicit(&h->rl_interval_ms, s->interval_ms, memory_order_relaxed);
    atomic_store_explicit(&h->rl_updated_ns, s->updated_ns ? s->updated_ns : cfn_now_ns(),
                          memory_order_release);
}

void cfn_rate_read(cfn_bus *bus, cfn_rate_settings *out)
{
    struct cfn_header *h = bus->hdr;
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
int cfn_cooldown_try(cfn_bus *bus, const char *key, size_t key_len, int64_t now_ns, int64_t cooldown_ns)
{
    uint64_t k = cfn_hash64(key, key_len);
    for (int pass = 0; pass < 2; pass++) {
        for (uint32_t probe = 0; probe < CFN_COOLDOWNS; probe++) {
            struct cfn_cooldown *c = &bus->cooldowns[(k + probe) & (CFN_COOLDOWNS - 1)];
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
                    atomic_fetch_add_explicit(&bus->hdr->counters[CFN_CTR_ALERTS_SUPPRESSED], 1,
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
