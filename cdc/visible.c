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
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libpq-fe.h>

#include "runtime.h"
#include "stream.h"
#include "mem.h"

struct Visible {
    char *conninfo;
    PGconn *conn;
    uint32_t *xids;
    size_t n, cap;
    VisibleSnapshot last; /* the newest snapshot read (zeroed: none) */
    char errstr[512];
};

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
        if (s.nxip == cap) {
            cap = cap ? cap * 2 : 16;
            s.xip = xrealloc(s.xip, cap * sizeof *s.xip);
        }
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
    Visible *v = xrealloc(NULL, sizeof *v);

    memset(v, 0, sizeof *v);
    v->conninfo = xrealloc(NULL, strlen(conninfo) + 1);
    memcpy(v->conninfo, conninfo, strlen(conninfo) + 1);
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
    if (v->n == v->cap) {
        v->cap = v->cap ? v->cap * 2 : 64;
        v->xids = xrealloc(v->xids, v->cap * sizeof *v->xids);
    }
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

/* One snapshot: drop the xids it sees. Returns 0, or -1 with errstr set. */
static int check_once(Visible *v)
{
    PGresult *res;
    VisibleSnapshot s;

    if (v->conn == NULL) {
        v->conn = stream_plain_connect(v->conninfo, v->errstr, sizeof v->errstr);
        if (v->conn == NULL)
            return -1;
    }
    res = PQexec(v->conn, "SELECT pg_current_snapshot()::text");
    if (PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) != 1 ||
        visible_snapshot_parse(PQgetvalue(res, 0, 0), &s) != 0) {
        snprintf(v->errstr, sizeof v->errstr, "could not read pg_current_snapshot(): %s",
                 PQresultStatus(res) == PGRES_TUPLES_OK ? "unexpected reply"
                                                        : PQerrorMessage(v->conn));
        PQclear(res);
        PQfinish(v->conn);
        v->conn = NULL;
        return -1;
    }
    PQclear(res);
    drop_seen(v, &s);
    visible_snapshot_release(&v->last);
    v->last = s;
    return 0;
}

int visible_wait(Visible *v, int timeout_ms, void (*tick)(void *), void *arg)
{
    int64_t deadline = runtime_now_us() + (int64_t)timeout_ms * 1000;
    int rc = 1;

    v->errstr[0] = '\0';
    /* A transaction once seen completed stays so: the last snapshot answers
     * for everything that committed before it (a whole backlog, when
     * catching up), and only newer xids cost a query. */
    drop_seen(v, &v->last);
    while (v->n > 0) {
        if (check_once(v) != 0) {
            rc = -1;
            break;
        }
        if (v->n == 0)
            break;
        if (runtime_stop || runtime_now_us() >= deadline) {
            rc = 0;
            break;
        }
        runtime_sleep(1, tick, arg);
    }
    v->n = 0;
    return rc;
}
