/*
 * faultshim.c - an LD_PRELOAD library that makes chosen libc calls fail on
 * demand, so tests can see what the C core does when unlinkat, write or
 * linkat fail (the kernel will not fail them when asked).
 *
 * Each interposer below forwards to the next definition of its symbol
 * (dlsym(RTLD_NEXT): libc, or a sanitizer runtime preloaded before us)
 * unless the rule armed for its call family says this call fails: then it
 * sets errno and returns -1 without calling through (posix_fallocate, whose
 * contract is to return the error number, returns it instead).
 *
 * Families: a rule is armed per family, and every symbol that reaches the
 * same system call counts in it: "open" is open, open64, __open_2 and
 * __open64_2; "openat" is openat, openat64, __openat_2, __openat64_2;
 * "pwrite" is pwrite and pwrite64; "read" is read and __read_chk; "pread" is
 * pread, pread64, __pread_chk, __pread64_chk; "ftruncate", "fallocate" and
 * "posix_fallocate" take their *64 twins. The *64 and fortified names are
 * accepted as aliases when arming. Only calls through the dynamic symbol are
 * seen: libc's calls to itself (fopen, opendir/readdir, remove, ...) are not.
 *
 * Run-time API (ctypes-friendly, see tests/faults/faults_child.py):
 *   int  faultshim_arm(const char *name, long nth, int err, const char *path_substr)
 *        From now on count the family's calls (only those whose path contains
 *        path_substr, when given) and fail the nth with err: nth > 0 the nth
 *        only, nth == 0 every one, nth < 0 the -nth-th and every one after.
 *        err == 0 only counts. Re-arming a family replaces its rule and zeroes
 *        its counts. 0, or -1 with errno EINVAL / ENAMETOOLONG.
 *   int  faultshim_disarm(const char *name)   stop failing and counting one family
 *   void faultshim_disarm_all(void)
 *   long faultshim_calls(const char *name)    calls counted since it was armed (-1: unknown name)
 *   long faultshim_failed(const char *name)   calls made to fail since it was armed
 *   const char *faultshim_names(void)         the family names, comma-separated
 * Counts outlive a disarm (read them after the call under test), until the
 * family is armed again. A fork()ed child inherits the rules and counts as
 * they stand; an exec()ed one starts clean but for CFN_FAULTS.
 *
 * Path filter: a call matches when its path argument, or that path resolved
 * against its directory descriptor (readlink of /proc/self/fd/<dirfd>, or
 * /proc/self/cwd), contains path_substr; a call on a descriptor matches on
 * what /proc/self/fd/<fd> names. linkat and rename* match on either path.
 *
 * At load, CFN_FAULTS="name:nth:ERR[:path],..." arms rules (ERR a name such
 * as EIO or a number), for a CLI run as a subprocess. Such rules count from
 * the start of the process, interpreter start-up included: give them a path
 * filter. A malformed CFN_FAULTS is fatal (exit status 125), never ignored.
 *
 * Hot path: one atomic load when the family is not armed; when armed, a
 * seqlock snapshot of the rule and, for a path filter, a readlink into a
 * stack buffer. No malloc, no lock, errno preserved on calls let through.
 */
#define _GNU_SOURCE
#undef _FILE_OFFSET_BITS   /* keep off_t functions under their own names */
#undef _FORTIFY_SOURCE     /* we define the fortified entry points ourselves */

#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))

/* ---- families and rules ---------------------------------------------------- */

#define FAMILIES(X)                                                                                \
    X(open) X(openat) X(unlink) X(unlinkat) X(rename) X(renameat) X(renameat2) X(link) X(linkat)   \
    X(mkdir) X(mkdirat) X(write) X(pwrite) X(read) X(pread) X(ftruncate) X(fallocate)              \
    X(posix_fallocate) X(fsync) X(fdatasync) X(flock) X(getdents64) X(fchmod) X(fchown)

#define AS_ENUM(n) F_##n,
#define AS_NAME(n) #n,
enum fam { FAMILIES(AS_ENUM) NFAM };
static const char *const fam_names[NFAM] = {FAMILIES(AS_NAME)};

