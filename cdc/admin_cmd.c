/*
 * admin_cmd.c — `walbust setup` and `walbust status`.
 *
 * setup prepares a database for walbust, idempotently: it checks first
 * (wal_level, server version, every rules table exists) so that a doomed
 * setup changes nothing, then makes sure the publication covers every rules
 * table (creating it, or adding the missing tables; it never drops any),
 * installs the embedded sql/walbust.sql, optionally sets REPLICA IDENTITY
 * FULL where the rules need old values the current identity does not carry,
 * and creates the pgoutput slot (after the publication, which must exist
 * before the slot for pgoutput to see it). Each action taken, or found
 * already done, is one line on stdout; remaining rules problems are printed
 * as warnings on stderr.
 *
 * status reports the slot (activity, positions, lag in bytes, WAL
 * retention) and the publication, as aligned text or one JSON object, and
 * exits 1 when something needs the operator: a missing or lost slot, a
 * missing publication or, with --rules, rules tables it does not cover.
 *
 * Both use plain libpq connections and never print the conninfo (it may hold
 * a password); servers are described with stream_describe_conn().
 */
#include <cjson/cJSON.h>
#include <libpq-fe.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "catalog.h"
#include "cmds.h"
#include "stream.h"
#include "mem.h"
#include "pubplan.h"

/* sql/walbust.sql, embedded by the Makefile (build/gen/redis_scripts.c). */
extern const char walbust_sql[];

static char *quote_ident(PGconn *conn, const char *name)
{
    char *q = PQescapeIdentifier(conn, name, strlen(name));
    char *out;

    if (q == NULL)
        mem_oom();
    out = strdup(q);
    PQfreemem(q);
    if (out == NULL)
        mem_oom();
    return out;
}

/* Run one statement; on failure print "walbust CMD: could not WHAT on
 * SERVER: message" and return -1. */
static int exec_command(PGconn *conn, const char *sql, const char *cmd, const char *what,
                        const char *where)
{
    PGresult *res = PQexec(conn, sql);
    ExecStatusType st = PQresultStatus(res);
    char msg[1024];

    PQclear(res);
    if (st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK)
        return 0;
    stream_pg_message(conn, msg, sizeof msg);
    fprintf(stderr, "walbust %s: could not %s on %s: %s\n", cmd, what, where, msg);
    return -1;
}

/* Connect and describe the server; NULL after printing the error. */
static PGconn *admin_connect(const Config *cfg, const char *cmd, char *where, size_t wlen)
{
    char err[1024];
    PGconn *conn = stream_plain_connect(cfg->pg, err, sizeof err);

    if (conn == NULL) {
        fprintf(stderr, "walbust %s: %s\n", cmd, err);
        return NULL;
    }
    stream_describe_conn(conn, where, wlen);
    /* "schema walbust already exists, skipping" and the like are noise. */
    PQclear(PQexec(conn, "SET client_min_messages = warning"));
    return conn;
}

/* ---------------------------------------------------------------- setup */

typedef struct Setup {
    const Config *cfg;
    PGconn *conn;
    Rules *rules;
    Catalog *cat;
    char where[256]; /* "host:port/db as user" */
    char *need_full; /* tables that need REPLICA IDENTITY FULL, ", "-joined */
} Setup;

static int setup_load_catalog(Setup *s)
{
    char err[1024];

    catalog_free(s->cat);
    s->cat = catalog_load(s->conn, s->rules, s->cfg->publication, err, sizeof err);
    if (s->cat == NULL) {
        fprintf(stderr, "walbust setup: %s\n", err);
        return -1;
    }
    return 0;
}

/* Everything that would make setup fail halfway is checked before any
 * change is made. */
