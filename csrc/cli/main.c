/*
 * main.c - the native cfn-fast: the hot commands in C, everything else in Python.
 *
 * A plain call of a hot command (commands.plain_values: the right number of
 * positional arguments, none an option, choices respected) is served here with
 * the C core, exactly as cfn_fast/_fastpath.py serves it: the same checks in
 * the same order, the same shared state, the same output, log lines, error
 * lines and exit codes. `cfn-fast shell` is served here too, so the drop-in
 * it prints calls this program by its absolute path. Every other call, and
 * every case whose exact wording only Python has (a setting it refuses, a
 * non-ASCII agent id, arguments that are not UTF-8, a non-UTF-8 locale), is
 * handed to the Python CLI unchanged: this process becomes
 * `<python> -P -m cfn_fast <args>` (execv: same pid, same environment; -P
 * keeps the current folder off sys.path, as the console script did).
 *
 * The interpreter is, in order: CFN_FAST_PYTHON when set; the python3.X
 * beside this program (its venv's or prefix's bin folder, found through
 * /proc/self/exe; X is the version the build used, which the compiled
 * extension requires anyway); the interpreter that built it.
 */
#define _GNU_SOURCE
#include "cli.h"

#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/time.h>
#include <unistd.h>

static volatile sig_atomic_t interrupted;
static bool unbuffered;  /* PYTHONUNBUFFERED: Python writes each stdout line at once */

/* Ctrl-C sets the flag the command checks after each call into the core, and
 * ends the core's wait by interrupting its sleep. On a busy machine the signal
 * often lands while the process waits in the run queue between two naps of a
 * lock wait, and then ends none: a 1 ms timer, armed from then on, interrupts
 * the next one (setitimer is a bare system call: safe here). */
static void on_sigint(int sig)
{
    (void)sig;
    interrupted = 1;
    struct itimerval every_ms = {{0, 1000}, {0, 1000}};
    (void)setitimer(ITIMER_REAL, &every_ms, NULL);
}

static void on_sigalrm(int sig)
{
    (void)sig;  /* its work is the EINTR it causes */
}

/* Before anything is written: a timer signal would cut a write short. */
static void stop_timer(void)
{
    struct itimerval off = {{0, 0}, {0, 0}};
    (void)setitimer(ITIMER_REAL, &off, NULL);
}

/* ---- where this program is, and which Python to hand over to -------------- */

/* This program's absolute path (symlinks resolved), or "" when /proc cannot tell. */
static void exe_path(char *out, size_t cap)
{
    ssize_t n = readlink("/proc/self/exe", out, cap - 1);
    if (n < 0 || (size_t)n >= cap - 1) {
        out[0] = '\0';
        return;
    }
    out[n] = '\0';
    static const char gone[] = " (deleted)";  /* replaced by a reinstall while running */
    size_t g = sizeof gone - 1;
    if ((size_t)n > g && strcmp(out + n - g, gone) == 0)
        out[n - g] = '\0';
}

static void try_exec(const char *python, char **argv, int argc, char *tried, size_t cap)
{
    size_t fixed = 0;
    while (CLI_HANDOVER[fixed])
        fixed++;
    char **args = calloc((size_t)argc + fixed + 1, sizeof *args);
    if (!args)
        return;
    args[0] = (char *)python;  /* the path, not a name: a venv's interpreter finds its pyvenv.cfg by it */
    for (size_t i = 0; i < fixed; i++)
        args[1 + i] = (char *)CLI_HANDOVER[i];
    for (int i = 1; i < argc; i++)
        args[fixed + (size_t)i] = argv[i];
    execv(python, args);
    int e = errno;
    free(args);
    size_t used = strlen(tried);
    snprintf(tried + used, cap - used, "%s%s (%s)", used ? ", " : "", python, strerror(e));
}

