/*
 * consume.c - reading, taking, claiming and clearing messages.
 *
 * Nothing is deleted before the caller holds its bytes: cfn_read_messages
 * reads (NEXT: the oldest from this handle's listing; PEEK: all), the caller
 * decodes, and only then cfn_take deletes what it now holds. The unlink
 * decides ownership: of two consumers that read one message, the one whose
 * unlink succeeds has it, the other drops it. A message whose unlink fails
 * stays in the inbox, counted. Claims (at-least-once) move messages into
 * <agent>/.claims/<consumer>/ first, which this handle's consumer lock keeps
 * its own while the process lives (scan.c returns a dead consumer's).
 */
#include "internal.h"

#include <dirent.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define RECOVER_EVERY_NS (100LL * 1000000LL)  /* an empty-handed consumer looks for dead claims this often */
#define RECOVER_WAIT_MS 50                    /* and waits no longer than this for the lock to do it */

struct rec {
    char *name;
    int64_t ts, seq;
    char *data;
    size_t len;
    uint32_t flags;
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
    if (!cfn_is_json_name(name, n) || cfn_entry_type(dfd, name, type) == DT_DIR)
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
 * regular file, too big, not a JSON object), 0 when good, -errno on other
 * failure (-ENOENT: another consumer has it). One read for a message up to
 * 16 KiB: a regular file's read comes back short only at its end, so no fstat
 * is needed to size it (a FIFO, opened non-blocking, reads empty and is
 * refused as not JSON; a folder or a socket fails to open or read: bad). */
static int read_msg(int dfd, struct rec *x, int64_t max_bytes)
{
    int fd = openat(dfd, x->name, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0)
        return errno == ELOOP || errno == ENXIO || errno == EISDIR ? 1 : -errno;
    char small[16384];
    char *buf = small;
    size_t cap = sizeof small, got = 0;
    int rc = 0;
    for (;;) {
        ssize_t n = read(fd, buf + got, cap - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            rc = errno == EISDIR ? 1 : -errno;
            break;
        }
        got += (size_t)n;
        if (n == 0 || got < cap)
            break;  /* the end of the file */
        if ((int64_t)got > max_bytes) {
            rc = 1;  /* too big */
            break;
        }
        size_t next = cap * 2;
        char *grown = buf == small ? malloc(next) : realloc(buf, next);
        if (!grown) {
            rc = -ENOMEM;
            break;
        }
        if (buf == small)
            memcpy(grown, small, got);
        buf = grown;
        cap = next;
    }
    (void)close(fd);
    if (rc == 0 && (int64_t)got > max_bytes)
        rc = 1;
    if (rc == 0) {
        x->data = buf != small && got < cap ? buf : malloc(got + 1);
        if (!x->data) {
            rc = -ENOMEM;
        } else {
            if (x->data != buf)
                memcpy(x->data, buf, got);
            x->data[got] = '\0';
            x->len = got;
            buf = x->data;  /* owned by x now */
        }
    }
    if (buf != small && buf != x->data)
        free(buf);
    if (rc != 0)
        return rc;
    struct cfn_json_info info;
    if (cfn_json_scan(x->data, got, CFN_JSON_FILE_DEPTH, &info) != 0 ||
        x->data[strspn(x->data, " \t\r\n")] != '{') {
        free(x->data);
        x->data = NULL;
        return 1;
    }
    x->flags = info.flags;
    if (!x->keyed) {
        x->ts = info.ts;
        x->seq = info.seq;
        x->keyed = true;
    }
    return 0;
}

/* Moves a bad file from dfd into <agent>/.quarantine, never overwriting. */
static int quarantine_one(cfn_bus *bus, struct cfn_ent *e, int dfd, const char *name)
{
    if (mkdirat(e->agentfd, ".quarantine", (mode_t)bus->dir_mode) != 0 && errno != EEXIST)
        return -errno;
    int q = openat(e->agentfd, ".quarantine", DIR_FLAGS);
    if (q < 0)
        return -errno;
    char dest[NAME_MAX + 1];
    snprintf(dest, sizeof dest, "%.200s.%016" PRIx64, name, cfn_random64(bus));
    int rc = renameat2(dfd, name, q, dest, RENAME_NOREPLACE) == 0 ? 0 : -errno;
    (void)close(q);
    if (rc == 0)
        cfn_region_counter_add(cfn_reg(bus), CFN_CTR_QUARANTINED, 1);
    return rc;
}

