/*
 * opts.h — command line and environment options (docs/cli.md).
 *
 * Options are described by one table (opts.c): long name, environment
 * variable, argument, default, the subcommands that accept it and the help
 * text. `walbust --help` is generated from the same table, so usage and
 * parsing cannot drift apart. A flag wins over its environment variable.
 */
#ifndef WALBUST_OPTS_H
#define WALBUST_OPTS_H

#include <stdbool.h>
#include <stdio.h>

#define OPTS_MAX_REDIS 8

typedef enum OptsCommand {
    CMD_NONE,
    CMD_RUN,
    CMD_CHECK,
    CMD_DECODE,
    CMD_SETUP,
    CMD_STATUS,
    CMD_TEARDOWN,
    CMD_AUDIT,
    CMD_HELP,
    CMD_VERSION,
} OptsCommand;

typedef struct Config {
    OptsCommand command;
    OptsCommand help_for;               /* CMD_HELP: usage of this command */
    const char *pg;                     /* conninfo or URI; "" = libpq defaults */
    const char *redis[OPTS_MAX_REDIS];  /* at least one after opts_parse() */
    int nredis;
    const char *rules;
    const char *slot;
    bool slot_given;                    /* --slot/WALBUST_SLOT set explicitly */
    const char *publication;
    bool create_slot;
    const char *metrics;
    const char *log_format;
    const char *log_level;
    const char *until;                  /* decode: stop at this LSN */
    long max_changes;                   /* decode: stop after N changes; 0 = no limit */
    bool json;                          /* status --json */
    bool replica_identity_full;         /* setup */
    const char *on_slot_lost;           /* run: "fail" (default) or "flush-rules" */
    bool yes;                           /* teardown: drop without asking */
    bool force;                         /* teardown: terminate the slot's walsender */
    long schema_recheck;                /* run: seconds between catalog re-checks; 0 = 30 */
    const char *flush_interval;         /* run: ms between Redis writes, as given */
    long flush_interval_us;             /* ... parsed (opts_parse_ms); 0 when auto */
    bool flush_interval_auto;           /* ... is "auto" (run_cmd.c, cpuwait.h) */
    const char *audit_rate;     /* run: percent of invalidated audited keys checked */
    long audit_delay;           /* run: ms after the invalidation; 0 = 1000 */
    long audit_max_checks;      /* run: checks per second at most; 0 = 20 */
    long audit_scan_interval;   /* run: seconds between background scans; 0 = 300 */
    bool audit_no_scan;         /* run: no background scan */
    bool audit_heal;            /* run: delete a stale entry when found */
    long sample;                /* audit: check at most N keys; 0 = all */
} Config;

/* Parse argv and the environment into *cfg. Returns 0 on success, 2 on a
 * usage error (message already printed to stderr with a hint). Strings in
 * cfg point into argv or the environment (no allocation). */
int opts_parse(int argc, char **argv, Config *cfg) __attribute__((warn_unused_result));

/* Parse a number of milliseconds from 0 to max_ms ("0.2", "5") into
 * microseconds (rounded). False on anything else (NaN, negative, junk). */
bool opts_parse_ms(const char *text, double max_ms, long *out_us);

/* Print usage for the whole program (or one command when cmd != CMD_NONE). */
void opts_usage(FILE *out, OptsCommand cmd);

#endif
