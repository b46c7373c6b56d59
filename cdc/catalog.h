/*
 * catalog.h — what the live database says about the tables rules name.
 *
 * Loads, with simple queries (so it works on replication connections too),
 * each rules table's existence, columns, replica identity setting, identity
 * columns and publication membership, for rules_check_catalog().
 */
#ifndef WALBUST_CATALOG_H
#define WALBUST_CATALOG_H

#include <libpq-fe.h>
#include <stddef.h>

#include "rules.h"

typedef struct Catalog Catalog;

/* Query the catalog for every table named in rules. Returns NULL on a
 * query error with the message in err. Free with catalog_free(). */
Catalog *catalog_load(PGconn *conn, const Rules *rules, const char *publication, char *err,
                      size_t errlen);

/* A RulesLookupFn: arg is the Catalog. */
const RulesTableInfo *catalog_lookup(void *arg, const char *table);

/* Does the publication exist, and is it FOR ALL TABLES? */
int catalog_publication(const Catalog *c); /* 0 missing, 1 exists, 2 all tables */

void catalog_free(Catalog *c);

#endif
