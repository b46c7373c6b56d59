/*
 * route.c — change → rules tables, through partitions and inheritance
 * (see route.h).
 */
#include "route.h"
#include "catalog.h"
#include "mem.h"
#include "relmap.h"
#include "stream.h"

#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Recent answers, one slot per relid modulo ROUTE_MEMO, for the same
 * relation (relid and decoder generation) under the same rules: a change
 * then costs no hashing of names (4 % of walbust's instructions in a
 * one-table drain; in pgbench's four tables, a one-entry memo missed every
 * time). Its strings are the relation's qualname and the relmap's and
 * hier's, which live as long as that generation and those rules
 * (route_rules_changed() forgets the memo). An answer with more than
 * ROUTE_MEMO_TARGETS tables is not kept. */
#define ROUTE_MEMO 16
#define ROUTE_MEMO_TARGETS 4

typedef struct RouteMemo {
    bool valid, partition_row;
    uint32_t relid, generation;
    const Rules *rules;
    size_t n;
    RouteTarget targets[ROUTE_MEMO_TARGETS];
} RouteMemo;

struct Route {
    const char *conninfo, *publication;
    PGconn *conn;
    RelMap *map;
    RouteTarget *targets;
    size_t cap;
    char **hier; /* rules tables with partitions or children; NULL: not loaded */
    size_t nhier;
    RouteMemo memo[ROUTE_MEMO];
};

Route *route_new(const char *conninfo, const char *publication)
{
    Route *rt = xcalloc(1, sizeof *rt);

    rt->conninfo = conninfo;
    rt->publication = publication;
    rt->map = relmap_new();
    return rt;
}

void route_rules_changed(Route *rt)
{
    memset(rt->memo, 0, sizeof rt->memo);
    for (size_t i = 0; i < rt->nhier; i++)
        free(rt->hier[i]);
    free(rt->hier);
    rt->hier = NULL;
    rt->nhier = 0;
}

void route_free(Route *rt)
{
    if (rt == NULL)
        return;
    route_rules_changed(rt);
    relmap_free(rt->map);
    PQfinish(rt->conn);
    free(rt->targets);
    free(rt);
}

static int ensure_conn(Route *rt, char *err, size_t errlen)
{
    if (rt->conn != NULL && PQstatus(rt->conn) == CONNECTION_OK)
        return 0;
    PQfinish(rt->conn);
    rt->conn = stream_plain_connect(rt->conninfo, err, errlen);
    return rt->conn != NULL ? 0 : -1;
}

static void drop_conn(Route *rt)
{
    PQfinish(rt->conn);
    rt->conn = NULL;
}

/* The rules tables that have partitions or inheritance children, from the
 * catalog (once per rules). */
static int load_hier(Route *rt, const Rules *rules, char *err, size_t errlen)
{
    Catalog *cat;
    size_t n;

    if (rt->hier != NULL)
        return 0;
    if (ensure_conn(rt, err, errlen) < 0)
        return -1;
    cat = catalog_load(rt->conn, rules, rt->publication, err, errlen);
    if (cat == NULL) {
        drop_conn(rt);
        return -1;
    }
    n = catalog_member_count(cat);
    rt->hier = xcalloc(n + 1, sizeof *rt->hier);
    for (size_t i = 0; i < n; i++) {
        const CatalogMember *m = catalog_member(cat, i);
        bool hier = m->depth > 0 || m->relkind == 'p';
        for (size_t j = 0; hier && j < rt->nhier; j++)
            hier = strcmp(rt->hier[j], m->rules_table) != 0;
        if (hier)
            rt->hier[rt->nhier++] = xstrdup(m->rules_table);
    }
    catalog_free(cat);
    return 0;
}

static const RelMapEntry *lookup(Route *rt, const PgoRelation *rel, bool *fresh, char *err,
                                 size_t errlen)
{
    const RelMapEntry *e = relmap_find(rt->map, rel->relid, rel->generation);
    CatalogRelation cr;

    *fresh = false;
    if (e != NULL)
        return e;
    /* A connection idle since the last lookup may have died (a server
     * restart): one retry on a fresh one before giving up. */
    for (int attempt = 0;; attempt++) {
        bool reused = rt->conn != NULL;
        if (ensure_conn(rt, err, errlen) < 0)
            return NULL;
        if (catalog_relation(rt->conn, rel->relid, rt->publication, &cr, err, errlen) == 0)
            break;
        drop_conn(rt);
        if (!reused || attempt > 0)
            return NULL;
    }
    e = relmap_put(rt->map, rel->relid, rel->generation, cr.partition, cr.published,
                   (const char *const *)cr.ancestors, cr.nancestors);
    catalog_relation_release(&cr);
    *fresh = true;
    return e;
}

static void add_target(Route *rt, RouteResult *out, const char *table, bool widen)
{
    rt->targets = xgrow(rt->targets, &rt->cap, out->n + 1, sizeof *rt->targets);
    rt->targets[out->n++] = (RouteTarget){table, widen};
}

int route_change(Route *rt, const Rules *rules, const PgoRelation *rel, RouteResult *out, char *err,
                 size_t errlen)
{
    RouteMemo *m = &rt->memo[rel->relid % ROUTE_MEMO];
    bool fresh, named;
    const RelMapEntry *e;

    if (m->valid && m->relid == rel->relid && m->generation == rel->generation &&
        m->rules == rules) {
        *out = (RouteResult){.partition_row = m->partition_row, .n = m->n, .targets = m->targets};
        return 0;
    }
    m->valid = false;
    named = rules_has_table(rules, rel->qualname);
    e = lookup(rt, rel, &fresh, err, errlen);
    memset(out, 0, sizeof *out);
    if (e == NULL)
        return -1;
    out->partition_row = e->partition;
    if (named)
        add_target(rt, out, rel->qualname, false);
    for (size_t i = 0; i < e->nancestors; i++)
        if (rules_has_table(rules, e->ancestors[i]))
            add_target(rt, out, e->ancestors[i], false);
    if (out->n == 0 && !e->published) {
        if (load_hier(rt, rules, err, errlen) < 0)
            return -1;
        for (size_t i = 0; i < rt->nhier; i++)
            add_target(rt, out, rt->hier[i], true);
        out->orphan = fresh && rt->nhier > 0;
    }
    out->targets = rt->targets;
    if (out->n <= ROUTE_MEMO_TARGETS) { /* orphan: logged once, on first sight */
        *m = (RouteMemo){.valid = true,
                         .partition_row = out->partition_row,
                         .relid = rel->relid,
                         .generation = rel->generation,
                         .rules = rules,
                         .n = out->n};
        if (out->n > 0) /* rt->targets is NULL until a first target */
            memcpy(m->targets, out->targets, out->n * sizeof *out->targets);
    }
    return 0;
}
