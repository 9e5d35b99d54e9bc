/*
 * json.c - a strict RFC 8259 validator (UTF-8 checked, no NaN, no trailing
 * garbage, bounded nesting) that also picks out a message's top-level
 * "timestamp" and "sequence" and notes what a reader could not take as it
 * is, and the string escaper used to build messages.
 *
 * One scanner serves two policies. A payload at send must be something every
 * reader returns intact, so it is refused when it holds an integer longer
 * than Python converts (4,300 digits) or an unpaired UTF-16 surrogate escape.
 * A file at read (perhaps written by a bash agent) only has to be JSON; the
 * flags tell the reader which numbers need an exact decoding.
 */
#include "internal.h"

#include <locale.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct jp {
    const unsigned char *p, *start, *end;
    int depth, max_depth;
    struct cfn_json_info *info;
};

static int bad(struct jp *j, const char *why)
{
    if (!j->info->why) {
        j->info->why = why;
        j->info->err_at = (size_t)(j->p - j->start);
    }
    return -1;
}

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

static int hex4(const unsigned char *p)
{
    int v = 0;
    for (int i = 0; i < 4; i++) {
        unsigned c = p[i];
        int d = c >= '0' && c <= '9' ? (int)(c - '0')
              : c >= 'a' && c <= 'f' ? (int)(c - 'a' + 10)
              : c >= 'A' && c <= 'F' ? (int)(c - 'A' + 10) : -1;
        if (d < 0)
            return -1;
        v = v * 16 + d;
    }
    return v;
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
            return bad(j, "a control character inside a string must be escaped");
        if (c == '\\') {
            if (j->p + 1 >= j->end)
                return bad(j, "unterminated string");
            c = j->p[1];
            if (c == 'u') {
                int cp;
                if (j->end - j->p < 6 || (cp = hex4(j->p + 2)) < 0)
                    return bad(j, "\\u must be followed by four hex digits");
                j->p += 6;
                if (cp >= 0xd800 && cp <= 0xdbff) {
                    int lo = j->end - j->p >= 6 && j->p[0] == '\\' && j->p[1] == 'u' ? hex4(j->p + 2) : -1;
                    if (lo >= 0xdc00 && lo <= 0xdfff)
                        j->p += 6;  /* a surrogate pair: one character */
                    else
                        j->info->flags |= CFN_JSON_LONE_SURROGATE;
                } else if (cp >= 0xdc00 && cp <= 0xdfff) {
                    j->info->flags |= CFN_JSON_LONE_SURROGATE;
                }
            } else if (c && strchr("\"\\/bfnrt", (int)c)) {
                j->p += 2;
            } else {
                return bad(j, "invalid escape in a string");
            }
            continue;
        }
        size_t k = utf8_len(j->p, j->end);
        if (!k)
            return bad(j, "invalid UTF-8");
        j->p += k;
    }
    return bad(j, "unterminated string");
}

/* 1 when the literal s[0..n) (a valid JSON number) rounds to infinity as a
 * double. Parsed in the C locale whatever the process's locale says. */
static bool overflows_double(const unsigned char *s, size_t n)
{
    char small[128];
    char *buf = n < sizeof small ? small : malloc(n + 1);
    if (!buf)
        return true;  /* no memory to look closer: the exact decoding is always right */
    memcpy(buf, s, n);
    buf[n] = '\0';
    bool inf = true;
    locale_t c = newlocale(LC_NUMERIC_MASK, "C", (locale_t)0);
    if (c) {
        inf = isinf(strtod_l(buf, NULL, c));
        freelocale(c);
    }
    if (buf != small)
        free(buf);
    return inf;
}

/* Parses a number; *ival gets its value when it is a plain integer that fits. */
static int parse_number(struct jp *j, int64_t *ival, bool *is_int)
{
    const unsigned char *p = j->p, *end = j->end, *begin = p;
    bool neg = false, integral = true, overflow = false;
    uint64_t v = 0;
    if (p < end && *p == '-') { neg = true; p++; }
    if (p >= end)
        return bad(j, "a number must have digits");
    const unsigned char *int_start = p;
    if (*p == '0') {
        p++;
    } else if (*p >= '1' && *p <= '9') {
        while (p < end && *p >= '0' && *p <= '9') {
            if (v > (UINT64_MAX - 9) / 10) overflow = true;
            v = v * 10 + (uint64_t)(*p - '0');
            p++;
        }
    } else {
        return bad(j, "unexpected character");
    }
    size_t int_digits = (size_t)(p - int_start);
    bool int_zero = *int_start == '0';
    int64_t lead = int_zero ? INT64_MIN : (int64_t)int_digits - 1;  /* power of ten of the first nonzero digit */
    if (p < end && *p == '.') {
        integral = false;
        p++;
        if (p >= end || *p < '0' || *p > '9') {
            j->p = p;
            return bad(j, "a decimal point must be followed by digits");
        }
        for (int64_t k = 1; p < end && *p >= '0' && *p <= '9'; p++, k++)
            if (lead == INT64_MIN && *p != '0')
                lead = -k;
    }
    int64_t exp = 0;
    if (p < end && (*p == 'e' || *p == 'E')) {
        integral = false;
        p++;
        bool eneg = false;
        if (p < end && (*p == '+' || *p == '-')) eneg = *p++ == '-';
        if (p >= end || *p < '0' || *p > '9') {
            j->p = p;
            return bad(j, "an exponent must have digits");
        }
        for (; p < end && *p >= '0' && *p <= '9'; p++)
            if (exp < 1000000000)
                exp = exp * 10 + (*p - '0');
        if (eneg) exp = -exp;
    }
    j->p = p;
    if (integral && int_digits > CFN_JSON_INT_DIGITS) {
        j->info->flags |= CFN_JSON_BIG_INT;
    } else if (!integral && lead != INT64_MIN && lead + exp >= 308 &&
               (lead + exp > 308 || overflows_double(begin, (size_t)(p - begin)))) {
        j->info->flags |= CFN_JSON_HUGE_NUMBER;  /* 1e400: a double would make it infinity */
    }
    *is_int = integral && !overflow && v <= (uint64_t)INT64_MAX;
    if (*is_int)
        *ival = neg ? -(int64_t)v : (int64_t)v;
    return 0;
}

