/*
 * schema.c — schema changes on the rules' tables while walbust runs (see
 * schema.h). Reads the catalog on its own plain connection; acts through the
 * daemon's emit callback; logs what it finds and does.
 */
#include "schema.h"

#include <cjson/cJSON.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "catalog.h"
#include "log.h"
#include "lsn.h"
#include "mem.h"
#include "pubplan.h"
#include "runtime.h"
#include "stream.h"

/* What is known about one rules table. */
typedef struct SchemaTable {
    char *name;          /* "schema.table" */
    bool learnt;         /* relid below is from a catalog check */
    uint32_t relid;      /* 0: the table did not exist at the last check */
    bool recreated;      /* a DDL message created a table under this name */
    uint32_t relmsg_id;  /* relid of the last Relation message; 0: none yet */
    uint64_t relmsg_sig; /* its column names, hashed */
    bool warned_changed; /* the missing-`changed`-column warning was logged */
} SchemaTable;

/* Publication facts for one check. */
typedef struct PubInfo {
    bool exists, all_tables, managed;
} PubInfo;

/* What one check reads from the catalog for the rules' tables. */
typedef struct SchemaRead {
    PubInfo pub;
    uint32_t *relids; /* one per rules table, as schema_load_relids() */
    Catalog *cat;
} SchemaRead;

/* The periodic re-check's catalog reads, done on a thread of its own (with
 * thousands of rules tables they take ~0.5 s, which held the streaming
 * thread every --schema-recheck seconds); only the comparison and any
 * action run on the streaming thread. */
typedef struct SchemaBackground {
    pthread_t thread;
    bool running;         /* started and not joined */
    atomic_bool done;     /* the thread has finished: rc, rd and err are final */
    PGconn *conn;         /* the thread's own connection (kept between reads) */
    const Rules *rules;   /* what it reads for (s->rules when it started) */
    uint64_t checks;      /* s->checks when it started */
    const char *conninfo; /* borrowed from the config */
    const char *publication;
    SchemaRead rd;
    int rc; /* 0, or -1 with err set */
    char err[512];
} SchemaBackground;

struct Schema {
    SchemaConfig cfg;
    const Rules *rules;
    SchemaTable *tables;
    size_t ntables;
    PGconn *conn;
    bool pending;
    int64_t last_check_us;
    char *problems; /* the rules problems logged last; NULL: none */
    size_t nproblems;
    char first_problem[512]; /* the first of them, for /readyz */
    bool pub_missing_warned;
    bool altered;        /* this check added a table to a publication */
    uint64_t generation; /* counts DDL and Relation messages and checks */
    uint64_t checks;     /* counts the checks that acted on what they read */
    SchemaBackground bg;
};

static bool bg_join(Schema *s);
static void read_release(SchemaRead *rd);

static SchemaTable *find_table(Schema *s, const char *name, size_t len)
{
    for (size_t i = 0; i < s->ntables; i++)
        if (strlen(s->tables[i].name) == len && memcmp(s->tables[i].name, name, len) == 0)
            return &s->tables[i];
    return NULL;
}

static SchemaTable *find_relid(Schema *s, uint32_t relid)
{
    for (size_t i = 0; relid != 0 && i < s->ntables; i++)
        if (s->tables[i].relid == relid)
            return &s->tables[i];
    return NULL;
}

Schema *schema_new(const SchemaConfig *cfg, const Rules *rules)
{
    Schema *s = xcalloc(1, sizeof *s);

    s->cfg = *cfg;
    if (s->cfg.recheck_s <= 0)
        s->cfg.recheck_s = SCHEMA_RECHECK_DEFAULT_S;
    s->last_check_us = runtime_now_us();
    schema_set_rules(s, rules);
    s->pending = false; /* schema_startup() checks first */
    return s;
}

static void free_tables(SchemaTable *t, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free(t[i].name);
    free(t);
}

void schema_free(Schema *s)
{
    if (s == NULL)
        return;
    bg_join(s);
    read_release(&s->bg.rd);
    PQfinish(s->bg.conn);
    free_tables(s->tables, s->ntables);
    PQfinish(s->conn);
    free(s->problems);
    free(s);
}

static int cmp_table_name(const void *a, const void *b)
{
    return strcmp((*(const SchemaTable *const *)a)->name, (*(const SchemaTable *const *)b)->name);
}

