/*
 * scan.c - counting an inbox by directory scan and reconciling its shared
 * counter; returning dead consumers' claims; noticing that a folder changed
 * behind cfn-fast's back.
 *
 * Locking: <inbox>/.lock is the inbox's gate. Everything that changes an
 * inbox's files or its counter holds it shared; a reconciling scan holds it
 * exclusive, so the scan sees no half-done delivery and bash writers (which
 * take it exclusive) are held off too. Every wait for it is bounded.
 *
 * Every cfn-fast change keeps "files in the folder" at or below "count -
 * claimed" while it is in flight: a sender counts its place before it links
 * the file, a consumer uncounts a message after it unlinks it, a claim counts
 * the claim after the rename. So a folder holding MORE files than that was
 * written by someone else (a bash sender): on tmpfs, where a folder's size is
 * 20 bytes an entry, one fstat tells.
 */
#include "internal.h"

#include <dirent.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#define FOREIGN_TMP_STALE_NS (60LL * 1000000000LL)
#define SCAN_TRUST_NS (50LL * 1000000LL)  /* well above a jiffy, the folder clock's tick */

/* Calls cb for every entry of the folder dfd, which is the caller's alone. */
int cfn_scan_fd(int dfd, cfn_scan_cb cb, void *ctx, cfn_err *err, const char *what)
{
    if (lseek(dfd, 0, SEEK_SET) != 0)
        return cfn_fail_sys(err, "rewind %s", what);
    char buf[32768] __attribute__((aligned(8)));
    int rc = 0;
    for (;;) {
        ssize_t n = getdents64(dfd, buf, sizeof buf);
        if (n < 0) {
            rc = cfn_fail_sys(err, "getdents64 %s", what);
            break;
        }
        if (n == 0)
            break;
        for (ssize_t off = 0; off < n;) {
            struct dirent64 *d = (struct dirent64 *)(buf + off);
            off += d->d_reclen;
            const char *name = d->d_name;
            if (name[0] == '.' && (name[1] == '\0' || (name[1] == '.' && name[2] == '\0')))
                continue;
            if ((rc = cb(ctx, dfd, name, strlen(name), d->d_type)) != 0)
                goto out;
        }
    }
out:
    return rc;
}

/* Calls cb for every entry of the folder dirfd names (a fresh descriptor is
 * used, so concurrent scans of one cached descriptor never share a position). */
int cfn_scan_dir(int dirfd, cfn_scan_cb cb, void *ctx, cfn_err *err, const char *what)
{
    int dfd = openat(dirfd, ".", DIR_FLAGS);
    if (dfd < 0)
        return cfn_fail_sys(err, "open %s for scanning", what);
    int rc = cfn_scan_fd(dfd, cb, ctx, err, what);
    (void)close(dfd);
    return rc;
}

/* The entry's type without following a link (d_type may be DT_UNKNOWN). */
unsigned char cfn_entry_type(int dfd, const char *name, unsigned char type)
{
    if (type != DT_UNKNOWN)
        return type;
    struct stat st;
    if (fstatat(dfd, name, &st, AT_SYMLINK_NOFOLLOW) != 0)
        return DT_UNKNOWN;
    return S_ISDIR(st.st_mode) ? DT_DIR : S_ISLNK(st.st_mode) ? DT_LNK : S_ISREG(st.st_mode) ? DT_REG : DT_UNKNOWN;
}

struct count_ctx {
    int64_t files;
    int64_t stale_removed;
    int64_t tmp_kept;               /* temporary files of live senders, left alone */
    bool clean_tmp;
    int64_t now_ns;
};

/* Our temporary names are .cfn-<pid>-<start ticks>-<random>.tmp */
static bool tmp_is_stale(int dfd, const char *name, int64_t now_ns)
{
    if (strncmp(name, CFN_TMP_PREFIX, sizeof CFN_TMP_PREFIX - 1) == 0) {
        char *end;
        long pid = strtol(name + sizeof CFN_TMP_PREFIX - 1, &end, 10);
        uint64_t ticks = *end == '-' ? strtoull(end + 1, NULL, 10) : 0;
        return !cfn_pid_alive((pid_t)pid, ticks);
    }
    /* someone else's temp file (a bash sender's): stale once a minute old */
    struct stat st;
    if (fstatat(dfd, name, &st, AT_SYMLINK_NOFOLLOW) != 0 || !S_ISREG(st.st_mode))
        return false;
    int64_t m = (int64_t)st.st_mtim.tv_sec * 1000000000LL + st.st_mtim.tv_nsec;
    return now_ns - m > FOREIGN_TMP_STALE_NS;
}

