/*
 * rules_eval.c — evaluating compiled rules against row changes, and checking
 * them against the live catalog (see rules.h; docs/guarantees.md guarantees 7
 * and 8, docs/rules.md).
 *
 * For each change the rules for its table are found through the table hash;
 * each rule resolves its column names to the change's column indexes once
 * per relation shape (cached by colnames pointer and ncols, and verified by
 * name so a recycled pointer is re-resolved).
 * Renderings are collected into scratch memory owned by the Rules (no
 * allocation per change once warm), deduplicated, and emitted keys →
 * patterns → tags → versions → publishes. Because of that scratch memory and
 * the cache, rules_eval() must not run on the same Rules from two threads at
 * once.
 */
#include "rules.h"

#include "rules_int.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- evaluation: column resolution and the changed filter ---------------------- */

/* Are n bytes at a and b equal? Column values are mostly a few bytes (ids,
 * counters, flags): compared in line, without a call to memcmp(), which
 * was a quarter of evaluating a table with 45 `changed` rules. */
static inline bool bytes_equal(const char *a, const char *b, size_t n)
{
    if (n > 16)
        return memcmp(a, b, n) == 0;
    for (size_t i = 0; i < n; i++)
        if (a[i] != b[i])
            return false;
    return true;
}

/* Same kind and, for text, the same bytes. */
static inline bool values_equal(const RulesValue *a, const RulesValue *b)
{
    return a->kind == b->kind && (a->kind != RULES_VAL_TEXT ||
                                  (a->len == b->len && bytes_equal(a->data, b->data, a->len)));
}

static long find_col(const RulesChange *chg, const char *name)
{
    for (size_t i = 0; i < chg->ncols; i++)
        if (chg->colnames[i] != NULL && strcmp(chg->colnames[i], name) == 0)
            return (long)i;
    return -1;
}

/* Map the rule's column names to the change's column indexes, reusing the
 * last mapping while the relation shape (colnames pointer, ncols) is the same,
 * every column it found still has the same name and every column it missed
 * is still missing (a recycled array may hold it now; a missing `changed`
 * column fires on every update, so a stale miss must not linger). A change
 * whose shape (RulesChange.shape) is the one last resolved skips the name
 * checks: with 50 rules on a table they were most of its evaluation. */
static void resolve(ColCache *cc, char *const *cols, size_t ncols, const RulesChange *chg)
{
    bool same = cc->valid && cc->names == chg->colnames && cc->ncols == chg->ncols;

    if (same && chg->shape != 0 && cc->shape == chg->shape)
        return; /* the very array it was resolved for (RulesChange.shape) */
    for (size_t k = 0; same && k < ncols; k++)
        same = cc->idx[k] < 0 ? find_col(chg, cols[k]) < 0
                              : strcmp(chg->colnames[cc->idx[k]], cols[k]) == 0;
    if (same) {
        cc->shape = chg->shape;
        return;
    }
    for (size_t k = 0; k < ncols; k++)
        cc->idx[k] = chg->colnames != NULL ? find_col(chg, cols[k]) : -1;
    cc->names = chg->colnames;
    cc->ncols = chg->ncols;
    cc->shape = chg->shape;
    cc->valid = true;
}

static void resolve_cols(const Rule *rule, const RulesChange *chg)
{
    resolve(rule->cache, rule->cols, rule->ncols, chg);
}

static const RulesValue missing_value = {RULES_VAL_MISSING, NULL, 0};

/* The value of rule column k in one image (old when use_old). */
static const RulesValue *col_value(const Rule *rule, const RulesChange *chg, size_t k, bool use_old)
{
    const RulesValue *vals = use_old ? chg->old_vals : chg->new_vals;
    long i = rule->cache->idx[k];

    if (vals == NULL || i < 0)
        return &missing_value;
    return &vals[i];
}

/* The `changed` filter for an update: did any listed column change? A value
 * not carried (MISSING) counts as changed, and so does a column the table
 * lacks (renamed or dropped by a migration: firing is the safe side; never
 * skip). *missing is set when that happened. */
static bool changed_hit(const Rule *rule, const RulesChange *chg, bool *missing)
{
    for (size_t i = 0; i < rule->nchanged; i++) {
        size_t k = rule->changed[i];
        const RulesValue *o = col_value(rule, chg, k, true);
        const RulesValue *n = col_value(rule, chg, k, false);
        if (rule->cache->idx[k] < 0) {
            *missing = true;
            return true;
        }
        if (o->kind == RULES_VAL_MISSING || !values_equal(o, n))
            return true;
    }
    return false;
}

/* An update's `changed` columns of table te, as bits over te->chcols:
 * *changed, the columns whose value changed or is not carried; *missing,
 * the columns the table lacks. */
static void changed_columns(const TableEnt *te, const RulesChange *chg, uint64_t *changed,
                            uint64_t *missing)
{
    const ColCache *cc = te->chcache;

    resolve(te->chcache, te->chcols, te->nchcols, chg);
    *changed = *missing = 0;
    for (size_t j = 0; j < te->nchcols; j++) {
        long i = cc->idx[j];
        const RulesValue *o, *n;
        if (i < 0) {
            *missing |= UINT64_C(1) << j;
            continue;
        }
        o = chg->old_vals != NULL ? &chg->old_vals[i] : &missing_value;
        n = chg->new_vals != NULL ? &chg->new_vals[i] : &missing_value;
        if (o->kind == RULES_VAL_MISSING || !values_equal(o, n))
            *changed |= UINT64_C(1) << j;
    }
}

/* One change's `changed` columns (changed_columns), found on first use. */
typedef struct ChangedCols {
    bool found;
    uint64_t changed, missing;
} ChangedCols;

/* The `changed` filter of te's i-th rule for an update (see changed_hit).
 * With the table's bitmasks one AND decides, the change's columns compared
 * once for all its rules (*cols). A rule naming a column the table lacks
 * goes through changed_hit(), which says so in *missing. */
static bool filter_passes(const TableEnt *te, size_t i, const Rule *rule, const RulesChange *chg,
                          ChangedCols *cols, bool *missing)
{
    if (te->chmask == NULL) {
        resolve_cols(rule, chg);
        return changed_hit(rule, chg, missing);
    }
    if (!cols->found) {
        changed_columns(te, chg, &cols->changed, &cols->missing);
        cols->found = true;
    }
    if ((te->chmask[i] & cols->missing) != 0) {
        resolve_cols(rule, chg);
        return changed_hit(rule, chg, missing);
    }
    return (te->chmask[i] & cols->changed) != 0;
}

/* ---- evaluation: rendering -------------------------------------------------------- */

typedef struct Eval {
    const Rules *r;
    const RulesChange *chg;
    Scratch *sc;
    const RulesValue *const *lk; /* per rule column: a lookup row's value, or NULL */
} Eval;

