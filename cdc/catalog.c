/*
 * catalog.c — table facts for rules checks (see catalog.h).
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
} CatTable;

struct Catalog {
    size_t n;
    CatTable *tables;
    int publication;
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

/* Split "schema.table" and quote both parts as SQL literals. */
static bool table_literals(PGconn *conn, const char *table, char **nsp, char **rel)
{
    const char *dot = strchr(table, '.');
    char *schema;

    if (dot == NULL)
        return false;
    schema = strndup(table, (size_t)(dot - table));
    if (schema == NULL)
        abort();
    *nsp = PQescapeLiteral(conn, schema, strlen(schema));
    *rel = PQescapeLiteral(conn, dot + 1, strlen(dot + 1));
    free(schema);
    return *nsp != NULL && *rel != NULL;
}

static int load_table(PGconn *conn, CatTable *t, const char *pubname_lit, char *err, size_t errlen)
{
    char *nsp = NULL, *rel = NULL;
    char sql[2048];
    PGresult *res = NULL;
    int rc = -1;

    t->info.table = t->table;
    if (!table_literals(conn, t->table, &nsp, &rel)) {
        rc = 0; /* not schema-qualified: reported as missing */
        goto cleanup;
    }
    snprintf(sql, sizeof sql,
             "SELECT c.relreplident, a.attname, "
             "  coalesce((SELECT a.attnum = ANY (i.indkey) FROM pg_catalog.pg_index i "
             "    WHERE i.indrelid = c.oid AND CASE WHEN c.relreplident = 'i' "
             "    THEN i.indisreplident ELSE i.indisprimary END LIMIT 1), false), "
             "  EXISTS (SELECT 1 FROM pg_catalog.pg_publication_tables p "
             "    WHERE p.pubname = %s AND p.schemaname = n.nspname AND p.tablename = c.relname) "
             "FROM pg_catalog.pg_class c "
             "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
             "JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 "
             "  AND NOT a.attisdropped "
             "WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p') "
             "ORDER BY a.attnum",
             pubname_lit, nsp, rel);
    res = query(conn, sql, err, errlen);
    if (res == NULL)
        goto cleanup;
    t->info.exists = PQntuples(res) > 0;
    t->info.ncols = (size_t)PQntuples(res);
    t->names = xcalloc(t->info.ncols, sizeof *t->names);
    t->identity = xcalloc(t->info.ncols, sizeof *t->identity);
    for (int i = 0; i < PQntuples(res); i++) {
        t->names[i] = xstrdup(PQgetvalue(res, i, 1));
        t->identity[i] = PQgetvalue(res, i, 2)[0] == 't';
        t->info.replident = PQgetvalue(res, i, 0)[0];
        t->info.in_publication = PQgetvalue(res, i, 3)[0] == 't';
    }
    t->info.colnames = (const char *const *)t->names;
    t->info.identity = t->identity;
    rc = 0;
cleanup:
    PQclear(res);
    PQfreemem(nsp);
    PQfreemem(rel);
    return rc;
}

Catalog *catalog_load(PGconn *conn, const Rules *rules, const char *publication, char *err,
                      size_t errlen)
{
    Catalog *c = xcalloc(1, sizeof *c);
    char *pub = PQescapeLiteral(conn, publication, strlen(publication));
    char sql[512];
    PGresult *res;

    if (pub == NULL) {
        snprintf(err, errlen, "could not quote publication name: %s", PQerrorMessage(conn));
        free(c);
        return NULL;
    }
    snprintf(sql, sizeof sql,
             "SELECT puballtables FROM pg_catalog.pg_publication WHERE pubname = %s", pub);
    res = query(conn, sql, err, errlen);
    if (res == NULL)
        goto fail;
    c->publication = PQntuples(res) == 0 ? 0 : PQgetvalue(res, 0, 0)[0] == 't' ? 2 : 1;
    PQclear(res);

    c->n = rules_table_count(rules);
    c->tables = xcalloc(c->n, sizeof *c->tables);
    for (size_t i = 0; i < c->n; i++) {
        c->tables[i].table = xstrdup(rules_table(rules, i));
        if (load_table(conn, &c->tables[i], pub, err, errlen) < 0)
            goto fail;
    }
    PQfreemem(pub);
    return c;
fail:
    PQfreemem(pub);
    catalog_free(c);
    return NULL;
}

const RulesTableInfo *catalog_lookup(void *arg, const char *table)
{
    const Catalog *c = arg;

    for (size_t i = 0; i < c->n; i++)
        if (strcmp(c->tables[i].table, table) == 0)
            return &c->tables[i].info;
    return NULL;
}

int catalog_publication(const Catalog *c)
{
    return c->publication;
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
        free(t->table);
    }
    free(c->tables);
    free(c);
}
