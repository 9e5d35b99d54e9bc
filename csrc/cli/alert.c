/*
 * alert.c - the inbox_overflow alert a failed backpressure send raises.
 *
 * telemetry.alert_backpressure_failure -> emit_alert, step for step: one
 * alert per cooldown per recipient, shared by every process through the
 * state file's cooldown table (with its probe for a full table); the
 * (coloured) line on stderr; one line appended to ALERT_LOG_FILE, opened
 * under the C open rule; the shared counters. Like the Python function it
 * never fails the command: whatever goes wrong, the send's own error follows.
 * tests/test_native_cli.py holds this to the Python path's lines, file and counters.
 */
#define _GNU_SOURCE
#include "cli.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static int64_t realtime_ns(void)
{
    struct timespec ts;
    if (clock_gettime(CLOCK_REALTIME, &ts) != 0)
        return 0;
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* telemetry.now_iso: 2026-11-28T10:01:55.123Z */
static void now_iso(char *out, size_t cap)
{
    int64_t ns = realtime_ns();
    time_t secs = (time_t)(ns / 1000000000LL);
    struct tm tm;
    char day[32] = "";
    if (gmtime_r(&secs, &tm))
        (void)strftime(day, sizeof day, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(out, cap, "%s.%03dZ", day, (int)(ns / 1000000 % 1000));
}

/* telemetry._colour */
static bool colour(void)
{
    const char *no = getenv("NO_COLOR"), *force = getenv("FORCE_COLOR");
    if (no && no[0])
        return false;
    if (force && force[0])
        return true;
    return isatty(STDERR_FILENO) == 1;
}

static int write_all(int fd, const char *buf, size_t len)
{
    while (len) {
        ssize_t w = write(fd, buf, len);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        buf += w;
        len -= (size_t)w;
    }
    return 0;
}

/* telemetry._cooldown_ok for a process with no local cooldowns yet */
static bool cooldown_ok(cfn_bus *bus, const char *key, size_t key_len, double cooldown_s)
{
    int64_t now = realtime_ns();
    int64_t cd = (int64_t)(cooldown_s * 1e9);  /* int(cooldown_s * 1e9) */
    int rc = cfn_cooldown_try(bus, key, key_len, now, cd);
    if (rc <= 0)
        return false;  /* cooling down, or an error (which the Python path swallows) */
    if (cd <= 0)
        return true;
    rc = cfn_cooldown_try(bus, key, key_len, now, cd);  /* did the shared table record it? */
    if (rc < 0)
        return false;
    if (rc == 0)
        (void)cfn_counter_add(bus, CFN_CTR_ALERTS_SUPPRESSED, -1);  /* the probe counted as a suppression */
    return true;  /* recorded, or the table is full and this process's (empty) cooldowns let it through */
}

void cli_alert_backpressure_failure(cfn_bus *bus, const struct cli_config *c, const char *from,
                                    const char *to, int64_t retries)
{
    long long max_size = (long long)c->ival[CLI_SET_MAX_INBOX_SIZE];
    char msg[3 * CFN_AGENT_MAX + 128], meta[3 * CFN_AGENT_MAX + 128], key[CFN_AGENT_MAX + 32];
    /* agent ids are [A-Za-z0-9._-]: nothing in these needs a JSON escape */
    snprintf(msg, sizeof msg, "Send from %s to %s failed after %lld retries: inbox full (%lld messages)", from,
             to, (long long)retries, max_size);
    snprintf(meta, sizeof meta, "{\"from\":\"%s\",\"to\":\"%s\",\"retries\":%lld,\"max_size\":%lld}", from, to,
             (long long)retries, max_size);
    int key_len = snprintf(key, sizeof key, "inbox_overflow%c%s", '\0', to);  /* type, NUL, subject ("to") */
    if (key_len < 0 || !cooldown_ok(bus, key, (size_t)key_len, c->fval[CLI_SET_ALERT_COOLDOWN_SECONDS]))
        return;
    char stamp[64];
    now_iso(stamp, sizeof stamp);
    char *line = NULL;
    int n = asprintf(&line, "{\"timestamp\":\"%s\",\"alert\":\"inbox_overflow\",\"message\":\"%s\","
                            "\"severity\":\"critical\",\"metadata\":%s}\n", stamp, msg, meta);
    if (n < 0)
        return;
    /* alerts.stderr_line: the original's line, critical in its red */
    if (colour())
        fprintf(stderr, "\033[0;31m[ALERT %s] [critical] inbox_overflow: %s\033[0m\n", stamp, msg);
    else
        fprintf(stderr, "[ALERT %s] [critical] inbox_overflow: %s\n", stamp, msg);
    cfn_err err = {0};
    int32_t gid = (int32_t)c->ival[CLI_SET_GROUP];
    int fd = cfn_log_open(c->sval[CLI_SET_ALERT_LOG_FILE], cli_file_mode(c), gid, &err);
    bool written = fd >= 0 && write_all(fd, line, (size_t)n) == 0;
    if (fd >= 0)
        (void)close(fd);  /* the line is whole or reported; nothing more to learn from close */
    free(line);
    if (!written) {
        (void)cfn_counter_add(bus, CLI_CTR_ALERT_WRITE_ERRORS, 1);
        return;
    }
    (void)cfn_counter_add(bus, CFN_CTR_ALERTS, 1);
    (void)cfn_counter_add(bus, CLI_CTR_ALERTS_INBOX_OVERFLOW, 1);
}
