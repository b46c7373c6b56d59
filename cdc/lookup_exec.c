/*
 * lookup_exec.c — running lookups on a read-only connection (see
 * lookup_exec.h). Statements are named walbust_lookup_<rule index> and
 * remembered with the text they were prepared from, so a rules reload that
 * changes a lookup re-prepares it. Results of a whole run are kept until
 * every query succeeded, then rendered at once.
 */
#include "lookup_exec.h"

#include <errno.h>
#include <libpq-fe.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lsn.h"
#include "mem.h"
#include "runtime.h"
#include "stream.h"

typedef struct Stmt {
    char *sql; /* the wrapped text it was prepared from; NULL: not prepared */
    size_t nfields;
    char **fields;
} Stmt;

struct LookupExec {
    char *conninfo;
    int timeout_ms;
    PGconn *conn;
    Stmt *stmts; /* per rule index */
    size_t nstmts;
    Stmt *astmts; /* audits, per rule index */
    size_t nastmts;
    char app[64]; /* application_name */
    char errstr[1024];
    LookupExecStats stats;
};

LookupExec *lookup_exec_new(const char *conninfo, int timeout_ms)
{
    LookupExec *x = xcalloc(1, sizeof *x);

    x->conninfo = xstrdup(conninfo ? conninfo : "");
    x->timeout_ms = timeout_ms > 0 ? timeout_ms : 5000;
    snprintf(x->app, sizeof x->app, "walbust lookup");
    return x;
}

static void stmt_forget(Stmt *s)
{
    for (size_t i = 0; i < s->nfields; i++)
        free(s->fields[i]);
    free(s->fields);
    free(s->sql);
    memset(s, 0, sizeof *s);
}

/* Drop the connection and with it every prepared statement. */
static void drop_conn(LookupExec *x)
{
    if (x->conn != NULL)
        PQfinish(x->conn);
    x->conn = NULL;
    for (size_t i = 0; i < x->nstmts; i++)
        stmt_forget(&x->stmts[i]);
    for (size_t i = 0; i < x->nastmts; i++)
        stmt_forget(&x->astmts[i]);
}

void lookup_exec_free(LookupExec *x)
{
    if (x == NULL)
        return;
    drop_conn(x);
    free(x->stmts);
    free(x->astmts);
    free(x->conninfo);
    free(x);
}

/* PostgreSQL's message for the connection or a result, one line. */
static void pg_msg(const PGconn *conn, const PGresult *res, char *out, size_t n)
{
    const char *m = res != NULL ? PQresultErrorMessage(res) : "";

    if (m == NULL || m[0] == '\0')
        m = conn != NULL ? PQerrorMessage(conn) : "no connection";
    snprintf(out, n, "%s", m);
    out[strcspn(out, "\n")] = '\0';
}

static int fail(LookupExec *x, const char *what, const PGresult *res)
{
    char msg[768];

    pg_msg(x->conn, res, msg, sizeof msg);
    snprintf(x->errstr, sizeof x->errstr, "%s: %s", what, msg);
    x->stats.errors++;
    drop_conn(x);
    return -1;
}

static int ensure_conn(LookupExec *x)
{
    char sql[256];
    PGresult *res;

    if (x->conn != NULL && PQstatus(x->conn) == CONNECTION_OK)
        return 0;
    drop_conn(x);
    x->conn = stream_plain_connect(x->conninfo, x->errstr, sizeof x->errstr);
    if (x->conn == NULL) {
        x->stats.errors++;
        return -1;
    }
    snprintf(sql, sizeof sql,
             "SET default_transaction_read_only = on; SET statement_timeout = %d; "
             "SET application_name = '%s'",
             x->timeout_ms, x->app);
    res = PQexec(x->conn, sql);
    if (PQresultStatus(res) != PGRES_COMMAND_OK) {
        int rc = fail(x, "could not set up the lookup connection", res);
        PQclear(res);
        return rc;
    }
    PQclear(res);
    return 0;
}

/* Statement slot ri of *arr (grown to hold it). */
static Stmt *stmt_slot(Stmt **arr, size_t *n, size_t ri)
{
    if (ri >= *n) {
        *arr = xrealloc(*arr, (ri + 1) * sizeof **arr);
        memset(*arr + *n, 0, (ri + 1 - *n) * sizeof **arr);
        *n = ri + 1;
    }
    return &(*arr)[ri];
}

