/*
 * catalog.c — table facts for rules checks (see catalog.h).
 *
 * Three queries whatever the number of tables (a fourth only when a rules
 * table is missing, for "did you mean"): the publications, every member
 * (the table, its partitions and inheritance children, found recursively in
 * pg_inherits) with its publication coverage, and the columns of each rules
 * table with their replica identity flag across the members that hold rows.
 * The rules tables go in as two text arrays of literals, so the SQL grows
 * with the number of tables but the round trips do not.
 */
#include "catalog.h"
#include "mem.h"

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct CatTable {
    RulesTableInfo info;
    char *table;
    char **names;
    bool *identity;
    const char **unpublished; /* borrowed from members */
    const char **not_full;
    char *sql_name;
    char *suggestion;
    char *ops_publication;
} CatTable;

typedef struct Pub {
    bool exists, alltables, via_root;
    unsigned ops;
    char *name, *sql_name;
} Pub;

struct Catalog {
    size_t n;
    CatTable *tables;
    CatTable **by_name; /* tables sorted by name, for catalog_lookup() */
    Pub pub[2];         /* the publication and its insert-only companion */
    size_t nmembers;
    CatalogMember *members; /* strings owned */
};

static PGresult *query(PGconn *conn, const char *sql, char *err, size_t errlen)
{
    PGresult *res = PQexec(conn, sql);

    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        snprintf(err, errlen, "catalog query failed: %s", PQerrorMessage(conn));
        PQclear(res);
        return NULL;
    }
    return res;
}

/* Add s as an SQL literal. */
static void sql_literal(MemText *b, PGconn *conn, const char *s, size_t len)
{
    char *lit = PQescapeLiteral(conn, s, len);

    if (lit == NULL)
        mem_oom();
    mem_text_add(b, lit);
    PQfreemem(lit);
}

void catalog_companion_name(const char *publication, char *out, size_t len)
{
    if (strlen(publication) + strlen("_insert_only") > 63)
        snprintf(out, len, "%s", "");
    else
        snprintf(out, len, "%s_insert_only", publication);
}

static unsigned pub_ops(const PGresult *res, int row, int col)
{
    unsigned ops = 0;

    if (PQgetvalue(res, row, col)[0] == 't')
        ops |= RULES_INSERT;
    if (PQgetvalue(res, row, col + 1)[0] == 't')
        ops |= RULES_UPDATE;
    if (PQgetvalue(res, row, col + 2)[0] == 't')
        ops |= RULES_DELETE;
    if (PQgetvalue(res, row, col + 3)[0] == 't')
        ops |= RULES_TRUNCATE;
    return ops;
}

static int load_publications(Catalog *c, PGconn *conn, const char *publication, char *err,
                             size_t errlen)
{
    char companion[80];
    MemText sql = {0};
    PGresult *res;

    catalog_companion_name(publication, companion, sizeof companion);
    mem_text_add(&sql, "SELECT v.name, pg_catalog.quote_ident(v.name), p.oid IS NOT NULL, "
                       "coalesce(p.puballtables, false), coalesce(p.pubviaroot, false), "
                       "coalesce(p.pubinsert, false), coalesce(p.pubupdate, false), "
                       "coalesce(p.pubdelete, false), coalesce(p.pubtruncate, false) "
                       "FROM (VALUES (0, ");
    sql_literal(&sql, conn, publication, strlen(publication));
    mem_text_add(&sql, "::text), (1, ");
    sql_literal(&sql, conn, companion, strlen(companion));
    mem_text_add(&sql, "::text)) v(k, name) LEFT JOIN pg_catalog.pg_publication p "
                       "ON p.pubname = v.name ORDER BY v.k");
    res = query(conn, sql.s, err, errlen);
    free(sql.s);
    if (res == NULL)
        return -1;
    for (int i = 0; i < 2 && i < PQntuples(res); i++) {
        Pub *p = &c->pub[i];
        p->name = xstrdup(PQgetvalue(res, i, 0));
        p->sql_name = xstrdup(PQgetvalue(res, i, 1));
        p->exists = PQgetvalue(res, i, 2)[0] == 't' && p->name[0] != '\0';
        p->alltables = PQgetvalue(res, i, 3)[0] == 't';
        p->via_root = PQgetvalue(res, i, 4)[0] == 't';
        p->ops = pub_ops(res, i, 5);
    }
    PQclear(res);
    return 0;
}