/* Becomes `<python> -P -m cfn_fast argv[1:]`; returns only when no interpreter would start. */
static int handover(int argc, char **argv)
{
    char tried[3 * PATH_MAX + 256] = "";
    const char *forced = getenv("CFN_FAST_PYTHON");
    if (forced && forced[0]) {
        try_exec(forced, argv, argc, tried, sizeof tried);
    } else {
        char self[PATH_MAX], beside[PATH_MAX + 64];
        exe_path(self, sizeof self);
        char *slash = strrchr(self, '/');
        if (slash) {
            *slash = '\0';
            snprintf(beside, sizeof beside, "%s/%s", self, CLI_PYTHON_NAME);
            if (access(beside, X_OK) == 0)
                try_exec(beside, argv, argc, tried, sizeof tried);
        }
        try_exec(CLI_BUILD_PYTHON, argv, argc, tried, sizeof tried);
    }
    fprintf(stderr, "%s: cannot start the Python CLI (%s); set CFN_FAST_PYTHON to the interpreter "
            "cfn-fast was installed with\n", CLI_PROG, tried[0] ? tried : "no interpreter found");
    return CLI_EXIT_NO;
}

/* ---- what only Python words exactly ----------------------------------------- */

static bool locale_utf8(const char *name)
{
    if (!name[0] || strcmp(name, "C") == 0 || strcmp(name, "POSIX") == 0)
        return true;  /* Python 3.7+ coerces the C locale to UTF-8 (PEP 538, PEP 540) */
    return strcasestr(name, "utf-8") || strcasestr(name, "utf8");
}

/* Whether Python would decode arguments and write stdout and stderr as UTF-8
 * (then its bytes are this program's bytes). */
static bool python_io_utf8(void)
{
    const char *io = getenv("PYTHONIOENCODING"), *utf8 = getenv("PYTHONUTF8");
    const char *coerce = getenv("PYTHONCOERCECLOCALE");
    if (io && io[0])
        return false;
    if (utf8 && strcmp(utf8, "1") == 0)
        return true;
    if ((utf8 && utf8[0]) || (coerce && coerce[0]))
        return false;
    const char *names[] = {"LC_ALL", "LC_CTYPE", "LANG"};
    for (size_t i = 0; i < 3; i++) {
        const char *v = getenv(names[i]);
        if (v && v[0])
            return locale_utf8(v);
    }
    return true;
}

static bool ascii(const char *s)
{
    for (; *s; s++)
        if ((unsigned char)*s >= 0x80)
            return false;
    return true;
}

/* ---- commands.split and commands.plain_values ------------------------------------ */

struct call {
    const struct cli_hot *cmd;
    const char *values[4];
    char where[64];                 /* "cfn-fast bus send": fail()'s prefix */
};

static bool is_choice(const struct cli_param *p, const char *a)
{
    for (size_t i = 0; p->choices[i]; i++)
        if (strcmp(p->choices[i], a) == 0)
            return true;
    return false;
}

/* The hot command argv names as a plain call, with its values; false otherwise. */
static bool plain_call(int argc, char **argv, struct call *c)
{
    if (argc < 2)
        return false;
    for (int h = 0; h < CLI_HOT_COUNT; h++) {
        const struct cli_hot *cmd = &CLI_HOT[h];
        if (!cmd->function || argc - 1 < cmd->depth)
            continue;
        if (strcmp(argv[1], cmd->path[0]) != 0 || (cmd->depth == 2 && strcmp(argv[2], cmd->path[1]) != 0))
            continue;
        int nargs = argc - 1 - cmd->depth, required = 0;
        for (int i = 0; i < cmd->nparams; i++)
            required += cmd->params[i].required;
        if (nargs < required || nargs > cmd->nparams)
            return false;
        for (int i = 0; i < cmd->nparams; i++) {
            const struct cli_param *p = &cmd->params[i];
            if (i >= nargs) {
                c->values[i] = p->fallback;
                continue;
            }
            const char *a = argv[1 + cmd->depth + i];
            /* an option, unless a payload that is a negative number ("-1"); whether a
             * non-ASCII character after the '-' is a digit is str.isdigit()'s to say */
            if (a[0] == '-' && !(strcmp(p->kind, "json") == 0 && a[1] >= '0' && a[1] <= '9'))
                return false;
            if (p->choices[0] && !is_choice(p, a))
                return false;
            c->values[i] = a;
        }
        c->cmd = cmd;
        snprintf(c->where, sizeof c->where, "%s %s%s%s", CLI_PROG, cmd->path[0], cmd->depth == 2 ? " " : "",
                 cmd->depth == 2 ? cmd->path[1] : "");
        return true;
    }
    return false;
}