static const RulesValue *seg_value(const Eval *ev, const Rule *rule, const Seg *s, bool any_old)
{
    bool use_old = s->kind == SEG_OLD || (s->kind == SEG_ANY && any_old);

    if (s->kind == SEG_ANY && ev->lk != NULL && ev->lk[s->col] != NULL)
        return ev->lk[s->col]; /* a lookup column wins over the row's */
    return col_value(rule, ev->chg, s->col, use_old);
}

static void push_item(Eval *ev, RulesInvAction action, size_t rule, size_t off, size_t skip,
                      bool widened)
{
    static const unsigned phase_of[] = {
        [RULES_INV_KEY] = 0,         [RULES_INV_PATTERN] = 1, [RULES_INV_TAG] = 2,
        [RULES_INV_TAG_PATTERN] = 2, [RULES_INV_VERSION] = 3, [RULES_INV_VERSION_PATTERN] = 3,
        [RULES_INV_PUBLISH] = 5,     [RULES_INV_REFRESH] = 4, [RULES_INV_STALE] = 4,
    };
    Scratch *sc = ev->sc;

    sc->items = xgrow(sc->items, &sc->itemcap, sc->nitems + 1, sizeof *sc->items);
    sc->items[sc->nitems++] =
        (Item){action, phase_of[action], rule, off, sc->strs.len - off, skip, widened, 0};
    buf_put(&sc->strs, "", 0); /* keep the NUL; next string starts after it */
    sc->strs.len++;
}

static RulesInvAction action_for(int kind, bool pattern)
{
    switch (kind) {
    case TPL_KEY:
        return pattern ? RULES_INV_PATTERN : RULES_INV_KEY;
    case TPL_PATTERN:
        return RULES_INV_PATTERN;
    case TPL_TAG:
        return pattern ? RULES_INV_TAG_PATTERN : RULES_INV_TAG;
    case TPL_REFRESH: /* widened: deleted like keys */
        return pattern ? RULES_INV_PATTERN : RULES_INV_REFRESH;
    case TPL_STALE:
        return pattern ? RULES_INV_PATTERN : RULES_INV_STALE;
    default:
        return pattern ? RULES_INV_VERSION_PATTERN : RULES_INV_VERSION;
    }
}

/* Render one template once. any_old: {col} reads the old image. On truncate
 * every placeholder is `*`. A NULL value suppresses the rendering; a MISSING
 * value becomes `*` and turns the whole rendering into an escaped pattern. */
static void render_one(Eval *ev, size_t ri, const Template *t, int kind, bool any_old)
{
    const Rule *rule = &ev->r->rules[ri];
    bool trunc = ev->chg->op == RULES_TRUNCATE, wide = trunc && t->nph > 0;
    Buf *b = &ev->sc->strs;
    size_t off = b->len, skip = 0;

    for (size_t i = 0; !trunc && i < t->nsegs; i++) {
        if (t->segs[i].kind == SEG_LIT)
            continue;
        RulesValKind vk = seg_value(ev, rule, &t->segs[i], any_old)->kind;
        if (vk == RULES_VAL_NULL)
            return; /* no entity, no key */
        wide = wide || vk == RULES_VAL_MISSING;
    }
    if (kind == TPL_TAG) {
        if (wide)
            buf_put_escaped(b, ev->r->tag_prefix, strlen(ev->r->tag_prefix));
        else
            buf_puts(b, ev->r->tag_prefix);
        skip = b->len - off;
    }
    for (size_t i = 0; i < t->nsegs; i++) {
        const Seg *s = &t->segs[i];
        const RulesValue *v = s->kind == SEG_LIT || trunc ? NULL : seg_value(ev, rule, s, any_old);
        if (s->kind == SEG_LIT && (kind == TPL_PATTERN || !wide))
            buf_put(b, s->text, s->len); /* a pattern's literal text is the author's glob */
        else if (s->kind == SEG_LIT)
            buf_put_escaped(b, s->text, s->len);
        else if (v == NULL || v->kind == RULES_VAL_MISSING)
            buf_puts(b, "*");
        else if (kind == TPL_PATTERN || wide)
            buf_put_escaped(b, v->data, v->len);
        else
            buf_put(b, v->data, v->len);
    }
    push_item(ev, action_for(kind, wide), ri, off, skip, wide && !trunc);
}

/* Would the template render the same from the old image as from the new?
 * True when every {col} placeholder has the same value (kind and bytes) in
 * both, as for an update that did not touch the key's columns: the old
 * rendering would only be deduplicated away (emit_items). */
static bool same_both_images(const Eval *ev, size_t ri, const Template *t)
{
    const Rule *rule = &ev->r->rules[ri];

    for (size_t i = 0; i < t->nsegs; i++) {
        const Seg *s = &t->segs[i];
        if (s->kind != SEG_ANY)
            continue;
        const RulesValue *o = seg_value(ev, rule, s, /* any_old= */ true);
        const RulesValue *n = seg_value(ev, rule, s, /* any_old= */ false);
        if (!values_equal(o, n))
            return false;
    }
    return true;
}

/* Render a template for the change's event: from the images it has. */
static void render_template(Eval *ev, size_t ri, const Template *t, int kind)
{
    switch (ev->chg->op) {
    case RULES_INSERT:
        if (!(t->uses & USES_OLD))
            render_one(ev, ri, t, kind, /* any_old= */ false);
        break;
    case RULES_DELETE:
        if (!(t->uses & USES_NEW))
            render_one(ev, ri, t, kind, /* any_old= */ true);
        break;
    case RULES_UPDATE:
        if ((t->uses & USES_ANY) && !same_both_images(ev, ri, t))
            render_one(ev, ri, t, kind, /* any_old= */ true);
        render_one(ev, ri, t, kind, /* any_old= */ false);
        break;
    default:
        render_one(ev, ri, t, kind, /* any_old= */ false);
        break;
    }
}

/* Does the change carry every column's new value (no unchanged TOAST)? */
static bool row_complete(const RulesChange *chg)
{
    if (chg->new_vals == NULL)
        return false;
    for (size_t i = 0; i < chg->ncols; i++)
        if (chg->colnames[i] != NULL && chg->new_vals[i].kind == RULES_VAL_MISSING)
            return false;
    return true;
}

/* Refresh entry t of rule ri: store the new row in the key (insert,
 * update), or delete the key as a key template would (delete, truncate, a
 * row lacking a value). An update that moves the key deletes the old one. */
