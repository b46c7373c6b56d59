/*
 * lookup.c — the batch of lookup calls and rendering their results (see
 * lookup.h). Calls are kept in arrival order; queries are deduplicated
 * through a small open-addressing hash over (rule, arguments).
 */
#include "lookup.h"

#include "mem.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct Query {
    size_t rule;
    bool run;
    size_t nargs;
    char **args;
    int *lens;
    uint64_t hash;
} Query;

typedef struct Call {
    size_t query;
    RulesOp op;
    size_t ncols;
    RulesValue *old_vals, *new_vals; /* owned copies (data too), or NULL */
} Call;

struct LookupBatch {
    Call *calls;
    size_t ncalls, callcap;
    Query *queries;
    size_t nqueries, querycap;
    size_t *slots; /* query index + 1; 0 empty; slotcap a power of two */
    size_t slotcap;
};

LookupBatch *lookup_batch_new(void)
{
    return xcalloc(1, sizeof(LookupBatch));
}

static void vals_free(RulesValue *v, size_t n)
{
    for (size_t i = 0; v != NULL && i < n; i++)
        free((char *)v[i].data);
    free(v);
}

void lookup_batch_clear(LookupBatch *b)
{
    for (size_t i = 0; i < b->ncalls; i++) {
        vals_free(b->calls[i].old_vals, b->calls[i].ncols);
        vals_free(b->calls[i].new_vals, b->calls[i].ncols);
    }
    for (size_t i = 0; i < b->nqueries; i++) {
        for (size_t a = 0; a < b->queries[i].nargs; a++)
            free(b->queries[i].args[a]);
        free(b->queries[i].args);
        free(b->queries[i].lens);
    }
    b->ncalls = b->nqueries = 0;
    if (b->slots != NULL)
        memset(b->slots, 0, b->slotcap * sizeof *b->slots);
}

void lookup_batch_free(LookupBatch *b)
{
    if (b == NULL)
        return;
    lookup_batch_clear(b);
    free(b->calls);
    free(b->queries);
    free(b->slots);
    free(b);
}

static uint64_t call_hash(const RulesLookupCall *c)
{
    uint64_t h = UINT64_C(14695981039346656037) ^ c->rule ^ ((uint64_t)c->unknown_args << 63);

    for (size_t a = 0; a < c->nargs; a++) {
        for (size_t i = 0; i <= c->arglens[a]; i++) { /* the NUL separates arguments */
            h ^= (unsigned char)c->args[a][i];
            h *= UINT64_C(1099511628211);
        }
    }
    return h;
}

static bool query_is(const Query *q, const RulesLookupCall *c, uint64_t h)
{
    if (q->hash != h || q->rule != c->rule || q->run == c->unknown_args || q->nargs != c->nargs)
        return false;
    for (size_t a = 0; a < c->nargs; a++)
        if ((size_t)q->lens[a] != c->arglens[a] || memcmp(q->args[a], c->args[a], c->arglens[a]))
            return false;
    return true;
}

static void rehash(LookupBatch *b)
{
    b->slotcap = b->slotcap ? b->slotcap * 2 : 64;
    free(b->slots);
    b->slots = xcalloc(b->slotcap, sizeof *b->slots);
    for (size_t i = 0; i < b->nqueries; i++) {
        size_t h = (size_t)b->queries[i].hash & (b->slotcap - 1);
        while (b->slots[h] != 0)
            h = (h + 1) & (b->slotcap - 1);
        b->slots[h] = i + 1;
    }
}

/* The query for call c: found, or added. */
static size_t query_for(LookupBatch *b, const RulesLookupCall *c)
{
    uint64_t h = call_hash(c);
    size_t s;
    Query *q;

    if ((b->nqueries + 1) * 2 > b->slotcap)
        rehash(b);
    for (s = (size_t)h & (b->slotcap - 1); b->slots[s] != 0; s = (s + 1) & (b->slotcap - 1))
        if (query_is(&b->queries[b->slots[s] - 1], c, h))
            return b->slots[s] - 1;
    b->queries = xgrow(b->queries, &b->querycap, b->nqueries + 1, sizeof *b->queries);
    q = &b->queries[b->nqueries];
    *q = (Query){c->rule,
                 !c->unknown_args,
                 c->nargs,
                 xcalloc(c->nargs + 1, sizeof(char *)),
                 xcalloc(c->nargs + 1, sizeof(int)),
                 h};
    for (size_t a = 0; a < c->nargs; a++) {
        q->args[a] = xstrndup(c->args[a], c->arglens[a]);
        q->lens[a] = (int)c->arglens[a];
    }
    b->slots[s] = ++b->nqueries;
    return b->nqueries - 1;
}

