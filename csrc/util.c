/* util.c - errors, clocks, hashes, futexes and process liveness. */
#include "internal.h"

#include <fcntl.h>
#include <linux/futex.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
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

/* Field 22 of /proc/<pid>/stat: start time in clock ticks since boot. 0 when unknown. */
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
    if (!p)
        return 0;
    /* after ") " come fields 3.. ; start time is field 22 */
    int field = 2;
    for (p++; *p && field < 22; p++)
        if (*p == ' ')
            field++;
    return strtoull(p, NULL, 10);
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
    struct timespec ts = {.tv_sec = timeout_ns / 1000000000LL, .tv_nsec = timeout_ns % 1000000000LL};
    long r = syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAIT, expected, &ts, NULL, 0);
    if (r == 0 || errno == EAGAIN)
        return 0;
    return -errno;
}

void cfn_futex_wake(_Atomic uint32_t *addr, int n)
{
    (void)syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAKE, n, NULL, NULL, 0);  /* a wake that finds nobody is fine */
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
