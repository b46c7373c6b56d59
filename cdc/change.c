/*
 * change.c — pgoutput row change → RulesChange (see change.h).
 */
#include "change.h"
#include "mem.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void ensure_cap(ChangeBuf *buf, size_t n)
{
    if (n <= buf->cap)
        return;
    buf->old_vals = xrealloc(buf->old_vals, n * sizeof *buf->old_vals);
    buf->new_vals = xrealloc(buf->new_vals, n * sizeof *buf->new_vals);
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
    txn->texts = false;
}

void change_txn_texts(ChangeTxn *txn)
{
    if (txn->texts)
        return;
    lsn_format(txn->final_lsn, txn->lsn_text);
    pgtime_format(txn->commit_time, txn->time_text);
    txn->texts = true;
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
    out->lsn = txn->texts ? txn->lsn_text : NULL;
    out->xid = txn->xid;
    out->commit_time = txn->texts ? txn->time_text : NULL;
    out->has_commit = true;
    out->shape = rel->generation;
    out->commit_lsn = txn->final_lsn;
    out->commit_ts = txn->commit_time;
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
        if (old_kind != 0)
            old_from_tuple(rel, old_kind, &msg->u.change.old_tuple, buf->old_vals);
        for (uint16_t i = 0; i < rel->ncols; i++) {
            const PgoValue *w = &msg->u.change.new_tuple.values[i];
            RulesValue v = from_wire(w);
            /* No old tuple: the identity did not change. */
            if (old_kind == 0)
                buf->old_vals[i] = rel->cols[i].key ? v : (RulesValue){RULES_VAL_MISSING, NULL, 0};
            /* Unchanged TOAST in the new row equals the old value when known. */
            buf->new_vals[i] = w->kind == PGO_VAL_UNCHANGED ? buf->old_vals[i] : v;
        }
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

void change_widen(const RulesChange *chg, const char *table, RulesChange *out)
{
    *out = (RulesChange){.table = table,
                         .op = RULES_TRUNCATE,
                         .lsn = chg->lsn,
                         .xid = chg->xid,
                         .commit_time = chg->commit_time,
                         .has_commit = chg->has_commit,
                         .commit_lsn = chg->commit_lsn,
                         .commit_ts = chg->commit_ts};
}

int change_walbust_message(const char *content, size_t len, const char *tag_prefix,
                           RulesEmitFn emit, void *arg, char *err, size_t errlen)
{
    static const struct {
        const char *op;
        const char *field;
        RulesInvAction action;
    } ops[] = {
        {"invalidate", "keys", RULES_INV_KEY},
        {"invalidate_pattern", "patterns", RULES_INV_PATTERN},
        {"invalidate_tag", "tags", RULES_INV_TAG},
    };
    cJSON *root = cJSON_ParseWithLength(content, len);
    const cJSON *op, *items, *item;
    size_t plen = strlen(tag_prefix);
    int n = -1;

    if (root == NULL || !cJSON_IsObject(root)) {
        snprintf(err, errlen, "walbust message is not a JSON object");
        goto cleanup;
    }
    op = cJSON_GetObjectItemCaseSensitive(root, "v");
    if (op != NULL && !(cJSON_IsNumber(op) && op->valuedouble == 1)) {
        snprintf(err, errlen, "walbust message has format version %s; this walbust reads 1 "
                 "(upgrade walbust before sql/walbust.sql)", cJSON_IsNumber(op) ? "newer" : "invalid");
        goto cleanup;
    }
    op = cJSON_GetObjectItemCaseSensitive(root, "op");
    if (!cJSON_IsString(op)) {
        snprintf(err, errlen, "walbust message has no \"op\"");
        goto cleanup;
    }
    for (size_t i = 0; i < sizeof ops / sizeof ops[0]; i++) {
        if (strcmp(op->valuestring, ops[i].op) != 0)
            continue;
        items = cJSON_GetObjectItemCaseSensitive(root, ops[i].field);
        if (!cJSON_IsArray(items)) {
            snprintf(err, errlen, "walbust message \"%s\" has no \"%s\" array", ops[i].op,
                     ops[i].field);
            goto cleanup;
        }
        cJSON_ArrayForEach(item, items)
        {
            if (!cJSON_IsString(item)) {
                snprintf(err, errlen, "walbust message \"%s\" has a non-string in \"%s\"",
                         ops[i].op, ops[i].field);
                goto cleanup;
            }
        }
        n = 0;
        cJSON_ArrayForEach(item, items)
        {
            const char *v = item->valuestring;
            size_t vlen = strlen(v);

            if (ops[i].action == RULES_INV_TAG) {
                char *full = xmalloc(plen + vlen + 1);
                memcpy(full, tag_prefix, plen);
                memcpy(full + plen, v, vlen + 1);
                emit(arg, RULES_INV_TAG, full, plen + vlen, NULL, 0);
                free(full);
            } else {
                emit(arg, ops[i].action, v, vlen, NULL, 0);
            }
            n++;
        }
        goto cleanup;
    }
    snprintf(err, errlen, "walbust message has unknown op \"%s\"", op->valuestring);
cleanup:
    cJSON_Delete(root);
    return n;
}
