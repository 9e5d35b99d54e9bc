/*
 * metrics.c - metric lines in the original's JSONL format, formatted here for
 * both the C send loop and Python, and written with one write(2) each on an
 * O_APPEND descriptor, so concurrent writers never interleave or tear a line.
 */
#include "internal.h"

#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

int64_t cfn_metric_format(char *line, size_t cap, const char *name, double value, const char *unit,
                          const char *tags_json, size_t tags_len, cfn_err *err)
{
    size_t nl = strlen(name), ul = strlen(unit);
    if (nl == 0 || nl > 200 || cfn_utf8_check(name, nl) != 0)
        return cfn_fail(err, CFN_E_BADARG, "metric name must be 1 to 200 bytes of UTF-8");
    if (ul > 64 || cfn_utf8_check(unit, ul) != 0)
        return cfn_fail(err, CFN_E_BADARG, "metric unit must be at most 64 bytes of UTF-8");
    if (!isfinite(value))
        return cfn_fail(err, CFN_E_BADARG, "metric value must be a finite number");
    if (tags_len == 0) {
        tags_json = "{}";
        tags_len = 2;
    }
    struct cfn_json_info info;
    if (tags_len > 8192 || cfn_json_scan(tags_json, tags_len, CFN_JSON_PAYLOAD_DEPTH, &info) != 0 ||
        tags_json[strspn(tags_json, " \t\r\n")] != '{')
        return cfn_fail(err, CFN_E_BADARG, "metric tags must be a JSON object of at most 8 KiB");
    char num[40];
    if (value == (double)(int64_t)value && fabs(value) < 1e15)
        snprintf(num, sizeof num, "%" PRId64, (int64_t)value);
    else
        snprintf(num, sizeof num, "%.17g", value);
    if (cap < 128 + 6 * (nl + ul) + tags_len + strlen(num))
        return cfn_fail(err, -ERANGE, "metric line buffer too small");
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    char stamp[40];
    strftime(stamp, sizeof stamp, "%Y-%m-%dT%H:%M:%S", &tm);
    size_t o = (size_t)snprintf(line, cap, "{\"timestamp\":\"%s.%03ldZ\",\"metric\":\"", stamp,
                                ts.tv_nsec / 1000000);
    o += cfn_json_escape(line + o, name, nl);
    o += (size_t)snprintf(line + o, cap - o, "\",\"value\":%s,\"unit\":\"", num);
    o += cfn_json_escape(line + o, unit, ul);
    memcpy(line + o, "\",\"tags\":", 9);
    o += 9;
    memcpy(line + o, tags_json, tags_len);
    o += tags_len;
    memcpy(line + o, "}\n", 2);
    o += 2;
    return (int64_t)o;
}

int cfn_metric_emit_in(cfn_bus *bus, const char *name, double value, const char *unit, const char *tags_json,
                    size_t tags_len, cfn_err *err)
{
    int fd = atomic_load_explicit(&bus->metrics_fd, memory_order_relaxed);
    if (fd < 0)
        return 0;
    size_t cap = 256 + 6 * (strlen(name) + strlen(unit)) + tags_len;
    char small[2048];
    char *line = cap <= sizeof small ? small : malloc(cap);
    if (!line)
        return cfn_fail(err, -ENOMEM, "allocating a metric line");
    int64_t len = cfn_metric_format(line, cap, name, value, unit, tags_json, tags_len, err);
    int rc = 0;
    if (len < 0) {
        rc = (int)len;
    } else {
        /* one write on an O_APPEND descriptor: concurrent writers never interleave */
        ssize_t w = cfn_metrics_append(bus, line, (size_t)len);
        if (w < 0)
            rc = cfn_fail_sys(err, "write metrics file");
        else if (w != len)
            rc = cfn_fail(err, -EIO, "short write to metrics file (%zd of %lld bytes)", w, (long long)len);
        else
            cfn_region_counter_add(cfn_reg(bus), CFN_CTR_METRICS, 1);
    }
    if (line != small)
        free(line);
    return rc;
}