/* "WITH RECURSIVE r(i, nsp, rel) AS (...), m(i, oid, depth) AS (...)": the
 * rules tables and, recursively, their partitions and inheritance children. */
static void sql_members_cte(MemText *b, PGconn *conn, const Rules *rules)
{
    size_t n = rules_table_count(rules);

    mem_text_add(b, "WITH RECURSIVE r(i, nsp, rel) AS (SELECT * FROM ROWS FROM (");
    for (int part = 0; part < 3; part++) {
        mem_text_add(b, part == 0 ? "pg_catalog.unnest(ARRAY[" : ", pg_catalog.unnest(ARRAY[");
        for (size_t i = 0; i < n; i++) {
            const char *t = rules_table(rules, i), *dot = strchr(t, '.');
            char num[32];
            if (i > 0)
                mem_text_add(b, ",");
            if (part == 0) {
                snprintf(num, sizeof num, "%zu", i);
                mem_text_add(b, num);
            } else if (dot == NULL) {
                mem_text_add(b, "NULL"); /* not schema-qualified: reported as missing */
            } else if (part == 1) {
                sql_literal(b, conn, t, (size_t)(dot - t));
            } else {
                sql_literal(b, conn, dot + 1, strlen(dot + 1));
            }
        }
        mem_text_add(b, part == 0 ? "]::int[])" : "]::text[])");
    }
    mem_text_add(b, ")), m0(i, oid, depth) AS ("
                    "SELECT r.i, c.oid, 0 FROM r "
                    "JOIN pg_catalog.pg_namespace n ON n.nspname = r.nsp "
                    "JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = r.rel "
                    "AND c.relkind IN ('r', 'p') "
                    "UNION SELECT m0.i, h.inhrelid, m0.depth + 1 FROM m0 "
                    "JOIN pg_catalog.pg_inherits h ON h.inhparent = m0.oid WHERE m0.depth < 64), "
                    "m AS (SELECT i, oid, min(depth) AS depth FROM m0 GROUP BY i, oid)");
}

/* "pt_k AS (relids pgoutput publishes for publication k)" for existing ones. */
static void sql_pub_ctes(MemText *b, PGconn *conn, const Catalog *c)
{
    for (int k = 0; k < 2; k++) {
        char head[64];
        snprintf(head, sizeof head, ", pt%d AS MATERIALIZED (", k);
        mem_text_add(b, head);
        if (!c->pub[k].exists) {
            mem_text_add(b, "SELECT NULL::oid AS relid WHERE false), ");
        } else {
            mem_text_add(b, "SELECT relid FROM pg_catalog.pg_get_publication_tables(");
            sql_literal(b, conn, c->pub[k].name, strlen(c->pub[k].name));
            mem_text_add(b, ")), ");
        }
        snprintf(head, sizeof head, "pr%d AS MATERIALIZED (", k);
        mem_text_add(b, head);
        mem_text_add(b,
                     "SELECT pr.prrelid AS relid FROM pg_catalog.pg_publication_rel pr "
                     "JOIN pg_catalog.pg_publication p ON p.oid = pr.prpubid WHERE p.pubname = ");
        sql_literal(b, conn, c->pub[k].name, strlen(c->pub[k].name));
        mem_text_add(b, ")");
    }
}

/* SQL for "member c is published by publication k": as pgoutput decides,
 * itself or (for a partition) an ancestor. */
static void sql_covered(MemText *b, int k)
{
    char s[512];

    snprintf(
        s, sizeof s,
        ", (c.oid IN (SELECT relid FROM pt%d) OR c.oid IN (SELECT relid FROM pr%d) OR "
        "(c.relispartition AND EXISTS (SELECT 1 FROM pg_catalog.pg_partition_ancestors(c.oid) "
        "a WHERE a.relid IN (SELECT relid FROM pt%d) OR a.relid IN (SELECT relid FROM pr%d)))), "
        "c.oid IN (SELECT relid FROM pr%d)",
        k, k, k, k, k);
    mem_text_add(b, s);
}