static const struct { const char *alias; enum fam fam; } aliases[] = {
    {"open64", F_open},           {"__open_2", F_open},          {"__open64_2", F_open},
    {"openat64", F_openat},       {"__openat_2", F_openat},      {"__openat64_2", F_openat},
    {"pwrite64", F_pwrite},       {"__read_chk", F_read},        {"pread64", F_pread},
    {"__pread_chk", F_pread},     {"__pread64_chk", F_pread},    {"ftruncate64", F_ftruncate},
    {"fallocate64", F_fallocate}, {"posix_fallocate64", F_posix_fallocate},
};

#define FILTER_MAX 256

struct rule {
    atomic_int active;       /* read first, alone, on every call */
    atomic_uint seq;         /* seqlock over the fields below: odd while a writer is in */
    atomic_long nth;
    atomic_int err;
    atomic_int plen;
    _Atomic char path[FILTER_MAX];
    atomic_long calls;
    atomic_long failed;
};

static struct rule rules[NFAM];
static pthread_mutex_t arm_mu = PTHREAD_MUTEX_INITIALIZER;

struct snap {
    long nth;
    int err;
    int plen;
    char path[FILTER_MAX];
};

/* A consistent copy of r's fields; false when it is not armed (or a writer
 * never let go, e.g. a signal handler interrupted arming on this thread). */
static bool snapshot(struct rule *r, struct snap *s)
{
    for (int tries = 0; tries < 10000; tries++) {
        unsigned s1 = atomic_load_explicit(&r->seq, memory_order_acquire);
        if (s1 & 1u)
            continue;
        int active = atomic_load_explicit(&r->active, memory_order_relaxed);
        s->nth = atomic_load_explicit(&r->nth, memory_order_relaxed);
        s->err = atomic_load_explicit(&r->err, memory_order_relaxed);
        int n = atomic_load_explicit(&r->plen, memory_order_relaxed);
        if (n < 0 || n >= FILTER_MAX)
            n = 0;
        for (int i = 0; i < n; i++)
            s->path[i] = atomic_load_explicit(&r->path[i], memory_order_relaxed);
        s->path[n] = '\0';
        s->plen = n;
        atomic_thread_fence(memory_order_acquire);
        if (atomic_load_explicit(&r->seq, memory_order_relaxed) == s1)
            return active != 0;
    }
    return false;
}

/* Caller holds arm_mu. */
static void rule_write(struct rule *r, bool active, long nth, int err, const char *path, size_t plen)
{
    unsigned s = atomic_load_explicit(&r->seq, memory_order_relaxed);
    atomic_store_explicit(&r->active, 0, memory_order_relaxed);
    atomic_store_explicit(&r->seq, s + 1, memory_order_relaxed);
    atomic_thread_fence(memory_order_release);
    atomic_store_explicit(&r->nth, nth, memory_order_relaxed);
    atomic_store_explicit(&r->err, err, memory_order_relaxed);
    for (size_t i = 0; i < plen; i++)
        atomic_store_explicit(&r->path[i], path[i], memory_order_relaxed);
    atomic_store_explicit(&r->plen, (int)plen, memory_order_relaxed);
    if (active) {
        atomic_store_explicit(&r->calls, 0, memory_order_relaxed);
        atomic_store_explicit(&r->failed, 0, memory_order_relaxed);
    }
    atomic_store_explicit(&r->seq, s + 2, memory_order_release);
    if (active)
        atomic_store_explicit(&r->active, 1, memory_order_release);
}

static int fam_of(const char *name)
{
    if (!name)
        return -1;
    for (int i = 0; i < NFAM; i++)
        if (strcmp(name, fam_names[i]) == 0)
            return i;
    for (size_t i = 0; i < sizeof aliases / sizeof aliases[0]; i++)
        if (strcmp(name, aliases[i].alias) == 0)
            return (int)aliases[i].fam;
    return -1;
}

/* ---- path matching (async-signal-safe: stack buffers, readlink only) ----------- */

struct target {
    int fd;            /* the descriptor, or the directory a relative path is taken from */
    const char *path;  /* NULL (or "") for a call on fd itself */
};

