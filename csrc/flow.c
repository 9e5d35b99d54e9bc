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

#define NS_PER_S 1000000000LL
#define DRAIN_SHIFT 40
#define DRAIN_COUNT ((UINT64_C(1) << DRAIN_SHIFT) - 1)

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
