/*
 * pyfmt.c - the lines the Python path prints, byte for byte.
 *
 * An error reaches the user through _core.error_for (the C text, decoded
 * with errors="replace", or the class's docstring when there is none; an
 * OSError as "[Errno N] text: strerror"), then _fastpath.fail, which prints
 * "cfn-fast <command>: " and the first line of str(exc).strip(). Those
 * steps are redone here on bytes: the UTF-8 decoder replaces each maximal
 * invalid subpart with U+FFFD as Python's does, and strip() and splitlines()
 * use Python's whitespace and line-boundary characters.
 */
#define _GNU_SOURCE
#include "cli.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Length of the well-formed UTF-8 sequence at s[0..n), or 0; for a bad one,
 * *bad is the length of its maximal subpart (what one U+FFFD replaces). */
static size_t seq(const unsigned char *s, size_t n, size_t *bad)
{
    unsigned c = s[0];
    *bad = 1;
    if (c < 0x80)
        return 1;
    size_t want;
    unsigned lo = 0x80, hi = 0xbf;  /* the second byte's range */
    if (c >= 0xc2 && c <= 0xdf)
        want = 2;
    else if (c >= 0xe0 && c <= 0xef) {
        want = 3;
        if (c == 0xe0)
            lo = 0xa0;
        else if (c == 0xed)
            hi = 0x9f;  /* no surrogates */
    } else if (c >= 0xf0 && c <= 0xf4) {
        want = 4;
        if (c == 0xf0)
            lo = 0x90;
        else if (c == 0xf4)
            hi = 0x8f;
    } else {
        return 0;
    }
    size_t i = 1;
    for (; i < want && i < n; i++) {
        unsigned b = s[i];
        if (i == 1 ? (b < lo || b > hi) : (b & 0xc0) != 0x80)
            break;
    }
    if (i == want)
        return want;
    *bad = i;
    return 0;
}

bool cli_utf8_valid(const char *s, size_t n)
{
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0, bad;
    while (i < n) {
        size_t k = seq(p + i, n - i, &bad);
        if (!k)
            return false;
        i += k;
    }
    return true;
}

char *cli_utf8_replace(const char *s)
{
    size_t n = strlen(s), i = 0, o = 0, bad;
    char *out = malloc(3 * n + 1);  /* a replaced byte becomes at most three */
    if (!out)
        return NULL;
    const unsigned char *p = (const unsigned char *)s;
    while (i < n) {
        size_t k = seq(p + i, n - i, &bad);
        if (k) {
            memcpy(out + o, p + i, k);
            o += k;
            i += k;
        } else {
            memcpy(out + o, "\xef\xbf\xbd", 3);
            o += 3;
            i += bad;
        }
    }
    out[o] = '\0';
    return out;
}

/* The code point at s (valid UTF-8) and its length. */
static uint32_t code_point(const unsigned char *s, size_t *len)
{
    if (s[0] < 0x80) {
        *len = 1;
        return s[0];
    }
    size_t n = s[0] >= 0xf0 ? 4 : s[0] >= 0xe0 ? 3 : 2;
    uint32_t cp = s[0] & (0xff >> (n + 1));
    for (size_t i = 1; i < n; i++)
        cp = (cp << 6) | (s[i] & 0x3f);
    *len = n;
    return cp;
}

/* str.isspace() */
static bool py_space(uint32_t c)
{
    return (c >= 0x09 && c <= 0x0d) || (c >= 0x1c && c <= 0x20) || c == 0x85 || c == 0xa0 ||
           c == 0x1680 || (c >= 0x2000 && c <= 0x200a) || c == 0x2028 || c == 0x2029 || c == 0x202f ||
           c == 0x205f || c == 0x3000;
}

/* a line boundary of str.splitlines() */
static bool py_break(uint32_t c)
{
    return (c >= 0x0a && c <= 0x0d) || (c >= 0x1c && c <= 0x1e) || c == 0x85 || c == 0x2028 ||
           c == 0x2029;
}

