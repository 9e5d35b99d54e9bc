/*
 * flow.c - the flow controls an inbox's slot carries beyond its count, each
 * shared by every process that maps the state file: how fast the inbox
 * drains (for retry_after and deadlines).
 *
 * Every field is one atomic word changed by one CAS or one fetch-add, never
 * by a read-modify-write spread over two words, so a process killed anywhere
 * leaves each word whole. Times are CLOCK_MONOTONIC, one clock for every
 * process on the machine.
 */
#include "internal.h"

#include <inttypes.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define NS_PER_S 1000000000LL
#define DRAIN_SHIFT 40
#define DRAIN_COUNT ((UINT64_C(1) << DRAIN_SHIFT) - 1)

/* A slot taken for an agent (a new one, or one freed and taken again) starts
 * with no flow state: no drain, a closed circuit, an empty line, no limit, no
 * senders. The caller holds it BUSY: no other process uses these words. */
void cfn_flow_clear(struct cfn_slot *s)
{
    atomic_store(&s->drain[0], 0);
    atomic_store(&s->drain[1], 0);
    atomic_store(&s->circuit, 0);
    atomic_store(&s->circuit_win[0], 0);
    atomic_store(&s->circuit_win[1], 0);
    atomic_store(&s->circuit_rejected, 0);
    atomic_store(&s->high_sent, 0);
    atomic_store(&s->line_gone, 0);
    atomic_store(&s->line_head, atomic_load(&s->line_next));
    atomic_store(&s->line_beat_ns, 0);
    atomic_store(&s->limit, 0);
    atomic_store(&s->limit_until_ns, 0);
    atomic_store(&s->sojourn_sum_us, 0);
    atomic_store(&s->sojourn_n, 0);
    atomic_store(&s->sojourn_us, 0);
    atomic_store(&s->adapt_ns, 0);
    for (int i = 0; i < CFN_TOP_SENDERS; i++)
        atomic_store(&s->senders[i], 0);
    atomic_store(&s->senders_window, 0);
    atomic_store(&s->arrive_waiters, 0);
}

/* ---- arrivals ----------------------------------------------------------------- */

/* A message arrived (a delivery, a claim put back): consumers waiting for one
 * wake. The fetch-add is always paid; the system call only when one waits. */
void cfn_arrived(struct cfn_slot *s)
{
    atomic_fetch_add_explicit(&s->arrive_seq, 1, memory_order_release);
    if (atomic_load_explicit(&s->arrive_waiters, memory_order_acquire) > 0)
        cfn_futex_wake(&s->arrive_seq, INT32_MAX);
}

int64_t cfn_arrivals_in(cfn_bus *bus, const char *agent, cfn_err *err)
{
    struct cfn_ent *e;
    int rc = cfn_ent_get(bus, agent, true, &e, err);
    if (rc)
        return rc;
    struct cfn_slot *s = cfn_ent_slot(bus, e, err);
    int64_t v = s ? (int64_t)atomic_load_explicit(&s->arrive_seq, memory_order_acquire)
                  : (err ? err->code : CFN_E_NOSLOT);
    cfn_ent_put(bus, e);
    return v;
}

int cfn_wait_arrival_in(cfn_bus *bus, const char *agent, uint32_t seen, int64_t timeout_ns, cfn_err *err)
{
    struct cfn_ent *e;
    int rc = cfn_ent_get(bus, agent, true, &e, err);
    if (rc)
        return rc;
    struct cfn_slot *s = cfn_ent_slot(bus, e, err);
    if (!s) {
        cfn_ent_put(bus, e);
        return err ? err->code : CFN_E_NOSLOT;
    }
    int64_t start = cfn_mono_ns(), probed = start;
    struct stat st0, st;
    bool watch = fstat(e->inboxfd, &st0) == 0;
    atomic_fetch_add(&s->arrive_waiters, 1);
    for (;;) {
        /* rc 0: something arrived; or (one fstat a slice) the folder changed: a bash
         * sender, who bumps no futex, wrote a file (or something else moved: the caller looks) */
        if (atomic_load_explicit(&s->arrive_seq, memory_order_acquire) != seen)
            break;
        if (watch && fstat(e->inboxfd, &st) == 0 &&
            (st.st_size != st0.st_size || st.st_mtim.tv_sec != st0.st_mtim.tv_sec ||
             st.st_mtim.tv_nsec != st0.st_mtim.tv_nsec))
            break;
        int64_t left = timeout_ns < 0 ? INT64_MAX : timeout_ns - (cfn_mono_ns() - start);
        if (left <= 0) {
            rc = cfn_fail(err, CFN_E_TIMEOUT, "no message arrived in the inbox of '%s' within %" PRId64 " ms",
                          agent, timeout_ns / 1000000);
            break;
        }
        int wr = cfn_futex_wait(&s->arrive_seq, seen, left < 50000000LL ? left : 50000000LL);
        if (wr == -EINTR || cfn_probe_says_stop(bus, &probed)) {
            rc = cfn_fail(err, -EINTR, "interrupted while waiting for a message in the inbox of '%s'", agent);
            break;
        }
        if (cfn_closing(bus)) {
            rc = cfn_fail(err, CFN_E_CLOSED, "the bus was closed while waiting for a message");
            break;
        }
    }
    atomic_fetch_sub(&s->arrive_waiters, 1);
    cfn_ent_put(bus, e);
    return rc;
}