static bool contains(const char *hay, size_t hn, const char *needle, size_t nn)
{
    if (nn == 0)
        return true;
    for (size_t i = 0; i + nn <= hn; i++)
        if (hay[i] == needle[0] && memcmp(hay + i, needle, nn) == 0)
            return true;
    return false;
}

/* readlink of /proc/self/fd/<fd> (or /proc/self/cwd) into buf; its length, or -1. */
static ssize_t fd_path(int fd, char *buf, size_t cap)
{
    char link[40] = "/proc/self/cwd";
    if (fd != AT_FDCWD) {
        if (fd < 0)
            return -1;
        char digits[16];
        int n = 0;
        unsigned v = (unsigned)fd;
        do {
            digits[n++] = (char)('0' + v % 10);
            v /= 10;
        } while (v);
        size_t o = sizeof "/proc/self/fd/" - 1;
        memcpy(link, "/proc/self/fd/", o);
        while (n)
            link[o++] = digits[--n];
        link[o] = '\0';
    }
    ssize_t got = readlink(link, buf, cap - 1);
    if (got >= 0)
        buf[got] = '\0';
    return got;
}

static bool target_matches(const struct target *t, const char *needle, size_t nn)
{
    const char *p = t->path;
    size_t pl = p ? strlen(p) : 0;
    if (pl && contains(p, pl, needle, nn))
        return true;
    if (pl && p[0] == '/')
        return false;  /* absolute: the argument is the whole path */
    char buf[PATH_MAX];
    ssize_t n = fd_path(t->fd, buf, sizeof buf);
    if (n < 0)
        return false;
    size_t len = (size_t)n;
    if (pl && len + 1 < sizeof buf) {
        buf[len++] = '/';
        size_t room = sizeof buf - 1 - len;
        size_t k = pl < room ? pl : room;
        memcpy(buf + len, p, k);
        len += k;
        buf[len] = '\0';
    }
    return contains(buf, len, needle, nn);
}

/* true (errno set to the rule's error) when this call is to fail. */
static bool should_fail(enum fam f, const struct target *t, int nt)
{
    struct rule *r = &rules[f];
    if (!atomic_load_explicit(&r->active, memory_order_acquire))
        return false;
    int saved = errno;
    struct snap s;
    bool fail = false;
    if (!snapshot(r, &s))
        goto pass;
    if (s.plen > 0) {
        bool hit = false;
        for (int i = 0; i < nt && !hit; i++)
            hit = target_matches(&t[i], s.path, (size_t)s.plen);
        if (!hit)
            goto pass;
    }
    long n = atomic_fetch_add_explicit(&r->calls, 1, memory_order_relaxed) + 1;
    fail = s.err != 0 && (s.nth == 0 || n == s.nth || (s.nth < 0 && n >= -s.nth));
    if (fail) {
        atomic_fetch_add_explicit(&r->failed, 1, memory_order_relaxed);
        errno = s.err;
        return true;
    }
pass:
    errno = saved;
    return false;
}