static char *sql_members(PGconn *conn, const Rules *rules, const Catalog *c)
{
    MemText b = {0};

    sql_members_cte(&b, conn, rules);
    sql_pub_ctes(&b, conn, c);
    mem_text_add(&b,
                 " SELECT m.i, m.depth, n.nspname, c.relname, "
                 "pg_catalog.quote_ident(n.nspname) || '.' || pg_catalog.quote_ident(c.relname), "
                 "c.relkind, c.relispartition, c.relreplident, "
                 "c.relkind <> 'p' OR NOT EXISTS (SELECT 1 FROM pg_catalog.pg_inherits h "
                 "  WHERE h.inhparent = c.oid), "
                 "CASE c.relreplident WHEN 'f' THEN true WHEN 'n' THEN false "
                 "  ELSE EXISTS (SELECT 1 FROM pg_catalog.pg_index x WHERE x.indrelid = c.oid "
                 "  AND CASE WHEN c.relreplident = 'i' THEN x.indisreplident "
                 "  ELSE x.indisprimary END) END");
    sql_covered(&b, 0);
    sql_covered(&b, 1);
    mem_text_add(&b, " FROM m JOIN pg_catalog.pg_class c ON c.oid = m.oid "
                     "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
                     "ORDER BY m.i, m.depth, n.nspname, c.relname");
    return b.s;
}

/* Columns of each rules table; a column counts as in the replica identity
 * only when it is in the identity of every member that holds rows. */
static char *sql_columns(PGconn *conn, const Rules *rules)
{
    MemText b = {0};

    sql_members_cte(&b, conn, rules);
    mem_text_add(&b, ", leaf AS (SELECT m.i, c.oid, c.relreplident, x.indkey FROM m "
                     "JOIN pg_catalog.pg_class c ON c.oid = m.oid "
                     "LEFT JOIN pg_catalog.pg_index x ON x.indrelid = c.oid AND CASE WHEN "
                     "c.relreplident = 'i' THEN x.indisreplident ELSE x.indisprimary END "
                     "WHERE c.relkind <> 'p' OR NOT EXISTS (SELECT 1 FROM pg_catalog.pg_inherits h "
                     "WHERE h.inhparent = c.oid)) "
                     "SELECT m.i, a.attname, pg_catalog.bool_and(l.relreplident = 'f' OR "
                     "coalesce((SELECT la.attnum = ANY (l.indkey) FROM pg_catalog.pg_attribute la "
                     "WHERE la.attrelid = l.oid AND la.attname = a.attname), false)) "
                     "FROM m JOIN pg_catalog.pg_attribute a ON a.attrelid = m.oid AND a.attnum > 0 "
                     "AND NOT a.attisdropped JOIN leaf l ON l.i = m.i WHERE m.depth = 0 "
                     "GROUP BY m.i, a.attnum, a.attname ORDER BY m.i, a.attnum");
    return b.s;
}

static bool col_true(const PGresult *res, int row, int col)
{
    return PQgetvalue(res, row, col)[0] == 't';
}

static int load_members(Catalog *c, PGconn *conn, const Rules *rules, char *err, size_t errlen)
{
    char *sql = sql_members(conn, rules, c);
    PGresult *res = query(conn, sql, err, errlen);

    free(sql);
    if (res == NULL)
        return -1;
    c->nmembers = (size_t)PQntuples(res);
    c->members = xcalloc(c->nmembers, sizeof *c->members);
    for (int i = 0; i < PQntuples(res); i++) {
        CatalogMember *m = &c->members[i];
        size_t ti = (size_t)atol(PQgetvalue(res, i, 0));
        size_t len = strlen(PQgetvalue(res, i, 2)) + strlen(PQgetvalue(res, i, 3)) + 2;
        char *name = xmalloc(len);

        snprintf(name, len, "%s.%s", PQgetvalue(res, i, 2), PQgetvalue(res, i, 3));
        m->rules_table = c->tables[ti < c->n ? ti : 0].table;
        m->table = name;
        m->depth = atoi(PQgetvalue(res, i, 1));
        m->sql_name = xstrdup(PQgetvalue(res, i, 4));
        m->relkind = PQgetvalue(res, i, 5)[0];
        m->partition = col_true(res, i, 6);
        m->replident = PQgetvalue(res, i, 7)[0];
        m->holds_rows = col_true(res, i, 8);
        m->has_identity = col_true(res, i, 9);
        m->in_main = c->pub[0].exists && (c->pub[0].alltables || col_true(res, i, 10));
        m->direct_main = col_true(res, i, 11);
        m->in_companion = c->pub[1].exists && (c->pub[1].alltables || col_true(res, i, 12));
        m->direct_companion = col_true(res, i, 13);
        m->pub_ops = (m->in_main ? c->pub[0].ops : 0) | (m->in_companion ? c->pub[1].ops : 0);
    }
    PQclear(res);
    return 0;
}