static int setup_preflight(Setup *s)
{
    PGresult *res = PQexec(s->conn, "SHOW wal_level");
    int version = PQserverVersion(s->conn);
    int missing = 0;

    if (PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1 &&
        strcmp(PQgetvalue(res, 0, 0), "logical") != 0) {
        fprintf(stderr,
                "walbust setup: wal_level is \"%s\" on %s; logical replication needs "
                "wal_level=logical in postgresql.conf and a restart\n",
                PQgetvalue(res, 0, 0), s->where);
        PQclear(res);
        return -1;
    }
    PQclear(res);
    if (version < 140000) {
        fprintf(stderr, "walbust setup: %s runs PostgreSQL %d.%d; walbust needs 14 or newer\n",
                s->where, version / 10000, version % 10000);
        return -1;
    }
    if (setup_load_catalog(s) < 0)
        return -1;
    for (size_t i = 0; i < rules_table_count(s->rules); i++) {
        const char *t = rules_table(s->rules, i);
        const RulesTableInfo *info = catalog_lookup(s->cat, t);
        if (info == NULL || !info->exists) {
            fprintf(stderr,
                    "walbust setup: table %s named in %s does not exist on %s; create it (or "
                    "fix the rules file) and run setup again; nothing was changed\n",
                    t, s->cfg->rules, s->where);
            missing++;
        }
    }
    return missing ? -1 : 0;
}

/* Run the statements in sql (";"-separated) as one transaction, so a table
 * moved between publications is never out of both. */
static int exec_transaction(Setup *s, const char *sql, const char *what)
{
    MemText b = {0};
    int rc;

    mem_text_add(&b, "BEGIN; ");
    mem_text_add(&b, sql);
    mem_text_add(&b, "; COMMIT");
    rc = exec_command(s->conn, b.s, "setup", what, s->where);
    if (rc < 0)
        PQclear(PQexec(s->conn, "ROLLBACK"));
    free(b.s);
    return rc;
}

/* Which publication (0: the publication, 1: its companion) a member is
 * published by now. */
static bool member_in(const CatalogMember *m, int k)
{
    return k == 0 ? m->in_main : m->in_companion;
}

/* Is table in the ", "-separated list? */
static bool listed(const MemText *list, const char *table)
{
    size_t n = strlen(table);

    for (const char *p = list->s; p != NULL && (p = strstr(p, table)) != NULL; p += n)
        if ((p == list->s || p[-1] == ' ') && (p[n] == ',' || p[n] == '\0'))
            return true;
    return false;
}

/* Add to sql what publication k lacks of planned table idx (the table and
 * its inheritance children; partitions come with their root), and to drops
 * the statements that take them out of the other publication. */
static void plan_members(Setup *s, int k, size_t idx, bool exists, const char *qname,
                         const char *qother, MemText *sql, MemText *drops, MemText *added,
                         size_t *nadded, MemText *moved)
{
    size_t total = catalog_member_count(s->cat);

    for (size_t j = idx; j < total; j++) {
        const CatalogMember *m = catalog_member(s->cat, j);
        if (j > idx && m->depth == 0)
            break;
        if (member_in(m, k) || (j > idx && (m->partition || !m->holds_rows)) ||
            listed(added, m->table))
            continue; /* covered, a partition its root brings along, or listed */
        if (qother != NULL && (k == 0 ? m->direct_companion : m->direct_main)) {
            mem_text_add(drops, "; ALTER PUBLICATION ");
            mem_text_add(drops, qother);
            mem_text_add(drops, " DROP TABLE ");
            mem_text_add(drops, m->sql_name);
            mem_text_add(moved, moved->len ? ", " : "");
            mem_text_add(moved, m->table);
        }
        /* ONLY: each table is listed itself, children included. */
        if (exists) {
            mem_text_add(sql, sql->len ? "; ALTER PUBLICATION " : "ALTER PUBLICATION ");
            mem_text_add(sql, qname);
            mem_text_add(sql, " ADD TABLE ONLY ");
        } else {
            mem_text_add(sql, *nadded ? ", ONLY " : " FOR TABLE ONLY ");
        }
        mem_text_add(sql, m->sql_name);
        mem_text_add(added, *nadded ? ", " : "");
        mem_text_add(added, m->table);
        (*nadded)++;
    }
}

/* Append the COMMENT that marks a publication setup created as walbust's:
 * after a migration re-creates a rules table, walbust run adds it back to a
 * publication whose comment starts with "walbust:", and stops on any other
 * (schema.h). */
static void mark_managed(MemText *sql, const char *qname)
{
    mem_text_add(sql, "; COMMENT ON PUBLICATION ");
    mem_text_add(sql, qname);
    mem_text_add(sql,
                 " IS 'walbust: managed by walbust (created by walbust setup); walbust run adds "
                 "rules tables back to it after a migration re-creates them'");
}

/* Make publication k (0 main, 1 companion) publish the planned tables (the
 * catalog members idx[0..n)) and their inheritance children, creating it
 * when missing. A table the other publication holds is moved: the DROP and
 * the ADD commit together, so its changes are never out of both. */
