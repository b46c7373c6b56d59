/*
 * stream.c — logical replication client over libpq (see stream.h).
 *
 * Wire details (PostgreSQL "Streaming Replication Protocol"): inside
 * COPY BOTH, the server sends 'w' XLogData (start, end, send time, payload)
 * and 'k' keepalives (end, send time, reply-requested); the client sends 'r'
 * standby status updates (write, flush, apply, send time, reply-requested).
 * All integers are big-endian.
 */
#include "stream.h"

#include <endian.h>
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>

#include "lsn.h"
#include "mem.h"

/* stream_confirm_soon() sends at most one status update per this interval;
 * one per flush would cost walbust and the walsender a message each for
 * nothing (the walsender only records the position). */
#define STREAM_CONFIRM_DELAY_MS 10

struct Stream {
    StreamConfig cfg;
    PGconn *conn;
    bool streaming;
    bool idle;
    int pace_us;           /* stream_set_pace() */
    bool paced_behind;     /* the last paced read left a lot unread (consume) */
    int64_t last_read_us;  /* monotonic time of the last socket read */
    bool confirm_pending;  /* confirmed moved since the last status update */
    char *copybuf;         /* last PQgetCopyData buffer */
    uint64_t confirmed;    /* flush position applied (reported up to limit) */
    uint64_t limit;        /* stream_set_confirm_limit(); UINT64_MAX: none */
    uint64_t reported;     /* flush position of the last status update */
    uint64_t pub_gap_lsn;  /* the last stream ended: publication missing at this change */
    char pub_gap_name[64]; /* ... namely this one */
    StreamSlot slot;
    uint64_t received;
    uint64_t server_end;
    uint64_t keepalive_end; /* newest keepalive end this connection (stream_set_idle) */
    bool keepalive_moved;   /* a keepalive moved confirmed: stream_next() returns */
    uint64_t wal_block;     /* the server's wal_block_size; 0: not known yet */
    uint64_t wal_segment;   /* ... and wal_segment_size */
    int64_t last_status_us; /* monotonic time of the last status update */
    int interval_ms;        /* status interval: configured, or less (below) */
    int recv_timeout_ms;    /* silence after which the connection is dead */
    bool got_message;       /* a message arrived since the last silence check */
    int64_t last_recv_us;   /* when messages were last seen */
    int64_t ping_sent_us;   /* when a reply was requested for silence; 0: none */
    int server_version;
    bool companion; /* "<publication>_insert_only" exists: stream it too */
    char desc[256];
    char errstr[1024];
};

static int64_t mono_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* Big-endian 64-bit integers of the replication protocol. One load and a
 * byte swap: gcc 12 left a byte loop as a loop, 6 % of walbust's
 * instructions in a drain (three per XLogData message). */
static uint64_t get_u64(const char *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof v);
    return be64toh(v);
}

static void put_u64(char *p, uint64_t v)
{
    v = htobe64(v);
    memcpy(p, &v, sizeof v);
}

Stream *stream_new(const StreamConfig *cfg)
{
    Stream *s = xcalloc(1, sizeof *s);
    s->cfg = *cfg;
    if (s->cfg.status_interval_ms <= 0)
        s->cfg.status_interval_ms = 10000;
    if (s->cfg.conninfo == NULL)
        s->cfg.conninfo = "";
    s->interval_ms = s->cfg.status_interval_ms;
    s->limit = UINT64_MAX;
    snprintf(s->desc, sizeof s->desc, "(not connected)");
    return s;
}

void stream_close(Stream *s)
{
    if (s == NULL)
        return;
    if (s->copybuf != NULL) {
        PQfreemem(s->copybuf);
        s->copybuf = NULL;
    }
    if (s->conn != NULL) {
        PQfinish(s->conn);
        s->conn = NULL;
    }
    s->streaming = false;
}

void stream_free(Stream *s)
{
    if (s == NULL)
        return;
    stream_close(s);
    free(s);
}

const char *stream_errstr(const Stream *s)
{
    return s->errstr;
}

PGconn *stream_conn(Stream *s)
{
    return s->conn;
}

uint64_t stream_confirmed(const Stream *s)
{
    return s->confirmed;
}

static uint64_t reportable(const Stream *s);

uint64_t stream_reported(const Stream *s)
{
    return reportable(s);
}

void stream_rewind(Stream *s, uint64_t lsn)
{
    uint64_t told = reportable(s);

    s->confirmed = lsn > told ? lsn : told;
    s->confirm_pending = false;
}

uint64_t stream_received(const Stream *s)
{
    return s->received;
}

uint64_t stream_server_end(const Stream *s)
{
    return s->server_end;
}

int stream_server_version(const Stream *s)
{
    return s->server_version;
}

const char *stream_describe(const Stream *s)
{
    return s->desc;
}

const StreamSlot *stream_slot(const Stream *s)
{
    return &s->slot;
}

/* The flush position a status update may carry now. */
static uint64_t reportable(const Stream *s)
{
    if (!s->cfg.confirm)
        return 0;
    return s->confirmed < s->limit ? s->confirmed : s->limit;
}

void stream_set_confirm_limit(Stream *s, uint64_t limit)
{
    if (s->limit == UINT64_MAX || limit > s->limit)
        s->limit = limit;
    if (reportable(s) > s->reported)
        s->confirm_pending = true;
}

/* While idle, every change dispatched before the newest keepalive has been
 * acknowledged, so its end can be confirmed. Returns whether it moved
 * confirmed (stream_next() then returns to the caller). */
static bool take_keepalive(Stream *s)
{
    if (!s->idle || !s->cfg.confirm || s->keepalive_end <= s->confirmed)
        return false;
    s->confirmed = s->keepalive_end;
    s->keepalive_moved = true;
    return true;
}

