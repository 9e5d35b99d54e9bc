/*
 * inbox.c - the hot path: counting by directory scan, reconciling the shared
 * counter, delivering (reserve, write, rename, commit), the backpressure send
 * loop, and exactly-once consumption through per-process claim folders.
 *
 * Locking (see DESIGN-NOTES): <inbox>/.lock is the inbox's gate. Everything
 * that changes an inbox's files or its counter holds it shared; a reconciling
 * scan holds it exclusive, so the scan sees no half-done delivery and bash
 * writers (which take it exclusive) are held off too.
 */
#include "internal.h"

#include <dirent.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define DIR_FLAGS (O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
#define TMP_PREFIX ".cfn-"
#define FOREIGN_TMP_STALE_NS (60LL * 1000000000LL)
#define SCAN_TRUST_NS (50LL * 1000000LL)  /* well above a jiffy, the folder clock's tick */

/* ---- directory scanning --------------------------------------------------- */

typedef int (*scan_cb)(void *ctx, int dfd, const char *name, size_t len, unsigned char type);

/* Calls cb for every entry of the folder dfd, which is the caller's alone. */
static int scan_fd(int dfd, scan_cb cb, void *ctx, cfn_err *err, const char *what)
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
static int scan_dir(int dirfd, scan_cb cb, void *ctx, cfn_err *err, const char *what)
{
    int dfd = openat(dirfd, ".", DIR_FLAGS);
    if (dfd < 0)
        return cfn_fail_sys(err, "open %s for scanning", what);
    int rc = scan_fd(dfd, cb, ctx, err, what);
    (void)close(dfd);
    return rc;
}

/* The entry's type without following a link (d_type may be DT_UNKNOWN). */
static unsigned char entry_type(int dfd, const char *name, unsigned char type)
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
    if (strncmp(name, TMP_PREFIX, sizeof TMP_PREFIX - 1) == 0) {
        char *end;
        long pid = strtol(name + sizeof TMP_PREFIX - 1, &end, 10);
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
           strncmp(name, TMP_PREFIX, sizeof TMP_PREFIX - 1) == 0;
}

static int count_cb(void *ctx, int dfd, const char *name, size_t n, unsigned char type)
{
    struct count_ctx *c = ctx;
    if (cfn_is_json_name(name, n)) {
        if (entry_type(dfd, name, type) != DT_DIR)
            c->files++;
    } else if (c->clean_tmp && is_tmp_name(name, n)) {
        if (tmp_is_stale(dfd, name, c->now_ns) && unlinkat(dfd, name, 0) == 0)
            c->stale_removed++;
        else
            c->tmp_kept++;
    }
    return 0;
}

/* ---- claims ---------------------------------------------------------------- */

struct claims_ctx {
    cfn_bus *bus;
    struct cfn_ent *e;
    int claimsfd;
    int64_t claimed;
    int64_t recovered;
    cfn_err *err;
};

struct move_ctx {
    int to_fd;
    int64_t moved;
    int64_t kept;
};

static int move_back_cb(void *ctx, int dfd, const char *name, size_t n, unsigned char type)
{
    struct move_ctx *m = ctx;
    if (!cfn_is_json_name(name, n) || entry_type(dfd, name, type) == DT_DIR)
        return 0;
    if (renameat2(dfd, name, m->to_fd, name, RENAME_NOREPLACE) == 0)
        m->moved++;
    else if (errno == EEXIST && unlinkat(dfd, name, 0) == 0)
        m->moved++;  /* the same message is already back in the inbox */
    else
        m->kept++;
    return 0;
}

static int claim_dir_cb(void *ctx, int dfd, const char *name, size_t n, unsigned char type)
{
    (void)n;
    struct claims_ctx *c = ctx;
    if (entry_type(dfd, name, type) != DT_DIR)
        return 0;
    char *end;
    long pid = strtol(name, &end, 10);
    uint64_t ticks = *end == '.' ? strtoull(end + 1, NULL, 10) : 0;
    int sub = openat(dfd, name, DIR_FLAGS);
    if (sub < 0)
        return 0;
    if (cfn_pid_alive((pid_t)pid, ticks)) {
        struct count_ctx cc = {0};
        (void)scan_dir(sub, count_cb, &cc, NULL, "claim folder");
        c->claimed += cc.files;
    } else {
        struct move_ctx m = {.to_fd = c->e->inboxfd};
        (void)scan_dir(sub, move_back_cb, &m, NULL, "claim folder");
        c->recovered += m.moved;
        c->claimed += m.kept;
        if (m.kept == 0)
            (void)unlinkat(dfd, name, AT_REMOVEDIR);  /* may hold a stray file: then it stays */
    }
    (void)close(sub);
    return 0;
}

/* ---- reconcile ----------------------------------------------------------- */

static int lock_exclusive(cfn_bus *bus, struct cfn_ent *e, cfn_err *err)
{
    /* A descriptor of our own: the cached one's shared lock belongs to the
     * whole process and would be converted, not waited for. */
    int fd = cfn_open_shared_file(bus, e->inboxfd, ".lock");
    if (fd < 0)
        return cfn_fail_sys(err, "open inbox/.lock of '%s'", e->agent);
    while (flock(fd, LOCK_EX) != 0) {
        if (errno != EINTR) {
            int rc = cfn_fail_sys(err, "flock(LOCK_EX) inbox/.lock of '%s'", e->agent);
            (void)close(fd);
            return rc;
        }
    }
    return fd;
}

/* Sets the counter to what is really there. With seen_gen >= 0 and !force, a
 * reconcile finished by someone else since the caller looked makes it moot. */