void schema_set_rules(Schema *s, const Rules *rules)
{
    size_t n = rules_table_count(rules);
    SchemaTable *t = xcalloc(n ? n : 1, sizeof *t);
    /* The old tables by name, searched by bisection: a reload of thousands
     * of tables runs on the streaming thread. */
    SchemaTable **by_name = xcalloc(s->ntables + 1, sizeof *by_name);

    if (s->bg.running) { /* it reads the old rules: wait, and drop its read */
        bg_join(s);
        read_release(&s->bg.rd);
    }
    for (size_t i = 0; i < s->ntables; i++)
        by_name[i] = &s->tables[i];
    qsort(by_name, s->ntables, sizeof *by_name, cmp_table_name);
    for (size_t i = 0; i < n; i++) {
        SchemaTable key = {.name = (char *)rules_table(rules, i)}, *pkey = &key;
        SchemaTable **old =
            s->ntables > 0 ? bsearch(&pkey, by_name, s->ntables, sizeof *by_name, cmp_table_name)
                           : NULL;
        if (old != NULL)
            t[i] = **old;
        else
            memset(&t[i], 0, sizeof t[i]);
        t[i].name = xstrdup(key.name);
    }
    free(by_name);
    free_tables(s->tables, s->ntables);
    s->tables = t;
    s->ntables = n;
    s->rules = rules;
    s->pending = true; /* validate the new rules against the catalog soon */
}

uint64_t schema_generation(const Schema *s)
{
    return s->generation;
}

void schema_set_rules_checked(Schema *s, const Rules *rules, const uint32_t *relids,
                              uint64_t generation)
{
    bool known = relids != NULL && generation == s->generation;
    bool pending = s->pending;

    schema_set_rules(s, rules);
    if (!known)
        return; /* something happened meanwhile: check at once */
    for (size_t i = 0; i < s->ntables; i++)
        if (!s->tables[i].learnt) {
            s->tables[i].relid = relids[i];
            s->tables[i].learnt = true;
        }
    s->pending = pending;
    if (s->problems != NULL)
        log_event(LOG_LEVEL_INFO, NULL, NULL, "the rules match the schema again");
    free(s->problems);
    s->problems = NULL;
    s->nproblems = 0;
}

/* ---- noticing changes ------------------------------------------------------------ */

/* Does one object of a DDL message concern the rules? */
static void note_object(Schema *s, const char *tag, const char *type, const char *identity,
                        uint32_t oid)
{
    SchemaTable *t = NULL;
    size_t len = strlen(identity);

    if (strcmp(type, "table") == 0) {
        t = find_table(s, identity, len);
        /* CREATE TABLE, CREATE TABLE AS, SELECT INTO: a new table under a
         * rules table's name (drop/create). A rename into the name shows as
         * ALTER TABLE and is found by its relid at the check. */
        if (t != NULL && (strncmp(tag, "CREATE TABLE", 12) == 0 || strcmp(tag, "SELECT INTO") == 0))
            t->recreated = true;
    } else if (strcmp(type, "table column") == 0) {
        const char *dot = strrchr(identity, '.');
        t = dot != NULL ? find_table(s, identity, (size_t)(dot - identity)) : NULL;
    } else if (strcmp(type, "index") == 0 || strcmp(type, "schema") == 0 ||
               strncmp(type, "publication", 11) == 0) {
        s->pending = true; /* replica identity index, schema rename, membership */
        return;
    }
    if (t != NULL || find_relid(s, oid) != NULL)
        s->pending = true;
}

bool schema_on_message(Schema *s, const PgoMsg *m)
{
    cJSON *root, *objs, *o;
    const cJSON *tag;

    if (strcmp(m->u.message.prefix, SCHEMA_DDL_PREFIX) != 0)
        return false;
    s->generation++;
    root = cJSON_ParseWithLength(m->u.message.content, m->u.message.len);
    tag = cJSON_GetObjectItemCaseSensitive(root, "tag");
    objs = cJSON_GetObjectItemCaseSensitive(root, "objects");
    if (!cJSON_IsString(tag) || !cJSON_IsArray(objs)) {
        /* Not ours to judge: re-check the catalog, the safe side. */
        s->pending = true;
        cJSON_Delete(root);
        return true;
    }
    cJSON_ArrayForEach(o, objs)
    {
        const cJSON *type = cJSON_GetObjectItemCaseSensitive(o, "type");
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(o, "identity");
        const cJSON *oid = cJSON_GetObjectItemCaseSensitive(o, "oid");
        if (!cJSON_IsString(type) || !cJSON_IsString(id)) {
            s->pending = true;
            continue;
        }
        note_object(s, tag->valuestring, type->valuestring, id->valuestring,
                    cJSON_IsNumber(oid) ? (uint32_t)oid->valuedouble : 0);
    }
    cJSON_Delete(root);
    return true;
}