void stream_set_idle(Stream *s, bool idle)
{
    s->idle = idle;
    if (take_keepalive(s) && reportable(s) > s->reported)
        s->confirm_pending = true;
}

uint64_t stream_past_page_header(const Stream *s, uint64_t lsn)
{
    return lsn_past_page_header(lsn, s->wal_block, s->wal_segment);
}

void stream_set_pace(Stream *s, int pace_us)
{
    s->pace_us = pace_us > 0 ? pace_us : 0;
}

/* A paced read takes what fits in libpq's buffer (8-16 kB); when at least
 * this much more is still waiting after it, the next read comes after a
 * fifth of the pause, so that one read per pause does not cap the rate.
 * (Reading until the socket is empty instead doubled walbust's system time
 * in a drain: it keeps chasing the walsender's writes.) */
#define STREAM_PACED_MORE_BYTES 16384

/* Read what the kernel has (stream_set_pace() permitting). Returns
 * PQconsumeInput()'s result. */
static int consume(Stream *s)
{
    int64_t now = mono_us();
    int pace = s->paced_behind ? s->pace_us / 5 : s->pace_us;
    int avail = 0;

    if (pace > 0 && now - s->last_read_us < pace && now >= s->last_read_us) {
        struct timespec ts = {0, (long)(pace - (now - s->last_read_us)) * 1000};

        nanosleep(&ts, NULL);
        now = mono_us();
    }
    s->last_read_us = now;
    if (PQconsumeInput(s->conn) == 0)
        return 0;
    s->paced_behind = pace > 0 && ioctl(PQsocket(s->conn), FIONREAD, &avail) == 0 &&
                      avail >= STREAM_PACED_MORE_BYTES;
    return 1;
}

void stream_describe_conn(PGconn *conn, char *buf, size_t len)
{
    const char *host = PQhost(conn);
    const char *port = PQport(conn);
    const char *db = PQdb(conn);
    const char *user = PQuser(conn);

    snprintf(buf, len, "%s:%s/%s as %s", host ? host : "?", port ? port : "?", db ? db : "?",
             user ? user : "?");
}

void stream_pg_message(PGconn *conn, char *buf, size_t len)
{
    size_t n;
    snprintf(buf, len, "%s", conn ? PQerrorMessage(conn) : "out of memory");
    n = strlen(buf);
    while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == ' '))
        buf[--n] = '\0';
}

char *stream_quote_table(PGconn *conn, const char *name)
{
    const char *dot = strchr(name, '.');
    char *nsp, *rel, *out;
    size_t len;

    if (dot == NULL) {
        nsp = PQescapeIdentifier(conn, name, strlen(name));
        if (nsp == NULL)
            mem_oom();
        out = xstrdup(nsp);
        PQfreemem(nsp);
        return out;
    }
    nsp = PQescapeIdentifier(conn, name, (size_t)(dot - name));
    rel = PQescapeIdentifier(conn, dot + 1, strlen(dot + 1));
    if (nsp == NULL || rel == NULL)
        mem_oom();
    len = strlen(nsp) + strlen(rel) + 2;
    out = xcalloc(1, len);
    snprintf(out, len, "%s.%s", nsp, rel);
    PQfreemem(nsp);
    PQfreemem(rel);
    return out;
}

/* stream_cancel_on(): connection attempts give up when *cancel_flag is set. */
static const volatile sig_atomic_t *cancel_flag;

void stream_cancel_on(const volatile sig_atomic_t *flag)
{
    cancel_flag = flag;
}

/* Does the connection list several hosts (host=a,b: libpq tries each in
 * turn, with connect_timeout per host)? */
static bool several_hosts(PGconn *conn)
{
    PQconninfoOption *opts = PQconninfo(conn);
    bool several = false;

    for (PQconninfoOption *o = opts; o != NULL && o->keyword != NULL; o++)
        if ((strcmp(o->keyword, "host") == 0 || strcmp(o->keyword, "hostaddr") == 0) &&
            o->val != NULL && strchr(o->val, ',') != NULL)
            several = true;
    PQconninfoFree(opts);
    return several;
}

/* The connection's effective connect_timeout in seconds (the conninfo's,
 * PGCONNECT_TIMEOUT's, or ours); 0: none. libpq, like PostgreSQL, reads
 * values below 2 as 2. */
static int connect_timeout_s(PGconn *conn)
{
    PQconninfoOption *opts = PQconninfo(conn);
    int secs = STREAM_CONNECT_TIMEOUT_S;

    for (PQconninfoOption *o = opts; o != NULL && o->keyword != NULL; o++)
        if (strcmp(o->keyword, "connect_timeout") == 0 && o->val != NULL && o->val[0] != '\0')
            secs = atoi(o->val);
    PQconninfoFree(opts);
    return secs <= 0 ? 0 : secs < 2 ? 2 : secs;
}

/* Drive PQconnectPoll() to the end: poll() in slices so a stop request
 * (stream_cancel_on) is seen within 100 ms, and a server that accepts but
 * never answers times out (libpq enforces connect_timeout only in its
 * blocking connect). Leaves why empty when libpq's own message tells what
 * ended the attempt, else says why (a timeout, a stop request). */
