/*
 * bus.c - the handle Python owns: the base folder's descriptor, the mapped
 * state, and small caches of open folder and sequence-file descriptors so a
 * send opens exactly one new file. Every path below the base folder is
 * opened relative to a descriptor, one component at a time, with O_NOFOLLOW.
 */
#include "internal.h"

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#define DIR_FLAGS (O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)

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

static void ent_close(struct cfn_ent *e)
{
    if (e->agentfd >= 0) (void)close(e->agentfd);
    if (e->inboxfd >= 0) (void)close(e->inboxfd);
    if (e->lockfd >= 0) (void)close(e->lockfd);
    int ob = atomic_exchange(&e->outboxfd, -1);
    if (ob >= 0) (void)close(ob);
    if (e->claimfd >= 0) (void)close(e->claimfd);
    e->claimfd = -1;
    for (size_t i = 0; i < e->list_n; i++)
        free(e->list[i]);
    free(e->list);
    e->list = NULL;
    e->list_n = e->list_next = 0;
    e->agentfd = e->inboxfd = e->lockfd = -1;
    e->used = false;
}

static void pair_close(struct cfn_pair *p)
{
    if (p->lockfd >= 0) (void)close(p->lockfd);
    if (p->seqfd >= 0) (void)close(p->seqfd);
    p->lockfd = p->seqfd = -1;
    p->used = false;
}

static void caches_init(cfn_bus *bus)
{
    pthread_mutex_init(&bus->mu, NULL);
    for (int i = 0; i < CFN_CACHE; i++) {
        struct cfn_ent *e = &bus->ents[i];
        memset(e, 0, sizeof *e);
        e->agentfd = e->inboxfd = e->lockfd = -1;
        atomic_store(&e->outboxfd, -1);
        e->claimfd = -1;
        pthread_mutex_init(&e->gate_mu, NULL);
        pthread_mutex_init(&e->list_mu, NULL);
        struct cfn_pair *p = &bus->pairs[i];
        memset(p, 0, sizeof *p);
        p->lockfd = p->seqfd = -1;
        pthread_mutex_init(&p->mu, NULL);
    }
}

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

/* A forked child shares its parent's open file descriptions, and so its flock
 * locks: it must not use the parent's cached descriptors. Python's threads
 * do not survive fork, so nothing in the caches is in use in the child. */