/* Prepare sql (owned, taken) as statement name into s unless s was
 * prepared from the same text. */
static int prepare_stmt(LookupExec *x, Stmt *s, const char *name, char *sql, const char *what)
{
    PGresult *res;

    if (s->sql != NULL && strcmp(s->sql, sql) == 0) {
        free(sql);
        return 0;
    }
    if (s->sql != NULL) {
        char dealloc[96];
        snprintf(dealloc, sizeof dealloc, "DEALLOCATE %s", name);
        PQclear(PQexec(x->conn, dealloc));
        stmt_forget(s);
    }
    res = PQprepare(x->conn, name, sql, 0, NULL);
    if (PQresultStatus(res) != PGRES_COMMAND_OK) {
        int rc = fail(x, what, res);
        free(sql);
        PQclear(res);
        return rc;
    }
    PQclear(res);
    res = PQdescribePrepared(x->conn, name);
    if (PQresultStatus(res) != PGRES_COMMAND_OK) {
        int rc = fail(x, what, res);
        free(sql);
        PQclear(res);
        return rc;
    }
    s->nfields = (size_t)PQnfields(res);
    s->fields = xcalloc(s->nfields + 1, sizeof *s->fields);
    for (size_t i = 0; i < s->nfields; i++)
        s->fields[i] = xstrdup(PQfname(res, (int)i));
    PQclear(res);
    s->sql = sql;
    return 0;
}

/* Prepare rule i's lookup unless prepared from the same text. */
static int ensure_stmt(LookupExec *x, const Rules *r, size_t ri)
{
    RulesLookupInfo info;
    char name[64], what[256];

    if (!rules_lookup_info(r, ri, &info)) {
        snprintf(x->errstr, sizeof x->errstr, "rule %zu has no lookup", ri);
        return -1;
    }
    snprintf(name, sizeof name, "walbust_lookup_%zu", ri);
    snprintf(what, sizeof what, "lookup of the rule for %s (rules file line %d)", info.table,
             info.line);
    return prepare_stmt(x, stmt_slot(&x->stmts, &x->nstmts, ri), name,
                        lookup_wrap_sql(info.sql, info.limit), what);
}

/* Wait until a result can be read without blocking. */
static int wait_ready(LookupExec *x, int64_t deadline, void (*tick)(void *), void *targ)
{
    while (PQisBusy(x->conn)) {
        int64_t left = deadline - runtime_now_us();
        struct pollfd pfd = {.fd = PQsocket(x->conn), .events = POLLIN};
        int rc;

        /* Not cut short by a stop request: the drain on SIGTERM runs the
         * last batch's lookups too, bounded by the deadline. */
        if (left <= 0) {
            snprintf(x->errstr, sizeof x->errstr, "lookups got no reply within %d ms",
                     x->timeout_ms + 2000);
            x->stats.errors++;
            drop_conn(x);
            return -1;
        }
        rc = poll(&pfd, 1, left > 100000 ? 100 : (int)((left + 999) / 1000));
        if (rc < 0 && errno != EINTR) {
            snprintf(x->errstr, sizeof x->errstr, "poll: %s", strerror(errno));
            x->stats.errors++;
            drop_conn(x);
            return -1;
        }
        if (rc == 0 && tick != NULL)
            tick(targ);
        if (rc > 0 && !PQconsumeInput(x->conn))
            return fail(x, "lookup connection", NULL);
    }
    return 0;
}

/* Send queries [from, to) in one pipeline and collect their results in
 * out[q - from]. */
