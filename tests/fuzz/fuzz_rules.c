/*
 * fuzz_rules.c — libFuzzer target for the rules engine: rules_parse() on
 * arbitrary JSON text and, when it compiles, rules_eval() on synthetic
 * changes (template rendering, NULL suppression, widening, glob escaping,
 * the `changed` filter, publish payloads, the column-resolution cache),
 * and lookups: calls, their batch, rendering one-row results and widening.
 *
 * Input: rules text, optionally followed by "\0CHANGE\0" and change bytes:
 *   [0] op (bits 0-1: insert, update, delete, truncate; bits 2-7: which
 *       table of the compiled rules), [1] missing mask, [2] NULL mask,
 *   [3] diff mask (update: old value differs), then column values
 *   separated by NUL bytes (cycled when there are fewer than columns).
 * Columns are the placeholder names found in the rules text (`{x}`,
 * `{old.x}`, `{new.x}`), so templates really render.
 *
 * Properties (a violation aborts):
 *  - a failed parse reports at least one problem, each NUL-terminated with
 *    a sane line/column; a compiled file answers its table accessors;
 *  - rules_check_catalog() against a catalog built from the same bytes
 *    (replica identity, identity columns, publication membership, a table
 *    that does not exist, a publication name needing quotes) reports well
 *    formed problems and counts them;
 *  - every emitted string is NUL-terminated at its length; publish payloads
 *    are JSON objects naming the change's table and op; stats agree with
 *    the callbacks;
 *  - evaluation is deterministic, also when the same column-name array is
 *    reused with its columns permuted in place (the resolution cache must
 *    notice);
 *  - widening never loses an invalidation (docs/guarantees.md guarantee 8): when some columns
 *    become "not carried", every key, tag and version emitted with full
 *    values is still emitted, or matched by an emitted pattern under Redis'
 *    MATCH semantics (globmatch.h).
 */
#include "lookup.h"
#include "rules.h"

#include "globmatch.h"

#include <cJSON.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_COLS 16
#define NAME_MAX_LEN 63

#define CHECK(cond, ...)                                                                           \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "fuzz_rules: property failed: %s: ", #cond);                          \
            fprintf(stderr, __VA_ARGS__);                                                          \
            fputc('\n', stderr);                                                                   \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

static void *xrealloc(void *p, size_t n)
{
    void *q = realloc(p, n ? n : 1);
    if (q == NULL) {
        fprintf(stderr, "fuzz_rules: out of memory\n");
        abort();
    }
    return q;
}

static char *xmemdup(const char *s, size_t n)
{
    char *d = xrealloc(NULL, n + 1);
    memcpy(d, s, n);
    d[n] = '\0';
    return d;
}

/* ---- collecting emissions ---------------------------------------------- */

typedef struct Emitted {
    RulesInvAction action;
    char *s;
    size_t len;
    char *payload;
    size_t payload_len;
} Emitted;

typedef struct Sink {
    Emitted *items;
    size_t n, cap;
    const RulesChange *chg;
} Sink;

static const char *const op_names[] = {"insert", "update", "delete", "truncate"};

static int op_index(RulesOp op)
{
    return op == RULES_INSERT ? 0 : op == RULES_UPDATE ? 1 : op == RULES_DELETE ? 2 : 3;
}

static bool ascii(const char *s)
{
    for (; *s; s++)
        if ((unsigned char)*s >= 0x80)
            return false;
    return true;
}

static void check_payload(const Sink *k, const char *payload, size_t len)
{
    cJSON *root = cJSON_ParseWithLength(payload, len);
    const cJSON *table, *op;

    CHECK(root != NULL && cJSON_IsObject(root), "payload is not a JSON object: %.*s", (int)len,
          payload);
    table = cJSON_GetObjectItemCaseSensitive(root, "table");
    op = cJSON_GetObjectItemCaseSensitive(root, "op");
    /* Invalid UTF-8 becomes U+FFFD in payloads, so compare ASCII names only. */
    CHECK(cJSON_IsString(table) &&
              (!ascii(k->chg->table) || strcmp(table->valuestring, k->chg->table) == 0),
          "payload table: %.*s", (int)len, payload);
    CHECK(cJSON_IsString(op) && strcmp(op->valuestring, op_names[op_index(k->chg->op)]) == 0,
          "payload op: %.*s", (int)len, payload);
    cJSON_Delete(root);
}