static uint64_t columns_sig(const PgoRelation *rel)
{
    uint64_t h = 1469598103934665603ULL; /* FNV-1a over the names, NUL-separated */

    for (uint16_t i = 0; i < rel->ncols; i++)
        for (const char *p = rel->cols[i].name;; p++) {
            h = (h ^ (unsigned char)*p) * 1099511628211ULL;
            if (*p == '\0')
                break;
        }
    return h ^ rel->ncols;
}

void schema_on_relation(Schema *s, const PgoRelation *rel)
{
    SchemaTable *t = find_table(s, rel->qualname, strlen(rel->qualname));
    uint64_t sig;

    s->generation++; /* maybe a table new rules name: see schema_set_rules_checked() */
    if (t == NULL)
        return;
    sig = columns_sig(rel);
    /* The first Relation message after a (re)connect only tells what the
     * start-up check already saw; a different relid or shape later is news. */
    if (t->relmsg_id != 0 && (t->relmsg_id != rel->relid || t->relmsg_sig != sig))
        s->pending = true;
    if (t->learnt && t->relid != 0 && t->relid != rel->relid)
        s->pending = true;
    t->relmsg_id = rel->relid;
    t->relmsg_sig = sig;
}

void schema_note_eval(Schema *s, const char *table, const RulesEvalStats *st)
{
    SchemaTable *t;

    if (st->changed_missing == 0)
        return;
    t = find_table(s, table, strlen(table));
    if (t == NULL || t->warned_changed)
        return;
    t->warned_changed = true;
    log_event(LOG_LEVEL_WARN, NULL, table,
              "a column named in \"changed\" of a rule for %s is not in the table (renamed or "
              "dropped?); the rule now fires on every update of %s, never skipping one; fix "
              "\"changed\" in %s and reload (SIGHUP) to filter again",
              table, table, s->cfg.rules_path);
}

bool schema_due(const Schema *s, bool idle)
{
    if (s->pending)
        return true;
    if (!idle)
        return false;
    if (s->bg.running)
        return atomic_load(&s->bg.done);
    return runtime_now_us() - s->last_check_us >= (int64_t)s->cfg.recheck_s * 1000000;
}

bool schema_busy(const Schema *s)
{
    return s->bg.running && !atomic_load(&s->bg.done);
}

/* ---- reading the catalog ---------------------------------------------------------- */

/* Run one statement on a plain connection; NULL with err set on failure. */
static PGresult *exec_sql(PGconn *conn, const char *sql, int nparams, const char *const *params,
                          ExecStatusType want, char *err, size_t errlen)
{
    PGresult *res = PQexecParams(conn, sql, nparams, NULL, params, NULL, NULL, 0);
    char *nl;

    if (PQresultStatus(res) == want)
        return res;
    snprintf(err, errlen, "%s", PQerrorMessage(conn));
    if ((nl = strchr(err, '\n')) != NULL)
        *nl = '\0';
    PQclear(res);
    return NULL;
}

static bool ensure_conn(Schema *s, char *err, size_t errlen)
{
    if (s->conn != NULL && PQstatus(s->conn) == CONNECTION_OK)
        return true;
    PQfinish(s->conn);
    s->conn = stream_plain_connect(s->cfg.conninfo, err, errlen);
    return s->conn != NULL;
}

static int load_pub(PGconn *conn, const char *publication, PubInfo *pub, char *err, size_t errlen)
{
    const char *params[1] = {publication};
    PGresult *res = exec_sql(conn,
                             "SELECT p.puballtables, coalesce(pg_catalog.obj_description(p.oid, "
                             "'pg_publication'), '') LIKE 'walbust:%' "
                             "FROM pg_catalog.pg_publication p WHERE p.pubname = $1",
                             1, params, PGRES_TUPLES_OK, err, errlen);

    if (res == NULL)
        return -1;
    pub->exists = PQntuples(res) == 1;
    pub->all_tables = pub->exists && PQgetvalue(res, 0, 0)[0] == 't';
    pub->managed = pub->exists && PQgetvalue(res, 0, 1)[0] == 't';
    PQclear(res);
    return 0;
}

