/*
 * check_cmd.c — `walbust check` and the shared rules loader.
 *
 * cmd_load_rules() reads a rules file and compiles it, printing every
 * problem in the compiler-style form editors understand
 * ("FILE:LINE:COLUMN: message (at rules[2].keys[0])"); run, decode, setup
 * and check all load rules through it. `walbust check` adds, when a
 * database is configured (--pg or WALBUST_PG), the checks against the live
 * server and schema: wal_level is logical, every rules table and column
 * exists and is published, and every placeholder that needs an old value can
 * get one under the table's replica identity (docs/guarantees.md guarantee 7). A publication or
 * slot that does not exist yet is what `walbust setup` will create: it is
 * reported as such, and not a problem (a slot of that name that walbust
 * cannot use is). It prints "FILE: ok (N rules, M tables)" and exits 0 only
 * when nothing is wrong; otherwise it exits 1.
 */
#include <cjson/cJSON.h>
#include <errno.h>
#include <libpq-fe.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "catalog.h"
#include "lookup.h"
#include "cmds.h"
#include "log.h"
#include "stream.h"
#include "mem.h"
#include "pubplan.h"

/* Read the whole file into a NUL-terminated buffer the caller frees.
 * Returns NULL with errno set on failure. */
static char *read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    size_t cap = 8192, n = 0;
    char *buf;
    int saved;

    if (f == NULL)
        return NULL;
    buf = xmalloc(cap);
    for (;;) {
        size_t got = fread(buf + n, 1, cap - n - 1, f);
        n += got;
        if (got == 0)
            break;
        if (n + 1 == cap) {
            buf = xrealloc(buf, cap * 2);
            cap *= 2;
        }
    }
    if (ferror(f)) {
        saved = errno ? errno : EIO;
        fclose(f);
        free(buf);
        errno = saved;
        return NULL;
    }
    fclose(f);
    buf[n] = '\0';
    *len = n;
    return buf;
}

/* See cmds.h. */
void cmd_format_problem(char *buf, size_t len, const char *path, const RulesProblem *p)
{
    int n;

    if (p->line > 0 && p->column > 0)
        n = snprintf(buf, len, "%s:%d:%d: %s", path, p->line, p->column, p->msg);
    else if (p->line > 0)
        n = snprintf(buf, len, "%s:%d: %s", path, p->line, p->msg);
    else
        n = snprintf(buf, len, "%s: %s", path, p->msg);
    if (p->path[0] != '\0' && n >= 0 && (size_t)n < len)
        snprintf(buf + n, len - (size_t)n, " (at %s)", p->path);
}

/* See cmds.h. */
void cmd_print_problems(FILE *out, const char *prefix, const char *path,
                        const RulesProblems *problems)
{
    char line[2048];

    for (size_t i = 0; i < problems->count; i++) {
        cmd_format_problem(line, sizeof line, path, &problems->items[i]);
        if (out != NULL)
            fprintf(out, "%s%s\n", prefix, line);
        else
            log_error("%s%s", prefix, line);
    }
}

/* Load and compile; on success *text (caller frees) holds the file. */
static Rules *load_rules_text(const char *path, FILE *report, char **text, size_t *len)
{
    RulesProblems problems = {0};
    Rules *rules;

    /* Under --log-format json a log shipper must get the problems as
     * events; in text they stay in the compiler-style form editors read. */
    if (report == NULL && !log_is_json())
        report = stderr;
    *text = read_file(path, len);
    if (*text == NULL) {
        if (report != NULL)
            fprintf(report, "walbust: could not read rules file %s: %s\n", path, strerror(errno));
        else
            log_error("could not read rules file %s: %s", path, strerror(errno));
        return NULL;
    }
    rules = rules_parse(*text, *len, &problems);
    if (rules == NULL) {
        cmd_print_problems(report, "", path, &problems);
        if (problems.count == 0 && report != NULL)
            fprintf(report, "%s: the rules file could not be compiled\n", path);
        else if (problems.count == 0)
            log_error("%s: the rules file could not be compiled", path);
        rules_problems_release(&problems);
        free(*text);
        *text = NULL;
        return NULL;
    }
    rules_problems_release(&problems);
    return rules;
}

/* See cmds.h: the loader run, decode, setup and status share. */
Rules *cmd_load_rules(const char *path, FILE *report)
{
    char *text = NULL;
    size_t len = 0;
    Rules *rules = load_rules_text(path, report, &text, &len);

    free(text);
    return rules;
}