int cfn_reconcile_ent(cfn_bus *bus, struct cfn_ent *e, int force, int64_t seen_gen,
                      cfn_reconcile_result *res, cfn_err *err)
{
    struct cfn_slot *s = &bus->slots[e->slot];
    cfn_reconcile_result local;
    if (!res)
        res = &local;
    memset(res, 0, sizeof *res);
    if (e->inboxfd < 0)
        return cfn_fail(err, CFN_E_NOINBOX, "agent '%s' has no inbox", e->agent);
    int lfd;
    if (e->private) {
        lfd = e->lockfd;
        while (flock(lfd, LOCK_EX) != 0)
            if (errno != EINTR)
                return cfn_fail_sys(err, "flock(LOCK_EX) inbox/.lock of '%s'", e->agent);
    } else if ((lfd = lock_exclusive(bus, e, err)) < 0) {
        return lfd;
    }
    int rc = 0;
    int64_t before = atomic_load(&s->count);
    res->before = before == CFN_COUNT_UNKNOWN ? -1 : before;
    if (!force && seen_gen >= 0 && before != CFN_COUNT_UNKNOWN &&
        atomic_load(&s->reconcile_gen) != seen_gen) {
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
    int64_t seen_ino = atomic_load(&s->scan_ino);
    bool unchanged = before != CFN_COUNT_UNKNOWN && seen_ino == ino_tag &&
                     atomic_load(&s->scan_mtime_ns) == mtime &&
                     atomic_load(&s->scan_start_ns) - mtime > SCAN_TRUST_NS;
    if (unchanged) {
        cc.files = atomic_load(&s->scan_files);
    } else {
        rc = e->private ? scan_fd(e->inboxfd, count_cb, &cc, err, "inbox")
                        : scan_dir(e->inboxfd, count_cb, &cc, err, "inbox");
        if (rc != 0)
            goto unlock;
        /* a folder with temp files left must be read again to see them go stale */
        atomic_store(&s->scan_ino, cc.tmp_kept || cc.stale_removed ? -1 : ino_tag);
        atomic_store(&s->scan_mtime_ns, mtime);
        atomic_store(&s->scan_files, cc.files);
        atomic_store(&s->scan_start_ns, cc.now_ns);
    }
    int64_t claimed = atomic_load(&s->claimed);
    if (force || before == CFN_COUNT_UNKNOWN) {
        struct claims_ctx c = {.bus = bus, .e = e, .err = err};
        int cfd = openat(e->agentfd, ".claims", DIR_FLAGS);
        if (cfd >= 0) {
            (void)scan_dir(cfd, claim_dir_cb, &c, err, "claims");
            (void)close(cfd);
        }
        claimed = c.claimed;
        res->recovered = c.recovered;
        cc.files += c.recovered;
        if (c.recovered)
            atomic_store(&s->scan_ino, -1);  /* the folder changed under our feet: read it next time */
        atomic_store(&s->claimed, claimed);
        if (c.recovered)
            cfn_counter_add(bus, CFN_CTR_RECOVERED, c.recovered);
    }
    int64_t now = cc.files + claimed;
    atomic_store(&s->count, now);
    atomic_fetch_add(&s->reconcile_gen, 1);
    atomic_store(&s->reconcile_ns, cfn_now_ns());
    cfn_counter_add(bus, CFN_CTR_RECONCILE, 1);
    if (cc.stale_removed)
        cfn_counter_add(bus, CFN_CTR_STALE_TMP, cc.stale_removed);
    res->count = now;
    res->files = cc.files;
    res->claimed = claimed;
    res->stale_tmp_removed = cc.stale_removed;
    res->scanned = 1;
unlock:
    (void)flock(lfd, LOCK_UN);
    if (!e->private)
        (void)close(lfd);
    if (rc == 0 && res->scanned && (before == CFN_COUNT_UNKNOWN || res->count < before))
        cfn_slot_wake(s, INT32_MAX);  /* room appeared: let every sleeper look */
    return rc;
}

int cfn_reconcile(cfn_bus *bus, const char *agent, int force, cfn_reconcile_result *res, cfn_err *err)
{
    struct cfn_ent e;
    int rc = cfn_ent_open_private(bus, agent, &e, err);
    if (rc)
        return rc;
    rc = cfn_reconcile_ent(bus, &e, force, -1, res, err);
    cfn_ent_close_private(&e);
    return rc;
}

/* ---- counting ------------------------------------------------------------ */

/* O(1) when the counter is known: no system call at all. */
int64_t cfn_inbox_size(cfn_bus *bus, const char *agent, cfn_err *err)
{
    int rc = cfn_check_agent(agent, err);
    if (rc)
        return rc;
    uint32_t idx;
    if (cfn_slot_find(bus, agent, false, &idx, NULL) == 0) {
        int64_t c = atomic_load_explicit(&bus->slots[idx].count, memory_order_acquire);
        if (c != CFN_COUNT_UNKNOWN)
            return c;
    }
    struct cfn_ent *e;
    rc = cfn_ent_get(bus, agent, true, &e, err);
    if (rc == CFN_E_NOINBOX)
        return 0;  /* as the original: no inbox yet counts as empty */
    if (rc)
        return rc;
    cfn_reconcile_result r;
    rc = cfn_reconcile_ent(bus, e, 0, -1, &r, err);
    cfn_ent_put(bus, e);
    return rc ? rc : r.count;
}

int64_t cfn_scan_count(cfn_bus *bus, const char *agent, const char *box, cfn_err *err)
{
    int rc = cfn_check_agent(agent, err);
    if (rc)
        return rc;
    if (strcmp(box, "inbox") != 0 && strcmp(box, "outbox") != 0)
        return cfn_fail(err, CFN_E_BADARG, "box must be 'inbox' or 'outbox', not '%.40s'", box);
    cfn_bus_fork_check(bus);
    int afd = openat(bus->basefd, agent, DIR_FLAGS);
    if (afd < 0)
        return errno == ENOENT ? 0 : cfn_fail_sys(err, "open %s/%s", bus->base_path, agent);
    int bfd = openat(afd, box, DIR_FLAGS);
    (void)close(afd);
    if (bfd < 0)
        return errno == ENOENT ? 0 : cfn_fail_sys(err, "open %s/%s/%s", bus->base_path, agent, box);
    struct count_ctx cc = {0};
    rc = scan_dir(bfd, count_cb, &cc, err, box);
    (void)close(bfd);
    return rc ? rc : cc.files;
}

int cfn_slot_info_at(cfn_bus *bus, int64_t index, cfn_slot_info *out)
{
    if (index < 0 || index >= CFN_SLOTS)
        return CFN_E_BADARG;
    struct cfn_slot *s = &bus->slots[index];
    if (atomic_load_explicit(&s->state, memory_order_acquire) != SLOT_READY)
        return 0;
    int64_t c = atomic_load(&s->count);
    out->count = c == CFN_COUNT_UNKNOWN ? -1 : c;
    out->capacity = atomic_load(&s->capacity);
    out->waiters = atomic_load(&s->waiters);
    out->reconcile_ns = atomic_load(&s->reconcile_ns);
    memcpy(out->agent, s->agent, sizeof out->agent);
    out->agent[sizeof out->agent - 1] = '\0';
    return 1;
}

int64_t cfn_slots_snapshot(cfn_bus *bus, cfn_slot_info *out, int64_t cap)
{
    int64_t n = 0;
    for (int64_t i = 0; i < CFN_SLOTS && n < cap; i++)
        if (cfn_slot_info_at(bus, i, &out[n]) == 1)
            n++;
    return n;
}

/* ---- delivery -------------------------------------------------------------- */

static int opts_check(const cfn_send_opts *o, cfn_err *err)
{
    if (o->capacity < 1)
        return cfn_fail(err, CFN_E_BADARG, "capacity must be at least 1, not %" PRId64, o->capacity);
    if (o->wait_ms < 0)
        return cfn_fail(err, CFN_E_BADARG, "wait must not be negative (%" PRId64 " ms)", o->wait_ms);
    if (o->max_total_ms < 0)
        return cfn_fail(err, CFN_E_BADARG, "total wait must not be negative (%" PRId64 " ms)", o->max_total_ms);
    if (o->max_payload < 1)
        return cfn_fail(err, CFN_E_BADARG, "payload limit must be at least 1 byte");
    if (o->backoff < CFN_BACKOFF_FIXED || o->backoff > CFN_BACKOFF_DECORRELATED)
        return cfn_fail(err, CFN_E_BADARG, "unknown backoff %d", (int)o->backoff);
    return 0;
}

/* Reserve one place: CAS count+1 while below capacity. */
static int reserve(struct cfn_slot *s, int64_t cap)
{
    int64_t c = atomic_load_explicit(&s->count, memory_order_acquire);
    for (;;) {
        if (c == CFN_COUNT_UNKNOWN)
            return 1;
        if (c >= cap)
            return CFN_E_FULL;
        if (atomic_compare_exchange_weak_explicit(&s->count, &c, c + 1, memory_order_acq_rel,
                                                  memory_order_acquire))
            return 0;
    }
}

static int fsync_or_fail(int fd, cfn_err *err, const char *what)
{
    return fsync(fd) == 0 ? 0 : cfn_fail_sys(err, "fsync %s", what);
}

enum { LINK_UNKNOWN = 0, LINK_EMPTY_PATH = 1, LINK_PROC = 2, LINK_NONE = 3 };

/* Gives the unnamed file fd the name dirfd/name; never replaces a file.
 * linkat(AT_EMPTY_PATH) needs CAP_DAC_READ_SEARCH on older kernels; the
 * /proc/self/fd path works for everyone. The first call finds out which. */
static int link_unnamed(cfn_bus *bus, int fd, int dirfd, const char *name)
{
    int mode = atomic_load_explicit(&bus->link_mode, memory_order_relaxed);
    if (mode != LINK_PROC) {
        if (linkat(fd, "", dirfd, name, AT_EMPTY_PATH) == 0) {
            if (mode == LINK_UNKNOWN)
                atomic_store(&bus->link_mode, LINK_EMPTY_PATH);
            return 0;
        }
        if (mode == LINK_EMPTY_PATH || (errno != ENOENT && errno != EPERM && errno != EINVAL))
            return -errno;
    }
    char path[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    if (linkat(AT_FDCWD, path, dirfd, name, AT_SYMLINK_FOLLOW) != 0)
        return -errno;
    if (mode == LINK_UNKNOWN)
        atomic_store(&bus->link_mode, LINK_PROC);
    return 0;
}

static int write_fd(int fd, const char *buf, size_t len, const cfn_send_opts *o, cfn_err *err, const char *where)
{
    int rc = 0;
    if ((o->file_mode & 0777) != 0600 && fchmod(fd, (mode_t)o->file_mode) != 0)
        rc = cfn_fail_sys(err, "chmod new file in %s", where);
    if (rc == 0 && (rc = cfn_write_all(fd, buf, len)) != 0)
        rc = cfn_fail(err, rc, "write message to %s: %s", where, strerror(-rc));
    if (rc == 0 && o->fsync)
        rc = fsync_or_fail(fd, err, where);
    return rc;
}

/* Writes buf as <dirfd>/<name> so that no reader ever sees it half-written:
 * an unnamed O_TMPFILE given its name by linkat, or (where the filesystem
 * has no O_TMPFILE) a temporary dotfile renamed into place. Neither ever
 * replaces an existing file: on EEXIST *retry is set (the caller picks a new
 * name). With fsync, the file and then its folder are flushed, as Maildir does. */
static int write_file(cfn_bus *bus, int dirfd, const char *name, const char *buf, size_t len,
                      const cfn_send_opts *o, bool *retry, cfn_err *err, const char *where)
{
    int rc;
    if (atomic_load_explicit(&bus->link_mode, memory_order_relaxed) != LINK_NONE) {
        int fd = openat(dirfd, ".", O_TMPFILE | O_WRONLY | O_CLOEXEC, (mode_t)o->file_mode);
        if (fd >= 0) {
            rc = write_fd(fd, buf, len, o, err, where);
            if (rc == 0 && (rc = link_unnamed(bus, fd, dirfd, name)) != 0) {
                if (rc == -EEXIST)
                    *retry = true;
                else if (rc == -ENOENT)
                    rc = cfn_fail(err, CFN_E_NOINBOX, "%s was removed", where);
                else {
                    errno = -rc;
                    rc = cfn_fail_sys(err, "link new file into %s", where);
                }
            }
            (void)close(fd);    /* unnamed on failure: it vanishes with the descriptor */
            if (rc == 0 && o->fsync)
                rc = fsync_or_fail(dirfd, err, where);
            return rc;
        }
        if (errno == ENOENT)
            return cfn_fail(err, CFN_E_NOINBOX, "%s was removed", where);
        if (errno != EOPNOTSUPP && errno != EISDIR && errno != EINVAL)
            return cfn_fail_sys(err, "create file in %s", where);
        atomic_store(&bus->link_mode, LINK_NONE);
    }
    char tmp[96];
    snprintf(tmp, sizeof tmp, TMP_PREFIX "%d-%" PRIu64 "-%016" PRIx64 ".tmp", (int)bus->pid,
             bus->start_ticks, cfn_random64(bus));
    int fd = openat(dirfd, tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, (mode_t)o->file_mode);
    if (fd < 0)
        return errno == ENOENT ? cfn_fail(err, CFN_E_NOINBOX, "%s was removed", where)
                               : cfn_fail_sys(err, "create temporary file in %s", where);
    rc = write_fd(fd, buf, len, o, err, where);
    if (close(fd) != 0 && rc == 0)
        rc = cfn_fail_sys(err, "close temporary file in %s", where);
    if (rc == 0 && renameat2(dirfd, tmp, dirfd, name, RENAME_NOREPLACE) != 0) {
        if (errno == EEXIST)
            *retry = true;
        rc = errno == EEXIST ? -EEXIST : cfn_fail_sys(err, "rename into %s", where);
    }
    if (rc != 0) {
        (void)unlinkat(dirfd, tmp, 0);  /* best effort: a leftover is removed as stale later */
        return rc;
    }
    if (o->fsync)
        return fsync_or_fail(dirfd, err, where);
    return 0;
}

static int64_t read_seq(int fd, size_t *oldlen)
{
    char buf[32];
    ssize_t n = pread(fd, buf, sizeof buf - 1, 0);
    if (n < 0)
        return -errno;
    buf[n] = '\0';
    *oldlen = (size_t)n;
    int64_t v = 0;
    for (ssize_t i = 0; i < n && buf[i] >= '0' && buf[i] <= '9'; i++)
        v = v * 10 + (buf[i] - '0');
    return v;
}

static int write_seq(int fd, int64_t v, size_t oldlen)
{
    char buf[32];
    int n = snprintf(buf, sizeof buf, "%" PRId64 "\n", v);
    if (pwrite(fd, buf, (size_t)n, 0) != n)
        return errno ? -errno : -EIO;
    if ((size_t)n < oldlen && ftruncate(fd, n) != 0)
        return -errno;
    return 0;
}

struct msg {
    const char *type;
    size_t type_len;
    const char *payload;
    size_t payload_len;
};

/* The original's layout, byte for byte: one envelope field per line, the
 * payload embedded as the caller gave it. Bash readers grep these lines
 * (head -n 1 of '"timestamp":'), so the envelope must come before the payload. */
static char *build_message(const char *from, const char *to, int64_t ts, int64_t seq, const char *id,
                           const struct msg *m, size_t *len)
{
    size_t cap = 256 + strlen(from) + strlen(to) + strlen(id) + 6 * m->type_len + m->payload_len;
    char *buf = malloc(cap);
    if (!buf)
        return NULL;
    int n = snprintf(buf, cap,
                     "{\n  \"version\": \"1.1\",\n  \"msg_id\": \"%s\",\n  \"from\": \"%s\",\n  \"to\": \"%s\",\n"
                     "  \"timestamp\": %" PRId64 ",\n  \"sequence\": %" PRId64 ",\n  \"type\": \"",
                     id, from, to, ts, seq);
    size_t o = (size_t)n;
    o += cfn_json_escape(buf + o, m->type, m->type_len);
    memcpy(buf + o, "\",\n  \"payload\": ", 15);
    o += 15;
    memcpy(buf + o, m->payload, m->payload_len);
    o += m->payload_len;
    static const char tail[] = ",\n  \"requires_ack\": false\n}\n";
    memcpy(buf + o, tail, sizeof tail - 1);
    o += sizeof tail - 1;
    *len = o;
    return buf;
}

/* One delivery into a place already reserved. Holds the pair's sequence lock
 * from numbering to rename, so one sender's messages land in sequence order. */
static int deliver(cfn_bus *bus, struct cfn_ent *ef, struct cfn_ent *et, const struct msg *m,
                   const cfn_send_opts *o, cfn_send_result *res, cfn_err *err)
{
    struct cfn_pair *p;
    int rc = cfn_pair_get(bus, ef, et->agent, o->dir_mode, &p, err);
    if (rc)
        return rc;
    while (flock(p->lockfd, LOCK_EX) != 0) {
        if (errno != EINTR) {
            rc = cfn_fail_sys(err, "flock sequence lock %s->%s", ef->agent, et->agent);
            cfn_pair_put(bus, p);
            return rc;
        }
    }
    size_t oldlen = 0, len = 0;
    int64_t last = read_seq(p->seqfd, &oldlen);
    char *buf = NULL;
    if (last < 0) {
        errno = (int)-last;
        rc = cfn_fail_sys(err, "read sequence %s->%s", ef->agent, et->agent);
        goto out;
    }
    int64_t seq = last + 1;
    /* numbered before the rename: a crash in between leaves a gap, never a repeat */
    if ((rc = write_seq(p->seqfd, seq, oldlen)) != 0) {
        errno = -rc;
        rc = cfn_fail_sys(err, "write sequence %s->%s", ef->agent, et->agent);
        goto out;
    }
    int64_t ts = cfn_now_ns() / 1000000000LL;
    char name[CFN_MSG_ID_MAX + 8] = "";
    for (int attempt = 0;; attempt++) {
        snprintf(res->msg_id, sizeof res->msg_id, "msg-%" PRId64 "-%010" PRId64 "-%016" PRIx64, ts, seq,
                 cfn_random64(bus));
        snprintf(name, sizeof name, "%s.json", res->msg_id);
        free(buf);
        buf = build_message(ef->agent, et->agent, ts, seq, res->msg_id, m, &len);
        if (!buf) {
            rc = cfn_fail(err, -ENOMEM, "allocating a %zu-byte message", m->payload_len);
            break;
        }
        bool retry = false;
        rc = write_file(bus, et->inboxfd, name, buf, len, o, &retry, err, "inbox");
        if (!(retry && attempt < 8))
            break;
    }
    if (rc != 0) {
        (void)write_seq(p->seqfd, last, SIZE_MAX);  /* give the number back */
        if (rc == -EEXIST)
            rc = cfn_fail(err, -EEXIST, "message id collided 8 times in a row");
        goto out;
    }
    res->sequence = seq;
    res->timestamp = ts;
out:
    (void)flock(p->lockfd, LOCK_UN);
    cfn_pair_put(bus, p);
    if (rc == 0) {
        /* the sender's outbox gets a copy when it has one; the message is
         * already delivered, so a failure here does not fail the send */
        int ob = atomic_load(&ef->outboxfd);
        if (ob < 0 && (ob = openat(ef->agentfd, "outbox", DIR_FLAGS)) >= 0) {
            int none = -1;
            if (!atomic_compare_exchange_strong(&ef->outboxfd, &none, ob)) {
                (void)close(ob);    /* another thread cached it first */
                ob = none;
            }
        }
        if (ob >= 0) {
            bool retry = false;
            cfn_err why;
            /* the descriptor stays cached while other threads may use it; a
             * removed outbox is forgotten with the entry (cleanup_message_bus) */
            res->outbox_copied = write_file(bus, ob, name, buf, len, o, &retry, &why, "outbox") == 0;
        }
    }
    free(buf);
    return rc;
}

/* One attempt: gate, reserve (reconciling when the counter says full or is
 * unknown), deliver, commit. CFN_E_FULL when there is no room. */
static int try_send(cfn_bus *bus, struct cfn_ent *ef, struct cfn_ent *et, const struct msg *m,
                    const cfn_send_opts *o, cfn_send_result *res, cfn_err *err)
{
    struct cfn_slot *s = &bus->slots[et->slot];
    int64_t gen = atomic_load(&s->reconcile_gen);
    int rc = cfn_gate_shared(et, err);
    if (rc)
        return rc;
    int r = reserve(s, o->capacity);
    if (r == CFN_E_FULL && o->max_retries >= 0 &&
        cfn_now_ns() - atomic_load(&s->reconcile_ns) < (o->wait_ms > 10 ? o->wait_ms : 10) * 1000000LL) {
        /* A backpressure sender goes straight to its wait when the inbox was
         * scanned within the last wait interval: under load the inbox is full
         * at every other send, and a scan per "full" (an exclusive lock and a
         * read of ~capacity names) would stall every sender and consumer.
         * Drift is healed by the first attempt after an interval with no scan. */
        cfn_gate_release(et);
        return CFN_E_FULL;
    }
    if (r != 0) {
        cfn_gate_release(et);
        /* heal drift (rm behind our back, a killed sender's reservation)
         * before saying full; moot if someone scanned since we looked */
        if ((rc = cfn_reconcile_ent(bus, et, 0, r == 1 ? -1 : gen, NULL, err)) != 0)
            return rc;
        if ((rc = cfn_gate_shared(et, err)) != 0)
            return rc;
        r = reserve(s, o->capacity);
        if (r != 0) {
            cfn_gate_release(et);
            return CFN_E_FULL;
        }
    }
    rc = deliver(bus, ef, et, m, o, res, err);
    if (rc != 0) {
        cfn_slot_sub(s, 1);  /* give the place back */
        cfn_gate_release(et);
        cfn_slot_wake(s, 1);
        return rc;
    }
    cfn_gate_release(et);
    return 0;
}

static void emit_bp_metric(cfn_bus *bus, const char *name, const char *from, const char *to,
                           const char *key, int64_t n)
{
    if (atomic_load_explicit(&bus->metrics_fd, memory_order_relaxed) < 0)
        return;
    char tags[3 * CFN_AGENT_MAX + 64];
    int k = snprintf(tags, sizeof tags, "{\"from\":\"%s\",\"to\":\"%s\",\"%s\":%" PRId64 "}", from, to, key, n);
    (void)cfn_metric_emit(bus, name, 1, "count", tags, (size_t)k, NULL);
}

static int64_t next_wait_ns(cfn_bus *bus, const cfn_send_opts *o, int64_t retries, int64_t *prev_ns)
{
    int64_t base = o->wait_ms * 1000000LL;
    /* a fresh adjustment published by apply_dynamic_rate_limit overrides the
     * configured wait for every sender on the machine */
    cfn_rate_settings rs;
    cfn_rate_read(bus, &rs);
    int64_t stale_ms = o->stale_after_ms;  /* three check intervals, the reader's or the publisher's */
    if (rs.interval_ms > 0 && 3 * rs.interval_ms > stale_ms)
        stale_ms = 3 * rs.interval_ms;
    if (rs.updated_ns > 0 && rs.wait_ms > 0 && o->stale_after_ms > 0 &&
        cfn_now_ns() - rs.updated_ns <= stale_ms * 1000000LL)
        base = rs.wait_ms * 1000000LL;
    int64_t w = base;
    if (o->backoff == CFN_BACKOFF_EXPONENTIAL) {
        w = base << (retries < 20 ? retries : 20);
    } else if (o->backoff == CFN_BACKOFF_DECORRELATED) {
        int64_t hi = *prev_ns > 0 ? *prev_ns * 3 : base;
        if (hi > base * 32) hi = base * 32;
        w = hi > base ? base + (int64_t)(cfn_random64(bus) % (uint64_t)(hi - base + 1)) : base;
        *prev_ns = w;
    }
    return w;
}

int cfn_send(cfn_bus *bus, const char *from, const char *to, const char *type, size_t type_len,
             const char *payload, size_t payload_len, const cfn_send_opts *o, cfn_send_result *res,
             cfn_err *err)
{
    int rc;
    memset(res, 0, sizeof *res);
    const char *roles[2] = {"sender", "recipient"}, *ids[2] = {from, to};
    for (int i = 0; i < 2; i++) {
        cfn_err why = {0};
        if ((rc = cfn_check_agent(ids[i], &why)) != 0)
            return cfn_fail(err, rc, "%s: %s", roles[i], why.what);
    }
    if (type_len == 0 || type_len > CFN_TYPE_MAX || memchr(type, '\0', type_len) ||
        cfn_utf8_check(type, type_len) != 0)
        return cfn_fail(err, CFN_E_BADTYPE, "message type must be 1 to %d bytes of UTF-8 text without NUL",
                        CFN_TYPE_MAX);
    if ((rc = opts_check(o, err)) != 0)
        return rc;
    if ((int64_t)payload_len > o->max_payload)
        return cfn_fail(err, CFN_E_TOOBIG, "payload is %zu bytes, over the limit of %" PRId64 " (MAX_MESSAGE_BYTES)",
                        payload_len, o->max_payload);
    if ((rc = cfn_check_json(payload, payload_len, err)) != 0)
        return rc;
    while (payload_len && strchr(" \t\r\n", payload[payload_len - 1])) payload_len--;
    while (payload_len && strchr(" \t\r\n", payload[0])) { payload++; payload_len--; }
    struct msg m = {type, type_len, payload, payload_len};

    struct cfn_ent *et, *ef;
    if ((rc = cfn_ent_get(bus, to, true, &et, err)) != 0)
        return rc;
    rc = cfn_ent_get(bus, from, false, &ef, err);
    if (rc == CFN_E_NOINBOX) {
        /* a sender needs no inbox, but its sequence files need its folder */
        if (mkdirat(bus->basefd, from, (mode_t)o->dir_mode) != 0 && errno != EEXIST)
            rc = cfn_fail_sys(err, "mkdir %s/%s", bus->base_path, from);
        else
            rc = cfn_ent_get(bus, from, false, &ef, err);
    }
    if (rc) {
        cfn_ent_put(bus, et);
        return rc;
    }
    struct cfn_slot *s = &bus->slots[et->slot];
    if (atomic_load_explicit(&s->capacity, memory_order_relaxed) != o->capacity)
        atomic_store_explicit(&s->capacity, o->capacity, memory_order_relaxed);

    bool backpressure = o->max_retries >= 0;
    int64_t budget_ns = (o->max_total_ms ? o->max_total_ms : o->wait_ms * (o->max_retries > 0 ? o->max_retries : 0))
                        * 1000000LL;
    int64_t start = cfn_mono_ns(), prev_ns = 0;
    for (;;) {
        uint32_t seen = atomic_load_explicit(&s->wake_seq, memory_order_acquire);
        rc = try_send(bus, ef, et, &m, o, res, err);
        if (rc == -ENOENT || rc == CFN_E_NOINBOX) {
            /* the cached inbox was removed and maybe made again: look once more */
            cfn_ent_drop(bus, et);
            et = NULL;
            if ((rc = cfn_ent_get(bus, to, true, &et, err)) != 0) {
                et = NULL;  /* nothing pinned: nothing to put back below */
                break;
            }
            s = &bus->slots[et->slot];
            rc = try_send(bus, ef, et, &m, o, res, err);
        }
        if (rc != CFN_E_FULL)
            break;
        if (!backpressure) {
            cfn_counter_add(bus, CFN_CTR_SEND_FULL, 1);
            rc = cfn_fail(err, CFN_E_FULL, "inbox of '%s' is full (%" PRId64 " messages)", to, o->capacity);
            break;
        }
        /* the budget bounds time spent waiting, not time spent trying */
        int64_t left = budget_ns - res->waited_ns;
        if (res->retries >= o->max_retries || left <= 0) {
            rc = cfn_fail(err, CFN_E_TIMEOUT, "inbox of '%s' stayed full after %" PRId64 " retries (%" PRId64 " ms)",
                          to, res->retries, (cfn_mono_ns() - start) / 1000000);
            break;
        }
        int64_t w = next_wait_ns(bus, o, res->retries, &prev_ns);
        if (w > left)
            w = left;
        /* every wait is a backpressure event, whether a timeout or a consumer ends it */
        cfn_counter_add(bus, CFN_CTR_BP_WAIT, 1);
        emit_bp_metric(bus, "backpressure.wait", from, to, "retry", res->retries + res->wakeups + 1);
        atomic_fetch_add(&s->waiters, 1);
        int64_t t0 = cfn_mono_ns();
        int wr = cfn_futex_wait(&s->wake_seq, seen, w);
        atomic_fetch_sub(&s->waiters, 1);
        res->waited_ns += cfn_mono_ns() - t0;
        if (wr == -ETIMEDOUT) {
            res->retries++;
        } else if (wr == -EINTR) {
            rc = cfn_fail(err, -EINTR, "interrupted while waiting for room in the inbox of '%s'", to);
            break;
        } else {
            res->wakeups++;
        }
    }
    if (backpressure && rc == 0) {
        cfn_counter_add(bus, CFN_CTR_BP_SUCCESS, 1);
        emit_bp_metric(bus, "backpressure.send.success", from, to, "retries", res->retries);
    } else if (backpressure && rc == CFN_E_TIMEOUT) {
        cfn_counter_add(bus, CFN_CTR_BP_FAILURE, 1);
        emit_bp_metric(bus, "backpressure.send.failure", from, to, "retries", res->retries);
    }
    if (rc == 0)
        cfn_counter_add(bus, CFN_CTR_SENT, 1);
    cfn_ent_put(bus, ef);
    if (et)
        cfn_ent_put(bus, et);
    return rc;
}

/* ---- reading and consuming ------------------------------------------------- */

struct rec {
    char *name;
    int64_t ts, seq;
    char *data;
    size_t len;
    bool keyed;
};

struct recs {
    struct rec *v;
    size_t n, cap;
};

static int recs_push(struct recs *r, const char *name, size_t n)
{
    if (r->n == r->cap) {
        size_t cap = r->cap ? r->cap * 2 : 64;
        struct rec *v = realloc(r->v, cap * sizeof *v);
        if (!v)
            return -ENOMEM;
        r->v = v;
        r->cap = cap;
    }
    struct rec *x = &r->v[r->n];
    memset(x, 0, sizeof *x);
    x->name = strndup(name, n);
    if (!x->name)
        return -ENOMEM;
    r->n++;
    return 0;
}

static void recs_free(struct recs *r)
{
    for (size_t i = 0; i < r->n; i++) {
        free(r->v[i].name);
        free(r->v[i].data);
    }
    free(r->v);
}

static int names_cb(void *ctx, int dfd, const char *name, size_t n, unsigned char type)
{
    if (!cfn_is_json_name(name, n) || entry_type(dfd, name, type) == DT_DIR)
        return 0;
    return recs_push(ctx, name, n);
}

/* Our ids are msg-<seconds>-<10-digit sequence>-<hex>: the key is in the name. */
static void key_from_name(struct rec *x)
{
    const char *p = x->name;
    if (strncmp(p, "msg-", 4) != 0)
        return;
    char *end;
    long long ts = strtoll(p + 4, &end, 10);
    if (*end != '-')
        return;
    const char *q = end + 1;
    for (int i = 0; i < 10; i++)
        if (q[i] < '0' || q[i] > '9')
            return;
    if (q[10] != '-')
        return;
    x->ts = ts;
    x->seq = strtoll(q, NULL, 10);
    x->keyed = true;
}

static int rec_cmp(const void *a, const void *b)
{
    const struct rec *x = a, *y = b;
    if (x->ts != y->ts) return x->ts < y->ts ? -1 : 1;
    if (x->seq != y->seq) return x->seq < y->seq ? -1 : 1;
    return strcmp(x->name, y->name);
}

/* Reads a message file without following links; 1 when it is bad (not a
 * regular file, too big, not JSON), 0 when good, -errno on other failure. */
static int read_msg(int dfd, struct rec *x, int64_t max_bytes)
{
    int fd = openat(dfd, x->name, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0)
        return errno == ELOOP ? 1 : -errno;
    struct stat st;
    int rc = 0;
    if (fstat(fd, &st) != 0) { rc = -errno; goto out; }
    if (!S_ISREG(st.st_mode) || st.st_size > max_bytes) { rc = 1; goto out; }
    x->data = malloc((size_t)st.st_size + 1);
    if (!x->data) { rc = -ENOMEM; goto out; }
    size_t got = 0;
    while (got < (size_t)st.st_size) {
        ssize_t n = read(fd, x->data + got, (size_t)st.st_size - got);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) { rc = -errno; goto out; }
        if (n == 0) break;  /* shrank under us: judge what is there */
        got += (size_t)n;
    }
    x->len = got;
    int64_t ts = 0, seq = 0;
    if (cfn_json_check(x->data, got, &ts, &seq) != 0 || x->data[strspn(x->data, " \t\r\n")] != '{') {
        rc = 1;
        goto out;
    }
    if (!x->keyed) {
        x->ts = ts;
        x->seq = seq;
        x->keyed = true;
    }
out:
    (void)close(fd);
    if (rc != 0) {
        free(x->data);
        x->data = NULL;
    }
    return rc;
}

/* Moves a bad file from dfd into <agent>/.quarantine, never overwriting. */
static int quarantine(cfn_bus *bus, struct cfn_ent *e, int dfd, const char *name, uint32_t dir_mode)
{
    if (mkdirat(e->agentfd, ".quarantine", (mode_t)dir_mode) != 0 && errno != EEXIST)
        return -errno;
    int q = openat(e->agentfd, ".quarantine", DIR_FLAGS);
    if (q < 0)
        return -errno;
    char dest[NAME_MAX + 1];
    snprintf(dest, sizeof dest, "%.200s.%016" PRIx64, name, cfn_random64(bus));
    int rc = renameat2(dfd, name, q, dest, RENAME_NOREPLACE) == 0 ? 0 : -errno;
    (void)close(q);
    if (rc == 0)
        cfn_counter_add(bus, CFN_CTR_QUARANTINED, 1);
    return rc;
}

static int claim_dir(cfn_bus *bus, struct cfn_ent *e, int *out, cfn_err *err)
{
    if (mkdirat(e->agentfd, ".claims", 0700) != 0 && errno != EEXIST)
        return cfn_fail_sys(err, "mkdir %s/.claims", e->agent);
    int c = openat(e->agentfd, ".claims", DIR_FLAGS);
    if (c < 0)
        return cfn_fail_sys(err, "open %s/.claims", e->agent);
    char name[64];
    snprintf(name, sizeof name, "%d.%" PRIu64, (int)bus->pid, bus->start_ticks);
    if (mkdirat(c, name, 0700) != 0 && errno != EEXIST) {
        int rc = cfn_fail_sys(err, "mkdir %s/.claims/%s", e->agent, name);
        (void)close(c);
        return rc;
    }
    *out = openat(c, name, DIR_FLAGS);
    (void)close(c);
    return *out < 0 ? cfn_fail_sys(err, "open %s/.claims/%s", e->agent, name) : 0;
}

static int blob_build(struct recs *r, cfn_blob *out, cfn_err *err)
{
    size_t total = 0;
    for (size_t i = 0; i < r->n; i++)
        if (r->v[i].data)
            total += 4 + r->v[i].len;
    out->data = malloc(total ? total : 1);
    if (!out->data)
        return cfn_fail(err, -ENOMEM, "allocating %zu bytes of messages", total);
    size_t o = 0;
    for (size_t i = 0; i < r->n; i++) {
        struct rec *x = &r->v[i];
        if (!x->data)
            continue;
        uint32_t l = (uint32_t)x->len;
        unsigned char hdr[4] = {(unsigned char)l, (unsigned char)(l >> 8), (unsigned char)(l >> 16),
                                (unsigned char)(l >> 24)};
        memcpy(out->data + o, hdr, 4);
        memcpy(out->data + o + 4, x->data, x->len);
        o += 4 + x->len;
        out->count++;
    }
    out->len = o;
    return 0;
}

/* Reads the inbox's names into e's listing, oldest first by (timestamp,
 * sequence). Our ids carry the key in the name; a foreign file is read for
 * it, and one that is not a message is quarantined here. */
static int listing_refill(cfn_bus *bus, struct cfn_ent *e, int64_t max_bytes, int64_t *bad, cfn_err *err)
{
    struct cfn_slot *s = &bus->slots[e->slot];
    struct recs r = {0};
    int rc = scan_dir(e->inboxfd, names_cb, &r, err, "inbox");
    if (rc) {
        recs_free(&r);
        return rc == -ENOMEM ? cfn_fail(err, rc, "listing the inbox of '%s'", e->agent) : rc;
    }
    size_t keep = 0;
    for (size_t i = 0; i < r.n; i++) {
        struct rec *x = &r.v[i];
        key_from_name(x);
        if (!x->keyed) {
            int k = read_msg(e->inboxfd, x, max_bytes);
            if (k == 1 && quarantine(bus, e, e->inboxfd, x->name, 0700) == 0) {
                cfn_slot_sub(s, 1);
                (*bad)++;
            }
            free(x->data);
            x->data = NULL;
        }
        if (x->keyed)
            r.v[keep++] = *x;
        else
            free(x->name);  /* gone, or moved aside */
    }
    r.n = keep;
    if (r.n > 1)
        qsort(r.v, r.n, sizeof *r.v, rec_cmp);  /* qsort(NULL, 0, ...) is undefined */
    char **names = malloc((r.n ? r.n : 1) * sizeof *names);
    if (!names) {
        recs_free(&r);
        return cfn_fail(err, -ENOMEM, "listing the inbox of '%s'", e->agent);
    }
    for (size_t i = 0; i < r.n; i++) {
        names[i] = r.v[i].name;  /* ownership moves to the listing */
        r.v[i].name = NULL;
    }
    for (size_t i = 0; i < e->list_n; i++)
        free(e->list[i]);
    free(e->list);
    e->list = names;
    e->list_n = r.n;
    e->list_next = 0;
    free(r.v);
    return 0;
}

/* Claims (renames into this process's claim folder) up to max messages,
 * oldest first, from the listing, reading the inbox again only when the
 * listing is used up; names another consumer took are skipped (ENOENT).
 * CFN_READ_CONSUME then frees the places, wakes waiting senders and deletes
 * the files; CFN_READ_CLAIM leaves them claimed until cfn_ack. The caller
 * holds the gate shared. */
static int consume_listed(cfn_bus *bus, struct cfn_ent *e, int mode, int64_t max, int64_t max_bytes,
                          struct recs *r, int64_t *taken, int64_t *bad, cfn_err *err)
{
    struct cfn_slot *s = &bus->slots[e->slot];
    int rc = 0;
    pthread_mutex_lock(&e->list_mu);
    if (e->claimfd < 0 && (rc = claim_dir(bus, e, &e->claimfd, err)) != 0) {
        e->claimfd = -1;
        goto out;
    }
    bool refilled = false;
    while (max < 0 || (int64_t)r->n < max) {
        if (e->list_next >= e->list_n) {
            if (refilled)
                break;
            if ((rc = listing_refill(bus, e, max_bytes, bad, err)) != 0)
                goto out;
            refilled = true;
            if (e->list_n == 0)
                break;
        }
        const char *name = e->list[e->list_next++];
        atomic_fetch_add(&s->claimed, 1);
        if (renameat(e->inboxfd, name, e->claimfd, name) != 0) {
            atomic_fetch_sub(&s->claimed, 1);
            continue;  /* another consumer took it, or it was removed: not ours */
        }
        if ((rc = recs_push(r, name, strlen(name))) != 0) {
            (void)renameat(e->claimfd, name, e->inboxfd, name);
            atomic_fetch_sub(&s->claimed, 1);
            rc = cfn_fail(err, rc, "allocating for a claimed message");
            goto out;
        }
    }
    /* read what we claimed; bad files go aside, unreadable ones back */
    size_t keep = 0;
    for (size_t i = 0; i < r->n; i++) {
        struct rec *x = &r->v[i];
        int k = read_msg(e->claimfd, x, max_bytes);
        if (k == 0) {
            r->v[keep++] = *x;
            continue;
        }
        if (k == 1 && quarantine(bus, e, e->claimfd, x->name, 0700) == 0) {
            cfn_slot_sub(s, 1);
            (*bad)++;
        } else {
            (void)renameat(e->claimfd, x->name, e->inboxfd, x->name);
        }
        atomic_fetch_sub(&s->claimed, 1);
        free(x->name);
        free(x->data);
    }
    r->n = keep;
    if (mode == CFN_READ_CLAIM)
        goto out;  /* at-least-once: claimed (and counted) until cfn_ack or a dead-owner reconcile */
    /* The messages are in memory: free their places and wake senders now, so
     * a waiting sender's delivery overlaps our unlinks. */
    int64_t n = (int64_t)r->n;
    if (n > 0) {
        cfn_slot_sub(s, n);
        cfn_slot_wake(s, (int)(n > INT32_MAX ? INT32_MAX : n));
    }
    for (size_t i = 0; i < r->n; i++) {
        if (unlinkat(e->claimfd, r->v[i].name, 0) != 0 && errno != ENOENT) {
            rc = cfn_fail_sys(err, "unlink claimed %s", r->v[i].name);
            break;
        }
    }
    atomic_fetch_sub(&s->claimed, n);
    *taken = n;
out:
    pthread_mutex_unlock(&e->list_mu);
    return rc;
}

int cfn_read_messages(cfn_bus *bus, const char *agent, int mode, int64_t max, int64_t max_bytes,
                      cfn_blob *out, cfn_err *err)
{
    memset(out, 0, sizeof *out);
    bool consume = mode != CFN_READ_PEEK;
    if (mode < CFN_READ_PEEK || mode > CFN_READ_CLAIM)
        return cfn_fail(err, CFN_E_BADARG, "unknown read mode %d", mode);
    if (max_bytes < 1)
        return cfn_fail(err, CFN_E_BADARG, "message size limit must be positive");
    struct cfn_ent *e;
    int rc = cfn_ent_get(bus, agent, true, &e, err);
    if (rc)
        return rc;
    struct cfn_slot *s = &bus->slots[e->slot];
    struct recs r = {0};
    bool gated = false;
    int64_t bad = 0, taken = 0;
    if (!consume && (rc = scan_dir(e->inboxfd, names_cb, &r, err, "inbox")) != 0)
        goto out;
    if ((rc = cfn_gate_shared(e, err)) != 0)
        goto out;
    gated = true;
    if (!consume) {
        for (size_t i = 0; i < r.n; i++)
            key_from_name(&r.v[i]);
        for (size_t i = 0; i < r.n; i++) {
            int k = read_msg(e->inboxfd, &r.v[i], max_bytes);
            if (k == 1 && quarantine(bus, e, e->inboxfd, r.v[i].name, 0700) == 0) {
                cfn_slot_sub(s, 1);
                bad++;
            }
        }
        if (r.n > 1)
            qsort(r.v, r.n, sizeof *r.v, rec_cmp);  /* qsort(NULL, 0, ...) is undefined */
        rc = blob_build(&r, out, err);
        goto out;
    }
    rc = consume_listed(bus, e, mode, max, max_bytes, &r, &taken, &bad, err);
    if (rc == 0)
        rc = blob_build(&r, out, err);
out:
    if (gated)
        cfn_gate_release(e);
    if (bad > 0)
        cfn_slot_wake(s, (int)(bad > INT32_MAX ? INT32_MAX : bad));
    if (taken > 0)
        cfn_counter_add(bus, CFN_CTR_CONSUMED, taken);
    out->quarantined = bad;
    recs_free(&r);
    cfn_ent_put(bus, e);
    return rc;
}

int64_t cfn_ack(cfn_bus *bus, const char *agent, const char *ids, size_t ids_len, cfn_err *err)
{
    struct cfn_ent *e;
    int rc = cfn_ent_get(bus, agent, true, &e, err);
    if (rc)
        return rc;
    struct cfn_slot *s = &bus->slots[e->slot];
    int claimfd = -1;
    int64_t done = 0;
    if ((rc = claim_dir(bus, e, &claimfd, err)) != 0)
        goto out;
    if ((rc = cfn_gate_shared(e, err)) != 0)
        goto out;
    for (size_t at = 0; at < ids_len;) {
        const char *id = ids + at;
        size_t n = strnlen(id, ids_len - at);
        at += n + 1;
        char name[NAME_MAX + 1];
        if (n == 0 || n > CFN_MSG_ID_MAX || memchr(id, '/', n))
            continue;  /* not an id we could have handed out */
        snprintf(name, sizeof name, "%.*s.json", (int)n, id);
        if (unlinkat(claimfd, name, 0) == 0)
            done++;
        else if (errno != ENOENT) {
            rc = cfn_fail_sys(err, "unlink claimed %s", name);
            break;
        }
    }
    atomic_fetch_sub(&s->claimed, done);
    cfn_slot_sub(s, done);
    cfn_gate_release(e);
    if (done) {
        cfn_slot_wake(s, (int)(done > INT32_MAX ? INT32_MAX : done));
        cfn_counter_add(bus, CFN_CTR_CONSUMED, done);
    }
out:
    if (claimfd >= 0)
        (void)close(claimfd);
    cfn_ent_put(bus, e);
    return rc ? rc : done;
}

void cfn_blob_free(cfn_blob *blob)
{
    free(blob->data);
    blob->data = NULL;
    blob->len = 0;
}

struct clear_ctx {
    int64_t removed;
};

static int clear_cb(void *ctx, int dfd, const char *name, size_t n, unsigned char type)
{
    struct clear_ctx *c = ctx;
    if (cfn_is_json_name(name, n) && entry_type(dfd, name, type) != DT_DIR && unlinkat(dfd, name, 0) == 0)
        c->removed++;
    return 0;
}

int64_t cfn_clear_inbox(cfn_bus *bus, const char *agent, cfn_err *err)
{
    struct cfn_ent *e;
    int rc = cfn_ent_get(bus, agent, true, &e, err);
    if (rc)
        return rc;
    struct cfn_slot *s = &bus->slots[e->slot];
    struct clear_ctx c = {0};
    if ((rc = cfn_gate_shared(e, err)) == 0) {
        rc = scan_dir(e->inboxfd, clear_cb, &c, err, "inbox");
        cfn_slot_sub(s, c.removed);
        cfn_gate_release(e);
        if (c.removed)
            cfn_slot_wake(s, (int)(c.removed > INT32_MAX ? INT32_MAX : c.removed));
    }
    cfn_ent_put(bus, e);
    return rc ? rc : c.removed;
}

/* ---- metrics ---------------------------------------------------------------- */

int64_t cfn_metric_format(char *line, size_t cap, const char *name, double value, const char *unit,
                          const char *tags_json, size_t tags_len, cfn_err *err)
{
    size_t nl = strlen(name), ul = strlen(unit);
    if (nl == 0 || nl > 200 || cfn_utf8_check(name, nl) != 0)
        return cfn_fail(err, CFN_E_BADARG, "metric name must be 1 to 200 bytes of UTF-8");
    if (ul > 64 || cfn_utf8_check(unit, ul) != 0)
        return cfn_fail(err, CFN_E_BADARG, "metric unit must be at most 64 bytes of UTF-8");
    if (!isfinite(value))
        return cfn_fail(err, CFN_E_BADARG, "metric value must be a finite number");
    if (tags_len == 0) {
        tags_json = "{}";
        tags_len = 2;
    }
    if (tags_len > 8192 || cfn_json_check(tags_json, tags_len, NULL, NULL) != 0 ||
        tags_json[strspn(tags_json, " \t\r\n")] != '{')
        return cfn_fail(err, CFN_E_BADARG, "metric tags must be a JSON object of at most 8 KiB");
    char num[40];
    if (value == (double)(int64_t)value && fabs(value) < 1e15)
        snprintf(num, sizeof num, "%" PRId64, (int64_t)value);
    else
        snprintf(num, sizeof num, "%.17g", value);
    if (cap < 128 + 6 * (nl + ul) + tags_len + strlen(num))
        return cfn_fail(err, -ERANGE, "metric line buffer too small");
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    char stamp[40];
    strftime(stamp, sizeof stamp, "%Y-%m-%dT%H:%M:%S", &tm);
    size_t o = (size_t)snprintf(line, cap, "{\"timestamp\":\"%s.%03ldZ\",\"metric\":\"", stamp,
                                ts.tv_nsec / 1000000);
    o += cfn_json_escape(line + o, name, nl);
    o += (size_t)snprintf(line + o, cap - o, "\",\"value\":%s,\"unit\":\"", num);
    o += cfn_json_escape(line + o, unit, ul);
    memcpy(line + o, "\",\"tags\":", 9);
    o += 9;
    memcpy(line + o, tags_json, tags_len);
    o += tags_len;
    memcpy(line + o, "}\n", 2);
    o += 2;
    return (int64_t)o;
}

int cfn_metric_emit(cfn_bus *bus, const char *name, double value, const char *unit, const char *tags_json,
                    size_t tags_len, cfn_err *err)
{
    int fd = atomic_load_explicit(&bus->metrics_fd, memory_order_relaxed);
    if (fd < 0)
        return 0;
    size_t cap = 256 + 6 * (strlen(name) + strlen(unit)) + tags_len;
    char small[2048];
    char *line = cap <= sizeof small ? small : malloc(cap);
    if (!line)
        return cfn_fail(err, -ENOMEM, "allocating a metric line");
    int64_t len = cfn_metric_format(line, cap, name, value, unit, tags_json, tags_len, err);
    int rc = 0;
    if (len < 0) {
        rc = (int)len;
    } else {
        /* one write on an O_APPEND descriptor: concurrent writers never interleave */
        ssize_t w = cfn_metrics_append(bus, line, (size_t)len);
        if (w < 0)
            rc = cfn_fail_sys(err, "write metrics file");
        else if (w != len)
            rc = cfn_fail(err, -EIO, "short write to metrics file (%zd of %lld bytes)", w, (long long)len);
        else
            cfn_counter_add(bus, CFN_CTR_METRICS, 1);
    }
    if (line != small)
        free(line);
    return rc;
}