static int setup_one_publication(Setup *s, int k, const char *name, size_t n, const size_t *idx)
{
    MemText sql = {0}, drops = {0}, added = {0}, moved = {0};
    size_t nadded = 0;
    const char *comp;
    bool exists = k == 0 ? catalog_publication(s->cat) != 0 : catalog_companion(s->cat, &comp);
    bool other_exists = k == 0 ? catalog_companion(s->cat, &comp) : catalog_publication(s->cat);
    char *qname = quote_ident(s->conn, name);
    char *qother = quote_ident(s->conn, k == 0 ? comp : s->cfg->publication);
    int rc = 0;

    if (!exists) {
        mem_text_add(&sql, "CREATE PUBLICATION ");
        mem_text_add(&sql, qname);
    }
    for (size_t i = 0; i < n; i++)
        plan_members(s, k, idx[i], exists, qname, other_exists ? qother : NULL, &sql, &drops,
                     &added, &nadded, &moved);
    if (!exists && k == 1)
        mem_text_add(&sql, " WITH (publish = 'insert, truncate')");
    if (sql.len > 0) {
        mem_text_add(&sql, drops.s ? drops.s : "");
        if (!exists) /* walbust's own: run puts re-created rules tables back (schema.h) */
            mark_managed(&sql, qname);
        rc = exec_transaction(s, sql.s,
                              exists ? "add tables to the publication" : "create the publication");
    }
    if (rc == 0 && !exists && k == 1 && nadded == 0)
        printf("created publication %s (empty; it publishes only inserts and truncates, for "
               "tables without a replica identity whose rules need nothing else)\n",
               name);
    else if (rc == 0 && !exists)
        printf("created publication %s for %zu table%s%s\n", name, nadded, nadded == 1 ? "" : "s",
               k == 1 ? " (inserts and truncates only: tables without a replica identity whose "
                        "rules need nothing else)"
                      : "");
    else if (rc == 0 && nadded > 0)
        printf("added %zu table%s to publication %s: %s\n", nadded, nadded == 1 ? "" : "s", name,
               added.s);
    else if (rc == 0 && k == 0)
        printf("publication %s already covers the rules' tables\n", name);
    if (rc == 0 && moved.len > 0)
        printf("moved %s from publication %s to %s%s\n", moved.s,
               k == 0 ? comp : s->cfg->publication, name,
               k == 1 ? " (it has no replica identity and its rules only need inserts: "
                        "publishing its updates and deletes would make PostgreSQL refuse them)"
                      : " (its rules need updates or deletes)");
    free(moved.s);
    free(sql.s);
    free(drops.s);
    free(added.s);
    free(qname);
    free(qother);
    return rc;
}

static int setup_publication(Setup *s)
{
    PubPlan plan;
    const char *comp;
    int rc = 0;

    pubplan_build(&plan, s->rules, s->cat);
    catalog_companion(s->cat, &comp);
    if (catalog_publication(s->cat) == 2) {
        printf("publication %s is FOR ALL TABLES: it covers the rules' tables\n",
               s->cfg->publication);
        if (plan.ninsert > 0)
            fprintf(stderr,
                    "warning: publication %s is FOR ALL TABLES and publishes updates and deletes "
                    "of tables without a replica identity (%s...), which makes PostgreSQL refuse "
                    "the application's UPDATE and DELETE on them; use a publication FOR TABLE "
                    "(walbust setup --publication NAME creates one)\n",
                    s->cfg->publication, plan.insert_only[0]);
    } else {
        rc = setup_one_publication(s, 0, s->cfg->publication, plan.nmain, plan.main_member);
    }
    /* The companion always exists (possibly empty), so a running walbust
     * streams it from the start and a table moved into it later is seen. */
    if (rc == 0 && comp[0] != '\0')
        rc = setup_one_publication(s, 1, comp, plan.ninsert, plan.insert_member);
    pubplan_release(&plan);
    return rc;
}

/* Tables without a replica identity whose rules need updates or deletes:
 * publishing those would make PostgreSQL refuse the application's UPDATE
 * and DELETE. Give them REPLICA IDENTITY FULL when asked, else refuse
 * before changing anything. */
