/*
 * change.c — pgoutput row change → RulesChange (see change.h).
 */
#include "change.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void ensure_cap(ChangeBuf *buf, size_t n)
{
    RulesValue *o, *v;

    if (n <= buf->cap)
        return;
    o = realloc(buf->old_vals, n * sizeof *o);
    v = realloc(buf->new_vals, n * sizeof *v);
    if (o == NULL || v == NULL) {
        fprintf(stderr, "walbust: out of memory\n");
        abort();
    }
    buf->old_vals = o;
    buf->new_vals = v;
    buf->cap = n;
}

void change_buf_release(ChangeBuf *buf)
{
    free(buf->old_vals);
    free(buf->new_vals);
    memset(buf, 0, sizeof *buf);
}

void change_txn_begin(ChangeTxn *txn, const PgoMsg *begin)
{
    txn->final_lsn = begin->u.begin.final_lsn;
    txn->xid = begin->u.begin.xid;
    txn->commit_time = begin->u.begin.commit_time;
    lsn_format(txn->final_lsn, txn->lsn_text);
    pgtime_format(txn->commit_time, txn->time_text);
}

static RulesValue from_wire(const PgoValue *v)
{
    RulesValue r = {RULES_VAL_MISSING, NULL, 0};

    switch (v->kind) {
    case PGO_VAL_NULL:
        r.kind = RULES_VAL_NULL;
        break;
    case PGO_VAL_TEXT:
    case PGO_VAL_BINARY:
        r.kind = RULES_VAL_TEXT;
        r.data = v->data;
        r.len = v->len;
        break;
    default: /* unchanged TOAST: not carried */
        break;
    }
    return r;
}

/* The old image from an old tuple: 'O' carries every column, 'K' only the
 * identity columns (the rest are placeholders, not NULLs). */
static void old_from_tuple(const PgoRelation *rel, char kind, const PgoTuple *t, RulesValue *out)
{
    for (uint16_t i = 0; i < rel->ncols; i++) {
        if (kind == 'K' && !rel->cols[i].key)
            out[i] = (RulesValue){RULES_VAL_MISSING, NULL, 0};
        else
            out[i] = from_wire(&t->values[i]);
    }
}

static void fill_common(const ChangeTxn *txn, const PgoRelation *rel, RulesChange *out)
{
    out->table = rel->qualname;
    out->ncols = rel->ncols;
    out->colnames = rel->colnames;
    out->lsn = txn->lsn_text;
    out->xid = txn->xid;
    out->commit_time = txn->time_text;
}

void change_from_pgo(ChangeBuf *buf, const ChangeTxn *txn, const PgoMsg *msg, RulesChange *out)
{
    const PgoRelation *rel = msg->u.change.rel;
    char old_kind = msg->u.change.old_kind;

    ensure_cap(buf, rel->ncols ? rel->ncols : 1);
    memset(out, 0, sizeof *out);
    fill_common(txn, rel, out);

    switch (msg->kind) {
    case PGO_INSERT:
        out->op = RULES_INSERT;
        for (uint16_t i = 0; i < rel->ncols; i++)
            buf->new_vals[i] = from_wire(&msg->u.change.new_tuple.values[i]);
        out->new_vals = buf->new_vals;
        break;
    case PGO_UPDATE:
        out->op = RULES_UPDATE;
        for (uint16_t i = 0; i < rel->ncols; i++)
            buf->new_vals[i] = from_wire(&msg->u.change.new_tuple.values[i]);
        if (old_kind != 0) {
            old_from_tuple(rel, old_kind, &msg->u.change.old_tuple, buf->old_vals);
        } else {
            /* No old tuple: the identity did not change. */
            for (uint16_t i = 0; i < rel->ncols; i++)
                buf->old_vals[i] = rel->cols[i].key
                                       ? buf->new_vals[i]
                                       : (RulesValue){RULES_VAL_MISSING, NULL, 0};
        }
        /* Unchanged TOAST in the new row equals the old value when known. */
        for (uint16_t i = 0; i < rel->ncols; i++)
            if (msg->u.change.new_tuple.values[i].kind == PGO_VAL_UNCHANGED)
                buf->new_vals[i] = buf->old_vals[i];
        out->old_vals = buf->old_vals;
        out->new_vals = buf->new_vals;
        break;
    case PGO_DELETE:
        out->op = RULES_DELETE;
        old_from_tuple(rel, old_kind ? old_kind : 'K', &msg->u.change.old_tuple, buf->old_vals);
        out->old_vals = buf->old_vals;
        break;
    default:
        break;
    }
}

void change_truncate(const ChangeTxn *txn, const PgoRelation *rel, RulesChange *out)
{
    memset(out, 0, sizeof *out);
    fill_common(txn, rel, out);
    out->op = RULES_TRUNCATE;
}