static bool is_tmp_name(const char *name, size_t n)
{
    return (n > 4 && memcmp(name + n - 4, ".tmp", 4) == 0) ||
           strncmp(name, CFN_TMP_PREFIX, sizeof CFN_TMP_PREFIX - 1) == 0;
}

static int count_cb(void *ctx, int dfd, const char *name, size_t n, unsigned char type)
{
    struct count_ctx *c = ctx;
    if (cfn_is_json_name(name, n)) {
        if (cfn_entry_type(dfd, name, type) != DT_DIR)
            c->files++;
    } else if (c->clean_tmp && is_tmp_name(name, n)) {
        if (tmp_is_stale(dfd, name, c->now_ns) && unlinkat(dfd, name, 0) == 0)
            c->stale_removed++;
        else
            c->tmp_kept++;
    }
    return 0;
}

/* ---- claims of dead consumers ------------------------------------------------- */

struct claims_ctx {
    cfn_bus *bus;
    struct cfn_ent *e;
    int64_t claimed;
    int64_t recovered;
};

struct move_ctx {
    int to_fd;
    int64_t moved;
    int64_t kept;
};

static int move_back_cb(void *ctx, int dfd, const char *name, size_t n, unsigned char type)
{
    struct move_ctx *m = ctx;
    if (!cfn_is_json_name(name, n) || cfn_entry_type(dfd, name, type) == DT_DIR)
        return 0;
    if (renameat2(dfd, name, m->to_fd, name, RENAME_NOREPLACE) == 0)
        m->moved++;
    else if (errno == EEXIST && unlinkat(dfd, name, 0) == 0)
        m->moved++;  /* the same message is already back in the inbox */
    else
        m->kept++;
    return 0;
}

/* One claim folder: its consumer's id is its name. A live consumer holds its
 * lock; a dead one's claims go back to the inbox. */
static int claim_dir_cb(void *ctx, int dfd, const char *name, size_t n, unsigned char type)
{
    (void)n;
    struct claims_ctx *c = ctx;
    if (name[0] == '.' || cfn_entry_type(dfd, name, type) != DT_DIR)
        return 0;
    int sub = openat(dfd, name, DIR_FLAGS);
    if (sub < 0)
        return 0;
    if (strcmp(name, c->bus->consumer_id) == 0 || cfn_consumer_alive(c->bus, name)) {
        struct count_ctx cc = {0};
        (void)cfn_scan_dir(sub, count_cb, &cc, NULL, "claim folder");
        c->claimed += cc.files;
    } else {
        struct move_ctx m = {.to_fd = c->e->inboxfd};
        (void)cfn_scan_dir(sub, move_back_cb, &m, NULL, "claim folder");
        c->recovered += m.moved;
        c->claimed += m.kept;
        if (m.kept == 0)
            (void)unlinkat(dfd, name, AT_REMOVEDIR);  /* may hold a stray file: then it stays */
    }
    (void)close(sub);
    return 0;
}

/* ---- reconcile ----------------------------------------------------------- */

static bool slot_sane(struct cfn_slot *s)
{
    int64_t count = atomic_load(&s->count), claimed = atomic_load(&s->claimed);
    return count >= 0 && claimed >= 0 && claimed <= count;
}

/* Sets the counter to what is really there. With seen_gen >= 0 and !force, a
 * reconcile finished by someone else since the caller looked makes it moot. */
