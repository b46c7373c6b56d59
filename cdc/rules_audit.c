/*
 * rules_audit.c — audit declarations of the rules (see rules.h "audits",
 * docs/audit.md): accessors, the SCAN pattern of an audit key, reading a
 * key back into the audit's arguments, and the check --pg verdict on the
 * audit's SQL. Loading is in rules.c with the other rule fields.
 *
 * Reading a key back: the key template's segments are matched against the
 * key, each placeholder taking one or more bytes (a placeholder that occurs
 * twice must take the same bytes both times). Every way the key can be
 * split is counted, up to two: a key that splits in two ways would give
 * arguments that may belong to another row, so it is reported ambiguous and
 * never checked (a wrong row's value would look like a stale entry).
 *
 * The streaming thread matches every key it invalidates against the audit
 * keys (audit_run.c), sampled or not, so a key that cannot match is turned
 * away before any work (the template's leading and trailing literal text),
 * the match state of a template with few names lives on the stack, and a
 * caller that only asks whether a key matches gets no arguments rendered:
 * no allocation per key. Pure: no I/O, no logging.
 */
#include "rules.h"

#include "rules_int.h"

#include <stdlib.h>
#include <string.h>

static const Audit *audit_of(const Rules *r, size_t i)
{
    if (r == NULL || i >= r->nrules)
        return NULL;
    return r->rules[i].audit;
}

bool rules_audit_info(const Rules *r, size_t i, RulesAuditInfo *out)
{
    const Audit *au = audit_of(r, i);

    if (au == NULL)
        return false;
    *out = (RulesAuditInfo){r->rules[i].table, au->key.src,    au->q.sql,       au->q.nargs,
                            au->json,          au->q.loc.line, au->q.loc.column};
    return true;
}

bool rules_has_audits(const Rules *r)
{
    for (size_t i = 0; r != NULL && i < r->nrules; i++)
        if (r->rules[i].audit != NULL)
            return true;
    return false;
}

char *rules_audit_pattern(const Rules *r, size_t i)
{
    const Audit *au = audit_of(r, i);
    Buf b = {0};

    if (au == NULL)
        return NULL;
    buf_puts(&b, "");
    for (size_t k = 0; k < au->key.nsegs; k++) {
        const Seg *sg = &au->key.segs[k];
        if (sg->kind == SEG_LIT)
            buf_put_escaped(&b, sg->text, sg->len);
        else
            buf_puts(&b, "*");
    }
    return b.data;
}

/* Matching state: the values taken so far (per audit name) and the first
 * complete split found. Up to MATCH_STACK_NAMES names it lives on the
 * stack. */
#define MATCH_STACK_NAMES 8

typedef struct Match {
    const Template *t;
    const char *key;
    size_t len;
    size_t *start, *vlen; /* per name; vlen 0: not taken yet */
    size_t *first_start, *first_vlen;
    size_t nnames;
    int found; /* complete splits seen, counted up to 2 */
} Match;

static void match_from(Match *m, size_t seg, size_t pos)
{
    const Seg *sg;
    size_t end;

    if (m->found >= 2)
        return;
    if (seg == m->t->nsegs) {
        if (pos == m->len && m->found++ == 0) {
            memcpy(m->first_start, m->start, m->nnames * sizeof *m->start);
            memcpy(m->first_vlen, m->vlen, m->nnames * sizeof *m->vlen);
        }
        return;
    }
    sg = &m->t->segs[seg];
    if (sg->kind == SEG_LIT) {
        if (m->len - pos >= sg->len && memcmp(m->key + pos, sg->text, sg->len) == 0)
            match_from(m, seg + 1, pos + sg->len);
        return;
    }
    if (m->vlen[sg->col] > 0) { /* a repeated placeholder: the same bytes again */
        size_t n = m->vlen[sg->col];
        if (m->len - pos >= n && memcmp(m->key + pos, m->key + m->start[sg->col], n) == 0)
            match_from(m, seg + 1, pos + n);
        return;
    }
    /* One byte or more; the last segment takes the rest of the key. */
    for (end = seg + 1 == m->t->nsegs ? m->len : pos + 1;
         end > pos && end <= m->len && m->found < 2; end++) {
        m->start[sg->col] = pos;
        m->vlen[sg->col] = end - pos;
        match_from(m, seg + 1, end);
    }
    m->vlen[sg->col] = 0;
}

