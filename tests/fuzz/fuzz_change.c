/*
 * fuzz_change.c — libFuzzer target for the decode → change → rules path as
 * walbust's streaming loop drives it: pgoutput messages (cdc/pgo.c) become
 * rules-engine changes (cdc/change.c: replica identity, 'K'/'O' old tuples,
 * unchanged TOAST), are evaluated against a fixed rules file covering the
 * captured fixture tables (cdc/rules*.c), and `walbust` logical messages go
 * through change_walbust_message(). Begin messages format the LSN and the
 * commit timestamp (cdc/lsn.c) from whatever the bytes say; message
 * contents also go through lsn_parse().
 *
 * Input: messages separated by "\xff\xffMSG" (seeds: the captured streams of
 * tests/fixtures/pgo, see make-seeds). Each message is an exact-size heap
 * copy that lives until the change built from it has been evaluated.
 *
 * Properties (a violation aborts): a change mirrors its relation (table,
 * column names and count) and carries the images its op implies, with
 * text values inside the message; every emitted string is NUL-terminated;
 * publish payloads are JSON objects with the change's table, op, lsn and
 * xid; a rejected walbust message emits nothing and says why; LSN text
 * round-trips through lsn_format() and lsn_parse().
 */
#include "change.h"
#include "pgo.h"
#include "rules.h"

#include <cJSON.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHECK(cond, ...)                                                                           \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "fuzz_change: property failed: %s: ", #cond);                        \
            fprintf(stderr, __VA_ARGS__);                                                          \
            fputc('\n', stderr);                                                                   \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

/* Rules over the tables of scripts/capture-pgo-fixtures. */
static const char rules_json[] =
    "{\"defaults\": {\"tag_prefix\": \"t[g]:\"}, \"rules\": ["
    " {\"table\": \"items\", \"changed\": [\"name\", \"qty\", \"note\"],"
    "  \"keys\": [\"item:{id}\", \"item:{id}:{new.name}\", \"mood:{new.mood}\"],"
    "  \"patterns\": [\"list:{id}:*\", \"q:{new.qty}?\"],"
    "  \"tags\": [\"item:{id}\", \"n:{new.note}\"], \"versions\": [\"v:{id}\"],"
    "  \"publish\": [\"inv\", \"inv2\"]},"
    " {\"table\": \"items\", \"on\": [\"delete\", \"truncate\"], \"keys\": [\"gone:{old.id}\"]},"
    " {\"table\": \"audit.full_t\", \"keys\": [\"f:{id}:{val}\", \"n:{old.n}\", \"{{lit}}:{new.val}\"],"
    "  \"publish\": [\"inv\"]},"
    " {\"table\": \"idx_t\", \"keys\": [\"a:{a}\", \"b:{b}\"], \"tags\": [\"ab:{a}:{b}\"]},"
    " {\"table\": \"big\", \"keys\": [\"big:{id}:{payload}\"], \"versions\": [\"c:{counter}\"]},"
    " {\"table\": \"parent\", \"keys\": [\"p:{id}\"], \"publish\": [\"inv\"]},"
    " {\"table\": \"child\", \"patterns\": [\"c:{parent_id}:*\"]}"
    "]}";

static Rules *rules;

typedef struct Ctx {
    const RulesChange *chg; /* NULL for walbust messages */
    unsigned emitted;
} Ctx;

static const char *op_name(RulesOp op)
{
    return op == RULES_INSERT ? "insert" : op == RULES_UPDATE ? "update"
                                       : op == RULES_DELETE   ? "delete"
                                                              : "truncate";
}

static void check_payload(const RulesChange *chg, const char *payload, size_t len)
{
    cJSON *root = cJSON_ParseWithLength(payload, len);
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(root, "table");
    const cJSON *op = cJSON_GetObjectItemCaseSensitive(root, "op");
    const cJSON *lsn = cJSON_GetObjectItemCaseSensitive(root, "lsn");
    const cJSON *xid = cJSON_GetObjectItemCaseSensitive(root, "xid");
    char buf[LSN_TEXT_MAX];
    const char *want = rules_change_lsn(chg, buf); /* formatted on demand */

    CHECK(cJSON_IsObject(root), "payload is not a JSON object: %.*s", (int)len, payload);
    CHECK(cJSON_IsString(t) && cJSON_IsString(op) && cJSON_IsString(lsn) && cJSON_IsNumber(xid),
          "payload fields: %.*s", (int)len, payload);
    CHECK(want != NULL && strcmp(op->valuestring, op_name(chg->op)) == 0 &&
              strcmp(lsn->valuestring, want) == 0 && xid->valuedouble == (double)chg->xid,
          "payload values: %.*s", (int)len, payload);
    cJSON_Delete(root);
}

static void on_emit(void *arg, RulesInvAction action, const char *s, size_t len,
                    const char *payload, size_t payload_len)
{
    Ctx *c = arg;

    CHECK(s != NULL && s[len] == '\0', "emitted string not NUL-terminated");
    if (action == RULES_INV_PUBLISH) {
        CHECK(c->chg != NULL, "publish from a walbust message");
        check_payload(c->chg, payload, payload_len);
    }
    c->emitted++;
}

