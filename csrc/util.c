/* util.c - errors, clocks, hashes, futexes, bounded lock waits, unnamed
 * files and process liveness. */
#include "internal.h"

#include <dirent.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/vfs.h>
#include <linux/magic.h>
#include <time.h>
#include <unistd.h>

static int fail_v(cfn_err *err, int code, int sys_errno, const char *fmt, va_list ap)
{
    if (err) {
        err->code = code;
        err->sys_errno = sys_errno;
        vsnprintf(err->what, sizeof err->what, fmt, ap);
    }
    return code;
}

int cfn_fail(cfn_err *err, int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fail_v(err, code, 0, fmt, ap);
    va_end(ap);
    return code;
}

/* Reports the errno of the call that just failed; returns -errno. */
int cfn_fail_sys(cfn_err *err, const char *fmt, ...)
{
    int e = errno ? errno : EIO;
    va_list ap;
    va_start(ap, fmt);
    fail_v(err, -e, e, fmt, ap);
    va_end(ap);
    return -e;
}

/* Ours, or (with CFN_GROUP) our group's and not writable by everyone. */
int cfn_owner_ok(const cfn_bus *bus, uid_t uid, gid_t gid, mode_t mode)
{
    if (uid == geteuid())
        return 1;
    return bus->gid >= 0 && gid == (gid_t)bus->gid && !(mode & S_IWOTH);
}

int64_t cfn_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int64_t cfn_mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

uint64_t cfn_hash64(const char *s, size_t n)
{
    uint64_t h = 1469598103934665603ULL;  /* FNV-1a */
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)s[i];
        h *= 1099511628211ULL;
    }
    return h ? h : 1;
}

uint32_t cfn_hash32(const char *s, size_t n)
{
    uint64_t h = cfn_hash64(s, n);
    return (uint32_t)(h ^ (h >> 32));
}

/* splitmix64 over a shared counter: thread-safe without a lock. */
uint64_t cfn_random64(cfn_bus *bus)
{
    uint64_t z = bus->id_seed + atomic_fetch_add_explicit(&bus->id_counter, 1, memory_order_relaxed)
                                    * 0x9e3779b97f4a7c15ULL;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

bool cfn_is_json_name(const char *name, size_t n)
{
    return n > 5 && name[0] != '.' && memcmp(name + n - 5, ".json", 5) == 0;
}

/* Field 22 of /proc/<pid>/stat: start time in clock ticks since boot. 0 when
 * unknown, gone, or a zombie (field 3 is Z or X: it no longer runs). */
uint64_t cfn_proc_start_ticks(pid_t pid)
{
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    (void)close(fd);
    if (n <= 0)
        return 0;
    buf[n] = '\0';
    char *p = strrchr(buf, ')');  /* the command name may hold spaces and parentheses */
    if (!p || p[1] != ' ' || p[2] == 'Z' || p[2] == 'X')
        return 0;
    /* after ") " come fields 3.. ; start time is field 22 */
    int field = 2;
    for (p++; *p && field < 22; p++)
        if (*p == ' ')
            field++;
    return strtoull(p, NULL, 10);
}

uint64_t cfn_proc_start(int32_t pid)
{
    return pid > 0 ? cfn_proc_start_ticks((pid_t)pid) : 0;
}

/* 1 alive, 0 dead, judged by pid and, when known, its start time (pids are reused). */
int cfn_pid_alive(pid_t pid, uint64_t start_ticks)
{
    if (pid <= 0)
        return 0;
    if (kill(pid, 0) != 0 && errno == ESRCH)
        return 0;
    if (start_ticks == 0)
        return 1;
    uint64_t now = cfn_proc_start_ticks(pid);
    return now == 0 || now == start_ticks;  /* unreadable /proc: assume alive */
}

/* 0 when woken or the word had changed, -ETIMEDOUT, -EINTR. The word lives in a
 * MAP_SHARED mapping, so this is a shared (not FUTEX_PRIVATE) futex. */
int cfn_futex_wait(_Atomic uint32_t *addr, uint32_t expected, int64_t timeout_ns)
{
    if (timeout_ns < 0)
        timeout_ns = 0;
    struct timespec ts = {.tv_sec = timeout_ns / 1000000000LL, .tv_nsec = timeout_ns % 1000000000LL};
    long r = syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAIT, expected, &ts, NULL, 0);
    if (r == 0 || errno == EAGAIN)
        return 0;
    return errno == EINTR ? -EINTR : -ETIMEDOUT;  /* anything else: count it as a wait that ran out */
}

void cfn_futex_wake(_Atomic uint32_t *addr, int n)
{
    (void)syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAKE, n, NULL, NULL, 0);  /* a wake that finds nobody is fine */
}

/* cfn_futex_wait, woken only by a wake whose bits meet these (FUTEX_WAIT_BITSET:
 * a line's waiters each wait on the bit of their ticket). */