static int setup_keyless(Setup *s)
{
    PubPlan plan;
    int rc = 0;

    pubplan_build(&plan, s->rules, s->cat);
    for (size_t i = 0; i < plan.nfix && (rc == 0 || !s->cfg->replica_identity_full); i++) {
        if (s->cfg->replica_identity_full) {
            MemText sql = {0};
            mem_text_add(&sql, "ALTER TABLE ");
            mem_text_add(&sql, plan.fix[i]);
            mem_text_add(&sql, " REPLICA IDENTITY FULL");
            rc = exec_command(s->conn, sql.s, "setup", "set REPLICA IDENTITY FULL", s->where);
            if (rc == 0)
                printf("set REPLICA IDENTITY FULL on %s (it has no replica identity and the "
                       "rules for %s fire on update or delete)\n",
                       plan.fix[i], plan.fix_rules[i]);
            free(sql.s);
        } else {
            fprintf(stderr,
                    "walbust setup: table %s has no replica identity (no primary key, or "
                    "REPLICA IDENTITY NOTHING) and the rules for %s fire on update or delete; "
                    "publishing it for those would make PostgreSQL refuse the application's "
                    "UPDATE and DELETE on it. Run ALTER TABLE %s REPLICA IDENTITY FULL (or add a "
                    "primary key), or walbust setup --replica-identity-full; nothing was "
                    "changed\n",
                    plan.fix[i], plan.fix_rules[i], plan.fix[i]);
            rc = -1;
        }
    }
    pubplan_release(&plan);
    if (rc == 0 && plan.nfix > 0)
        rc = setup_load_catalog(s);
    return rc;
}

static int setup_schema(Setup *s)
{
    if (exec_command(s->conn, walbust_sql, "setup", "install schema walbust (sql/walbust.sql)",
                     s->where) < 0)
        return -1;
    printf("installed schema walbust (sql/walbust.sql)\n");
    return 0;
}

/*
 * Which tables need REPLICA IDENTITY FULL? The rules engine reports that as
 * problem text, so instead of parsing messages, present the catalog with
 * one table at a time turned into REPLICA IDENTITY FULL (every column in
 * the identity) and see whether rules_check_catalog() finds fewer problems.
 * Every table is presented as published, so only identity questions differ.
 */
typedef struct RiView {
    size_t n;
    RulesTableInfo *real;    /* as the catalog says (published) */
    RulesTableInfo *as_full; /* the same under REPLICA IDENTITY FULL */
    bool *full;              /* per table: present as_full */
    bool *all_true;          /* identity flags for as_full */
} RiView;

static int ri_cmp(const void *a, const void *b)
{
    return strcmp(((const RulesTableInfo *)a)->table, ((const RulesTableInfo *)b)->table);
}

/* Binary search over real[] (sorted by name): setup checks the rules once
 * per table, so a linear lookup would make 2,000 tables cost minutes. */
static const RulesTableInfo *ri_lookup(void *arg, const char *table)
{
    const RiView *v = arg;
    RulesTableInfo key = {.table = table};
    const RulesTableInfo *hit = bsearch(&key, v->real, v->n, sizeof *v->real, ri_cmp);
    size_t i;

    if (hit == NULL)
        return NULL;
    i = (size_t)(hit - v->real);
    return v->full[i] ? &v->as_full[i] : &v->real[i];
}

static void ri_view_init(RiView *v, const Rules *rules, Catalog *cat)
{
    size_t n = rules_table_count(rules), maxcols = 0;

    v->n = 0;
    v->real = xcalloc(n, sizeof *v->real);
    v->as_full = xcalloc(n, sizeof *v->as_full);
    v->full = xcalloc(n, sizeof *v->full);
    for (size_t i = 0; i < n; i++) {
        const RulesTableInfo *info = catalog_lookup(cat, rules_table(rules, i));
        if (info == NULL)
            continue;
        v->real[v->n] = *info;
        v->real[v->n].in_publication = true;
        if (info->ncols > maxcols)
            maxcols = info->ncols;
        v->n++;
    }
    qsort(v->real, v->n, sizeof *v->real, ri_cmp);
    v->all_true = xcalloc(maxcols, sizeof *v->all_true);
    for (size_t i = 0; i < maxcols; i++)
        v->all_true[i] = true;
    for (size_t i = 0; i < v->n; i++) {
        v->as_full[i] = v->real[i];
        v->as_full[i].replident = 'f';
        v->as_full[i].identity = v->all_true;
    }
}