/* Moves a bad message aside and uncounts it (from the claims when claimed),
 * under the inbox's gate: the caller's when it holds it, else taken here. */
static bool quarantine_counted(cfn_bus *bus, struct cfn_ent *e, struct cfn_slot *s, int dfd, const char *name,
                               bool claimed, bool gated)
{
    if (!gated && cfn_gate_shared(bus, e, cfn_deadline(bus->lock_timeout_ms), NULL) != 0)
        return false;  /* left where it is: the next reader tries again */
    bool moved = quarantine_one(bus, e, dfd, name) == 0;
    if (moved) {
        if (claimed)
            atomic_fetch_sub(&s->claimed, 1);
        cfn_slot_sub(s, 1);
    }
    if (!gated)
        cfn_gate_release(e);
    return moved;
}

/* This handle's claim folder in the agent's .claims, made on first use,
 * after the consumer lock that keeps it ours is held. */
static int claim_dir(cfn_bus *bus, struct cfn_ent *e, cfn_err *err)
{
    if (e->claimfd >= 0)
        return 0;
    int rc = cfn_consumer_ready(bus, err);
    if (rc)
        return rc;
    if (mkdirat(e->agentfd, ".claims", (mode_t)bus->dir_mode) != 0 && errno != EEXIST)
        return cfn_fail_sys(err, "mkdir %s/.claims", e->agent);
    int c = openat(e->agentfd, ".claims", DIR_FLAGS);
    if (c < 0)
        return cfn_fail_sys(err, "open %s/.claims", e->agent);
    if (mkdirat(c, bus->consumer_id, (mode_t)bus->dir_mode) != 0 && errno != EEXIST) {
        rc = cfn_fail_sys(err, "mkdir %s/.claims/%s", e->agent, bus->consumer_id);
        (void)close(c);
        return rc;
    }
    e->claimfd = openat(c, bus->consumer_id, DIR_FLAGS);
    (void)close(c);
    return e->claimfd < 0 ? cfn_fail_sys(err, "open %s/.claims/%s", e->agent, bus->consumer_id) : 0;
}

static int blob_build(struct recs *r, cfn_blob *out, cfn_err *err)
{
    size_t total = 0;
    for (size_t i = 0; i < r->n; i++)
        if (r->v[i].data)
            total += 12 + strlen(r->v[i].name) + r->v[i].len;
    out->data = malloc(total ? total : 1);
    if (!out->data)
        return cfn_fail(err, -ENOMEM, "allocating %zu bytes of messages", total);
    size_t o = 0;
    for (size_t i = 0; i < r->n; i++) {
        struct rec *x = &r->v[i];
        if (!x->data)
            continue;
        uint32_t fields[3] = {(uint32_t)strlen(x->name), x->flags, (uint32_t)x->len};
        for (int f = 0; f < 3; f++) {
            unsigned char le[4] = {(unsigned char)fields[f], (unsigned char)(fields[f] >> 8),
                                   (unsigned char)(fields[f] >> 16), (unsigned char)(fields[f] >> 24)};
            memcpy(out->data + o, le, 4);
            o += 4;
            if (f == 0) {
                memcpy(out->data + o, x->name, fields[0]);
                o += fields[0];
            }
        }
        memcpy(out->data + o, x->data, x->len);
        o += x->len;
        out->count++;
    }
    out->len = o;
    return 0;
}

/* A high-priority message's name: its id ends in -hi. */
static bool is_high(const char *name)
{
    size_t n = strlen(name);
    return n > 8 && memcmp(name + n - 8, "-hi.json", 8) == 0;
}

void cfn_listing_free(struct cfn_ent *e)
{
    for (size_t i = 0; i < e->list_n; i++)
        free(e->list[i]);
    for (size_t i = 0; i < e->hlist_n; i++)
        free(e->hlist[i]);
    free(e->list);
    free(e->hlist);
    e->list = e->hlist = NULL;
    e->list_n = e->list_next = e->hlist_n = e->hlist_next = 0;
}

/* Reads the inbox's names into e's listing, oldest first by (timestamp,
 * sequence), the high-priority ones apart. Our ids carry the key in the
 * name; a foreign file is read for it, and one that is not a message is
 * quarantined here. */