/* ---- many words at once: the event loop's waiter (cfn_fast.aio) ----------------- */

#ifndef SYS_futex_waitv
#define SYS_futex_waitv 449  /* the same number on every architecture that has it */
#endif
#define WAITV_U32 0x02       /* FUTEX2_SIZE_U32 */
#define WAITV_PRIVATE 128    /* FUTEX2_PRIVATE: the control word lives in this process only */

struct cfn_waitv {           /* struct futex_waitv, spelled out for headers older than 5.16 */
    uint64_t val;
    uint64_t uaddr;
    uint32_t flags;
    uint32_t reserved;
};

static _Atomic uint32_t *word_of(struct cfn_slot *s, int kind)
{
    return kind == CFN_WORD_ARRIVAL ? &s->arrive_seq : &s->wake_seq;
}

int64_t cfn_word_in(cfn_bus *bus, const char *agent, int kind, cfn_err *err)
{
    if (kind != CFN_WORD_ROOM && kind != CFN_WORD_ARRIVAL)
        return cfn_fail(err, CFN_E_BADARG, "unknown word %d", kind);
    struct cfn_ent *e;
    int rc = cfn_ent_get(bus, agent, true, &e, err);
    if (rc)
        return rc;
    struct cfn_slot *s = cfn_ent_slot(bus, e, err);
    int64_t v = s ? (int64_t)atomic_load_explicit(word_of(s, kind), memory_order_acquire)
                  : (err ? err->code : CFN_E_NOSLOT);
    cfn_ent_put(bus, e);
    return v;
}

int cfn_wait_words_in(cfn_bus *bus, const char *names, size_t names_len, const int32_t *kinds, const uint32_t *seen,
                      int32_t n, uint32_t ctl_seen, int64_t timeout_ns, uint8_t *changed, cfn_err *err)
{
    if (n < 0 || n > CFN_WAIT_WORDS_MAX)
        return cfn_fail(err, CFN_E_BADARG, "0 to %d words at once, not %d", CFN_WAIT_WORDS_MAX, (int)n);
    struct cfn_ent *ents[CFN_WAIT_WORDS_MAX];
    struct cfn_slot *slots[CFN_WAIT_WORDS_MAX];
    uint32_t epochs[CFN_WAIT_WORDS_MAX];
    struct cfn_waitv w[CFN_WAIT_WORDS_MAX + 1];
    int rc = 0, got = 0;
    size_t at = 0;
    for (; got < n; got++) {
        const char *name = names + at;
        size_t len = at < names_len ? strnlen(name, names_len - at) : 0;
        at += len + 1;
        if (len == 0 || len > CFN_AGENT_MAX || (rc = cfn_check_agent(name, err)) != 0 ||
            (rc = cfn_ent_get(bus, name, true, &ents[got], err)) != 0) {
            rc = rc ? rc : cfn_fail(err, CFN_E_BADARG, "%d agent ids for %d words", got, (int)n);
            break;
        }
        if (!(slots[got] = cfn_ent_slot(bus, ents[got], err))) {
            rc = err ? err->code : CFN_E_NOSLOT;
            cfn_ent_put(bus, ents[got]);
            break;
        }
    }
    if (rc) {
        while (got-- > 0)
            cfn_ent_put(bus, ents[got]);
        return rc;
    }
    for (int i = 0; i < n; i++) {
        /* counted, so the wake a consumer or sender gives only when someone waits comes */
        if (kinds[i] == CFN_WORD_ARRIVAL)
            atomic_fetch_add(&slots[i]->arrive_waiters, 1);
        else
            epochs[i] = cfn_waiter_enter(slots[i]);
        w[i] = (struct cfn_waitv){.val = seen[i], .uaddr = (uint64_t)(uintptr_t)word_of(slots[i], kinds[i]),
                                  .flags = WAITV_U32};
    }
    w[n] = (struct cfn_waitv){.val = ctl_seen, .uaddr = (uint64_t)(uintptr_t)&bus->wait_ctl,
                              .flags = WAITV_U32 | WAITV_PRIVATE};
    struct timespec until;
    int64_t end = cfn_add_sat(cfn_mono_ns(), timeout_ns);
    until.tv_sec = end / 1000000000LL;
    until.tv_nsec = end % 1000000000LL;
    long r = syscall(SYS_futex_waitv, w, (unsigned)(n + 1), 0, timeout_ns >= 0 ? &until : NULL, CLOCK_MONOTONIC);
    if (r < 0 && errno == ENOSYS) {
        /* a kernel before 5.16: the first word (or the control word), in 10 ms slices */
        int64_t slice = timeout_ns >= 0 && timeout_ns < 10000000LL ? timeout_ns : 10000000LL;
        r = n > 0 ? cfn_futex_wait(word_of(slots[0], kinds[0]), seen[0], slice)
                  : cfn_futex_wait(&bus->wait_ctl, ctl_seen, slice);
        errno = r == -EINTR ? EINTR : r == -ETIMEDOUT ? ETIMEDOUT : 0;
        r = r == 0 ? 0 : -1;
    }
    int e = r < 0 ? errno : 0;
    int moved = 0;
    for (int i = 0; i < n; i++) {
        changed[i] = atomic_load_explicit(word_of(slots[i], kinds[i]), memory_order_acquire) != seen[i];
        moved += changed[i];
        if (kinds[i] == CFN_WORD_ARRIVAL)
            atomic_fetch_sub(&slots[i]->arrive_waiters, 1);
        else
            cfn_waiter_leave(slots[i], epochs[i]);
        cfn_ent_put(bus, ents[i]);
    }
    if (moved || atomic_load(&bus->wait_ctl) != ctl_seen)
        return moved;
    if (e == EINTR)
        return cfn_fail(err, -EINTR, "interrupted while waiting for %d inboxes", (int)n);
    if (e == ETIMEDOUT || (r < 0 && e == 0))
        return CFN_E_TIMEOUT;
    if (r < 0 && e != EAGAIN) {
        errno = e;
        return cfn_fail_sys(err, "futex_waitv on %d inboxes", (int)n);
    }
    return 0;
}

