/*
 * catalog.h — what the live database says about the tables rules name.
 *
 * Loads, with a constant number of simple queries whatever the number of
 * tables (so it works on replication connections too, and 2,000 rules
 * tables load in well under a second), each rules table's existence,
 * columns, replica identity, partitions and inheritance children ("members"),
 * and which of them the publication covers. Two publications count: the
 * configured one and its companion "<publication>_insert_only", which
 * `walbust setup` creates for tables without a replica identity whose rules
 * only need inserts (see docs/operations.md).
 *
 * Coverage is computed the way pgoutput decides what it sends: a partition
 * is published when it or an ancestor is in the publication; an inheritance
 * child only when it is in the publication itself.
 */
#ifndef WALBUST_CATALOG_H
#define WALBUST_CATALOG_H

#include <libpq-fe.h>
#include <stdbool.h>
#include <stddef.h>

#include "rules.h"

typedef struct Catalog Catalog;

/* One relation behind a rules table: the table itself (depth 0), or one of
 * its partitions or inheritance children (depth > 0, nearest first). */
typedef struct CatalogMember {
    const char *rules_table; /* the rules table ("schema.table") it belongs to */
    const char *table;       /* "schema.table", unquoted */
    const char *sql_name;    /* quote_ident(schema).quote_ident(table) */
    int depth;
    char relkind;      /* 'r' table, 'p' partitioned table */
    bool partition;    /* a declarative partition (not INHERITS) */
    bool holds_rows;   /* 'r', or a partitioned table without partitions */
    char replident;    /* 'd', 'n', 'f', 'i' */
    bool has_identity; /* FULL, or the key/index the identity names exists */
    bool in_main;      /* the publication publishes its changes */
    bool in_companion; /* the insert-only companion does */
    bool direct_main;  /* listed in the publication itself (not via a root) */
    bool direct_companion;
    unsigned pub_ops; /* RulesOp bits the covering publications publish */
} CatalogMember;

/* Query the catalog for every table named in rules. Returns NULL on a
 * query error with the message in err. Free with catalog_free(). */
Catalog *catalog_load(PGconn *conn, const Rules *rules, const char *publication, char *err,
                      size_t errlen);

/* A RulesLookupFn: arg is the Catalog. */
const RulesTableInfo *catalog_lookup(void *arg, const char *table);

/* Does the publication exist, and is it FOR ALL TABLES? */
int catalog_publication(const Catalog *c); /* 0 missing, 1 exists, 2 all tables */

/* Facts about the publications: the configured one publishes via the
 * partition root; the companion "<publication>_insert_only" exists (its
 * name in *companion, valid while c lives). */
bool catalog_via_root(const Catalog *c);
bool catalog_companion(const Catalog *c, const char **companion);

/* The publication's name as SQL (quote_ident rules); valid while c lives. */
const char *catalog_publication_sql(const Catalog *c);

/* Every member of every rules table, tables in rules order; valid while c
 * lives. */
size_t catalog_member_count(const Catalog *c);
const CatalogMember *catalog_member(const Catalog *c, size_t i);

/* The companion publication's name for publication into out ("" when it
 * would be longer than PostgreSQL's 63 characters). */
void catalog_companion_name(const char *publication, char *out, size_t len);

/* One relation as the stream names it (by OID), for mapping its changes to
 * the rules tables above it. */
typedef struct CatalogRelation {
    bool exists;
    bool partition; /* a declarative partition */
    bool published; /* the publication or its companion publishes it now */
    size_t nancestors;
    char **ancestors; /* "schema.table", nearest first (partition parents and
                       * inheritance parents, recursively) */
} CatalogRelation;

/* Look up relation relid: its ancestors and whether it is published now.
 * One query; works on any plain connection. Returns 0, or -1 with the
 * message in err. Release *out with catalog_relation_release(). */
int catalog_relation(PGconn *conn, unsigned relid, const char *publication, CatalogRelation *out,
                     char *err, size_t errlen) __attribute__((warn_unused_result));

void catalog_relation_release(CatalogRelation *r);

void catalog_free(Catalog *c);

#endif