/* Render argument template t from the values of the split in m. */
static char *render_arg(const Match *m, const Template *t, int *len)
{
    Buf b = {0};

    buf_puts(&b, "");
    for (size_t k = 0; k < t->nsegs; k++) {
        const Seg *sg = &t->segs[k];
        if (sg->kind == SEG_LIT)
            buf_put(&b, sg->text, sg->len);
        else
            buf_put(&b, m->key + m->first_start[sg->col], m->first_vlen[sg->col]);
    }
    *len = (int)b.len;
    return b.data;
}

/* Can key (len bytes) match t at all? Its leading literal must begin the
 * key and its trailing literal end it (without overlapping). */
static bool ends_fit(const Template *t, const char *key, size_t len)
{
    const Seg *first, *last;
    size_t need = 0;

    if (t->nsegs == 0)
        return true;
    first = &t->segs[0];
    last = &t->segs[t->nsegs - 1];
    if (first->kind == SEG_LIT) {
        if (len < first->len || memcmp(key, first->text, first->len) != 0)
            return false;
        need = first->len;
    }
    if (last != first && last->kind == SEG_LIT) {
        if (len < need + last->len || memcmp(key + len - last->len, last->text, last->len) != 0)
            return false;
    }
    return true;
}

int rules_audit_match(const Rules *r, size_t i, const char *key, size_t len, RulesAuditArgs *out)
{
    const Audit *au = audit_of(r, i);
    size_t n, stack[4 * MATCH_STACK_NAMES], *mem = stack;
    Match m;

    if (out != NULL)
        memset(out, 0, sizeof *out);
    if (au == NULL || au->key.src == NULL || !ends_fit(&au->key, key, len) ||
        memchr(key, '\0', len) != NULL)
        return 0;
    n = au->nnames + 1;
    if (n > MATCH_STACK_NAMES)
        mem = xcalloc(4 * n, sizeof *mem);
    else
        memset(stack, 0, 4 * n * sizeof *mem);
    m = (Match){&au->key, key, len, mem, mem + n, mem + 2 * n, mem + 3 * n, au->nnames, 0};
    match_from(&m, 0, 0);
    if (m.found == 1 && out != NULL) {
        out->n = au->q.nargs;
        out->args = xcalloc(out->n + 1, sizeof *out->args);
        out->lens = xcalloc(out->n + 1, sizeof *out->lens);
        for (size_t a = 0; a < out->n; a++)
            out->args[a] = render_arg(&m, &au->q.args[a], &out->lens[a]);
    }
    if (mem != stack)
        free(mem);
    return m.found == 1 ? 1 : m.found > 1 ? -1 : 0;
}

void rules_audit_args_release(RulesAuditArgs *a)
{
    for (size_t i = 0; i < a->n; i++)
        free(a->args[i]);
    free(a->args);
    free(a->lens);
    memset(a, 0, sizeof *a);
}

size_t rules_check_audit(const Rules *r, size_t i, const RulesAuditShape *sh,
                         RulesProblems *problems)
{
    const Audit *au = audit_of(r, i);
    const char *table;
    size_t added = 0;

    if (au == NULL)
        return 0;
    table = r->rules[i].table;
    if (sh->error != NULL) {
        char at[64] = "";
        if (sh->error_pos > 0)
            snprintf(at, sizeof at, " (at character %d of the SQL)", sh->error_pos);
        rules_problem_at(problems, &au->q.sql_loc,
                         "rule for %s: the audit's SQL does not prepare: %s%s", table, sh->error,
                         at);
        return 1;
    }
    if (sh->nparams != (int)au->q.nargs) {
        rules_problem_at(problems, &au->q.loc,
                         "rule for %s: the audit's SQL takes %d parameter%s but \"args\" has "
                         "%zu; give one argument template per parameter, in order",
                         table, sh->nparams, sh->nparams == 1 ? "" : "s", au->q.nargs);
        added++;
    }
    if (sh->nfields != 1) {
        rules_problem_at(problems, &au->q.sql_loc,
                         "rule for %s: the audit's SQL returns %zu columns; it must return "
                         "exactly one, the value key \"%s\" must hold (e.g. SELECT "
                         "row_to_json(p)::text FROM ... p WHERE ...)",
                         table, sh->nfields, au->key.src ? au->key.src : "");
        added++;
    }
    return added;
}