static void render_refresh(Eval *ev, size_t ri, size_t t)
{
    const Refresh *rf = &ev->r->rules[ri].refresh[t];
    Scratch *sc = ev->sc;
    size_t first = sc->nitems;

    if (ev->chg->op == RULES_TRUNCATE || ev->chg->op == RULES_DELETE || !row_complete(ev->chg)) {
        sc->refresh_deletes += ev->chg->op == RULES_INSERT || ev->chg->op == RULES_UPDATE;
        render_template(ev, ri, &rf->key, TPL_KEY);
        return;
    }
    render_one(ev, ri, &rf->key, TPL_REFRESH, /* any_old= */ false);
    for (size_t i = first; i < sc->nitems; i++)
        sc->items[i].aux = t;
    if (ev->chg->op != RULES_UPDATE || !(rf->key.uses & USES_ANY) || sc->nitems == first)
        return;
    render_one(ev, ri, &rf->key, TPL_KEY, /* any_old= */ true);
    if (sc->nitems == first + 2) {
        const Item *a = &sc->items[first], *b = &sc->items[first + 1];
        if (a->len == b->len &&
            memcmp(sc->strs.data + a->off, sc->strs.data + b->off, a->len) == 0) {
            sc->strs.len = b->off; /* same key: storing it is enough */
            sc->nitems--;
        }
    }
}

/* ---- evaluation: dedup set over items --------------------------------------------- */

static void set_clear(Scratch *sc)
{
    size_t need = 16;

    while (need < sc->nitems * 2)
        need *= 2;
    if (need > sc->setcap) {
        free(sc->set);
        sc->set = xcalloc(need, sizeof *sc->set);
        sc->setcap = need;
        sc->gen = 0;
    }
    if (++sc->gen == 0) { /* wrapped: really clear */
        memset(sc->set, 0, sc->setcap * sizeof *sc->set);
        sc->gen = 1;
    }
}

/* Add item i; false when an equal (action, string) is already in. */
static bool set_add(Scratch *sc, size_t i)
{
    const Item *it = &sc->items[i];
    const char *s = sc->strs.data + it->off;
    size_t mask = sc->setcap - 1;
    size_t h = (size_t)hash_bytes(s, it->len, HASH_SEED ^ (uint64_t)it->action) & mask;

    for (;; h = (h + 1) & mask) {
        Slot *sl = &sc->set[h];
        if (sl->gen != sc->gen) {
            sl->gen = sc->gen;
            sl->item = i;
            return true;
        }
        const Item *o = &sc->items[sl->item];
        if (o->action == it->action && o->len == it->len &&
            memcmp(sc->strs.data + o->off, s, it->len) == 0)
            return false;
    }
}

/* Up to this many items a change's renderings are deduplicated by comparing
 * each with the ones before it: cheaper than hashing every string for the
 * two or three keys a change usually renders. */
#define DEDUP_LINEAR_MAX 16

/* Is item i a repeat of an earlier item (same action, same string)? Equal
 * actions share a phase, so an earlier index is the one emitted first. */
static bool seen_before(const Scratch *sc, size_t i)
{
    const Item *it = &sc->items[i];
    const char *s = sc->strs.data + it->off;

    for (size_t j = 0; j < i; j++) {
        const Item *o = &sc->items[j];
        if (o->action == it->action && o->len == it->len &&
            bytes_equal(sc->strs.data + o->off, s, it->len))
            return true;
    }
    return false;
}

/* ---- evaluation: publish payloads ------------------------------------------------ */

/* Length of the UTF-8 sequence that lead byte c starts; 0 if c cannot
 * start one. */
static size_t utf8_seq_len(unsigned char c)
{
    if (c < 0x80)
        return 1;
    if (c >= 0xC2 && c < 0xE0)
        return 2;
    if (c >= 0xE0 && c < 0xF0)
        return 3;
    if (c >= 0xF0 && c < 0xF5)
        return 4;
    return 0;
}

/* Append s as a JSON string: quotes, backslashes and control characters
 * escaped; bytes that are not valid UTF-8 become U+FFFD so the payload is
 * always valid JSON (values are the database's text, normally UTF-8). */
static void json_str(Buf *b, const char *s, size_t n)
{
    buf_puts(b, "\"");
    for (size_t i = 0; i < n;) {
        unsigned char c = (unsigned char)s[i];
        size_t need = utf8_seq_len(c), k = 1;
        while (k < need && i + k < n && ((unsigned char)s[i + k] & 0xC0) == 0x80)
            k++;
        if (need == 0 || k < need) {
            buf_puts(b, "\\ufffd");
            i += k;
        } else if (c == '"' || c == '\\') {
            char esc[2] = {'\\', (char)c};
            buf_put(b, esc, 2);
            i++;
        } else if (c < 0x20) {
            char esc[8];
            snprintf(esc, sizeof esc, "\\u%04x", c);
            buf_puts(b, esc);
            i++;
        } else {
            buf_put(b, s + i, need);
            i += need;
        }
    }
    buf_puts(b, "\"");
}

static bool rule_publishes(const Rule *rule, size_t ch)
{
    for (size_t i = 0; i < rule->nchannels; i++)
        if (rule->channels[i] == ch)
            return true;
    return false;
}

/* Append ,"name":[...] with the distinct items of one action from rules
 * publishing to ch. When omit_empty, nothing is appended for no items. */
static void payload_list(Eval *ev, size_t ch, const char *name, RulesInvAction action,
                         bool omit_empty)
{
    Scratch *sc = ev->sc;
    Buf *b = &sc->payload;
    size_t mark = b->len, count = 0;

    set_clear(sc);
    buf_puts(b, ",\"");
    buf_puts(b, name);
    buf_puts(b, "\":[");
    for (size_t i = 0; i < sc->nitems; i++) {
        const Item *it = &sc->items[i];
        if (it->action != action || !rule_publishes(&ev->r->rules[it->rule], ch) || !set_add(sc, i))
            continue;
        if (count++ > 0)
            buf_puts(b, ",");
        json_str(b, sc->strs.data + it->off + it->skip, it->len - it->skip);
    }
    buf_puts(b, "]");
    if (omit_empty && count == 0) {
        b->len = mark;
        b->data[mark] = '\0';
    }
}

static void opt_str(Buf *b, const char *s)
{
    if (s == NULL)
        buf_puts(b, "null");
    else
        json_str(b, s, strlen(s));
}

static void build_payload(Eval *ev, size_t ch)
{
    static const char *const opname[] = {"insert", "update", "delete", "truncate"};
    const RulesChange *chg = ev->chg;
    Buf *b = &ev->sc->payload;
    char xid[32], lsn[LSN_TEXT_MAX], when[PGTIME_TEXT_MAX];
    int op = chg->op == RULES_INSERT   ? 0
             : chg->op == RULES_UPDATE ? 1
             : chg->op == RULES_DELETE ? 2
                                       : 3;

    b->len = 0;
    buf_puts(b, "{\"table\":");
    json_str(b, chg->table, strlen(chg->table));
    buf_puts(b, ",\"op\":\"");
    buf_puts(b, opname[op]);
    buf_puts(b, "\"");
    payload_list(ev, ch, "keys", RULES_INV_KEY, /* omit_empty= */ false);
    payload_list(ev, ch, "patterns", RULES_INV_PATTERN, /* omit_empty= */ false);
    payload_list(ev, ch, "tags", RULES_INV_TAG, /* omit_empty= */ false);
    payload_list(ev, ch, "tag_patterns", RULES_INV_TAG_PATTERN, /* omit_empty= */ true);
    buf_puts(b, ",\"lsn\":");
    opt_str(b, rules_change_lsn(chg, lsn));
    snprintf(xid, sizeof xid, ",\"xid\":%lu", (unsigned long)chg->xid);
    buf_puts(b, xid);
    buf_puts(b, ",\"commit_time\":");
    opt_str(b, rules_change_time(chg, when));
    buf_puts(b, "}");
}