static int listing_refill(cfn_bus *bus, struct cfn_ent *e, struct cfn_slot *s, int64_t max_bytes, int64_t *bad,
                          bool gated, cfn_err *err)
{
    struct recs r = {0};
    int64_t high_seen = atomic_load_explicit(&s->high_sent, memory_order_acquire);  /* before the read */
    int rc = cfn_scan_dir(e->inboxfd, names_cb, &r, err, "inbox");
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
            if (k == 1 && quarantine_counted(bus, e, s, e->inboxfd, x->name, false, gated))
                (*bad)++;
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
    size_t nhigh = 0;
    for (size_t i = 0; i < r.n; i++)
        nhigh += is_high(r.v[i].name);
    char **names = malloc((r.n - nhigh ? r.n - nhigh : 1) * sizeof *names);
    char **high = malloc((nhigh ? nhigh : 1) * sizeof *high);
    if (!names || !high) {
        free(names);
        free(high);
        recs_free(&r);
        return cfn_fail(err, -ENOMEM, "listing the inbox of '%s'", e->agent);
    }
    cfn_listing_free(e);
    for (size_t i = 0; i < r.n; i++) {
        if (is_high(r.v[i].name))
            high[e->hlist_n++] = r.v[i].name;  /* ownership moves to the listing */
        else
            names[e->list_n++] = r.v[i].name;
        r.v[i].name = NULL;
    }
    e->list = names;
    e->hlist = high;
    e->list_high = high_seen;
    free(r.v);
    return 0;
}

/* The next name of the listing: high-priority ones first, but no more than
 * the handle's priority_ratio of them in a row while normal ones wait, so a
 * steady stream of high messages never starves the others. NULL: used up. */
static const char *listing_next(cfn_bus *bus, struct cfn_ent *e)
{
    bool high = e->hlist_next < e->hlist_n, normal = e->list_next < e->list_n;
    int ratio = bus->flow.priority_ratio;
    if (high && (!normal || ratio <= 0 || e->high_run < ratio)) {
        e->high_run++;
        return e->hlist[e->hlist_next++];
    }
    if (!normal)
        return NULL;
    e->high_run = 0;
    return e->list[e->list_next++];
}

/* Takes up to max names from the listing (reading the inbox again only when
 * it is used up) and reads them; with claim, moves each into the claim folder
 * first. Names another consumer took are skipped. One that cannot be claimed
 * or read (EIO, say) stays where it was, counted, and the batch goes on; the
 * first such failure is returned only when nothing could be read. The caller
 * holds the gate shared. */
static int read_listed(cfn_bus *bus, struct cfn_ent *e, struct cfn_slot *s, bool claim, int64_t max,
                       int64_t max_bytes, struct recs *r, int64_t *bad, bool *listing_empty, bool gated,
                       cfn_err *err)
{
    int rc = 0, first = 0;
    pthread_mutex_lock(&e->list_mu);
    if (claim && (rc = claim_dir(bus, e, err)) != 0)
        goto out;
    bool refilled = false;
    *listing_empty = false;
    while (max < 0 || (int64_t)r->n < max) {
        /* read the inbox again when the listing is used up, or when high
         * messages came since it was read (they go first) */
        bool used_up = e->list_next >= e->list_n && e->hlist_next >= e->hlist_n;
        if (used_up || (!refilled && atomic_load_explicit(&s->high_sent, memory_order_acquire) != e->list_high)) {
            if (refilled)
                break;
            if ((rc = listing_refill(bus, e, s, max_bytes, bad, gated, err)) != 0)
                break;
            refilled = true;
            if (e->list_n == 0 && e->hlist_n == 0) {
                *listing_empty = true;
                break;
            }
        }
        const char *name = listing_next(bus, e);
        if (!name)
            break;
        int dfd = e->inboxfd;
        if (claim) {
            if (renameat(e->inboxfd, name, e->claimfd, name) != 0) {
                if (errno != ENOENT && !first)  /* ENOENT: another consumer took it */
                    first = cfn_fail_sys(err, "claim %s/inbox/%s", e->agent, name);
                continue;
            }
            atomic_fetch_add(&s->claimed, 1);  /* after the rename: never more files than counted */
            dfd = e->claimfd;
            int64_t age;
            if (cfn_sojourn_of(name, cfn_now_ns(), &age))
                cfn_sojourn_add(s, age, 1);
        }
        if ((rc = recs_push(r, name, strlen(name))) != 0) {
            rc = cfn_fail(err, rc, "allocating for a message");
            if (claim) {
                atomic_fetch_sub(&s->claimed, 1);
                (void)renameat(e->claimfd, name, e->inboxfd, name);
            }
            break;
        }
        struct rec *x = &r->v[r->n - 1];
        key_from_name(x);
        int k = read_msg(dfd, x, max_bytes);
        if (k == 0)
            continue;
        r->n--;
        if (k == 1 && quarantine_counted(bus, e, s, dfd, x->name, claim, gated)) {
            (*bad)++;
        } else if (k != -ENOENT) {
            if (claim) {  /* unreadable now: back where it was, for a later try */
                atomic_fetch_sub(&s->claimed, 1);
                (void)renameat(e->claimfd, x->name, e->inboxfd, x->name);
            }
            if (k != 1 && !first) {
                errno = -k;
                first = cfn_fail_sys(err, "read %s/inbox/%s", e->agent, x->name);
            }
        }
        free(x->name);
        free(x->data);
    }
out:
    pthread_mutex_unlock(&e->list_mu);
    if (rc == 0 && first && r->n == 0)
        rc = first;
    if (rc && r->n > 0)
        rc = 0;  /* hand over what was read; the failure comes back on the next call */
    return rc;
}