static int run_chunk(LookupExec *x, const Rules *r, const LookupBatch *b, size_t from, size_t to,
                     PGresult **out, void (*tick)(void *), void *targ)
{
    int64_t deadline = runtime_now_us() + (int64_t)(x->timeout_ms + 2000) * 1000;
    PGresult *res;

    if (!PQenterPipelineMode(x->conn))
        return fail(x, "could not enter pipeline mode", NULL);
    for (size_t q = from; q < to; q++) {
        LookupQuery lq;
        char name[64];
        lookup_batch_query(b, q, &lq);
        if (!lq.run)
            continue;
        snprintf(name, sizeof name, "walbust_lookup_%zu", lq.rule);
        if (!PQsendQueryPrepared(x->conn, name, (int)lq.nargs, lq.args, lq.arglens, NULL, 0))
            return fail(x, "could not send a lookup", NULL);
        x->stats.queries++;
    }
    if (!PQpipelineSync(x->conn))
        return fail(x, "could not send a lookup", NULL);
    x->stats.round_trips++;
    for (size_t q = from; q < to; q++) {
        LookupQuery lq;
        lookup_batch_query(b, q, &lq);
        if (!lq.run)
            continue;
        if (wait_ready(x, deadline, tick, targ) != 0)
            return -1;
        res = PQgetResult(x->conn);
        if (PQresultStatus(res) != PGRES_TUPLES_OK) {
            RulesLookupInfo info = {0};
            char what[256];
            int rc;
            (void)rules_lookup_info(r, lq.rule, &info);
            snprintf(what, sizeof what, "lookup of the rule for %s (rules file line %d) failed",
                     info.table ? info.table : "?", info.line);
            rc = fail(x, what, res);
            PQclear(res);
            return rc;
        }
        out[q - from] = res;
        if (wait_ready(x, deadline, tick, targ) != 0)
            return -1;
        PQclear(PQgetResult(x->conn)); /* the NULL that ends this query's results */
    }
    if (wait_ready(x, deadline, tick, targ) != 0)
        return -1;
    res = PQgetResult(x->conn);
    if (PQresultStatus(res) != PGRES_PIPELINE_SYNC) {
        int rc = fail(x, "lookup pipeline", res);
        PQclear(res);
        return rc;
    }
    PQclear(res);
    if (!PQexitPipelineMode(x->conn))
        return fail(x, "could not leave pipeline mode", NULL);
    return 0;
}

/* Rows of one result as RulesValues (borrowing res). */
static void rows_of(const PGresult *res, const Stmt *s, LookupRows *out, RulesValue **vals)
{
    size_t nf = s->nfields, nr = res != NULL ? (size_t)PQntuples(res) : 0;

    *vals = xcalloc(nf * nr + 1, sizeof **vals);
    for (size_t i = 0; i < nr; i++)
        for (size_t j = 0; j < nf; j++) {
            RulesValue *v = &(*vals)[i * nf + j];
            if (PQgetisnull(res, (int)i, (int)j))
                *v = (RulesValue){RULES_VAL_NULL, NULL, 0};
            else
                *v = (RulesValue){RULES_VAL_TEXT, PQgetvalue(res, (int)i, (int)j),
                                  (size_t)PQgetlength(res, (int)i, (int)j)};
        }
    *out = (LookupRows){nf, (const char *const *)s->fields, nr, *vals};
}

/* Run queries [from, to) and render their calls. */
static int run_range(LookupExec *x, const Rules *r, const LookupBatch *b, size_t from, size_t to,
                     RulesEmitFn emit, LookupWidenedFn widened, void *arg, void (*tick)(void *),
                     void *targ, LookupRenderStats *st)
{
    PGresult *res[LOOKUP_EXEC_PIPELINE] = {NULL};
    LookupRows rows[LOOKUP_EXEC_PIPELINE];
    RulesValue *vals[LOOKUP_EXEC_PIPELINE] = {NULL};
    int rc = run_chunk(x, r, b, from, to, res, tick, targ);

    if (rc == 0) {
        for (size_t q = from; q < to; q++) {
            LookupQuery lq;
            lookup_batch_query(b, q, &lq);
            rows_of(res[q - from], &x->stmts[lq.rule], &rows[q - from], &vals[q - from]);
        }
        lookup_batch_render_range(b, r, from, to, rows, emit, widened, arg, st);
    }
    for (size_t i = 0; i < to - from; i++) {
        PQclear(res[i]);
        free(vals[i]);
    }
    return rc;
}

int lookup_exec_run(LookupExec *x, const Rules *r, const LookupBatch *b, RulesEmitFn emit,
                    LookupWidenedFn widened, void *arg, void (*tick)(void *), void *targ,
                    LookupRenderStats *st)
{
    size_t n = lookup_batch_queries(b);
    int rc;

    x->errstr[0] = '\0';
    rc = ensure_conn(x);
    for (size_t q = 0; rc == 0 && q < n; q++) {
        LookupQuery lq;
        lookup_batch_query(b, q, &lq);
        rc = ensure_stmt(x, r, lq.rule);
    }
    /* Rendered chunk by chunk, so at most LOOKUP_EXEC_PIPELINE results are
     * held; a later chunk failing leaves earlier renderings in the targets'
     * batches, which the retry renders again (invalidations are idempotent
     * and each batch applies a string once). */
    for (size_t q = 0; rc == 0 && q < n; q += LOOKUP_EXEC_PIPELINE)
        rc = run_range(x, r, b, q, q + LOOKUP_EXEC_PIPELINE < n ? q + LOOKUP_EXEC_PIPELINE : n,
                       emit, widened, arg, tick, targ, st);
    return rc;
}