int cfn_reconcile_ent(cfn_bus *bus, struct cfn_ent *e, int force, int64_t seen_gen, int64_t deadline,
                      cfn_reconcile_result *res, cfn_err *err)
{
    cfn_reconcile_result local;
    if (!res)
        res = &local;
    memset(res, 0, sizeof *res);
    if (e->inboxfd < 0)
        return cfn_fail(err, CFN_E_NOINBOX, "agent '%s' has no inbox", e->agent);
    int rc = cfn_region_check(bus, err);
    if (rc)
        return rc;
    /* A descriptor of our own: a cached one's shared lock belongs to the whole
     * process and would be converted, not waited for. */
    int lfd = e->private ? e->lockfd : cfn_open_shared_file(bus, e->inboxfd, ".lock");
    if (lfd < 0)
        return cfn_fail_sys(err, "open %s/%s/inbox/.lock", bus->base_path, e->agent);
    rc = cfn_flock_until(bus, lfd, LOCK_EX, deadline ? deadline : cfn_deadline(bus->lock_timeout_ms), err,
                         "%s/%s/inbox/.lock", bus->base_path, e->agent);
    if (rc) {
        if (rc == CFN_E_LOCKED)
            cfn_region_counter_add(cfn_reg(bus), CFN_CTR_LOCK_TIMEOUTS, 1);
        if (!e->private)
            (void)close(lfd);
        return rc;
    }
    struct cfn_slot *s = cfn_ent_slot(bus, e, err);
    if (!s) {
        rc = err ? err->code : CFN_E_NOSLOT;
        goto unlock;
    }
    int64_t before = atomic_load(&s->count);
    bool sane = slot_sane(s);
    res->before = before < 0 ? -1 : before;
    if (!force && seen_gen >= 0 && sane && atomic_load(&s->reconcile_gen) != seen_gen) {
        res->count = before;
        res->claimed = atomic_load(&s->claimed);
        goto unlock;
    }
    struct count_ctx cc = {.clean_tmp = true, .now_ns = cfn_now_ns()};
    /* A folder whose mtime has not moved since the last scan holds the same
     * names: no need to read them again. Trusted only when that scan began
     * well after the mtime, since the kernel stamps folders with a coarse
     * clock and a change in the same tick would not move it. */
    struct stat st;
    if (fstat(e->inboxfd, &st) != 0) {
        rc = cfn_fail_sys(err, "fstat inbox of '%s'", e->agent);
        goto unlock;
    }
    int64_t mtime = (int64_t)st.st_mtim.tv_sec * 1000000000LL + st.st_mtim.tv_nsec;
    int64_t ino_tag = (int64_t)(st.st_ino & 0x3fffffffffffffffULL);
    bool unchanged = sane && atomic_load(&s->scan_ino) == ino_tag &&
                     atomic_load(&s->scan_mtime_ns) == mtime &&
                     atomic_load(&s->scan_dirsize) == (int64_t)st.st_size &&
                     atomic_load(&s->scan_start_ns) - mtime > SCAN_TRUST_NS;
    bool changed = false;
    if (unchanged) {
        cc.files = atomic_load(&s->scan_files);
    } else {
        rc = e->private ? cfn_scan_fd(e->inboxfd, count_cb, &cc, err, "inbox")
                        : cfn_scan_dir(e->inboxfd, count_cb, &cc, err, "inbox");
        if (rc != 0)
            goto unlock;
        changed = true;
        /* a folder with temp files left must be read again to see them go stale */
        atomic_store(&s->scan_ino, cc.tmp_kept || cc.stale_removed ? -1 : ino_tag);
        atomic_store(&s->scan_mtime_ns, mtime);
        atomic_store(&s->scan_start_ns, cc.now_ns);
    }
    int64_t claimed = atomic_load(&s->claimed);
    if (force || !sane || claimed != 0) {
        /* Claims are looked at when there are any: a consumer that died
         * holding some must not keep them from everyone until a monitor runs. */
        struct claims_ctx c = {.bus = bus, .e = e};
        int cfd = openat(e->agentfd, ".claims", DIR_FLAGS);
        if (cfd >= 0) {
            (void)cfn_scan_dir(cfd, claim_dir_cb, &c, err, "claims");
            (void)close(cfd);
        }
        claimed = c.claimed;
        res->recovered = c.recovered;
        cc.files += c.recovered;
        if (c.recovered) {
            changed = true;
            cfn_arrived(s);  /* a dead consumer's claims are back: waiting consumers look */
            atomic_store(&s->scan_ino, -1);  /* the folder changed under our feet: read it next time */
            cfn_region_counter_add(cfn_reg(bus), CFN_CTR_RECOVERED, c.recovered);
        }
        atomic_store(&s->claimed, claimed);
    }
    if (changed) {
        /* the baseline for noticing files written behind our back: the folder as counted */
        if (fstat(e->inboxfd, &st) == 0)
            atomic_store(&s->scan_dirsize, (int64_t)st.st_size);
        atomic_store(&s->scan_files, cc.files);
    }
    int64_t now = cc.files + claimed;
    atomic_store(&s->count, now);
    atomic_fetch_add(&s->reconcile_gen, 1);
    atomic_store(&s->reconcile_ns, cfn_now_ns());
    cfn_region_counter_add(cfn_reg(bus), CFN_CTR_RECONCILE, 1);
    if (cc.stale_removed)
        cfn_region_counter_add(cfn_reg(bus), CFN_CTR_STALE_TMP, cc.stale_removed);
    res->count = now;
    res->files = cc.files;
    res->claimed = claimed;
    res->stale_tmp_removed = cc.stale_removed;
    res->scanned = 1;
    if (force || before < 0 || now < before) {
        /* Room appeared (or the slot is new): every sleeper looks again. Killed
         * sleepers never uncount themselves, so the count starts over and the
         * live ones count themselves in again when they go back to sleep. */
        cfn_waiters_reset(s);
        cfn_line_reset(s);  /* killed ticket holders go with it; the live ones take new tickets */
        cfn_slot_wake(s, INT32_MAX);
    }
unlock:
    (void)flock(lfd, LOCK_UN);
    if (!e->private)
        (void)close(lfd);
    return rc;
}

