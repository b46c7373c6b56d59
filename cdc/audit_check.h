/*
 * audit_check.h — one sound audit check of one cached key against the
 * database (docs/audit.md), with the I/O: the key through a Sink (any
 * Redis target form: single, Cluster, Sentinel, TLS), the database through
 * a read-only LookupExec connection, walbust's confirmed position through
 * the watermark key walbust writes to the same Redis after each
 * acknowledged batch (docs/freshness.md). The decisions are audit.h's.
 *
 * Used by `walbust audit` (audit_cmd.c) and by the daemon's audit thread
 * (audit_run.c); one checker per thread. Does not log.
 */
#ifndef WALBUST_AUDIT_CHECK_H
#define WALBUST_AUDIT_CHECK_H

#include <signal.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "rules.h"
#include "sink.h"

typedef enum AuditOutcome {
    AUDIT_OUT_SKIPPED,    /* nothing to check (see AuditFinding.why) */
    AUDIT_OUT_CLEAN,      /* consistent, or not a finding */
    AUDIT_OUT_STALE,      /* a stale entry */
    AUDIT_OUT_UNVERIFIED, /* differs, but the watermark did not reach P in time */
    AUDIT_OUT_ERROR,      /* Redis or PostgreSQL failed (audit_checker_errstr()) */
} AuditOutcome;

typedef struct AuditFinding {
    AuditOutcome outcome;
    const char *why; /* SKIPPED: a static phrase ("the key does not exist", ...) */
    char *cached;    /* the value read (owned; NULL when none) */
    size_t cached_len;
    char *db; /* the audit SQL's value (owned; NULL: absent) */
    size_t db_len;
    uint64_t read_lsn;  /* P: the WAL insert position after the database read */
    uint64_t confirmed; /* the watermark when the key was read again */
    /* SKIPPED because the audit's SQL refused the values read from the key
     * (a data exception, e.g. a key of another template that the audit key
     * also matches): PostgreSQL's message. */
    bool refused;
    char refusal[256];
} AuditFinding;

typedef struct AuditChecker AuditChecker;

/* A checker reading keys through sink (borrowed), the database through its
 * own read-only connection to conninfo, and the watermark at watermark_key
 * (copied). wait_ms: how long to wait for the watermark to pass P before
 * the check is UNVERIFIED. stop (may be NULL) ends a wait early when set.
 * Never NULL. */
AuditChecker *audit_checker_new(Sink *sink, const char *conninfo, const char *watermark_key,
                                int wait_ms, const volatile sig_atomic_t *stop);

/* Close the database connection and free. Accepts NULL. */
void audit_checker_free(AuditChecker *c);

/* Check key (len bytes) against rule ri's audit of r (see audit.h for the
 * steps). Fills *f (release with audit_finding_release()); returns 0, or
 * -1 when Redis or PostgreSQL failed (f->outcome AUDIT_OUT_ERROR). */
int audit_check_key(AuditChecker *c, const Rules *r, size_t ri, const char *key, size_t len,
                    AuditFinding *f);

void audit_finding_release(AuditFinding *f);

/* Delete key if it still holds value (atomically, with a script), so a
 * value filled since the finding is kept. Returns 1 deleted, 0 the key
 * changed meanwhile, -1 on an error. */
int audit_checker_heal(AuditChecker *c, const char *key, size_t len, const char *value,
                       size_t vlen);

/* The keys of SCAN pages: audit_keys_take() is a SinkReplyFn for
 * sink_scan_page() that appends a page's keys to an AuditKeys (arg). */
typedef struct AuditKeys {
    char **keys;
    size_t *lens;
    size_t n, cap;
} AuditKeys;

int audit_keys_take(void *arg, const redisReply *page);
void audit_keys_clear(AuditKeys *k); /* frees the keys, keeps the buffers */
void audit_keys_free(AuditKeys *k);  /* frees everything */

/* The first rule whose audit key matches key unambiguously (*ri), or false. */
bool audit_rule_for_key(const Rules *r, const char *key, size_t len, size_t *ri);

/* The indices of r's rules that have an audit, in order (*n of them; free
 * the array). For callers that match many keys: audit_rule_for_key_in()
 * then costs the audited rules, not every rule of the file. */
size_t *audit_index_build(const Rules *r, size_t *n);

/* audit_rule_for_key() over the rules idx names (from audit_index_build). */
bool audit_rule_for_key_in(const Rules *r, const size_t *idx, size_t n, const char *key, size_t len,
                           size_t *ri);

/* Why the last call failed. */
const char *audit_checker_errstr(const AuditChecker *c);

#endif
