/*
 * api.c - the boundary: every function of cfn_fast.h that takes a handle
 * enters it here (so cfn_bus_close waits for it, and a call on a closed
 * handle fails with CFN_E_CLOSED instead of touching released state), and
 * every agent id is checked here, once per call, before any path is built
 * from it. The work is done by the *_in functions behind.
 */
#include "internal.h"

#include <string.h>

#define ENTER(bus, err)                                                     \
    do {                                                                    \
        if (!cfn_enter(bus))                                                \
            return cfn_fail(err, CFN_E_CLOSED, "the bus is closed");        \
    } while (0)

#define CHECK_AGENT(agent, err)                                             \
    do {                                                                    \
        int rc_ = cfn_check_agent(agent, err);                              \
        if (rc_)                                                            \
            return rc_;                                                     \
    } while (0)

int cfn_init_agent(cfn_bus *bus, const char *agent, int64_t capacity, cfn_err *err)
{
    CHECK_AGENT(agent, err);
    ENTER(bus, err);
    int rc = cfn_init_agent_in(bus, agent, capacity, err);
    cfn_leave(bus);
    return rc;
}

int cfn_forget_agent(cfn_bus *bus, const char *agent, cfn_err *err)
{
    CHECK_AGENT(agent, err);
    ENTER(bus, err);
    int rc = cfn_forget_agent_in(bus, agent, err);
    cfn_leave(bus);
    return rc;
}

int cfn_send(cfn_bus *bus, const char *from, const char *to, const char *type, size_t type_len,
             const char *payload, size_t payload_len, const cfn_send_opts *opts, cfn_send_result *res,
             cfn_err *err)
{
    const char *roles[2] = {"sender", "recipient"}, *ids[2] = {from, to};
    memset(res, 0, sizeof *res);
    for (int i = 0; i < 2; i++) {
        cfn_err why = {0};
        int rc = cfn_check_agent(ids[i], &why);
        if (rc)
            return cfn_fail(err, rc, "%s: %s", roles[i], why.what);
    }
    ENTER(bus, err);
    int rc = cfn_send_in(bus, from, to, type, type_len, payload, payload_len, opts, res, err);
    cfn_leave(bus);
    return rc;
}

int64_t cfn_next_sequence(cfn_bus *bus, const char *from, const char *to, cfn_err *err)
{
    CHECK_AGENT(from, err);
    CHECK_AGENT(to, err);
    ENTER(bus, err);
    int64_t n = cfn_next_sequence_in(bus, from, to, err);
    cfn_leave(bus);
    return n;
}

int64_t cfn_inbox_size(cfn_bus *bus, const char *agent, cfn_err *err)
{
    CHECK_AGENT(agent, err);
    ENTER(bus, err);
    int64_t n = cfn_inbox_size_in(bus, agent, err);
    cfn_leave(bus);
    return n;
}

int64_t cfn_inbox_capacity(cfn_bus *bus, const char *agent, int64_t fallback, cfn_err *err)
{
    CHECK_AGENT(agent, err);
    ENTER(bus, err);
    int64_t n = cfn_inbox_capacity_in(bus, agent, fallback, err);
    cfn_leave(bus);
    return n;
}

int64_t cfn_scan_count(cfn_bus *bus, const char *agent, const char *box, cfn_err *err)
{
    CHECK_AGENT(agent, err);
    ENTER(bus, err);
    int64_t n = cfn_scan_count_in(bus, agent, box, err);
    cfn_leave(bus);
    return n;
}

int cfn_reconcile(cfn_bus *bus, const char *agent, int force, cfn_reconcile_result *res, cfn_err *err)
{
    memset(res, 0, sizeof *res);
    CHECK_AGENT(agent, err);
    ENTER(bus, err);
    int rc = cfn_reconcile_in(bus, agent, force, res, err);
    cfn_leave(bus);
    return rc;
}