void cfn_bus_fork_check(cfn_bus *bus)
{
    if (bus->pid == getpid())
        return;
    for (int i = 0; i < CFN_CACHE; i++) {
        ent_close(&bus->ents[i]);
        pair_close(&bus->pairs[i]);
    }
    caches_init(bus);
    seed_ids(bus);
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

cfn_bus *cfn_bus_open(const char *base_dir, int flags, uint32_t dir_mode, int32_t gid, cfn_err *err)
{
    cfn_bus probe = {.gid = gid};
    if (strlen(base_dir) >= sizeof(((cfn_bus *)0)->base_path)) {
        cfn_fail(err, -ENAMETOOLONG, "base folder path is too long");
        return NULL;
    }
    if ((flags & CFN_OPEN_CREATE) && mkdirs(base_dir, dir_mode, err) != 0)
        return NULL;
    int fd = open(base_dir, DIR_FLAGS);
    if (fd < 0) {
        if (errno == ELOOP || errno == ENOTDIR)
            cfn_fail(err, CFN_E_UNSAFE, "base folder %s is a symlink or not a folder; refusing it", base_dir);
        else
            cfn_fail_sys(err, "open base folder %s", base_dir);
        return NULL;
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
        cfn_fail_sys(err, "fstat base folder %s", base_dir);
        (void)close(fd);
        return NULL;
    }
    if (gid >= 0 && st.st_uid == geteuid() && st.st_gid != (gid_t)gid &&
        (fchown(fd, (uid_t)-1, (gid_t)gid) != 0 || fchmod(fd, (mode_t)dir_mode) != 0 || fstat(fd, &st) != 0)) {
        cfn_fail_sys(err, "give base folder %s to group %d", base_dir, (int)gid);
        (void)close(fd);
        return NULL;
    }
    if (!cfn_owner_ok(&probe, st.st_uid, st.st_gid, st.st_mode)) {
        cfn_fail(err, CFN_E_UNSAFE, "base folder %s belongs to uid %u, not to this user (uid %u)%s; refusing it",
                 base_dir, (unsigned)st.st_uid, (unsigned)geteuid(),
                 gid >= 0 ? " nor, unwritable by others, to CFN_GROUP" : "");
        (void)close(fd);
        return NULL;
    }
    cfn_bus *bus = calloc(1, sizeof *bus);
    if (!bus) {
        cfn_fail(err, -ENOMEM, "allocating the bus handle");
        (void)close(fd);
        return NULL;
    }
    bus->basefd = fd;
    bus->statefd = -1;
    bus->gid = gid;
    bus->file_mode = gid >= 0 ? 0660 : 0600;
    atomic_store(&bus->metrics_fd, -1);
    snprintf(bus->base_path, sizeof bus->base_path, "%s", base_dir);
    caches_init(bus);
    seed_ids(bus);
    if (cfn_region_open(bus, err) != 0) {
        (void)close(fd);
        free(bus);
        return NULL;
    }
    return bus;
}

void cfn_bus_close(cfn_bus *bus)
{
    if (!bus)
        return;
    for (int i = 0; i < CFN_CACHE; i++) {
        ent_close(&bus->ents[i]);
        pair_close(&bus->pairs[i]);
        pthread_mutex_destroy(&bus->ents[i].gate_mu);
        pthread_mutex_destroy(&bus->ents[i].list_mu);
        pthread_mutex_destroy(&bus->pairs[i].mu);
    }
    cfn_region_close(bus);
    (void)close(bus->basefd);
    pthread_mutex_destroy(&bus->mu);
    free(bus);
}

int cfn_bus_state_path(cfn_bus *bus, char *out, size_t cap)
{
    int n = snprintf(out, cap, "%s/" CFN_STATE_NAME, bus->base_path);
    return n < 0 || (size_t)n >= cap ? -ENAMETOOLONG : 0;
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

/* Opens <base>/<agent> and, when asked, its inbox and gate. */
static int ent_open(cfn_bus *bus, struct cfn_ent *e, const char *agent, bool need_inbox, cfn_err *err)
{
    e->agentfd = e->inboxfd = e->lockfd = -1;
    e->claimfd = -1;
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
                goto slot;
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
slot:
    if (cfn_slot_find(bus, agent, true, &e->slot, err) != 0) {
        int rc = err ? err->code : CFN_E_NOSLOT;
        ent_close(e);
        return rc;
    }
    snprintf(e->agent, sizeof e->agent, "%s", agent);
    return 0;
}

/* Pins the cached entry for agent, opening it on a miss. A cached entry
 * without an inbox is reopened when the caller needs one (init may have run). */
int cfn_ent_get(cfn_bus *bus, const char *agent, bool need_inbox, struct cfn_ent **out, cfn_err *err)
{
    int rc = cfn_check_agent(agent, err);
    if (rc)
        return rc;
    cfn_bus_fork_check(bus);
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
        e = calloc(1, sizeof *e);
        if (!e)
            return cfn_fail(err, -ENOMEM, "allocating a folder cache entry");
        e->dynamic = true;
        e->pins = 1;
        e->claimfd = -1;
        atomic_store(&e->outboxfd, -1);
        pthread_mutex_init(&e->gate_mu, NULL);
        pthread_mutex_init(&e->list_mu, NULL);
    }
    rc = ent_open(bus, e, agent, need_inbox, err);
    if (rc) {
        if (e->dynamic) {
            pthread_mutex_destroy(&e->gate_mu);
            pthread_mutex_destroy(&e->list_mu);
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
    int rc = cfn_check_agent(agent, err);
    if (rc)
        return rc;
    cfn_bus_fork_check(bus);
    memset(e, 0, sizeof *e);
    e->private = true;
    e->claimfd = -1;
    return ent_open(bus, e, agent, true, err);
}

void cfn_ent_close_private(struct cfn_ent *e)
{
    ent_close(e);
}

void cfn_ent_put(cfn_bus *bus, struct cfn_ent *e)
{
    if (e->dynamic) {
        ent_close(e);
        pthread_mutex_destroy(&e->gate_mu);
        pthread_mutex_destroy(&e->list_mu);
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

/* The inbox's gate, shared. flock belongs to the open file, which all threads
 * of this process share, so the first thread in takes it and the last out
 * drops it. */
int cfn_gate_shared(struct cfn_ent *e, cfn_err *err)
{
    int rc = 0;
    pthread_mutex_lock(&e->gate_mu);
    if (e->holders == 0) {
        while (flock(e->lockfd, LOCK_SH) != 0) {
            if (errno != EINTR) {
                rc = cfn_fail_sys(err, "flock(LOCK_SH) inbox/.lock of '%s'", e->agent);
                break;
            }
        }
    }
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

static int pair_open(cfn_bus *bus, struct cfn_pair *p, struct cfn_ent *from, const char *to, uint32_t dir_mode,
                     cfn_err *err)
{
    int seqdir = openat(from->agentfd, ".sequences", DIR_FLAGS);
    if (seqdir < 0 && errno == ENOENT) {
        if (mkdirat(from->agentfd, ".sequences", (mode_t)dir_mode) != 0 && errno != EEXIST)
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
 * the flock). A cached file that was deleted (its agent cleaned up) is reopened. */
int cfn_pair_get(cfn_bus *bus, struct cfn_ent *from, const char *to, uint32_t dir_mode,
                 struct cfn_pair **out, cfn_err *err)
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
    if (!fresh) {
        struct stat st;
        if (fstat(p->seqfd, &st) != 0 || st.st_nlink == 0) {
            pair_close(p);
            fresh = true;
        }
    }
    if (fresh) {
        int rc = pair_open(bus, p, from, to, dir_mode, err);
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

/* Creates <base>/<agent>/{inbox,outbox} with dir_mode (and group gid when
 * gid >= 0), refusing symlinks on the way. Idempotent. */
int cfn_init_agent(cfn_bus *bus, const char *agent, uint32_t dir_mode, int32_t gid, cfn_err *err)
{
    int rc = cfn_check_agent(agent, err);
    if (rc)
        return rc;
    cfn_bus_fork_check(bus);
    if (mkdirat(bus->basefd, agent, (mode_t)dir_mode) != 0 && errno != EEXIST)
        return cfn_fail_sys(err, "mkdir %s/%s", bus->base_path, agent);
    int afd = openat(bus->basefd, agent, DIR_FLAGS);
    if (afd < 0)
        return errno == ELOOP || errno == ENOTDIR
                   ? cfn_fail(err, CFN_E_UNSAFE, "%s/%s is a symlink or not a folder; refusing it",
                              bus->base_path, agent)
                   : cfn_fail_sys(err, "open %s/%s", bus->base_path, agent);
    static const char *const subs[] = {"inbox", "outbox"};
    for (int i = 0; i < 2 && rc == 0; i++) {
        if (mkdirat(afd, subs[i], (mode_t)dir_mode) != 0 && errno != EEXIST) {
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
        if (gid >= 0 && fchown(fd, (uid_t)-1, (gid_t)gid) != 0)
            rc = cfn_fail_sys(err, "chgrp %s/%s/%s", bus->base_path, agent, subs[i]);
        else if (gid >= 0 && fchmod(fd, (mode_t)dir_mode) != 0)
            rc = cfn_fail_sys(err, "chmod %s/%s/%s", bus->base_path, agent, subs[i]);
        (void)close(fd);
    }
    if (rc == 0 && gid >= 0) {
        if (fchown(afd, (uid_t)-1, (gid_t)gid) != 0 || fchmod(afd, (mode_t)dir_mode) != 0)
            rc = cfn_fail_sys(err, "chgrp/chmod %s/%s", bus->base_path, agent);
    }
    (void)close(afd);
    return rc;
}

/* After the agent's folder is removed: close cached descriptors and mark its
 * counter unknown, so a re-created inbox is counted afresh. */
int cfn_forget_agent(cfn_bus *bus, const char *agent, cfn_err *err)
{
    int rc = cfn_check_agent(agent, err);
    if (rc)
        return rc;
    cfn_bus_fork_check(bus);
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
    uint32_t idx;
    if (cfn_slot_find(bus, agent, false, &idx, NULL) == 0) {
        struct cfn_slot *s = &bus->slots[idx];
        atomic_store(&s->count, CFN_COUNT_UNKNOWN);
        atomic_store(&s->claimed, 0);
        cfn_slot_wake(s, INT32_MAX);
    }
    return 0;
}

int cfn_set_metrics_fd(cfn_bus *bus, int fd)
{
    atomic_store(&bus->metrics_fd, fd);
    return 0;
}
