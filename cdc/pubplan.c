/*
 * pubplan.c — where each rules table is published (see pubplan.h).
 */
#include "pubplan.h"
#include "mem.h"

#include <stdbool.h>
#include <stdlib.h>

#define PUBPLAN_WRITES (RULES_UPDATE | RULES_DELETE)

/* Plan one rules table from its members [first, end). */
static void plan_table(PubPlan *p, const Rules *rules, const Catalog *cat, size_t first, size_t end)
{
    const CatalogMember *own = catalog_member(cat, first);
    unsigned ops = rules_table_ops(rules, own->rules_table);
    bool keyless = false;

    for (size_t i = first; i < end; i++) {
        const CatalogMember *m = catalog_member(cat, i);
        if (!m->holds_rows || m->has_identity)
            continue;
        keyless = true;
        if (m->pub_ops & PUBPLAN_WRITES)
            p->breaking[p->nbreaking++] = m->sql_name;
        if (ops & PUBPLAN_WRITES) {
            p->fix[p->nfix] = m->sql_name;
            p->fix_rules[p->nfix++] = own->rules_table;
        }
    }
    if (keyless && !(ops & PUBPLAN_WRITES)) {
        p->insert_member[p->ninsert] = first;
        p->insert_only[p->ninsert++] = own->sql_name;
    } else {
        p->main_member[p->nmain] = first;
        p->main[p->nmain++] = own->sql_name;
    }
}

void pubplan_build(PubPlan *p, const Rules *rules, const Catalog *cat)
{
    size_t n = catalog_member_count(cat), i = 0;

    (void)rules;
    p->nmain = p->ninsert = p->nfix = p->nbreaking = 0;
    p->main = xcalloc(n + 1, sizeof *p->main);
    p->insert_only = xcalloc(n + 1, sizeof *p->insert_only);
    p->fix = xcalloc(n + 1, sizeof *p->fix);
    p->fix_rules = xcalloc(n + 1, sizeof *p->fix_rules);
    p->breaking = xcalloc(n + 1, sizeof *p->breaking);
    p->main_member = xcalloc(n + 1, sizeof *p->main_member);
    p->insert_member = xcalloc(n + 1, sizeof *p->insert_member);
    while (i < n) {
        size_t end = i + 1;
        while (end < n && catalog_member(cat, end)->depth > 0)
            end++;
        if (catalog_member(cat, i)->depth == 0)
            plan_table(p, rules, cat, i, end);
        i = end;
    }
}

void pubplan_release(PubPlan *p)
{
    free(p->main);
    free(p->insert_only);
    free(p->fix);
    free(p->fix_rules);
    free(p->breaking);
    free(p->main_member);
    free(p->insert_member);
}
