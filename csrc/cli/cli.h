/*
 * cli.h - the native cfn-fast program: what its files share.
 *
 * The program serves the hot commands (a plain call, as commands.plain_values
 * defines it, of get-size, check-capacity, get-utilization, send-backpressure,
 * bus send and bus count) with the C core, printing exactly what the Python
 * path prints, and hands every other call, unchanged, to the Python CLI
 * (`<python> -m cfn_fast ...`, exec'd in its place). It uses only the contract,
 * cfn_fast.h, and the tables csrc/cli/build.py generates from the Python
 * sources (cli_gen.h), so names, bounds and texts are written once.
 */
#ifndef CFN_CLI_H
#define CFN_CLI_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "cfn_fast.h"

enum {
    CLI_KIND_INT, CLI_KIND_FLOAT, CLI_KIND_STR, CLI_KIND_PATH, CLI_KIND_CHOICE, CLI_KIND_BOOL, CLI_KIND_GROUP,
    CLI_KIND_URL, CLI_KIND_SECRET   /* the Redis backend's: when set, the call is Python's */
};

struct cli_setting {
    const char *env;
    int kind;                       /* CLI_KIND_* */
    int has_min, has_max;
    long long min_i, max_i;         /* bounds of whole-number kinds (int, group) */
    double min_f, max_f;            /* the same bounds as Python's floats */
    long long default_i;            /* int and bool defaults */
    double default_f;               /* float defaults */
    const char *default_s;          /* str, path and choice defaults; NULL if none */
    const char *in_base;            /* unset: this file in the base folder (".cfn-metrics.jsonl") */
    const char *const *choices;     /* a choice's words (config.CHOICES), NULL-terminated */
};

struct cli_param {
    const char *name;
    const char *kind;               /* commands.Param.kind: "agent", "json", "choice", ... */
    int required;
    const char *fallback;           /* str(default) of an optional parameter */
    const char *choices[4];         /* NULL-terminated; empty when any value goes */
};

struct cli_hot {
    const char *path[2];            /* ("get-size", NULL) or ("bus", "send") */
    int depth;
    const char *function;           /* the bash original's function: picks the C handler */
    int nparams;
    struct cli_param params[4];
};

struct cli_errdoc {
    int code;                       /* CFN_E_* */
    const char *cls;                /* the Python class it becomes */
    const char *doc;                /* the first line of that class's docstring */
    int exit_code;                  /* _fastpath.exit_code_for an error of that class */
};

#include "cli_gen.h"

/* settings.c: Config.from_env() for the settings the hot commands use */
struct cli_config {
    int64_t ival[CLI_SET_COUNT];    /* int and bool values; a group's gid, -1 without one */
    double fval[CLI_SET_COUNT];     /* float values */
    const char *sval[CLI_SET_COUNT];/* path, str and choice values */
    char *owned[CLI_SET_COUNT];     /* paths made here (files in the base folder) */
    int backoff;                    /* CFN_BACKOFF_* */
};
/* 0 when every setting the environment sets is valid and the program can
 * apply it; 1 when one is not (the Python path then explains it); -1 on ENOMEM. */
int cli_config_read(struct cli_config *c);
void cli_config_free(struct cli_config *c);
uint32_t cli_dir_mode(const struct cli_config *c);
uint32_t cli_file_mode(const struct cli_config *c);

/* pyfmt.c: text exactly as the Python path prints it */
bool cli_utf8_valid(const char *s, size_t n);
/* Python's bytes.decode("utf-8", "replace") into a new NUL-terminated string. */
char *cli_utf8_replace(const char *s);
/* Python's str(text).strip().splitlines()[0] of valid UTF-8, in place; "" when blank. */
char *cli_first_line(char *text);
/* The line `fail()` writes for a C error code and its text; returns the exit code. */
int cli_fail(const char *where, int code, const char *what);
/* The same for an error Python composes itself (class, text, exit code). */
int cli_fail_text(const char *where, const char *cls, const char *text, int exit_code);
/* [HH:MM:SS] [TAG] message, on stderr. */
void cli_log(const char *tag, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* The exit code of an error class, by name (CfnError, CfnOSError, InboxNotFound, ...). */
int cli_exit_for_class(const char *cls);

#endif