static int load_columns(Catalog *c, PGconn *conn, const Rules *rules, char *err, size_t errlen)
{
    char *sql = sql_columns(conn, rules);
    PGresult *res = query(conn, sql, err, errlen);
    int row = 0;

    free(sql);
    if (res == NULL)
        return -1;
    for (size_t ti = 0; ti < c->n; ti++) {
        CatTable *t = &c->tables[ti];
        int first = row;
        while (row < PQntuples(res) && (size_t)atol(PQgetvalue(res, row, 0)) == ti)
            row++;
        t->info.ncols = (size_t)(row - first);
        t->names = xcalloc(t->info.ncols + 1, sizeof *t->names);
        t->identity = xcalloc(t->info.ncols + 1, sizeof *t->identity);
        for (int j = first; j < row; j++) {
            t->names[j - first] = xstrdup(PQgetvalue(res, j, 1));
            t->identity[j - first] = col_true(res, j, 2);
        }
        t->info.colnames = (const char *const *)t->names;
        t->info.identity = t->identity;
    }
    PQclear(res);
    return 0;
}

/* The weakest replica identity among the members holding rows, for the
 * "why" of identity problems: NOTHING, then DEFAULT without a key, then the
 * first one that is not FULL. */
static char weakest_replident(const CatalogMember *m, size_t n, char own)
{
    char best = 0;

    for (size_t i = 0; i < n; i++) {
        if (!m[i].holds_rows || m[i].replident == 'f')
            continue;
        if (m[i].replident == 'n')
            return 'n';
        if (best == 0 || !m[i].has_identity)
            best = m[i].replident;
    }
    (void)own;
    return best ? best : 'f';
}

/* Fill each table's info from its members. */
static void summarize(Catalog *c)
{
    size_t mi = 0;

    for (size_t ti = 0; ti < c->n; ti++) {
        CatTable *t = &c->tables[ti];
        const CatalogMember *own;
        size_t first = mi, nm, nu = 0, nf = 0;
        unsigned ops = RULES_INSERT | RULES_UPDATE | RULES_DELETE | RULES_TRUNCATE;
        bool any_rows = false, in_comp_only = false;

        while (mi < c->nmembers && c->members[mi].rules_table == t->table)
            mi++;
        nm = mi - first;
        t->info.table = t->table;
        if (nm == 0 || c->members[first].depth != 0)
            continue; /* missing */
        own = &c->members[first];
        t->info.exists = true;
        t->sql_name = xstrdup(own->sql_name);
        t->info.sql_name = t->sql_name;
        t->info.relkind = own->relkind;
        t->unpublished = xcalloc(nm, sizeof *t->unpublished);
        t->not_full = xcalloc(nm, sizeof *t->not_full);
        for (size_t i = first; i < mi; i++) {
            const CatalogMember *m = &c->members[i];
            if (!m->holds_rows)
                continue;
            any_rows = true;
            if (m->in_main || m->in_companion)
                ops &= m->pub_ops;
            in_comp_only = in_comp_only || (!m->in_main && m->in_companion);
            if (m->depth > 0 && !m->in_main && !m->in_companion)
                t->unpublished[nu++] = m->sql_name;
            if (m->replident != 'f' && m->relkind == 'r')
                t->not_full[nf++] = m->sql_name;
            if (c->pub[0].via_root && m->in_main && (m->partition || own->relkind == 'p'))
                t->info.via_root = true;
        }
        /* The table itself, not only its rows today: a partitioned table
         * whose partitions are listed one by one would miss partitions
         * attached later, so it counts as published only when it (or an
         * ancestor) is in the publication. */
        t->info.in_publication = own->in_main || own->in_companion;
        t->info.replident = weakest_replident(&c->members[first], nm, own->replident);
        t->info.pub_ops = t->info.in_publication && any_rows ? ops : 0;
        t->ops_publication = xstrdup(c->pub[in_comp_only ? 1 : 0].name);
        t->info.ops_publication = t->ops_publication;
        t->info.nunpublished = nu;
        t->info.unpublished = t->unpublished;
        t->info.nnot_full = nf;
        t->info.not_full = t->not_full;
    }
}

