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
 *   GET /readyz   200 only while streaming from PostgreSQL and Redis answers,
 *                 else 503 with the reason
 * Metric names and kinds are those of docs/operations.md (walbust_changes_total{table,op},
 * walbust_transactions_total, walbust_invalidations_total{action},
 * walbust_widened_total{table}, walbust_redis_errors_total,
 * walbust_retries_total, walbust_confirmed_lsn, walbust_received_lsn,
 * walbust_lag_bytes, walbust_commit_to_ack_seconds histogram,
 * walbust_postgres_up, walbust_redis_up) plus per-target
 * walbust_redis_target_up{target}.
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
void metrics_widened(Metrics *m, const char *table, uint64_t n);
void metrics_invalidations(Metrics *m, MetricsAction a, uint64_t n);

/* Positions in bytes (LSNs as integers). lag = server WAL end - confirmed. */
void metrics_positions(Metrics *m, uint64_t confirmed, uint64_t received, uint64_t server_end);

/* One transaction acknowledged by Redis `seconds` after its commit. */
void metrics_commit_to_ack(Metrics *m, double seconds);

void metrics_postgres_up(Metrics *m, bool up);
/* target: a password-free description; index < 8. */
void metrics_redis_up(Metrics *m, int index, const char *target, bool up);

/* Render the Prometheus text into a malloc'd NUL-terminated string the
 * caller frees (what GET /metrics returns). */
char *metrics_render(Metrics *m);

/* Is the daemon ready (streaming and every Redis target up)? */
bool metrics_ready(Metrics *m);

#endif