/* ---- evaluation: refresh and stale payloads (see rules.h) ------------------------ */

/* The new row as a JSON object: column -> PostgreSQL's text, or null. */
static void row_json(Buf *b, const RulesChange *chg)
{
    bool first = true;

    buf_puts(b, "{");
    for (size_t i = 0; i < chg->ncols; i++) {
        const RulesValue *v = &chg->new_vals[i];
        if (chg->colnames[i] == NULL)
            continue;
        if (!first)
            buf_puts(b, ",");
        first = false;
        json_str(b, chg->colnames[i], strlen(chg->colnames[i]));
        buf_puts(b, ":");
        if (v->kind == RULES_VAL_TEXT)
            json_str(b, v->data, v->len);
        else
            buf_puts(b, "null");
    }
    buf_puts(b, "}");
}

static void refresh_payload(Eval *ev, const Item *it)
{
    const Rule *rule = &ev->r->rules[it->rule];
    Buf *b = &ev->sc->payload;
    char num[32], lsn[LSN_TEXT_MAX];
    const char *lsn_text;

    b->len = 0;
    if (it->action == RULES_INV_STALE) {
        snprintf(num, sizeof num, "%ld", rule->stale_grace);
        buf_put(b, "stale\0\0", 7);
        buf_put(b, num, strlen(num) + 1);
        return;
    }
    snprintf(num, sizeof num, "%ld", rule->refresh[it->aux].ttl);
    buf_put(b, rule->refresh[it->aux].hash ? "hash" : "json", 5);
    lsn_text = rules_change_lsn(ev->chg, lsn);
    if (lsn_text == NULL)
        lsn_text = "0/0";
    buf_put(b, lsn_text, strlen(lsn_text) + 1);
    buf_put(b, num, strlen(num) + 1);
    row_json(b, ev->chg);
}

/* ---- evaluation: entry point ----------------------------------------------------- */

static void emit_items(Eval *ev, RulesEmitFn emit, void *arg, RulesEvalStats *st)
{
    Scratch *sc = ev->sc;
    bool linear = sc->nitems <= DEDUP_LINEAR_MAX;

    if (!linear)
        set_clear(sc);
    for (unsigned phase = 0; phase < 5; phase++) {
        for (size_t i = 0; i < sc->nitems; i++) {
            const Item *it = &sc->items[i];
            if (it->phase != phase || (linear ? seen_before(sc, i) : !set_add(sc, i)))
                continue;
            if (phase == 4) {
                refresh_payload(ev, it);
                emit(arg, it->action, sc->strs.data + it->off, it->len, sc->payload.data,
                     sc->payload.len);
            } else {
                emit(arg, it->action, sc->strs.data + it->off, it->len, NULL, 0);
            }
            st->emitted++;
            st->widened += it->widened;
            st->refreshes += it->action == RULES_INV_REFRESH;
            st->stales += it->action == RULES_INV_STALE;
        }
    }
}

static void emit_publishes(Eval *ev, RulesEmitFn emit, void *arg, RulesEvalStats *st)
{
    Scratch *sc = ev->sc;

    sc->nchans = 0;
    for (size_t f = 0; f < sc->nfired; f++) {
        const Rule *rule = &ev->r->rules[sc->fired[f]];
        for (size_t c = 0; c < rule->nchannels; c++) {
            size_t k = 0;
            while (k < sc->nchans && sc->chans[k] != rule->channels[c])
                k++;
            if (k == sc->nchans)
                sc->chans[sc->nchans++] = rule->channels[c];
        }
    }
    for (size_t k = 0; k < sc->nchans; k++) {
        const char *name = ev->r->channels[sc->chans[k]];
        build_payload(ev, sc->chans[k]);
        emit(arg, RULES_INV_PUBLISH, name, strlen(name), sc->payload.data, sc->payload.len);
        st->emitted++;
    }
}

/* Does the rule fire on the change's event? A partition_row insert or
 * delete may be half of an update that moved the row (rules.h). */
static bool fires_on(unsigned on, const RulesChange *chg)
{
    return (on & chg->op) || (chg->partition_row && (on & RULES_UPDATE) &&
                              (chg->op == RULES_INSERT || chg->op == RULES_DELETE));
}

static bool valid_op(RulesOp op)
{
    return op == RULES_INSERT || op == RULES_UPDATE || op == RULES_DELETE || op == RULES_TRUNCATE;
}

/* rules_table_find() for the streaming thread, remembering recent tables
 * with rules by the address of the change's name (Scratch.recent, one slot
 * per address hash): a string comparison instead of hashing the name for
 * every change, also when a transaction's changes alternate between tables
 * (pgbench's three). The comparison guards against an address reused for
 * another name. */
static const TableEnt *table_of(const Rules *r, const char *name)
{
    Scratch *sc = r->scratch;
    RecentTable *rt;
    const TableEnt *te;

    if (name == NULL)
        return NULL;
    rt = &sc->recent[((uintptr_t)name >> 4) % RULES_RECENT_TABLES];
    if (name == rt->name && strcmp(rt->te->name, name) == 0)
        return rt->te;
    te = rules_table_find(r, name);
    if (te != NULL)
        *rt = (RecentTable){name, te};
    return te;
}

/* te's i-th rule against the change: render what it names when it fires. */
static void eval_rule(Eval *ev, const TableEnt *te, size_t i, ChangedCols *cols, RulesEvalStats *st)
{
    const RulesChange *chg = ev->chg;
    unsigned on = te->ons[i];
    size_t ri;
    const Rule *rule;

    if (!fires_on(on, chg) || ((on & TABLE_ON_LOOKUP) && chg->op != RULES_TRUNCATE))
        return; /* lookups: rules_eval_lookups(); a truncate widens without one */
    ri = te->rules[i];
    rule = &ev->r->rules[ri];
    if (chg->op == RULES_UPDATE && (on & TABLE_ON_FILTER)) {
        bool missing = false;
        if (!filter_passes(te, i, rule, chg, cols, &missing))
            return;
        st->changed_missing += missing;
    }
    resolve_cols(rule, chg);
    ev->sc->fired[ev->sc->nfired++] = ri;
    for (int k = 0; k < TPL_NKINDS; k++)
        for (size_t t = 0; t < rule->ntpl[k]; t++)
            render_template(ev, ri, &rule->tpl[k][t], k);
    for (size_t t = 0; t < rule->nrefresh; t++)
        render_refresh(ev, ri, t);
    for (size_t t = 0; t < rule->nstale; t++)
        render_template(ev, ri, &rule->stale[t], TPL_STALE);
}