/* 1 when the inbox holds more message files than the counter accounts for (a
 * bash sender wrote since the last scan), -1 fewer (a bash rm, or a cfn-fast
 * change in flight), 0 as expected or when it cannot tell (not tmpfs, never
 * scanned). One fstat; *entries_since_scan gets the net change in entries. */
int cfn_inbox_drift(struct cfn_ent *e, struct cfn_slot *s, int64_t *entries_since_scan)
{
    if (entries_since_scan)
        *entries_since_scan = 0;
    if (!e->tmpfs)
        return 0;
    int64_t base = atomic_load(&s->scan_dirsize), files = atomic_load(&s->scan_files);
    int64_t claimed = atomic_load(&s->claimed), count = atomic_load(&s->count);
    struct stat st;
    if (count < 0 || base <= 0 || fstat(e->inboxfd, &st) != 0)
        return 0;
    int64_t delta = ((int64_t)st.st_size - base) / CFN_TMPFS_DIRENT;
    if (entries_since_scan)
        *entries_since_scan = delta;
    int64_t now_files = files + delta;
    int64_t expect = count - claimed;
    return now_files > expect ? 1 : now_files < expect ? -1 : 0;
}

int cfn_reconcile_in(cfn_bus *bus, const char *agent, int force, cfn_reconcile_result *res, cfn_err *err)
{
    struct cfn_ent e;
    int rc = cfn_ent_open_private(bus, agent, &e, err);
    if (rc)
        return rc;
    rc = cfn_reconcile_ent(bus, &e, force, -1, 0, res, err);
    cfn_ent_close_private(&e);
    return rc;
}

/* ---- counting ------------------------------------------------------------ */

#define HEAL_EVERY_NS (20LL * 1000000LL)  /* a reader heals an inbox at most this often */
#define HEAL_WAIT_MS 50                   /* and waits no longer than this for the lock to do it */

/* The shared counter: O(1), no system call, while it is known and below the
 * inbox's capacity. When it says full, a reader heals it like a sender
 * does: one fstat tells whether the folder holds fewer files than counted
 * (a bash rm, a dead consumer's claims) or more (a bash sender), and then a
 * scan sets it; otherwise it is healed at most every 20 ms. A reader waits
 * at most 50 ms for the lock to scan: senders in flight hold it shared, and a
 * reader must not stall them or itself. (Files a bash sender adds to an inbox
 * that is not full are counted by the next send, before it reserves.) */
