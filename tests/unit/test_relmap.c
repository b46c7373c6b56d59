/* Unit tests for relmap.c: relation OID + generation → ancestors. */
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <cmocka.h>

#include "relmap.h"

static void test_put_find(void **state)
{
    const char *anc[2] = {"public.events", "public.all_events"};
    RelMap *m = relmap_new();
    const RelMapEntry *e;

    (void)state;
    assert_null(relmap_find(m, 16384, 1));
    e = relmap_put(m, 16384, 1, /* partition= */ true, /* published= */ true, anc, 2);
    assert_non_null(e);
    e = relmap_find(m, 16384, 1);
    assert_non_null(e);
    assert_true(e->partition);
    assert_true(e->published);
    assert_int_equal(e->nancestors, 2);
    assert_string_equal(e->ancestors[0], "public.events");
    assert_string_equal(e->ancestors[1], "public.all_events");
    assert_true(e->ancestors[0] != anc[0]); /* copied */
    /* A newer Relation message (generation) makes the entry stale. */
    assert_null(relmap_find(m, 16384, 2));
    e = relmap_put(m, 16384, 2, false, false, NULL, 0);
    assert_int_equal(e->nancestors, 0);
    assert_false(e->partition);
    assert_null(relmap_find(m, 16384, 1));
    assert_non_null(relmap_find(m, 16384, 2));
    relmap_clear(m);
    assert_null(relmap_find(m, 16384, 2));
    relmap_free(m);
    relmap_free(NULL);
}

/* Thousands of relations (partitions): growth keeps every entry. */
static void test_many(void **state)
{
    RelMap *m = relmap_new();
    char name[32];
    const char *anc[1] = {name};

    (void)state;
    for (uint32_t i = 1; i <= 5000; i++) {
        snprintf(name, sizeof name, "public.p%u", i);
        relmap_put(m, i * 7919u, i, i % 2 == 0, true, anc, 1);
    }
    for (uint32_t i = 1; i <= 5000; i++) {
        const RelMapEntry *e = relmap_find(m, i * 7919u, i);
        snprintf(name, sizeof name, "public.p%u", i);
        assert_non_null(e);
        assert_int_equal(e->partition, i % 2 == 0);
        assert_string_equal(e->ancestors[0], name);
    }
    assert_null(relmap_find(m, 3, 1));
    relmap_free(m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_put_find),
        cmocka_unit_test(test_many),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