char *cli_first_line(char *text)
{
    unsigned char *s = (unsigned char *)text;
    size_t n = strlen(text), i = 0, len;
    while (i < n && py_space(code_point(s + i, &len)))
        i += len;
    size_t start = i, end = i;
    for (size_t j = i; j < n; j += len)
        if (!py_space(code_point(s + j, &len)))
            end = j + len;  /* just past the last non-space */
    for (size_t j = start; j < end; j += len)
        if (py_break(code_point(s + j, &len))) {
            end = j;
            break;
        }
    memmove(text, text + start, end - start);
    text[end - start] = '\0';
    return text;
}

int cli_exit_for_class(const char *cls)
{
    for (size_t i = 0; CLI_CLASSES[i].cls; i++)
        if (strcmp(CLI_CLASSES[i].cls, cls) == 0)
            return CLI_CLASSES[i].exit_code;
    return CLI_EXIT_NO;
}

int cli_fail_text(const char *where, const char *cls, const char *text, int exit_code)
{
    char *line = strdup(text);
    if (line && cli_first_line(line)[0] != '\0')
        fprintf(stderr, "%s: %s\n", where, line);
    else
        fprintf(stderr, "%s: %s\n", where, cls);  /* fail(): a blank message shows the class */
    free(line);
    return exit_code;
}

/* _core.error_for, then str() of what it returns */
int cli_fail(const char *where, int code, const char *what)
{
    char *text = cli_utf8_replace(what ? what : "");
    if (!text) {
        fprintf(stderr, "%s: out of memory\n", where);
        return CLI_EXIT_NO;
    }
    char *msg = NULL;
    const char *cls = "CfnError";
    int rc;
    for (size_t i = 0; CLI_ERRDOCS[i].cls; i++)
        if (CLI_ERRDOCS[i].code == code)
            cls = CLI_ERRDOCS[i].cls;
    if (strcmp(cls, "CfnError") != 0) {
        const char *doc = "cfn-fast error";
        for (size_t i = 0; CLI_ERRDOCS[i].cls; i++)
            if (CLI_ERRDOCS[i].code == code && CLI_ERRDOCS[i].doc[0])
                doc = CLI_ERRDOCS[i].doc;
        rc = asprintf(&msg, "%s", text[0] ? text : doc);
    } else if (code > -1000 && code < 0) {
        cls = "CfnOSError";
        int e = -code;
        if (!text[0])
            rc = asprintf(&msg, "[Errno %d] %s", e, strerror(e));
        else if (e == EINTR)
            rc = asprintf(&msg, "[Errno %d] %s", e, text);
        else
            rc = asprintf(&msg, "[Errno %d] %s: %s", e, text, strerror(e));
    } else if (text[0]) {
        rc = asprintf(&msg, "%s", text);
    } else {
        rc = asprintf(&msg, "cfn-fast error code %d", code);
    }
    free(text);
    if (rc < 0) {
        fprintf(stderr, "%s: out of memory\n", where);
        return CLI_EXIT_NO;
    }
    int exit_code = cli_exit_for_class(cls);
    cli_fail_text(where, cls, msg, exit_code);
    free(msg);
    return exit_code;
}

void cli_log(const char *tag, const char *fmt, ...)
{
    char stamp[16] = "";
    time_t now = time(NULL);
    struct tm tm;
    if (localtime_r(&now, &tm))
        (void)strftime(stamp, sizeof stamp, "%H:%M:%S", &tm);
    char *body = NULL;
    va_list ap;
    va_start(ap, fmt);
    int rc = vasprintf(&body, fmt, ap);
    va_end(ap);
    if (rc < 0)
        return;
    fprintf(stderr, "[%s] [%s] %s\n", stamp, tag, body);  /* one write: stderr is unbuffered */
    free(body);
}