/* Arguments Python would word an error about differently, or decode otherwise. */
static bool only_python_words(const struct call *c)
{
    for (int i = 0; i < c->cmd->nparams; i++) {
        const char *v = c->values[i];
        if (strcmp(c->cmd->params[i].kind, "agent") == 0 ? !ascii(v) : !cli_utf8_valid(v, strlen(v)))
            return true;  /* agent_bytes words a non-ASCII id with repr(); str.encode() a non-UTF-8 text */
    }
    return false;
}

/* ---- the hot commands: cfn_fast/_fastpath.py ----------------------------------------------- */

struct run {
    const struct call *call;
    struct cli_config cfg;
    cfn_bus *bus;
    bool opened;
};

/* _fastpath.fail; after Ctrl-C, nothing: KeyboardInterrupt has the last word (finish) */
static int fail(const struct run *r, int code, const cfn_err *err)
{
    return interrupted ? CLI_EXIT_NO : cli_fail(r->call->where, code, err->what);
}

/* _fastpath.out: a line on stdout. Buffered (Python's default for a pipe or a
 * file), it is written at exit and a failure shows there (finish); unbuffered
 * (PYTHONUNBUFFERED), a failed write is the command's error, where Python
 * raises it. Returns 0, or the exit code of that error. */
static int out(const char *where, const char *text, size_t len)
{
    /* Python's stdout holds up to a chunk (8192 bytes) until exit; a longer
     * text (the drop-in's) is written at once, and its failure reported */
    if (!unbuffered && len <= 8192) {
        (void)fwrite(text, 1, len, stdout);
        return 0;
    }
    (void)fflush(stdout);
    while (len) {
        ssize_t w = write(STDOUT_FILENO, text, len);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            char why[128];
            int e = errno;
            snprintf(why, sizeof why, "[Errno %d] %s", e, strerror(e));
            return cli_fail_text(where, "OSError", why, cli_exit_for_class("CfnOSError"));
        }
        text += w;
        len -= (size_t)w;
    }
    return 0;
}

static int out_int(const struct run *r, int64_t value)
{
    char line[32];
    int n = snprintf(line, sizeof line, "%lld\n", (long long)value);
    return out(r->call->where, line, (size_t)n);
}

/* MessageBus._bus(create=False): the handle, or NULL with 0 when the base
 * folder does not exist; METRICS_FILE is given to it as _on_open does. */
static int bus_get(struct run *r, cfn_bus **handle, cfn_err *err)
{
    if (!r->opened) {
        const struct cli_config *c = &r->cfg;
        cfn_bus_opts o = {.dir_mode = cli_dir_mode(c), .gid = (int32_t)c->ival[CLI_SET_GROUP],
                          .lock_timeout_ms = c->ival[CLI_SET_LOCK_TIMEOUT_MS]};
        r->bus = cfn_bus_open(c->sval[CLI_SET_BASE_DIR], 0, &o, err);
        if (!r->bus) {
            if (err->code == -ENOENT)
                return *handle = NULL, 0;
            return err->code;
        }
        r->opened = true;
        if (c->ival[CLI_SET_METRICS_ENABLED]) {
            cfn_err ignored = {0};  /* a refused file turns metrics off, and nothing else */
            (void)cfn_set_metrics(r->bus, c->sval[CLI_SET_METRICS_FILE], c->ival[CLI_SET_METRICS_MAX_BYTES],
                                  cli_file_mode(c), (int32_t)c->ival[CLI_SET_GROUP], &ignored);
        }
    }
    *handle = r->bus;
    return 0;
}

/* _core._checked's loop: a call a signal cut short runs again, unless it was SIGINT */
#define RETRY(rc, call) do { (rc) = (call); } while ((rc) == -EINTR && !interrupted)