/* Add part (len bytes) to b as an element of a text[] literal. */
static void array_elem(MemText *b, const char *part, size_t len)
{
    char c[2] = {0, 0};

    mem_text_add(b, "\"");
    for (size_t i = 0; i < len; i++) {
        if (part[i] == '"' || part[i] == '\\')
            mem_text_add(b, "\\");
        c[0] = part[i];
        mem_text_add(b, c);
    }
    mem_text_add(b, "\"");
}

/* In one query for all rules tables (one query per table held the
 * streaming thread for seconds with thousands of tables). */
int schema_load_relids(PGconn *conn, const Rules *rules, uint32_t *relids, char *err, size_t errlen)
{
    MemText nsp = {0}, rel = {0};
    const char *params[2];
    size_t n = rules_table_count(rules);
    PGresult *res;

    mem_text_add(&nsp, "{");
    mem_text_add(&rel, "{");
    for (size_t i = 0; i < n; i++) {
        const char *name = rules_table(rules, i), *dot = strchr(name, '.');
        mem_text_add(&nsp, i > 0 ? "," : "");
        mem_text_add(&rel, i > 0 ? "," : "");
        if (dot == NULL) {
            mem_text_add(&nsp, "NULL"); /* not "schema.table": no relid */
            mem_text_add(&rel, "NULL");
            continue;
        }
        array_elem(&nsp, name, (size_t)(dot - name));
        array_elem(&rel, dot + 1, strlen(dot + 1));
    }
    mem_text_add(&nsp, "}");
    mem_text_add(&rel, "}");
    params[0] = nsp.s;
    params[1] = rel.s;
    res = exec_sql(conn,
                   "SELECT u.i, c.oid FROM ROWS FROM (pg_catalog.unnest($1::text[]), "
                   "pg_catalog.unnest($2::text[])) "
                   "WITH ORDINALITY AS u(nsp, rel, i) "
                   "JOIN pg_catalog.pg_namespace n ON n.nspname = u.nsp "
                   "JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = u.rel "
                   "AND c.relkind IN ('r', 'p')",
                   2, params, PGRES_TUPLES_OK, err, errlen);
    free(nsp.s);
    free(rel.s);
    if (res == NULL)
        return -1;
    memset(relids, 0, n * sizeof *relids);
    for (int r = 0; r < PQntuples(res); r++) {
        size_t i = (size_t)strtoull(PQgetvalue(res, r, 0), NULL, 10);
        if (i >= 1 && i <= n)
            relids[i - 1] = (uint32_t)strtoul(PQgetvalue(res, r, 1), NULL, 10);
    }
    PQclear(res);
    return 0;
}

/* A name ("schema.table" or a publication) as SQL for messages: each part
 * as written when it is a plain lowercase identifier, else double-quoted. */
static void sql_display(const char *name, bool dotted, char *out, size_t n)
{
    size_t o = 0;
    const char *p = name;

    while (o + 1 < n) {
        const char *end = dotted ? strchr(p, '.') : NULL;
        size_t len = end ? (size_t)(end - p) : strlen(p);
        bool plain = len > 0 && !(p[0] >= '0' && p[0] <= '9');

        for (size_t i = 0; i < len; i++)
            plain = plain && ((p[i] >= 'a' && p[i] <= 'z') || (p[i] >= '0' && p[i] <= '9') ||
                              p[i] == '_' || p[i] == '$');
        o += (size_t)snprintf(out + o, n - o, plain ? "%.*s" : "\"", (int)len, p);
        for (size_t i = 0; !plain && i < len && o + 2 < n; i++) {
            if (p[i] == '"')
                out[o++] = '"';
            out[o++] = p[i];
        }
        if (!plain && o + 1 < n)
            out[o++] = '"';
        out[o < n ? o : n - 1] = '\0';
        if (end == NULL || o + 1 >= n)
            break;
        out[o++] = '.';
        p = end + 1;
        dotted = false; /* "schema.table": split at the first dot only */
    }
    out[o < n ? o : n - 1] = '\0';
}

/* ---- acting ---------------------------------------------------------------------- */

/* Invalidate everything the rules for table cover, widened as for a
 * truncate. Returns the number of invalidations emitted. */
static unsigned widen_table(Schema *s, const char *table, const char *lsn)
{
    char when[PGTIME_TEXT_MAX];
    RulesChange chg = {.table = table,
                       .op = RULES_TRUNCATE,
                       .lsn = lsn,
                       .commit_time = pgtime_format(pgtime_now(), when)};
    RulesEvalStats st = {0};

    rules_eval(s->rules, &chg, s->cfg.emit, s->cfg.arg, &st);
    return st.emitted;
}