int cfn_read_messages_in(cfn_bus *bus, const char *agent, int mode, int64_t max, int64_t max_bytes,
                         cfn_blob *out, cfn_err *err)
{
    memset(out, 0, sizeof *out);
    if (mode < CFN_READ_PEEK || mode > CFN_READ_CLAIM)
        return cfn_fail(err, CFN_E_BADARG, "unknown read mode %d", mode);
    if (max_bytes < 1)
        return cfn_fail(err, CFN_E_BADARG, "message size limit must be positive");
    struct cfn_ent *e;
    int rc = cfn_ent_get(bus, agent, true, &e, err);
    if (rc)
        return rc;
    struct recs r = {0};
    int64_t bad = 0;
    struct cfn_slot *s = NULL;
    bool gated = false;
    if (mode == CFN_READ_PEEK && (rc = cfn_scan_dir(e->inboxfd, names_cb, &r, err, "inbox")) != 0)
        goto out;
    /* Reading changes nothing, so NEXT reads without the gate (a bad file it
     * quarantines takes it for that); PEEK and CLAIM (renames) hold it. */
    bool gate = mode != CFN_READ_NEXT;
    for (int round = 0; round < 2; round++) {
        if (gate && (rc = cfn_gate_shared(bus, e, cfn_deadline(bus->lock_timeout_ms), err)) != 0)
            goto out;
        gated = gate;
        if (!(s = cfn_ent_slot(bus, e, err))) {
            rc = err ? err->code : CFN_E_NOSLOT;
            goto out;
        }
        if (mode == CFN_READ_PEEK) {
            size_t keep = 0;
            for (size_t i = 0; i < r.n; i++) {
                struct rec *x = &r.v[i];
                key_from_name(x);
                int k = read_msg(e->inboxfd, x, max_bytes);
                if (k == 1 && quarantine_one(bus, e, e->inboxfd, x->name) == 0) {
                    cfn_slot_sub(s, 1);
                    bad++;
                }
                if (k == 0)
                    r.v[keep++] = *x;
                else
                    free(x->name);
            }
            r.n = keep;
            if (r.n > 1)
                qsort(r.v, r.n, sizeof *r.v, rec_cmp);  /* qsort(NULL, 0, ...) is undefined */
            break;
        }
        bool empty = false;
        rc = read_listed(bus, e, s, mode == CFN_READ_CLAIM, max, max_bytes, &r, &bad, &empty, gated, err);
        if (rc || !empty || round > 0 || atomic_load(&s->claimed) <= 0 ||
            cfn_now_ns() - atomic_load(&s->reconcile_ns) < RECOVER_EVERY_NS)
            break;
        /* Nothing to read, yet messages are claimed: if their consumer died,
         * they come back now, not when a monitor next runs. */
        if (gated)
            cfn_gate_release(e);
        gated = false;
        rc = cfn_reconcile_ent(bus, e, 0, -1, cfn_deadline(RECOVER_WAIT_MS), NULL, NULL);
        if (rc != 0 && rc != CFN_E_LOCKED)
            goto out;
        rc = 0;  /* busy: what there is to read now, and the next consumer looks again */
    }
    if (rc == 0)
        rc = blob_build(&r, out, err);
out:
    if (gated)
        cfn_gate_release(e);
    if (bad > 0 && s)
        cfn_slot_wake(s, (int)(bad > INT32_MAX ? INT32_MAX : bad));
    out->quarantined = bad;
    recs_free(&r);
    cfn_ent_put(bus, e);
    return rc;
}