/* An update of a table with filter bitmaps: only the rules without a
 * filter and those naming a column that changed (or that the table lacks)
 * can fire; the others are not looked at. In the rules' order, as
 * eval_rule() over every rule would give. */
static void eval_update(Eval *ev, const TableEnt *te, ChangedCols *cols, RulesEvalStats *st)
{
    uint64_t *cand = ev->sc->cand, hit;

    changed_columns(te, ev->chg, &cols->changed, &cols->missing);
    cols->found = true;
    hit = cols->changed | cols->missing;
    memcpy(cand, te->unfiltered, te->nwords * sizeof *cand);
    for (; hit != 0; hit &= hit - 1) {
        const uint64_t *row = te->colrules + (size_t)__builtin_ctzll(hit) * te->nwords;
        for (size_t w = 0; w < te->nwords; w++)
            cand[w] |= row[w];
    }
    for (size_t w = 0; w < te->nwords; w++)
        for (uint64_t bits = cand[w]; bits != 0; bits &= bits - 1)
            eval_rule(ev, te, w * 64 + (size_t)__builtin_ctzll(bits), cols, st);
}

unsigned rules_eval(const Rules *r, const RulesChange *chg, RulesEmitFn emit, void *arg,
                    RulesEvalStats *stats)
{
    const TableEnt *te = table_of(r, chg->table);
    RulesEvalStats st = {0};
    Eval ev = {r, chg, NULL, NULL};
    ChangedCols cols = {0};

    if (te == NULL || !valid_op(chg->op))
        return 0;
    ev.sc = r->scratch;
    ev.sc->strs.len = 0;
    ev.sc->nitems = 0;
    ev.sc->nfired = 0;
    ev.sc->refresh_deletes = 0;
    if (chg->op == RULES_UPDATE && te->chmask != NULL)
        eval_update(&ev, te, &cols, &st);
    else
        for (size_t i = 0; i < te->nrules; i++)
            eval_rule(&ev, te, i, &cols, &st);
    emit_items(&ev, emit, arg, &st);
    emit_publishes(&ev, emit, arg, &st);
    st.matched = (unsigned)ev.sc->nfired;
    st.refresh_deletes = ev.sc->refresh_deletes;
    st.examined = (unsigned)te->nrules;
    if (stats != NULL) {
        stats->examined += st.examined;
        stats->matched += st.matched;
        stats->widened += st.widened;
        stats->emitted += st.emitted;
        stats->changed_missing += st.changed_missing;
        stats->refreshes += st.refreshes;
        stats->refresh_deletes += st.refresh_deletes;
        stats->stales += st.stales;
    }
    return st.matched;
}

/* ---- lookups: arguments and rendering result rows --------------------------------- */

/* Render the lookup's arguments from one image into b (each value followed
 * by a NUL) with their lengths in lens. Returns 1 when rendered, 0 when a
 * value is NULL or an image the template needs does not exist (no call),
 * -1 when a value is not carried (the lookup cannot run: widen). */
static int render_args(const Eval *ev, const Rule *rule, bool any_old, Buf *b, size_t *lens)
{
    const Lookup *lk = rule->lookup;
    int rc = 1;

    b->len = 0;
    for (size_t a = 0; a < lk->nargs; a++) {
        const Template *t = &lk->args[a];
        size_t start = b->len;
        if ((ev->chg->op == RULES_INSERT && (t->uses & USES_OLD)) ||
            (ev->chg->op == RULES_DELETE && (t->uses & USES_NEW)))
            return 0; /* as a template: no such image, nothing to look up */
        for (size_t i = 0; i < t->nsegs; i++) {
            const Seg *s = &t->segs[i];
            const RulesValue *v = s->kind == SEG_LIT ? NULL : seg_value(ev, rule, s, any_old);
            if (v == NULL)
                buf_put(b, s->text, s->len);
            else if (v->kind == RULES_VAL_NULL)
                return 0;
            else if (v->kind == RULES_VAL_MISSING)
                rc = -1;
            else
                buf_put(b, v->data, v->len);
        }
        lens[a] = b->len - start;
        buf_put(b, "", 0);
        b->len++;
    }
    return rc;
}

/* Hand one call to fn: arguments in b/lens (unknown when rc < 0), the
 * rule's columns from both images. */
static void lookup_call(const Eval *ev, size_t ri, const Buf *b, const size_t *lens, int rc,
                        RulesLookupCallFn fn, void *arg)
{
    const Rule *rule = &ev->r->rules[ri];
    size_t n = rule->lookup->nargs, off = 0;
    const char **args = xcalloc(n + 1, sizeof *args);
    RulesValue *vals = xcalloc(2 * rule->ncols + 1, sizeof *vals);
    RulesLookupCall call = {ri, ev->chg->op, n, args, lens, rule->ncols, NULL, NULL, rc < 0};

    for (size_t a = 0; a < n; a++) {
        args[a] = b->data + off;
        off += lens[a] + 1;
    }
    for (size_t k = 0; k < rule->ncols; k++) {
        vals[k] = *col_value(rule, ev->chg, k, /* use_old= */ true);
        vals[rule->ncols + k] = *col_value(rule, ev->chg, k, /* use_old= */ false);
    }
    call.old_vals = ev->chg->old_vals != NULL ? vals : NULL;
    call.new_vals = ev->chg->new_vals != NULL ? vals + rule->ncols : NULL;
    fn(arg, &call);
    free(vals);
    free(args);
}

/* The calls one lookup rule makes for the change: one per distinct
 * argument tuple among the images the event has. */
static void lookup_rule_calls(const Eval *ev, size_t ri, RulesLookupCallFn fn, void *arg)
{
    const Rule *rule = &ev->r->rules[ri];
    size_t n = rule->lookup->nargs;
    bool any = false;
    Buf b[2] = {{0}, {0}};
    size_t *lens = xcalloc(2 * n + 1, sizeof *lens);
    int rc[2] = {0, 0};

    for (size_t a = 0; a < n; a++)
        any = any || (rule->lookup->args[a].uses & USES_ANY);
    if (ev->chg->op == RULES_DELETE || (ev->chg->op == RULES_UPDATE && any))
        rc[0] = render_args(ev, rule, /* any_old= */ true, &b[0], lens);
    if (ev->chg->op != RULES_DELETE)
        rc[1] = render_args(ev, rule, /* any_old= */ false, &b[1], lens + n);
    if (rc[0] != 0 && rc[1] != 0 && rc[0] == rc[1] && b[0].len == b[1].len &&
        (b[0].len == 0 || memcmp(b[0].data, b[1].data, b[0].len) == 0))
        rc[0] = 0; /* the same arguments from both images: one call */
    for (int i = 0; i < 2; i++)
        if (rc[i] != 0)
            lookup_call(ev, ri, &b[i], lens + (size_t)i * n, rc[i], fn, arg);
    free(b[0].data);
    free(b[1].data);
    free(lens);
}