int cfn_futex_wait_bits(_Atomic uint32_t *addr, uint32_t expected, int64_t timeout_ns, uint32_t bits)
{
    int64_t until = cfn_add_sat(cfn_mono_ns(), timeout_ns < 0 ? 0 : timeout_ns);
    struct timespec ts = {.tv_sec = until / 1000000000LL, .tv_nsec = until % 1000000000LL};
    long r = syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAIT_BITSET, expected, &ts, NULL, bits);
    if (r == 0 || errno == EAGAIN)
        return 0;
    return errno == EINTR ? -EINTR : -ETIMEDOUT;
}

void cfn_futex_wake_private(_Atomic uint32_t *addr)
{
    (void)syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAKE_PRIVATE, INT32_MAX, NULL, NULL, 0);
}

void cfn_futex_wake_bits(_Atomic uint32_t *addr, uint32_t bits)
{
    (void)syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAKE_BITSET, INT32_MAX, NULL, NULL, bits);
}

int cfn_write_all(int fd, const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t w = write(fd, buf, len);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        buf += w;
        len -= (size_t)w;
    }
    return 0;
}

/* a * b, or INT64_MAX when that overflows (both >= 0). */
int64_t cfn_mul_sat(int64_t a, int64_t b)
{
    int64_t r;
    return __builtin_mul_overflow(a, b, &r) ? INT64_MAX : r;
}

int64_t cfn_add_sat(int64_t a, int64_t b)
{
    int64_t r;
    return __builtin_add_overflow(a, b, &r) ? (b > 0 ? INT64_MAX : INT64_MIN) : r;
}

/* CLOCK_MONOTONIC deadline timeout_ms from now. */
int64_t cfn_deadline(int64_t timeout_ms)
{
    return cfn_add_sat(cfn_mono_ns(), cfn_mul_sat(timeout_ms, 1000000));
}

/* A /proc/locks or fdinfo "lock:" line about the file dev:ino, not a waiter's:
 * its pid (as the kernel recorded it) and whether it is exclusive. */
static bool lock_line(const char *line, dev_t dev, ino_t ino, int *pid, bool *exclusive)
{
    char mode[16];
    unsigned maj, min;
    unsigned long long i;
    if (strstr(line, "->") ||
        sscanf(line, "%*d: %*s %*s %15s %d %x:%x:%llu", mode, pid, &maj, &min, &i) != 5)
        return false;
    *exclusive = strcmp(mode, "WRITE") == 0;
    return i == (unsigned long long)ino && maj == major(dev) && min == minor(dev);
}

static bool read_comm(int pid, char *comm, size_t cap)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/comm", pid);
    int fd = pid > 0 ? open(path, O_RDONLY | O_CLOEXEC) : -1;
    if (fd < 0)
        return false;
    ssize_t n = read(fd, comm, cap - 1);
    (void)close(fd);
    if (n <= 0)
        return false;
    comm[n] = '\0';
    comm[strcspn(comm, "\n")] = '\0';
    return true;
}

/* A live process holding a lock on dev:ino, found through the "lock:" lines
 * of /proc/<pid>/fdinfo: the pid /proc/locks records is the one that took a
 * flock, which may have exited and left the open file (and the lock) to
 * another (flock(1) under a bash script). Only on a failure path. */
static int find_holder(dev_t dev, ino_t ino, bool *exclusive)
{
    DIR *procs = opendir("/proc");
    if (!procs)
        return 0;
    int found = 0;
    struct dirent *p;
    while (!found && (p = readdir(procs)) != NULL) {
        if (p->d_name[0] < '1' || p->d_name[0] > '9')
            continue;
        char path[300];
        snprintf(path, sizeof path, "/proc/%s/fdinfo", p->d_name);
        DIR *fds = opendir(path);
        if (!fds)
            continue;
        struct dirent *f;
        while (!found && (f = readdir(fds)) != NULL) {
            if (f->d_name[0] == '.')
                continue;
            char info[600], buf[1024];
            snprintf(info, sizeof info, "%s/%s", path, f->d_name);
            int fd = open(info, O_RDONLY | O_CLOEXEC);
            if (fd < 0)
                continue;
            ssize_t n = read(fd, buf, sizeof buf - 1);
            (void)close(fd);
            if (n <= 0)
                continue;
            buf[n] = '\0';
            int lpid;
            for (char *l = strstr(buf, "lock:"); l && !found; l = strstr(l + 5, "lock:"))
                if (lock_line(l + 5, dev, ino, &lpid, exclusive))
                    found = atoi(p->d_name);
        }
        (void)closedir(fds);
    }
    (void)closedir(procs);
    return found;
}

/* Names who holds a lock on fd's file: "pid 123 (bash), exclusively". Best
 * effort: "another process" when it cannot tell (a holder in another PID
 * namespace shows no pid we can look up). */
