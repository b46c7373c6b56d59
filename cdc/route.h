/*
 * route.h — which rules tables a change on a published relation is
 * evaluated against: partitions and inheritance children reach the rules
 * of the tables above them.
 *
 * walbust's publication publishes partitions as themselves (not via the
 * root; docs/design.md says why). For each relation the stream names, the
 * catalog is asked once per relation generation (pgoutput re-sends a
 * Relation message after ATTACH/DETACH PARTITION and other DDL, and after
 * every reconnect) for its ancestors, over a plain connection of its own;
 * the rules tables among them are the targets, after the relation itself.
 *
 * A relation the stream still sends but that is neither a rules table nor
 * under one, nor in the publication any more, was published when the change
 * was made and has since been detached, dropped or removed (walbust is
 * replaying older WAL). Which rules it fed is unknowable, so its changes
 * are widened: every rules table that has partitions or inheritance
 * children is invalidated as by a TRUNCATE. Never silently stale.
 */
#ifndef WALBUST_ROUTE_H
#define WALBUST_ROUTE_H

#include <stdbool.h>
#include <stddef.h>

#include "pgo.h"
#include "rules.h"

typedef struct RouteTarget {
    const char *table; /* rules table ("schema.table") to evaluate against */
    bool widen;        /* evaluate as a TRUNCATE of it (orphaned relation) */
} RouteTarget;

typedef struct RouteResult {
    bool partition_row; /* set RulesChange.partition_row */
    bool orphan;        /* first sight of an orphaned relation: log it */
    size_t n;
    const RouteTarget *targets; /* owned by the Route; valid until the next call */
} RouteResult;

typedef struct Route Route;

/* conninfo and publication are borrowed and must outlive the Route. */
Route *route_new(const char *conninfo, const char *publication);

/* Close its connection and free. Accepts NULL. */
void route_free(Route *rt);

/* Forget cached answers that depend on the rules (call after a reload). */
void route_rules_changed(Route *rt);

/* The targets for a change on rel under rules. Returns 0, or -1 with the
 * message in err when the catalog could not be asked (the caller must not
 * confirm past the change: reconnect and replay). */
int route_change(Route *rt, const Rules *rules, const PgoRelation *rel, RouteResult *out, char *err,
                 size_t errlen) __attribute__((warn_unused_result));

#endif
