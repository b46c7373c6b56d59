/*
 * visible.c — wait until decoded commits are visible to other sessions.
 *
 * See visible.h for why. A Visible keeps the xids of the transactions whose
 * invalidations are queued for the next Redis batch; visible_wait() asks
 * PostgreSQL for pg_current_snapshot() and drops every xid the snapshot sees
 * as completed, polling until none is left or the time is up. Transactions
 * reach walbust only after their commit record is flushed, so each one is
 * either already visible or about to be (or, with synchronous replication,
 * waiting for its standby).
 */
#include "visible.h"

#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <libpq-fe.h>

#include "runtime.h"
#include "stream.h"
#include "mem.h"

struct Visible {
    char *conninfo;
    PGconn *conn;
    bool inflight; /* a snapshot query was sent and its reply is not read yet */
    uint32_t *xids;
    size_t n, cap;
    VisibleSnapshot last; /* the newest snapshot read (zeroed: none) */
    VisibleStats stats;
    char errstr[512];
};

#define SNAPSHOT_SQL "SELECT pg_catalog.pg_current_snapshot()::text"
/* The same query as a prepared statement: the server skips parsing and
 * planning, a third of its CPU per query (20 vs 31 µs, measured). */
#define SNAPSHOT_STMT "walbust_snapshot"

/* One decimal xid8 at *p, advancing *p. Returns 0 or -1. */
static int parse_xid8(const char **p, uint64_t *out)
{
    char *end;

    if (**p < '0' || **p > '9')
        return -1;
    errno = 0;
    *out = strtoull(*p, &end, 10);
    if (errno != 0)
        return -1;
    *p = end;
    return 0;
}

int visible_snapshot_parse(const char *text, VisibleSnapshot *out)
{
    const char *p = text;
    VisibleSnapshot s = {0};
    size_t cap = 0;

    memset(out, 0, sizeof *out);
    if (parse_xid8(&p, &s.xmin) != 0 || *p++ != ':' || parse_xid8(&p, &s.xmax) != 0 ||
        *p++ != ':' || s.xmin > s.xmax)
        return -1;
    while (*p != '\0') {
        uint64_t x;

        if (parse_xid8(&p, &x) != 0 || (*p != ',' && *p != '\0') || x < s.xmin || x >= s.xmax ||
            (s.nxip > 0 && x <= s.xip[s.nxip - 1])) {
            free(s.xip);
            return -1;
        }
        s.xip = xgrow(s.xip, &cap, s.nxip + 1, sizeof *s.xip);
        s.xip[s.nxip++] = x;
        if (*p == ',' && *++p == '\0') { /* a trailing comma */
            free(s.xip);
            return -1;
        }
    }
    *out = s;
    return 0;
}

void visible_snapshot_release(VisibleSnapshot *s)
{
    free(s->xip);
    memset(s, 0, sizeof *s);
}

bool visible_snapshot_sees(const VisibleSnapshot *s, uint32_t xid)
{
    /* Place the 32-bit xid in xmax's epoch: it is recent, so the signed
     * distance to xmax's low half tells which side of xmax it lies on. */
    int64_t d = (int32_t)(xid - (uint32_t)s->xmax);
    uint64_t x8;
    size_t lo = 0, hi = s->nxip;

    if (d >= 0 || (uint64_t)-d > s->xmax)
        return false;
    x8 = s->xmax - (uint64_t)-d;
    if (x8 < s->xmin)
        return true;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (s->xip[mid] == x8)
            return false;
        if (s->xip[mid] < x8)
            lo = mid + 1;
        else
            hi = mid;
    }
    return true;
}

Visible *visible_new(const char *conninfo)
{
    Visible *v = xcalloc(1, sizeof *v);

    v->conninfo = xstrdup(conninfo);
    return v;
}

void visible_free(Visible *v)
{
    if (v == NULL)
        return;
    if (v->conn != NULL)
        PQfinish(v->conn);
    free(v->xids);
    free(v->conninfo);
    visible_snapshot_release(&v->last);
    free(v);
}

void visible_note(Visible *v, uint32_t xid)
{
    if (v->n > 0 && v->xids[v->n - 1] == xid)
        return;
    v->xids = xgrow(v->xids, &v->cap, v->n + 1, sizeof *v->xids);
    v->xids[v->n++] = xid;
}

size_t visible_pending(const Visible *v)
{
    return v->n;
}

const char *visible_errstr(const Visible *v)
{
    return v->errstr;
}

/* Drop the noted xids that snapshot s sees as completed. */
static void drop_seen(Visible *v, const VisibleSnapshot *s)
{
    size_t kept = 0;

    for (size_t i = 0; i < v->n; i++)
        if (!visible_snapshot_sees(s, v->xids[i]))
            v->xids[kept++] = v->xids[i];
    v->n = kept;
}

/* Give up on the connection (it is reopened on the next use). */
static void drop_conn(Visible *v)
{
    if (v->conn != NULL)
        PQfinish(v->conn);
    v->conn = NULL;
    v->inflight = false;
    v->stats.prepared = false;
}

/* Open the connection and prepare SNAPSHOT_STMT on it (should that fail on
 * a connection that works, the query is sent as text). Returns 0, or -1
 * with errstr set. */
static int open_conn(Visible *v)
{
    PGresult *res;

    v->conn = stream_plain_connect(v->conninfo, v->errstr, sizeof v->errstr);
    if (v->conn == NULL)
        return -1;
    res = PQprepare(v->conn, SNAPSHOT_STMT, SNAPSHOT_SQL, 0, NULL);
    v->stats.prepared = PQresultStatus(res) == PGRES_COMMAND_OK;
    PQclear(res);
    if (PQstatus(v->conn) != CONNECTION_OK) {
        snprintf(v->errstr, sizeof v->errstr, "could not prepare pg_current_snapshot(): %s",
                 PQerrorMessage(v->conn));
        drop_conn(v);
        return -1;
    }
    return 0;
}

