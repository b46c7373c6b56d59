/* Unit tests for lsn.c: LSN and timestamp text. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <cmocka.h>

#include "lsn.h"

static void test_parse_format_roundtrip(void **state)
{
    static const char *const good[] = {"0/0", "0/16B3748", "FFFFFFFF/FFFFFFFF", "1/A"};
    char buf[LSN_TEXT_MAX];
    (void)state;
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++) {
        uint64_t v = 1;
        assert_true(lsn_parse(good[i], &v));
        assert_string_equal(lsn_format(v, buf), good[i]);
    }
    uint64_t v = 0;
    assert_true(lsn_parse("0/16b3748", &v));
    assert_int_equal(v, 0x16B3748);
    assert_true(lsn_parse("2/0", &v));
    assert_int_equal(v, UINT64_C(0x200000000));
}

static void test_parse_rejects(void **state)
{
    static const char *const bad[] = {"", "/", "0/", "/0", "0", "0/0/0", "g/0",
                                      "0/123456789", "0/1 ", " 0/1", "-1/0"};
    (void)state;
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        uint64_t v = 42;
        assert_false(lsn_parse(bad[i], &v));
        assert_int_equal(v, 42);
    }
    uint64_t v = 42;
    assert_false(lsn_parse(NULL, &v));
}

static void test_pgtime(void **state)
{
    char buf[PGTIME_TEXT_MAX];
    (void)state;
    assert_string_equal(pgtime_format(0, buf), "2000-01-01T00:00:00.000000Z");
    /* 2026-11-27T03:22:20.123456Z */
    int64_t t = (INT64_C(1795749740) * 1000000 + 123456) - PG_EPOCH_OFFSET_US;
    assert_string_equal(pgtime_format(t, buf), "2026-11-27T03:22:20.123456Z");
    assert_string_equal(pgtime_format(-1, buf), "1999-12-31T23:59:59.999999Z");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parse_format_roundtrip),
        cmocka_unit_test(test_parse_rejects),
        cmocka_unit_test(test_pgtime),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