static void on_emit(void *arg, RulesInvAction action, const char *s, size_t len,
                    const char *payload, size_t payload_len)
{
    Sink *k = arg;
    Emitted *e;

    CHECK(action >= RULES_INV_KEY && action <= RULES_INV_PUBLISH, "action %d", (int)action);
    CHECK(s != NULL && s[len] == '\0', "emitted string of %zu bytes is not NUL-terminated", len);
    if (action == RULES_INV_PUBLISH) {
        CHECK(payload != NULL && payload_len > 0, "publish without a payload");
        check_payload(k, payload, payload_len);
    } else {
        CHECK(payload == NULL && payload_len == 0, "payload on a non-publish action %d",
              (int)action);
    }
    if (k->n == k->cap) {
        k->cap = k->cap ? 2 * k->cap : 16;
        k->items = xrealloc(k->items, k->cap * sizeof *k->items);
    }
    e = &k->items[k->n++];
    e->action = action;
    e->s = xmemdup(s, len);
    e->len = len;
    e->payload = payload ? xmemdup(payload, payload_len) : NULL;
    e->payload_len = payload_len;
}

static void sink_release(Sink *k)
{
    for (size_t i = 0; i < k->n; i++) {
        free(k->items[i].s);
        free(k->items[i].payload);
    }
    free(k->items);
    memset(k, 0, sizeof *k);
}

static void count_emit(void *arg, RulesInvAction action, const char *s, size_t len,
                       const char *payload, size_t payload_len)
{
    CHECK(action != RULES_INV_PUBLISH && payload == NULL && payload_len == 0,
          "a lookup rendering emitted a publish");
    CHECK(strlen(s) == len, "lookup rendering: length %zu for a %zu-byte string", len, strlen(s));
    (*(size_t *)arg)++;
}

static void defer_lookup(void *arg, const RulesLookupCall *call)
{
    CHECK(call->nargs == 0 || call->args != NULL, "lookup call without its arguments");
    lookup_batch_add(arg, call);
}

/* Lookups of chg: every query answered with one row that has the change's
 * columns and new (else old) values, then everything widened. */
static void lookups_of(const Rules *r, const RulesChange *chg)
{
    LookupBatch *b = lookup_batch_new();
    LookupRows *rows;
    LookupRenderStats st = {0, 0, 0};
    size_t n = 0, nq;
    const RulesValue *vals = chg->new_vals ? chg->new_vals : chg->old_vals;

    (void)rules_eval_lookups(r, chg, defer_lookup, b);
    nq = lookup_batch_queries(b);
    rows = xrealloc(NULL, (nq + 1) * sizeof *rows);
    for (size_t q = 0; q < nq; q++)
        rows[q] = (LookupRows){chg->ncols, chg->colnames, vals ? 1 : 0, vals};
    lookup_batch_render(b, r, rows, count_emit, NULL, &n, &st);
    CHECK(st.rows <= nq, "%zu rows rendered from %zu one-row results", st.rows, nq);
    lookup_batch_widen(b, r, count_emit, NULL, &n);
    free(rows);
    lookup_batch_free(b);
}

/* Evaluate chg into a fresh sink, checking the stats against it. */
static void eval_into(const Rules *r, const RulesChange *chg, Sink *k)
{
    RulesEvalStats st = {0};
    unsigned matched;

    memset(k, 0, sizeof *k);
    k->chg = chg;
    matched = rules_eval(r, chg, on_emit, k, &st);
    CHECK(st.matched == matched, "stats.matched %u, returned %u", st.matched, matched);
    CHECK(st.emitted == k->n, "stats.emitted %u, callbacks %zu", st.emitted, k->n);
    CHECK(st.widened <= st.emitted, "widened %u > emitted %u", st.widened, st.emitted);
    if (matched == 0)
        CHECK(k->n == 0, "%zu emissions without a matching rule", k->n);
}