static int add_to_publication(Schema *s, const char *publication, const char *table, char *err,
                              size_t errlen)
{
    char *qt = stream_quote_table(s->conn, table);
    char *qp = PQescapeIdentifier(s->conn, publication, strlen(publication));
    size_t len;
    char *sql, msg[512];
    PGresult *res;

    if (qp == NULL)
        mem_oom();
    len = strlen(qp) + strlen(qt) + 64;
    sql = xcalloc(1, len);
    snprintf(sql, len, "ALTER PUBLICATION %s ADD TABLE %s", qp, qt);
    res = exec_sql(s->conn, sql, 0, NULL, PGRES_COMMAND_OK, msg, sizeof msg);
    if (res == NULL)
        snprintf(err, errlen,
                 "could not add table %s back to publication \"%s\": %s; run %s as the table's "
                 "owner, then restart walbust (it replays the change and invalidates everything "
                 "the rules for %s cover)",
                 table, publication, msg, sql, table);
    if (res != NULL)
        s->altered = true;
    PQclear(res);
    PQfreemem(qp);
    free(sql);
    free(qt);
    return res == NULL ? -1 : 0;
}

/* Which publication the table goes back into, the way walbust setup
 * decides (pubplan.h): the publication, or its insert-only companion for a
 * table without a replica identity whose rules need only inserts. A table
 * without a replica identity whose rules need updates or deletes is not
 * added anywhere: the application's UPDATE and DELETE on it would fail.
 * Returns the publication name (valid while cat lives), or NULL with err
 * set. */
static const char *target_publication(Schema *s, const Catalog *cat, const RulesTableInfo *info,
                                      const char *what, char *err, size_t errlen)
{
    PubPlan plan;
    const char *target = s->cfg.publication, *companion = NULL;
    const char *sqln = info != NULL && info->sql_name != NULL ? info->sql_name : "";

    if (info == NULL)
        return target;
    pubplan_build(&plan, s->rules, cat);
    for (size_t i = 0; i < plan.nfix && target != NULL; i++)
        if (strcmp(plan.fix_rules[i], info->table) == 0) {
            snprintf(err, errlen,
                     "table %s %s, and %s has no replica identity (no primary key) while the "
                     "rules for it need updates or deletes: adding it to publication \"%s\" "
                     "would make the application's UPDATE and DELETE on it fail, so walbust "
                     "stops. Fix: give it a replica identity (ALTER TABLE %s ADD PRIMARY KEY "
                     "(...), or ALTER TABLE %s REPLICA IDENTITY FULL), then run walbust setup "
                     "and restart walbust",
                     info->table, what, plan.fix[i], s->cfg.publication, plan.fix[i], plan.fix[i]);
            target = NULL;
        }
    for (size_t i = 0; i < plan.ninsert && target != NULL; i++)
        if (strcmp(plan.insert_only[i], sqln) == 0) {
            if (catalog_companion(cat, &companion)) {
                target = companion;
            } else {
                snprintf(err, errlen,
                         "table %s %s and has no replica identity; its rules need only "
                         "inserts, which belong in the insert-only companion publication, and "
                         "that does not exist. Fix: run walbust setup, then restart walbust",
                         info->table, what);
                target = NULL;
            }
        }
    pubplan_release(&plan);
    return target;
}

/* Wait until every transaction that was running when the table was added
 * back has ended: such a transaction may have written the table under a
 * snapshot that did not publish it, and the widened invalidation must come
 * after its writes. */
static int wait_in_flight(Schema *s, const char *table, char *err, size_t errlen)
{
    PGresult *res =
        exec_sql(s->conn, "SELECT pg_catalog.pg_snapshot_xmax(pg_catalog.pg_current_snapshot())", 0,
                 NULL, PGRES_TUPLES_OK, err, errlen);
    char xmax[32];
    const char *params[1] = {xmax};
    int64_t start = runtime_now_us();
    bool warned = false;

    if (res == NULL)
        return -1;
    snprintf(xmax, sizeof xmax, "%s", PQgetvalue(res, 0, 0));
    PQclear(res);
    for (;;) {
        bool done;
        res = exec_sql(s->conn,
                       "SELECT pg_catalog.pg_snapshot_xmin(pg_catalog.pg_current_snapshot()) >= "
                       "$1::pg_catalog.xid8",
                       1, params, PGRES_TUPLES_OK, err, errlen);
        if (res == NULL)
            return -1;
        done = PQgetvalue(res, 0, 0)[0] == 't';
        PQclear(res);
        if (done)
            return 0;
        if (!warned && runtime_now_us() - start > 10 * 1000000LL) {
            log_event(LOG_LEVEL_WARN, NULL, table,
                      "waiting for transactions that were running when %s was added back to "
                      "the publication to end (see pg_stat_activity: xact_start); nothing is "
                      "confirmed meanwhile",
                      table);
            warned = true;
        }
        runtime_sleep(50, s->cfg.tick, s->cfg.arg);
        if (runtime_stop) {
            snprintf(err, errlen,
                     "stopping while waiting for transactions that were running "
                     "when %s was added back to the publication",
                     table);
            return -1;
        }
    }
}

