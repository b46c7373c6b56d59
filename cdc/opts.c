/*
 * opts.c — option table, parsing and generated usage (see opts.h).
 */
#include "opts.h"

#include "audit.h"

#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

typedef enum OptKind {
    OPT_STRING,
    OPT_LIST, /* repeatable string */
    OPT_BOOL,
    OPT_LONG,
} OptKind;

/* Bit per subcommand that accepts an option. */
#define F_RUN (1u << CMD_RUN)
#define F_CHECK (1u << CMD_CHECK)
#define F_DECODE (1u << CMD_DECODE)
#define F_SETUP (1u << CMD_SETUP)
#define F_STATUS (1u << CMD_STATUS)
#define F_TEARDOWN (1u << CMD_TEARDOWN)
#define F_AUDIT (1u << CMD_AUDIT)
#define F_ALL (F_RUN | F_CHECK | F_DECODE | F_SETUP | F_STATUS | F_TEARDOWN | F_AUDIT)

typedef struct OptSpec {
    const char *name;
    const char *env;
    OptKind kind;
    size_t offset;
    const char *def;
    unsigned commands;
    const char *arg;
    const char *help;
} OptSpec;

#define OFF(f) offsetof(Config, f)

static const OptSpec opt_table[] = {
    {"pg", "WALBUST_PG", OPT_STRING, OFF(pg), "", F_ALL, "CONNINFO",
     "PostgreSQL conninfo string or URI (default: libpq defaults and PG* variables)"},
    {"redis", "WALBUST_REDIS", OPT_LIST, OFF(redis), "redis://127.0.0.1:6379",
     F_RUN | F_STATUS | F_AUDIT, "URL",
     "Redis target: redis://[user:pass@]host:port[/db], unix:///path.sock, "
     "redis+cluster://host:port[,host:port], redis+sentinel://host:port[,host:port]/MASTER "
     "(rediss, rediss+cluster, rediss+sentinel: TLS); parameters ?replicas=N&cacert=FILE&"
     "cert=FILE&key=FILE&sni=NAME&insecure=1 (Sentinel: &sentinel_user=U&sentinel_password=P); "
     "repeat for several targets"},
    {"rules", "WALBUST_RULES", OPT_STRING, OFF(rules), NULL,
     F_RUN | F_CHECK | F_DECODE | F_SETUP | F_STATUS | F_AUDIT, "FILE",
     "rules file (JSON); required for run, check, setup and audit"},
    {"slot", "WALBUST_SLOT", OPT_STRING, OFF(slot), "walbust",
     F_RUN | F_CHECK | F_DECODE | F_SETUP | F_STATUS | F_TEARDOWN | F_AUDIT, "NAME",
     "logical replication slot (default: walbust; decode: a temporary slot)"},
    {"publication", "WALBUST_PUBLICATION", OPT_STRING, OFF(publication), "walbust",
     F_RUN | F_CHECK | F_DECODE | F_SETUP | F_STATUS | F_TEARDOWN, "NAME",
     "publication (default: walbust)"},
    {"create-slot", NULL, OPT_BOOL, OFF(create_slot), NULL, F_RUN, NULL,
     "create the slot on first use, when it does not exist and walbust never streamed from "
     "it (default: a missing slot is an error); never over a lost slot"},
    {"metrics", "WALBUST_METRICS", OPT_STRING, OFF(metrics), "127.0.0.1:9187", F_RUN, "ADDR",
     "metrics listen address, or off (default: 127.0.0.1:9187)"},
    {"log-format", "WALBUST_LOG_FORMAT", OPT_STRING, OFF(log_format), "text", F_ALL, "text|json",
     "log format (default: text)"},
    {"log-level", "WALBUST_LOG_LEVEL", OPT_STRING, OFF(log_level), "info", F_ALL,
     "debug|info|warn|error", "log level (default: info)"},
    {"until", NULL, OPT_STRING, OFF(until), NULL, F_DECODE, "LSN",
     "stop once the stream has passed this LSN (X/X)"},
    {"max-changes", NULL, OPT_LONG, OFF(max_changes), NULL, F_DECODE, "N",
     "stop after printing N changes"},
    {"on-slot-lost", "WALBUST_ON_SLOT_LOST", OPT_STRING, OFF(on_slot_lost), "fail", F_RUN,
     "fail|flush-rules",
     "when a slot walbust streamed from is missing, re-created, invalidated or cannot decode "
     "past a change: exit 1 naming the WAL range lost (fail, default), or recreate it and "
     "invalidate everything the rules cover before streaming again (flush-rules)"},
    {"schema-recheck", "WALBUST_SCHEMA_RECHECK", OPT_LONG, OFF(schema_recheck), NULL, F_RUN,
     "SECONDS",
     "re-check the rules' tables in the catalog this often, for schema changes the DDL event "
     "trigger cannot report (default: 30)"},
    {"flush-interval", "WALBUST_FLUSH_INTERVAL", OPT_STRING, OFF(flush_interval), "auto", F_RUN,
     "MS|auto",
     "while commits arrive faster than one per interval, start a Redis write at least this "
     "long after the previous one ended, in milliseconds, 0 to 100; more means fewer, larger "
     "batches: less CPU for walbust, Redis and PostgreSQL per change, for up to this much more "
     "latency. auto (default): 0.2, rising to at most 1 while the host's CPUs are saturated"},
    {"audit-rate", "WALBUST_AUDIT_RATE", OPT_STRING, OFF(audit_rate), "1", F_RUN, "PERCENT",
     "audit this share of the audited keys walbust invalidates, 0 to 100 (default: 1); 0 "
     "turns sampling off. Only rules with an \"audit\" are audited"},
    {"audit-delay", "WALBUST_AUDIT_DELAY", OPT_LONG, OFF(audit_delay), NULL, F_RUN, "MS",
     "check a sampled key this long after its invalidation (default: 1000)"},
    {"audit-max-checks", "WALBUST_AUDIT_MAX_CHECKS", OPT_LONG, OFF(audit_max_checks), NULL, F_RUN,
     "N", "audit at most N keys per second, samples and scan together (default: 20)"},
    {"audit-scan-interval", "WALBUST_AUDIT_SCAN_INTERVAL", OPT_LONG, OFF(audit_scan_interval), NULL,
     F_RUN, "SECONDS",
     "start a background scan of the audited keys in Redis this long after the last one "
     "ended (default: 300)"},
    {"audit-no-scan", NULL, OPT_BOOL, OFF(audit_no_scan), NULL, F_RUN, NULL,
     "no background scan: audit only sampled invalidations"},
    {"audit-heal", NULL, OPT_BOOL, OFF(audit_heal), NULL, F_RUN, NULL,
     "delete a stale entry when the audit finds one (default: only report it)"},
    {"sample", NULL, OPT_LONG, OFF(sample), NULL, F_AUDIT, "N",
     "check at most N audited keys (default: every one found)"},
    {"json", NULL, OPT_BOOL, OFF(json), NULL, F_STATUS, NULL, "print status as JSON"},
    {"replica-identity-full", NULL, OPT_BOOL, OFF(replica_identity_full), NULL, F_SETUP, NULL,
     "set REPLICA IDENTITY FULL on tables whose rules need old values"},
    {"yes", NULL, OPT_BOOL, OFF(yes), NULL, F_TEARDOWN, NULL,
     "drop without asking (required when stdin is not a terminal)"},
    {"force", NULL, OPT_BOOL, OFF(force), NULL, F_TEARDOWN, NULL,
     "drop the slot even while a consumer holds it (terminates its walsender)"},
};