int64_t cfn_slots_snapshot(cfn_bus *bus, cfn_slot_info *out, int64_t cap)
{
    ENTER(bus, NULL);
    int64_t n = 0;
    for (int64_t i = 0; i < CFN_SLOTS && n < cap; i++)
        if (cfn_slot_info_in(bus, i, &out[n]) == 1)
            n++;
    cfn_leave(bus);
    return n;
}

int64_t cfn_slots_sweep(cfn_bus *bus, cfn_err *err)
{
    ENTER(bus, err);
    int64_t n = cfn_slots_sweep_in(bus, cfn_reg(bus));
    cfn_leave(bus);
    return n;
}

int cfn_read_messages(cfn_bus *bus, const char *agent, int mode, int64_t max, int64_t max_bytes,
                      cfn_blob *out, cfn_err *err)
{
    memset(out, 0, sizeof *out);
    CHECK_AGENT(agent, err);
    ENTER(bus, err);
    int rc = cfn_read_messages_in(bus, agent, mode, max, max_bytes, out, err);
    cfn_leave(bus);
    return rc;
}

int64_t cfn_take(cfn_bus *bus, const char *agent, int from, const char *names, size_t names_len,
                 uint8_t *taken, cfn_err *err)
{
    CHECK_AGENT(agent, err);
    ENTER(bus, err);
    int64_t n = cfn_take_in(bus, agent, from, names, names_len, taken, err);
    cfn_leave(bus);
    return n;
}

int64_t cfn_put_back(cfn_bus *bus, const char *agent, const char *names, size_t names_len, cfn_err *err)
{
    CHECK_AGENT(agent, err);
    ENTER(bus, err);
    int64_t n = cfn_put_back_in(bus, agent, names, names_len, err);
    cfn_leave(bus);
    return n;
}

int64_t cfn_quarantine(cfn_bus *bus, const char *agent, int from, const char *names, size_t names_len,
                       cfn_err *err)
{
    CHECK_AGENT(agent, err);
    ENTER(bus, err);
    int64_t n = cfn_quarantine_in(bus, agent, from, names, names_len, err);
    cfn_leave(bus);
    return n;
}

int64_t cfn_clear_inbox(cfn_bus *bus, const char *agent, cfn_err *err)
{
    CHECK_AGENT(agent, err);
    ENTER(bus, err);
    int64_t n = cfn_clear_inbox_in(bus, agent, err);
    cfn_leave(bus);
    return n;
}

int cfn_counter_add(cfn_bus *bus, int index, int64_t delta)
{
    if (index < 0 || index >= CFN_COUNTERS)
        return CFN_E_BADARG;
    ENTER(bus, NULL);
    cfn_region_counter_add(cfn_reg(bus), index, delta);
    cfn_leave(bus);
    return 0;
}

int cfn_counter_get(cfn_bus *bus, int index, int64_t *out)
{
    if (index < 0 || index >= CFN_COUNTERS)
        return CFN_E_BADARG;
    ENTER(bus, NULL);
    *out = atomic_load_explicit(&cfn_reg(bus)->hdr->counters[index], memory_order_relaxed);
    cfn_leave(bus);
    return 0;
}

int cfn_rate_publish(cfn_bus *bus, const cfn_rate_settings *s)
{
    ENTER(bus, NULL);
    cfn_region_rate_publish(cfn_reg(bus), s);
    cfn_leave(bus);
    return 0;
}

int cfn_rate_read(cfn_bus *bus, cfn_rate_settings *out)
{
    ENTER(bus, NULL);
    cfn_region_rate_read(cfn_reg(bus), out);
    cfn_leave(bus);
    return 0;
}

int cfn_cooldown_try(cfn_bus *bus, const char *key, size_t key_len, int64_t now_ns, int64_t cooldown_ns)
{
    ENTER(bus, NULL);
    int rc = cfn_region_cooldown_try(cfn_reg(bus), key, key_len, now_ns, cooldown_ns);
    cfn_leave(bus);
    return rc;
}