static void ri_view_release(RiView *v)
{
    free(v->real);
    free(v->as_full);
    free(v->full);
    free(v->all_true);
}

static size_t ri_count(const Setup *s, RiView *v)
{
    RulesProblems p = {0};
    size_t n;

    (void)rules_check_catalog(s->rules, s->cfg->publication, ri_lookup, v, &p);
    n = p.count;
    rules_problems_release(&p);
    return n;
}

/* REPLICA IDENTITY FULL on every table holding the rows of info's table:
 * itself, or each partition or inheritance child (the setting on a
 * partitioned table does not reach its partitions). */
static int ri_set_full(Setup *s, const RulesTableInfo *info)
{
    char *qt = stream_quote_table(s->conn, info->table);
    size_t n = info->nnot_full ? info->nnot_full : 1;
    int rc = 0;

    for (size_t i = 0; i < n && rc == 0; i++) {
        const char *t = info->nnot_full ? info->not_full[i] : qt ? qt : info->table;
        MemText sql = {0};
        mem_text_add(&sql, "ALTER TABLE ");
        mem_text_add(&sql, t);
        mem_text_add(&sql, " REPLICA IDENTITY FULL");
        rc = exec_command(s->conn, sql.s, "setup", "set REPLICA IDENTITY FULL", s->where);
        if (rc == 0 && strcmp(t, info->sql_name ? info->sql_name : "") != 0 && info->nnot_full)
            printf("set REPLICA IDENTITY FULL on %s (its rules, on %s, need old values of "
                   "columns outside the replica identity)\n",
                   t, info->table);
        else if (rc == 0)
            printf("set REPLICA IDENTITY FULL on %s (its rules need old values of columns "
                   "outside the replica identity)\n",
                   info->table);
        free(sql.s);
    }
    free(qt);
    return rc;
}

static int setup_replica_identity(Setup *s)
{
    RiView v;
    MemText names = {0};
    size_t baseline;
    int rc = 0;

    ri_view_init(&v, s->rules, s->cat);
    baseline = ri_count(s, &v);
    for (size_t i = 0; i < v.n && rc == 0; i++) {
        bool needs;

        if (v.real[i].replident == 'f' ||
            !(rules_table_ops(s->rules, v.real[i].table) & (RULES_UPDATE | RULES_DELETE)))
            continue;
        v.full[i] = true;
        needs = ri_count(s, &v) < baseline;
        v.full[i] = false;
        if (!needs)
            continue;
        if (s->cfg->replica_identity_full) {
            rc = ri_set_full(s, &v.real[i]);
        } else {
            mem_text_add(&names, names.len ? ", " : "");
            mem_text_add(&names, v.real[i].table);
        }
    }
    ri_view_release(&v);
    s->need_full = names.s;
    return rc;
}

static int setup_slot(Setup *s)
{
    const char *params[1] = {s->cfg->slot};
    const char *find = "SELECT coalesce(plugin, ''), slot_type, coalesce(database, ''), "
                       "database IS NOT DISTINCT FROM current_database() "
                       "FROM pg_catalog.pg_replication_slots WHERE slot_name = $1";
    const char *create = "SELECT pg_catalog.pg_create_logical_replication_slot($1, 'pgoutput')";
    PGresult *res = PQexecParams(s->conn, find, 1, NULL, params, NULL, NULL, 0);
    char msg[1024];
    int rc = -1;

    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        stream_pg_message(s->conn, msg, sizeof msg);
        fprintf(stderr, "walbust setup: could not look up slot %s on %s: %s\n", s->cfg->slot,
                s->where, msg);
    } else if (PQntuples(res) == 1) {
        if (strcmp(PQgetvalue(res, 0, 1), "logical") != 0 ||
            strcmp(PQgetvalue(res, 0, 0), "pgoutput") != 0 || PQgetvalue(res, 0, 3)[0] != 't')
            fprintf(stderr,
                    "walbust setup: slot %s already exists but is a %s slot (plugin \"%s\", "
                    "database \"%s\"); walbust needs a logical pgoutput slot in this database: "
                    "choose another --slot, or drop it with SELECT "
                    "pg_drop_replication_slot('%s') if nothing uses it\n",
                    s->cfg->slot, PQgetvalue(res, 0, 1), PQgetvalue(res, 0, 0),
                    PQgetvalue(res, 0, 2), s->cfg->slot);
        else {
            printf("slot %s already exists\n", s->cfg->slot);
            rc = 0;
        }
    } else {
        PQclear(res);
        res = PQexecParams(s->conn, create, 1, NULL, params, NULL, NULL, 0);
        if (PQresultStatus(res) == PGRES_TUPLES_OK) {
            printf("created replication slot %s\n", s->cfg->slot);
            rc = 0;
        } else {
            stream_pg_message(s->conn, msg, sizeof msg);
            fprintf(stderr, "walbust setup: could not create replication slot %s on %s: %s\n",
                    s->cfg->slot, s->where, msg);
        }
    }
    PQclear(res);
    return rc;
}