/* ---- drain rate --------------------------------------------------------------- */

/* n places were freed now: counted in the bucket of the current second (a
 * bucket still holding an older second starts again from n). */
void cfn_drain_add(struct cfn_slot *s, int64_t n, int64_t mono_ns)
{
    if (n <= 0)
        return;
    uint64_t sec = (uint64_t)(mono_ns / NS_PER_S) & ((UINT64_C(1) << (64 - DRAIN_SHIFT)) - 1);
    _Atomic uint64_t *b = &s->drain[sec & 1];
    uint64_t w = atomic_load_explicit(b, memory_order_relaxed);
    for (;;) {
        uint64_t next;
        if (w >> DRAIN_SHIFT == sec) {
            uint64_t c = (w & DRAIN_COUNT) + (uint64_t)n;
            next = sec << DRAIN_SHIFT | (c > DRAIN_COUNT ? DRAIN_COUNT : c);
        } else {
            next = sec << DRAIN_SHIFT | (uint64_t)n;
        }
        if (atomic_compare_exchange_weak_explicit(b, &w, next, memory_order_relaxed, memory_order_relaxed))
            return;
    }
}

/* Places freed over the last second: the current second's bucket and the
 * share of the previous one that still lies within the last second. */
int64_t cfn_drain_rate(struct cfn_slot *s, int64_t mono_ns)
{
    uint64_t mask = (UINT64_C(1) << (64 - DRAIN_SHIFT)) - 1;
    uint64_t sec = (uint64_t)(mono_ns / NS_PER_S) & mask, prev = (sec - 1) & mask;
    uint64_t cur_w = atomic_load_explicit(&s->drain[sec & 1], memory_order_relaxed);
    uint64_t prev_w = atomic_load_explicit(&s->drain[prev & 1], memory_order_relaxed);
    int64_t cur = cur_w >> DRAIN_SHIFT == sec ? (int64_t)(cur_w & DRAIN_COUNT) : 0;
    int64_t old = prev_w >> DRAIN_SHIFT == prev ? (int64_t)(prev_w & DRAIN_COUNT) : 0;
    int64_t into = mono_ns % NS_PER_S;  /* how far into the current second */
    return cur + (int64_t)((double)old * (double)(NS_PER_S - into) / (double)NS_PER_S);
}

/* When `need` more places will have been freed at the inbox's recent drain
 * rate, in ns from now; -1 when it drained nothing in the last second. */
int64_t cfn_eta_ns(struct cfn_slot *s, int64_t need, int64_t mono_ns)
{
    if (need <= 0)
        return 0;
    int64_t rate = cfn_drain_rate(s, mono_ns);
    if (rate <= 0)
        return -1;
    double eta = (double)need * (double)NS_PER_S / (double)rate;
    return eta > 9e18 ? INT64_MAX : (int64_t)eta;
}

/* ---- the priority lane --------------------------------------------------------- */

/* The places above capacity that only high-priority sends may take: pct % of
 * the capacity, rounded up (so any pct > 0 gives at least one). */
int64_t cfn_headroom(int64_t cap, int32_t pct)
{
    return pct > 0 ? (cap * pct + 99) / 100 : 0;  /* cap <= 1e9: no overflow */
}

/* ---- fair wake: the line ------------------------------------------------------- */

/* A sender that found the inbox full takes a ticket; tickets are admitted in
 * order: only the head (the ticket whose turn it is) waits for room, and a
 * newcomer may not pass anyone waiting. The head beats while it waits; one
 * that went quiet this long (killed, or stopped) loses its turn to the next. */
#define LINE_STALE_NS (250LL * 1000000LL)

uint32_t cfn_line_bit(uint32_t ticket)
{
    return UINT32_C(1) << (ticket & 31);
}

uint32_t cfn_line_join(struct cfn_slot *s, int64_t mono_ns)
{
    uint32_t t = atomic_fetch_add_explicit(&s->line_next, 1, memory_order_acq_rel);
    if (atomic_load_explicit(&s->line_head, memory_order_acquire) == t)
        atomic_store_explicit(&s->line_beat_ns, mono_ns, memory_order_relaxed);  /* first in: its turn */
    return t;
}

/* 1: ticket's turn; 0: others before it; -1: the line passed it by (it went quiet). */
int cfn_line_turn(struct cfn_slot *s, uint32_t ticket)
{
    int32_t d = (int32_t)(ticket - atomic_load_explicit(&s->line_head, memory_order_acquire));
    return d == 0 ? 1 : d > 0 ? 0 : -1;
}

/* Tickets before this one (ticket NULL: a newcomer's, all of them). */
int64_t cfn_line_ahead(struct cfn_slot *s, const uint32_t *ticket)
{
    uint32_t h = atomic_load_explicit(&s->line_head, memory_order_acquire);
    int32_t d = (int32_t)((ticket ? *ticket : atomic_load_explicit(&s->line_next, memory_order_acquire)) - h);
    return d > 0 ? d : 0;
}