/* inbox_size: a reconcile's count (a scan of the folder), 0 without an inbox */
static int inbox_size(struct run *r, const char *agent, int64_t *size, cfn_err *err)
{
    cfn_bus *bus;
    int rc = bus_get(r, &bus, err);
    if (rc || !bus) {
        *size = 0;
        return rc;
    }
    cfn_reconcile_result res;
    RETRY(rc, cfn_reconcile(bus, agent, 0, &res, err));
    if (rc == CFN_E_NOINBOX)
        rc = 0, res.count = 0;
    *size = res.count;
    return rc;
}

/* MessageBus.get_inbox_capacity: the inbox's capacity, the same for every
 * process (MAX_INBOX_SIZE without a base folder) */
static int inbox_cap(struct run *r, const char *agent, int64_t *cap, cfn_err *err)
{
    int64_t own = r->cfg.ival[CLI_SET_MAX_INBOX_SIZE];
    cfn_bus *bus;
    int rc = bus_get(r, &bus, err);
    *cap = own;
    if (rc || !bus)
        return rc;
    int64_t got;
    do {
        got = cfn_inbox_capacity(bus, agent, own, err);
    } while (got == -EINTR && !interrupted);
    if (got < 0)
        return (int)got;
    *cap = got;
    return 0;
}

static int get_size(struct run *r)
{
    cfn_err err = {0};
    int64_t size;
    int rc = inbox_size(r, r->call->values[0], &size, &err);
    if (rc || interrupted)
        return fail(r, rc, &err);
    return out_int(r, size);
}

/* The inbox's size (a scan) and its capacity, as check-capacity and get-utilization read them */
static int size_and_cap(struct run *r, int64_t *size, int64_t *cap, cfn_err *err)
{
    int rc = inbox_size(r, r->call->values[0], size, err);
    if (!rc && !interrupted)
        rc = inbox_cap(r, r->call->values[0], cap, err);
    return rc;
}

static int check_capacity(struct run *r)
{
    cfn_err err = {0};
    int64_t size, cap;
    int rc = size_and_cap(r, &size, &cap, &err);
    if (rc || interrupted)
        return fail(r, rc, &err);
    if (size >= cap) {
        cli_log("RATE-LIMIT", "Inbox %s at capacity: %lld/%lld messages", r->call->values[0], (long long)size,
                (long long)cap);
        return CLI_EXIT_NO;
    }
    return CLI_EXIT_OK;
}

static int get_utilization(struct run *r)
{
    cfn_err err = {0};
    int64_t size, cap;
    int rc = size_and_cap(r, &size, &cap, &err);
    if (rc || interrupted)
        return fail(r, rc, &err);
    return out_int(r, size * 100 / cap);
}

/* _core.send with _resume_after_signal: a signal that is not SIGINT cut a
 * wait short; carry on with what is left of the retries and the budget. */
static int send_once(cfn_bus *bus, const char *const *v, const cfn_send_opts *opts, cfn_send_result *res,
                     cfn_err *err)
{
    int rc = cfn_send(bus, v[0], v[1], v[2], strlen(v[2]), v[3], strlen(v[3]), opts, res, err);
    if (rc != -EINTR || interrupted)
        return rc;
    int64_t retries = 0, waited = 0;
    int64_t budget_ms = opts->max_total_ms ? opts->max_total_ms
                                           : opts->wait_ms * (opts->max_retries > 0 ? opts->max_retries : 0);
    while (rc == -EINTR && !interrupted) {
        retries += res->retries;
        waited += res->waited_ns;
        cfn_send_opts left = *opts;
        if (opts->max_retries >= 0) {
            left.max_retries = opts->max_retries - retries > 0 ? opts->max_retries - retries : 0;
            if (budget_ms) {
                int64_t rest = budget_ms - waited / 1000000;
                left.max_total_ms = rest > 1 ? rest : 1;
            }
        }
        rc = cfn_send(bus, v[0], v[1], v[2], strlen(v[2]), v[3], strlen(v[3]), &left, res, err);
    }
    res->retries += retries;
    res->waited_ns += waited;
    return rc;
}

/* MessageBus._payload with CFN_TEXT_PAYLOADS=1: text that is not JSON is sent
 * as a JSON string, escaped as the envelope's type is (cfn_json_escape: the
 * text is UTF-8, other arguments were handed to Python). A malloc'd string,
 * or NULL when out of memory. */