/* Whatever `walbust check --pg` would still complain about, as warnings. */
static int setup_report(Setup *s)
{
    RulesProblems p = {0};

    if (setup_load_catalog(s) < 0)
        return -1;
    (void)rules_check_catalog(s->rules, s->cfg->publication, catalog_lookup, s->cat, &p);
    cmd_print_problems(stderr, "warning: ", s->cfg->rules, &p);
    rules_problems_release(&p);
    if (s->need_full != NULL)
        fprintf(stderr,
                "warning: the rules need old values that the replica identity of %s does not "
                "carry; run walbust setup --replica-identity-full to set REPLICA IDENTITY FULL, "
                "or use {new.col} in those templates\n",
                s->need_full);
    return 0;
}

/* `walbust setup`: see the file comment. Exit 0 when everything is in
 * place, 1 on the first failure (message on stderr). */
int cmd_setup(const Config *cfg)
{
    Setup s = {.cfg = cfg};
    int rc = 1;

    s.rules = cmd_load_rules(cfg->rules, stderr);
    if (s.rules == NULL)
        return 1;
    s.conn = admin_connect(cfg, "setup", s.where, sizeof s.where);
    if (s.conn == NULL)
        goto cleanup;
    if (setup_preflight(&s) < 0 || setup_keyless(&s) < 0 || setup_publication(&s) < 0 ||
        setup_schema(&s) < 0 || setup_replica_identity(&s) < 0 || setup_slot(&s) < 0 ||
        setup_report(&s) < 0)
        goto cleanup;
    rc = 0;
cleanup:
    free(s.need_full);
    catalog_free(s.cat);
    PQfinish(s.conn);
    rules_free(s.rules);
    return rc;
}

/* --------------------------------------------------------------- status */

static void put_text(cJSON *obj, const char *key, const PGresult *res, int col)
{
    if (PQgetisnull(res, 0, col))
        cJSON_AddNullToObject(obj, key);
    else
        cJSON_AddStringToObject(obj, key, PQgetvalue(res, 0, col));
}

static void put_number(cJSON *obj, const char *key, const PGresult *res, int col)
{
    if (PQgetisnull(res, 0, col))
        cJSON_AddNullToObject(obj, key);
    else
        cJSON_AddNumberToObject(obj, key, strtod(PQgetvalue(res, 0, col), NULL));
}

static void put_bool(cJSON *obj, const char *key, const PGresult *res, int col)
{
    if (PQgetisnull(res, 0, col))
        cJSON_AddNullToObject(obj, key);
    else
        cJSON_AddBoolToObject(obj, key, PQgetvalue(res, 0, col)[0] == 't');
}

static const char *status_slot_sql =
    "SELECT s.slot_name IS NOT NULL, s.plugin, s.slot_type, s.database, s.temporary, "
    "  s.active, s.active_pid, s.confirmed_flush_lsn, s.restart_lsn, w.lsn, "
    "  pg_catalog.pg_wal_lsn_diff(w.lsn, s.confirmed_flush_lsn)::bigint, "
    "  s.wal_status, s.safe_wal_size "
    "FROM (SELECT CASE WHEN pg_catalog.pg_is_in_recovery() "
    "  THEN pg_catalog.pg_last_wal_replay_lsn() "
    "  ELSE pg_catalog.pg_current_wal_lsn() END AS lsn) w "
    "LEFT JOIN pg_catalog.pg_replication_slots s ON s.slot_name = $1";