void cfn_line_beat(struct cfn_slot *s, int64_t mono_ns)
{
    atomic_store_explicit(&s->line_beat_ns, mono_ns, memory_order_relaxed);
}

/* The turn goes from ticket h to the next still waiting (those that left are
 * passed over), which is woken. Nothing when someone moved the head already. */
static void line_pass(struct cfn_slot *s, uint32_t h, int64_t mono_ns)
{
    uint32_t next = h + 1, end = atomic_load_explicit(&s->line_next, memory_order_acquire);
    while (next != end && (int32_t)(end - next) > 0) {
        uint64_t bit = UINT64_C(1) << (next & 63);
        if (!(atomic_fetch_and(&s->line_gone, ~bit) & bit))
            break;
        next++;
    }
    atomic_store_explicit(&s->line_beat_ns, mono_ns, memory_order_relaxed);
    if (atomic_compare_exchange_strong(&s->line_head, &h, next))
        cfn_futex_wake_bits(&s->line_head, cfn_line_bit(next));
}

/* Everyone in the line is passed over at once (a full reconcile, which
 * forgets the sleepers it cannot tell from killed ones): the live ones wake
 * and take new tickets, in the order they wake. */
void cfn_line_reset(struct cfn_slot *s)
{
    uint32_t n = atomic_load_explicit(&s->line_next, memory_order_acquire);
    atomic_store(&s->line_gone, 0);
    atomic_store_explicit(&s->line_head, n, memory_order_release);
    cfn_futex_wake_bits(&s->line_head, UINT32_MAX);
}

/* True when nobody waits in the line, after passing over a head that went
 * quiet: a newcomer may then take room. */
bool cfn_line_clear(struct cfn_slot *s, int64_t mono_ns)
{
    uint32_t h = atomic_load_explicit(&s->line_head, memory_order_acquire);
    uint32_t n = atomic_load_explicit(&s->line_next, memory_order_acquire);
    if ((int32_t)(n - h) <= 0)
        return true;  /* empty (or a head past the end no process writes: empty too) */
    if (mono_ns - atomic_load_explicit(&s->line_beat_ns, memory_order_relaxed) > LINE_STALE_NS)
        line_pass(s, h, mono_ns);
    return false;
}

/* Ticket leaves the line (delivered, or gave up): the head passes the turn
 * on; a ticket further back is marked so the line passes over it when its
 * turn comes (one more than 63 back is passed over when it goes quiet). */
void cfn_line_leave(struct cfn_slot *s, uint32_t ticket, int64_t mono_ns)
{
    uint32_t h = atomic_load_explicit(&s->line_head, memory_order_acquire);
    int32_t ahead = (int32_t)(ticket - h);
    if (ahead == 0) {
        line_pass(s, ticket, mono_ns);
    } else if (ahead > 0 && ahead < 64) {
        uint64_t bit = UINT64_C(1) << (ticket & 63);
        atomic_fetch_or(&s->line_gone, bit);
        /* its turn came meanwhile, before anyone saw the mark: then it is its own to pass on */
        if (atomic_load_explicit(&s->line_head, memory_order_acquire) == ticket &&
            (atomic_fetch_and(&s->line_gone, ~bit) & bit))
            line_pass(s, ticket, mono_ns);
    }
}

/* ---- the adaptive limit ----------------------------------------------------------- */

/* Consumers measure each message's sojourn (its age when taken) and, once an
 * interval, move the inbox's effective limit the way Gradient2 moves a
 * concurrency limit: by the gradient target / sojourn, clamped to [0.5, 1]
 * while the sojourn is above the target, and by a queue allowance of
 * sqrt(limit) while it is not; growing only while the inbox is more than
 * half full (no reason to grow a limit nobody reaches). It never
 * goes below what the inbox drained over the last second times the target,
 * plus its square root (Little's law: what the consumers take within the
 * target, so a backlog left from before a slow-down cannot drive it to the
 * floor and starve them), nor below the floor, nor above the capacity. Normal sends reserve
 * below it while it is fresh: it lapses when its consumers stop setting it. */
#define ADAPT_EVERY_NS (100LL * 1000000LL)
#define LIMIT_LAPSE_MIN_NS (1000LL * 1000000LL)
#define LIMIT_LAPSE_MAX_NS (3600LL * 1000000000LL)

int64_t cfn_effective_limit(struct cfn_slot *s, int64_t cap)
{
    int64_t lim = atomic_load_explicit(&s->limit, memory_order_relaxed);
    if (lim <= 0 || lim >= cap)
        return cap;
    int64_t left = atomic_load_explicit(&s->limit_until_ns, memory_order_relaxed) - cfn_mono_ns();
    return left > 0 && left <= LIMIT_LAPSE_MAX_NS ? lim : cap;  /* lapsed (or absurd): the capacity */
}

/* A message's age now, from its name: our ids carry the second and, in the
 * five hex digits after the sequence, the microsecond it was sent. */