unsigned rules_eval_lookups(const Rules *r, const RulesChange *chg, RulesLookupCallFn fn, void *arg)
{
    const TableEnt *te = rules_table_find(r, chg->table);
    Eval ev = {r, chg, NULL, NULL};
    unsigned fired = 0;
    ChangedCols cols = {0};

    if (te == NULL || !(chg->op & ROW_OPS))
        return 0;
    for (size_t i = 0; i < te->nrules; i++) {
        unsigned on = te->ons[i];
        if (!(on & TABLE_ON_LOOKUP) || !fires_on(on, chg))
            continue;
        size_t ri = te->rules[i];
        const Rule *rule = &r->rules[ri];
        if (chg->op == RULES_UPDATE && (on & TABLE_ON_FILTER)) {
            bool missing = false; /* counted by rules_eval() for the same change */
            if (!filter_passes(te, i, rule, chg, &cols, &missing))
                continue;
        }
        resolve_cols(rule, chg);
        fired++;
        lookup_rule_calls(&ev, ri, fn, arg);
    }
    return fired;
}

void rules_render_lookup(const Rules *r, const RulesLookupCall *call, size_t nfields,
                         const char *const *fields, const RulesValue *row, RulesEmitFn emit,
                         void *arg, RulesEvalStats *stats)
{
    const Rule *rule = &r->rules[call->rule];
    const RulesValue **lk = xcalloc(rule->ncols + 1, sizeof *lk);
    RulesChange fake = {.table = rule->table,
                        .op = call->op,
                        .ncols = rule->ncols,
                        .colnames = (const char *const *)rule->cols,
                        .old_vals = call->old_vals,
                        .new_vals = call->new_vals};
    Eval ev = {r, &fake, r->scratch, NULL};
    RulesEvalStats st = {0};

    for (size_t k = 0; k < rule->ncols; k++)
        for (size_t j = 0; j < nfields && lk[k] == NULL; j++)
            if (fields[j] != NULL && strcmp(fields[j], rule->cols[k]) == 0)
                lk[k] = row == NULL ? &missing_value : &row[j];
    ev.lk = lk;
    ev.sc->strs.len = 0;
    ev.sc->nitems = 0;
    ev.sc->nfired = 0;
    resolve_cols(rule, &fake);
    for (int k = 0; k < TPL_NKINDS; k++)
        for (size_t t = 0; t < rule->ntpl[k]; t++)
            render_template(&ev, call->rule, &rule->tpl[k][t], k);
    emit_items(&ev, emit, arg, &st);
    free(lk);
    if (stats != NULL) {
        stats->matched += 1;
        stats->widened += st.widened;
        stats->emitted += st.emitted;
    }
}

/* ---- checking against the live catalog -------------------------------------------- */

/* A table or publication name as SQL: quoted parts when not plain lowercase. */
static void sql_name(char *out, size_t n, const char *name)
{
    size_t o = 0;
    bool start = true;

    for (const char *p = name; o + 1 < n; p++) {
        const char *end = strchr(p, '.');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        bool plain = len > 0 && !(p[0] >= '0' && p[0] <= '9');
        for (size_t i = 0; i < len; i++)
            plain = plain && ((p[i] >= 'a' && p[i] <= 'z') || (p[i] >= '0' && p[i] <= '9') ||
                              p[i] == '_' || p[i] == '$');
        if (!start && o + 1 < n)
            out[o++] = '.';
        start = false;
        if (!plain && o + 1 < n)
            out[o++] = '"';
        for (size_t i = 0; i < len && o + 2 < n; i++) {
            if (!plain && p[i] == '"')
                out[o++] = '"';
            out[o++] = p[i];
        }
        if (!plain && o + 1 < n)
            out[o++] = '"';
        if (end == NULL)
            break;
        p = end;
    }
    out[o] = '\0';
}

/* The table's name as SQL: the catalog's quote_ident form when known. */
static void table_sql(const RulesTableInfo *info, const char *table, char *out, size_t n)
{
    if (info != NULL && info->sql_name != NULL)
        snprintf(out, n, "%s", info->sql_name);
    else
        sql_name(out, n, table);
}

/* "PREFIX a SUFFIX; PREFIX b SUFFIX" (sep "; ") or "PREFIX a, b SUFFIX" (sep
 * ", "), whole or not at all: false when it does not fit. */
static bool sql_list(char *out, size_t n, const char *prefix, const char *const *names,
                     size_t count, const char *sep, const char *suffix)
{
    bool each = strcmp(sep, "; ") == 0;
    size_t o = 0;
    int w;

    out[0] = '\0';
    for (size_t i = 0; i < count; i++) {
        w = snprintf(out + o, n - o, "%s%s%s%s", i == 0 ? "" : sep, i == 0 || each ? prefix : "",
                     names[i], each || i + 1 == count ? suffix : "");
        if (w < 0 || (size_t)w >= n - o)
            return false;
        o += (size_t)w;
    }
    return true;
}

/* The statement(s) that give every table holding the rows REPLICA
 * IDENTITY FULL (each partition or child has its own; setting it on a
 * partitioned table does not reach its partitions). */
static void identity_fix(const RulesTableInfo *info, const char *table, char *out, size_t n)
{
    char t[200];

    if (info->nnot_full > 0 && sql_list(out, n, "ALTER TABLE ", info->not_full, info->nnot_full,
                                        "; ", " REPLICA IDENTITY FULL"))
        return;
    table_sql(info, table, t, sizeof t);
    if (info->nnot_full > 1)
        snprintf(out, n,
                 "walbust setup --replica-identity-full (it sets REPLICA IDENTITY FULL on "
                 "each of the %zu tables holding the rows of %s)",
                 info->nnot_full, t);
    else
        snprintf(out, n, "ALTER TABLE %s REPLICA IDENTITY FULL", t);
}

static long info_col(const RulesTableInfo *info, const char *name)
{
    for (size_t i = 0; i < info->ncols; i++)
        if (info->colnames[i] != NULL && strcmp(info->colnames[i], name) == 0)
            return (long)i;
    return -1;
}

static bool old_value_sent(const RulesTableInfo *info, long col)
{
    if (info->replident == 'f')
        return true;
    if (info->replident == 'n')
        return false;
    return info->identity != NULL && info->identity[col];
}

/* Why the old value is not sent: the replica identity, in words. */
static void identity_words(const RulesTableInfo *info, const char *t, char *out, size_t n)
{
    bool any = false;

    for (size_t i = 0; info->identity != NULL && i < info->ncols; i++)
        any = any || info->identity[i];
    if (info->replident == 'n')
        snprintf(out, n, "%s has REPLICA IDENTITY NOTHING, which sends no old values", t);
    else if (info->replident == 'i')
        snprintf(out, n,
                 "%s has REPLICA IDENTITY USING INDEX, which only sends the index's "
                 "columns",
                 t);
    else if (!any)
        snprintf(out, n,
                 "%s has REPLICA IDENTITY DEFAULT and no primary key, so no old values "
                 "are sent",
                 t);
    else
        snprintf(out, n, "%s has REPLICA IDENTITY DEFAULT, which only sends key columns", t);
}