static int parse_literal(struct jp *j, const char *word, size_t n)
{
    if ((size_t)(j->end - j->p) < n || memcmp(j->p, word, n) != 0)
        return bad(j, "unexpected character");
    j->p += n;
    return 0;
}

static int parse_value(struct jp *j);

static int parse_object(struct jp *j)
{
    bool top = j->depth == 1;
    j->p++;
    skip_ws(j);
    if (j->p < j->end && *j->p == '}') { j->p++; return 0; }
    for (;;) {
        skip_ws(j);
        if (j->p >= j->end || *j->p != '"')
            return bad(j, "an object key must be a string");
        const unsigned char *k;
        size_t kn;
        if (parse_string(j, &k, &kn)) return -1;
        skip_ws(j);
        if (j->p >= j->end || *j->p != ':')
            return bad(j, "':' expected after an object key");
        j->p++;
        skip_ws(j);
        int64_t *want = NULL;
        bool *seen = NULL;
        if (top && kn == 9 && memcmp(k, "timestamp", 9) == 0) { want = &j->info->ts; seen = &j->info->has_ts; }
        else if (top && kn == 8 && memcmp(k, "sequence", 8) == 0) { want = &j->info->seq; seen = &j->info->has_seq; }
        if (want && j->p < j->end && (*j->p == '-' || (*j->p >= '0' && *j->p <= '9'))) {
            int64_t v;
            bool is_int;
            if (parse_number(j, &v, &is_int)) return -1;
            if (is_int) { *want = v; *seen = true; }
        } else if (parse_value(j)) {
            return -1;
        }
        skip_ws(j);
        if (j->p >= j->end) return bad(j, "unterminated object");
        if (*j->p == ',') { j->p++; continue; }
        if (*j->p == '}') { j->p++; return 0; }
        return bad(j, "',' or '}' expected in an object");
    }
}

static int parse_array(struct jp *j)
{
    j->p++;
    skip_ws(j);
    if (j->p < j->end && *j->p == ']') { j->p++; return 0; }
    for (;;) {
        if (parse_value(j)) return -1;
        skip_ws(j);
        if (j->p >= j->end) return bad(j, "unterminated array");
        if (*j->p == ',') { j->p++; continue; }
        if (*j->p == ']') { j->p++; return 0; }
        return bad(j, "',' or ']' expected in an array");
    }
}

static int parse_value(struct jp *j)
{
    skip_ws(j);
    if (j->p >= j->end) return bad(j, "a value is missing");
    int r;
    switch (*j->p) {
    case '{':
    case '[':
        if (++j->depth > j->max_depth) return bad(j, "nested too deep");
        r = *j->p == '{' ? parse_object(j) : parse_array(j);
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

/* 0 when buf is exactly one JSON value (surrounding white space allowed) of
 * at most max_depth nested arrays and objects; -1 otherwise, with info->why
 * and info->err_at saying what and where. info also gets a top-level object's
 * integer "timestamp" and "sequence", and the CFN_JSON_* flags. */
int cfn_json_scan(const char *buf, size_t len, int max_depth, struct cfn_json_info *info)
{
    memset(info, 0, sizeof *info);
    struct jp j = {(const unsigned char *)buf, (const unsigned char *)buf, (const unsigned char *)buf + len,
                   0, max_depth, info};
    if (parse_value(&j))
        return -1;
    skip_ws(&j);
    return j.p == j.end ? 0 : bad(&j, "unexpected data after the value");
}

/* The send policy: one JSON value every reader takes back intact. */
int cfn_check_json(const char *buf, size_t len, cfn_err *err)
{
    struct cfn_json_info info;
    if (len == 0)
        return cfn_fail(err, CFN_E_BADJSON, "payload is empty; it must be one JSON value");
    if (cfn_json_scan(buf, len, CFN_JSON_PAYLOAD_DEPTH, &info) != 0)
        return cfn_fail(err, CFN_E_BADJSON, "payload is not valid JSON (RFC 8259): %s at byte %zu%s",
                        info.why, info.err_at,
                        strcmp(info.why, "nested too deep") == 0 ? " (256 levels at most)" : "");
    if (info.flags & CFN_JSON_BIG_INT)
        return cfn_fail(err, CFN_E_BADJSON, "payload has an integer of more than %d digits, which readers "
                        "refuse (Python's int limit); send it as a string", CFN_JSON_INT_DIGITS);
    if (info.flags & CFN_JSON_LONE_SURROGATE)
        return cfn_fail(err, CFN_E_BADJSON, "payload has an unpaired UTF-16 surrogate escape (\\ud800-\\udfff "
                        "alone), which is not text; readers would fail or change it");
    return 0;
}

int cfn_json_flags(const char *buf, size_t len)
{
    struct cfn_json_info info;
    if (cfn_json_scan(buf, len, CFN_JSON_FILE_DEPTH, &info) != 0)
        return -1;
    return (int)info.flags;
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