static char *json_string(const char *text)
{
    size_t n = strlen(text);
    char *out = malloc(6 * n + 3);
    if (!out)
        return NULL;
    out[0] = '"';
    size_t len = 1 + cfn_json_escape(out + 1, text, n);
    out[len++] = '"';
    out[len] = '\0';
    return out;
}

/* A send whose report needs Python (an alert): its result handed to
 * `python -m cfn_fast _native-sent` (cfn_fast/native_sent.py), which reports
 * it as the Python command would have. The send is not made again. */
static int sent_in_python(const struct run *r, bool backpressure, int rc, const cfn_err *err,
                          const cfn_send_result *res)
{
    const char *const *v = r->call->values;
    char num[6][24];
    snprintf(num[0], sizeof num[0], "%d", rc);
    snprintf(num[1], sizeof num[1], "%lld", (long long)res->retries);
    snprintf(num[2], sizeof num[2], "%lld", (long long)res->waited_ns);
    snprintf(num[3], sizeof num[3], "%d", (int)res->circuit);
    snprintf(num[4], sizeof num[4], "%lld", (long long)res->retry_after_ns);
    snprintf(num[5], sizeof num[5], "%d", backpressure ? 1 : 0);
    char *argv[] = {(char *)CLI_PROG, "_native-sent", (char *)r->call->where, num[0], (char *)err->what,
                    num[1], num[2], res->locked ? "1" : "0", res->deadline ? "1" : "0", num[3], num[4], num[5],
                    (char *)v[0], (char *)v[1], (char *)v[2], rc ? "" : (char *)res->msg_id, NULL};
    (void)fflush(stdout);
    return handover((int)(sizeof argv / sizeof argv[0]) - 1, argv);
}

/* fail(), with what _RetryAfter.set_retry_after adds to the line */
static int fail_retry_after(const struct run *r, int rc, const cfn_err *err, int64_t retry_after_ns)
{
    cfn_err more = *err;
    size_t used = strnlen(more.what, sizeof more.what);
    /* Python's f"{seconds:.3g}" is C's %.3g */
    snprintf(more.what + used, sizeof more.what - used, "; retry after %.3g s", (double)retry_after_ns / 1e9);
    return fail(r, rc, &more);
}