/* "did you mean": existing tables close to the missing ones' names. */
static int suggest_tables(Catalog *c, PGconn *conn, char *err, size_t errlen)
{
    PGresult *res;
    const char **names;
    size_t n;
    bool any = false;

    for (size_t i = 0; i < c->n; i++)
        any = any || !c->tables[i].info.exists;
    if (!any)
        return 0;
    res = query(conn,
                "SELECT n.nspname || '.' || c.relname FROM pg_catalog.pg_class c "
                "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
                "WHERE c.relkind IN ('r', 'p') AND n.nspname <> 'information_schema' "
                "AND n.nspname NOT LIKE 'pg\\_%' LIMIT 100000",
                err, errlen);
    if (res == NULL)
        return -1;
    n = (size_t)PQntuples(res);
    names = xcalloc(n + 1, sizeof *names);
    for (size_t i = 0; i < n; i++)
        names[i] = PQgetvalue(res, (int)i, 0);
    for (size_t i = 0; i < c->n; i++) {
        const char *s;
        if (c->tables[i].info.exists)
            continue;
        s = rules_closest_name(c->tables[i].table, names, n);
        if (s != NULL) {
            c->tables[i].suggestion = xstrdup(s);
            c->tables[i].info.suggestion = c->tables[i].suggestion;
        }
    }
    free(names);
    PQclear(res);
    return 0;
}

static int cmp_table(const void *a, const void *b)
{
    return strcmp((*(const CatTable *const *)a)->table, (*(const CatTable *const *)b)->table);
}

Catalog *catalog_load(PGconn *conn, const Rules *rules, const char *publication, char *err,
                      size_t errlen)
{
    Catalog *c = xcalloc(1, sizeof *c);

    c->n = rules_table_count(rules);
    c->tables = xcalloc(c->n, sizeof *c->tables);
    for (size_t i = 0; i < c->n; i++) {
        c->tables[i].table = xstrdup(rules_table(rules, i));
        c->tables[i].info.table = c->tables[i].table;
    }
    if (load_publications(c, conn, publication, err, errlen) < 0 ||
        load_members(c, conn, rules, err, errlen) < 0 ||
        load_columns(c, conn, rules, err, errlen) < 0)
        goto fail;
    summarize(c);
    if (suggest_tables(c, conn, err, errlen) < 0)
        goto fail;
    c->by_name = xcalloc(c->n + 1, sizeof *c->by_name);
    for (size_t i = 0; i < c->n; i++)
        c->by_name[i] = &c->tables[i];
    qsort(c->by_name, c->n, sizeof *c->by_name, cmp_table);
    return c;
fail:
    catalog_free(c);
    return NULL;
}

/* Tables are looked up by name once per rule at check time: by bisection,
 * since 10,000 rules over 5,000 tables made a linear scan 50 million string
 * compares. */
const RulesTableInfo *catalog_lookup(void *arg, const char *table)
{
    const Catalog *c = arg;
    CatTable key = {.table = (char *)table}, *pkey = &key, **found;

    found = c->n > 0 ? bsearch(&pkey, c->by_name, c->n, sizeof *c->by_name, cmp_table) : NULL;
    return found != NULL ? &(*found)->info : NULL;
}

int catalog_publication(const Catalog *c)
{
    return !c->pub[0].exists ? 0 : c->pub[0].alltables ? 2 : 1;
}

bool catalog_via_root(const Catalog *c)
{
    return c->pub[0].exists && c->pub[0].via_root;
}