/* Put a re-created (or removed) table back into the publication, or fail
 * when walbust does not manage it. */
static int restore_membership(Schema *s, const PubInfo *pub, const Catalog *cat,
                              const RulesTableInfo *info, SchemaTable *t, const char *what,
                              const char *lsn, char *err, size_t errlen)
{
    char qt[300], qp[200];
    const char *target;

    sql_display(t->name, true, qt, sizeof qt);
    sql_display(s->cfg.publication, false, qp, sizeof qp);
    if (!pub->managed) {
        snprintf(err, errlen,
                 "table %s %s and is not in publication \"%s\", which walbust does not manage "
                 "(walbust setup did not create it): its changes cannot be decoded, so walbust "
                 "stops without confirming %s. Fix: ALTER PUBLICATION %s ADD TABLE %s; then "
                 "restart walbust: it replays the change and invalidates everything the rules "
                 "for %s cover. To let walbust do this itself after migrations: COMMENT ON "
                 "PUBLICATION %s IS 'walbust: managed'",
                 t->name, what, s->cfg.publication, lsn, qp, qt, t->name, qp);
        return -1;
    }
    target = target_publication(s, cat, info, what, err, errlen);
    if (target == NULL || add_to_publication(s, target, t->name, err, errlen) != 0)
        return -1;
    log_event(LOG_LEVEL_WARN, lsn, t->name,
              "table %s %s; added it back to publication \"%s\" (managed by walbust)", t->name,
              what, target);
    return wait_in_flight(s, t->name, err, errlen);
}

/* Compare one rules table with the catalog and act. */
static int check_table(Schema *s, const PubInfo *pub, const Catalog *cat, SchemaTable *t,
                       uint32_t relid, const char *lsn, char *err, size_t errlen)
{
    const RulesTableInfo *info = catalog_lookup((void *)cat, t->name);
    bool in_pub = info != NULL && info->exists && info->in_publication;
    const char *what;
    unsigned n;

    if (relid == 0) {
        if (t->learnt && t->relid != 0) {
            n = widen_table(s, t->name, lsn);
            log_event(LOG_LEVEL_WARN, lsn, t->name,
                      "table %s was dropped (or renamed away); invalidated everything its rules "
                      "cover (%u widened invalidations); its rules apply again when a table of "
                      "this name is back",
                      t->name, n);
        }
        t->relid = 0;
        t->learnt = true;
        t->recreated = false;
        return 0;
    }
    if (t->learnt && t->relid != relid)
        what = t->relid == 0 ? "was created again"
                             : "was replaced by another table of the same name (dropped and "
                               "re-created, or renamed)";
    else if (t->recreated)
        what = "was created again (CREATE TABLE)";
    else if (!in_pub && pub->exists && (t->learnt || pub->managed))
        what = t->learnt ? "was removed from the publication" : "is not in the publication";
    else {
        t->relid = relid;
        t->learnt = true;
        return 0;
    }
    if (!in_pub && pub->exists &&
        restore_membership(s, pub, cat, info, t, what, lsn, err, errlen) != 0)
        return -1;
    n = widen_table(s, t->name, lsn);
    log_event(LOG_LEVEL_WARN, lsn, t->name,
              "table %s %s: invalidated everything its rules cover (%u widened invalidations): "
              "the rows it replaced went without decodable deletes, and its changes before it "
              "was in the publication cannot be decoded",
              t->name, what, n);
    t->relid = relid;
    t->learnt = true;
    t->recreated = false;
    return 0;
}

/* Log the rules problems against the live schema when they differ from the
 * ones logged last. They are warnings: what is missing at run time fires
 * (`changed`) or widens (templates). */