static void connect_poll(PGconn *conn, char *why, size_t whylen)
{
    PostgresPollingStatusType st = PGRES_POLLING_WRITING;
    int timeout_s = connect_timeout_s(conn);
    int64_t deadline = timeout_s > 0 ? mono_us() + (int64_t)timeout_s * 1000000 : 0;

    while (st != PGRES_POLLING_OK && st != PGRES_POLLING_FAILED) {
        struct pollfd pfd = {.fd = PQsocket(conn),
                             .events = st == PGRES_POLLING_READING ? POLLIN : POLLOUT};
        int64_t left_ms = deadline ? (deadline - mono_us()) / 1000 : 100;
        int rc;

        if (cancel_flag != NULL && *cancel_flag) {
            snprintf(why, whylen, "interrupted by a stop request");
            return;
        }
        if (left_ms <= 0) {
            snprintf(why, whylen, "no answer within %d s (connect_timeout; set it in the conninfo)",
                     timeout_s);
            return;
        }
        rc = poll(&pfd, pfd.fd >= 0 ? 1 : 0, left_ms > 100 ? 100 : (int)left_ms);
        if (rc > 0 || pfd.fd < 0)
            st = PQconnectPoll(conn);
        else if (rc < 0 && errno != EINTR) {
            snprintf(why, whylen, "poll failed: %s", strerror(errno));
            return;
        }
    }
}

/* Connect to conninfo (a replication connection when asked). connect_timeout
 * defaults to STREAM_CONNECT_TIMEOUT_S unless the conninfo or
 * PGCONNECT_TIMEOUT sets one: keywords are processed in order and the last
 * one set wins, so ours comes before the expanded conninfo. Returns the
 * connection (check PQstatus; NULL: out of memory); on failure why says
 * what ended the attempt when libpq's message does not (else it is ""). */
static PGconn *open_conn(const char *conninfo, bool replication, char *why, size_t whylen)
{
    const char *keys[7], *vals[7];
    char timeout[16];
    int n = 0;
    PGconn *conn;

    snprintf(timeout, sizeof timeout, "%d", STREAM_CONNECT_TIMEOUT_S);
    if (getenv("PGCONNECT_TIMEOUT") == NULL) {
        keys[n] = "connect_timeout";
        vals[n++] = timeout;
    }
    keys[n] = "dbname";
    vals[n++] = conninfo;
    if (replication) {
        keys[n] = "replication";
        vals[n++] = "database";
    }
    keys[n] = "fallback_application_name";
    vals[n++] = "walbust";
    if (replication) {
        /* After the conninfo: values are sent in this encoding (see
         * pin_session). */
        keys[n] = "client_encoding";
        vals[n++] = "UTF8";
    }
    keys[n] = NULL;
    vals[n] = NULL;
    why[0] = '\0';
    if (replication) {
        /* libpq sends these as session settings the server cannot tell
         * from the database's own; keys must not depend on walbust's
         * environment (see pin_session). */
        unsetenv("PGTZ");
        unsetenv("PGDATESTYLE");
    }
    conn = PQconnectStartParams(keys, vals, /* expand_dbname= */ 1);
    if (conn != NULL && PQstatus(conn) != CONNECTION_BAD && several_hosts(conn)) {
        /* Only libpq's blocking connect moves on to the next host when one
         * times out; a stop then waits for the attempt to end. */
        PQfinish(conn);
        return PQconnectdbParams(keys, vals, /* expand_dbname= */ 1);
    }
    if (conn != NULL && PQstatus(conn) != CONNECTION_BAD)
        connect_poll(conn, why, whylen);
    return conn;
}

/* The message of a failed connection: libpq's, or ours (why) when libpq
 * has none (a timeout or stop request ends the attempt before libpq does). */
static void connect_message(PGconn *conn, const char *why, char *buf, size_t len)
{
    if (why[0] != '\0')
        snprintf(buf, len, "%s", why);
    else
        stream_pg_message(conn, buf, len);
}

/* Where a failed connection was headed, without the password. */
static void describe_target(const char *conninfo, char *buf, size_t len)
{
    PQconninfoOption *opts = PQconninfoParse(conninfo, NULL);
    const char *host = NULL, *port = NULL, *db = NULL;

    if (opts != NULL) {
        for (PQconninfoOption *o = opts; o->keyword != NULL; o++) {
            if (o->val == NULL)
                continue;
            if (strcmp(o->keyword, "host") == 0 ||
                (host == NULL && strcmp(o->keyword, "hostaddr") == 0))
                host = o->val;
            else if (strcmp(o->keyword, "port") == 0)
                port = o->val;
            else if (strcmp(o->keyword, "dbname") == 0)
                db = o->val;
        }
    }
    if (host == NULL)
        host = getenv("PGHOST");
    if (port == NULL)
        port = getenv("PGPORT");
    snprintf(buf, len, "%s:%s%s%s", host ? host : "(default socket)", port ? port : "5432",
             db ? "/" : "", db ? db : "");
    PQconninfoFree(opts);
}

PGconn *stream_plain_connect(const char *conninfo, char *err, size_t errlen)
{
    char where[256], msg[768], why[128];
    PGconn *conn = open_conn(conninfo ? conninfo : "", false, why, sizeof why);

    if (conn != NULL && PQstatus(conn) == CONNECTION_OK)
        return conn;
    describe_target(conninfo ? conninfo : "", where, sizeof where);
    connect_message(conn, why, msg, sizeof msg);
    snprintf(err, errlen, "could not connect to postgresql at %s: %s", where, msg);
    PQfinish(conn);
    return NULL;
}

/* Run a simple query expecting tuples (or a command); NULL on error with
 * s->errstr set. */
static PGresult *simple_query(Stream *s, const char *sql, ExecStatusType want)
{
    PGresult *res = PQexec(s->conn, sql);
    char msg[768];

    if (PQresultStatus(res) != want) {
        stream_pg_message(s->conn, msg, sizeof msg);
        snprintf(s->errstr, sizeof s->errstr, "query failed on %s: %s (%s)", s->desc, msg, sql);
        PQclear(res);
        return NULL;
    }
    return res;
}

