/*
 * logfile.c - the metrics and alert files. They may sit in a folder every
 * local user writes to (/dev/shm), so each is opened under one rule: a
 * regular file of this user (or of CFN_GROUP), not writable by everyone,
 * never through a symlink, and never blocking (a FIFO planted at the path
 * must not hang a sender). METRICS_FILE is also bounded: past
 * METRICS_MAX_BYTES it is renamed <file>.1 and a fresh file started, and every
 * writer, in every process, follows the path to the new file.
 */
#include "internal.h"

#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#define LOG_WRITE_FLAGS (O_WRONLY | O_APPEND | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC)
/* opens of a log file another writer creates and rotates away meanwhile */
enum { LOG_OPEN_TRIES = 16 };
#define LOG_READ_FLAGS (O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC)
#define ROTATE_WAIT_MS 1000     /* longest wait for another process's rotation */
#define LOG_CHUNK 65536  /* most bytes per write(2); a chunk ends at a line's end */

static const char *kind_of(mode_t m)
{
    if (S_ISFIFO(m))
        return "a FIFO";
    if (S_ISCHR(m))
        return "a character device";
    if (S_ISBLK(m))
        return "a block device";
    if (S_ISSOCK(m))
        return "a socket";
    if (S_ISDIR(m))
        return "a folder";
    return "not a regular file";
}

/* Why open(2) failed, as cfn-fast reports it: the kinds of file the rule
 * refuses are CFN_E_UNSAFE, anything else the system's error. */
static int open_failed(const char *path, cfn_err *err)
{
    if (errno == ELOOP)
        return cfn_fail(err, CFN_E_UNSAFE, "%s is a symlink; refusing it", path);
    if (errno == ENXIO)  /* O_NONBLOCK|O_WRONLY on a FIFO nobody reads, or on a socket */
        return cfn_fail(err, CFN_E_UNSAFE, "%s is a FIFO or a socket, not a regular file; refusing it", path);
    if (errno == EISDIR)
        return cfn_fail(err, CFN_E_UNSAFE, "%s is a folder, not a regular file; refusing it", path);
    return cfn_fail_sys(err, "open %s", path);
}

/* The rule, on an open descriptor: fills st. */
static int check_log(int fd, const char *path, int32_t gid, struct stat *st, cfn_err *err)
{
    if (fstat(fd, st) != 0)
        return cfn_fail_sys(err, "fstat %s", path);
    if (!S_ISREG(st->st_mode))
        return cfn_fail(err, CFN_E_UNSAFE, "%s is %s, not a regular file; refusing it", path, kind_of(st->st_mode));
    if (st->st_uid != geteuid() && !(gid >= 0 && st->st_gid == (gid_t)gid))
        return cfn_fail(err, CFN_E_UNSAFE, "%s belongs to uid %u, not to this user (uid %u)%s; refusing it", path,
                        (unsigned)st->st_uid, (unsigned)geteuid(), gid >= 0 ? " nor to CFN_GROUP" : "");
    if (st->st_mode & S_IWOTH)
        return cfn_fail(err, CFN_E_UNSAFE, "%s is writable by everyone (mode %04o); refusing it", path,
                        (unsigned)(st->st_mode & 07777));
    return 0;
}

static int log_open(const char *path, uint32_t mode, int32_t gid, struct stat *st, cfn_err *err)
{
    bool created = false;
    int fd = -1;
    /* open it, or make it; another writer may make it between the two, and
     * (with METRICS_MAX_BYTES) rotate it away again before this open: retry */
    for (int tries = 0; tries < LOG_OPEN_TRIES; tries++) {
        fd = open(path, LOG_WRITE_FLAGS);
        if (fd >= 0 || errno != ENOENT)
            break;
        fd = open(path, LOG_WRITE_FLAGS | O_CREAT | O_EXCL, (mode_t)mode);
        if (fd >= 0) {
            created = true;
            break;
        }
        if (errno != EEXIST)
            break;
    }
    if (fd < 0)
        return open_failed(path, err);
    int rc = check_log(fd, path, gid, st, err);
    if (rc == 0 && created && gid >= 0) {
        /* ours to share: the group's, and the group bits the umask may have taken */
        if ((st->st_gid != (gid_t)gid && fchown(fd, (uid_t)-1, (gid_t)gid) != 0) ||
            fchmod(fd, (mode_t)mode) != 0 || fstat(fd, st) != 0)
            rc = cfn_fail_sys(err, "give %s to group %d", path, (int)gid);
    }
    if (rc != 0) {
        (void)close(fd);
        return rc;
    }
    return fd;
}