/* Number of entries in the top-level "rules" array (the file is valid). */
static int count_rules(const char *text, size_t len)
{
    cJSON *root = cJSON_ParseWithLength(text, len);
    int n = cJSON_GetArraySize(cJSON_GetObjectItemCaseSensitive(root, "rules"));

    cJSON_Delete(root);
    return n;
}

/* The catalog as rules_check_catalog() should see it. When the publication
 * is missing, that is reported once on its own, so tables are presented as
 * published instead of repeating "not in the publication" for each one. */
typedef struct CheckView {
    size_t n;
    RulesTableInfo *tables;
} CheckView;

static const RulesTableInfo *check_view_lookup(void *arg, const char *table)
{
    const CheckView *v = arg;

    for (size_t i = 0; i < v->n; i++)
        if (strcmp(v->tables[i].table, table) == 0)
            return &v->tables[i];
    return NULL;
}

static void check_view_init(CheckView *v, const Rules *rules, Catalog *cat)
{
    size_t n = rules_table_count(rules);

    v->n = 0;
    v->tables = xmalloc(n * sizeof *v->tables);
    for (size_t i = 0; i < n; i++) {
        const RulesTableInfo *info = catalog_lookup(cat, rules_table(rules, i));
        if (info == NULL)
            continue;
        v->tables[v->n] = *info;
        v->tables[v->n].in_publication = true;
        v->tables[v->n].nunpublished = 0;
        v->tables[v->n].via_root = false;
        v->tables[v->n].pub_ops = 0;
        v->n++;
    }
}

/* Print "PREFIX a, b, c SUFFIX" in full (never cut: it must paste). */
static void print_list(const char *prefix, const char *const *names, size_t n, const char *suffix)
{
    fputs(prefix, stdout);
    for (size_t i = 0; i < n; i++)
        printf("%s%s", i ? ", " : "", names[i]);
    fputs(suffix, stdout);
}

/* A missing publication is what setup will create (not a problem); the
 * statements that create it by hand, in full. */
static void print_publication_hint(const Config *cfg, const Rules *rules, const Catalog *cat)
{
    PubPlan plan;
    char comp[80];

    pubplan_build(&plan, rules, cat);
    catalog_companion_name(cfg->publication, comp, sizeof comp);
    printf("%s: publication \"%s\" does not exist yet; walbust setup --rules %s will create "
           "it; by hand:",
           cfg->rules, cfg->publication, cfg->rules);
    for (size_t i = 0; i < plan.nfix; i++)
        printf(" ALTER TABLE %s REPLICA IDENTITY FULL;", plan.fix[i]);
    printf(" CREATE PUBLICATION %s", catalog_publication_sql(cat));
    print_list(plan.nmain > 0 ? " FOR TABLE " : "", plan.main, plan.nmain, ";");
    if (plan.ninsert > 0 && comp[0] != '\0') {
        printf(" CREATE PUBLICATION %s FOR TABLE", comp);
        print_list(" ", plan.insert_only, plan.ninsert, " WITH (publish = 'insert, truncate');");
    }
    putchar('\n');
    pubplan_release(&plan);
}

/* Tables the existing publications make the application's UPDATE and
 * DELETE fail on: PostgreSQL refuses them on a table without a replica
 * identity that a publication publishes updates or deletes for. */
static long check_app_writes(const Config *cfg, const Rules *rules, const Catalog *cat)
{
    PubPlan plan;
    long n;

    pubplan_build(&plan, rules, cat);
    n = (long)plan.nbreaking;
    for (size_t i = 0; i < plan.nbreaking; i++)
        printf("%s: table %s has no replica identity but is in a publication that publishes "
               "updates or deletes, so PostgreSQL refuses the application's UPDATE and DELETE on "
               "it; run ALTER TABLE %s REPLICA IDENTITY FULL (or add a primary key), or walbust "
               "setup --rules %s to publish only inserts for it when its rules only need those\n",
               cfg->rules, plan.breaking[i], plan.breaking[i], cfg->rules);
    pubplan_release(&plan);
    return n;
}

