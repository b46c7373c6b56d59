/*
 * relmap.c — relation OID → rules tables above it (see relmap.h).
 *
 * Open addressing on the OID with linear probing; the table doubles at half
 * full. Every change does one lookup, so it must stay O(1) with thousands
 * of partitions.
 */
#include "relmap.h"
#include "mem.h"

#include <stdlib.h>
#include <string.h>

struct RelMap {
    RelMapEntry *slots; /* relid 0: empty (PostgreSQL never assigns OID 0) */
    size_t cap, used;
};

RelMap *relmap_new(void)
{
    RelMap *m = xcalloc(1, sizeof *m);

    m->cap = 64;
    m->slots = xcalloc(m->cap, sizeof *m->slots);
    return m;
}

static void entry_release(RelMapEntry *e)
{
    for (size_t i = 0; i < e->nancestors; i++)
        free(e->ancestors[i]);
    free(e->ancestors);
    memset(e, 0, sizeof *e);
}

void relmap_clear(RelMap *m)
{
    for (size_t i = 0; i < m->cap; i++)
        if (m->slots[i].relid != 0)
            entry_release(&m->slots[i]);
    m->used = 0;
}

void relmap_free(RelMap *m)
{
    if (m == NULL)
        return;
    relmap_clear(m);
    free(m->slots);
    free(m);
}

static size_t slot_of(const RelMap *m, uint32_t relid)
{
    size_t i = (size_t)(relid * 2654435761u) & (m->cap - 1);

    while (m->slots[i].relid != 0 && m->slots[i].relid != relid)
        i = (i + 1) & (m->cap - 1);
    return i;
}

const RelMapEntry *relmap_find(const RelMap *m, uint32_t relid, uint32_t generation)
{
    const RelMapEntry *e = &m->slots[slot_of(m, relid)];

    return e->relid == relid && relid != 0 && e->generation == generation ? e : NULL;
}

static void grow(RelMap *m)
{
    RelMapEntry *old = m->slots;
    size_t oldcap = m->cap;

    m->cap *= 2;
    m->slots = xcalloc(m->cap, sizeof *m->slots);
    for (size_t i = 0; i < oldcap; i++)
        if (old[i].relid != 0)
            m->slots[slot_of(m, old[i].relid)] = old[i];
    free(old);
}

const RelMapEntry *relmap_put(RelMap *m, uint32_t relid, uint32_t generation, bool partition,
                              bool published, const char *const *ancestors, size_t n)
{
    RelMapEntry *e;

    if ((m->used + 1) * 2 > m->cap)
        grow(m);
    e = &m->slots[slot_of(m, relid)];
    if (e->relid == relid)
        entry_release(e);
    else
        m->used++;
    e->relid = relid;
    e->generation = generation;
    e->partition = partition;
    e->published = published;
    e->nancestors = n;
    e->ancestors = xcalloc(n + 1, sizeof *e->ancestors);
    for (size_t i = 0; i < n; i++)
        e->ancestors[i] = xstrdup(ancestors[i]);
    return e;
}