static size_t identity_problem(const Rule *rule, const Template *t, const char *col,
                               const RulesTableInfo *info, RulesProblems *problems)
{
    unsigned od = rule->on & (RULES_UPDATE | RULES_DELETE);
    char why[192], sql[640], alt[160] = "";

    identity_words(info, rule->table, why, sizeof why);
    identity_fix(info, rule->table, sql, sizeof sql);
    if (rule->on & (RULES_INSERT | RULES_UPDATE))
        snprintf(alt, sizeof alt, "; or write {new.%s} if only the new value matters", col);
    rules_problem_at(problems, &t->loc,
                     "rule for %s: template \"%s\" needs the old value of column \"%s\" on %s, but "
                     "%s; run %s%s",
                     rule->table, t->src, col,
                     od == (RULES_UPDATE | RULES_DELETE) ? "update/delete"
                     : od == RULES_UPDATE                ? "update"
                                                         : "delete",
                     why, sql, alt);
    return 1;
}

/* "; did you mean \"x\"?" for a column the table lacks, or "". */
static void col_hint(const RulesTableInfo *info, const char *col, char *out, size_t n)
{
    const char *g = rules_closest_name(col, info->colnames, info->ncols);

    if (g != NULL)
        snprintf(out, n, " (did you mean \"%s\"?)", g);
    else
        out[0] = '\0';
}

/* Unknown columns and old values that will not arrive, for one template. */
static size_t check_template(const Rule *rule, const Template *t, const RulesTableInfo *info,
                             bool lookup_tpl, bool *done, RulesProblems *problems)
{
    bool needs_old = (rule->on & (RULES_UPDATE | RULES_DELETE)) != 0;
    size_t added = 0;

    memset(done, 0, rule->ncols * sizeof *done);
    for (size_t i = 0; i < t->nsegs; i++) {
        const Seg *s = &t->segs[i];
        long col;
        if (s->kind == SEG_LIT || done[s->col])
            continue;
        done[s->col] = true;
        col = info_col(info, s->text);
        if (col < 0 && s->kind == SEG_ANY && lookup_tpl)
            continue; /* a lookup result column: rules_check_lookup() */
        if (col < 0) {
            char hint[160];
            col_hint(info, s->text, hint, sizeof hint);
            rules_problem_at(problems, &t->loc,
                             "rule for %s: column \"%s\" in template \"%s\" does not exist in %s%s",
                             rule->table, s->text, t->src, rule->table, hint);
            added++;
        } else if (needs_old && s->kind != SEG_NEW && !old_value_sent(info, col)) {
            added += identity_problem(rule, t, s->text, info, problems);
        }
    }
    return added;
}

/* See rules.h. */
unsigned rules_table_ops(const Rules *r, const char *table)
{
    const TableEnt *te = rules_table_find(r, table);
    unsigned ops = 0;

    for (size_t i = 0; te != NULL && i < te->nrules; i++)
        ops |= r->rules[te->rules[i]].on;
    return ops;
}

static void ops_words(unsigned ops, char *out, size_t n)
{
    static const char *const names[] = {"insert", "update", "delete", "truncate"};
    size_t o = 0;

    out[0] = '\0';
    for (int i = 0; i < 4; i++)
        if (ops & (1u << i))
            o += (size_t)snprintf(out + o, n - o, "%s%s", o ? ", " : "", names[i]);
}

/* Partitions or inheritance children whose changes are not published. */
static size_t unpublished_problem(const Rule *rule, const char *publication, const char *pub,
                                  const RulesTableInfo *info, RulesProblems *problems)
{
    char list[640];

    if (!sql_list(list, sizeof list, "", info->unpublished, info->nunpublished, ", ", ""))
        snprintf(list, sizeof list, "%s ... (%zu tables; walbust setup adds them all)",
                 info->unpublished[0], info->nunpublished);
    rules_problem_at(problems, &rule->table_loc,
                     "table %s has inheritance children that are not in publication \"%s\", so "
                     "changes to their rows (which queries on %s return) are never seen; run "
                     "ALTER PUBLICATION %s ADD TABLE %s (or walbust setup)",
                     rule->table, publication, rule->table, pub, list);
    return 1;
}

/* Is the table published, with its partitions and children, for every
 * operation its rules fire on, in a form walbust can match? */
static size_t check_publication(const Rules *r, const Rule *rule, const char *publication,
                                const RulesTableInfo *info, RulesProblems *problems)
{
    char sqlt[200], sqlp[160], need[64], have[64];
    unsigned ops = rules_table_ops(r, rule->table);

    table_sql(info, rule->table, sqlt, sizeof sqlt);
    sql_name(sqlp, sizeof sqlp, publication);
    if (!info->in_publication) {
        rules_problem_at(problems, &rule->table_loc,
                         "table %s is not in publication \"%s\"; run ALTER PUBLICATION %s ADD "
                         "TABLE %s (or walbust setup)",
                         rule->table, publication, sqlp, sqlt);
        return 1;
    }
    if (info->via_root) {
        rules_problem_at(
            problems, &rule->table_loc,
            "publication \"%s\" has publish_via_partition_root = true, so the changes of %s%s "
            "are published as the partitioned root: a TRUNCATE of one partition is not published "
            "at all and rules naming a partition never match; run ALTER PUBLICATION %s SET "
            "(publish_via_partition_root = false)",
            publication, info->relkind == 'p' ? "the partitions of " : "", rule->table, sqlp);
        return 1;
    }
    if (info->nunpublished > 0)
        return unpublished_problem(rule, publication, sqlp, info, problems);
    if (info->pub_ops != 0 && (ops & ~info->pub_ops) != 0) {
        const char *src = info->ops_publication ? info->ops_publication : publication;
        char sqls[160];
        ops_words(ops & ~info->pub_ops, need, sizeof need);
        ops_words(info->pub_ops, have, sizeof have);
        sql_name(sqls, sizeof sqls, src);
        if (strcmp(src, publication) == 0)
            rules_problem_at(problems, &rule->table_loc,
                             "rules for %s fire on %s, but publication \"%s\" publishes only %s; "
                             "run ALTER PUBLICATION %s SET (publish = 'insert, update, delete, "
                             "truncate')",
                             rule->table, need, src, have, sqls);
        else
            rules_problem_at(problems, &rule->table_loc,
                             "rules for %s fire on %s, but it is published by \"%s\", which "
                             "publishes only %s; run ALTER PUBLICATION %s DROP TABLE %s; ALTER "
                             "PUBLICATION %s ADD TABLE %s (updates and deletes need a replica "
                             "identity: a primary key or REPLICA IDENTITY FULL)",
                             rule->table, need, src, have, sqls, sqlt, sqlp, sqlt);
        return 1;
    }
    return 0;
}