/* Slot facts into obj. Returns 0, or -1 on a query error (printed). */
static int status_slot(PGconn *conn, const Config *cfg, const char *where, cJSON *obj)
{
    const char *params[1] = {cfg->slot};
    PGresult *res = PQexecParams(conn, status_slot_sql, 1, NULL, params, NULL, NULL, 0);
    char msg[1024];

    if (PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) != 1) {
        stream_pg_message(conn, msg, sizeof msg);
        fprintf(stderr, "walbust status: could not read slot %s on %s: %s\n", cfg->slot, where,
                msg);
        PQclear(res);
        return -1;
    }
    cJSON_AddStringToObject(obj, "server", where);
    cJSON_AddStringToObject(obj, "slot", cfg->slot);
    put_bool(obj, "exists", res, 0);
    put_text(obj, "plugin", res, 1);
    put_text(obj, "slot_type", res, 2);
    put_text(obj, "database", res, 3);
    put_bool(obj, "temporary", res, 4);
    put_bool(obj, "active", res, 5);
    put_number(obj, "active_pid", res, 6);
    put_text(obj, "confirmed_flush_lsn", res, 7);
    put_text(obj, "restart_lsn", res, 8);
    put_text(obj, "current_wal_lsn", res, 9);
    put_number(obj, "lag_bytes", res, 10);
    put_text(obj, "wal_status", res, 11);
    put_number(obj, "safe_wal_size", res, 12);
    PQclear(res);
    return 0;
}

/* Rules tables the publication does not cover, into obj. */
static int status_coverage(PGconn *conn, const Config *cfg, const Rules *rules, cJSON *obj)
{
    char err[1024];
    Catalog *cat = catalog_load(conn, rules, cfg->publication, err, sizeof err);
    cJSON *missing;

    if (cat == NULL) {
        fprintf(stderr, "walbust status: %s\n", err);
        return -1;
    }
    cJSON_AddStringToObject(obj, "rules", cfg->rules);
    missing = cJSON_AddArrayToObject(obj, "publication_missing_tables");
    for (size_t i = 0; i < rules_table_count(rules); i++) {
        const char *t = rules_table(rules, i);
        const RulesTableInfo *info = catalog_lookup(cat, t);
        if (info == NULL || !info->exists || !info->in_publication)
            cJSON_AddItemToArray(missing, cJSON_CreateString(t));
        /* Inheritance children the publication lacks are uncovered too. */
        for (size_t j = 0; info != NULL && info->in_publication && j < info->nunpublished; j++)
            cJSON_AddItemToArray(missing, cJSON_CreateString(info->unpublished[j]));
    }
    catalog_free(cat);
    return 0;
}

/* Publication facts (and, with rules, coverage) into obj. Returns 0, or -1
 * on a query error (printed). */
static int status_publication(PGconn *conn, const Config *cfg, const Rules *rules,
                              const char *where, cJSON *obj)
{
    const char *params[1] = {cfg->publication};
    const char *sql = "SELECT puballtables FROM pg_catalog.pg_publication WHERE pubname = $1";
    PGresult *res = PQexecParams(conn, sql, 1, NULL, params, NULL, NULL, 0);
    char msg[1024];

    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        stream_pg_message(conn, msg, sizeof msg);
        fprintf(stderr, "walbust status: could not read publication %s on %s: %s\n",
                cfg->publication, where, msg);
        PQclear(res);
        return -1;
    }
    cJSON_AddStringToObject(obj, "publication", cfg->publication);
    cJSON_AddBoolToObject(obj, "publication_exists", PQntuples(res) == 1);
    if (PQntuples(res) == 1)
        put_bool(obj, "publication_all_tables", res, 0);
    else
        cJSON_AddNullToObject(obj, "publication_all_tables");
    PQclear(res);
    return rules != NULL ? status_coverage(conn, cfg, rules, obj) : 0;
}

/* Aligned "key: value" lines; null prints as "-", arrays comma-joined. */
static void status_print_text(const cJSON *obj)
{
    int width = 0;
    const cJSON *it;

    cJSON_ArrayForEach(it, obj)
    {
        int n = (int)strlen(it->string);
        if (n > width)
            width = n;
    }
    cJSON_ArrayForEach(it, obj)
    {
        printf("%s:%*s ", it->string, width - (int)strlen(it->string), "");
        if (cJSON_IsNull(it))
            printf("-");
        else if (cJSON_IsBool(it))
            printf("%s", cJSON_IsTrue(it) ? "true" : "false");
        else if (cJSON_IsNumber(it))
            printf("%.0f", it->valuedouble);
        else if (cJSON_IsString(it))
            printf("%s", it->valuestring);
        else if (cJSON_IsArray(it)) {
            const cJSON *e;
            if (cJSON_GetArraySize(it) == 0)
                printf("none");
            cJSON_ArrayForEach(e, it) printf("%s%s", e == it->child ? "" : ", ", e->valuestring);
        }
        putchar('\n');
    }
}