static bool same_emitted(const Emitted *a, const Emitted *b)
{
    return a->action == b->action && a->len == b->len && memcmp(a->s, b->s, a->len) == 0 &&
           a->payload_len == b->payload_len &&
           (a->payload_len == 0 || memcmp(a->payload, b->payload, a->payload_len) == 0);
}

static void check_same(const Sink *a, const Sink *b, const char *what)
{
    CHECK(a->n == b->n, "%s: %zu emissions, then %zu", what, a->n, b->n);
    for (size_t i = 0; i < a->n; i++)
        CHECK(same_emitted(&a->items[i], &b->items[i]), "%s: emission %zu differs (\"%s\" vs \"%s\")",
              what, i, a->items[i].s, b->items[i].s);
}

/* ---- the synthetic change ---------------------------------------------- */

typedef struct Synth {
    size_t ncols;
    char *names[MAX_COLS];
    const char *colnames[MAX_COLS];
    RulesValue old_vals[MAX_COLS], new_vals[MAX_COLS];
    RulesChange chg;
} Synth;

static bool have_name(const Synth *sy, const char *s, size_t n)
{
    for (size_t i = 0; i < sy->ncols; i++)
        if (strlen(sy->names[i]) == n && memcmp(sy->names[i], s, n) == 0)
            return true;
    return false;
}

/* Column names: every `{name}`, `{old.name}`, `{new.name}` in the text. */
static void scan_names(Synth *sy, const char *text, size_t len)
{
    for (size_t i = 0; i < len && sy->ncols < MAX_COLS; i++) {
        const char *p, *close;
        size_t n;
        if (text[i] != '{' || (i + 1 < len && text[i + 1] == '{'))
            continue;
        p = text + i + 1;
        close = memchr(p, '}', len - i - 1);
        if (close == NULL)
            break;
        n = (size_t)(close - p);
        if (n > 4 && (memcmp(p, "old.", 4) == 0 || memcmp(p, "new.", 4) == 0)) {
            p += 4;
            n -= 4;
        }
        if (n == 0 || n > NAME_MAX_LEN || memchr(p, '{', n) || memchr(p, '\0', n) ||
            have_name(sy, p, n))
            continue;
        sy->names[sy->ncols] = xmemdup(p, n);
        sy->colnames[sy->ncols] = sy->names[sy->ncols];
        sy->ncols++;
    }
    if (sy->ncols == 0) {
        sy->names[0] = xmemdup("id", 2);
        sy->colnames[0] = sy->names[0];
        sy->ncols = 1;
    }
}

/* The i-th NUL-separated value of the change bytes (cycled). */
static RulesValue nth_value(const uint8_t *v, size_t vlen, size_t i)
{
    size_t count = 1, start = 0, k = 0;

    for (size_t j = 0; j < vlen; j++)
        count += v[j] == '\0';
    i %= count;
    for (size_t j = 0; j <= vlen; j++) {
        if (j == vlen || v[j] == '\0') {
            if (k++ == i)
                return (RulesValue){RULES_VAL_TEXT, (const char *)v + start, j - start};
            start = j + 1;
        }
    }
    return (RulesValue){RULES_VAL_TEXT, "", 0};
}

/* Fill images from the header bytes; columns in `missing` are not carried. */
static void fill_images(Synth *sy, const uint8_t *hdr, const uint8_t *v, size_t vlen,
                        unsigned missing)
{
    static const RulesOp ops[] = {RULES_INSERT, RULES_UPDATE, RULES_DELETE, RULES_TRUNCATE};
    RulesOp op = ops[hdr[0] & 3];

    for (size_t i = 0; i < sy->ncols; i++) {
        RulesValue nv = nth_value(v, vlen, i);
        RulesValue ov = (hdr[3] >> (i % 8)) & 1 ? nth_value(v, vlen, i + 1) : nv;
        if ((hdr[2] >> (i % 8)) & 1)
            nv.kind = ov.kind = RULES_VAL_NULL;
        if ((missing >> i) & 1)
            nv = ov = (RulesValue){RULES_VAL_MISSING, NULL, 0};
        sy->new_vals[i] = nv;
        sy->old_vals[i] = ov;
    }
    sy->chg.op = op;
    sy->chg.ncols = sy->ncols;
    sy->chg.colnames = sy->colnames;
    sy->chg.old_vals = op == RULES_UPDATE || op == RULES_DELETE ? sy->old_vals : NULL;
    sy->chg.new_vals = op == RULES_UPDATE || op == RULES_INSERT ? sy->new_vals : NULL;
    sy->chg.lsn = "0/16B3748";
    sy->chg.xid = 1234;
    sy->chg.commit_time = "2026-11-27T03:22:20.123456Z";
}