/* Collect "Relation Name"/"Schema" pairs of an EXPLAIN (FORMAT JSON) plan. */
static void plan_tables(const cJSON *node, char ***tables, size_t *n)
{
    const cJSON *rel, *schema;

    if (node == NULL)
        return;
    rel = cJSON_IsObject(node) ? cJSON_GetObjectItemCaseSensitive(node, "Relation Name") : NULL;
    schema = cJSON_IsObject(node) ? cJSON_GetObjectItemCaseSensitive(node, "Schema") : NULL;
    if (cJSON_IsString(rel) && cJSON_IsString(schema)) {
        char name[300];
        bool dup = false;
        snprintf(name, sizeof name, "%s.%s", schema->valuestring, rel->valuestring);
        for (size_t i = 0; i < *n; i++)
            dup = dup || strcmp((*tables)[i], name) == 0;
        if (!dup) {
            *tables = xrealloc(*tables, (*n + 1) * sizeof **tables);
            (*tables)[(*n)++] = xstrdup(name);
        }
    }
    for (const cJSON *c = node->child; c != NULL; c = c->next)
        plan_tables(c, tables, n);
}

/* A partition the plan scans stands for its partitioned root table when
 * the rules name the root and not the partition. */
static void partition_roots(PGconn *conn, const Rules *rules, char **tables, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        const char *params[1] = {tables[i]};
        PGresult *res;
        if (rules_has_table(rules, tables[i]))
            continue;
        res = PQexecParams(conn,
                           "SELECT n.nspname || '.' || c.relname FROM pg_catalog.pg_class c "
                           "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
                           "WHERE c.oid = pg_catalog.pg_partition_root($1::regclass)",
                           1, NULL, params, NULL, NULL, 0);
        if (PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1 &&
            rules_has_table(rules, PQgetvalue(res, 0, 0))) {
            free(tables[i]);
            tables[i] = xstrdup(PQgetvalue(res, 0, 0));
        }
        PQclear(res);
    }
}

/* The tables a prepared lookup reads: its generic plan, EXPLAINed with
 * NULL arguments. */
static void lookup_tables(PGconn *conn, const char *stmt, int nparams, char ***tables, size_t *n)
{
    char sql[4096];
    size_t o;
    PGresult *res;
    cJSON *plan;

    /* A generic plan keeps $N unknown; without pruning every partition
     * a partitioned table could read shows up (NULL arguments would prune
     * them all at executor start-up). */
    PQclear(PQexec(conn, "SET plan_cache_mode = force_generic_plan; "
                         "SET enable_partition_pruning = off"));
    o = (size_t)snprintf(sql, sizeof sql, "EXPLAIN (VERBOSE, FORMAT JSON) EXECUTE %s", stmt);
    for (int i = 0; i < nparams && o + 8 < sizeof sql; i++)
        o += (size_t)snprintf(sql + o, sizeof sql - o, "%sNULL", i ? ", " : "(");
    if (nparams > 0 && o + 2 < sizeof sql)
        snprintf(sql + o, sizeof sql - o, ")");
    res = PQexec(conn, sql);
    if (PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) > 0) {
        plan = cJSON_Parse(PQgetvalue(res, 0, 0));
        plan_tables(plan, tables, n);
        cJSON_Delete(plan);
    }
    PQclear(res);
}

/* Prepare rule i's lookup as written (and as walbust wraps it) and
 * describe it; fills sh (fields/tables owned by the caller: free with
 * shape_release) and returns the PGresult error text buffer used. */
typedef struct ShapeBuf {
    RulesLookupShape sh;
    char error[1024];
    char **fields, **tables;
    size_t nfields, ntables;
} ShapeBuf;

static void shape_release(ShapeBuf *b)
{
    for (size_t i = 0; i < b->nfields; i++)
        free(b->fields[i]);
    for (size_t i = 0; i < b->ntables; i++)
        free(b->tables[i]);
    free(b->fields);
    free(b->tables);
}

static void shape_error(ShapeBuf *b, const PGresult *res, const char *prefix)
{
    const char *pos = PQresultErrorField(res, PG_DIAG_STATEMENT_POSITION);
    const char *msg = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);

    snprintf(b->error, sizeof b->error, "%s%s", prefix, msg ? msg : PQresultErrorMessage(res));
    b->sh.error = b->error;
    b->sh.error_pos = pos != NULL && prefix[0] == '\0' ? atoi(pos) : 0;
}

