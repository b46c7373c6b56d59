/*
 * pubplan.h — which publication each rules table belongs in, so that
 * walbust sees every change its rules need and never makes the
 * application's own writes fail.
 *
 * PostgreSQL refuses UPDATE and DELETE on a table that has no replica
 * identity (no primary key under REPLICA IDENTITY DEFAULT, or NOTHING) as
 * soon as it is in a publication that publishes updates or deletes. So:
 *  - a table whose rows all have a replica identity goes into the
 *    publication (all operations);
 *  - a table some of whose rows have none (the table, a partition or an
 *    inheritance child) and whose rules fire only on insert or truncate
 *    goes into the companion "<publication>_insert_only", which publishes
 *    only inserts and truncates;
 *  - such a table whose rules need updates or deletes needs a replica
 *    identity first: the plan lists the tables to give one.
 * Pure over the Rules and the Catalog; setup executes the plan and check
 * prints it.
 */
#ifndef WALBUST_PUBPLAN_H
#define WALBUST_PUBPLAN_H

#include <stddef.h>

#include "catalog.h"
#include "rules.h"

typedef struct PubPlan {
    size_t nmain, ninsert, nfix, nbreaking;
    const char **main;        /* rules tables for the publication, SQL names */
    const char **insert_only; /* rules tables for the companion, SQL names */
    size_t *main_member;      /* catalog_member() index of each main[i] */
    size_t *insert_member;    /* and of each insert_only[i] */
    const char **fix;         /* tables holding rows that need a replica identity */
    const char **fix_rules;   /* the rules table each of those belongs to */
    /* Tables whose current publication already publishes update or delete
     * although they have no replica identity: the application's UPDATE and
     * DELETE on them fail now. */
    const char **breaking;
} PubPlan;

/* Build the plan for the rules' existing tables (missing ones are left
 * out). Strings are borrowed from cat and valid while it lives; release
 * the arrays with pubplan_release(). */
void pubplan_build(PubPlan *p, const Rules *rules, const Catalog *cat);

void pubplan_release(PubPlan *p);

#endif
