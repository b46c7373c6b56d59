/* Unit tests for change.c: replica identity interpretation and explicit
 * invalidation messages. Relations and tuples are built by hand so each
 * identity case is explicit. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <cmocka.h>

#include "change.h"

static PgoColumn cols[3] = {
    {(char *)"id", 20, -1, true},
    {(char *)"name", 25, -1, false},
    {(char *)"bio", 25, -1, false},
};
static const char *colnames[3] = {"id", "name", "bio"};
static PgoRelation rel = {16384, (char *)"public", (char *)"users", (char *)"public.users", 'd',
                          3, cols, colnames, 1};

static PgoValue T(const char *s)
{
    return (PgoValue){PGO_VAL_TEXT, (uint32_t)strlen(s), s};
}
static const PgoValue N = {PGO_VAL_NULL, 0, NULL};
static const PgoValue U = {PGO_VAL_UNCHANGED, 0, NULL};

static ChangeTxn txn(void)
{
    ChangeTxn t;
    PgoMsg b = {.kind = PGO_BEGIN};
    b.u.begin.final_lsn = 0x16B3748;
    b.u.begin.xid = 1234;
    b.u.begin.commit_time = 0;
    change_txn_begin(&t, &b);
    return t;
}

static void assert_text(const RulesValue *v, const char *s)
{
    assert_int_equal(v->kind, RULES_VAL_TEXT);
    assert_int_equal(v->len, strlen(s));
    assert_memory_equal(v->data, s, v->len);
}

static void test_txn_text(void **state)
{
    ChangeTxn t = txn();
    (void)state;
    assert_false(t.texts);
    change_txn_texts(&t);
    assert_true(t.texts);
    assert_string_equal(t.lsn_text, "0/16B3748");
    assert_string_equal(t.time_text, "2000-01-01T00:00:00.000000Z");
    assert_int_equal(t.xid, 1234);
}

static void test_insert(void **state)
{
    PgoValue nv[3] = {T("1"), N, T("x")};
    PgoMsg m = {.kind = PGO_INSERT};
    ChangeBuf buf = {0};
    ChangeTxn t = txn();
    RulesChange c;
    (void)state;
    m.u.change.rel = &rel;
    m.u.change.new_tuple = (PgoTuple){3, nv};
    change_from_pgo(&buf, &t, &m, &c);
    assert_int_equal(c.op, RULES_INSERT);
    assert_string_equal(c.table, "public.users");
    assert_null(c.old_vals);
    assert_text(&c.new_vals[0], "1");
    assert_int_equal(c.new_vals[1].kind, RULES_VAL_NULL);
    /* The texts are formatted only on demand, from the numbers. */
    assert_null(c.lsn);
    assert_true(c.has_commit);
    assert_int_equal(c.commit_lsn, 0x16B3748);
    {
        char lsn[LSN_TEXT_MAX], when[PGTIME_TEXT_MAX];
        assert_string_equal(rules_change_lsn(&c, lsn), "0/16B3748");
        assert_string_equal(rules_change_time(&c, when), "2000-01-01T00:00:00.000000Z");
    }
    change_buf_release(&buf);
}

/* REPLICA IDENTITY DEFAULT, key unchanged: no old tuple is sent. The key's
 * old value equals the new one; other old values are unknown, not NULL. */
static void test_update_no_old_tuple(void **state)
{
    PgoValue nv[3] = {T("7"), T("new"), U};
    PgoMsg m = {.kind = PGO_UPDATE};
    ChangeBuf buf = {0};
    ChangeTxn t = txn();
    RulesChange c;
    (void)state;
    m.u.change.rel = &rel;
    m.u.change.new_tuple = (PgoTuple){3, nv};
    change_from_pgo(&buf, &t, &m, &c);
    assert_text(&c.old_vals[0], "7");
    assert_int_equal(c.old_vals[1].kind, RULES_VAL_MISSING);
    assert_int_equal(c.old_vals[2].kind, RULES_VAL_MISSING);
    assert_text(&c.new_vals[1], "new");
    /* unchanged TOAST without an old image: missing (widened later) */
    assert_int_equal(c.new_vals[2].kind, RULES_VAL_MISSING);
    change_buf_release(&buf);
}

/* Key changed under DEFAULT: a 'K' tuple carries the key; its other
 * columns arrive as 'n' placeholders that must not read as NULL. */
static void test_update_key_tuple(void **state)
{
    PgoValue ov[3] = {T("7"), N, N};
    PgoValue nv[3] = {T("8"), T("a"), T("b")};
    PgoMsg m = {.kind = PGO_UPDATE};
    ChangeBuf buf = {0};
    ChangeTxn t = txn();
    RulesChange c;
    (void)state;
    m.u.change.rel = &rel;
    m.u.change.old_kind = 'K';
    m.u.change.old_tuple = (PgoTuple){3, ov};
    m.u.change.new_tuple = (PgoTuple){3, nv};
    change_from_pgo(&buf, &t, &m, &c);
    assert_text(&c.old_vals[0], "7");
    assert_int_equal(c.old_vals[1].kind, RULES_VAL_MISSING);
    assert_int_equal(c.old_vals[2].kind, RULES_VAL_MISSING);
    assert_text(&c.new_vals[0], "8");
    change_buf_release(&buf);
}