#define AT(dirfd, p) {(dirfd), (p)}
#define FD(fd) {(fd), NULL}
#define CWD(p) {AT_FDCWD, (p)}
#define NT(arr) ((int)(sizeof(arr) / sizeof((arr)[0])))
#define FAIL_IF(fam, ...)                                  \
    do {                                                   \
        const struct target t_[] = {__VA_ARGS__};          \
        if (should_fail(F_##fam, t_, NT(t_)))              \
            return -1;                                     \
    } while (0)

/* ---- the next definition of each symbol ---------------------------------------- */

#define SYMBOLS(X)                                                                                   \
    X(open) X(open64) X(__open_2) X(__open64_2) X(openat) X(openat64) X(__openat_2) X(__openat64_2) \
    X(unlink) X(unlinkat) X(rename) X(renameat) X(renameat2) X(link) X(linkat) X(mkdir) X(mkdirat)   \
    X(write) X(pwrite) X(pwrite64) X(read) X(__read_chk) X(pread) X(pread64) X(__pread_chk)          \
    X(__pread64_chk) X(ftruncate) X(ftruncate64) X(fallocate) X(fallocate64) X(posix_fallocate)      \
    X(posix_fallocate64) X(fsync) X(fdatasync) X(flock) X(getdents64) X(fchmod) X(fchown)

#define AS_SLOT(n) static _Atomic(void *) next_##n;
SYMBOLS(AS_SLOT)

static void *next_sym(_Atomic(void *) *slot, const char *name)
{
    void *p = atomic_load_explicit(slot, memory_order_acquire);
    if (!p) {
        p = dlsym(RTLD_NEXT, name);
        if (p)
            atomic_store_explicit(slot, p, memory_order_release);
    }
    return p;
}

/* var: the next definition of sym, typed as sym (copied, not cast: ISO C has
 * no conversion from object to function pointer); -1/ENOSYS when none. */
#define NEXT(sym, var)                                   \
    __typeof__(&sym) var;                                \
    do {                                                 \
        void *p_ = next_sym(&next_##sym, #sym);          \
        if (!p_) {                                       \
            errno = ENOSYS;                              \
            return -1;                                   \
        }                                                \
        memcpy(&var, &p_, sizeof var);                   \
    } while (0)

/* ---- interposers --------------------------------------------------------------- */

/* glibc's fortified entry points, declared only under _FORTIFY_SOURCE */
int __open_2(const char *path, int flags);
int __open64_2(const char *path, int flags);
int __openat_2(int dirfd, const char *path, int flags);
int __openat64_2(int dirfd, const char *path, int flags);
ssize_t __read_chk(int fd, void *buf, size_t n, size_t buflen);
ssize_t __pread_chk(int fd, void *buf, size_t n, off_t off, size_t buflen);
ssize_t __pread64_chk(int fd, void *buf, size_t n, off64_t off, size_t buflen);

#define NEEDS_MODE(flags) (((flags) & O_CREAT) != 0 || ((flags) & O_TMPFILE) == O_TMPFILE)

#define VA_MODE(flags, last, mode)      \
    mode_t mode = 0;                    \
    if (NEEDS_MODE(flags)) {            \
        va_list ap;                     \
        va_start(ap, last);             \
        mode = (mode_t)va_arg(ap, int); \
        va_end(ap);                     \
    }

EXPORT int open(const char *path, int flags, ...)
{
    VA_MODE(flags, flags, mode);
    FAIL_IF(open, CWD(path));
    NEXT(open, f);
    return f(path, flags, mode);
}

EXPORT int open64(const char *path, int flags, ...)
{
    VA_MODE(flags, flags, mode);
    FAIL_IF(open, CWD(path));
    NEXT(open64, f);
    return f(path, flags, mode);
}

EXPORT int __open_2(const char *path, int flags)
{
    FAIL_IF(open, CWD(path));
    NEXT(__open_2, f);
    return f(path, flags);
}

EXPORT int __open64_2(const char *path, int flags)
{
    FAIL_IF(open, CWD(path));
    NEXT(__open64_2, f);
    return f(path, flags);
}

EXPORT int openat(int dirfd, const char *path, int flags, ...)
{
    VA_MODE(flags, flags, mode);
    FAIL_IF(openat, AT(dirfd, path));
    NEXT(openat, f);
    return f(dirfd, path, flags, mode);
}

EXPORT int openat64(int dirfd, const char *path, int flags, ...)
{
    VA_MODE(flags, flags, mode);
    FAIL_IF(openat, AT(dirfd, path));
    NEXT(openat64, f);
    return f(dirfd, path, flags, mode);
}

EXPORT int __openat_2(int dirfd, const char *path, int flags)
{
    FAIL_IF(openat, AT(dirfd, path));
    NEXT(__openat_2, f);
    return f(dirfd, path, flags);
}

EXPORT int __openat64_2(int dirfd, const char *path, int flags)
{
    FAIL_IF(openat, AT(dirfd, path));
    NEXT(__openat64_2, f);
    return f(dirfd, path, flags);
}

EXPORT int unlink(const char *path)
{
    FAIL_IF(unlink, CWD(path));
    NEXT(unlink, f);
    return f(path);
}

EXPORT int unlinkat(int dirfd, const char *path, int flags)
{
    FAIL_IF(unlinkat, AT(dirfd, path));
    NEXT(unlinkat, f);
    return f(dirfd, path, flags);
}

EXPORT int rename(const char *from, const char *to)
{
    FAIL_IF(rename, CWD(from), CWD(to));
    NEXT(rename, f);
    return f(from, to);
}

EXPORT int renameat(int fromfd, const char *from, int tofd, const char *to)
{
    FAIL_IF(renameat, AT(fromfd, from), AT(tofd, to));
    NEXT(renameat, f);
    return f(fromfd, from, tofd, to);
}

EXPORT int renameat2(int fromfd, const char *from, int tofd, const char *to, unsigned int flags)
{
    FAIL_IF(renameat2, AT(fromfd, from), AT(tofd, to));
    NEXT(renameat2, f);
    return f(fromfd, from, tofd, to, flags);
}

EXPORT int link(const char *from, const char *to)
{
    FAIL_IF(link, CWD(from), CWD(to));
    NEXT(link, f);
    return f(from, to);
}

EXPORT int linkat(int fromfd, const char *from, int tofd, const char *to, int flags)
{
    /* with AT_EMPTY_PATH and "" the source is fromfd itself: AT(fromfd, "") names it */
    FAIL_IF(linkat, AT(fromfd, from), AT(tofd, to));
    NEXT(linkat, f);
    return f(fromfd, from, tofd, to, flags);
}

EXPORT int mkdir(const char *path, mode_t mode)
{
    FAIL_IF(mkdir, CWD(path));
    NEXT(mkdir, f);
    return f(path, mode);
}

EXPORT int mkdirat(int dirfd, const char *path, mode_t mode)
{
    FAIL_IF(mkdirat, AT(dirfd, path));
    NEXT(mkdirat, f);
    return f(dirfd, path, mode);
}

EXPORT ssize_t write(int fd, const void *buf, size_t n)
{
    FAIL_IF(write, FD(fd));
    NEXT(write, f);
    return f(fd, buf, n);
}

EXPORT ssize_t pwrite(int fd, const void *buf, size_t n, off_t off)
{
    FAIL_IF(pwrite, FD(fd));
    NEXT(pwrite, f);
    return f(fd, buf, n, off);
}

EXPORT ssize_t pwrite64(int fd, const void *buf, size_t n, off64_t off)
{
    FAIL_IF(pwrite, FD(fd));
    NEXT(pwrite64, f);
    return f(fd, buf, n, off);
}

EXPORT ssize_t read(int fd, void *buf, size_t n)
{
    FAIL_IF(read, FD(fd));
    NEXT(read, f);
    return f(fd, buf, n);
}

EXPORT ssize_t __read_chk(int fd, void *buf, size_t n, size_t buflen)
{
    FAIL_IF(read, FD(fd));
    NEXT(__read_chk, f);
    return f(fd, buf, n, buflen);
}

EXPORT ssize_t pread(int fd, void *buf, size_t n, off_t off)
{
    FAIL_IF(pread, FD(fd));
    NEXT(pread, f);
    return f(fd, buf, n, off);
}

EXPORT ssize_t pread64(int fd, void *buf, size_t n, off64_t off)
{
    FAIL_IF(pread, FD(fd));
    NEXT(pread64, f);
    return f(fd, buf, n, off);
}

EXPORT ssize_t __pread_chk(int fd, void *buf, size_t n, off_t off, size_t buflen)
{
    FAIL_IF(pread, FD(fd));
    NEXT(__pread_chk, f);
    return f(fd, buf, n, off, buflen);
}

EXPORT ssize_t __pread64_chk(int fd, void *buf, size_t n, off64_t off, size_t buflen)
{
    FAIL_IF(pread, FD(fd));
    NEXT(__pread64_chk, f);
    return f(fd, buf, n, off, buflen);
}

EXPORT int ftruncate(int fd, off_t len)
{
    FAIL_IF(ftruncate, FD(fd));
    NEXT(ftruncate, f);
    return f(fd, len);
}

EXPORT int ftruncate64(int fd, off64_t len)
{
    FAIL_IF(ftruncate, FD(fd));
    NEXT(ftruncate64, f);
    return f(fd, len);
}

EXPORT int fallocate(int fd, int mode, off_t off, off_t len)
{
    FAIL_IF(fallocate, FD(fd));
    NEXT(fallocate, f);
    return f(fd, mode, off, len);
}

EXPORT int fallocate64(int fd, int mode, off64_t off, off64_t len)
{
    FAIL_IF(fallocate, FD(fd));
    NEXT(fallocate64, f);
    return f(fd, mode, off, len);
}

/* posix_fallocate reports failure by its return value, not errno */
EXPORT int posix_fallocate(int fd, off_t off, off_t len)
{
    const struct target t[] = {FD(fd)};
    if (should_fail(F_posix_fallocate, t, 1))
        return errno;
    __typeof__(&posix_fallocate) f;
    void *p = next_sym(&next_posix_fallocate, "posix_fallocate");
    if (!p)
        return ENOSYS;
    memcpy(&f, &p, sizeof f);
    return f(fd, off, len);
}

EXPORT int posix_fallocate64(int fd, off64_t off, off64_t len)
{
    const struct target t[] = {FD(fd)};
    if (should_fail(F_posix_fallocate, t, 1))
        return errno;
    __typeof__(&posix_fallocate64) f;
    void *p = next_sym(&next_posix_fallocate64, "posix_fallocate64");
    if (!p)
        return ENOSYS;
    memcpy(&f, &p, sizeof f);
    return f(fd, off, len);
}

EXPORT int fsync(int fd)
{
    FAIL_IF(fsync, FD(fd));
    NEXT(fsync, f);
    return f(fd);
}

EXPORT int fdatasync(int fd)
{
    FAIL_IF(fdatasync, FD(fd));
    NEXT(fdatasync, f);
    return f(fd);
}

EXPORT int flock(int fd, int op)
{
    FAIL_IF(flock, FD(fd));
    NEXT(flock, f);
    return f(fd, op);
}

EXPORT ssize_t getdents64(int fd, void *buf, size_t n)
{
    FAIL_IF(getdents64, FD(fd));
    NEXT(getdents64, f);
    return f(fd, buf, n);
}

EXPORT int fchmod(int fd, mode_t mode)
{
    FAIL_IF(fchmod, FD(fd));
    NEXT(fchmod, f);
    return f(fd, mode);
}

EXPORT int fchown(int fd, uid_t uid, gid_t gid)
{
    FAIL_IF(fchown, FD(fd));
    NEXT(fchown, f);
    return f(fd, uid, gid);
}

/* ---- the control API ----------------------------------------------------------- */

EXPORT int faultshim_arm(const char *name, long nth, int err, const char *path_substr)
{
    int f = fam_of(name);
    if (f < 0 || err < 0) {
        errno = EINVAL;
        return -1;
    }
    size_t plen = path_substr ? strlen(path_substr) : 0;
    if (plen >= FILTER_MAX) {
        errno = ENAMETOOLONG;
        return -1;
    }
    pthread_mutex_lock(&arm_mu);
    rule_write(&rules[f], true, nth, err, path_substr, plen);
    pthread_mutex_unlock(&arm_mu);
    return 0;
}

EXPORT int faultshim_disarm(const char *name)
{
    int f = fam_of(name);
    if (f < 0) {
        errno = EINVAL;
        return -1;
    }
    pthread_mutex_lock(&arm_mu);
    rule_write(&rules[f], false, 0, 0, "", 0);
    pthread_mutex_unlock(&arm_mu);
    return 0;
}

EXPORT void faultshim_disarm_all(void)
{
    pthread_mutex_lock(&arm_mu);
    for (int f = 0; f < NFAM; f++)
        rule_write(&rules[f], false, 0, 0, "", 0);
    pthread_mutex_unlock(&arm_mu);
}

EXPORT long faultshim_calls(const char *name)
{
    int f = fam_of(name);
    return f < 0 ? -1 : atomic_load(&rules[f].calls);
}

EXPORT long faultshim_failed(const char *name)
{
    int f = fam_of(name);
    return f < 0 ? -1 : atomic_load(&rules[f].failed);
}

EXPORT const char *faultshim_names(void)
{
    static const char all[] =
#define AS_LIST(n) "," #n
        FAMILIES(AS_LIST);
    return all + 1;
}

/* ---- CFN_FAULTS at load --------------------------------------------------------- */

static const struct { const char *name; int code; } errnos[] = {
    {"EPERM", EPERM},     {"ENOENT", ENOENT},         {"EINTR", EINTR},       {"EIO", EIO},
    {"ENXIO", ENXIO},     {"EBADF", EBADF},           {"EAGAIN", EAGAIN},     {"EWOULDBLOCK", EWOULDBLOCK},
    {"ENOMEM", ENOMEM},   {"EACCES", EACCES},         {"EFAULT", EFAULT},     {"EBUSY", EBUSY},
    {"EEXIST", EEXIST},   {"EXDEV", EXDEV},           {"ENODEV", ENODEV},     {"ENOTDIR", ENOTDIR},
    {"EISDIR", EISDIR},   {"EINVAL", EINVAL},         {"ENFILE", ENFILE},     {"EMFILE", EMFILE},
    {"ETXTBSY", ETXTBSY}, {"EFBIG", EFBIG},           {"ENOSPC", ENOSPC},     {"ESPIPE", ESPIPE},
    {"EROFS", EROFS},     {"EMLINK", EMLINK},         {"EPIPE", EPIPE},       {"ENAMETOOLONG", ENAMETOOLONG},
    {"ENOLCK", ENOLCK},   {"ENOSYS", ENOSYS},         {"ENOTEMPTY", ENOTEMPTY}, {"ELOOP", ELOOP},
    {"EOVERFLOW", EOVERFLOW}, {"EOPNOTSUPP", EOPNOTSUPP}, {"ENOTSUP", ENOTSUP}, {"ETIMEDOUT", ETIMEDOUT},
    {"ESTALE", ESTALE},   {"EDQUOT", EDQUOT},         {"ECANCELED", ECANCELED}, {"ENODATA", ENODATA},
};

static void die(const char *why, const char *entry)
{
    char msg[600];
    int n = snprintf(msg, sizeof msg, "faultshim: CFN_FAULTS: %s in \"%.400s\"\n", why, entry);
    if (n > 0)
        (void)write(2, msg, (size_t)n < sizeof msg ? (size_t)n : sizeof msg - 1);  /* nothing armed yet */
    _exit(125);
}

static int errno_of(const char *s)
{
    char *end;
    long v = strtol(s, &end, 10);
    if (*s && *end == '\0')
        return v > 0 && v < 4096 ? (int)v : -1;
    for (size_t i = 0; i < sizeof errnos / sizeof errnos[0]; i++)
        if (strcmp(s, errnos[i].name) == 0)
            return errnos[i].code;
    return -1;
}

/* name:nth:ERR[:path]; the path is the rest of the entry, colons and all */
static void arm_entry(char *entry)
{
    char whole[512];
    snprintf(whole, sizeof whole, "%s", entry);
    char *field[4] = {entry, NULL, NULL, NULL};
    for (int i = 1; i < 4; i++) {
        char *c = strchr(field[i - 1], ':');
        if (!c)
            break;
        *c = '\0';
        field[i] = c + 1;
    }
    if (!field[1] || !field[2])
        die("want name:nth:ERR[:path]", whole);
    if (fam_of(field[0]) < 0)
        die("unknown call name", whole);
    char *end;
    long nth = strtol(field[1], &end, 10);
    if (!*field[1] || *end)
        die("nth is not an integer", whole);
    int err = strcmp(field[2], "0") == 0 ? 0 : errno_of(field[2]);
    if (err < 0)
        die("unknown errno", whole);
    if (faultshim_arm(field[0], nth, err, field[3] && *field[3] ? field[3] : NULL) != 0)
        die("path filter too long", whole);
}

__attribute__((constructor)) static void faultshim_init(void)
{
#define RESOLVE(n) (void)next_sym(&next_##n, #n);
    SYMBOLS(RESOLVE)
    const char *spec = getenv("CFN_FAULTS");
    if (!spec || !*spec)
        return;
    char buf[4096];
    if (strlen(spec) >= sizeof buf)
        die("too long", "CFN_FAULTS");
    memcpy(buf, spec, strlen(spec) + 1);
    char *save = NULL;
    for (char *e = strtok_r(buf, ",", &save); e; e = strtok_r(NULL, ",", &save))
        if (*e)
            arm_entry(e);
}