static void log_problems(Schema *s, Catalog *cat, const char *lsn)
{
    RulesProblems pr = {0, NULL};
    char *all = NULL;
    size_t len = 0;

    rules_check_catalog(s->rules, s->cfg.publication, catalog_lookup, cat, &pr);
    s->nproblems = pr.count;
    if (pr.count > 0)
        snprintf(s->first_problem, sizeof s->first_problem, "%s%s", pr.items[0].msg,
                 pr.count > 1 ? " (and more: see the log)" : "");
    for (size_t i = 0; i < pr.count; i++) {
        size_t m = strlen(pr.items[i].msg);
        all = xrealloc(all, len + m + 2);
        memcpy(all + len, pr.items[i].msg, m);
        all[len + m] = '\n';
        all[len + m + 1] = '\0';
        len += m + 1;
    }
    if ((all == NULL) != (s->problems == NULL) || (all != NULL && strcmp(all, s->problems) != 0)) {
        for (size_t i = 0; i < pr.count; i++)
            log_event(LOG_LEVEL_WARN, lsn, NULL,
                      "the rules no longer match the schema: %s:%d:%d: %s (walbust keeps "
                      "running: a missing \"changed\" column fires, a missing template value "
                      "widens; fix the rules or the schema, then reload with SIGHUP)",
                      s->cfg.rules_path, pr.items[i].line, pr.items[i].column, pr.items[i].msg);
        if (all == NULL)
            log_event(LOG_LEVEL_INFO, lsn, NULL, "the rules match the schema again");
        free(s->problems);
        s->problems = all;
    } else {
        free(all);
    }
    rules_problems_release(&pr);
}

static void read_release(SchemaRead *rd)
{
    catalog_free(rd->cat);
    free(rd->relids);
    memset(rd, 0, sizeof *rd);
}

/* Read what a check needs on conn. Returns 0, or -1 with err set (rd
 * released). */
static int read_catalog(PGconn *conn, const Rules *rules, const char *publication, SchemaRead *rd,
                        char *err, size_t errlen)
{
    memset(rd, 0, sizeof *rd);
    rd->relids = xcalloc(rules_table_count(rules) + 1, sizeof *rd->relids);
    if (load_pub(conn, publication, &rd->pub, err, errlen) != 0 ||
        schema_load_relids(conn, rules, rd->relids, err, errlen) != 0 ||
        (rd->cat = catalog_load(conn, rules, publication, err, errlen)) == NULL) {
        read_release(rd);
        return -1;
    }
    return 0;
}

/* Compare the rules tables with what was read and act. Returns 0 or -1
 * (must stop; err set). */
static int act(Schema *s, SchemaRead *rd, const char *lsn, char *err, size_t errlen)
{
    s->generation++;
    s->checks++;
    if (!rd->pub.exists && !s->pub_missing_warned)
        log_event(LOG_LEVEL_WARN, lsn, NULL,
                  "publication \"%s\" does not exist; tables cannot be put back into it",
                  s->cfg.publication);
    s->pub_missing_warned = !rd->pub.exists;
    s->altered = false;
    for (size_t i = 0; i < s->ntables; i++)
        if (check_table(s, &rd->pub, rd->cat, &s->tables[i], rd->relids[i], lsn, err, errlen) != 0)
            return -1;
    if (s->altered) { /* re-read after acting: membership has changed */
        catalog_free(rd->cat);
        rd->cat = catalog_load(s->conn, s->rules, s->cfg.publication, err, errlen);
    }
    if (rd->cat != NULL)
        log_problems(s, rd->cat, lsn);
    return 0;
}

/* One check on the module's own connection. Returns 0, -1 (must stop; err
 * set) or -2 (the catalog could not be read; err set). */
static int check_once(Schema *s, const char *lsn, char *err, size_t errlen)
{
    SchemaRead rd;
    int64_t start = runtime_now_us();
    int rc;

    if (!ensure_conn(s, err, errlen) ||
        read_catalog(s->conn, s->rules, s->cfg.publication, &rd, err, errlen) != 0)
        return -2;
    rc = act(s, &rd, lsn, err, errlen);
    read_release(&rd);
    if (rc == 0)
        log_event(LOG_LEVEL_DEBUG, lsn, NULL,
                  "schema: catalog check of %zu rules tables took %.1f ms", s->ntables,
                  (double)(runtime_now_us() - start) / 1000.0);
    return rc;
}

/* ---- the periodic re-check in the background -------------------------------- */