/* Reverse the columns in place: same colnames pointer, other names. */
static void permute_in_place(Synth *sy)
{
    for (size_t i = 0, j = sy->ncols - 1; i < j; i++, j--) {
        const char *n = sy->colnames[i];
        RulesValue o = sy->old_vals[i], v = sy->new_vals[i];
        sy->colnames[i] = sy->colnames[j];
        sy->old_vals[i] = sy->old_vals[j];
        sy->new_vals[i] = sy->new_vals[j];
        sy->colnames[j] = n;
        sy->old_vals[j] = o;
        sy->new_vals[j] = v;
    }
}

/* ---- properties ---------------------------------------------------------- */

static RulesInvAction widened_action(RulesInvAction a)
{
    return a == RULES_INV_KEY ? RULES_INV_PATTERN
           : a == RULES_INV_TAG ? RULES_INV_TAG_PATTERN
                                : RULES_INV_VERSION_PATTERN;
}

/* Everything `full` invalidated is still invalidated by `wide`. */
static void check_covered(const Sink *full, const Sink *wide)
{
    for (size_t i = 0; i < full->n; i++) {
        const Emitted *e = &full->items[i];
        bool covered = false;
        /* An empty string is out of reach of any pattern but "*" under
         * Redis' matcher (see fuzz_glob.c); not a meaningful cache key. */
        if ((e->action != RULES_INV_KEY && e->action != RULES_INV_TAG &&
             e->action != RULES_INV_VERSION) ||
            e->len == 0)
            continue;
        for (size_t j = 0; j < wide->n && !covered; j++) {
            const Emitted *w = &wide->items[j];
            covered = (w->action == e->action && w->len == e->len &&
                       memcmp(w->s, e->s, e->len) == 0) ||
                      (w->action == widened_action(e->action) &&
                       globmatch(w->s, w->len, e->s, e->len));
        }
        CHECK(covered, "widening lost action %d \"%s\" (%zu emissions after widening)",
              (int)e->action, e->s, wide->n);
    }
}

static void check_problems(const RulesProblems *p, const char *text, size_t len)
{
    int lines = 1;

    for (size_t i = 0; i < len; i++)
        lines += text[i] == '\n';
    CHECK(p->count > 0, "rules_parse failed without a problem");
    for (size_t i = 0; i < p->count; i++) {
        const RulesProblem *it = &p->items[i];
        CHECK(memchr(it->msg, '\0', sizeof it->msg) != NULL && it->msg[0] != '\0',
              "problem %zu: empty or unterminated message", i);
        CHECK(memchr(it->path, '\0', sizeof it->path) != NULL, "problem %zu: path", i);
        CHECK(it->line >= 0 && it->line <= lines && it->column >= 0,
              "problem %zu: line %d column %d of %d lines", i, it->line, it->column, lines);
    }
}

static void check_accessors(const Rules *r)
{
    size_t n = rules_table_count(r);

    CHECK(rules_tag_prefix(r) != NULL, "no tag prefix");
    (void)rules_use_del(r);
    for (size_t i = 0; i < n; i++)
        CHECK(rules_table(r, i) != NULL && rules_has_table(r, rules_table(r, i)),
              "table %zu not found by name", i);
}

/* A catalog where every rules table has the synthetic change's columns. */
typedef struct Catalog {
    RulesTableInfo info;
    bool identity[MAX_COLS];
    const char *hidden; /* this table "does not exist" (lookup NULL) */
} Catalog;

static const RulesTableInfo *lookup(void *arg, const char *table)
{
    Catalog *c = arg;

    if (c->hidden != NULL && strcmp(table, c->hidden) == 0)
        return NULL;
    c->info.table = table;
    return &c->info;
}

/* rules_check_catalog() with replica identity, identity columns and
 * publication membership taken from the header bytes, the publication name
 * from the first value: problems are well formed and counted. */
