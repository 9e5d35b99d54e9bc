/*
 * settings.c - Config.from_env() for the native program.
 *
 * The table (names, kinds, defaults, bounds) is cfn_fast/config.py SETTINGS,
 * generated into cli_gen.h at build time; the rules below are config._parse's,
 * kind by kind. The program only needs to agree with Python on which values
 * are valid and what they mean. A value it does not take (any value Python
 * refuses, and a few Python takes that are awkward here: a boolean in
 * non-ASCII letters, a CFN_GROUP that names a group) makes it hand the call
 * to the Python path, which prints the error in the one place its text is
 * written. So this file never words an error, and a value taken here is
 * always one Python takes the same way (tests/test_settings_parity.py tries
 * every setting with every bad value).
 */
#define _GNU_SOURCE
#include "cli.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

extern char **environ;

static const char SPACE[] = " \t\n\r\f\v";  /* config._SPACE */

/* text.strip(_SPACE): ASCII bytes never occur inside a UTF-8 sequence, so
 * stripping bytes strips the same characters Python strips from the str. */
static void strip(const char *raw, const char **text, size_t *n)
{
    size_t len = strlen(raw);
    while (len && strchr(SPACE, raw[len - 1]))
        len--;
    while (len && strchr(SPACE, raw[0])) {
        raw++;
        len--;
    }
    *text = raw;
    *n = len;
}

static bool all_digits(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (s[i] < '0' || s[i] > '9')
            return false;
    return n > 0;
}

/* int(text, 10) of [+-]digits, at most 30 of them (config._parse refuses more
 * as out of range); saturated far beyond any bound. */
static long long whole(const char *text, size_t n)
{
    bool neg = text[0] == '-';
    size_t i = (text[0] == '-' || text[0] == '+') ? 1 : 0;
    long long v = 0;
    for (; i < n; i++) {
        if (v > 100000000000000000LL) {
            v = 1000000000000000000LL;  /* > every bound; keeps going without overflow */
            continue;
        }
        v = v * 10 + (text[i] - '0');
    }
    return neg ? -v : v;
}

static bool whole_ok(const struct cli_setting *s, const char *text, size_t n, long long *out)
{
    const char *body = text;
    size_t bn = n;
    if (n && (text[0] == '+' || text[0] == '-')) {
        body++;
        bn--;
    }
    if (!all_digits(body, bn) || bn > 30)
        return false;
    long long v = whole(text, n);
    if ((s->has_min && v < s->min_i) || (s->has_max && v > s->max_i))
        return false;
    *out = v;
    return true;
}

static bool number_ok(const struct cli_setting *s, const char *text, size_t n, double *out)
{
    static const char chars[] = "0123456789+-.eE";  /* config._FLOAT_CHARS */
    if (n == 0 || n > 400)
        return false;
    for (size_t i = 0; i < n; i++)
        if (!strchr(chars, text[i]))
            return false;
    char buf[401], *end;
    memcpy(buf, text, n);
    buf[n] = '\0';
    errno = 0;
    double v = strtod(buf, &end);  /* this program never calls setlocale: '.' is the point */
    if (end != buf + n || end == buf || isnan(v))
        return false;  /* float() refuses what strtod leaves unread: "1e", "1.2.3", "+-1" */
    if ((s->has_min && v < s->min_f) || (s->has_max && v > s->max_f))
        return false;  /* 1e400 is inf: out of range, as in Python */
    *out = v;
    return true;
}

static bool word_in(const char *const *words, const char *text, size_t n, bool fold)
{
    char low[16];
    if (n >= sizeof low)
        return false;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)text[i];
        if (c >= 0x80)
            return false;  /* str.lower() of other letters: leave it to Python */
        low[i] = (char)(fold && c >= 'A' && c <= 'Z' ? c - 'A' + 'a' : c);
    }
    low[n] = '\0';
    for (size_t i = 0; words[i]; i++)
        if (strcmp(words[i], low) == 0)
            return true;
    return false;
}

static int backoff_code(const char *name)
{
    if (strcmp(name, "fixed") == 0)
        return CFN_BACKOFF_FIXED;
    if (strcmp(name, "exponential") == 0)
        return CFN_BACKOFF_EXPONENTIAL;
    if (strcmp(name, "decorrelated") == 0)
        return CFN_BACKOFF_DECORRELATED;
    return -1;
}

/* CFN_GROUP: empty is unset; ASCII digits a gid. A group name is looked up
 * by the Python path: the program is linked statically for a faster start,
 * and a static glibc cannot load the name services reliably. */
static bool group_ok(const struct cli_setting *s, const char *text, size_t n, long long *out)
{
    if (n == 0) {
        *out = -1;
        return true;
    }
    const char *body = text;
    size_t bn = n;
    if (text[0] == '+' || text[0] == '-') {
        body++;
        bn--;
    }
    return all_digits(body, bn) && whole_ok(s, text, n, out);
}