#define N_OPTS (sizeof opt_table / sizeof opt_table[0])

static const struct {
    const char *name;
    OptsCommand cmd;
    const char *summary;
} commands[] = {
    {"run", CMD_RUN, "the daemon: stream changes, apply rules, invalidate Redis, confirm"},
    {"check", CMD_CHECK, "validate a rules file (with --pg: against the live schema)"},
    {"decode", CMD_DECODE, "print committed changes as JSON lines (with --rules: dry run)"},
    {"setup", CMD_SETUP, "create publication, slot and the walbust SQL schema"},
    {"status", CMD_STATUS, "show slot state, confirmed LSN, lag and publication coverage"},
    {"teardown", CMD_TEARDOWN, "drop the publication, slot and walbust schema that setup created"},
    {"audit", CMD_AUDIT,
     "check the audited keys in Redis against the database; exit 1 if any is "
     "stale"},
};

#define N_COMMANDS (sizeof commands / sizeof commands[0])

/* Help column layout: options in the left column, wrapped text on the right
 * from HELP_COL; an option name wider than its column gets a line of its own. */
#define HELP_COL 30
#define HELP_WIDTH 79

/* Print text from column `col` (the cursor is there), wrapped at HELP_WIDTH;
 * continuation lines are indented to col. */
static void print_wrapped(FILE *out, const char *text, int col)
{
    int at = col;

    while (*text != '\0') {
        int len = (int)strcspn(text, " ");

        if (at > col && at + 1 + len > HELP_WIDTH) {
            fprintf(out, "\n%*s", col, "");
            at = col;
        } else if (at > col) {
            fputc(' ', out);
            at++;
        }
        fprintf(out, "%.*s", len, text);
        at += len;
        text += len;
        while (*text == ' ')
            text++;
    }
    fputc('\n', out);
}