static RulesValue *vals_copy(const RulesValue *v, size_t n)
{
    RulesValue *out;

    if (v == NULL)
        return NULL;
    out = xcalloc(n + 1, sizeof *out);
    for (size_t i = 0; i < n; i++) {
        out[i] = v[i];
        out[i].data = v[i].kind == RULES_VAL_TEXT ? xstrndup(v[i].data, v[i].len) : NULL;
    }
    return out;
}

void lookup_batch_add(LookupBatch *b, const RulesLookupCall *call)
{
    Call *c;

    b->calls = xgrow(b->calls, &b->callcap, b->ncalls + 1, sizeof *b->calls);
    c = &b->calls[b->ncalls++];
    c->query = query_for(b, call);
    c->op = call->op;
    c->ncols = call->ncols;
    c->old_vals = vals_copy(call->old_vals, call->ncols);
    c->new_vals = vals_copy(call->new_vals, call->ncols);
}

size_t lookup_batch_calls(const LookupBatch *b)
{
    return b->ncalls;
}

size_t lookup_batch_queries(const LookupBatch *b)
{
    return b->nqueries;
}

bool lookup_batch_full(const LookupBatch *b)
{
    return b->ncalls >= LOOKUP_BATCH_MAX_CALLS;
}

void lookup_batch_query(const LookupBatch *b, size_t q, LookupQuery *out)
{
    const Query *qq = &b->queries[q];

    *out = (LookupQuery){qq->rule, qq->run, qq->nargs, (const char *const *)qq->args, qq->lens};
}

/* Render one call against its query's result. */
static void render_call(const LookupBatch *b, const Rules *r, const Call *c, const LookupRows *res,
                        RulesEmitFn emit, LookupWidenedFn widened, void *arg, LookupRenderStats *st)
{
    const Query *q = &b->queries[c->query];
    RulesLookupCall call = {q->rule,  c->op,       q->nargs,    NULL,   NULL,
                            c->ncols, c->old_vals, c->new_vals, !q->run};
    RulesLookupInfo info;
    RulesEvalStats es = {0};

    if (!rules_lookup_info(r, q->rule, &info))
        return;
    if (!q->run || res->nrows > info.limit) {
        st->unknown += !q->run;
        rules_render_lookup(r, &call, res->nfields, res->fields, NULL, emit, arg, &es);
    } else {
        for (size_t i = 0; i < res->nrows; i++)
            rules_render_lookup(r, &call, res->nfields, res->fields, res->vals + i * res->nfields,
                                emit, arg, &es);
    }
    if (es.widened > 0 && widened != NULL)
        widened(arg, info.table, es.widened);
}

void lookup_batch_render_range(const LookupBatch *b, const Rules *r, size_t from, size_t to,
                               const LookupRows *results, RulesEmitFn emit, LookupWidenedFn widened,
                               void *arg, LookupRenderStats *st)
{
    LookupRenderStats local = {0, 0, 0};

    if (st == NULL)
        st = &local;
    if (to > b->nqueries)
        to = b->nqueries;
    for (size_t q = from; q < to; q++) {
        RulesLookupInfo info;
        if (!b->queries[q].run || !rules_lookup_info(r, b->queries[q].rule, &info))
            continue;
        if (results[q - from].nrows > info.limit)
            st->over_limit++;
        else
            st->rows += results[q - from].nrows;
    }
    for (size_t i = 0; i < b->ncalls; i++) {
        size_t q = b->calls[i].query;
        if (q >= from && q < to)
            render_call(b, r, &b->calls[i], &results[q - from], emit, widened, arg, st);
    }
}

void lookup_batch_render(const LookupBatch *b, const Rules *r, const LookupRows *results,
                         RulesEmitFn emit, LookupWidenedFn widened, void *arg,
                         LookupRenderStats *st)
{
    lookup_batch_render_range(b, r, 0, b->nqueries, results, emit, widened, arg, st);
}

void lookup_batch_widen(const LookupBatch *b, const Rules *r, RulesEmitFn emit,
                        LookupWidenedFn widened, void *arg)
{
    for (size_t i = 0; i < b->ncalls; i++) {
        const Call *c = &b->calls[i];
        const Query *q = &b->queries[c->query];
        RulesLookupCall call = {q->rule,  c->op,       q->nargs,    NULL, NULL,
                                c->ncols, c->old_vals, c->new_vals, true};
        RulesEvalStats es = {0};
        RulesLookupInfo info;
        if (!rules_lookup_info(r, q->rule, &info))
            continue;
        rules_render_lookup(r, &call, 0, NULL, NULL, emit, arg, &es);
        if (es.widened > 0 && widened != NULL)
            widened(arg, info.table, es.widened);
    }
}

char *lookup_wrap_sql(const char *sql, size_t limit)
{
    const char *fmt = "SELECT * FROM (%s\n) AS walbust_lookup LIMIT %zu";
    size_t n = strlen(sql) + strlen(fmt) + 32;
    char *out = xmalloc(n);

    snprintf(out, n, fmt, sql, limit + 1);
    return out;
}