int cfn_log_open(const char *path, uint32_t mode, int32_t gid, cfn_err *err)
{
    struct stat st;
    return log_open(path, mode, gid, &st, err);
}

int cfn_log_open_read(const char *path, int32_t gid, cfn_err *err)
{
    int fd = open(path, LOG_READ_FLAGS);
    if (fd < 0)
        return errno == ENOENT ? cfn_fail_sys(err, "open %s", path) : open_failed(path, err);
    struct stat st;
    int rc = check_log(fd, path, gid, &st, err);
    if (rc != 0) {
        (void)close(fd);
        return rc;
    }
    return fd;
}

/* ---- METRICS_FILE: one writer for the send loop and for Python ---------------- */

/* bus->metrics_mu is set up on first use, not in cfn_bus_open: 0 not yet, 1 being set up, 2 ready. */
static int metrics_lock_ready(cfn_bus *bus, cfn_err *err)
{
    int state = 0;
    if (atomic_compare_exchange_strong(&bus->metrics_state, &state, 1)) {
        int e = pthread_mutex_init(&bus->metrics_mu, NULL);
        if (e != 0) {
            atomic_store(&bus->metrics_state, 0);
            errno = e;
            return cfn_fail_sys(err, "pthread_mutex_init for the metrics file");
        }
        atomic_store(&bus->metrics_state, 2);
        return 0;
    }
    while (atomic_load(&bus->metrics_state) != 2)
        (void)sched_yield();  /* a hint; the loop re-checks either way */
    return 0;
}

/* This process's id without a system call: the handle's, kept current by its
 * fork check (a page the kernel wipes in a child). */
static pid_t self_pid(cfn_bus *bus)
{
    cfn_bus_fork_check(bus);
    return bus->pid;
}

/* Under metrics_mu: opens metrics_path afresh and makes it the descriptor everyone writes to. */
static int metrics_reopen(cfn_bus *bus, struct stat *st, cfn_err *err)
{
    int fd = log_open(bus->metrics_path, bus->metrics_mode, bus->metrics_gid, st, err);
    if (fd < 0)
        return fd;
    int old = atomic_exchange(&bus->metrics_fd, fd);
    bus->metrics_dev = st->st_dev;
    bus->metrics_ino = st->st_ino;
    bus->metrics_pid = self_pid(bus);
    if (old >= 0)
        (void)close(old);  /* a descriptor on the rotated file; nothing to report */
    return 0;
}

/* Under metrics_mu, with the descriptor's file over the limit: renames it to
 * <path>.1. A non-blocking flock on the file decides which process rotates;
 * the winner checks, under the lock, that the path still names that file (a
 * process that rotated just before has started a new one), so no two
 * processes ever both rotate, and the second never renames the fresh file. */