void opts_usage(FILE *out, OptsCommand cmd)
{
    fprintf(out, "usage: walbust <command> [options]\n       walbust <command> --help\n"
                 "       walbust -h | --help | -V | --version\n\n");
    fprintf(out, "commands:\n");
    for (size_t i = 0; i < N_COMMANDS; i++)
        if (cmd == CMD_NONE || cmd == commands[i].cmd) {
            fprintf(out, "  %-10s", commands[i].name);
            print_wrapped(out, commands[i].summary, 13);
        }
    fprintf(out, "\noptions (each also read from the environment variable shown; a flag wins):\n");
    for (size_t i = 0; i < N_OPTS; i++) {
        const OptSpec *o = &opt_table[i];
        char left[96], text[512];
        int n;

        if (cmd != CMD_NONE && !(o->commands & (1u << cmd)))
            continue;
        n = snprintf(left, sizeof left, "  --%s%s%s", o->name, o->arg ? " " : "",
                     o->arg ? o->arg : "");
        if (n > HELP_COL - 1)
            fprintf(out, "%s\n%*s", left, HELP_COL, "");
        else
            fprintf(out, "%-*s", HELP_COL, left);
        snprintf(text, sizeof text, "%s%s%s%s", o->help, o->env ? " [" : "", o->env ? o->env : "",
                 o->env ? "]" : "");
        print_wrapped(out, text, HELP_COL);
    }
    fprintf(out, "\nexit codes: 0 clean stop, 1 runtime or configuration error, 2 usage error\n"
                 "signals (run): SIGTERM/SIGINT drain and exit, SIGHUP reloads the rules file\n");
}

bool opts_parse_ms(const char *text, double max_ms, long *out_us)
{
    char *end;
    double v;

    if (text == NULL || *text == '\0')
        return false;
    errno = 0;
    v = strtod(text, &end);
    if (errno != 0 || *end != '\0' || !(v >= 0 && v <= max_ms)) /* !(..): NaN fails too */
        return false;
    *out_us = lround(v * 1000);
    return true;
}

static int set_value(Config *cfg, const OptSpec *o, const char *val, bool from_env)
{
    char *base = (char *)cfg;

    switch (o->kind) {
    case OPT_STRING:
        *(const char **)(base + o->offset) = val;
        if (o->offset == OFF(slot))
            cfg->slot_given = true;
        return 0;
    case OPT_LIST:
        if (from_env) {
            /* The environment holds one URL, or several separated by commas
             * or spaces is ambiguous with URLs; one target per variable. */
            cfg->redis[0] = val;
            cfg->nredis = 1;
            return 0;
        }
        if (cfg->nredis >= OPTS_MAX_REDIS) {
            fprintf(stderr, "walbust: at most %d --redis targets are supported\n", OPTS_MAX_REDIS);
            return 2;
        }
        cfg->redis[cfg->nredis++] = val;
        return 0;
    case OPT_BOOL:
        *(bool *)(base + o->offset) = true;
        return 0;
    case OPT_LONG: {
        char *end;
        long v = strtol(val, &end, 10);
        if (*val == '\0' || *end != '\0' || v < 0) {
            fprintf(stderr, "walbust: --%s needs a non-negative number, got \"%s\"\n", o->name,
                    val);
            return 2;
        }
        *(long *)(base + o->offset) = v;
        return 0;
    }
    }
    return 2;
}

static void apply_defaults_and_env(Config *cfg)
{
    memset(cfg, 0, sizeof *cfg);
    for (size_t i = 0; i < N_OPTS; i++) {
        const OptSpec *o = &opt_table[i];
        const char *env = o->env ? getenv(o->env) : NULL;

        if (env != NULL && *env != '\0')
            (void)set_value(cfg, o, env, true);
        else if (o->def != NULL && o->kind == OPT_STRING)
            *(const char **)((char *)cfg + o->offset) = o->def;
    }
    cfg->slot_given = getenv("WALBUST_SLOT") != NULL && *getenv("WALBUST_SLOT") != '\0';
}

static OptsCommand find_command(const char *name)
{
    for (size_t i = 0; i < N_COMMANDS; i++)
        if (strcmp(name, commands[i].name) == 0)
            return commands[i].cmd;
    return CMD_NONE;
}