bool catalog_companion(const Catalog *c, const char **companion)
{
    if (companion != NULL)
        *companion = c->pub[1].name != NULL ? c->pub[1].name : "";
    return c->pub[1].exists;
}

const char *catalog_publication_sql(const Catalog *c)
{
    return c->pub[0].sql_name != NULL ? c->pub[0].sql_name : "";
}

size_t catalog_member_count(const Catalog *c)
{
    return c->nmembers;
}

const CatalogMember *catalog_member(const Catalog *c, size_t i)
{
    return i < c->nmembers ? &c->members[i] : NULL;
}

int catalog_relation(PGconn *conn, unsigned relid, const char *publication, CatalogRelation *out,
                     char *err, size_t errlen)
{
    char comp[80], oid[32];
    MemText sql = {0};
    PGresult *res;

    memset(out, 0, sizeof *out);
    catalog_companion_name(publication, comp, sizeof comp);
    snprintf(oid, sizeof oid, "%u", relid);
    mem_text_add(&sql, "WITH RECURSIVE up(relid, depth) AS (SELECT ");
    mem_text_add(&sql, oid);
    mem_text_add(&sql,
                 "::oid, 0 UNION SELECT h.inhparent, up.depth + 1 FROM up "
                 "JOIN pg_catalog.pg_inherits h ON h.inhrelid = up.relid WHERE up.depth < 64) "
                 "SELECT up.depth, n.nspname || '.' || c.relname, c.relispartition, "
                 "EXISTS (SELECT 1 FROM pg_catalog.pg_publication p WHERE p.puballtables "
                 "AND p.pubname IN (");
    sql_literal(&sql, conn, publication, strlen(publication));
    mem_text_add(&sql, ", ");
    sql_literal(&sql, conn, comp, strlen(comp));
    /* FOR ALL TABLES first: listing all its tables would cost a scan. */
    mem_text_add(&sql, ")) OR EXISTS (SELECT 1 FROM pg_catalog.pg_publication p, "
                       "LATERAL pg_catalog.pg_get_publication_tables(p.pubname) t "
                       "WHERE p.pubname IN (");
    sql_literal(&sql, conn, publication, strlen(publication));
    mem_text_add(&sql, ", ");
    sql_literal(&sql, conn, comp, strlen(comp));
    mem_text_add(&sql, ") AND t.relid = ");
    mem_text_add(&sql, oid);
    mem_text_add(&sql, "::oid) FROM up JOIN pg_catalog.pg_class c ON c.oid = up.relid "
                       "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
                       "ORDER BY up.depth, 2");
    res = query(conn, sql.s, err, errlen);
    free(sql.s);
    if (res == NULL)
        return -1;
    out->ancestors = xcalloc((size_t)PQntuples(res) + 1, sizeof *out->ancestors);
    for (int i = 0; i < PQntuples(res); i++) {
        if (atoi(PQgetvalue(res, i, 0)) == 0) {
            out->exists = true;
            out->partition = col_true(res, i, 2);
            out->published = col_true(res, i, 3);
        } else {
            out->ancestors[out->nancestors++] = xstrdup(PQgetvalue(res, i, 1));
        }
    }
    PQclear(res);
    return 0;
}

void catalog_relation_release(CatalogRelation *r)
{
    for (size_t i = 0; i < r->nancestors; i++)
        free(r->ancestors[i]);
    free(r->ancestors);
    memset(r, 0, sizeof *r);
}

void catalog_free(Catalog *c)
{
    if (c == NULL)
        return;
    for (size_t i = 0; i < c->n; i++) {
        CatTable *t = &c->tables[i];
        for (size_t j = 0; j < t->info.ncols; j++)
            free(t->names[j]);
        free(t->names);
        free(t->identity);
        free(t->unpublished);
        free(t->not_full);
        free(t->sql_name);
        free(t->suggestion);
        free(t->ops_publication);
        free(t->table);
    }
    for (size_t i = 0; i < c->nmembers; i++) {
        free((char *)c->members[i].table);
        free((char *)c->members[i].sql_name);
    }
    for (int k = 0; k < 2; k++) {
        free(c->pub[k].name);
        free(c->pub[k].sql_name);
    }
    free(c->members);
    free(c->tables);
    free(c->by_name);
    free(c);
}