static int send(struct run *r, bool backpressure)
{
    const struct cli_config *c = &r->cfg;
    const char *const *v = r->call->values;
    cfn_err err = {0};
    cfn_bus *bus;
    int rc = bus_get(r, &bus, &err);
    if (rc || interrupted)
        return fail(r, rc, &err);
    if (!bus) {  /* MessageBus._need */
        char *text = NULL;
        if (asprintf(&text, "agent '%s' has no inbox (base folder %s does not exist)", v[1],
                     c->sval[CLI_SET_BASE_DIR]) < 0)
            return CLI_EXIT_NO;
        int code = cli_fail_text(r->call->where, "InboxNotFound", text, cli_exit_for_class("InboxNotFound"));
        free(text);
        return code;
    }
    cfn_send_opts opts = {
        .capacity = c->ival[CLI_SET_MAX_INBOX_SIZE],
        .wait_ms = c->ival[CLI_SET_BACKPRESSURE_WAIT_MS],
        .max_retries = backpressure ? c->ival[CLI_SET_BACKPRESSURE_MAX_RETRIES] : -1,
        .max_total_ms = c->ival[CLI_SET_BACKPRESSURE_MAX_TOTAL_MS],
        .max_payload = c->ival[CLI_SET_MAX_MESSAGE_BYTES],
        .stale_after_ms = (int64_t)(c->fval[CLI_SET_RATE_LIMIT_CHECK_INTERVAL] * 3000),
        .backoff = c->backoff,
        .fsync = c->ival[CLI_SET_FSYNC] ? 1 : 0,
        .file_mode = cli_file_mode(c),
        .dir_mode = cli_dir_mode(c),
        .outbox_max = c->ival[CLI_SET_OUTBOX_MAX],
        .breaker_failures = (int32_t)c->ival[CLI_SET_BREAKER_FAILURES],
        .breaker_rate_pct = (int32_t)c->ival[CLI_SET_BREAKER_FAILURE_RATE],
        .breaker_min_calls = (int32_t)c->ival[CLI_SET_BREAKER_MIN_CALLS],
        .breaker_probes = (int32_t)c->ival[CLI_SET_BREAKER_PROBES],
        .breaker_window_ms = c->ival[CLI_SET_BREAKER_WINDOW_MS],
        .breaker_cooldown_ms = c->ival[CLI_SET_BREAKER_COOLDOWN_MS],
        .priority = strcmp(c->sval[CLI_SET_PRIORITY], "high") == 0 ? CFN_PRIORITY_HIGH : CFN_PRIORITY_NORMAL,
        .headroom_pct = (int32_t)c->ival[CLI_SET_PRIORITY_HEADROOM_PCT],
    };
    const char *args[4] = {v[0], v[1], v[2], v[3]};
    char *text = NULL;
    cfn_err probe = {0};
    if (c->ival[CLI_SET_TEXT_PAYLOADS] && cfn_check_json(v[3], strlen(v[3]), &probe) != 0) {
        if (!(text = json_string(v[3]))) {
            fprintf(stderr, "%s: out of memory\n", r->call->where);
            return CLI_EXIT_NO;
        }
        args[3] = text;
    }
    cfn_send_result res;
    rc = send_once(bus, args, &opts, &res, &err);
    free(text);
    if (interrupted)
        return CLI_EXIT_NO;
    /* MessageBus.deliver's alerts: a backpressure send that gave up (naming
     * the inbox's heaviest senders), a circuit this send opened or closed */
    if (res.circuit || (rc && backpressure && rc == CFN_E_TIMEOUT && !res.locked && !res.deadline))
        return sent_in_python(r, backpressure, rc, &err, &res);
    if (rc) {
        if (res.retry_after_ns > 0 && !interrupted)  /* _core.send_error: InboxFull.set_retry_after */
            return fail_retry_after(r, rc, &err, res.retry_after_ns);
        return fail(r, rc, &err);
    }
    char line[sizeof res.msg_id + 1];
    int n = snprintf(line, sizeof line, "%s\n", res.msg_id);
    if ((rc = out(r->call->where, line, (size_t)n)) != 0)
        return rc;
    if (!backpressure)
        cli_log("MESSAGE-BUS", "Sent message: %s -> %s [%s] (%s)", v[0], v[1], v[2], res.msg_id);
    return CLI_EXIT_OK;
}

static int count(struct run *r)
{
    cfn_err err = {0};
    cfn_bus *bus;
    int rc = bus_get(r, &bus, &err);
    if (rc || interrupted)
        return fail(r, rc, &err);
    int64_t n = 0;
    if (bus) {
        do {
            n = cfn_scan_count(bus, r->call->values[0], r->call->values[1], &err);
        } while (n == -EINTR && !interrupted);
        if (n < 0 || interrupted)
            return fail(r, (int)n, &err);
    }
    return out_int(r, n);
}

struct handler {
    const char *function;
    int (*run)(struct run *r);
};

static int send_plain(struct run *r) { return send(r, false); }
static int send_backpressure(struct run *r) { return send(r, true); }

static const struct handler HANDLERS[] = {
    {"get_inbox_size", get_size},
    {"check_inbox_capacity", check_capacity},
    {"get_inbox_utilization", get_utilization},
    {"send_with_backpressure", send_backpressure},
    {"send_message", send_plain},
    {"message_count", count},
};

static const struct handler *handler_for(const struct cli_hot *cmd)
{
    for (size_t i = 0; i < sizeof HANDLERS / sizeof HANDLERS[0]; i++)
        if (strcmp(HANDLERS[i].function, cmd->function) == 0)
            return &HANDLERS[i];
    return NULL;
}

/* __main__.main's ending: stdout flushed; a reader that went away is exit 1, silently. */
static int finish(int code)
{
    if (interrupted) {
        fprintf(stderr, "%s: interrupted\n", CLI_PROG);
        code = 130;
    }
    if (fflush(stdout) != 0) {
        if (errno != EPIPE)
            fprintf(stderr, "%s: [Errno %d] %s\n", CLI_PROG, errno, strerror(errno));
        code = CLI_EXIT_NO;
    }
    return code;
}

