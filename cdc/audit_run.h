/*
 * audit_run.h — the cache audit while walbust runs (docs/audit.md): a
 * thread of its own that checks audited keys without ever blocking the
 * stream.
 *
 * Keys come two ways: the streaming thread offers every key it invalidates
 * (audit_run_note(): when the key matches an audit, a share --audit-rate of
 * them is queued with the change that invalidated it, to be checked
 * --audit-delay later), and a slow background SCAN over every audit key's
 * pattern (the keys no rule ever invalidates). Both go through one token
 * bucket (--audit-max-checks per second). Each check is audit_check.h's
 * sound check, on every Redis target, through the thread's own Redis and
 * read-only PostgreSQL connections. Findings are counted
 * (walbust_audit_checked_total / walbust_audit_stale_total{table}, and in
 * the hash walbust:audit:<slot> of each target, which `walbust status`
 * reads), each stale finding is logged once, and with --audit-heal the
 * stale key is deleted if it still holds the stale value.
 */
#ifndef WALBUST_AUDIT_RUN_H
#define WALBUST_AUDIT_RUN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "metrics.h"
#include "rules.h"

typedef struct AuditRunConfig {
    const char *conninfo;    /* PostgreSQL (read-only use) */
    const char *const *urls; /* Redis targets, as given */
    int nurls;
    const char *rules_path; /* re-read on audit_run_reload() */
    const char *slot;       /* watermark walbust:confirmed:<slot> */
    double rate;            /* share of audited invalidations checked, 0..1 */
    int delay_ms;           /* after the invalidation */
    int max_checks;         /* per second */
    int scan_interval_s;    /* between background scans; < 0: no scan */
    bool heal;              /* delete stale keys */
} AuditRunConfig;

typedef struct AuditRun AuditRun;

/* Start the audit thread (strings copied; metrics borrowed, may be NULL).
 * Returns NULL, with a message in err, when the rules file has no audit
 * (nothing to do: not an error for the caller) or the thread cannot be
 * started (err says so). */
AuditRun *audit_run_start(const AuditRunConfig *cfg, Metrics *metrics, char *err, size_t errlen);

/* Start the audit from walbust run's options (--audit-*; docs/audit.md):
 * NULL when turned off (--audit-rate 0 and --audit-no-scan) or it could
 * not start (logged; walbust runs without it). The thread idles while the
 * rules declare no audit, so a reload that adds one starts auditing. */
struct Config;
AuditRun *audit_run_from_config(const struct Config *c, const Rules *rules, Metrics *metrics);

/* Offer a key the streaming thread invalidates (action key), with the
 * change: rules is the streaming thread's, for the match. Cheap when the
 * key is not sampled; never blocks on I/O. Accepts a NULL a. */
void audit_run_note(AuditRun *a, const Rules *rules, const char *key, size_t len,
                    const RulesChange *chg);

/* The rules were swapped (a SIGHUP reload): forget what was derived from
 * the old ones and re-read the rules file in the audit thread. Call it on
 * the streaming thread, like audit_run_note(). */
void audit_run_reload(AuditRun *a);

/* Stop the thread (a check in progress ends within about a second) and
 * free. Accepts NULL. */
void audit_run_stop(AuditRun *a);

#endif
