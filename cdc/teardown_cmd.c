/*
 * teardown_cmd.c — `walbust teardown`: remove what `walbust setup` made.
 *
 * Drops, in this order, the publication (and its insert-only companion,
 * catalog_companion_name(), when there is one), the replication slot, the
 * event triggers whose functions live in schema walbust, and schema walbust
 * itself (DROP SCHEMA walbust CASCADE). The publication goes first so that a
 * walbust that reconnects in between stops with "publication does not
 * exist" instead of streaming on.
 *
 * Everything is looked up first and printed as a plan; nothing is changed
 * unless the plan is confirmed (--yes, or "yes" typed on a terminal) and
 * nothing stands in the way: a slot held by a running consumer is refused
 * unless --force (which terminates its walsender), and a slot of that name
 * that is not a walbust slot of this database is never touched. Redis is
 * not touched (the watermark key is named in the closing note), nor are
 * REPLICA IDENTITY settings (setup cannot know what they were before).
 * Exit codes: 0 done or nothing to drop, 1 refused or failed, 2 no --yes
 * and no terminal to ask on.
 */
#include <libpq-fe.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "catalog.h"
#include "cmds.h"
#include "mem.h"
#include "stream.h"

#define MAX_EVENT_TRIGGERS 32
/* How long --force keeps terminating a walsender that comes back. */
#define FORCE_SECONDS 15

typedef struct Plan {
    const Config *cfg;
    PGconn *conn;
    char where[256];
    char companion[128];
    bool pub, pub_companion;
    bool slot;
    int slot_pid; /* walsender holding the slot, 0 = none */
    int ntrig;
    char *trig[MAX_EVENT_TRIGGERS];
    bool schema;
} Plan;

/* Run a query with up to two text parameters; NULL (message printed) when
 * it failed. */
static PGresult *query(Plan *p, const char *sql, int nparams, const char *a, const char *b)
{
    const char *params[2] = {a, b};
    PGresult *res = PQexecParams(p->conn, sql, nparams, NULL, params, NULL, NULL, 0);
    char msg[1024];

    if (PQresultStatus(res) == PGRES_TUPLES_OK || PQresultStatus(res) == PGRES_COMMAND_OK)
        return res;
    stream_pg_message(p->conn, msg, sizeof msg);
    fprintf(stderr, "walbust teardown: query failed on %s: %s\n", p->where, msg);
    PQclear(res);
    return NULL;
}

/* The slot: 0 when absent or ours (p->slot set), -1 when it must not be
 * touched or could not be read (message printed). */
static int plan_slot(Plan *p)
{
    const char *sql = "SELECT slot_type, coalesce(plugin, ''), coalesce(database, ''), "
                      "database IS NOT DISTINCT FROM current_database(), "
                      "coalesce(active_pid, 0) FROM pg_catalog.pg_replication_slots "
                      "WHERE slot_name = $1";
    const char *slot = p->cfg->slot;
    PGresult *res = query(p, sql, 1, slot, NULL);
    int rc = 0;

    if (res == NULL)
        return -1;
    if (PQntuples(res) == 1) {
        if (strcmp(PQgetvalue(res, 0, 0), "logical") != 0 ||
            strcmp(PQgetvalue(res, 0, 1), "pgoutput") != 0) {
            fprintf(stderr,
                    "walbust teardown: slot %s on %s is a %s slot (plugin \"%s\"), not one "
                    "walbust made; name walbust's slot with --slot; nothing was changed\n",
                    slot, p->where, PQgetvalue(res, 0, 0), PQgetvalue(res, 0, 1));
            rc = -1;
        } else if (PQgetvalue(res, 0, 3)[0] != 't') {
            fprintf(stderr,
                    "walbust teardown: slot %s belongs to database \"%s\", not the one in --pg "
                    "(%s); run teardown with --pg naming that database; nothing was changed\n",
                    slot, PQgetvalue(res, 0, 2), p->where);
            rc = -1;
        } else {
            p->slot = true;
            p->slot_pid = atoi(PQgetvalue(res, 0, 4));
        }
    }
    PQclear(res);
    return rc;
}