static void check_catalog(const Rules *r, const Synth *sy, const uint8_t *hdr, const uint8_t *v,
                          size_t vlen)
{
    RulesValue pv = nth_value(v, vlen, 0);
    char *pub = xmemdup(pv.data, strnlen(pv.data, pv.len));
    Catalog c;
    RulesProblems p = {0, NULL};
    size_t added;

    memset(&c, 0, sizeof c);
    for (size_t i = 0; i < sy->ncols; i++)
        c.identity[i] = (hdr[1] >> (i % 8)) & 1;
    c.info.exists = true;
    c.info.replident = "dnfi"[(hdr[2] >> 4) & 3];
    c.info.ncols = sy->ncols;
    c.info.colnames = sy->colnames;
    c.info.identity = c.identity;
    c.info.in_publication = (hdr[3] & 0x80) != 0;
    c.hidden = hdr[2] & 0x40 ? sy->chg.table : NULL;
    added = rules_check_catalog(r, pub, lookup, &c, &p);
    CHECK(added == p.count, "returned %zu, added %zu", added, p.count);
    for (size_t i = 0; i < p.count; i++)
        CHECK(memchr(p.items[i].msg, '\0', sizeof p.items[i].msg) != NULL &&
                  p.items[i].msg[0] != '\0' &&
                  memchr(p.items[i].path, '\0', sizeof p.items[i].path) != NULL,
              "catalog problem %zu malformed", i);
    rules_problems_release(&p);
    free(pub);
}

static void exercise(const Rules *r, const char *text, size_t tlen, const uint8_t *cb, size_t clen)
{
    uint8_t hdr[4] = {0, 0, 0, 0};
    Synth sy;
    Sink full, again, perm, wide;
    size_t ntables = rules_table_count(r);
    unsigned missing;

    if (ntables == 0)
        return;
    memset(&sy, 0, sizeof sy);
    memcpy(hdr, cb, clen < 4 ? clen : 4);
    cb += clen < 4 ? clen : 4;
    clen -= clen < 4 ? clen : 4;
    scan_names(&sy, text, tlen);
    sy.chg.table = rules_table(r, (size_t)(hdr[0] >> 2) % ntables);

    fill_images(&sy, hdr, cb, clen, 0);
    eval_into(r, &sy.chg, &full);
    lookups_of(r, &sy.chg);
    eval_into(r, &sy.chg, &again);
    check_same(&full, &again, "same change twice");
    permute_in_place(&sy);
    eval_into(r, &sy.chg, &perm);
    check_same(&full, &perm, "columns permuted in place");
    permute_in_place(&sy);

    check_catalog(r, &sy, hdr, cb, clen);
    missing = hdr[1] & ((1u << sy.ncols) - 1);
    if (sy.chg.op != RULES_TRUNCATE && missing != 0) {
        fill_images(&sy, hdr, cb, clen, missing);
        eval_into(r, &sy.chg, &wide);
        check_covered(&full, &wide);
        sink_release(&wide);
    }
    sink_release(&full);
    sink_release(&again);
    sink_release(&perm);
    for (size_t i = 0; i < sy.ncols; i++)
        free(sy.names[i]);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const char sep[] = "\0CHANGE\0";
    const uint8_t *cut = memmem(data, size, sep, sizeof sep - 1);
    size_t tlen = cut ? (size_t)(cut - data) : size;
    const uint8_t *cb = cut ? cut + sizeof sep - 1 : data + size;
    size_t clen = (size_t)(data + size - cb);
    RulesProblems problems = {0, NULL};
    char *text;
    Rules *r;

    if (size > 65536)
        return 0;
    /* Exactly tlen bytes, no NUL after: rules_parse must not read past. */
    text = xrealloc(NULL, tlen);
    memcpy(text, data, tlen);
    r = rules_parse(text, tlen, &problems);
    if (r == NULL) {
        check_problems(&problems, text, tlen);
    } else {
        CHECK(problems.count == 0, "compiled with %zu problems", problems.count);
        check_accessors(r);
        exercise(r, text, tlen, cb, clen);
    }
    rules_free(r);
    rules_problems_release(&problems);
    free(text);
    return 0;
}