/* The file name for a name or a message id. */
static bool file_name(const char *id, size_t n, char *out, size_t cap)
{
    if (n == 0 || n > CFN_MSG_ID_MAX + 5 || memchr(id, '/', n) || id[0] == '.')
        return false;  /* not a name we could have handed out */
    bool has_ext = n > 5 && memcmp(id + n - 5, ".json", 5) == 0;
    snprintf(out, cap, "%.*s%s", (int)n, id, has_ext ? "" : ".json");
    return true;
}

/* Calls fn(name, i) for every name in the packed list; stops at a nonzero return. */
#define FOR_NAMES(names, len, i, buf, body)                                       \
    for (size_t at_ = 0, i = 0; at_ < (len); i++) {                               \
        const char *id_ = (names) + at_;                                          \
        size_t n_ = strnlen(id_, (len) - at_);                                    \
        at_ += n_ + 1;                                                            \
        char buf[NAME_MAX + 1];                                                   \
        if (!file_name(id_, n_, buf, sizeof buf)) continue;                       \
        body                                                                      \
    }

int64_t cfn_take_in(cfn_bus *bus, const char *agent, int from, const char *names, size_t names_len,
                    uint8_t *taken, cfn_err *err)
{
    if (from != CFN_FROM_INBOX && from != CFN_FROM_CLAIMS)
        return cfn_fail(err, CFN_E_BADARG, "unknown place to take from: %d", from);
    struct cfn_ent *e;
    int rc = cfn_ent_get(bus, agent, true, &e, err);
    if (rc)
        return rc;
    int64_t done = 0, failed = 0;
    int first_rc = 0;
    struct cfn_slot *s = NULL;
    size_t count = 0;
    for (size_t at = 0; at < names_len; at += strnlen(names + at, names_len - at) + 1)
        taken[count++] = 0;
    if (from == CFN_FROM_CLAIMS) {
        pthread_mutex_lock(&e->list_mu);
        rc = claim_dir(bus, e, err);
        pthread_mutex_unlock(&e->list_mu);
        if (rc)
            goto out;
    }
    if ((rc = cfn_gate_shared(bus, e, cfn_deadline(bus->lock_timeout_ms), err)) != 0)
        goto out;
    if ((s = cfn_ent_slot(bus, e, err)) == NULL) {
        rc = err ? err->code : CFN_E_NOSLOT;
        cfn_gate_release(e);
        goto out;
    }
    int dfd = from == CFN_FROM_CLAIMS ? e->claimfd : e->inboxfd;
    int64_t now = cfn_now_ns(), sojourn_sum = 0, sojourn_n = 0, age;
    FOR_NAMES(names, names_len, i, name, {
        if (unlinkat(dfd, name, 0) == 0) {
            taken[i] = 1;
            done++;
            if (from == CFN_FROM_INBOX && cfn_sojourn_of(name, now, &age)) {
                sojourn_sum += age;
                sojourn_n++;
            }
        } else if (errno != ENOENT) {
            failed++;
            if (!first_rc)
                first_rc = cfn_fail_sys(err, "delete %s/%s/%s", e->agent,
                                        from == CFN_FROM_CLAIMS ? ".claims" : "inbox", name);
        }
    })
    if (from == CFN_FROM_CLAIMS)
        atomic_fetch_sub(&s->claimed, done);  /* first: "files" never exceed count - claimed */
    cfn_slot_sub(s, done);
    cfn_gate_release(e);
    if (done) {
        int64_t mono = cfn_mono_ns();
        cfn_drain_add(s, done, mono);
        cfn_sojourn_add(s, sojourn_sum, sojourn_n);  /* a claim's was measured when it was claimed */
        cfn_adapt(s, &bus->flow, mono);
        cfn_slot_wake(s, (int)(done > INT32_MAX ? INT32_MAX : done));
        cfn_region_counter_add(cfn_reg(bus), CFN_CTR_CONSUMED, done);
    }
    if (failed)
        cfn_region_counter_add(cfn_reg(bus), CFN_CTR_TAKE_ERRORS, failed);
    if (done == 0 && first_rc)
        rc = first_rc;
out:
    cfn_ent_put(bus, e);
    return rc ? rc : done;
}