int64_t cfn_inbox_size_in(cfn_bus *bus, const char *agent, cfn_err *err)
{
    struct cfn_region *r = cfn_reg(bus);
    uint32_t idx, gen;
    int64_t c = -1;
    struct cfn_slot *s = NULL;
    if (cfn_slot_find(bus, r, agent, false, &idx, &gen, NULL) == 0) {
        s = &r->slots[idx];
        c = atomic_load_explicit(&s->count, memory_order_acquire);
        int64_t cap = atomic_load_explicit(&s->capacity, memory_order_relaxed);
        if (c >= 0 && slot_sane(s) && (cap < 1 || c < cap))
            return c;
    }
    int rc = cfn_region_check(bus, err);
    if (rc)
        return rc;
    struct cfn_ent *e;
    if ((rc = cfn_ent_get(bus, agent, true, &e, err)) == CFN_E_NOINBOX)
        return 0;  /* as the original: no inbox yet counts as empty */
    if (rc)
        return rc;
    bool known = s && cfn_reg(bus) == r && c >= 0 && slot_sane(s);
    if (known && cfn_inbox_drift(e, s, NULL) == 0 &&
        cfn_now_ns() - atomic_load(&s->reconcile_ns) < HEAL_EVERY_NS) {
        cfn_ent_put(bus, e);
        return c;  /* full, and the folder agrees, as of a scan moments ago */
    }
    cfn_reconcile_result res;
    rc = cfn_reconcile_ent(bus, e, 0, -1, known ? cfn_deadline(HEAL_WAIT_MS) : 0, &res, known ? NULL : err);
    cfn_ent_put(bus, e);
    if (rc == CFN_E_LOCKED && known)
        return c;  /* busy: the counter as it stands; the next reader or sender heals it */
    return rc ? rc : res.count;
}

int64_t cfn_inbox_capacity_in(cfn_bus *bus, const char *agent, int64_t own, cfn_err *err)
{
    if (own < 1 || own > CFN_CAPACITY_MAX)
        return cfn_fail(err, CFN_E_BADARG, "capacity must be 1 to %lld, not %" PRId64,
                        (long long)CFN_CAPACITY_MAX, own);
    struct cfn_region *r = cfn_reg(bus);
    uint32_t idx, gen;
    if (cfn_slot_find(bus, r, agent, false, &idx, &gen, NULL) == 0)
        return cfn_capacity_for(&r->slots[idx], own);
    return own;
}

int64_t cfn_scan_count_in(cfn_bus *bus, const char *agent, const char *box, cfn_err *err)
{
    if (strcmp(box, "inbox") != 0 && strcmp(box, "outbox") != 0)
        return cfn_fail(err, CFN_E_BADARG, "box must be 'inbox' or 'outbox', not '%.40s'", box);
    int afd = openat(bus->basefd, agent, DIR_FLAGS);
    if (afd < 0)
        return errno == ENOENT ? 0 : cfn_fail_sys(err, "open %s/%s", bus->base_path, agent);
    int bfd = openat(afd, box, DIR_FLAGS);
    (void)close(afd);
    if (bfd < 0)
        return errno == ENOENT ? 0 : cfn_fail_sys(err, "open %s/%s/%s", bus->base_path, agent, box);
    struct count_ctx cc = {0};
    int rc = cfn_scan_dir(bfd, count_cb, &cc, err, box);
    (void)close(bfd);
    return rc ? rc : cc.files;
}

int cfn_slot_info_in(cfn_bus *bus, int64_t index, cfn_slot_info *out)
{
    if (index < 0 || index >= CFN_SLOTS)
        return CFN_E_BADARG;
    struct cfn_slot *s = &cfn_reg(bus)->slots[index];
    if (atomic_load_explicit(&s->state, memory_order_acquire) != SLOT_READY)
        return 0;
    int64_t c = atomic_load(&s->count);
    out->count = c < 0 ? -1 : c;
    int64_t cap = atomic_load(&s->capacity);
    out->capacity = cap >= 1 && cap <= CFN_CAPACITY_MAX ? cap : 0;
    out->waiters = cfn_waiters(s);
    out->reconcile_ns = atomic_load(&s->reconcile_ns);
    memcpy(out->agent, s->agent, sizeof out->agent);
    out->agent[sizeof out->agent - 1] = '\0';
    return atomic_load_explicit(&s->state, memory_order_acquire) == SLOT_READY ? 1 : 0;
}