bool cfn_sojourn_of(const char *name, int64_t now_ns, int64_t *sojourn_us)
{
    if (strncmp(name, "msg-", 4) != 0)
        return false;
    const char *p = name + 4;
    int64_t sec = 0;
    int digits = 0;
    for (; *p >= '0' && *p <= '9' && digits < 12; p++, digits++)
        sec = sec * 10 + (*p - '0');
    if (digits == 0 || *p != '-')
        return false;
    p++;
    for (int i = 0; i < 10; i++)
        if (p[i] < '0' || p[i] > '9')
            return false;
    if (p[10] != '-')
        return false;
    p += 11;
    int64_t us = 0;
    for (int i = 0; i < 16; i++) {
        char c = p[i];
        int v = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
        if (v < 0)
            return false;
        if (i < 5)
            us = us * 16 + v;
    }
    if (us > 999999)
        return false;  /* not one of ours */
    int64_t age = now_ns - (sec * 1000000000LL + us * 1000);
    if (age > 86400LL * 1000000000LL)
        return false;  /* a day old: a clock that jumped, or not ours */
    *sojourn_us = age > 0 ? age / 1000 : 0;
    return true;
}

void cfn_sojourn_add(struct cfn_slot *s, int64_t sum_us, int64_t n)
{
    if (n <= 0)
        return;
    atomic_fetch_add_explicit(&s->sojourn_sum_us, sum_us, memory_order_relaxed);
    atomic_fetch_add_explicit(&s->sojourn_n, n, memory_order_relaxed);
}

static int64_t isqrt(int64_t v)
{
    int64_t r = 0;
    while ((r + 1) * (r + 1) <= v)
        r++;  /* v is a limit: at most a few thousand steps once an interval */
    return r;
}

/* Once an interval, the first consumer past its end (one CAS decides) moves the limit. */
void cfn_adapt(struct cfn_slot *s, const cfn_flow_opts *f, int64_t mono_ns)
{
    if (!f->adaptive)
        return;
    int64_t every = f->adaptive_interval_ms > 0 ? f->adaptive_interval_ms * 1000000LL : ADAPT_EVERY_NS;
    int64_t at = atomic_load_explicit(&s->adapt_ns, memory_order_relaxed);
    if (at > 0 && mono_ns - at < every && mono_ns >= at)
        return;
    if (!atomic_compare_exchange_strong(&s->adapt_ns, &at, mono_ns) || at <= 0)
        return;  /* another consumer moved it; or the first interval begins now */
    int64_t n = atomic_exchange(&s->sojourn_n, 0), sum = atomic_exchange(&s->sojourn_sum_us, 0);
    int64_t cap = atomic_load(&s->capacity);
    if (n <= 0 || sum < 0 || cap < 1 || cap > CFN_CAPACITY_MAX)
        return;
    int64_t mean = sum / n;
    atomic_store(&s->sojourn_us, mean);
    int64_t lim = cfn_effective_limit(s, cap);
    double target = (double)(f->adaptive_target_ms > 0 ? f->adaptive_target_ms : 1) * 1000.0;
    double g = mean > 0 ? target / (double)mean : 1.0;
    g = g < 0.5 ? 0.5 : g > 1.0 ? 1.0 : g;
    double next = g < 1.0 ? (double)lim * g : (double)(lim + isqrt(lim));
    if (next > (double)lim && atomic_load(&s->count) < lim / 2)
        next = (double)lim;
    int64_t drains = (int64_t)((double)cfn_drain_rate(s, mono_ns) * target / 1e6);  /* taken within the target */
    drains += isqrt(drains);  /* and an allowance, so a consumer short of it one second is not starved the next */
    if (next < (double)drains)
        next = (double)drains;
    int64_t floor = f->adaptive_floor > 0 ? f->adaptive_floor : 1, v = (int64_t)next;
    v = v < floor ? floor : v > cap ? cap : v;
    atomic_store(&s->limit, v);
    int64_t lapse = 10 * every > LIMIT_LAPSE_MIN_NS ? 10 * every : LIMIT_LAPSE_MIN_NS;
    atomic_store(&s->limit_until_ns, mono_ns + lapse);
}

int cfn_flow_get_in(cfn_bus *bus, const char *agent, cfn_flow_info *out)
{
    memset(out, 0, sizeof *out);
    struct cfn_slot *s = cfn_slot_lookup(bus, agent);
    if (!s) {
        out->count = -1;
        return 0;
    }
    int64_t c = atomic_load(&s->count), cap = atomic_load(&s->capacity), now = cfn_mono_ns();
    out->count = c < 0 ? -1 : c;
    out->capacity = cap >= 1 && cap <= CFN_CAPACITY_MAX ? cap : 0;
    int64_t lim = out->capacity ? cfn_effective_limit(s, out->capacity) : 0;
    out->limit = lim > 0 && lim < out->capacity ? lim : 0;
    out->sojourn_us = atomic_load(&s->sojourn_us);
    out->drained = cfn_drain_rate(s, now);
    out->waiting = cfn_line_ahead(s, NULL);
    out->high_sent = atomic_load(&s->high_sent);
    return 0;
}

/* ---- overload attribution: the heaviest senders -------------------------------- */

/* Each entry: key:40 | count:24. A delivery adds one to its sender's entry,
 * or (space-saving) takes the least-counted one, its count + 1. Counts are
 * halved at every window (the half-life) by the first delivery of it, and
 * when read, for the windows since: a recent flood outweighs an old one. */
#define SS_KEY_SHIFT 24
#define SS_COUNT ((UINT64_C(1) << SS_KEY_SHIFT) - 1)
#define SS_WINDOW_NS ((int64_t)CFN_SENDERS_HALF_LIFE_MS * 1000000LL)