static int metrics_rotate(cfn_bus *bus, size_t len, struct stat *st, cfn_err *err)
{
    int fd = atomic_load(&bus->metrics_fd);
    /* Another process rotating it holds the lock for a rename, unless the
     * scheduler stops it there: wait for it (briefly), then follow it to the
     * new file, rather than pile lines into the one it is moving aside. */
    int rc = cfn_flock_until(bus, fd, LOCK_EX, cfn_deadline(ROTATE_WAIT_MS), err, "%s", bus->metrics_path);
    if (rc == CFN_E_LOCKED || rc == -EINTR)
        return 0;  /* still rotating: this write lands in <path>.1, whole */
    if (rc != 0)
        return rc;
    struct stat now;
    if (lstat(bus->metrics_path, &now) != 0) {
        if (errno != ENOENT)
            rc = cfn_fail_sys(err, "lstat %s", bus->metrics_path);
    } else if (now.st_dev == bus->metrics_dev && now.st_ino == bus->metrics_ino && now.st_size > 0 &&
               (uint64_t)now.st_size + len > (uint64_t)bus->metrics_max) {
        char old[sizeof bus->metrics_path + 2];
        snprintf(old, sizeof old, "%s.1", bus->metrics_path);
        if (rename(bus->metrics_path, old) != 0)
            rc = cfn_fail_sys(err, "rotate %s to %s", bus->metrics_path, old);
    }
    if (flock(fd, LOCK_UN) != 0 && rc == 0)
        rc = cfn_fail_sys(err, "unlock %s", bus->metrics_path);
    if (rc != 0)
        return rc;
    /* rotated here, or by another process just before: either way the path names another file */
    return metrics_reopen(bus, st, err);
}

/* Under metrics_mu: makes the descriptor name the file at metrics_path (after
 * a rotation by any process, or a fork, which shares the open file and so its
 * flock) and rotates that file first when this write would take it past the limit. */
static int metrics_follow(cfn_bus *bus, size_t len, cfn_err *err)
{
    struct stat st;
    int rc;
    if (bus->metrics_pid != self_pid(bus)) {
        if ((rc = metrics_reopen(bus, &st, err)) != 0)
            return rc;
    } else if (lstat(bus->metrics_path, &st) != 0) {
        if (errno != ENOENT)
            return cfn_fail_sys(err, "lstat %s", bus->metrics_path);
        if ((rc = metrics_reopen(bus, &st, err)) != 0)  /* rotated, not yet started again: start it */
            return rc;
    } else if (st.st_dev != bus->metrics_dev || st.st_ino != bus->metrics_ino) {
        if ((rc = metrics_reopen(bus, &st, err)) != 0)
            return rc;
    }
    if (bus->metrics_max > 0 && st.st_size > 0 && (uint64_t)st.st_size + len > (uint64_t)bus->metrics_max)
        return metrics_rotate(bus, len, &st, err);
    return 0;
}

static int write_whole(int fd, const char *buf, size_t len, const char *path, cfn_err *err)
{
    while (len > 0) {
        ssize_t w = write(fd, buf, len);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return cfn_fail_sys(err, "write metrics file %s", path);
        }
        if (w == 0)
            return cfn_fail(err, -EIO, "write metrics file %s: no progress", path);
        buf += w;
        len -= (size_t)w;
    }
    return 0;
}

/* Appends whole lines; 0, or a negative code. Every write(2) holds whole
 * lines (at most LOG_CHUNK bytes unless one line is longer), on an O_APPEND
 * descriptor, so concurrent writers never tear or interleave a line. */
static int metrics_append(cfn_bus *bus, const char *data, size_t len, cfn_err *err)
{
    if (atomic_load(&bus->metrics_state) != 2) {
        /* cfn_set_metrics never ran: there is no file, or only a descriptor to write to as it is */
        int fd = atomic_load(&bus->metrics_fd);
        if (fd < 0)
            return cfn_fail(err, -EBADF, "metrics are off");
        return write_whole(fd, data, len, "(descriptor)", err);
    }
    int rc = pthread_mutex_lock(&bus->metrics_mu);
    if (rc != 0) {
        errno = rc;
        return cfn_fail_sys(err, "lock the metrics file");
    }
    rc = 0;
    while (len > 0 && rc == 0) {
        size_t n = len;
        if (n > LOG_CHUNK) {
            const char *nl = memrchr(data, '\n', LOG_CHUNK);
            if (nl)
                n = (size_t)(nl - data) + 1;
            else if ((nl = memchr(data + LOG_CHUNK, '\n', len - LOG_CHUNK)) != NULL)
                n = (size_t)(nl - data) + 1;  /* one line longer than a chunk: whole, in one write */
        }
        int fd = atomic_load(&bus->metrics_fd);
        if (fd < 0) {
            rc = cfn_fail(err, -EBADF, "metrics are off");
            break;
        }
        if (bus->metrics_path[0] != '\0' && (rc = metrics_follow(bus, n, err)) != 0)
            break;
        rc = write_whole(atomic_load(&bus->metrics_fd), data, n, bus->metrics_path, err);
        data += n;
        len -= n;
    }
    int u = pthread_mutex_unlock(&bus->metrics_mu);
    if (u != 0 && rc == 0) {
        errno = u;
        rc = cfn_fail_sys(err, "unlock the metrics file");
    }
    return rc;
}