/* Python's stdout to a pipe or a file: everything a command prints waits in its
 * buffer until exit (our outputs are far below 64 KiB) */
static char stdout_buffer[1 << 16];

static void python_stdout(void)
{
    if (!unbuffered && !isatty(STDOUT_FILENO))
        (void)setvbuf(stdout, stdout_buffer, _IOFBF, sizeof stdout_buffer);
}

/* _fastpath.invoke */
static int serve(const struct call *call, const struct handler *h, int argc, char **argv)
{
    /* check_params: every agent id first, so a bad one is bad input whatever else is wrong */
    for (int i = 0; i < call->cmd->nparams; i++) {
        if (strcmp(call->cmd->params[i].kind, "agent") != 0)
            continue;
        cfn_err err = {0};
        int rc = cfn_check_agent(call->values[i], &err);
        if (rc)
            return finish(cli_fail(call->where, rc, err.what));
    }
    struct run r = {.call = call};
    int rc = cli_config_read(&r.cfg);
    if (rc != 0) {
        cli_config_free(&r.cfg);
        if (rc > 0)
            return handover(argc, argv);  /* a setting Python refuses (or words): its line, its code */
        fprintf(stderr, "%s: out of memory\n", call->where);
        return CLI_EXIT_NO;
    }
    /* Ctrl-C ends a wait (no SA_RESTART) and the command, as KeyboardInterrupt does;
     * a closed reader is EPIPE, as Python has it, not a SIGPIPE death. */
    struct sigaction sa = {.sa_handler = on_sigint}, alarm = {.sa_handler = on_sigalrm};
    sigemptyset(&sa.sa_mask);
    sigemptyset(&alarm.sa_mask);
    (void)sigaction(SIGALRM, &alarm, NULL);
    (void)sigaction(SIGINT, &sa, NULL);
    (void)signal(SIGPIPE, SIG_IGN);
    python_stdout();
    int code = h->run(&r);
    if (interrupted)
        stop_timer();
    if (r.bus)
        cfn_bus_free(r.bus);
    cli_config_free(&r.cfg);
    return finish(code);
}

/* ---- cfn-fast shell: the drop-in, calling this program by its path ----------------------- */

static int shell(int argc, char **argv)
{
    static const char placeholder[] = "\n_CFN_FAST_BIN=''";
    char self[PATH_MAX];
    exe_path(self, sizeof self);
    const char *at = strstr(CLI_SHELL_SH, placeholder);
    if (!self[0] || !at)
        return handover(argc, argv);  /* nothing to fill in: the file as Python prints it */
    /* the path in single quotes; a quote inside is: close, escaped quote, reopen */
    size_t head = (size_t)(at - CLI_SHELL_SH) + 1, n = strlen(self);
    size_t cap = sizeof CLI_SHELL_SH + 4 * n + 32, len = head;
    char *text = malloc(cap);
    if (!text) {
        fprintf(stderr, "%s shell: out of memory\n", CLI_PROG);
        return CLI_EXIT_NO;
    }
    memcpy(text, CLI_SHELL_SH, head);
    len += (size_t)snprintf(text + len, cap - len, "_CFN_FAST_BIN='");
    for (size_t i = 0; i < n; i++) {
        if (self[i] == '\'') {
            memcpy(text + len, "'\\''", 4);
            len += 4;
        } else {
            text[len++] = self[i];
        }
    }
    len += (size_t)snprintf(text + len, cap - len, "'%s", at + sizeof placeholder - 1);
    (void)signal(SIGPIPE, SIG_IGN);
    python_stdout();
    int code = out(CLI_PROG " shell", text, len);
    free(text);
    return finish(code);
}

int main(int argc, char **argv)
{
    const char *u = getenv("PYTHONUNBUFFERED");
    unbuffered = u && u[0];
    if (!python_io_utf8())
        return handover(argc, argv);
    if (argc == 2 && strcmp(argv[1], "shell") == 0)
        return shell(argc, argv);
    struct call call = {0};
    const struct handler *h;
    if (!plain_call(argc, argv, &call) || !(h = handler_for(call.cmd)) || only_python_words(&call))
        return handover(argc, argv);
    return serve(&call, h, argc, argv);
}