uint64_t cfn_sender_key_of(const char *agent, size_t n)
{
    uint64_t k = cfn_hash64(agent, n) >> SS_KEY_SHIFT;  /* 40 bits */
    return k ? k : 1;
}

static uint64_t ss_halved(uint64_t w, uint64_t windows)
{
    if (windows == 0 || w == 0)
        return w;
    uint64_t c = windows >= SS_KEY_SHIFT ? 0 : (w & SS_COUNT) >> windows;
    return c ? (w & ~SS_COUNT) | c : 0;
}

void cfn_senders_add(struct cfn_slot *s, uint64_t key, int64_t mono_ns)
{
    uint64_t win = (uint64_t)(mono_ns / SS_WINDOW_NS);
    uint64_t was = atomic_load_explicit(&s->senders_window, memory_order_relaxed);
    if (was != win && atomic_compare_exchange_strong(&s->senders_window, &was, win)) {
        uint64_t gone = win > was ? win - was : SS_KEY_SHIFT;  /* the winner halves the counts */
        for (int i = 0; i < CFN_TOP_SENDERS; i++) {
            uint64_t w = atomic_load_explicit(&s->senders[i], memory_order_relaxed);
            while (!atomic_compare_exchange_weak(&s->senders[i], &w, ss_halved(w, gone)))
                ;
        }
    }
    for (int attempt = 0; attempt < 4; attempt++) {
        int least = 0;
        uint64_t least_w = UINT64_MAX;
        for (int i = 0; i < CFN_TOP_SENDERS; i++) {
            uint64_t w = atomic_load_explicit(&s->senders[i], memory_order_relaxed);
            if (w >> SS_KEY_SHIFT == key) {
                while ((w >> SS_KEY_SHIFT) == key && (w & SS_COUNT) < SS_COUNT &&
                       !atomic_compare_exchange_weak(&s->senders[i], &w, w + 1))
                    ;
                if ((w >> SS_KEY_SHIFT) == key)
                    return;
                break;  /* taken over meanwhile: look again */
            }
            if ((w & SS_COUNT) < (least_w & SS_COUNT) || least_w == UINT64_MAX) {
                least = i;
                least_w = w;
            }
        }
        uint64_t c = (least_w & SS_COUNT) + 1;
        if (atomic_compare_exchange_strong(&s->senders[least], &least_w,
                                           key << SS_KEY_SHIFT | (c > SS_COUNT ? SS_COUNT : c)))
            return;
    }
}

int cfn_senders_get_in(cfn_bus *bus, const char *agent, cfn_sender_share *out, int cap)
{
    struct cfn_slot *s = cfn_slot_lookup(bus, agent);
    if (!s || cap <= 0)
        return 0;
    uint64_t win = (uint64_t)(cfn_mono_ns() / SS_WINDOW_NS);
    uint64_t was = atomic_load_explicit(&s->senders_window, memory_order_relaxed);
    uint64_t gone = win >= was ? win - was : SS_KEY_SHIFT;
    cfn_sender_share all[CFN_TOP_SENDERS];
    int n = 0;
    for (int i = 0; i < CFN_TOP_SENDERS; i++) {
        uint64_t w = ss_halved(atomic_load_explicit(&s->senders[i], memory_order_relaxed), gone);
        if (w & SS_COUNT) {
            all[n].key = w >> SS_KEY_SHIFT;
            all[n].count = (int64_t)(w & SS_COUNT);
            n++;
        }
    }
    for (int i = 1; i < n; i++)  /* heaviest first: eight entries, an insertion sort */
        for (int j = i; j > 0 && all[j].count > all[j - 1].count; j--) {
            cfn_sender_share t = all[j];
            all[j] = all[j - 1];
            all[j - 1] = t;
        }
    if (n > cap)
        n = cap;
    memcpy(out, all, (size_t)n * sizeof *out);
    return n;
}

/* ---- circuit breaker ---------------------------------------------------------- */

/* The word: state:2 | probe limit:6 | probes:6 | failures:10 | until:40 (ms). */
#define CB_STATE(w) ((int)((w) & 3))
#define CB_LIMIT(w) ((int)(((w) >> 2) & 63))
#define CB_PROBES(w) ((int)(((w) >> 8) & 63))
#define CB_FAILS(w) ((int)(((w) >> 14) & 1023))
#define CB_MS_MASK ((UINT64_C(1) << 40) - 1)
#define CB_UNTIL(w) ((int64_t)((w) >> 24))
#define CB_FAILS_MAX 1023
#define CB_ROUND_MS 5000LL          /* cooldown and probe round of a sender that set none */
#define CB_COOLDOWN_MAX_MS 3600000LL /* the longest cooldown a setting allows */

static uint64_t cb_word(int state, int limit, int probes, int fails, int64_t until_ms)
{
    return (uint64_t)state | (uint64_t)(limit & 63) << 2 | (uint64_t)(probes & 63) << 8 |
           (uint64_t)(fails > CB_FAILS_MAX ? CB_FAILS_MAX : fails) << 14 | ((uint64_t)until_ms & CB_MS_MASK) << 24;
}

static int64_t cb_now_ms(int64_t mono_ns)
{
    return (int64_t)((uint64_t)(mono_ns / 1000000) & CB_MS_MASK);
}