ssize_t cfn_metrics_append(cfn_bus *bus, const char *line, size_t len)
{
    cfn_err why;
    int rc = metrics_append(bus, line, len, &why);
    if (rc == 0)
        return (ssize_t)len;
    errno = rc > -1000 ? -rc : (rc == CFN_E_UNSAFE ? EPERM : EIO);
    return -1;
}

int64_t cfn_metrics_write_in(cfn_bus *bus, const char *data, size_t len, int64_t nlines, cfn_err *err)
{
    if (atomic_load(&bus->metrics_fd) < 0)
        return 0;
    if (nlines < 0 || (len > 0 && data[len - 1] != '\n'))
        return cfn_fail(err, CFN_E_BADARG, "metric lines must be whole lines, each ending in a newline");
    int rc = metrics_append(bus, data, len, err);
    if (rc != 0)
        return rc;
    cfn_region_counter_add(cfn_reg(bus), CFN_CTR_METRICS, nlines);
    return nlines;
}

int cfn_set_metrics_in(cfn_bus *bus, const char *path, int64_t max_bytes, uint32_t mode, int32_t gid, cfn_err *err)
{
    if (max_bytes < 0)
        return cfn_fail(err, CFN_E_BADARG, "metrics file size limit must not be negative (%lld)",
                        (long long)max_bytes);
    if (path && (path[0] == '\0' || strlen(path) >= sizeof bus->metrics_path))
        return cfn_fail(err, CFN_E_BADARG, "metrics file path must be 1 to %zu bytes",
                        sizeof bus->metrics_path - 1);
    int rc = metrics_lock_ready(bus, err);
    if (rc != 0)
        return rc;
    struct stat st;
    int fd = -1;
    if (path && (fd = log_open(path, mode, gid, &st, err)) < 0)
        return fd;
    if ((rc = pthread_mutex_lock(&bus->metrics_mu)) != 0) {
        if (fd >= 0)
            (void)close(fd);
        errno = rc;
        return cfn_fail_sys(err, "lock the metrics file");
    }
    bool owned = bus->metrics_path[0] != '\0';  /* the old descriptor is ours to close */
    int old = atomic_exchange(&bus->metrics_fd, fd);
    if (path) {
        snprintf(bus->metrics_path, sizeof bus->metrics_path, "%s", path);
        bus->metrics_max = max_bytes;
        bus->metrics_mode = mode;
        bus->metrics_gid = gid;
        bus->metrics_dev = st.st_dev;
        bus->metrics_ino = st.st_ino;
        bus->metrics_pid = self_pid(bus);
    } else {
        bus->metrics_path[0] = '\0';
    }
    rc = pthread_mutex_unlock(&bus->metrics_mu);
    if (owned && old >= 0 && old != fd)
        (void)close(old);  /* the file it wrote to is complete: nothing to report */
    if (rc != 0) {
        errno = rc;
        return cfn_fail_sys(err, "unlock the metrics file");
    }
    return 0;
}

/* At close: the metrics file goes with the handle. */
void cfn_metrics_close(cfn_bus *bus)
{
    int fd = atomic_exchange(&bus->metrics_fd, -1);
    if (fd >= 0 && bus->metrics_path[0] != '\0')
        (void)close(fd);  /* ours (cfn_set_metrics opened it); its lines are complete */
    bus->metrics_path[0] = '\0';
    if (atomic_load(&bus->metrics_state) == 2) {
        (void)pthread_mutex_destroy(&bus->metrics_mu);
        atomic_store(&bus->metrics_state, 0);
    }
}