int cfn_set_metrics(cfn_bus *bus, const char *path, int64_t max_bytes, uint32_t mode, int32_t gid, cfn_err *err)
{
    ENTER(bus, err);
    int rc = cfn_set_metrics_in(bus, path, max_bytes, mode, gid, err);
    cfn_leave(bus);
    return rc;
}

int64_t cfn_metrics_write(cfn_bus *bus, const char *data, size_t len, int64_t nlines, cfn_err *err)
{
    ENTER(bus, err);
    int64_t n = cfn_metrics_write_in(bus, data, len, nlines, err);
    cfn_leave(bus);
    return n;
}


int cfn_circuit_get(cfn_bus *bus, const char *agent, cfn_circuit_info *out, cfn_err *err)
{
    memset(out, 0, sizeof *out);
    CHECK_AGENT(agent, err);
    ENTER(bus, err);
    int rc = cfn_circuit_get_in(bus, agent, out);
    cfn_leave(bus);
    return rc;
}

int cfn_circuit_reset(cfn_bus *bus, const char *agent, cfn_err *err)
{
    CHECK_AGENT(agent, err);
    ENTER(bus, err);
    int rc = cfn_circuit_reset_in(bus, agent);
    cfn_leave(bus);
    return rc;
}

int cfn_senders_get(cfn_bus *bus, const char *agent, cfn_sender_share *out, int cap, cfn_err *err)
{
    CHECK_AGENT(agent, err);
    ENTER(bus, err);
    int n = cfn_senders_get_in(bus, agent, out, cap);
    cfn_leave(bus);
    return n;
}

uint64_t cfn_sender_key(const char *agent)
{
    return cfn_sender_key_of(agent, strlen(agent));
}

int cfn_flow_get(cfn_bus *bus, const char *agent, cfn_flow_info *out, cfn_err *err)
{
    memset(out, 0, sizeof *out);
    CHECK_AGENT(agent, err);
    ENTER(bus, err);
    int rc = cfn_flow_get_in(bus, agent, out);
    cfn_leave(bus);
    return rc;
}

int64_t cfn_arrivals(cfn_bus *bus, const char *agent, cfn_err *err)
{
    CHECK_AGENT(agent, err);
    ENTER(bus, err);
    int64_t v = cfn_arrivals_in(bus, agent, err);
    cfn_leave(bus);
    return v;
}

int cfn_wait_arrival(cfn_bus *bus, const char *agent, uint32_t seen, int64_t timeout_ns, cfn_err *err)
{
    CHECK_AGENT(agent, err);
    ENTER(bus, err);
    int rc = cfn_wait_arrival_in(bus, agent, seen, timeout_ns, err);
    cfn_leave(bus);
    return rc;
}

int64_t cfn_word(cfn_bus *bus, const char *agent, int kind, cfn_err *err)
{
    CHECK_AGENT(agent, err);
    ENTER(bus, err);
    int64_t v = cfn_word_in(bus, agent, kind, err);
    cfn_leave(bus);
    return v;
}

uint32_t cfn_wait_ctl(cfn_bus *bus)
{
    return atomic_load_explicit(&bus->wait_ctl, memory_order_acquire);
}

/* The handle's own word, never freed before the handle: no need to enter it. */
void cfn_wait_interrupt(cfn_bus *bus)
{
    atomic_fetch_add_explicit(&bus->wait_ctl, 1, memory_order_release);
    cfn_futex_wake_private(&bus->wait_ctl);
}

int cfn_wait_words(cfn_bus *bus, const char *names, size_t names_len, const int32_t *kinds, const uint32_t *seen,
                   int32_t n, uint32_t ctl_seen, int64_t timeout_ns, uint8_t *changed, cfn_err *err)
{
    ENTER(bus, err);
    int rc = cfn_wait_words_in(bus, names, names_len, kinds, seen, n, ctl_seen, timeout_ns, changed, err);
    cfn_leave(bus);
    return rc;
}