/* Publications, event triggers and the schema. -1 on a query error. */
static int plan_objects(Plan *p)
{
    const char *pubs = "SELECT pubname FROM pg_catalog.pg_publication WHERE pubname IN ($1, $2)";
    const char *trigs = "SELECT e.evtname FROM pg_catalog.pg_event_trigger e "
                        "JOIN pg_catalog.pg_proc f ON f.oid = e.evtfoid "
                        "JOIN pg_catalog.pg_namespace n ON n.oid = f.pronamespace "
                        "WHERE n.nspname = 'walbust' ORDER BY 1";
    const char *schema = "SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = 'walbust'";
    PGresult *res;

    catalog_companion_name(p->cfg->publication, p->companion, sizeof p->companion);
    if ((res = query(p, pubs, 2, p->cfg->publication, p->companion)) == NULL)
        return -1;
    for (int i = 0; i < PQntuples(res); i++) {
        if (strcmp(PQgetvalue(res, i, 0), p->cfg->publication) == 0)
            p->pub = true;
        else
            p->pub_companion = true;
    }
    PQclear(res);
    if ((res = query(p, trigs, 0, NULL, NULL)) == NULL)
        return -1;
    for (int i = 0; i < PQntuples(res) && p->ntrig < MAX_EVENT_TRIGGERS; i++)
        p->trig[p->ntrig++] = xstrdup(PQgetvalue(res, i, 0));
    PQclear(res);
    if ((res = query(p, schema, 0, NULL, NULL)) == NULL)
        return -1;
    p->schema = PQntuples(res) == 1;
    PQclear(res);
    return 0;
}

static bool plan_empty(const Plan *p)
{
    return !p->pub && !p->pub_companion && !p->slot && p->ntrig == 0 && !p->schema;
}

static void plan_print(const Plan *p)
{
    printf("walbust teardown on %s will drop:\n", p->where);
    if (p->pub)
        printf("  publication %s\n", p->cfg->publication);
    if (p->pub_companion)
        printf("  publication %s\n", p->companion);
    if (p->slot)
        printf("  replication slot %s%s\n", p->cfg->slot,
               p->slot_pid ? " (active: its walsender will be terminated, --force)" : "");
    for (int i = 0; i < p->ntrig; i++)
        printf("  event trigger %s\n", p->trig[i]);
    if (p->schema)
        printf("  schema walbust and everything in it (DROP SCHEMA walbust CASCADE)\n");
    fflush(stdout);
}

/* --yes, or "yes" typed on a terminal. 0 confirmed, else the exit code. */
static int confirm(const Plan *p)
{
    char line[64];

    if (p->cfg->yes)
        return 0;
    if (!isatty(STDIN_FILENO) || !isatty(STDERR_FILENO)) {
        fprintf(stderr, "walbust teardown: refusing to drop anything without --yes (no terminal "
                        "to ask on); nothing was changed\n");
        return 2;
    }
    fprintf(stderr, "Type yes to drop these: ");
    if (fgets(line, sizeof line, stdin) != NULL && strcmp(line, "yes\n") == 0)
        return 0;
    fprintf(stderr, "walbust teardown: not confirmed; nothing was changed\n");
    return 1;
}

/* Run one statement; "dropped WHAT" on success. */
static int drop(Plan *p, const char *sql, const char *what)
{
    PGresult *res = PQexec(p->conn, sql);
    char msg[1024];
    int ok = PQresultStatus(res) == PGRES_COMMAND_OK || PQresultStatus(res) == PGRES_TUPLES_OK;

    PQclear(res);
    if (ok) {
        printf("dropped %s\n", what);
        return 0;
    }
    stream_pg_message(p->conn, msg, sizeof msg);
    fprintf(stderr, "walbust teardown: could not drop %s on %s: %s\n", what, p->where, msg);
    return -1;
}

static int drop_ident(Plan *p, const char *fmt, const char *name, const char *what)
{
    char *q = PQescapeIdentifier(p->conn, name, strlen(name));
    char sql[512], label[256];
    int rc;

    if (q == NULL)
        mem_oom();
    snprintf(sql, sizeof sql, fmt, q);
    snprintf(label, sizeof label, "%s %s", what, name);
    rc = drop(p, sql, label);
    PQfreemem(q);
    return rc;
}

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};

    nanosleep(&ts, NULL);
}

/* Drop the slot. With --force, terminate whichever walsender holds it and
 * try again until FORCE_SECONDS pass (a consumer may reconnect at once). */