void cfn_lock_holder(int fd, char *out, size_t cap)
{
    snprintf(out, cap, "another process");
    struct stat st;
    if (fstat(fd, &st) != 0)
        return;
    FILE *f = fopen("/proc/locks", "re");
    if (!f)
        return;
    char line[256], comm[64];
    int pid = 0;
    bool exclusive = false, seen = false;
    while (!seen && fgets(line, sizeof line, f))
        seen = lock_line(strchr(line, ':') ? line : "", st.st_dev, st.st_ino, &pid, &exclusive);
    (void)fclose(f);
    if (!seen)
        return;
    const char *how = exclusive ? "exclusively" : "shared";
    if (pid > 0 && read_comm(pid, comm, sizeof comm)) {
        snprintf(out, cap, "pid %d (%s), %s", pid, comm, how);
        return;
    }
    int holder = find_holder(st.st_dev, st.st_ino, &exclusive);
    if (holder > 0 && read_comm(holder, comm, sizeof comm))
        snprintf(out, cap, "pid %d (%s), %s", holder, comm, exclusive ? "exclusively" : "shared");
    else
        snprintf(out, cap, "a process this one cannot see (another PID namespace?), %s", how);
}

/* flock(fd, op) that gives up at deadline (CLOCK_MONOTONIC ns) with
 * CFN_E_LOCKED naming the file (what: a printf format and its arguments,
 * formatted only on failure) and its holder, and returns -EINTR when a signal
 * arrives while it waits, so the caller's interpreter can run its handlers.
 * Waits by polling with a growing nap (20 us to 2 ms): the kernel has no
 * timed flock. */
#define PROBE_EVERY_NS (50LL * 1000000LL)

/* Every 50 ms of waiting, the handle's probe (Python's signals): true to stop. */
bool cfn_probe_says_stop(cfn_bus *bus, int64_t *last_ns)
{
    if (!bus || !bus->probe)
        return false;
    int64_t now = cfn_mono_ns();
    if (now - *last_ns < PROBE_EVERY_NS)
        return false;
    *last_ns = now;
    return bus->probe() != 0;
}

int cfn_flock_until(cfn_bus *bus, int fd, int op, int64_t deadline, cfn_err *err, const char *what, ...)
{
    if (flock(fd, op | LOCK_NB) == 0)
        return 0;
    int rc = 0;
    int64_t start = cfn_mono_ns(), nap = 20000, probed = start;
    for (;;) {
        if (errno != EWOULDBLOCK && errno != EINTR) {
            rc = -(errno ? errno : EIO);
            break;
        }
        int64_t now = cfn_mono_ns();
        if (now >= deadline) {
            rc = CFN_E_LOCKED;
            break;
        }
        if (nap > deadline - now)
            nap = deadline - now;
        struct timespec ts = {.tv_sec = nap / 1000000000LL, .tv_nsec = nap % 1000000000LL};
        if ((nanosleep(&ts, NULL) != 0 && errno == EINTR) || cfn_probe_says_stop(bus, &probed)) {
            rc = -EINTR;
            break;
        }
        if (flock(fd, op | LOCK_NB) == 0)
            return 0;
        if (nap < 2000000)
            nap *= 2;
    }
    char name[4400];
    va_list ap;
    va_start(ap, what);
    vsnprintf(name, sizeof name, what, ap);
    va_end(ap);
    if (rc == CFN_E_LOCKED) {
        char who[200];
        cfn_lock_holder(fd, who, sizeof who);
        return cfn_fail(err, CFN_E_LOCKED, "%.3000s is held by %s; gave up after %lld ms", name, who,
                        (long long)((cfn_mono_ns() - start) / 1000000));
    }
    if (rc == -EINTR)
        return cfn_fail(err, -EINTR, "interrupted while waiting for %.3000s", name);
    errno = -rc;
    return cfn_fail_sys(err, "flock %.3000s", name);
}

enum { LINK_UNKNOWN = 0, LINK_EMPTY_PATH = 1, LINK_PROC = 2, LINK_NONE = 3 };

/* Gives the unnamed (O_TMPFILE) file fd the name dirfd/name; never replaces
 * a file (EEXIST). linkat(AT_EMPTY_PATH) needs CAP_DAC_READ_SEARCH on older
 * kernels; the /proc/self/fd path works for everyone. The first call finds
 * out which, and remembers it in the handle. Returns 0 or -errno. */
int cfn_link_unnamed(cfn_bus *bus, int fd, int dirfd, const char *name)
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

/* Whether unnamed files work here (1), do not (0), or are not known yet (-1). */
int cfn_link_mode_unnamed(cfn_bus *bus)
{
    int mode = atomic_load_explicit(&bus->link_mode, memory_order_relaxed);
    return mode == LINK_NONE ? 0 : mode == LINK_UNKNOWN ? -1 : 1;
}

void cfn_link_mode_none(cfn_bus *bus)
{
    atomic_store(&bus->link_mode, LINK_NONE);
}

/* tmpfs (the /dev/shm of every Linux): a folder's size there is 20 bytes an entry. */
bool cfn_is_tmpfs(int fd)
{
    struct statfs sf;
    return fstatfs(fd, &sf) == 0 && sf.f_type == TMPFS_MAGIC;
}