/* ms until `until`, or 0 when it has passed. An until further away than any
 * cooldown can be (a tampered word, or one left by a boot before this one on
 * a state file kept on disk) has passed too: no value can refuse for ever. */
static int64_t cb_left_ms(uint64_t w, int64_t now_ms)
{
    int64_t until = CB_UNTIL(w);
    return until > now_ms && until - now_ms <= CB_COOLDOWN_MAX_MS + 1000 ? until - now_ms : 0;
}

static int64_t cb_cooldown_ms(const cfn_send_opts *o)
{
    return o->breaker_cooldown_ms > 0 ? (o->breaker_cooldown_ms < CB_COOLDOWN_MAX_MS ? o->breaker_cooldown_ms
                                                                                    : CB_COOLDOWN_MAX_MS)
                                      : CB_ROUND_MS;
}

static int cb_probe_limit(const cfn_send_opts *o)
{
    return o->breaker_probes >= 1 && o->breaker_probes <= 63 ? o->breaker_probes : 1;
}

/* Would a send be refused now? Reads the word only: the cheap first look a
 * send takes before doing anything else. */
int cfn_circuit_peek(struct cfn_slot *s, int64_t mono_ns, int64_t *retry_after_ns)
{
    uint64_t w = atomic_load_explicit(&s->circuit, memory_order_acquire);
    int st = CB_STATE(w);
    if (st != CFN_CIRCUIT_OPEN && st != CFN_CIRCUIT_HALF_OPEN)
        return CFN_ADMIT;
    int64_t left = cb_left_ms(w, cb_now_ms(mono_ns));
    if (left > 0 && (st == CFN_CIRCUIT_OPEN || CB_PROBES(w) >= CB_LIMIT(w))) {
        *retry_after_ns = left * 1000000;
        return CFN_REFUSE;
    }
    return CFN_ADMIT;
}

/* Admits a send or refuses it. Open and cooled down, the first sender moves
 * it to half-open and goes as its first probe; half-open admits probes up to
 * its limit, and starts a new round when the last one's probes went quiet
 * (killed) past the round's end. Each step is one CAS. */
int cfn_circuit_admit(struct cfn_slot *s, const cfn_send_opts *o, int64_t mono_ns, int64_t *retry_after_ns)
{
    uint64_t w = atomic_load_explicit(&s->circuit, memory_order_acquire);
    for (;;) {
        int st = CB_STATE(w);
        if (st != CFN_CIRCUIT_OPEN && st != CFN_CIRCUIT_HALF_OPEN)
            return CFN_ADMIT;
        int64_t now = cb_now_ms(mono_ns), left = cb_left_ms(w, now);
        uint64_t next;
        if (st == CFN_CIRCUIT_HALF_OPEN && left > 0 && CB_PROBES(w) < CB_LIMIT(w)) {
            next = w + (UINT64_C(1) << 8);
        } else if (left == 0) {
            int limit = CB_LIMIT(w) > 0 ? CB_LIMIT(w) : cb_probe_limit(o);
            next = cb_word(CFN_CIRCUIT_HALF_OPEN, limit, 1, 0, now + cb_cooldown_ms(o));
        } else {
            *retry_after_ns = left * 1000000;
            return CFN_REFUSE;
        }
        if (atomic_compare_exchange_weak_explicit(&s->circuit, &w, next, memory_order_acq_rel,
                                                  memory_order_acquire))
            return CFN_ADMIT_PROBE;
    }
}

#define WIN_IDX_SHIFT 40
#define WIN_FAIL_SHIFT 20
#define WIN_FIELD ((UINT64_C(1) << 20) - 1)

static int64_t win_ms(const cfn_send_opts *o)
{
    return o->breaker_window_ms > 0 ? o->breaker_window_ms : 10000;
}

/* Counts one send (and whether it failed) in the window's current bucket. */
static void win_add(struct cfn_slot *s, const cfn_send_opts *o, bool failed, int64_t mono_ns)
{
    uint64_t idx = (uint64_t)(mono_ns / 1000000 / win_ms(o)) & ((UINT64_C(1) << 24) - 1);
    _Atomic uint64_t *b = &s->circuit_win[idx & 1];
    uint64_t w = atomic_load_explicit(b, memory_order_relaxed);
    for (;;) {
        uint64_t calls = w & WIN_FIELD, fails = (w >> WIN_FAIL_SHIFT) & WIN_FIELD;
        if (w >> WIN_IDX_SHIFT != idx)
            calls = fails = 0;
        if (calls < WIN_FIELD)
            calls++;
        if (failed && fails < WIN_FIELD)
            fails++;
        uint64_t next = idx << WIN_IDX_SHIFT | fails << WIN_FAIL_SHIFT | calls;
        if (atomic_compare_exchange_weak_explicit(b, &w, next, memory_order_relaxed, memory_order_relaxed))
            return;
    }
}

/* The failure rate over the last window (the current bucket, and the share of
 * the previous one still inside it) has reached the sender's threshold. */