static void lookup_shape(PGconn *conn, const Rules *rules, const RulesLookupInfo *info, size_t i,
                         ShapeBuf *b)
{
    char name[64], wname[64];
    char *wrapped = lookup_wrap_sql(info->sql, info->limit);
    PGresult *res;

    memset(b, 0, sizeof *b);
    snprintf(name, sizeof name, "walbust_check_%zu", i);
    snprintf(wname, sizeof wname, "walbust_check_w%zu", i);
    res = PQprepare(conn, name, info->sql, 0, NULL);
    if (PQresultStatus(res) != PGRES_COMMAND_OK) {
        shape_error(b, res, "");
    } else {
        PQclear(res);
        res = PQprepare(conn, wname, wrapped, 0, NULL);
        if (PQresultStatus(res) != PGRES_COMMAND_OK)
            shape_error(b, res, "walbust runs it as SELECT * FROM (<sql>) LIMIT n, which fails: ");
    }
    PQclear(res);
    free(wrapped);
    if (b->sh.error != NULL)
        return;
    res = PQdescribePrepared(conn, name);
    b->sh.nparams = PQnparams(res);
    b->nfields = (size_t)PQnfields(res);
    b->fields = xcalloc(b->nfields + 1, sizeof *b->fields);
    for (size_t k = 0; k < b->nfields; k++)
        b->fields[k] = xstrdup(PQfname(res, (int)k));
    PQclear(res);
    lookup_tables(conn, name, b->sh.nparams, &b->tables, &b->ntables);
    partition_roots(conn, rules, b->tables, b->ntables);
    b->sh.nfields = b->nfields;
    b->sh.fields = (const char *const *)b->fields;
    b->sh.ntables = b->ntables;
    b->sh.tables = (const char *const *)b->tables;
}

/* Prepare every lookup against the live schema (read-only). Problems go
 * to *problems; warnings are printed here. */
static void check_lookups(const Config *cfg, PGconn *conn, const Rules *rules, Catalog *cat,
                          RulesProblems *problems)
{
    RulesProblems warnings = {0};

    if (!rules_has_lookups(rules))
        return;
    PQclear(PQexec(conn, "SET default_transaction_read_only = on"));
    for (size_t i = 0; i < rules_rule_count(rules); i++) {
        RulesLookupInfo info;
        ShapeBuf b;
        if (!rules_lookup_info(rules, i, &info))
            continue;
        lookup_shape(conn, rules, &info, i, &b);
        (void)rules_check_lookup(rules, i, &b.sh, catalog_lookup(cat, info.table), problems,
                                 &warnings);
        shape_release(&b);
    }
    cmd_print_problems(stdout, "", cfg->rules, &warnings);
    rules_problems_release(&warnings);
}

/* Prepare every audit's SQL as walbust runs it (read-only): it must
 * prepare, take one parameter per argument and return one column. */
static void check_audits(PGconn *conn, const Rules *rules, RulesProblems *problems)
{
    if (!rules_has_audits(rules))
        return;
    PQclear(PQexec(conn, "SET default_transaction_read_only = on"));
    for (size_t i = 0; i < rules_rule_count(rules); i++) {
        RulesAuditInfo info;
        ShapeBuf b;
        char name[64], *wrapped;
        PGresult *res;
        if (!rules_audit_info(rules, i, &info))
            continue;
        memset(&b, 0, sizeof b);
        snprintf(name, sizeof name, "walbust_check_audit_%zu", i);
        wrapped = lookup_wrap_sql(info.sql, 1);
        res = PQprepare(conn, name, info.sql, 0, NULL);
        if (PQresultStatus(res) != PGRES_COMMAND_OK) {
            shape_error(&b, res, "");
        } else {
            PQclear(res);
            res = PQdescribePrepared(conn, name);
            b.sh.nparams = PQnparams(res);
            b.sh.nfields = (size_t)PQnfields(res);
            PQclear(res);
            res = PQprepare(conn, "", wrapped, 0, NULL);
            if (PQresultStatus(res) != PGRES_COMMAND_OK)
                shape_error(&b, res,
                            "walbust runs it as SELECT * FROM (<sql>) LIMIT 2, which "
                            "fails: ");
        }
        PQclear(res);
        free(wrapped);
        (void)rules_check_audit(
            rules, i, &(RulesAuditShape){b.sh.error, b.sh.error_pos, b.sh.nparams, b.sh.nfields},
            problems);
    }
}

/* wal_level must be logical, as setup, run and decode require: 1 problem
 * (printed) when it is not, else 0. */