int visible_connect(Visible *v)
{
    v->errstr[0] = '\0';
    return v->conn != NULL || open_conn(v) == 0 ? 0 : -1;
}

/* Send the snapshot query unless one is already in flight (its reply is
 * just as good: a transaction once seen completed stays so). Returns 0, or
 * -1 with errstr set. */
static int send_query(Visible *v)
{
    if (v->inflight)
        return 0;
    if (v->conn == NULL && open_conn(v) != 0)
        return -1;
    if (!(v->stats.prepared ? PQsendQueryPrepared(v->conn, SNAPSHOT_STMT, 0, NULL, NULL, NULL, 0)
                            : PQsendQuery(v->conn, SNAPSHOT_SQL))) {
        snprintf(v->errstr, sizeof v->errstr, "could not send pg_current_snapshot(): %s",
                 PQerrorMessage(v->conn));
        drop_conn(v);
        return -1;
    }
    v->inflight = true;
    v->stats.queries++;
    return 0;
}

/* Wait for the in-flight reply until deadline (monotonic µs), calling
 * tick(arg) every ~100 ms, then drop the xids the snapshot sees. Returns 0,
 * 1 when the deadline passed first (the connection is dropped: a reply
 * that late is not worth waiting for), or -1 with errstr set. */
static int read_reply(Visible *v, int64_t deadline, void (*tick)(void *), void *arg)
{
    PGresult *res, *extra;
    VisibleSnapshot s;
    bool ok;

    while (PQisBusy(v->conn)) {
        int64_t left = deadline - runtime_now_us();
        struct pollfd pfd = {.fd = PQsocket(v->conn), .events = POLLIN};
        int rc;

        if (left <= 0 || runtime_stop) {
            snprintf(v->errstr, sizeof v->errstr, "pg_current_snapshot() got no reply in time");
            drop_conn(v);
            return 1;
        }
        rc = poll(&pfd, 1, left > 100000 ? 100 : (int)((left + 999) / 1000));
        if (rc < 0 && errno != EINTR) {
            snprintf(v->errstr, sizeof v->errstr, "poll: %s", strerror(errno));
            drop_conn(v);
            return -1;
        }
        if (rc == 0 && tick != NULL)
            tick(arg);
        if (rc > 0 && !PQconsumeInput(v->conn))
            break; /* PQgetResult() reports the error */
    }
    res = PQgetResult(v->conn);
    ok = PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1 &&
         visible_snapshot_parse(PQgetvalue(res, 0, 0), &s) == 0;
    if (!ok)
        snprintf(v->errstr, sizeof v->errstr, "could not read pg_current_snapshot(): %s",
                 PQresultStatus(res) == PGRES_TUPLES_OK ? "unexpected reply"
                                                        : PQerrorMessage(v->conn));
    PQclear(res);
    while ((extra = PQgetResult(v->conn)) != NULL)
        PQclear(extra);
    v->inflight = false;
    if (!ok) {
        drop_conn(v);
        return -1;
    }
    drop_seen(v, &s);
    visible_snapshot_release(&v->last);
    v->last = s;
    return 0;
}

void visible_prefetch(Visible *v, uint32_t xid)
{
    if (v->inflight || (v->last.xmax != 0 && visible_snapshot_sees(&v->last, xid)))
        return;
    if (send_query(v) == 0)
        v->stats.prefetches++;
}

/* Between polls: 50 µs, doubling up to 1 ms. A commit that is not visible
 * yet is usually only microseconds away from it (its backend is between
 * flushing the commit record and leaving the ProcArray); with synchronous
 * replication it waits for the standby, and 1 ms polls are plenty. */
static void poll_pause(int *pause_us, void (*tick)(void *), void *arg)
{
    if (*pause_us >= 1000) {
        runtime_sleep(1, tick, arg);
    } else {
        struct timespec ts = {0, (long)*pause_us * 1000};
        nanosleep(&ts, NULL);
        *pause_us *= 2;
    }
}

int visible_wait(Visible *v, int timeout_ms, void (*tick)(void *), void *arg)
{
    int64_t deadline = runtime_now_us() + (int64_t)timeout_ms * 1000;
    int pause_us = 50;
    bool reconnected = false;
    int rc = 1;

    v->errstr[0] = '\0';
    /* A transaction once seen completed stays so: the last snapshot answers
     * for everything that committed before it (a whole backlog, when
     * catching up), and only newer xids cost a query. A reply to a query
     * sent earlier (visible_prefetch) is read first. */
    drop_seen(v, &v->last);
    while (v->n > 0) {
        bool early = v->inflight; /* sent before this wait: may predate its xids */
        bool had_conn = v->conn != NULL;
        int got;

        got = send_query(v) != 0 ? -1 : read_reply(v, deadline, tick, arg);
        if (got < 0 && had_conn && !reconnected) {
            /* The connection went bad while idle (a server restart,
             * idle_session_timeout, a terminated backend): ask once more
             * on a fresh one before giving up on the check. */
            reconnected = true;
            continue;
        }
        if (got != 0) {
            rc = got < 0 ? -1 : 0;
            break;
        }
        if (v->n == 0 || early)
            continue;
        v->stats.waits++;
        if (runtime_stop || runtime_now_us() >= deadline) {
            rc = 0;
            break;
        }
        poll_pause(&pause_us, tick, arg);
    }
    v->n = 0;
    return rc;
}

const VisibleStats *visible_stats(const Visible *v)
{
    return &v->stats;
}