static bool win_trips(struct cfn_slot *s, const cfn_send_opts *o, int64_t mono_ns)
{
    if (o->breaker_rate_pct <= 0)
        return false;
    int64_t len = win_ms(o), ms = mono_ns / 1000000;
    uint64_t mask = (UINT64_C(1) << 24) - 1, idx = (uint64_t)(ms / len) & mask, prev = (idx - 1) & mask;
    double calls = 0, fails = 0, keep = (double)(len - ms % len) / (double)len;
    for (int i = 0; i < 2; i++) {
        uint64_t want = i == 0 ? idx : prev;
        uint64_t w = atomic_load_explicit(&s->circuit_win[want & 1], memory_order_relaxed);
        if (w >> WIN_IDX_SHIFT != want)
            continue;
        double share = i == 0 ? 1.0 : keep;
        calls += share * (double)(w & WIN_FIELD);
        fails += share * (double)((w >> WIN_FAIL_SHIFT) & WIN_FIELD);
    }
    int64_t min_calls = o->breaker_min_calls > 0 ? o->breaker_min_calls : 1;
    return calls >= (double)min_calls && fails * 100.0 >= (double)o->breaker_rate_pct * calls;
}

/* What a finished send tells the circuit: a success closes a half-open one
 * (and clears a closed one's failures); a failure opens a half-open one, and a
 * closed one when it is the breaker_failures-th in a row or the window's rate
 * trips. Returns 1 when this call opened it, 2 when it closed it, else 0. The
 * common case, a success on a closed circuit with no failures, reads one word. */
int cfn_circuit_record(struct cfn_slot *s, const cfn_send_opts *o, bool failed, int64_t mono_ns)
{
    if (o->breaker_rate_pct > 0)
        win_add(s, o, failed, mono_ns);
    uint64_t w = atomic_load_explicit(&s->circuit, memory_order_acquire);
    for (;;) {
        int st = CB_STATE(w);
        bool open = st == CFN_CIRCUIT_OPEN, half = st == CFN_CIRCUIT_HALF_OPEN;
        uint64_t next;
        int moved = 0;
        if (!failed) {
            if (open)
                return 0;  /* a send admitted before it opened: the probes decide */
            if (!half && w == 0)
                return 0;
            next = 0;  /* closed, no failures */
            moved = half ? 2 : 0;
        } else if (open) {
            return 0;
        } else {
            int fails = half ? 0 : CB_FAILS(w) + 1;
            bool trip = half || (o->breaker_failures > 0 && fails >= o->breaker_failures) ||
                        win_trips(s, o, mono_ns);
            next = trip ? cb_word(CFN_CIRCUIT_OPEN, cb_probe_limit(o), 0, 0,
                                  cb_now_ms(mono_ns) + cb_cooldown_ms(o))
                        : cb_word(CFN_CIRCUIT_CLOSED, 0, 0, fails, 0);
            moved = trip ? 1 : 0;
        }
        if (atomic_compare_exchange_weak_explicit(&s->circuit, &w, next, memory_order_acq_rel,
                                                  memory_order_acquire))
            return moved;
    }
}

void cfn_circuit_read(struct cfn_slot *s, int64_t mono_ns, cfn_circuit_info *out)
{
    uint64_t w = atomic_load_explicit(&s->circuit, memory_order_acquire);
    int st = CB_STATE(w);
    int64_t left = cb_left_ms(w, cb_now_ms(mono_ns));
    memset(out, 0, sizeof *out);
    out->state = st == CFN_CIRCUIT_OPEN || st == CFN_CIRCUIT_HALF_OPEN ? st : CFN_CIRCUIT_CLOSED;
    out->failures = out->state == CFN_CIRCUIT_CLOSED ? CB_FAILS(w) : 0;
    if (out->state == CFN_CIRCUIT_HALF_OPEN) {
        out->probes = CB_PROBES(w);
        out->probe_limit = CB_LIMIT(w);
    }
    out->retry_after_ns = out->state == CFN_CIRCUIT_CLOSED ? 0 : left * 1000000;
    out->rejected = atomic_load_explicit(&s->circuit_rejected, memory_order_relaxed);
}

/* Back to closed with no failures (an operator's reset); returns the state it had. */
int cfn_circuit_clear(struct cfn_slot *s)
{
    uint64_t w = atomic_exchange(&s->circuit, 0);
    atomic_store(&s->circuit_win[0], 0);
    atomic_store(&s->circuit_win[1], 0);
    int st = CB_STATE(w);
    return st == CFN_CIRCUIT_OPEN || st == CFN_CIRCUIT_HALF_OPEN ? st : CFN_CIRCUIT_CLOSED;
}

/* The agent's slot in the current mapping, or NULL when it has none (an
 * inbox never sent to nor counted: its circuit is closed). No system call,
 * nothing made: a look at the table. */
struct cfn_slot *cfn_slot_lookup(cfn_bus *bus, const char *agent)
{
    struct cfn_region *r = cfn_reg(bus);
    uint32_t idx, gen;
    return cfn_slot_find(bus, r, agent, false, &idx, &gen, NULL) == 0 ? &r->slots[idx] : NULL;
}

int cfn_circuit_get_in(cfn_bus *bus, const char *agent, cfn_circuit_info *out)
{
    struct cfn_slot *s = cfn_slot_lookup(bus, agent);
    if (s)
        cfn_circuit_read(s, cfn_mono_ns(), out);
    else
        memset(out, 0, sizeof *out);
    return 0;
}

int cfn_circuit_reset_in(cfn_bus *bus, const char *agent)
{
    struct cfn_slot *s = cfn_slot_lookup(bus, agent);
    int was = s ? cfn_circuit_clear(s) : CFN_CIRCUIT_CLOSED;
    if (was != CFN_CIRCUIT_CLOSED)
        cfn_region_counter_add(cfn_reg(bus), CFN_CTR_CIRCUIT_CLOSED, 1);
    return was;
}
