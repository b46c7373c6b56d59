/*
 * metrics.h — Prometheus metrics and health endpoints (docs/operations.md, Metrics and health).
 *
 * The daemon's loop records events with the functions below (cheap, lock-
 * free or briefly locked; callable from the loop while the HTTP thread
 * serves). metrics_listen() starts an HTTP server (libmicrohttpd, its own
 * thread) on ADDR ("127.0.0.1:9187", "[::1]:9187", ":9187" for all
 * interfaces) answering:
 *   GET /metrics  Prometheus text format 0.0.4
 *   GET /healthz  200 "ok" while the process runs
 *   GET /readyz   200 "ready" only while invalidations are being applied:
 *                 streaming from PostgreSQL (the active instance, not a
 *                 standby), every Redis target accepting batches, and every
 *                 MetricsCondition ok; else 503 with one failing reason per
 *                 line
 * Metric names and kinds are those of docs/operations.md (walbust_changes_total{table,op},
 * walbust_transactions_total, walbust_invalidations_total{action},
 * walbust_widened_total{table}, walbust_redis_errors_total,
 * walbust_retries_total, walbust_confirmed_lsn, walbust_received_lsn,
 * walbust_lag_bytes, walbust_commit_to_ack_seconds and
 * walbust_batch_stage_seconds{stage} histograms,
 * walbust_postgres_up, walbust_redis_up, walbust_refresh_writes_total{table},
 * walbust_refresh_fenced_total, walbust_refresh_fallback_deletes_total{table},
 * walbust_stale_marked_total{table}) plus per-target
 * walbust_redis_target_up{target}, walbust_role{role}, walbust_ready and
 * walbust_condition{condition}.
 */
#ifndef WALBUST_METRICS_H
#define WALBUST_METRICS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef enum MetricsCounter {
    METRICS_TRANSACTIONS,
    METRICS_REDIS_ERRORS,
    METRICS_RETRIES,
    METRICS_VISIBILITY_QUERIES,
    METRICS_VISIBILITY_WAITS,
    METRICS_REDIS_OOM,          /* writes Redis refused with -OOM */
    METRICS_REPLICA_SHORTFALLS, /* batches WAIT did not see on ?replicas=N */
    METRICS_LOOKUP_QUERIES,
    METRICS_LOOKUP_ERRORS,
    METRICS_REFRESH_FENCED, /* refresh writes the fence refused (a newer row is there) */
    METRICS_COUNTER_COUNT,
} MetricsCounter;

typedef enum MetricsAction {
    METRICS_ACTION_KEY,
    METRICS_ACTION_PATTERN,
    METRICS_ACTION_TAG,
    METRICS_ACTION_VERSION,
    METRICS_ACTION_PUBLISH,
    METRICS_ACTION_COUNT,
} MetricsAction;

/* Readiness conditions other modules flag (metrics_set_condition). Each is
 * ok until flagged otherwise; any one not ok makes /readyz 503. */
typedef enum MetricsCondition {
    METRICS_COND_RULES_VALID, /* the rules validate against the live schema */
    METRICS_COND_PUBLICATION, /* the publication exists and is usable */
    METRICS_COND_SLOT,        /* the replication slot exists and is not lost */
    METRICS_COND_LOOKUPS,     /* the batch's lookup queries run (lookup.h) */
    METRICS_COND_COUNT,
} MetricsCondition;

/* What this instance does with the slot (walbust_role{role}). */
typedef enum MetricsRole {
    METRICS_ROLE_STARTING, /* not streamed yet: connecting, checking */
    METRICS_ROLE_ACTIVE,   /* holds the slot (streaming, or reconnecting to it) */
    METRICS_ROLE_STANDBY,  /* the slot is active in another process */
    METRICS_ROLE_COUNT,
} MetricsRole;

typedef struct Metrics Metrics;

/* Create the registry (no server yet). Aborts on out of memory. */
Metrics *metrics_new(void);

/* Stop the server (if any) and free. Accepts NULL. */
void metrics_free(Metrics *m);

/* Start serving on addr; "off" (or NULL) serves nothing and returns 0.
 * Returns -1 with a message in err (e.g. address in use) on failure. */
int metrics_listen(Metrics *m, const char *addr, char *err, size_t errlen)
    __attribute__((warn_unused_result));

