/*
 * json.c - a strict RFC 8259 validator (UTF-8 checked, no NaN, no trailing
 * garbage, bounded nesting) that also picks out a message's top-level
 * "timestamp" and "sequence", and the string escaper used to build messages.
 */
#include "internal.h"

#include <string.h>

#define MAX_DEPTH 256

struct jp {
    const unsigned char *p, *end;
    int depth;
};

static void skip_ws(struct jp *j)
{
    while (j->p < j->end && (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r'))
        j->p++;
}

/* Length of the UTF-8 sequence at s (1..4), or 0 when it is not well formed. */
static size_t utf8_len(const unsigned char *s, const unsigned char *end)
{
    unsigned c = s[0];
    if (c < 0x80)
        return 1;
    size_t n;
    unsigned min;
    if (c >= 0xc2 && c <= 0xdf) { n = 2; min = 0x80; }
    else if (c >= 0xe0 && c <= 0xef) { n = 3; min = 0x800; }
    else if (c >= 0xf0 && c <= 0xf4) { n = 4; min = 0x10000; }
    else return 0;
    if ((size_t)(end - s) < n)
        return 0;
    unsigned cp = c & (0xff >> (n + 1));
    for (size_t i = 1; i < n; i++) {
        if ((s[i] & 0xc0) != 0x80)
            return 0;
        cp = (cp << 6) | (s[i] & 0x3f);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
        return 0;
    return n;
}

int cfn_utf8_check(const char *s, size_t n)
{
    const unsigned char *p = (const unsigned char *)s, *end = p + n;
    while (p < end) {
        size_t k = utf8_len(p, end);
        if (!k)
            return -1;
        p += k;
    }
    return 0;
}

static int hexval(unsigned c)
{
    if (c >= '0' && c <= '9') return (int)(c - '0');
    if (c >= 'a' && c <= 'f') return (int)(c - 'a' + 10);
    if (c >= 'A' && c <= 'F') return (int)(c - 'A' + 10);
    return -1;
}

/* On success start and len give the raw (still escaped) contents. */
static int parse_string(struct jp *j, const unsigned char **start, size_t *len)
{
    j->p++;  /* opening quote */
    const unsigned char *s = j->p;
    while (j->p < j->end) {
        unsigned c = *j->p;
        if (c >= 0x20 && c < 0x80 && c != '"' && c != '\\') {
            j->p++;  /* plain ASCII, the common case: no UTF-8 decoding */
            continue;
        }
        if (c == '"') {
            if (start) { *start = s; *len = (size_t)(j->p - s); }
            j->p++;
            return 0;
        }
        if (c < 0x20)
            return -1;
        if (c == '\\') {
            if (++j->p >= j->end)
                return -1;
            c = *j->p;
            if (c == 'u') {
                if (j->end - j->p < 5)
                    return -1;
                for (int i = 1; i <= 4; i++)
                    if (hexval(j->p[i]) < 0)
                        return -1;
                j->p += 5;
            } else if (strchr("\"\\/bfnrt", (int)c) && c) {
                j->p++;
            } else {
                return -1;
            }
            continue;
        }
        size_t k = utf8_len(j->p, j->end);
        if (!k)
            return -1;
        j->p += k;
    }
    return -1;
}

/* Parses a number; *ival gets its value when it is a plain integer that fits. */
static int parse_number(struct jp *j, int64_t *ival, bool *is_int)
{
    const unsigned char *p = j->p, *end = j->end;
    bool neg = false, integral = true;
    uint64_t v = 0;
    bool overflow = false;
    if (p < end && *p == '-') { neg = true; p++; }
    if (p >= end) return -1;
    if (*p == '0') {
        p++;
    } else if (*p >= '1' && *p <= '9') {
        while (p < end && *p >= '0' && *p <= '9') {
            if (v > (UINT64_MAX - 9) / 10) overflow = true;
            v = v * 10 + (uint64_t)(*p - '0');
            p++;
        }
    } else {
        return -1;
    }
    if (p < end && *p == '.') {
        integral = false;
        p++;
        if (p >= end || *p < '0' || *p > '9') return -1;
        while (p < end && *p >= '0' && *p <= '9') p++;
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        integral = false;
        p++;
        if (p < end && (*p == '+' || *p == '-')) p++;
        if (p >= end || *p < '0' || *p > '9') return -1;
        while (p < end && *p >= '0' && *p <= '9') p++;
    }
    j->p = p;
    *is_int = integral && !overflow && v <= (uint64_t)INT64_MAX;
    if (*is_int)
        *ival = neg ? -(int64_t)v : (int64_t)v;
    return 0;
}

static int parse_literal(struct jp *j, const char *word, size_t n)
{
    if ((size_t)(j->end - j->p) < n || memcmp(j->p, word, n) != 0)
        return -1;
    j->p += n;
    return 0;
}

static int parse_value(struct jp *j, int64_t *ts, int64_t *seq);

static int parse_object(struct jp *j, int64_t *ts, int64_t *seq)
{
    bool top = j->depth == 1;
    j->p++;
    skip_ws(j);
    if (j->p < j->end && *j->p == '}') { j->p++; return 0; }
    for (;;) {
        skip_ws(j);
        if (j->p >= j->end || *j->p != '"') return -1;
        const unsigned char *k;
        size_t kn;
        if (parse_string(j, &k, &kn)) return -1;
        skip_ws(j);
        if (j->p >= j->end || *j->p != ':') return -1;
        j->p++;
        skip_ws(j);
        int64_t *want = NULL;
        if (top && kn == 9 && memcmp(k, "timestamp", 9) == 0) want = ts;
        else if (top && kn == 8 && memcmp(k, "sequence", 8) == 0) want = seq;
        if (want && j->p < j->end && (*j->p == '-' || (*j->p >= '0' && *j->p <= '9'))) {
            int64_t v;
            bool is_int;
            if (parse_number(j, &v, &is_int)) return -1;
            if (is_int) *want = v;
        } else if (parse_value(j, ts, seq)) {
            return -1;
        }
        skip_ws(j);
        if (j->p >= j->end) return -1;
        if (*j->p == ',') { j->p++; continue; }
        if (*j->p == '}') { j->p++; return 0; }
        return -1;
    }
}

static int parse_array(struct jp *j, int64_t *ts, int64_t *seq)
{
    j->p++;
    skip_ws(j);
    if (j->p < j->end && *j->p == ']') { j->p++; return 0; }
    for (;;) {
        if (parse_value(j, ts, seq)) return -1;
        skip_ws(j);
        if (j->p >= j->end) return -1;
        if (*j->p == ',') { j->p++; continue; }
        if (*j->p == ']') { j->p++; return 0; }
        return -1;
    }
}

static int parse_value(struct jp *j, int64_t *ts, int64_t *seq)
{
    skip_ws(j);
    if (j->p >= j->end) return -1;
    int r;
    switch (*j->p) {
    case '{':
    case '[':
        if (++j->depth > MAX_DEPTH) return -1;
        r = *j->p == '{' ? parse_object(j, ts, seq) : parse_array(j, ts, seq);
        j->depth--;
        return r;
    case '"': return parse_string(j, NULL, NULL);
    case 't': return parse_literal(j, "true", 4);
    case 'f': return parse_literal(j, "false", 5);
    case 'n': return parse_literal(j, "null", 4);
    default: {
        int64_t v;
        bool is_int;
        return parse_number(j, &v, &is_int);
    }
    }
}

/* 0 when buf is exactly one JSON value (surrounding white space allowed).
 * ts and seq (either may be NULL) get a top-level object's integer
 * "timestamp" and "sequence" when present; they are left alone otherwise. */
int cfn_json_check(const char *buf, size_t len, int64_t *ts, int64_t *seq)
{
    int64_t dummy_ts, dummy_seq;
    struct jp j = {(const unsigned char *)buf, (const unsigned char *)buf + len, 0};
    if (parse_value(&j, ts ? ts : &dummy_ts, seq ? seq : &dummy_seq))
        return -1;
    skip_ws(&j);
    return j.p == j.end ? 0 : -1;
}

int cfn_check_json(const char *buf, size_t len, cfn_err *err)
{
    if (len == 0)
        return cfn_fail(err, CFN_E_BADJSON, "payload is empty; it must be one JSON value");
    if (cfn_json_check(buf, len, NULL, NULL)) {
        struct jp j = {(const unsigned char *)buf, (const unsigned char *)buf + len, 0};
        (void)parse_value(&j, &(int64_t){0}, &(int64_t){0});
        size_t at = (size_t)(j.p - (const unsigned char *)buf);
        return cfn_fail(err, CFN_E_BADJSON, "payload is not valid JSON (RFC 8259) near byte %zu", at);
    }
    return 0;
}

/* Writes s as the inside of a JSON string (no quotes); returns bytes written.
 * out needs room for 6 * n bytes. Input must be valid UTF-8. */
size_t cfn_json_escape(char *out, const char *s, size_t n)
{
    static const char hex[] = "0123456789abcdef";
    char *o = out;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        switch (c) {
        case '"': *o++ = '\\'; *o++ = '"'; break;
        case '\\': *o++ = '\\'; *o++ = '\\'; break;
        case '\n': *o++ = '\\'; *o++ = 'n'; break;
        case '\r': *o++ = '\\'; *o++ = 'r'; break;
        case '\t': *o++ = '\\'; *o++ = 't'; break;
        case '\b': *o++ = '\\'; *o++ = 'b'; break;
        case '\f': *o++ = '\\'; *o++ = 'f'; break;
        default:
            if (c < 0x20 || c == 0x7f) {
                memcpy(o, "\\u00", 4);
                o[4] = hex[c >> 4];
                o[5] = hex[c & 15];
                o += 6;
            } else {
                *o++ = (char)c;
            }
        }
    }
    return (size_t)(o - out);
}
