/*
 * lookup_exec.h — running a batch's lookups on PostgreSQL.
 *
 * A separate connection, read-only (default_transaction_read_only) with a
 * statement_timeout, opened lazily. Each lookup rule's SQL is prepared once
 * per connection, wrapped to return at most limit + 1 rows
 * (lookup_wrap_sql()). A batch's distinct queries are sent in pipeline mode
 * (up to LOOKUP_EXEC_PIPELINE per round trip), so a flush costs one round
 * trip per 128 distinct lookups instead of one per changed row, and each
 * chunk is rendered before the next is sent (bounded memory). Any error —
 * a query, the connection, the client-side deadline — fails the whole run
 * and drops the connection (re-prepared on the next try): the caller keeps
 * the batch, retries with backoff, and confirms nothing past it.
 */
#ifndef WALBUST_LOOKUP_EXEC_H
#define WALBUST_LOOKUP_EXEC_H

#include "lookup.h"
#include "rules.h"

#include <stdbool.h>
#include <stdint.h>

#define LOOKUP_EXEC_PIPELINE 128

typedef struct LookupExec LookupExec;

/* An executor for conninfo (copied), with a per-statement timeout (ms; the
 * client gives up 2 s after it). Never NULL; connects on first use. */
LookupExec *lookup_exec_new(const char *conninfo, int timeout_ms);

/* Close the connection and free x. Accepts NULL. */
void lookup_exec_free(LookupExec *x);

/* Run every query of b for rules r and render the results through emit
 * and widened (lookup_batch_render_range()). tick(arg) is called about
 * every 100 ms while waiting. Returns 0 when everything was rendered (the
 * caller then clears b), -1 otherwise (lookup_exec_errstr(); chunks
 * rendered before the failure may have been emitted: the caller must not
 * apply or confirm the batch, and renders them again on retry). */
int lookup_exec_run(LookupExec *x, const Rules *r, const LookupBatch *b, RulesEmitFn emit,
                    LookupWidenedFn widened, void *arg, void (*tick)(void *), void *targ,
                    LookupRenderStats *st);

/* Round trips (pipeline syncs) and queries sent since lookup_exec_new(). */
typedef struct LookupExecStats {
    unsigned long long round_trips, queries, errors;
} LookupExecStats;

const LookupExecStats *lookup_exec_stats(const LookupExec *x);

/* Why the last run failed; "" after a success. */
const char *lookup_exec_errstr(const LookupExec *x);

/* ---- audits (docs/audit.md) ------------------------------------------ */

/* application_name of the connection ("walbust lookup" by default); takes
 * effect on the next connect. */
void lookup_exec_set_name(LookupExec *x, const char *app);

/* One audit read: rows 0 (no row), 1, or 2 (more than one: not
 * checkable); value NULL for no row or SQL NULL (the key must not exist),
 * else the first column's text (owned: lookup_audit_read_release()); lsn
 * the WAL insert position read right after the statement, so every
 * commit its snapshot saw ends at or before it.
 * refused: the statement raised a data exception (SQLSTATE class 22, e.g.
 * 22P02 for "5:detail" as an integer): the values are not a row's key.
 * Then rows is 0 and value NULL, which mean nothing (not "no row"), lsn
 * is 0, and refusal holds PostgreSQL's message. */
typedef struct LookupAuditRead {
    size_t rows;
    char *value;
    size_t len;
    uint64_t lsn;
    bool refused;
    char refusal[256];
} LookupAuditRead;

void lookup_audit_read_release(LookupAuditRead *rd);

/* Run rule ri's audit SQL (prepared once per connection, as
 * SELECT * FROM (<sql>) LIMIT 2) with args, then read the WAL insert
 * position. Returns 0 (also when the SQL refused the values: rd->refused;
 * the connection stays), or -1 (lookup_exec_errstr(); the connection is
 * dropped and opened again on the next call). */
int lookup_exec_audit(LookupExec *x, const Rules *r, size_t ri, const RulesAuditArgs *args,
                      LookupAuditRead *rd) __attribute__((warn_unused_result));

#endif