/* FULL: the old image is complete, so an unchanged TOAST value in the new
 * row takes the old value; NULLs in the old row are real NULLs. */
static void test_update_full(void **state)
{
    PgoValue ov[3] = {T("7"), N, T("long bio")};
    PgoValue nv[3] = {T("7"), T("n"), U};
    PgoMsg m = {.kind = PGO_UPDATE};
    ChangeBuf buf = {0};
    ChangeTxn t = txn();
    RulesChange c;
    (void)state;
    m.u.change.rel = &rel;
    m.u.change.old_kind = 'O';
    m.u.change.old_tuple = (PgoTuple){3, ov};
    m.u.change.new_tuple = (PgoTuple){3, nv};
    change_from_pgo(&buf, &t, &m, &c);
    assert_int_equal(c.old_vals[1].kind, RULES_VAL_NULL);
    assert_text(&c.new_vals[2], "long bio");
    change_buf_release(&buf);
}

static void test_delete_key(void **state)
{
    PgoValue ov[3] = {T("9"), N, N};
    PgoMsg m = {.kind = PGO_DELETE};
    ChangeBuf buf = {0};
    ChangeTxn t = txn();
    RulesChange c;
    (void)state;
    m.u.change.rel = &rel;
    m.u.change.old_kind = 'K';
    m.u.change.old_tuple = (PgoTuple){3, ov};
    change_from_pgo(&buf, &t, &m, &c);
    assert_int_equal(c.op, RULES_DELETE);
    assert_null(c.new_vals);
    assert_text(&c.old_vals[0], "9");
    assert_int_equal(c.old_vals[1].kind, RULES_VAL_MISSING);
    change_buf_release(&buf);
}

static void test_truncate(void **state)
{
    ChangeTxn t = txn();
    RulesChange c;
    (void)state;
    change_truncate(&t, &rel, &c);
    assert_int_equal(c.op, RULES_TRUNCATE);
    assert_null(c.old_vals);
    assert_null(c.new_vals);
    assert_int_equal(c.ncols, 3);
}

typedef struct Seen {
    int n;
    RulesInvAction action[8];
    char s[8][64];
} Seen;

static void record(void *arg, RulesInvAction a, const char *s, size_t len, const char *p,
                   size_t plen)
{
    Seen *seen = arg;
    (void)p;
    (void)plen;
    assert_true(seen->n < 8);
    assert_int_equal(strlen(s), len);
    seen->action[seen->n] = a;
    snprintf(seen->s[seen->n], sizeof seen->s[0], "%s", s);
    seen->n++;
}

static void test_messages(void **state)
{
    static const struct {
        const char *json;
        int want;
        RulesInvAction action;
        const char *first;
    } cases[] = {
        {"{\"v\": 1, \"op\": \"invalidate\", \"keys\": [\"a\", \"b\\\"c\"]}", 2, RULES_INV_KEY,
         "a"},
        {"{\"v\": 1, \"op\": \"invalidate_pattern\", \"patterns\": [\"p:*\"]}", 1,
         RULES_INV_PATTERN, "p:*"},
        {"{\"v\": 1, \"op\": \"invalidate_tag\", \"tags\": [\"user:1\"]}", 1, RULES_INV_TAG,
         "tag:user:1"},
        {"{\"op\": \"invalidate\", \"keys\": []}", 0, RULES_INV_KEY, NULL},
        {"not json", -1, RULES_INV_KEY, NULL},
        {"{\"v\": 2, \"op\": \"invalidate\", \"keys\": [\"a\"]}", -1, RULES_INV_KEY, NULL},
        {"{\"v\": 1, \"op\": \"explode\", \"keys\": [\"a\"]}", -1, RULES_INV_KEY, NULL},
        {"{\"v\": 1, \"op\": \"invalidate\", \"keys\": [\"a\", 3]}", -1, RULES_INV_KEY, NULL},
        {"{\"v\": 1, \"op\": \"invalidate\", \"patterns\": [\"a\"]}", -1, RULES_INV_KEY, NULL},
    };
    (void)state;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        Seen seen = {0};
        char err[256] = "";
        int n = change_walbust_message(cases[i].json, strlen(cases[i].json), "tag:", record,
                                       &seen, err, sizeof err);
        assert_int_equal(n, cases[i].want);
        if (n < 0) {
            assert_int_equal(seen.n, 0); /* nothing half-applied */
            assert_true(err[0] != '\0');
            continue;
        }
        assert_int_equal(seen.n, n);
        if (n > 0) {
            assert_int_equal(seen.action[0], cases[i].action);
            assert_string_equal(seen.s[0], cases[i].first);
        }
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_txn_text),      cmocka_unit_test(test_insert),
        cmocka_unit_test(test_update_no_old_tuple), cmocka_unit_test(test_update_key_tuple),
        cmocka_unit_test(test_update_full),   cmocka_unit_test(test_delete_key),
        cmocka_unit_test(test_truncate),      cmocka_unit_test(test_messages),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
