/* Unit tests for batch.c: queue order, deduplication per (action, string),
 * publishes never merged, binary strings, growth through rehashes, clear,
 * and keeping only the ops Redis refused (the OOM case). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <string.h>

#include "batch.h"

static bool add(Batch *b, RulesInvAction a, const char *s)
{
    return batch_add(b, a, s, strlen(s), NULL, 0);
}

static void test_dedupe_and_order(void **state)
{
    Batch b = {0};
    (void)state;

    assert_true(add(&b, RULES_INV_KEY, "user:1"));
    assert_true(add(&b, RULES_INV_VERSION, "user:1")); /* another action: kept */
    assert_false(add(&b, RULES_INV_KEY, "user:1"));
    assert_true(add(&b, RULES_INV_PATTERN, "team:*"));
    assert_true(batch_add(&b, RULES_INV_PUBLISH, "chan", 4, "m1", 2));
    assert_true(batch_add(&b, RULES_INV_PUBLISH, "chan", 4, "m1", 2)); /* every message */
    assert_false(add(&b, RULES_INV_PATTERN, "team:*"));
    assert_false(batch_has_tags(&b));
    assert_true(add(&b, RULES_INV_TAG, "t"));
    assert_true(batch_has_tags(&b));
    assert_int_equal(b.nops, 6);
    assert_string_equal(batch_str(&b, &b.ops[0]), "user:1");
    assert_int_equal(b.ops[1].action, RULES_INV_VERSION);
    assert_string_equal(batch_str(&b, &b.ops[2]), "team:*");
    assert_string_equal(batch_payload(&b, &b.ops[4]), "m1");
    assert_int_equal(b.ops[5].action, RULES_INV_TAG);
    assert_true(batch_bytes(&b) > 0);
    batch_release(&b);
}

static void test_binary_and_growth(void **state)
{
    Batch b = {0};
    char key[32];
    (void)state;

    assert_true(batch_add(&b, RULES_INV_KEY, "a\0b", 3, NULL, 0));
    assert_true(batch_add(&b, RULES_INV_KEY, "a\0c", 3, NULL, 0));
    assert_false(batch_add(&b, RULES_INV_KEY, "a\0b", 3, NULL, 0));
    assert_true(batch_add(&b, RULES_INV_KEY, "a", 1, NULL, 0));
    for (int i = 0; i < 100000; i++) {
        snprintf(key, sizeof key, "k:%d", i % 50000);
        assert_int_equal(add(&b, RULES_INV_KEY, key), i < 50000);
    }
    assert_int_equal(b.nops, 50003);
    assert_memory_equal(batch_str(&b, &b.ops[1]), "a\0c", 4);
    assert_string_equal(batch_str(&b, &b.ops[50002]), "k:49999");

    size_t cap = b.arena_cap;
    batch_clear(&b, cap); /* within the limit: the arena is kept */
    assert_int_equal(b.nops, 0);
    assert_int_equal(b.arena_cap, cap);
    assert_true(add(&b, RULES_INV_KEY, "k:1")); /* the set forgot it */
    batch_clear(&b, 16);                        /* over the limit: given back */
    assert_null(b.arena);
    assert_true(add(&b, RULES_INV_KEY, "k:1"));
    batch_release(&b);
}

static void test_keep_marked(void **state)
{
    Batch b = {0};
    (void)state;

    add(&b, RULES_INV_KEY, "k1");
    add(&b, RULES_INV_VERSION, "v1");
    batch_add(&b, RULES_INV_PUBLISH, "c", 1, "payload", 7);
    add(&b, RULES_INV_KEY, "k2");
    add(&b, RULES_INV_VERSION, "v2");
    batch_mark(&b, 1);
    batch_mark(&b, 4);
    batch_keep_marked(&b);
    assert_int_equal(b.nops, 2);
    assert_string_equal(batch_str(&b, &b.ops[0]), "v1");
    assert_string_equal(batch_str(&b, &b.ops[1]), "v2");
    assert_false(b.ops[0].refused);
    assert_int_equal(b.arena_len, 6); /* "v1\0v2\0": the applied strings are gone */
    /* The set follows: a kept op deduplicates, an applied one is new. */
    assert_false(add(&b, RULES_INV_VERSION, "v1"));
    assert_true(add(&b, RULES_INV_KEY, "k1"));

    batch_mark(&b, 0);
    batch_unmark_all(&b);
    batch_keep_marked(&b);
    assert_int_equal(b.nops, 0);
    batch_release(&b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_dedupe_and_order),
        cmocka_unit_test(test_binary_and_growth),
        cmocka_unit_test(test_keep_marked),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
