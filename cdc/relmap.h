/*
 * relmap.h — which rules tables a published relation's changes belong to.
 *
 * walbust's publication publishes partitions as themselves (not via their
 * root, see docs/design.md), and inheritance children as themselves. A
 * change on such a relation belongs to the rules of the relation itself and
 * of every ancestor the rules name: a rule on a partitioned table sees the
 * changes of all its partitions, including partitions attached later, and a
 * rule on an inheritance parent those of its children.
 *
 * The map caches, per relation OID and the decoder's relation generation
 * (unique per decoder; a new one each time PostgreSQL sends the Relation
 * message, which it does after a reconnect and after DDL on the relation
 * such as ATTACH or DETACH PARTITION), the relation's ancestors as the
 * catalog names them. The caller looks the ancestry up in the catalog on a
 * miss, stores it here, and picks the ancestors its rules name. Pure: no
 * I/O.
 */
#ifndef WALBUST_RELMAP_H
#define WALBUST_RELMAP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct RelMapEntry {
    uint32_t relid;
    uint32_t generation;
    bool partition; /* a declarative partition: rows can move between siblings */
    bool published; /* the publication publishes it now (when looked up) */
    size_t nancestors;
    char **ancestors; /* "schema.table", nearest first */
} RelMapEntry;

typedef struct RelMap RelMap;

/* A new, empty map. Aborts on out of memory. */
RelMap *relmap_new(void);

/* Free the map and its entries. Accepts NULL. */
void relmap_free(RelMap *m);

/* Forget every entry. */
void relmap_clear(RelMap *m);

/* The entry for relid at generation, or NULL when unknown or stale. Valid
 * until the next relmap_put() or relmap_clear(). */
const RelMapEntry *relmap_find(const RelMap *m, uint32_t relid, uint32_t generation);

/* Store (replacing any older entry for relid). ancestors[0..n) are copied.
 * Returns the stored entry, valid as for relmap_find(). */
const RelMapEntry *relmap_put(RelMap *m, uint32_t relid, uint32_t generation, bool partition,
                              bool published, const char *const *ancestors, size_t n);

#endif