int64_t cfn_put_back_in(cfn_bus *bus, const char *agent, const char *names, size_t names_len, cfn_err *err)
{
    struct cfn_ent *e;
    int rc = cfn_ent_get(bus, agent, true, &e, err);
    if (rc)
        return rc;
    int64_t done = 0;
    pthread_mutex_lock(&e->list_mu);
    rc = claim_dir(bus, e, err);
    pthread_mutex_unlock(&e->list_mu);
    if (rc == 0 && (rc = cfn_gate_shared(bus, e, cfn_deadline(bus->lock_timeout_ms), err)) == 0) {
        struct cfn_slot *s = cfn_ent_slot(bus, e, err);
        if (!s) {
            rc = err ? err->code : CFN_E_NOSLOT;
        } else {
            FOR_NAMES(names, names_len, i, name, {
                (void)i;
                atomic_fetch_sub(&s->claimed, 1);  /* before the rename: files never exceed count - claimed */
                if (renameat2(e->claimfd, name, e->inboxfd, name, RENAME_NOREPLACE) == 0) {
                    done++;
                } else if (errno == EEXIST && unlinkat(e->claimfd, name, 0) == 0) {
                    cfn_slot_sub(s, 1);  /* the same message is in the inbox already */
                } else {
                    atomic_fetch_add(&s->claimed, 1);
                    if (!rc && errno != ENOENT)
                        rc = cfn_fail_sys(err, "put back %s/.claims/%s", e->agent, name);
                }
            })
            if (done) {
                pthread_mutex_lock(&e->list_mu);
                e->list_next = e->list_n;  /* read the inbox again: they are back in it */
                e->hlist_next = e->hlist_n;
                pthread_mutex_unlock(&e->list_mu);
                cfn_arrived(s);
            }
        }
        cfn_gate_release(e);
    }
    cfn_ent_put(bus, e);
    return rc && !done ? rc : done;
}

int64_t cfn_quarantine_in(cfn_bus *bus, const char *agent, int from, const char *names, size_t names_len,
                          cfn_err *err)
{
    struct cfn_ent *e;
    int rc = cfn_ent_get(bus, agent, true, &e, err);
    if (rc)
        return rc;
    int64_t done = 0;
    if (from == CFN_FROM_CLAIMS) {
        pthread_mutex_lock(&e->list_mu);
        rc = claim_dir(bus, e, err);
        pthread_mutex_unlock(&e->list_mu);
    }
    if (rc == 0 && (rc = cfn_gate_shared(bus, e, cfn_deadline(bus->lock_timeout_ms), err)) == 0) {
        struct cfn_slot *s = cfn_ent_slot(bus, e, err);
        int dfd = from == CFN_FROM_CLAIMS ? e->claimfd : e->inboxfd;
        if (!s) {
            rc = err ? err->code : CFN_E_NOSLOT;
        } else {
            FOR_NAMES(names, names_len, i, name, {
                (void)i;
                if (quarantine_one(bus, e, dfd, name) == 0) {
                    done++;
                    if (from == CFN_FROM_CLAIMS)
                        atomic_fetch_sub(&s->claimed, 1);
                    cfn_slot_sub(s, 1);
                }
            })
        }
        cfn_gate_release(e);
        if (s && done)
            cfn_slot_wake(s, (int)done);
    }
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
    if (cfn_is_json_name(name, n) && cfn_entry_type(dfd, name, type) != DT_DIR && unlinkat(dfd, name, 0) == 0)
        c->removed++;
    return 0;
}

int64_t cfn_clear_inbox_in(cfn_bus *bus, const char *agent, cfn_err *err)
{
    struct cfn_ent *e;
    int rc = cfn_ent_get(bus, agent, true, &e, err);
    if (rc)
        return rc;
    struct clear_ctx c = {0};
    if ((rc = cfn_gate_shared(bus, e, cfn_deadline(bus->lock_timeout_ms), err)) == 0) {
        struct cfn_slot *s = cfn_ent_slot(bus, e, err);
        if (!s) {
            rc = err ? err->code : CFN_E_NOSLOT;
            cfn_gate_release(e);
        } else {
            rc = cfn_scan_dir(e->inboxfd, clear_cb, &c, err, "inbox");
            cfn_slot_sub(s, c.removed);
            cfn_gate_release(e);
            if (c.removed)
                cfn_slot_wake(s, (int)(c.removed > INT32_MAX ? INT32_MAX : c.removed));
        }
    }
    cfn_ent_put(bus, e);
    return rc ? rc : c.removed;
}