static int drop_slot(Plan *p)
{
    const char *sql = "SELECT pg_catalog.pg_drop_replication_slot($1)";
    const char *holder = "SELECT pg_catalog.pg_terminate_backend(active_pid) "
                         "FROM pg_catalog.pg_replication_slots "
                         "WHERE slot_name = $1 AND active_pid IS NOT NULL";
    const char *params[1] = {p->cfg->slot};
    time_t deadline = time(NULL) + FORCE_SECONDS;
    char msg[1024];

    for (;;) {
        PGresult *res = PQexecParams(p->conn, sql, 1, NULL, params, NULL, NULL, 0);
        const char *state = PQresultErrorField(res, PG_DIAG_SQLSTATE);
        bool in_use = state != NULL && strcmp(state, "55006") == 0;

        if (PQresultStatus(res) == PGRES_TUPLES_OK) {
            PQclear(res);
            printf("dropped replication slot %s\n", p->cfg->slot);
            return 0;
        }
        PQclear(res);
        stream_pg_message(p->conn, msg, sizeof msg);
        if (!in_use || !p->cfg->force || time(NULL) >= deadline) {
            fprintf(stderr, "walbust teardown: could not drop replication slot %s on %s: %s%s\n",
                    p->cfg->slot, p->where, msg,
                    in_use && !p->cfg->force ? "; stop the walbust using it, or pass --force" : "");
            return -1;
        }
        PQclear(PQexecParams(p->conn, holder, 1, NULL, params, NULL, NULL, 0));
        sleep_ms(100);
    }
}

static int execute(Plan *p)
{
    if (p->pub &&
        drop_ident(p, "DROP PUBLICATION IF EXISTS %s", p->cfg->publication, "publication") < 0)
        return -1;
    if (p->pub_companion &&
        drop_ident(p, "DROP PUBLICATION IF EXISTS %s", p->companion, "publication") < 0)
        return -1;
    if (p->slot && drop_slot(p) < 0)
        return -1;
    for (int i = 0; i < p->ntrig; i++)
        if (drop_ident(p, "DROP EVENT TRIGGER IF EXISTS %s", p->trig[i], "event trigger") < 0)
            return -1;
    if (p->schema && drop(p, "DROP SCHEMA IF EXISTS walbust CASCADE", "schema walbust") < 0)
        return -1;
    return 0;
}

/* Look everything up; 0 when the plan may go ahead, else the exit code. */
static int plan_load(Plan *p)
{
    char err[1024];

    p->conn = stream_plain_connect(p->cfg->pg, err, sizeof err);
    if (p->conn == NULL) {
        fprintf(stderr, "walbust teardown: %s\n", err);
        return 1;
    }
    stream_describe_conn(p->conn, p->where, sizeof p->where);
    PQclear(PQexec(p->conn, "SET client_min_messages = warning"));
    if (plan_slot(p) < 0 || plan_objects(p) < 0)
        return 1;
    if (p->slot_pid != 0 && !p->cfg->force) {
        fprintf(stderr,
                "walbust teardown: replication slot %s is in use by process %d on %s (a running "
                "walbust?); stop it first, or pass --force to terminate it; nothing was changed\n",
                p->cfg->slot, p->slot_pid, p->where);
        return 1;
    }
    return 0;
}

/* `walbust teardown`: see the file comment. */
int cmd_teardown(const Config *cfg)
{
    Plan p = {.cfg = cfg};
    int rc = plan_load(&p);

    if (rc == 0 && plan_empty(&p)) {
        printf("nothing to drop on %s: no publication %s, slot %s or schema walbust\n", p.where,
               cfg->publication, cfg->slot);
    } else if (rc == 0) {
        plan_print(&p);
        rc = confirm(&p);
        if (rc == 0)
            rc = execute(&p) == 0 ? 0 : 1;
        if (rc == 0)
            printf("teardown done. Redis was not touched: once the caches the rules cover "
                   "are flushed (or if walbust is gone for good), delete the watermark "
                   "walbust:confirmed:%s and the slot's mark walbust:slot:%s; while they stay, "
                   "a later walbust run against this Redis treats a new slot as a lost one\n",
                   cfg->slot, cfg->slot);
    }
    for (int i = 0; i < p.ntrig; i++)
        free(p.trig[i]);
    PQfinish(p.conn);
    return rc;
}
