/*
 * send.c - the hot path of a send, top to bottom: check the arguments, open
 * (cached) the two agents' folders, then per attempt: take the recipient's
 * gate shared, heal the counter if the folder changed behind cfn-fast's back,
 * reserve a place with one CAS that never passes the inbox's capacity, number
 * the message under the pair's sequence lock, write it as an unnamed file and
 * link it into the inbox (never replacing a file), copy it to the sender's
 * outbox, release. A full inbox makes a backpressure sender sleep on the
 * inbox's futex until a consumer frees a place or its wait runs out.
 */
#include "internal.h"

#include <dirent.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

static int opts_check(const cfn_send_opts *o, cfn_err *err)
{
    if (o->capacity < 1 || o->capacity > CFN_CAPACITY_MAX)
        return cfn_fail(err, CFN_E_BADARG, "capacity must be 1 to %lld, not %" PRId64,
                        (long long)CFN_CAPACITY_MAX, o->capacity);
    if (o->wait_ms < 0 || o->wait_ms > CFN_WAIT_MS_MAX)
        return cfn_fail(err, CFN_E_BADARG, "wait must be 0 to %lld ms, not %" PRId64,
                        (long long)CFN_WAIT_MS_MAX, o->wait_ms);
    if (o->max_retries > CFN_RETRIES_MAX)
        return cfn_fail(err, CFN_E_BADARG, "retries must be at most %lld, not %" PRId64,
                        (long long)CFN_RETRIES_MAX, o->max_retries);
    if (o->max_total_ms < 0 || o->max_total_ms > CFN_TOTAL_MS_MAX)
        return cfn_fail(err, CFN_E_BADARG, "total wait must be 0 to %lld ms, not %" PRId64,
                        (long long)CFN_TOTAL_MS_MAX, o->max_total_ms);
    if (o->max_payload < 1 || o->max_payload > CFN_PAYLOAD_MAX)
        return cfn_fail(err, CFN_E_BADARG, "payload limit must be 1 to %lld bytes, not %" PRId64,
                        (long long)CFN_PAYLOAD_MAX, o->max_payload);
    if (o->backoff < CFN_BACKOFF_FIXED || o->backoff > CFN_BACKOFF_DECORRELATED)
        return cfn_fail(err, CFN_E_BADARG, "unknown backoff %d", (int)o->backoff);
    if (o->outbox_max < 0 || o->stale_after_ms < 0 || o->deadline_ns < 0)
        return cfn_fail(err, CFN_E_BADARG, "outbox limit, staleness and deadline must not be negative");
    if (o->priority != CFN_PRIORITY_NORMAL && o->priority != CFN_PRIORITY_HIGH)
        return cfn_fail(err, CFN_E_BADARG, "unknown priority %d", (int)o->priority);
    if (o->headroom_pct < 0 || o->headroom_pct > 100)
        return cfn_fail(err, CFN_E_BADARG, "high-priority headroom must be 0 to 100 %%, not %d", (int)o->headroom_pct);
    return 0;
}

/* The inbox's capacity: one value for every process, whatever each was told:
 * the smallest MAX_INBOX_SIZE any process has used on it since its init set
 * it. A process told less lowers it for everyone (one CAS); init raises it. */
int64_t cfn_capacity_for(struct cfn_slot *s, int64_t own)
{
    int64_t cap = atomic_load_explicit(&s->capacity, memory_order_relaxed);
    for (;;) {
        bool valid = cap >= 1 && cap <= CFN_CAPACITY_MAX;
        if (valid && cap <= own)
            return cap;
        if (atomic_compare_exchange_weak(&s->capacity, &cap, own))
            return own;
    }
}

/* How far this send may fill the inbox: its capacity, and for a
 * high-priority send the headroom above it too. */
static int64_t send_limit(struct cfn_slot *s, const cfn_send_opts *o)
{
    int64_t cap = cfn_capacity_for(s, o->capacity);
    return o->priority == CFN_PRIORITY_HIGH ? cap + cfn_headroom(cap, o->headroom_pct)
                                            : cfn_effective_limit(s, cap);  /* the adaptive limit, if any */
}

/* Reserve one place: CAS count+1 while below capacity. 1 when the counter
 * cannot be trusted (never scanned, or a value no cfn-fast process writes). */