/* The environment's text for each setting. os.environ keeps the last of
 * duplicate entries; getenv() would find the first. */
static void scan_environ(const char *raw[CLI_SET_COUNT])
{
    for (int i = 0; i < CLI_SET_COUNT; i++)
        raw[i] = NULL;
    for (char **e = environ; e && *e; e++) {
        const char *eq = strchr(*e, '=');
        if (!eq)
            continue;
        size_t n = (size_t)(eq - *e);
        for (int i = 0; i < CLI_SET_COUNT; i++)
            if (strlen(CLI_SETTINGS[i].env) == n && memcmp(CLI_SETTINGS[i].env, *e, n) == 0)
                raw[i] = eq + 1;
    }
}

/* os.path.join(base, name) for a relative name. */
static char *join(const char *base, const char *name)
{
    size_t b = strlen(base), n = strlen(name);
    bool slash = b > 0 && base[b - 1] == '/';
    char *p = malloc(b + n + 2);
    if (!p)
        return NULL;
    memcpy(p, base, b);
    if (!slash)
        p[b++] = '/';
    memcpy(p + b, name, n + 1);
    return p;
}

int cli_config_read(struct cli_config *c)
{
    const char *raw[CLI_SET_COUNT];
    memset(c, 0, sizeof *c);
    scan_environ(raw);
    for (int i = 0; i < CLI_SET_COUNT; i++) {
        const struct cli_setting *s = &CLI_SETTINGS[i];
        c->ival[i] = s->kind == CLI_KIND_GROUP ? -1 : s->default_i;
        c->fval[i] = s->default_f;
        c->sval[i] = s->default_s;
        if (!raw[i])
            continue;
        const char *text;
        size_t n;
        strip(raw[i], &text, &n);
        long long v;
        switch (s->kind) {
        case CLI_KIND_INT:
            if (!whole_ok(s, text, n, &v))
                return 1;
            c->ival[i] = v;
            break;
        case CLI_KIND_FLOAT:
            if (!number_ok(s, text, n, &c->fval[i]))
                return 1;
            break;
        case CLI_KIND_BOOL:
            if (word_in(CLI_TRUE_WORDS, text, n, true))
                c->ival[i] = 1;
            else if (word_in(CLI_FALSE_WORDS, text, n, true))
                c->ival[i] = 0;
            else
                return 1;
            break;
        case CLI_KIND_CHOICE:
            if (!word_in(s->choices, text, n, false))
                return 1;
            for (int k = 0; s->choices[k]; k++)
                if (strlen(s->choices[k]) == n && memcmp(s->choices[k], text, n) == 0)
                    c->sval[i] = s->choices[k];
            break;
        case CLI_KIND_GROUP:
            if (!group_ok(s, text, n, &v))
                return 1;
            c->ival[i] = v;
            break;
        case CLI_KIND_URL:
        case CLI_KIND_SECRET:
            /* MESSAGE_BUS_URL selects the Redis backend, which only Python has
             * (REDIS_PASSWORD goes with it): the whole call is handed over */
            return 1;
        case CLI_KIND_PATH:
        case CLI_KIND_STR:
            /* the value as given (only its emptiness is judged stripped); one
             * that is not UTF-8 would be printed as Python escapes it: Python's */
            if (n == 0 || !cli_utf8_valid(raw[i], strlen(raw[i])))
                return 1;
            c->sval[i] = raw[i];
            break;
        default:
            return 1;
        }
    }
    /* Config._check */
    if (c->fval[CLI_SET_RATE_LIMIT_MEDIUM_LOAD_THRESHOLD] > c->fval[CLI_SET_RATE_LIMIT_HIGH_LOAD_THRESHOLD])
        return 1;
    if ((c->backoff = backoff_code(c->sval[CLI_SET_BACKPRESSURE_BACKOFF])) < 0)
        return 1;  /* a backoff this build has no code for */
    for (int i = 0; i < CLI_SET_COUNT; i++) {
        const struct cli_setting *s = &CLI_SETTINGS[i];
        if (s->in_base && !c->sval[i]) {
            if (!(c->owned[i] = join(c->sval[CLI_SET_BASE_DIR], s->in_base)))
                return -1;
            c->sval[i] = c->owned[i];
        }
    }
    return 0;
}

void cli_config_free(struct cli_config *c)
{
    for (int i = 0; i < CLI_SET_COUNT; i++) {
        free(c->owned[i]);
        c->owned[i] = NULL;
    }
}

/* Config.dir_mode and Config.file_mode */
uint32_t cli_dir_mode(const struct cli_config *c)
{
    return c->ival[CLI_SET_GROUP] >= 0 ? 02770 : 0700;
}

uint32_t cli_file_mode(const struct cli_config *c)
{
    return c->ival[CLI_SET_GROUP] >= 0 ? 0660 : 0600;
}