/* The change mirrors its relation and the message's images. */
static void check_change(const PgoRelation *rel, const RulesChange *chg, const char *buf,
                         size_t len)
{
    const RulesValue *imgs[2] = {chg->old_vals, chg->new_vals};

    CHECK(strcmp(chg->table, rel->qualname) == 0 && chg->ncols == rel->ncols &&
              chg->colnames == rel->colnames,
          "change does not mirror relation %s", rel->qualname);
    CHECK((chg->new_vals != NULL) == (chg->op != RULES_DELETE), "new image on %s",
          op_name(chg->op));
    CHECK((chg->old_vals != NULL) == (chg->op != RULES_INSERT), "old image on %s",
          op_name(chg->op));
    for (int k = 0; k < 2; k++)
        for (size_t i = 0; imgs[k] != NULL && i < chg->ncols; i++) {
            const RulesValue *v = &imgs[k][i];
            CHECK(v->kind == RULES_VAL_TEXT || v->kind == RULES_VAL_NULL ||
                      v->kind == RULES_VAL_MISSING,
                  "value kind %d", (int)v->kind);
            if (v->kind == RULES_VAL_TEXT && v->len > 0)
                CHECK(v->data >= buf && v->data + v->len <= buf + len, "value outside message");
        }
}

static void eval(const RulesChange *chg)
{
    Ctx c = {chg, 0};
    RulesEvalStats st = {0};

    rules_eval(rules, chg, on_emit, &c, &st);
    CHECK(st.emitted == c.emitted, "stats.emitted %u, callbacks %u", st.emitted, c.emitted);
}

static void walbust_message(const PgoMsg *m)
{
    Ctx c = {NULL, 0};
    char err[256] = "";
    int n;

    if (strcmp(m->u.message.prefix, "walbust") != 0)
        return;
    n = change_walbust_message(m->u.message.content, m->u.message.len, rules_tag_prefix(rules),
                               on_emit, &c, err, sizeof err);
    if (n < 0)
        CHECK(c.emitted == 0 && err[0] != '\0', "rejected message emitted %u, err \"%s\"",
              c.emitted, err);
    else
        CHECK((unsigned)n == c.emitted, "returned %d, emitted %u", n, c.emitted);
}

/* Text that lsn_parse() accepts formats back to text that parses to the
 * same LSN. */
static void lsn_roundtrip(const char *p, size_t n)
{
    char *text = malloc(n + 1), back[LSN_TEXT_MAX];
    uint64_t a, b;

    CHECK(text != NULL, "out of memory");
    memcpy(text, p, n);
    text[n] = '\0';
    if (lsn_parse(text, &a)) {
        lsn_format(a, back);
        CHECK(lsn_parse(back, &b) && a == b, "\"%s\" -> %s does not parse back", text, back);
    }
    free(text);
}

typedef struct Loop {
    PgoDecoder *dec;
    ChangeTxn txn;
    ChangeBuf cbuf;
} Loop;

static void handle(Loop *lp, const char *buf, size_t len)
{
    PgoMsg m;
    RulesChange chg;
    uint64_t lsn;

    if (pgo_decode(lp->dec, buf, len, &m) < 0)
        return;
    switch (m.kind) {
    case PGO_BEGIN:
        change_txn_begin(&lp->txn, &m);
        CHECK(!lp->txn.texts, "the texts are formatted before anyone asks for them");
        change_txn_texts(&lp->txn);
        CHECK(lsn_parse(lp->txn.lsn_text, &lsn) && lsn == m.u.begin.final_lsn,
              "lsn text \"%s\" does not parse back", lp->txn.lsn_text);
        CHECK(memchr(lp->txn.time_text, '\0', sizeof lp->txn.time_text) != NULL, "time text");
        break;
    case PGO_INSERT:
    case PGO_UPDATE:
    case PGO_DELETE:
        change_from_pgo(&lp->cbuf, &lp->txn, &m, &chg);
        check_change(m.u.change.rel, &chg, buf, len);
        {
            char text[LSN_TEXT_MAX];
            const char *got = rules_change_lsn(&chg, text);
            CHECK(chg.has_commit && chg.commit_lsn == lp->txn.final_lsn && got != NULL &&
                      lsn_parse(got, &lsn) && lsn == lp->txn.final_lsn,
                  "the change's commit LSN \"%s\" is not its transaction's", got ? got : "");
        }
        eval(&chg);
        break;
    case PGO_TRUNCATE:
        for (uint32_t i = 0; i < m.u.truncate.nrels; i++) {
            change_truncate(&lp->txn, m.u.truncate.rels[i], &chg);
            eval(&chg);
        }
        break;
    case PGO_MESSAGE:
        walbust_message(&m);
        lsn_roundtrip(m.u.message.content, m.u.message.len);
        break;
    default:
        break;
    }
}

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    RulesProblems p = {0, NULL};

    (void)argc;
    (void)argv;
    rules = rules_parse(rules_json, strlen(rules_json), &p);
    if (rules == NULL) {
        fprintf(stderr, "fuzz_change: built-in rules do not compile: %s\n",
                p.count ? p.items[0].msg : "?");
        abort();
    }
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const char sep[] = "\xff\xffMSG";
    static const PgoMsg no_begin = {.kind = PGO_BEGIN};
    Loop lp = {pgo_new(), {0}, {NULL, NULL, 0}};
    size_t start = 0;

    change_txn_begin(&lp.txn, &no_begin);
    while (start < size) {
        const uint8_t *cut = memmem(data + start, size - start, sep, sizeof sep - 1);
        size_t end = cut ? (size_t)(cut - data) : size;
        char *copy = malloc(end - start + 1);
        CHECK(copy != NULL, "out of memory");
        memcpy(copy, data + start, end - start);
        if (end > start)
            handle(&lp, copy, end - start);
        free(copy);
        start = cut ? end + sizeof sep - 1 : size;
    }
    change_buf_release(&lp.cbuf);
    pgo_free(lp.dec);
    return 0;
}