void metrics_inc(Metrics *m, MetricsCounter c, uint64_t n);
void metrics_change(Metrics *m, const char *table, const char *op); /* +1 */
/* +n (n changes counted by the caller; 0 adds nothing) */
void metrics_change_n(Metrics *m, const char *table, const char *op, uint64_t n);
void metrics_widened(Metrics *m, const char *table, uint64_t n);
/* One audit check of a key whose audit is declared on table (docs/audit.md):
 * walbust_audit_checked_total{table} +1, walbust_audit_stale_total{table}
 * +1 when stale. Thread-safe. */
void metrics_audit(Metrics *m, const char *table, bool stale);
void metrics_invalidations(Metrics *m, MetricsAction a, uint64_t n);

/* Refresh and stale rules' work for one change of table: writes of the
 * new row (fenced stores), refresh entries that deleted their key instead
 * (the change lacked a column's value), and keys marked stale. Nothing is
 * recorded (no label created) when all three are 0. */
void metrics_refresh(Metrics *m, const char *table, uint64_t writes, uint64_t fallback_deletes,
                     uint64_t stale_marks);

/* Positions in bytes (LSNs as integers). lag = server WAL end - confirmed. */
void metrics_positions(Metrics *m, uint64_t confirmed, uint64_t received, uint64_t server_end);

/* One transaction acknowledged by Redis `seconds` after its commit. */
void metrics_commit_to_ack(Metrics *m, double seconds);
/* The same for n commits acknowledged at now: commit_us[i] and now are
 * PostgreSQL timestamps (microseconds); one lock for all of them. */
void metrics_commits_acked(Metrics *m, int64_t now, const int64_t *commit_us, size_t n);

/* Where one acknowledged batch spent its time (seconds), for
 * walbust_batch_stage_seconds{stage}; see MetricsStage. Negative values
 * (clock skew in decode) count as 0, NaN is ignored. */
typedef enum MetricsStage {
    METRICS_STAGE_DECODE,     /* first commit's timestamp -> walbust decoded it */
    METRICS_STAGE_BATCH,      /* decoded -> flush began (gathering, lookups, spacing, retries) */
    METRICS_STAGE_VISIBILITY, /* waiting for a snapshot that sees the commits */
    METRICS_STAGE_REDIS,      /* sent -> every target acknowledged */
    METRICS_STAGE_COUNT
} MetricsStage;
void metrics_batch_stages(Metrics *m, const double seconds[METRICS_STAGE_COUNT]);

/* The flush interval in use (walbust_flush_interval_seconds): fixed by
 * --flush-interval, or what auto chose last (cpuwait.h). */
void metrics_flush_interval(Metrics *m, double seconds);

void metrics_postgres_up(Metrics *m, bool up);
/* target: a password-free description; index < 8. Same as
 * metrics_redis_target() without a reason. */
void metrics_redis_up(Metrics *m, int index, const char *target, bool up);

/* Record whether Redis target `index` (< 8) accepts batches. up = false
 * with reason (copied; NULL: "is down"), e.g. the error reply that refused
 * the last batch ("OOM command not allowed ..."), shown by /readyz. */
void metrics_redis_target(Metrics *m, int index, const char *target, bool up, const char *reason);

/* Flag a readiness condition: ok = false makes /readyz answer 503 with
 * reason (copied; NULL: the condition's name) until it is set ok again.
 * Callable from any module holding the Metrics; NULL m is ignored. */
void metrics_set_condition(Metrics *m, MetricsCondition c, bool ok, const char *reason);

/* Record this instance's role; a standby is not ready (it applies nothing)
 * but its Redis targets keep their own up/down state. detail (copied, may
 * be NULL) says why, e.g. the PostgreSQL message naming the active PID. */
void metrics_role(Metrics *m, MetricsRole role, const char *detail);

/* Render the Prometheus text into a malloc'd NUL-terminated string the
 * caller frees (what GET /metrics returns). */
char *metrics_render(Metrics *m);

/* Is the daemon ready (streaming, every Redis target up, every condition
 * ok)? */
bool metrics_ready(Metrics *m);

/* Why the daemon is not ready: every failing reason, one per line, into
 * buf (NUL-terminated, cut at len). Returns true (buf = "") when ready. */
bool metrics_ready_reasons(Metrics *m, char *buf, size_t len);

#endif