const LookupExecStats *lookup_exec_stats(const LookupExec *x)
{
    return &x->stats;
}

const char *lookup_exec_errstr(const LookupExec *x)
{
    return x->errstr;
}

/* ---- audits ------------------------------------------------------------ */

void lookup_exec_set_name(LookupExec *x, const char *app)
{
    snprintf(x->app, sizeof x->app, "%s", app);
}

void lookup_audit_read_release(LookupAuditRead *rd)
{
    free(rd->value);
    memset(rd, 0, sizeof *rd);
}

/* The single text value of a one-row-one-column result into rd. */
static int take_audit_rows(LookupExec *x, const PGresult *res, LookupAuditRead *rd)
{
    rd->rows = (size_t)PQntuples(res);
    if (PQnfields(res) != 1) {
        snprintf(x->errstr, sizeof x->errstr,
                 "the audit's SQL returned %d columns; it must return exactly one", PQnfields(res));
        return -1;
    }
    if (rd->rows == 1 && !PQgetisnull(res, 0, 0)) {
        rd->len = (size_t)PQgetlength(res, 0, 0);
        rd->value = xstrndup(PQgetvalue(res, 0, 0), rd->len);
    }
    return 0;
}

/* Did the statement refuse the values with a data exception (SQLSTATE
 * class 22: invalid_text_representation, numeric_value_out_of_range, ...)?
 * The values are then not a row's key, e.g. "5:detail" for an integer id
 * read from a key of another template that the audit key also matches.
 * Outside a transaction block, the connection stays usable. */
static bool refused(LookupExec *x, const PGresult *res, LookupAuditRead *rd)
{
    const char *state = PQresultErrorField(res, PG_DIAG_SQLSTATE);

    if (PQresultStatus(res) != PGRES_FATAL_ERROR || state == NULL || strncmp(state, "22", 2) != 0 ||
        PQtransactionStatus(x->conn) != PQTRANS_IDLE)
        return false;
    rd->refused = true;
    pg_msg(x->conn, res, rd->refusal, sizeof rd->refusal);
    return true;
}

int lookup_exec_audit(LookupExec *x, const Rules *r, size_t ri, const RulesAuditArgs *args,
                      LookupAuditRead *rd)
{
    RulesAuditInfo info;
    char name[64], what[256];
    PGresult *res;
    int rc;

    memset(rd, 0, sizeof *rd);
    x->errstr[0] = '\0';
    if (!rules_audit_info(r, ri, &info)) {
        snprintf(x->errstr, sizeof x->errstr, "rule %zu has no audit", ri);
        return -1;
    }
    snprintf(name, sizeof name, "walbust_audit_%zu", ri);
    snprintf(what, sizeof what, "audit of the rule for %s (rules file line %d)", info.table,
             info.line);
    if (ensure_conn(x) != 0 || prepare_stmt(x, stmt_slot(&x->astmts, &x->nastmts, ri), name,
                                            lookup_wrap_sql(info.sql, 1), what) != 0)
        return -1;
    x->stats.queries++;
    res = PQexecPrepared(x->conn, name, (int)args->n, (const char *const *)args->args, args->lens,
                         NULL, 0);
    if (refused(x, res, rd)) {
        PQclear(res);
        return 0;
    }
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        rc = fail(x, what, res);
        PQclear(res);
        return rc;
    }
    rc = take_audit_rows(x, res, rd);
    PQclear(res);
    if (rc != 0)
        return -1;
    /* After the statement: every commit its snapshot saw ends before this. */
    res = PQexec(x->conn, "SELECT pg_current_wal_insert_lsn()::text");
    if (PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) != 1 ||
        !lsn_parse(PQgetvalue(res, 0, 0), &rd->lsn)) {
        rc = fail(x, "could not read the WAL position after an audit read", res);
        PQclear(res);
        lookup_audit_read_release(rd);
        return rc;
    }
    PQclear(res);
    x->stats.round_trips += 2;
    return 0;
}