static int reserve(struct cfn_slot *s, int64_t cap)
{
    int64_t c = atomic_load_explicit(&s->count, memory_order_acquire);
    for (;;) {
        if (c < 0)
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
int cfn_write_file(cfn_bus *bus, int dirfd, const char *name, const char *buf, size_t len,
                   const cfn_send_opts *o, bool *retry, cfn_err *err, const char *where)
{
    int rc;
    if (cfn_link_mode_unnamed(bus) != 0) {
        int fd = openat(dirfd, ".", O_TMPFILE | O_WRONLY | O_CLOEXEC, (mode_t)o->file_mode);
        if (fd >= 0) {
            rc = write_fd(fd, buf, len, o, err, where);
            if (rc == 0 && (rc = cfn_link_unnamed(bus, fd, dirfd, name)) != 0) {
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
        cfn_link_mode_none(bus);
    }
    char tmp[96];
    snprintf(tmp, sizeof tmp, CFN_TMP_PREFIX "%d-%" PRIu64 "-%016" PRIx64 ".tmp", (int)bus->pid,
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
    for (ssize_t i = 0; i < n && buf[i] >= '0' && buf[i] <= '9' && v < INT64_MAX / 20; i++)
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
                           const struct msg *m, bool high, size_t *len)
{
    size_t cap = 288 + strlen(from) + strlen(to) + strlen(id) + 6 * m->type_len + m->payload_len;
    char *buf = malloc(cap);
    if (!buf)
        return NULL;
    int n = snprintf(buf, cap,
                     "{\n  \"version\": \"1.1\",\n  \"msg_id\": \"%s\",\n  \"from\": \"%s\",\n  \"to\": \"%s\",\n"
                     "  \"timestamp\": %" PRId64 ",\n  \"sequence\": %" PRId64 ",\n  \"type\": \"",
                     id, from, to, ts, seq);
    size_t o = (size_t)n;
    o += cfn_json_escape(buf + o, m->type, m->type_len);
    /* a high-priority message says so in a field of its own, before the
     * payload (bash readers take the envelope's lines from the top) */
    static const char mid[] = "\",\n  \"payload\": ", mid_high[] = "\",\n  \"priority\": \"high\",\n  \"payload\": ";
    const char *sep = high ? mid_high : mid;
    size_t sep_len = high ? sizeof mid_high - 1 : sizeof mid - 1;
    memcpy(buf + o, sep, sep_len);  /* the original's space after the colon included */
    o += sep_len;
    memcpy(buf + o, m->payload, m->payload_len);
    o += m->payload_len;
    static const char tail[] = ",\n  \"requires_ack\": false\n}\n";
    memcpy(buf + o, tail, sizeof tail - 1);
    o += sizeof tail - 1;
    *len = o;
    return buf;
}

/* ---- the outbox and its bound ----------------------------------------------------- */

struct names {
    char **v;
    size_t n, cap;
};

static int names_cb(void *ctx, int dfd, const char *name, size_t n, unsigned char type)
{
    struct names *a = ctx;
    if (!cfn_is_json_name(name, n) || cfn_entry_type(dfd, name, type) == DT_DIR)
        return 0;
    if (a->n == a->cap) {
        size_t cap = a->cap ? a->cap * 2 : 256;
        char **v = realloc(a->v, cap * sizeof *v);
        if (!v)
            return -ENOMEM;
        a->v = v;
        a->cap = cap;
    }
    if (!(a->v[a->n] = strndup(name, n)))
        return -ENOMEM;
    a->n++;
    return 0;
}

static int name_cmp(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Keeps the outbox near OUTBOX_MAX copies: every max/10 sends of this
 * process it is measured (one fstat on tmpfs, where a folder's size counts
 * its entries; a listing elsewhere), and past the limit the oldest (by name,
 * which is by time then sequence) go until a tenth of the room is free again.
 * So it never holds more than the limit plus a tenth of it per process
 * sending as this agent, and a send pays no system call for it in between.
 * One process trims at a time (a non-blocking flock on the folder); the
 * copies are a courtesy, so every failure here is silent. */
static void outbox_trim(cfn_bus *bus, struct cfn_ent *ef, int ob, int64_t max)
{
    if (max <= 0 || ++ef->outbox_sends < max / 10 + 1)
        return;  /* a racy tally between threads: it only spaces the measurements */
    ef->outbox_sends = 0;
    struct stat st;
    if (ef->outbox_tmpfs && (fstat(ob, &st) != 0 || (int64_t)st.st_size / CFN_TMPFS_DIRENT - 2 <= max))
        return;
    int dfd = openat(ob, ".", DIR_FLAGS);
    if (dfd < 0)
        return;
    if (flock(dfd, LOCK_EX | LOCK_NB) == 0) {
        struct names a = {0};
        if (cfn_scan_fd(dfd, names_cb, &a, NULL, "outbox") == 0 && (int64_t)a.n > max) {
            qsort(a.v, a.n, sizeof *a.v, name_cmp);
            size_t drop = a.n - (size_t)(max - max / 10), gone = 0;
            for (size_t i = 0; i < drop; i++)
                gone += unlinkat(dfd, a.v[i], 0) == 0;
            cfn_region_counter_add(cfn_reg(bus), CFN_CTR_OUTBOX_PRUNED, (int64_t)gone);
        }
        for (size_t i = 0; i < a.n; i++)
            free(a.v[i]);
        free(a.v);
    }
    (void)close(dfd);  /* drops the flock */
}

/* The sender's folder, made when it has none yet (a sender needs no inbox,
 * but its sequence files need its folder). */
static int sender_ent(cfn_bus *bus, const char *from, uint32_t dir_mode, struct cfn_ent **ef, cfn_err *err)
{
    int rc = cfn_ent_get(bus, from, false, ef, err);
    if (rc != CFN_E_NOINBOX)
        return rc;
    if (mkdirat(bus->basefd, from, (mode_t)dir_mode) != 0 && errno != EEXIST)
        return cfn_fail_sys(err, "mkdir %s/%s", bus->base_path, from);
    return cfn_ent_get(bus, from, false, ef, err);
}

/* Advances from->to's sequence as a sender does (the original's
 * get_next_sequence): under its lock, read, add one, write; returns the new number. */
int64_t cfn_next_sequence_in(cfn_bus *bus, const char *from, const char *to, cfn_err *err)
{
    struct cfn_ent *ef;
    int rc = sender_ent(bus, from, bus->dir_mode, &ef, err);
    if (rc)
        return rc;
    struct cfn_pair *p;
    int64_t seq = 0;
    if ((rc = cfn_pair_get(bus, ef, to, &p, err)) == 0) {
        rc = cfn_flock_until(bus, p->lockfd, LOCK_EX, cfn_deadline(bus->lock_timeout_ms), err,
                             "%s/%s/.sequences/%s.lock", bus->base_path, from, to);
        if (rc == 0) {
            size_t oldlen = 0;
            int64_t last = read_seq(p->seqfd, &oldlen);
            if (last < 0 || (rc = write_seq(p->seqfd, last + 1, oldlen)) != 0) {
                errno = (int)-(last < 0 ? last : rc);
                rc = cfn_fail_sys(err, "advance sequence %s->%s", from, to);
            } else {
                seq = last + 1;
            }
            (void)flock(p->lockfd, LOCK_UN);
        }
        cfn_pair_put(bus, p);
    }
    cfn_ent_put(bus, ef);
    return rc ? rc : seq;
}

/* The next sequence number of p, reserving numbers in the sequence file under
 * its lock (the original's protocol: bash senders read and advance the same
 * file, so no number is ever used twice). A process's first reservation takes
 * one number and each next one twice as many, up to CFN_SEQ_BLOCK_MAX: a
 * one-shot CLI send numbers densely, a long-lived sender pays the file's four
 * system calls once per 64 messages. Unused numbers are gaps, never repeats.
 * The caller holds p->mu. */
static int64_t take_sequence(cfn_bus *bus, struct cfn_pair *p, const char *from, const char *to, int64_t deadline,
                             cfn_err *err)
{
    if (p->next <= p->limit)
        return p->next++;
    int rc = cfn_flock_until(bus, p->lockfd, LOCK_EX, deadline, err, "%s/%s/.sequences/%s.lock", bus->base_path,
                             from, to);
    if (rc)
        return rc;
    size_t oldlen = 0;
    int64_t last = read_seq(p->seqfd, &oldlen);
    int64_t grant = p->grant < 1 ? 1 : p->grant;
    if (last < 0 || (rc = write_seq(p->seqfd, last + grant, oldlen)) != 0) {
        errno = (int)-(last < 0 ? last : rc);
        rc = cfn_fail_sys(err, "advance sequence %s->%s", from, to);
    }
    (void)flock(p->lockfd, LOCK_UN);
    if (rc)
        return rc;
    p->next = last + 1;
    p->limit = last + grant;
    p->grant = grant * 2 > CFN_SEQ_BLOCK_MAX ? CFN_SEQ_BLOCK_MAX : grant * 2;
    return p->next++;
}

/* The sender's outbox, once seen (cached), or -1. A sender without one (most
 * pure senders) looks for it again once a second, not at every send. */
static int outbox_fd(struct cfn_ent *ef)
{
    int ob = atomic_load(&ef->outboxfd);
    if (ob >= 0)
        return ob;
    int64_t now = cfn_mono_ns();
    if (ef->outbox_missing_ns && now - ef->outbox_missing_ns < 1000000000LL)
        return -1;  /* a racy stamp between threads: it only spaces the looks */
    if ((ob = openat(ef->agentfd, "outbox", DIR_FLAGS)) < 0) {
        ef->outbox_missing_ns = now;
    } else {
        int none = -1;
        if (!atomic_compare_exchange_strong(&ef->outboxfd, &none, ob)) {
            (void)close(ob);    /* another thread cached it first */
            ob = none;
        } else {
            ef->outbox_tmpfs = cfn_is_tmpfs(ob);
        }
    }
    return ob;
}

/* Writes buf as <inbox>/name and its copy as <outbox>/name (ob >= 0): one
 * unnamed O_TMPFILE, written once, given both names by linkat. The message is
 * never changed after, so the outbox's name is a faithful copy at the cost of
 * one system call (the original cp'd it). Where unnamed files do not work, or
 * the outbox is on another filesystem, the outbox gets its own file. A failed
 * copy fails nothing: the message is delivered. */
static int write_delivery(cfn_bus *bus, struct cfn_ent *et, struct cfn_ent *ef, const char *name, const char *buf,
                          size_t len, const cfn_send_opts *o, bool *retry, cfn_send_result *res, cfn_err *err)
{
    int ob = outbox_fd(ef);
    if (cfn_link_mode_unnamed(bus) == 0)
        goto separate;
    int fd = openat(et->inboxfd, ".", O_TMPFILE | O_WRONLY | O_CLOEXEC, (mode_t)o->file_mode);
    if (fd < 0) {
        if (errno == ENOENT)
            return cfn_fail(err, CFN_E_NOINBOX, "inbox was removed");
        if (errno != EOPNOTSUPP && errno != EISDIR && errno != EINVAL)
            return cfn_fail_sys(err, "create file in inbox");
        cfn_link_mode_none(bus);
        goto separate;
    }
    int rc = write_fd(fd, buf, len, o, err, "inbox");
    if (rc == 0 && (rc = cfn_link_unnamed(bus, fd, et->inboxfd, name)) != 0) {
        if (rc == -EEXIST)
            *retry = true;
        else if (rc == -ENOENT)
            rc = cfn_fail(err, CFN_E_NOINBOX, "inbox was removed");
        else {
            errno = -rc;
            rc = cfn_fail_sys(err, "link new file into inbox");
        }
    }
    if (rc == 0 && ob >= 0) {
        int l = cfn_link_unnamed(bus, fd, ob, name);
        res->outbox_copied = l == 0;
        if (l == -EXDEV) {  /* another filesystem: a file of its own */
            bool again = false;
            cfn_err why;
            res->outbox_copied = cfn_write_file(bus, ob, name, buf, len, o, &again, &why, "outbox") == 0;
        }
    }
    (void)close(fd);    /* unnamed on failure: it vanishes with the descriptor */
    if (rc == 0 && o->fsync) {
        rc = fsync_or_fail(et->inboxfd, err, "inbox");
        if (rc == 0 && res->outbox_copied)
            (void)fsync(ob);  /* the copy's folder: best effort, as the copy */
    }
    if (rc == 0 && res->outbox_copied)
        outbox_trim(bus, ef, ob, o->outbox_max);
    return rc;
separate:
    rc = cfn_write_file(bus, et->inboxfd, name, buf, len, o, retry, err, "inbox");
    if (rc == 0 && ob >= 0) {
        bool again = false;
        cfn_err why;
        res->outbox_copied = cfn_write_file(bus, ob, name, buf, len, o, &again, &why, "outbox") == 0;
        if (res->outbox_copied)
            outbox_trim(bus, ef, ob, o->outbox_max);
    }
    return rc;
}

/* One delivery into a place already reserved: numbered (the pair's mutex held
 * from numbering to link, so one process's messages land in sequence order),
 * written, linked into the inbox and the sender's outbox. */
static int deliver(cfn_bus *bus, struct cfn_ent *ef, struct cfn_ent *et, const struct msg *m,
                   const cfn_send_opts *o, int64_t deadline, cfn_send_result *res, cfn_err *err)
{
    struct cfn_pair *p;
    int rc = cfn_pair_get(bus, ef, et->agent, &p, err);
    if (rc)
        return rc;
    int64_t seq = take_sequence(bus, p, ef->agent, et->agent, deadline, err);
    if (seq < 0) {
        cfn_pair_put(bus, p);
        return (int)seq;
    }
    int64_t now_ns = cfn_now_ns(), ts = now_ns / 1000000000LL;
    char name[CFN_MSG_ID_MAX + 8] = "";
    char *buf = NULL;
    size_t len = 0;
    for (int attempt = 0;; attempt++) {
        /* The last part is 5 hex digits of the microsecond it was sent (so a
         * consumer knows its age when it takes it) and 11 of chance; a
         * high-priority id ends in -hi: consumers see it in the name, and a
         * listing sorted by name is still in (timestamp, sequence) order. */
        bool high = o->priority == CFN_PRIORITY_HIGH;
        snprintf(res->msg_id, sizeof res->msg_id, "msg-%" PRId64 "-%010" PRId64 "-%05" PRIx64 "%011" PRIx64 "%s",
                 ts, seq, (uint64_t)(now_ns % 1000000000LL / 1000), cfn_random64(bus) >> 20, high ? "-hi" : "");
        snprintf(name, sizeof name, "%s.json", res->msg_id);
        free(buf);
        buf = build_message(ef->agent, et->agent, ts, seq, res->msg_id, m, high, &len);
        if (!buf) {
            rc = cfn_fail(err, -ENOMEM, "allocating a %zu-byte message", m->payload_len);
            break;
        }
        bool retry = false;
        rc = write_delivery(bus, et, ef, name, buf, len, o, &retry, res, err);
        if (!(retry && attempt < 8))
            break;
    }
    if (rc != 0) {
        if (p->next == seq + 1)
            p->next = seq;  /* not used: the next message takes it (still under the pair's mutex) */
        if (rc == -EEXIST)
            rc = cfn_fail(err, -EEXIST, "message id collided 8 times in a row");
    } else {
        res->sequence = seq;
        res->timestamp = ts;
    }
    cfn_pair_put(bus, p);
    free(buf);
    return rc;
}

/* One attempt: gate, heal, reserve, deliver. CFN_E_FULL when there is no room. */
static int try_send(cfn_bus *bus, struct cfn_ent *ef, struct cfn_ent *et, const struct msg *m,
                    const cfn_send_opts *o, int64_t deadline, bool healed_recently,
                    cfn_send_result *res, cfn_err *err)
{
    int rc = cfn_gate_shared(bus, et, deadline, err);
    if (rc)
        return rc;
    struct cfn_slot *s = cfn_ent_slot(bus, et, err);
    if (!s) {
        cfn_gate_release(et);
        return err ? err->code : CFN_E_NOSLOT;
    }
    int64_t gen = atomic_load(&s->reconcile_gen);
    /* Files the counter does not know (a bash sender wrote since the last
     * scan) are counted before any place is given out. */
    int r = cfn_inbox_drift(et, s, NULL) > 0 ? 1 : reserve(s, send_limit(s, o));
    if (r == CFN_E_FULL && o->max_retries >= 0 && healed_recently) {
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
        /* heal drift (rm behind our back, a killed sender's reservation, a dead
         * consumer's claims) before saying full; moot if someone scanned since */
        if ((rc = cfn_reconcile_ent(bus, et, 0, r == 1 ? -1 : gen, deadline, NULL, err)) != 0)
            return rc;
        if ((rc = cfn_gate_shared(bus, et, deadline, err)) != 0)
            return rc;
        if (!(s = cfn_ent_slot(bus, et, err))) {
            cfn_gate_release(et);
            return err ? err->code : CFN_E_NOSLOT;
        }
        if (reserve(s, send_limit(s, o)) != 0) {
            cfn_gate_release(et);
            return CFN_E_FULL;
        }
    }
    rc = deliver(bus, ef, et, m, o, deadline, res, err);
    if (rc != 0) {
        cfn_slot_sub(s, 1);  /* give the place back */
        cfn_gate_release(et);
        cfn_slot_wake(s, 1);
        return rc;
    }
    if (o->priority == CFN_PRIORITY_HIGH)
        atomic_fetch_add_explicit(&s->high_sent, 1, memory_order_release);
    cfn_senders_add(s, ef->sender_key, cfn_mono_ns());
    cfn_gate_release(et);
    cfn_arrived(s);  /* after the link: a woken consumer finds it */
    return 0;
}

static void emit_bp_metric(cfn_bus *bus, const char *name, const char *from, const char *to,
                           const char *key, int64_t n)
{
    if (atomic_load_explicit(&bus->metrics_fd, memory_order_relaxed) < 0)
        return;
    char tags[3 * CFN_AGENT_MAX + 64];
    int k = snprintf(tags, sizeof tags, "{\"from\":\"%s\",\"to\":\"%s\",\"%s\":%" PRId64 "}", from, to, key, n);
    (void)cfn_metric_emit_in(bus, name, 1, "count", tags, (size_t)k, NULL);
}

/* The next wait, in ns: the configured one, or the one apply_dynamic_rate_limit
 * published while it is fresh, grown by the backoff; never more than `left`. */
static int64_t next_wait_ns(cfn_bus *bus, const cfn_send_opts *o, int64_t retries, int64_t *prev_ns, int64_t left)
{
    int64_t base_ms = o->wait_ms;
    cfn_rate_settings rs;
    cfn_region_rate_read(cfn_reg(bus), &rs);
    if (rs.wait_ms > 0 && rs.wait_ms <= CFN_WAIT_MS_MAX && cfn_rate_fresh(&rs, o->stale_after_ms, cfn_now_ns()))
        base_ms = rs.wait_ms;
    int64_t base = base_ms * 1000000LL, w = base;  /* at most an hour: no overflow */
    if (o->backoff == CFN_BACKOFF_EXPONENTIAL) {
        w = cfn_mul_sat(base, (int64_t)1 << (retries < 40 ? retries : 40));
    } else if (o->backoff == CFN_BACKOFF_DECORRELATED && base > 0) {
        int64_t hi = *prev_ns > 0 ? cfn_mul_sat(*prev_ns, 3) : base;
        if (hi > cfn_mul_sat(base, 32)) hi = cfn_mul_sat(base, 32);
        w = hi > base ? base + (int64_t)(cfn_random64(bus) % (uint64_t)(hi - base + 1)) : base;
        *prev_ns = w;
    }
    return w < left ? w : left;
}

/* A send the recipient's open circuit refuses: counted, and said with when
 * probes go (ra, ns). */
static int circuit_refusal(cfn_bus *bus, struct cfn_slot *s, const char *to, int64_t ra, cfn_send_result *res,
                           cfn_err *err)
{
    atomic_fetch_add_explicit(&s->circuit_rejected, 1, memory_order_relaxed);
    cfn_region_counter_add(cfn_reg(bus), CFN_CTR_CIRCUIT_REJECTED, 1);
    res->retry_after_ns = ra;
    return cfn_fail(err, CFN_E_CIRCUIT, "circuit of '%s' is open: sends to it fail at once for %" PRId64
                    " ms more", to, (ra + 999999) / 1000000);
}

/* A failure as the circuit counts it: the inbox did not take the message
 * within the sender's own budget (a full inbox through every retry, a lock
 * held past its wait) or could not be written. Not one: a plain send refused
 * because the inbox is full (backpressure at work), the caller's deadline or
 * interruption, bad input, a missing inbox. */
static bool send_failed(int rc, const cfn_send_result *res)
{
    if (rc == CFN_E_TIMEOUT)
        return !res->deadline;
    if (rc == CFN_E_LOCKED)
        return true;
    return rc < 0 && rc > -1000 && rc != -EINTR && rc != -ENOENT && rc != -ENOMEM;
}

/* The base retry wait in ns, as the next wait would start from (no backoff):
 * the retry_after of a full inbox that drained nothing in the last second. */
static int64_t retry_wait_ns(cfn_bus *bus, const cfn_send_opts *o)
{
    int64_t prev = 0;
    cfn_send_opts base = *o;
    base.backoff = CFN_BACKOFF_FIXED;
    return next_wait_ns(bus, &base, 0, &prev, INT64_MAX);
}

int cfn_send_in(cfn_bus *bus, const char *from, const char *to, const char *type, size_t type_len,
                const char *payload, size_t payload_len, const cfn_send_opts *o, cfn_send_result *res,
                cfn_err *err)
{
    int rc;
    memset(res, 0, sizeof *res);
    if (type_len == 0 || type_len > CFN_TYPE_MAX || memchr(type, '\0', type_len) ||
        cfn_utf8_check(type, type_len) != 0)
        return cfn_fail(err, CFN_E_BADTYPE, "message type must be 1 to %d bytes of UTF-8 text without NUL",
                        CFN_TYPE_MAX);
    if ((rc = opts_check(o, err)) != 0)
        return rc;
    if ((int64_t)payload_len > o->max_payload)
        return cfn_fail(err, CFN_E_TOOBIG, "payload is %zu bytes, over the limit of %" PRId64 " (MAX_MESSAGE_BYTES)",
                        payload_len, o->max_payload);
    /* An open circuit refuses first, before the payload is read or the inbox
     * touched (its slot is found in the mapping, no system call): that is
     * what makes it cheap for every sender to obey. */
    struct cfn_slot *cs = cfn_slot_lookup(bus, to);
    int64_t ra = 0;
    if (cs && cfn_circuit_peek(cs, cfn_mono_ns(), &ra) == CFN_REFUSE)
        return circuit_refusal(bus, cs, to, ra, res, err);
    if ((rc = cfn_check_json(payload, payload_len, err)) != 0)
        return rc;
    while (payload_len && strchr(" \t\r\n", payload[payload_len - 1])) payload_len--;
    while (payload_len && strchr(" \t\r\n", payload[0])) { payload++; payload_len--; }
    struct msg m = {type, type_len, payload, payload_len};
    if ((rc = cfn_region_check(bus, err)) != 0)
        return rc;

    struct cfn_ent *et, *ef;
    if ((rc = cfn_ent_get(bus, to, true, &et, err)) != 0)
        return rc;
    if ((rc = sender_ent(bus, from, o->dir_mode, &ef, err)) != 0) {
        cfn_ent_put(bus, et);
        return rc;
    }
    /* the admission proper: a half-open circuit counts its probes */
    cs = cfn_ent_slot(bus, et, NULL);
    if (cs && cfn_circuit_admit(cs, o, cfn_mono_ns(), &ra) == CFN_REFUSE) {
        cfn_ent_put(bus, ef);
        cfn_ent_put(bus, et);
        return circuit_refusal(bus, cs, to, ra, res, err);
    }

    bool backpressure = o->max_retries >= 0;
    /* The budget bounds time spent waiting (for room or for a lock), not time
     * spent trying. With no wait and no total, retries alone bound it. */
    int64_t budget_ns = o->max_total_ms ? cfn_mul_sat(o->max_total_ms, 1000000)
                                        : cfn_mul_sat(cfn_mul_sat(o->wait_ms, 1000000),
                                                      o->max_retries > 0 ? o->max_retries : 0);
    bool timed = o->max_total_ms > 0 || o->wait_ms > 0;
    int64_t start = cfn_mono_ns(), prev_ns = 0, last_heal = INT64_MIN / 2;
    int64_t heal_every = cfn_mul_sat(o->wait_ms > 10 ? o->wait_ms : 10, 1000000);
    /* fair wake: a normal send that finds the inbox full (or others waiting
     * for it) takes a ticket and waits its turn; a high-priority one passes */
    bool fair = o->priority != CFN_PRIORITY_HIGH, queued = false;
    uint32_t ticket = 0;
    struct cfn_slot *ls = NULL;  /* the slot whose line holds the ticket */
    for (;;) {
        struct cfn_slot *s = cfn_ent_slot(bus, et, err);
        if (!s) {
            rc = err ? err->code : CFN_E_NOSLOT;
            break;
        }
        if (queued && ls != s) {  /* the state file was replaced under us: its line is another */
            cfn_line_leave(ls, ticket, cfn_mono_ns());
            queued = false;
        }
        if (queued && cfn_line_turn(s, ticket) < 0)
            ticket = cfn_line_join(s, cfn_mono_ns());  /* passed over while it went quiet: to the back */
        uint32_t seen = atomic_load_explicit(&s->wake_seq, memory_order_acquire);
        int64_t t0 = cfn_mono_ns();
        /* a turn to try: the head of the line, or a newcomer finding nobody waiting */
        bool my_turn = !fair || (queued ? cfn_line_turn(s, ticket) == 1 : cfn_line_clear(s, t0));
        int64_t lock_deadline = cfn_deadline(bus->lock_timeout_ms);
        if (backpressure && timed && t0 + (budget_ns - res->waited_ns) < lock_deadline)
            lock_deadline = cfn_add_sat(t0, budget_ns - res->waited_ns);
        if (o->deadline_ns > 0 && o->deadline_ns < lock_deadline)
            lock_deadline = o->deadline_ns;
        bool healed = t0 - last_heal < heal_every ||
                      cfn_now_ns() - atomic_load(&s->reconcile_ns) < heal_every;
        rc = my_turn ? try_send(bus, ef, et, &m, o, lock_deadline, healed, res, err) : CFN_E_FULL;
        if (rc == -ENOENT || rc == CFN_E_NOINBOX) {
            /* the cached inbox was removed and maybe made again: look once more */
            cfn_ent_drop(bus, et);
            et = NULL;
            if ((rc = cfn_ent_get(bus, to, true, &et, err)) != 0) {
                et = NULL;  /* nothing pinned: nothing to put back below */
                break;
            }
            rc = try_send(bus, ef, et, &m, o, lock_deadline, false, res, err);
        }
        if (rc == CFN_E_LOCKED) {
            /* Locked, not full. When the send's own budget was the shorter, it is
             * a backpressure timeout like any other (contention among senders
             * ends that way too); when LOCK_TIMEOUT_MS was, an InboxLocked. */
            res->waited_ns += cfn_mono_ns() - t0;
            res->locked = 1;
            cfn_region_counter_add(cfn_reg(bus), CFN_CTR_LOCK_TIMEOUTS, 1);
            bool past_deadline = o->deadline_ns > 0 && cfn_mono_ns() >= o->deadline_ns;
            if ((backpressure && timed && res->waited_ns >= budget_ns) || past_deadline) {
                char why[sizeof err->what] = "";
                if (err)
                    memcpy(why, err->what, sizeof why);
                res->deadline = past_deadline;
                if (past_deadline)
                    rc = cfn_fail(err, CFN_E_TIMEOUT, "the send's deadline passed waiting for a lock: %s", why);
                else
                    rc = cfn_fail(err, CFN_E_TIMEOUT, "the send's wait budget (%" PRId64 " ms) ran out waiting "
                                  "for a lock: %s", budget_ns / 1000000, why);
            }
            break;
        }
        if (rc != CFN_E_FULL)
            break;
        last_heal = healed || !my_turn ? last_heal : t0;
        int64_t cap = cfn_capacity_for(s, o->capacity), limit = send_limit(s, o);
        int64_t now = cfn_mono_ns();
        int64_t count = atomic_load(&s->count);
        int64_t ahead = fair ? cfn_line_ahead(s, queued ? &ticket : NULL) : 0;
        int64_t eta = cfn_eta_ns(s, (count > limit - 1 ? count - limit + 1 : 0) + ahead, now);
        res->retry_after_ns = eta >= 0 ? eta : retry_wait_ns(bus, o);
        if (!backpressure) {
            cfn_region_counter_add(cfn_reg(bus), CFN_CTR_SEND_FULL, 1);
            if (count < limit)
                rc = cfn_fail(err, CFN_E_FULL, "inbox of '%s' is full: %" PRId64 " sender(s) wait their turn "
                              "for room in it", to, ahead);
            else if (limit > cap)
                rc = cfn_fail(err, CFN_E_FULL, "inbox of '%s' is full (%" PRId64 " messages, and its %" PRId64
                              " places of high-priority headroom)", to, cap, limit - cap);
            else
                rc = cfn_fail(err, CFN_E_FULL, "inbox of '%s' is full (%" PRId64 " messages)", to, cap);
            break;
        }
        int64_t left = budget_ns - res->waited_ns;
        int64_t dl_left = o->deadline_ns > 0 ? o->deadline_ns - now : INT64_MAX;
        if (res->retries >= o->max_retries || (timed && left <= 0)) {
            rc = cfn_fail(err, CFN_E_TIMEOUT, "inbox of '%s' stayed full after %" PRId64 " retries (%" PRId64 " ms)",
                          to, res->retries, (now - start) / 1000000);
            break;
        }
        if (dl_left <= 0) {
            res->deadline = 1;
            rc = cfn_fail(err, CFN_E_TIMEOUT, "inbox of '%s' stayed full until the send's deadline (%" PRId64
                          " ms, %" PRId64 " retries)", to, (now - start) / 1000000, res->retries);
            break;
        }
        int64_t w = next_wait_ns(bus, o, res->retries, &prev_ns, timed ? left : 0);
        if (o->deadline_ns > 0) {
            /* A wait that cannot end before the deadline is not started: room is
             * expected when the drain rate says (or, with no drain in the last
             * second, at the end of the next retry wait). */
            int64_t expect = eta >= 0 ? eta : w;
            if (expect > dl_left) {
                res->deadline = 1;
                rc = cfn_fail(err, CFN_E_TIMEOUT, "inbox of '%s' cannot have room before the send's deadline "
                              "(room expected in %" PRId64 " ms, %" PRId64 " ms left)", to, expect / 1000000,
                              dl_left / 1000000);
                break;
            }
            if (w > dl_left)
                w = dl_left;
        }
        /* every wait is a backpressure event, whether a timeout or a consumer ends it */
        cfn_region_counter_add(cfn_reg(bus), CFN_CTR_BP_WAIT, 1);
        emit_bp_metric(bus, "backpressure.wait", from, to, "retry", res->retries + res->wakeups + 1);
        if (fair && !queued) {
            ticket = cfn_line_join(s, now);
            ls = s;
            queued = true;
        }
        if (w <= 0) {
            res->retries++;  /* BACKPRESSURE_WAIT_MS=0: retry at once, as the original */
            sched_yield();
            continue;
        }
        uint32_t epoch = cfn_waiter_enter(s);
        int64_t w0 = cfn_mono_ns(), probed = w0;
        int wr;
        /* in slices of at most 50 ms, asking the probe between them: a signal
         * that came just before the wait began must not wait out an hour. The
         * head waits for room (wake_seq), beating; the others for their turn
         * (the line's word, on their ticket's bit), passing over a quiet head. */
        for (;;) {
            int64_t slice = w - (cfn_mono_ns() - w0);
            if (slice > 50000000LL)
                slice = 50000000LL;
            int turn = queued ? cfn_line_turn(s, ticket) : 1;
            if (turn < 0) {
                wr = -ETIMEDOUT;  /* passed over: it joins again at the top of the loop */
                break;
            }
            if (turn == 1) {
                if (queued)
                    cfn_line_beat(s, cfn_mono_ns());
                wr = cfn_futex_wait(&s->wake_seq, seen, slice);
            } else {
                uint32_t h = atomic_load_explicit(&s->line_head, memory_order_acquire);
                wr = cfn_line_turn(s, ticket) != 0 ? 0
                     : cfn_futex_wait_bits(&s->line_head, h, slice, cfn_line_bit(ticket));
                if (wr == 0 && cfn_line_turn(s, ticket) != 1)
                    wr = -EAGAIN;  /* another's turn moved: not ours yet */
                if (wr != 0)
                    (void)cfn_line_clear(s, cfn_mono_ns());
            }
            if (wr == 0 || wr == -EINTR || cfn_mono_ns() - w0 >= w) {
                if (wr == -EAGAIN)
                    wr = -ETIMEDOUT;
                break;
            }
            if (cfn_probe_says_stop(bus, &probed)) {
                wr = -EINTR;
                break;
            }
        }
        cfn_waiter_leave(s, epoch);
        res->waited_ns += cfn_mono_ns() - w0;
        if (wr == -EINTR) {
            rc = cfn_fail(err, -EINTR, "interrupted while waiting for room in the inbox of '%s'", to);
            break;
        }
        if (wr == -ETIMEDOUT)
            res->retries++;
        else
            res->wakeups++;
        if (cfn_closing(bus)) {
            rc = cfn_fail(err, CFN_E_CLOSED, "the bus was closed while waiting for room in the inbox of '%s'", to);
            break;
        }
    }
    if (queued)
        cfn_line_leave(ls, ticket, cfn_mono_ns());  /* the head passes the turn on; others leave their place */
    if (rc != CFN_E_FULL && !(rc == CFN_E_TIMEOUT && !res->locked))
        res->retry_after_ns = 0;  /* said only of a send refused for want of room */
    struct cfn_region *r = cfn_reg(bus);
    if (cs && (rc == 0 || send_failed(rc, res))) {
        res->circuit = cfn_circuit_record(cs, o, rc != 0, cfn_mono_ns());
        if (res->circuit) {
            cfn_region_counter_add(r, res->circuit == 1 ? CFN_CTR_CIRCUIT_OPENED : CFN_CTR_CIRCUIT_CLOSED, 1);
            emit_bp_metric(bus, res->circuit == 1 ? "circuit.opened" : "circuit.closed", from, to, "retries",
                           res->retries);
        }
    }
    if (backpressure && rc == 0) {
        cfn_region_counter_add(r, CFN_CTR_BP_SUCCESS, 1);
        emit_bp_metric(bus, "backpressure.send.success", from, to, "retries", res->retries);
    } else if (backpressure && rc == CFN_E_TIMEOUT) {
        cfn_region_counter_add(r, CFN_CTR_BP_FAILURE, 1);
        emit_bp_metric(bus, "backpressure.send.failure", from, to, "retries", res->retries);
    }
    if (rc == 0) {
        cfn_region_counter_add(r, CFN_CTR_SENT, 1);
        if (o->priority == CFN_PRIORITY_HIGH)
            cfn_region_counter_add(r, CFN_CTR_SENT_HIGH, 1);
    }
    cfn_ent_put(bus, ef);
    if (et)
        cfn_ent_put(bus, et);
    return rc;
}
