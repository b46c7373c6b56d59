/*
 * cmds.h — the subcommands. Only main.c calls these; each returns the
 * process exit code (0 ok, 1 runtime or configuration error, 2 usage).
 */
#ifndef WALBUST_CMDS_H
#define WALBUST_CMDS_H

#include <stdio.h>

#include "opts.h"
#include "rules.h"

int cmd_run(const Config *cfg);
int cmd_decode(const Config *cfg);
int cmd_check(const Config *cfg);
int cmd_setup(const Config *cfg);
int cmd_status(const Config *cfg);
int cmd_teardown(const Config *cfg);
int cmd_audit(const Config *cfg);

struct cJSON;
/* walbust status: add the cache audit's counts (the hash walbust:audit:<slot>
 * in each --redis target, summed) to obj as audit_checked, audit_stale,
 * audit_nines, audit_consistency and audit_tables (audit_error when a
 * target could not be read). Nothing when rules declare no audit.
 * (audit_cmd.c) */
void cmd_audit_status(const Config *cfg, const Rules *rules, struct cJSON *obj);

/* Read and compile a rules file. On failure prints every problem as
 * "FILE:LINE:COLUMN: message" (or "FILE: message") to report, or logs each
 * as an error event (log.h: a JSON line under --log-format json) when
 * report is NULL, and returns NULL. (check_cmd.c) */
Rules *cmd_load_rules(const char *path, FILE *report);

/* Print each problem on its own line as "PREFIXFILE:LINE:COLUMN: message
 * (at json.path)", dropping the parts that are unknown; out = NULL logs
 * each as an error event instead. (check_cmd.c) */
void cmd_print_problems(FILE *out, const char *prefix, const char *path,
                        const RulesProblems *problems);

/* One problem as "FILE:LINE:COLUMN: message (at json.path)" into buf (cut
 * at len). (check_cmd.c) */
void cmd_format_problem(char *buf, size_t len, const char *path, const RulesProblem *p);

#endif