static size_t check_rule(const Rules *r, size_t ri, const char *publication,
                         const RulesTableInfo *info, RulesProblems *problems)
{
    const Rule *rule = &r->rules[ri];
    bool first = rules_table_find(r, rule->table)->rules[0] == ri;
    bool *done = xcalloc(rule->ncols, sizeof *done);
    size_t added = 0;

    if (first)
        added += check_publication(r, rule, publication, info, problems);
    for (size_t i = 0; i < rule->nchanged; i++) {
        const char *col = rule->cols[rule->changed[i]];
        char hint[160];
        if (info_col(info, col) >= 0)
            continue;
        col_hint(info, col, hint, sizeof hint);
        rules_problem_at(problems, &rule->changed_loc[i],
                         "rule for %s: column \"%s\" in \"changed\" does not exist in %s%s",
                         rule->table, col, rule->table, hint);
        added++;
    }
    for (int k = 0; k < TPL_NKINDS; k++)
        for (size_t i = 0; i < rule->ntpl[k]; i++)
            added +=
                check_template(rule, &rule->tpl[k][i], info, rule->lookup != NULL, done, problems);
    for (size_t i = 0; rule->lookup != NULL && i < rule->lookup->nargs; i++)
        added += check_template(rule, &rule->lookup->args[i], info, false, done, problems);
    for (size_t i = 0; i < rule->nrefresh; i++)
        added += check_template(rule, &rule->refresh[i].key, info, false, done, problems);
    for (size_t i = 0; i < rule->nstale; i++)
        added += check_template(rule, &rule->stale[i], info, false, done, problems);
    free(done);
    return added;
}

size_t rules_check_catalog(const Rules *r, const char *publication, RulesLookupFn lookup, void *arg,
                           RulesProblems *problems)
{
    size_t added = 0;

    if (r == NULL)
        return 0;
    if (publication == NULL)
        publication = "walbust";
    for (size_t i = 0; i < r->nrules; i++) {
        const Rule *rule = &r->rules[i];
        const RulesTableInfo *info = lookup(arg, rule->table);
        if (info == NULL || !info->exists) {
            if (info != NULL && info->suggestion != NULL)
                rules_problem_at(problems, &rule->table_loc,
                                 "table %s does not exist (did you mean %s?); names must match "
                                 "the catalog exactly, and unquoted SQL names are lowercase",
                                 rule->table, info->suggestion);
            else
                rules_problem_at(
                    problems, &rule->table_loc,
                    "table %s does not exist; check \"table\" (names must match the catalog "
                    "exactly, and unquoted SQL names are lowercase)",
                    rule->table);
            added++;
            continue;
        }
        added += check_rule(r, i, publication, info, problems);
    }
    return added;
}

/* ---- checking a lookup against what PostgreSQL says about it ------------------------ */

static bool has_field(const RulesLookupShape *sh, const char *name)
{
    for (size_t j = 0; j < sh->nfields; j++)
        if (sh->fields[j] != NULL && strcmp(sh->fields[j], name) == 0)
            return true;
    return false;
}

/* Bare placeholders of one template: a result column, or the table's, not both. */
static size_t check_lookup_template(const Rule *rule, const Template *t, const RulesLookupShape *sh,
                                    const RulesTableInfo *info, RulesProblems *problems)
{
    size_t added = 0;
    char cols[256];

    for (size_t i = 0; i < t->nsegs; i++) {
        const Seg *s = &t->segs[i];
        bool in_result, in_table;
        if (s->kind != SEG_ANY)
            continue;
        in_result = has_field(sh, s->text);
        in_table = info != NULL && info->exists && info_col(info, s->text) >= 0;
        if (in_result && in_table) {
            rules_problem_at(problems, &t->loc,
                             "rule for %s: {%s} in template \"%s\" is ambiguous: both the "
                             "lookup's result and %s have a column \"%s\" (the lookup's would "
                             "be used); rename it in the SQL (SELECT ... AS other_name) or "
                             "write {new.%s}/{old.%s} for the changed row's",
                             rule->table, s->text, t->src, rule->table, s->text, s->text, s->text);
            added++;
        } else if (!in_result && !in_table) {
            size_t o = 0;
            cols[0] = '\0';
            for (size_t j = 0; j < sh->nfields && o < sizeof cols; j++)
                o += (size_t)snprintf(cols + o, sizeof cols - o, "%s%s", j ? ", " : "",
                                      sh->fields[j]);
            rules_problem_at(problems, &t->loc,
                             "rule for %s: {%s} in template \"%s\" is neither a column of the "
                             "lookup's result (%s) nor of %s",
                             rule->table, s->text, t->src, sh->nfields ? cols : "no columns",
                             rule->table);
            added++;
        }
    }
    return added;
}

size_t rules_check_lookup(const Rules *r, size_t i, const RulesLookupShape *sh,
                          const RulesTableInfo *info, RulesProblems *problems,
                          RulesProblems *warnings)
{
    const Rule *rule;
    const Lookup *lk;
    size_t added = 0;

    if (r == NULL || i >= r->nrules || r->rules[i].lookup == NULL)
        return 0;
    rule = &r->rules[i];
    lk = rule->lookup;
    if (sh->error != NULL) {
        char at[64] = "";
        if (sh->error_pos > 0)
            snprintf(at, sizeof at, " (at character %d of the SQL)", sh->error_pos);
        rules_problem_at(problems, &lk->sql_loc,
                         "rule for %s: the lookup's SQL does not "
                         "prepare: %s%s",
                         rule->table, sh->error, at);
        return 1;
    }
    if (sh->nparams != (int)lk->nargs) {
        rules_problem_at(problems, &lk->loc,
                         "rule for %s: the lookup's SQL takes %d parameter%s but \"args\" has "
                         "%zu; give one argument template per parameter, in order",
                         rule->table, sh->nparams, sh->nparams == 1 ? "" : "s", lk->nargs);
        added++;
    }
    for (int k = 0; k < TPL_NKINDS; k++)
        for (size_t t = 0; t < rule->ntpl[k]; t++)
            added += check_lookup_template(rule, &rule->tpl[k][t], sh, info, problems);
    for (size_t t = 0; t < sh->ntables; t++) {
        if (rules_table_find(r, sh->tables[t]) != NULL)
            continue;
        rules_problem_at(
            warnings, &lk->loc,
            "warning: rule for %s: the lookup reads %s, which has no rule of its own: when "
            "a row there changes (a membership added or removed), nothing "
            "invalidates the keys derived through it; add a rule on %s for the "
            "same keys (e.g. keys rendered from its own columns)",
            rule->table, sh->tables[t], sh->tables[t]);
    }
    return added;
}