int opts_parse(int argc, char **argv, Config *cfg)
{
    struct option longopts[N_OPTS + 3];
    bool redis_from_flag = false;
    OptsCommand cmd;
    int c, idx;

    apply_defaults_and_env(cfg);
    if (argc < 2) {
        opts_usage(stderr, CMD_NONE);
        return 2;
    }
    if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 ||
        strcmp(argv[1], "help") == 0) {
        cfg->command = CMD_HELP;
        return 0;
    }
    if (strcmp(argv[1], "--version") == 0 || strcmp(argv[1], "-V") == 0 ||
        strcmp(argv[1], "version") == 0) {
        cfg->command = CMD_VERSION;
        return 0;
    }
    cmd = find_command(argv[1]);
    if (cmd == CMD_NONE) {
        fprintf(stderr, "walbust: unknown command \"%s\" (try walbust --help)\n", argv[1]);
        return 2;
    }
    cfg->command = cmd;

    for (size_t i = 0; i < N_OPTS; i++) {
        longopts[i].name = opt_table[i].name;
        longopts[i].has_arg = opt_table[i].kind == OPT_BOOL ? no_argument : required_argument;
        longopts[i].flag = NULL;
        longopts[i].val = 1000 + (int)i;
    }
    longopts[N_OPTS] = (struct option){"help", no_argument, NULL, 'h'};
    longopts[N_OPTS + 1] = (struct option){"version", no_argument, NULL, 'V'};
    longopts[N_OPTS + 2] = (struct option){NULL, 0, NULL, 0};

    optind = 2;
    opterr = 0;
    while ((c = getopt_long(argc, argv, ":hV", longopts, &idx)) != -1) {
        const OptSpec *o;
        int rc;

        if (c == 'h') {
            cfg->help_for = cmd;
            cfg->command = CMD_HELP;
            return 0;
        }
        if (c == 'V') {
            cfg->command = CMD_VERSION;
            return 0;
        }
        if (c == '?' || c == ':') {
            fprintf(stderr, "walbust %s: %s \"%s\" (try walbust %s --help)\n", argv[1],
                    c == ':' ? "missing argument for" : "unknown option", argv[optind - 1],
                    argv[1]);
            return 2;
        }
        o = &opt_table[c - 1000];
        if (!(o->commands & (1u << cmd))) {
            fprintf(stderr, "walbust %s: option --%s does not apply to this command\n", argv[1],
                    o->name);
            return 2;
        }
        if (o->kind == OPT_LIST && !redis_from_flag) {
            cfg->nredis = 0; /* flags replace the environment's target */
            redis_from_flag = true;
        }
        rc = set_value(cfg, o, optarg, false);
        if (rc != 0)
            return rc;
    }
    if (optind < argc) {
        fprintf(stderr, "walbust %s: unexpected argument \"%s\"\n", argv[1], argv[optind]);
        return 2;
    }
    if (cfg->nredis == 0) {
        cfg->redis[0] = "redis://127.0.0.1:6379";
        cfg->nredis = 1;
    }
    if (strcmp(cfg->on_slot_lost, "fail") != 0 && strcmp(cfg->on_slot_lost, "flush-rules") != 0) {
        fprintf(stderr, "walbust %s: --on-slot-lost must be fail or flush-rules, got \"%s\"\n",
                argv[1], cfg->on_slot_lost);
        return 2;
    }
    cfg->flush_interval_auto = strcmp(cfg->flush_interval, "auto") == 0;
    if (!cfg->flush_interval_auto &&
        !opts_parse_ms(cfg->flush_interval, 100, &cfg->flush_interval_us)) {
        fprintf(stderr,
                "walbust %s: --flush-interval must be auto or a number of milliseconds from 0 "
                "to 100 (e.g. 0.2 or 2), got \"%s\"\n",
                argv[1], cfg->flush_interval);
        return 2;
    }
    if (!audit_parse_rate(cfg->audit_rate, &(double){0})) {
        fprintf(stderr,
                "walbust %s: --audit-rate must be a percentage from 0 to 100 (e.g. 1, 0.5 or "
                "100%%), got \"%s\"\n",
                argv[1], cfg->audit_rate);
        return 2;
    }
    if ((cmd == CMD_RUN || cmd == CMD_CHECK || cmd == CMD_SETUP || cmd == CMD_AUDIT) &&
        cfg->rules == NULL) {
        fprintf(stderr, "walbust %s: --rules FILE is required (or set WALBUST_RULES)\n", argv[1]);
        return 2;
    }
    return 0;
}