static long check_wal_level(PGconn *conn, const char *where)
{
    PGresult *res = PQexec(conn, "SHOW wal_level");
    long n = 0;

    if (PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1 &&
        strcmp(PQgetvalue(res, 0, 0), "logical") != 0) {
        printf("wal_level is \"%s\" on %s; logical replication needs wal_level=logical in "
               "postgresql.conf and a restart\n",
               PQgetvalue(res, 0, 0), where);
        n = 1;
    }
    PQclear(res);
    return n;
}

/* The slot: missing is what setup creates (said, not a problem); one that
 * walbust cannot use is 1 problem. */
static long check_slot(PGconn *conn, const Config *cfg, const char *where)
{
    const char *params[1] = {cfg->slot};
    const char *sql = "SELECT slot_type, coalesce(plugin, ''), coalesce(database, ''), "
                      "database IS NOT DISTINCT FROM current_database() "
                      "FROM pg_catalog.pg_replication_slots WHERE slot_name = $1";
    PGresult *res = PQexecParams(conn, sql, 1, NULL, params, NULL, NULL, 0);
    long n = 0;

    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        n = 0; /* e.g. no privilege to read it: run will say more */
    } else if (PQntuples(res) == 0) {
        printf("%s: slot \"%s\" does not exist yet; walbust setup --rules %s will create it\n",
               cfg->rules, cfg->slot, cfg->rules);
    } else if (strcmp(PQgetvalue(res, 0, 0), "logical") != 0 ||
               strcmp(PQgetvalue(res, 0, 1), "pgoutput") != 0 || PQgetvalue(res, 0, 3)[0] != 't') {
        printf("slot \"%s\" on %s is a %s slot (plugin \"%s\", database \"%s\"); walbust needs a "
               "logical pgoutput slot in this database: choose another --slot\n",
               cfg->slot, where, PQgetvalue(res, 0, 0), PQgetvalue(res, 0, 1),
               PQgetvalue(res, 0, 2));
        n = 1;
    }
    PQclear(res);
    return n;
}

/* Check rules against the database and print what is wrong. Returns the
 * number of problems, or -1 when the database could not be consulted
 * (message already printed to stderr). */
static long check_live(const Config *cfg, const Rules *rules)
{
    RulesProblems problems = {0};
    char err[1024];
    PGconn *conn = stream_plain_connect(cfg->pg, err, sizeof err);
    Catalog *cat;
    char where[256];
    long n = 0;

    if (conn == NULL) {
        fprintf(stderr, "walbust check: %s\n", err);
        return -1;
    }
    stream_describe_conn(conn, where, sizeof where);
    n += check_wal_level(conn, where);
    n += check_slot(conn, cfg, where);
    cat = catalog_load(conn, rules, cfg->publication, err, sizeof err);
    if (cat == NULL) {
        PQfinish(conn);
        fprintf(stderr, "walbust check: %s\n", err);
        return -1;
    }
    if (catalog_publication(cat) == 0) {
        CheckView view;

        print_publication_hint(cfg, rules, cat);
        check_view_init(&view, rules, cat);
        (void)rules_check_catalog(rules, cfg->publication, check_view_lookup, &view, &problems);
        free(view.tables);
    } else {
        (void)rules_check_catalog(rules, cfg->publication, catalog_lookup, cat, &problems);
    }
    n += check_app_writes(cfg, rules, cat);
    check_lookups(cfg, conn, rules, cat, &problems);
    check_audits(conn, rules, &problems);
    PQfinish(conn);
    n += (long)problems.count;
    cmd_print_problems(stdout, "", cfg->rules, &problems);
    rules_problems_release(&problems);
    catalog_free(cat);
    return n;
}

/* `walbust check`: problems on stdout; exit 0 and the "ok" line only when
 * there are none, 1 otherwise (also when the database cannot be reached). */
int cmd_check(const Config *cfg)
{
    char *text = NULL;
    size_t len = 0;
    Rules *rules = load_rules_text(cfg->rules, stdout, &text, &len);
    long problems = 0;

    if (rules == NULL)
        return 1;
    if (cfg->pg != NULL && cfg->pg[0] != '\0')
        problems = check_live(cfg, rules);
    if (problems == 0)
        printf("%s: ok (%d rules, %zu tables)\n", cfg->rules, count_rules(text, len),
               rules_table_count(rules));
    rules_free(rules);
    free(text);
    return problems == 0 ? 0 : 1;
}