/* Identifiers go into replication commands, whose grammar has no E''
 * strings: accept only what PostgreSQL itself accepts for slot names and
 * plain lower-case identifiers for publications. */
static bool valid_name(const char *name)
{
    if (name == NULL || *name == '\0' || strlen(name) > 63)
        return false;
    for (const char *p = name; *p; p++)
        if (!((*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9') || *p == '_'))
            return false;
    return true;
}

static StreamStatus classify_connect_error(const char *msg)
{
    static const char *const fatal[] = {
        "must be superuser or replication role",
        "permission denied to start WAL sender",
        "password authentication failed",
        "no pg_hba.conf entry",
        "does not exist", /* role or database */
    };
    for (size_t i = 0; i < sizeof fatal / sizeof fatal[0]; i++)
        if (strstr(msg, fatal[i]) != NULL)
            return STREAM_FATAL;
    return STREAM_RETRY;
}

/* wal_level, and the WAL page and segment sizes (stream_past_page_header). */
static StreamStatus check_wal_level(Stream *s)
{
    PGresult *res = simple_query(s,
                                 "SELECT current_setting('wal_level'), "
                                 "current_setting('wal_block_size')::bigint, "
                                 "pg_catalog.pg_size_bytes(current_setting('wal_segment_size'))",
                                 PGRES_TUPLES_OK);
    const char *level;

    if (res == NULL)
        return STREAM_RETRY;
    level = PQntuples(res) == 1 ? PQgetvalue(res, 0, 0) : "";
    if (PQntuples(res) == 1 && PQnfields(res) == 3) {
        s->wal_block = strtoull(PQgetvalue(res, 0, 1), NULL, 10);
        s->wal_segment = strtoull(PQgetvalue(res, 0, 2), NULL, 10);
    }
    if (strcmp(level, "logical") != 0) {
        snprintf(s->errstr, sizeof s->errstr,
                 "wal_level is \"%s\" on %s; logical replication needs wal_level=logical in "
                 "postgresql.conf and a restart",
                 level, s->desc);
        PQclear(res);
        return STREAM_FATAL;
    }
    PQclear(res);
    return STREAM_OK;
}

static StreamStatus check_publication(Stream *s)
{
    char sql[256];
    PGresult *res;
    bool found;

    /* The insert-only companion walbust setup creates for tables without a
     * replica identity (docs/operations.md) is streamed along when present. */
    snprintf(sql, sizeof sql,
             "SELECT pubname = '%s' FROM pg_catalog.pg_publication WHERE pubname IN ('%s', "
             "'%s_insert_only')",
             s->cfg.publication, s->cfg.publication, s->cfg.publication);
    res = simple_query(s, sql, PGRES_TUPLES_OK);
    if (res == NULL)
        return STREAM_RETRY;
    found = false;
    s->companion = false;
    for (int i = 0; i < PQntuples(res); i++) {
        found = found || PQgetvalue(res, i, 0)[0] == 't';
        s->companion = s->companion ||
                       (PQgetvalue(res, i, 0)[0] == 'f' && strlen(s->cfg.publication) + 12 <= 63);
    }
    PQclear(res);
    if (!found) {
        snprintf(s->errstr, sizeof s->errstr,
                 "publication \"%s\" does not exist in %s; run walbust setup --rules FILE "
                 "--publication %s, or create it by hand: walbust check --rules FILE --pg ... "
                 "--publication %s prints the full CREATE PUBLICATION %s ... statements",
                 s->cfg.publication, s->desc, s->cfg.publication, s->cfg.publication,
                 s->cfg.publication);
        return STREAM_FATAL;
    }
    return STREAM_OK;
}

static StreamStatus create_slot(Stream *s)
{
    char sql[256];
    PGresult *res;
    uint64_t at = 0;

    snprintf(sql, sizeof sql, "CREATE_REPLICATION_SLOT \"%s\" %sLOGICAL pgoutput NOEXPORT_SNAPSHOT",
             s->cfg.slot, s->cfg.temporary_slot ? "TEMPORARY " : "");
    res = simple_query(s, sql, PGRES_TUPLES_OK);
    if (res == NULL)
        return STREAM_FATAL;
    /* Columns: slot_name, consistent_point, snapshot_name, output_plugin. */
    if (PQntuples(res) == 1 && PQnfields(res) >= 2 && !PQgetisnull(res, 0, 1))
        if (!lsn_parse(PQgetvalue(res, 0, 1), &at))
            at = 0;
    PQclear(res);
    s->slot.exists = true;
    s->slot.created = true;
    s->slot.lost = false;
    s->slot.confirmed = at;
    return STREAM_OK;
}

StreamStatus stream_create_slot(Stream *s)
{
    StreamStatus st = s->conn != NULL ? create_slot(s) : STREAM_FATAL;

    if (s->conn == NULL)
        snprintf(s->errstr, sizeof s->errstr, "not connected");
    if (st != STREAM_OK)
        stream_close(s);
    return st;
}

static StreamStatus lost_slot_error(Stream *s)
{
    snprintf(s->errstr, sizeof s->errstr,
             "replication slot \"%s\" is lost (wal_status=lost): PostgreSQL removed WAL the slot "
             "still needed (max_slot_wal_keep_size), so changes since its confirmed position can "
             "no longer be read and caches may hold stale entries",
             s->cfg.slot);
    s->slot.lost = true;
    return STREAM_LOST;
}

/* The previous stream ended because pgoutput could not find the
 * publication when decoding the change at pub_gap_lsn, and the publication
 * exists now: it was dropped and re-created (or created after the slot)
 * while changes were written. Decoding reads the catalog as of each change,
 * so this slot fails at that change however often it reconnects. */
static StreamStatus publication_gap_error(Stream *s)
{
    char at[LSN_TEXT_MAX];

    lsn_format(s->pub_gap_lsn, at);
    snprintf(s->errstr, sizeof s->errstr,
             "replication slot \"%s\" cannot decode the change at %s: publication \"%s\" did "
             "not exist when it was written (the publication was dropped and re-created, or "
             "created after the slot, while changes were committed). PostgreSQL decodes every "
             "change with the catalog as it was then, so this slot can never get past %s, and "
             "the changes written while the publication was missing were published to no one",
             s->cfg.slot, at, s->pub_gap_name, at);
    s->pub_gap_lsn = 0;
    return STREAM_LOST;
}

static StreamStatus check_slot(Stream *s)
{
    char sql[512];
    PGresult *res;
    const char *plugin, *dbname, *wal_status;
    StreamStatus st = STREAM_OK;

    if (s->cfg.temporary_slot)
        return create_slot(s);
    /* The server's position comes with the slot's, so "missing" and
     * "re-created" can be told with the WAL range involved. */
    snprintf(sql, sizeof sql,
             "SELECT plugin, slot_type, coalesce(database::text, ''), "
             "coalesce(wal_status, ''), current_database(), "
             "coalesce(confirmed_flush_lsn::text, ''), "
             "(CASE WHEN pg_catalog.pg_is_in_recovery() THEN pg_catalog.pg_last_wal_replay_lsn() "
             "ELSE pg_catalog.pg_current_wal_lsn() END)::text "
             "FROM (SELECT 1) AS one LEFT JOIN pg_catalog.pg_replication_slots "
             "ON slot_name = '%s'",
             s->cfg.slot);
    res = simple_query(s, sql, PGRES_TUPLES_OK);
    if (res == NULL)
        return STREAM_RETRY;
    if (!lsn_parse(PQgetvalue(res, 0, 6), &s->slot.wal_now))
        s->slot.wal_now = 0;
    if (PQgetisnull(res, 0, 0)) {
        PQclear(res);
        if (s->cfg.confirm) /* walbust run */
            snprintf(s->errstr, sizeof s->errstr,
                     "replication slot \"%s\" does not exist in %s; run walbust setup --rules FILE "
                     "--slot %s, start walbust run with --slot %s --create-slot (first use "
                     "only), or SELECT pg_create_logical_replication_slot('%s', 'pgoutput')",
                     s->cfg.slot, s->desc, s->cfg.slot, s->cfg.slot, s->cfg.slot);
        else /* walbust decode --slot: reads an existing slot, never creates one */
            snprintf(s->errstr, sizeof s->errstr,
                     "replication slot \"%s\" does not exist in %s; run walbust setup --rules FILE "
                     "--slot %s, or run walbust decode without --slot (it then uses a temporary "
                     "slot)",
                     s->cfg.slot, s->desc, s->cfg.slot);
        return STREAM_MISSING;
    }
    s->slot.exists = true;
    if (!lsn_parse(PQgetvalue(res, 0, 5), &s->slot.confirmed))
        s->slot.confirmed = 0; /* NULL: never confirmed (or lost on PostgreSQL 15) */
    plugin = PQgetvalue(res, 0, 0);
    dbname = PQgetvalue(res, 0, 2);
    wal_status = PQgetvalue(res, 0, 3);
    if (strcmp(PQgetvalue(res, 0, 1), "logical") != 0 || strcmp(plugin, "pgoutput") != 0) {
        snprintf(s->errstr, sizeof s->errstr,
                 "replication slot \"%s\" uses plugin \"%s\"; walbust needs a logical slot with "
                 "pgoutput (choose another --slot or recreate it)",
                 s->cfg.slot, plugin);
        st = STREAM_FATAL;
    } else if (strcmp(dbname, PQgetvalue(res, 0, 4)) != 0) {
        snprintf(s->errstr, sizeof s->errstr,
                 "replication slot \"%s\" belongs to database \"%s\", not \"%s\"; connect to "
                 "that database or use another --slot",
                 s->cfg.slot, dbname, PQgetvalue(res, 0, 4));
        st = STREAM_FATAL;
    } else if (strcmp(wal_status, "lost") == 0) {
        st = lost_slot_error(s);
    }
    PQclear(res);
    return st;
}

/* The walsender drops a client that sends nothing for wal_sender_timeout.
 * While walbust waits for Redis it does not read the stream (so it cannot
 * answer keepalive requests); unprompted status updates at half the
 * timeout keep a healthy, waiting instance connected. */
static void adapt_status_interval(Stream *s)
{
    PGresult *res = PQexec(s->conn, "SELECT setting::int FROM pg_catalog.pg_settings "
                                    "WHERE name = 'wal_sender_timeout'");
    int timeout_ms;

    s->interval_ms = s->cfg.status_interval_ms;
    s->recv_timeout_ms = 60000;
    if (PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1) {
        timeout_ms = atoi(PQgetvalue(res, 0, 0));
        if (timeout_ms > 0 && timeout_ms / 2 < s->interval_ms)
            s->interval_ms = timeout_ms / 2 > 100 ? timeout_ms / 2 : 100;
        /* Like PostgreSQL's wal_receiver_timeout: a server silent this long
         * (not even answering a reply request) is gone. */
        if (timeout_ms > 0)
            s->recv_timeout_ms = timeout_ms > 2000 ? timeout_ms : 2000;
    }
    PQclear(res);
}

/* The walsender renders every value pgoutput sends with the session's
 * settings, and keys are built from that text: pin the output settings so
 * the same row gives the same key wherever walbust runs. TimeZone stays the
 * server's own (postgresql.conf, ALTER DATABASE/ROLE ... SET): PGTZ and
 * PGDATESTYLE are ignored (open_conn); client_encoding is UTF8. */
static StreamStatus pin_session(Stream *s)
{
    PGresult *res = simple_query(s,
                                 "SET DateStyle = 'ISO, MDY'; SET IntervalStyle = 'postgres'; "
                                 "SET extra_float_digits = 3",
                                 PGRES_COMMAND_OK);

    if (res == NULL)
        return STREAM_RETRY;
    PQclear(res);
    return STREAM_OK;
}

StreamStatus stream_connect(Stream *s)
{
    char msg[768], where[256], why[128];
    PGresult *res;
    StreamStatus st;

    stream_close(s);
    s->errstr[0] = '\0';
    memset(&s->slot, 0, sizeof s->slot);
    if (!valid_name(s->cfg.slot) || !valid_name(s->cfg.publication)) {
        snprintf(s->errstr, sizeof s->errstr,
                 "slot \"%s\" and publication \"%s\" must be 1-63 characters of a-z, 0-9 and _",
                 s->cfg.slot, s->cfg.publication);
        return STREAM_FATAL;
    }
    s->conn = open_conn(s->cfg.conninfo, true, why, sizeof why);
    if (s->conn == NULL || PQstatus(s->conn) != CONNECTION_OK) {
        describe_target(s->cfg.conninfo, where, sizeof where);
        connect_message(s->conn, why, msg, sizeof msg);
        snprintf(s->errstr, sizeof s->errstr, "could not connect to postgresql at %s: %s", where,
                 msg);
        st = classify_connect_error(msg);
        if (st == STREAM_FATAL && strstr(msg, "replication") != NULL)
            snprintf(s->errstr + strlen(s->errstr), sizeof s->errstr - strlen(s->errstr),
                     "; grant it with ALTER ROLE %s REPLICATION",
                     s->conn != NULL && PQuser(s->conn) != NULL ? PQuser(s->conn) : "<user>");
        stream_close(s);
        return st;
    }
    stream_describe_conn(s->conn, s->desc, sizeof s->desc);
    s->server_version = PQserverVersion(s->conn);

    res = simple_query(s, "IDENTIFY_SYSTEM", PGRES_TUPLES_OK);
    if (res == NULL) {
        stream_close(s);
        return STREAM_RETRY;
    }
    if (PQntuples(res) != 1 || PQnfields(res) < 4 || PQgetisnull(res, 0, 3)) {
        snprintf(s->errstr, sizeof s->errstr,
                 "IDENTIFY_SYSTEM on %s returned no database; the connection must name a database",
                 s->desc);
        PQclear(res);
        stream_close(s);
        return STREAM_FATAL;
    }
    snprintf(s->slot.system_id, sizeof s->slot.system_id, "%s", PQgetvalue(res, 0, 0));
    snprintf(s->slot.database, sizeof s->slot.database, "%s", PQgetvalue(res, 0, 3));
    PQclear(res);

    adapt_status_interval(s);
    if ((st = pin_session(s)) != STREAM_OK) {
        stream_close(s);
        return st;
    }
    if ((st = check_wal_level(s)) != STREAM_OK || (st = check_publication(s)) != STREAM_OK) {
        s->pub_gap_lsn = 0;
        stream_close(s);
        return st;
    }
    st = check_slot(s);
    if (st == STREAM_OK && s->pub_gap_lsn != 0)
        st = publication_gap_error(s);
    if (st != STREAM_OK && st != STREAM_MISSING && st != STREAM_LOST)
        stream_close(s);
    return st;
}

/* The slot's confirmed position: where START_REPLICATION from an older
 * LSN (or 0/0) really starts. Raises s->confirmed to it, so logs, metrics
 * and status updates show the real position from the start. A failed
 * query changes nothing (START_REPLICATION reports the real problem). */
static void slot_position(Stream *s)
{
    char sql[256];
    PGresult *res;
    uint64_t pos;

    snprintf(sql, sizeof sql,
             "SELECT confirmed_flush_lsn FROM pg_catalog.pg_replication_slots "
             "WHERE slot_name = '%s' AND confirmed_flush_lsn IS NOT NULL",
             s->cfg.slot);
    res = PQexec(s->conn, sql);
    if (PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1 &&
        lsn_parse(PQgetvalue(res, 0, 0), &pos) && pos > s->confirmed)
        s->confirmed = pos;
    PQclear(res);
}

StreamStatus stream_start(Stream *s, uint64_t start_lsn)
{
    char sql[512], lsn[LSN_TEXT_MAX], msg[768], pubs[160];
    PGresult *res;
    const char *state;

    if (s->companion)
        snprintf(pubs, sizeof pubs, "\"%s\",\"%s_insert_only\"", s->cfg.publication,
                 s->cfg.publication);
    else
        snprintf(pubs, sizeof pubs, "\"%s\"", s->cfg.publication);
    if (s->server_version >= 140000)
        snprintf(sql, sizeof sql,
                 "START_REPLICATION SLOT \"%s\" LOGICAL %s (proto_version '2', "
                 "publication_names '%s', messages 'true')",
                 s->cfg.slot, lsn_format(start_lsn, lsn), pubs);
    else
        snprintf(sql, sizeof sql,
                 "START_REPLICATION SLOT \"%s\" LOGICAL %s (proto_version '1', "
                 "publication_names '%s')",
                 s->cfg.slot, lsn_format(start_lsn, lsn), pubs);
    slot_position(s);
    res = PQexec(s->conn, sql);
    if (PQresultStatus(res) == PGRES_COPY_BOTH) {
        PQclear(res);
        s->streaming = true;
        s->last_status_us = mono_us();
        s->last_recv_us = s->last_status_us;
        s->ping_sent_us = 0;
        s->got_message = false;
        s->reported = 0;
        s->keepalive_end = 0; /* only this connection's keepalives count */
        s->keepalive_moved = false;
        if (s->confirmed < start_lsn)
            s->confirmed = start_lsn;
        return STREAM_OK;
    }
    stream_pg_message(s->conn, msg, sizeof msg);
    state = PQresultErrorField(res, PG_DIAG_SQLSTATE);
    if (state != NULL && strcmp(state, "55006") == 0) {
        const char *primary = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
        snprintf(s->errstr, sizeof s->errstr, "%s", primary != NULL ? primary : msg);
        PQclear(res);
        stream_close(s);
        return STREAM_BUSY;
    }
    snprintf(s->errstr, sizeof s->errstr, "could not start replication on %s: %s", s->desc, msg);
    PQclear(res);
    stream_close(s);
    if (strstr(msg, "can no longer get changes") != NULL ||
        strstr(msg, "has been invalidated") != NULL)
        return lost_slot_error(s);
    return STREAM_RETRY;
}

static int send_status(Stream *s, bool reply_requested)
{
    char buf[1 + 8 * 4 + 1];
    uint64_t flush = reportable(s);
    char msg[768];

    buf[0] = 'r';
    put_u64(buf + 1, s->received > flush ? s->received : flush); /* written */
    put_u64(buf + 9, flush);                                     /* flushed */
    put_u64(buf + 17, flush);                                    /* applied */
    put_u64(buf + 25, (uint64_t)pgtime_now());
    buf[33] = reply_requested ? 1 : 0;
    if (PQputCopyData(s->conn, buf, sizeof buf) <= 0 || PQflush(s->conn) != 0) {
        stream_pg_message(s->conn, msg, sizeof msg);
        snprintf(s->errstr, sizeof s->errstr, "could not send status update to %s: %s", s->desc,
                 msg);
        return -1;
    }
    s->last_status_us = mono_us();
    s->confirm_pending = false;
    s->reported = flush;
    return 0;
}

int stream_confirm(Stream *s, uint64_t flush_lsn, bool force)
{
    if (flush_lsn > s->confirmed)
        s->confirmed = flush_lsn;
    if (s->conn == NULL || !s->streaming)
        return 0;
    if (force || mono_us() - s->last_status_us >= (int64_t)s->interval_ms * 1000)
        return send_status(s, false);
    return 0;
}

int stream_confirm_soon(Stream *s, uint64_t flush_lsn)
{
    if (flush_lsn > s->confirmed) {
        s->confirmed = flush_lsn;
        if (reportable(s) > s->reported)
            s->confirm_pending = true;
    }
    if (!s->confirm_pending || s->conn == NULL || !s->streaming)
        return 0;
    if (mono_us() - s->last_status_us >= STREAM_CONFIRM_DELAY_MS * 1000)
        return send_status(s, false);
    return 0;
}

static int handle_keepalive(Stream *s, const char *buf, int len)
{
    uint64_t end;

    if (len < 1 + 8 + 8 + 1) {
        snprintf(s->errstr, sizeof s->errstr, "malformed keepalive message (%d bytes) from %s", len,
                 s->desc);
        return -1;
    }
    end = get_u64(buf + 1);
    if (end > s->server_end)
        s->server_end = end;
    if (end > s->keepalive_end)
        s->keepalive_end = end;
    if ((take_keepalive(s) && reportable(s) > s->reported) || buf[17])
        return send_status(s, false);
    return 0;
}

static int wait_readable(Stream *s, int timeout_ms)
{
    struct pollfd pfd = {.fd = PQsocket(s->conn), .events = POLLIN};
    int rc;

    if (pfd.fd < 0) {
        snprintf(s->errstr, sizeof s->errstr, "connection to %s has no socket", s->desc);
        return -1;
    }
    rc = poll(&pfd, 1, timeout_ms);
    if (rc < 0 && errno == EINTR)
        return 2; /* a signal: let the caller look at its flags */
    if (rc < 0) {
        snprintf(s->errstr, sizeof s->errstr, "poll failed: %s", strerror(errno));
        return -1;
    }
    return rc > 0 ? 1 : 0;
}

/* Time until the next status update is due, in ms (at least 0). */
static int status_due_ms(const Stream *s)
{
    /* Soon when a confirmed position waits to be sent (stream_confirm_soon). */
    int interval = s->confirm_pending ? STREAM_CONFIRM_DELAY_MS : s->interval_ms;
    int64_t due = s->last_status_us + (int64_t)interval * 1000 - mono_us();
    return due <= 0 ? 0 : (int)(due / 1000);
}

/* Handle one CopyData message of len bytes in s->copybuf. Returns 1 for
 * XLogData (out filled), 0 for a handled keepalive, -1 on error. */
static int dispatch(Stream *s, int len, StreamData *out)
{
    const char *b = s->copybuf;
    int rc;

    s->got_message = true;
    if (b[0] == 'w') {
        if (len < 25) {
            snprintf(s->errstr, sizeof s->errstr, "malformed XLogData message (%d bytes) from %s",
                     len, s->desc);
            return -1;
        }
        out->wal_start = get_u64(b + 1);
        if (get_u64(b + 9) > s->server_end)
            s->server_end = get_u64(b + 9);
        if (out->wal_start > s->received)
            s->received = out->wal_start;
        out->buf = b + 25;
        out->len = (size_t)len - 25;
        return 1;
    }
    if (b[0] == 'k') {
        rc = handle_keepalive(s, b, len);
        PQfreemem(s->copybuf);
        s->copybuf = NULL;
        return rc < 0 ? -1 : 0;
    }
    snprintf(s->errstr, sizeof s->errstr, "unexpected replication message type 0x%02x from %s",
             (unsigned char)b[0], s->desc);
    return -1;
}

/* pgoutput's "publication ... does not exist" (SQLSTATE 42704) while
 * decoding: the change it names in its CONTEXT ("associated LSN X/X") was
 * written while the publication did not exist. Returns that LSN, or 0. */
static uint64_t publication_gap(const PGresult *res, char *name, size_t namelen)
{
    const char *state = PQresultErrorField(res, PG_DIAG_SQLSTATE);
    const char *primary = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
    const char *context = PQresultErrorField(res, PG_DIAG_CONTEXT);
    const char *at = context != NULL ? strstr(context, "associated LSN ") : NULL;
    char text[LSN_TEXT_MAX];
    uint64_t lsn = 0;

    if (state == NULL || strcmp(state, "42704") != 0 || primary == NULL ||
        strncmp(primary, "publication \"", 13) != 0 || at == NULL)
        return 0;
    at += strlen("associated LSN ");
    snprintf(name, namelen, "%.*s", (int)strcspn(primary + 13, "\""), primary + 13);
    snprintf(text, sizeof text, "%.*s", (int)strspn(at, "0123456789ABCDEFabcdef/"), at);
    return lsn_parse(text, &lsn) ? lsn : 0;
}

static int stream_ended(Stream *s)
{
    PGresult *res = PQgetResult(s->conn);
    char msg[768];

    stream_pg_message(s->conn, msg, sizeof msg);
    if (res != NULL && PQresultErrorMessage(res)[0] != '\0')
        snprintf(msg, sizeof msg, "%s", PQresultErrorMessage(res));
    if (res != NULL)
        s->pub_gap_lsn = publication_gap(res, s->pub_gap_name, sizeof s->pub_gap_name);
    snprintf(s->errstr, sizeof s->errstr, "replication stream from %s ended: %s", s->desc,
             msg[0] ? msg : "server closed the stream");
    PQclear(res);
    s->streaming = false;
    return -1;
}

static int conn_failed(Stream *s)
{
    char msg[768];

    stream_pg_message(s->conn, msg, sizeof msg);
    snprintf(s->errstr, sizeof s->errstr, "lost connection to %s: %s", s->desc, msg);
    s->streaming = false;
    return -1;
}

/* Detect a dead server on a connection that TCP still thinks is alive
 * (host gone, network partition). After half the receive timeout without
 * any message, ask the server for a reply; if half a timeout more passes
 * without one, the connection is declared lost. Returns -1 then, else the
 * ms until the next check is due. */
static int check_silence(Stream *s)
{
    int64_t now = mono_us();
    int64_t half = (int64_t)s->recv_timeout_ms * 500;
    int64_t due;

    if (s->recv_timeout_ms <= 0)
        return 60000;
    if (s->got_message) {
        s->got_message = false;
        s->last_recv_us = now;
        s->ping_sent_us = 0;
    }
    if (s->ping_sent_us == 0 && now - s->last_recv_us >= half) {
        if (send_status(s, /* reply_requested= */ true) < 0)
            return -1;
        s->ping_sent_us = now;
    }
    if (s->ping_sent_us != 0 && now - s->ping_sent_us >= half) {
        snprintf(s->errstr, sizeof s->errstr,
                 "no message from %s for %d s, not even an answer to a keepalive request; "
                 "reconnecting",
                 s->desc, (int)((now - s->last_recv_us) / 1000000));
        s->streaming = false;
        return -1;
    }
    due = (s->ping_sent_us != 0 ? s->ping_sent_us : s->last_recv_us) + half - now;
    return due <= 0 ? 0 : (int)((due + 999) / 1000);
}

int stream_next_buffered(Stream *s, StreamData *out)
{
    if (s->copybuf != NULL) {
        PQfreemem(s->copybuf);
        s->copybuf = NULL;
    }
    if (s->conn == NULL || !s->streaming) {
        snprintf(s->errstr, sizeof s->errstr, "not streaming");
        return -1;
    }
    while (!s->keepalive_moved) {
        int len = PQgetCopyData(s->conn, &s->copybuf, /* async= */ 1);
        int rc;

        if (len == 0)
            return 0;
        if (len < 0)
            return stream_ended(s);
        rc = dispatch(s, len, out);
        if (rc != 0)
            return rc;
    }
    return 0;
}

int stream_next(Stream *s, int timeout_ms, StreamData *out)
{
    int64_t deadline = 0; /* read from the clock only once nothing is buffered */
    bool drained = false;

    for (;;) {
        int64_t left_ms;
        int wait;
        int rc = stream_next_buffered(s, out);

        if (rc != 0)
            return rc;
        if (s->keepalive_moved) { /* the caller may now record it (the watermark) */
            s->keepalive_moved = false;
            return 0;
        }
        /* Nothing complete is buffered. */
        if (status_due_ms(s) == 0 && send_status(s, false) < 0)
            return -1;
        if (deadline == 0)
            deadline = mono_us() + (int64_t)timeout_ms * 1000;
        left_ms = (deadline - mono_us()) / 1000;
        if (left_ms <= 0) {
            /* Past the deadline: still pick up bytes the kernel already has,
             * once, so a zero timeout means "whatever is ready". */
            if (drained)
                return 0;
            drained = true;
            if (consume(s) == 0)
                return conn_failed(s);
            continue;
        }
        wait = left_ms > status_due_ms(s) ? status_due_ms(s) : (int)left_ms;
        {
            int silence = check_silence(s);
            if (silence < 0)
                return -1;
            if (wait > silence)
                wait = silence;
        }
        switch (wait_readable(s, wait)) {
        case -1:
            return -1;
        case 2:
            return 0;
        default:
            break;
        }
        if (consume(s) == 0)
            return conn_failed(s);
    }
}