static void *bg_thread(void *arg)
{
    SchemaBackground *bg = arg;

    bg->rc = -1;
    if (bg->conn == NULL || PQstatus(bg->conn) != CONNECTION_OK) {
        PQfinish(bg->conn);
        bg->conn = stream_plain_connect(bg->conninfo, bg->err, sizeof bg->err);
    }
    if (bg->conn != NULL)
        bg->rc =
            read_catalog(bg->conn, bg->rules, bg->publication, &bg->rd, bg->err, sizeof bg->err);
    if (bg->rc != 0) { /* reconnect next time */
        PQfinish(bg->conn);
        bg->conn = NULL;
    }
    atomic_store(&bg->done, true);
    return NULL;
}

/* Start the background read. Returns false when no thread could start. */
static bool bg_start(Schema *s)
{
    SchemaBackground *bg = &s->bg;

    bg->rules = s->rules;
    bg->checks = s->checks;
    bg->conninfo = s->cfg.conninfo;
    bg->publication = s->cfg.publication;
    atomic_store(&bg->done, false);
    if (pthread_create(&bg->thread, NULL, bg_thread, bg) != 0)
        return false;
    bg->running = true;
    return true;
}

/* Join the thread (waiting for it when not done). Returns whether its read
 * is still current: it succeeded, no check acted and no change was noted
 * since it started, and the rules are the same. */
static bool bg_join(Schema *s)
{
    SchemaBackground *bg = &s->bg;

    if (!bg->running)
        return false;
    pthread_join(bg->thread, NULL);
    bg->running = false;
    return bg->rc == 0 && bg->checks == s->checks && !s->pending && bg->rules == s->rules;
}

/* The periodic re-check: start the read, or act on a finished one. */
static int recheck(Schema *s, const char *lsn, char *err, size_t errlen)
{
    int64_t start = runtime_now_us();
    bool current;
    int rc;

    if (!s->bg.running) {
        if (bg_start(s))
            return 0;
        rc = check_once(s, lsn, err, errlen); /* no thread: inline */
        s->last_check_us = runtime_now_us();
        if (rc == -2)
            log_warn("periodic schema re-check failed: %s", err);
        return rc == -1 ? -1 : 0;
    }
    if (!atomic_load(&s->bg.done))
        return 0;
    current = bg_join(s);
    if (!current) {
        if (s->bg.rc != 0)
            log_warn("periodic schema re-check failed: %s", s->bg.err);
        read_release(&s->bg.rd);
        s->last_check_us = runtime_now_us(); /* the next one in an interval */
        return 0;
    }
    rc = act(s, &s->bg.rd, lsn, err, errlen);
    read_release(&s->bg.rd);
    s->last_check_us = runtime_now_us();
    if (rc == 0)
        log_event(LOG_LEVEL_DEBUG, lsn, NULL,
                  "schema: periodic catalog check of %zu rules tables read in the background, "
                  "compared in %.1f ms",
                  s->ntables, (double)(runtime_now_us() - start) / 1000.0);
    return rc;
}

int schema_apply(Schema *s, const char *lsn, char *err, size_t errlen)
{
    Backoff b = {0, 200, 5000};

    if (!s->pending)
        return recheck(s, lsn, err, errlen);
    for (;;) {
        int rc = check_once(s, lsn, err, errlen);

        if (rc != -2) {
            s->last_check_us = runtime_now_us();
            if (rc == 0)
                s->pending = false;
            return rc;
        }
        /* A schema change is waiting to be checked: never go past it. */
        log_event(LOG_LEVEL_WARN, lsn, NULL,
                  "could not check the schema after a schema change: %s; retrying (nothing is "
                  "confirmed past this position meanwhile)",
                  err);
        runtime_sleep(backoff_next(&b), s->cfg.tick, s->cfg.arg);
        if (runtime_stop) {
            snprintf(err, errlen,
                     "stopping before the schema change at %s was checked; it is "
                     "replayed on restart",
                     lsn);
            return -1;
        }
    }
}

int schema_startup(Schema *s, const char *lsn, char *err, size_t errlen)
{
    void (*tick)(void *) = s->cfg.tick;
    int rc;

    /* Nothing streams yet: no keepalives to send while waiting. */
    s->cfg.tick = NULL;
    rc = check_once(s, lsn, err, errlen);
    s->cfg.tick = tick;
    s->last_check_us = runtime_now_us();
    if (rc == 0)
        s->pending = false;
    return rc == 0 ? 0 : -1;
}

size_t schema_problems(const Schema *s, const char **first)
{
    if (first != NULL)
        *first = s->nproblems > 0 ? s->first_problem : NULL;
    return s->nproblems;
}

bool schema_publication_missing(const Schema *s)
{
    return s->pub_missing_warned;
}