static const char *jstr(const cJSON *obj, const char *key)
{
    const char *s = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(obj, key));
    return s ? s : "";
}

/* Decide the exit code from the report; hints go to stderr. */
static int status_verdict(const Config *cfg, const cJSON *obj, const char *where)
{
    const char *rules = cfg->rules ? cfg->rules : "FILE";
    const cJSON *missing = cJSON_GetObjectItemCaseSensitive(obj, "publication_missing_tables");
    int rc = 0;

    if (!cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(obj, "exists"))) {
        fprintf(stderr,
                "walbust status: replication slot \"%s\" does not exist on %s; create it with "
                "walbust setup --rules %s --slot %s (or start walbust run with --slot %s "
                "--create-slot)\n",
                cfg->slot, where, rules, cfg->slot, cfg->slot);
        rc = 1;
    } else if (strcmp(jstr(obj, "wal_status"), "lost") == 0) {
        fprintf(stderr,
                "walbust status: replication slot \"%s\" has lost WAL it still needed "
                "(wal_status lost): changes since %s were never seen, so caches may be stale. "
                "Runbook: stop walbust; SELECT pg_drop_replication_slot('%s'); walbust setup "
                "--rules %s; flush the Redis keys the rules cover; start walbust run; raise "
                "max_slot_wal_keep_size so it does not happen again\n",
                cfg->slot, jstr(obj, "confirmed_flush_lsn"), cfg->slot, rules);
        rc = 1;
    } else if (strcmp(jstr(obj, "plugin"), "pgoutput") != 0) {
        fprintf(stderr,
                "walbust status: replication slot \"%s\" uses plugin \"%s\"; walbust needs a "
                "pgoutput slot (choose another --slot)\n",
                cfg->slot, jstr(obj, "plugin"));
        rc = 1;
    } else if (strcmp(jstr(obj, "wal_status"), "unreserved") == 0) {
        fprintf(stderr,
                "walbust status: warning: replication slot \"%s\" is about to lose WAL "
                "(wal_status unreserved); start walbust run or raise max_slot_wal_keep_size\n",
                cfg->slot);
    }
    if (!cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(obj, "publication_exists"))) {
        fprintf(stderr,
                "walbust status: publication \"%s\" does not exist on %s; create it with "
                "walbust setup --rules %s\n",
                cfg->publication, where, rules);
        rc = 1;
    } else if (cJSON_GetArraySize(missing) > 0) {
        fprintf(stderr,
                "walbust status: publication \"%s\" does not cover every table in %s; run "
                "walbust setup --rules %s to add them\n",
                cfg->publication, rules, rules);
        rc = 1;
    }
    return rc;
}

/* `walbust status`: report on stdout, hints on stderr; exit 0 when healthy,
 * 1 when the operator must act or the server could not be asked. */
int cmd_status(const Config *cfg)
{
    char where[256];
    Rules *rules = NULL;
    PGconn *conn = NULL;
    cJSON *obj = cJSON_CreateObject();
    int rc = 1;

    if (obj == NULL)
        mem_oom();
    if (cfg->rules != NULL && (rules = cmd_load_rules(cfg->rules, stderr)) == NULL)
        goto cleanup;
    conn = admin_connect(cfg, "status", where, sizeof where);
    if (conn == NULL || status_slot(conn, cfg, where, obj) < 0 ||
        status_publication(conn, cfg, rules, where, obj) < 0)
        goto cleanup;
    cmd_audit_status(cfg, rules, obj);
    if (cfg->json) {
        char *text = cJSON_PrintUnformatted(obj);
        if (text == NULL)
            mem_oom();
        printf("%s\n", text);
        cJSON_free(text);
    } else {
        status_print_text(obj);
    }
    fflush(stdout);
    rc = status_verdict(cfg, obj, where);
cleanup:
    cJSON_Delete(obj);
    PQfinish(conn);
    rules_free(rules);
    return rc;
}
