/*
 * lookup.h — lookups (docs/rules.md "Lookups"): the batch of lookup calls a
 * flush must run, and rendering their result rows back into invalidations.
 *
 * While a batch is decoded, rules_eval_lookups() reports calls (a lookup
 * rule, its argument values, the changed row's values); lookup_batch_add()
 * copies them and merges calls with the same rule and arguments into one
 * query, so a batch that renames 1,000 users of one team asks once per
 * distinct user. At flush time, after the batch's commits are visible, the
 * executor (lookup_exec.h) runs each distinct query once and hands the
 * result rows to lookup_batch_render(), which renders every call of that
 * query for every row. More rows than the rule's limit, or arguments the
 * change did not carry, render the lookup's placeholders as `*` instead.
 *
 * Pure: no I/O, no logging. Aborts on out of memory.
 */
#ifndef WALBUST_LOOKUP_H
#define WALBUST_LOOKUP_H

#include <stdbool.h>
#include <stddef.h>

#include "rules.h"

/* Calls per batch before lookup_batch_full() asks for a flush. */
#define LOOKUP_BATCH_MAX_CALLS 10000

typedef struct LookupBatch LookupBatch;

/* An empty batch. Never NULL (aborts on out of memory). */
LookupBatch *lookup_batch_new(void);

/* Free b and every copied call. Accepts NULL. */
void lookup_batch_free(LookupBatch *b);

/* Copy one call (see RulesLookupCallFn). */
void lookup_batch_add(LookupBatch *b, const RulesLookupCall *call);

/* Forget every call (after they were rendered, or to replay). */
void lookup_batch_clear(LookupBatch *b);

/* Calls queued, and distinct queries (rule + arguments) among them. */
size_t lookup_batch_calls(const LookupBatch *b);
size_t lookup_batch_queries(const LookupBatch *b);

/* Should the caller flush now to keep memory bounded? */
bool lookup_batch_full(const LookupBatch *b);

/* Query q (< lookup_batch_queries()): its rule, and its arguments unless
 * *run is false (an argument was not carried: only the result's column
 * names are needed, to widen). */
typedef struct LookupQuery {
    size_t rule;
    bool run;
    size_t nargs;
    const char *const *args; /* NUL-terminated */
    const int *arglens;
} LookupQuery;

void lookup_batch_query(const LookupBatch *b, size_t q, LookupQuery *out);

/* The result of one query: column names and rows (row-major, nrows *
 * nfields values). Values are borrowed. */
typedef struct LookupRows {
    size_t nfields;
    const char *const *fields;
    size_t nrows;
    const RulesValue *vals;
} LookupRows;

typedef struct LookupRenderStats {
    size_t rows;       /* result rows rendered */
    size_t over_limit; /* queries over their rule's limit (widened) */
    size_t unknown;    /* calls widened because an argument was not carried */
} LookupRenderStats;

/* Called once per rendered call with the number of widened renderings it
 * produced (0 calls are skipped): for walbust_widened_total{table}. */
typedef void (*LookupWidenedFn)(void *arg, const char *table, unsigned n);

/* Render every call: results[q] for query q. A query with more rows than
 * its rule's limit, or not run, renders once with the lookup's columns as
 * `*`. Emits through emit (as rules_render_lookup()), reports widening
 * through widened (may be NULL), adds to *st (may be NULL). */
void lookup_batch_render(const LookupBatch *b, const Rules *r, const LookupRows *results,
                         RulesEmitFn emit, LookupWidenedFn widened, void *arg,
                         LookupRenderStats *st);

/* The same for the calls of queries [from, to) only, results[q - from]
 * holding query q's result: a large batch is rendered chunk by chunk. */
void lookup_batch_render_range(const LookupBatch *b, const Rules *r, size_t from, size_t to,
                               const LookupRows *results, RulesEmitFn emit, LookupWidenedFn widened,
                               void *arg, LookupRenderStats *st);

/* Render every call with the lookup's placeholders as `*`, without
 * running anything (the rules are about to be replaced, or the lookups
 * cannot run): bare placeholders the changed table does not have widen. */
void lookup_batch_widen(const LookupBatch *b, const Rules *r, RulesEmitFn emit,
                        LookupWidenedFn widened, void *arg);

/* The statement walbust prepares for a lookup: the rule's SQL with at most
 * limit + 1 rows, "SELECT * FROM (<sql>) AS walbust_lookup LIMIT <n>".
 * Returns a string the caller frees. */
char *lookup_wrap_sql(const char *sql, size_t limit);

#endif
