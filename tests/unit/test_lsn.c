/* Unit tests for lsn.c: LSN and timestamp text. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
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
    static const char *const bad[] = {"",    "/",           "0/",   "/0",   "0",   "0/0/0",
                                      "g/0", "0/123456789", "0/1 ", " 0/1", "-1/0"};
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

/* The fast formatters against gmtime_r/snprintf over a spread of values:
 * leap days, century years, before 1970 and 2000, random instants. */
static void test_format_matches_libc(void **state)
{
    char got[PGTIME_TEXT_MAX], want[PGTIME_TEXT_MAX], lsn[LSN_TEXT_MAX], lwant[LSN_TEXT_MAX];
    uint64_t x = 88172645463325252u;
    (void)state;
    for (int i = 0; i < 200000; i++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        /* Unix seconds from 1900 to 2200, plus µs. */
        int64_t secs = -2208988800 + (int64_t)(x % UINT64_C(9467280000));
        int64_t us = (int64_t)(x >> 40) % 1000000;
        if (i < 1000) /* every day boundary around 2000-01-01 and 1970-01-01 */
            secs = (i % 2 ? 946684800 : 0) + (int64_t)(i / 2 - 250) * 86400 - (i % 3);
        struct tm tm;
        time_t t = (time_t)secs;
        assert_non_null(gmtime_r(&t, &tm));
        snprintf(want, sizeof want, "%04d-%02d-%02dT%02d:%02d:%02d.%06dZ", tm.tm_year + 1900,
                 tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, (int)us);
        assert_string_equal(pgtime_format(secs * 1000000 + us - PG_EPOCH_OFFSET_US, got), want);
        snprintf(lwant, sizeof lwant, "%X/%X", (unsigned)(x >> 32), (unsigned)x);
        assert_string_equal(lsn_format(x, lsn), lwant);
    }
}

/* A position on a page boundary moves past the page header: the long one at
 * a segment start, the short one elsewhere; anything else stays. */
static void test_past_page_header(void **state)
{
    const uint64_t blk = 8192, seg = 16u << 20;
    (void)state;
    assert_int_equal(lsn_past_page_header(0x2000000, blk, seg), 0x2000028); /* segment: 40 */
    assert_int_equal(lsn_past_page_header(0x2002000, blk, seg), 0x2002018); /* page: 24 */
    assert_int_equal(lsn_past_page_header(0x2002018, blk, seg), 0x2002018); /* past it */
    assert_int_equal(lsn_past_page_header(0x2001FF8, blk, seg), 0x2001FF8); /* mid-page */
    assert_int_equal(lsn_past_page_header(0x2002028, blk, seg), 0x2002028);
    assert_int_equal(lsn_past_page_header(0x2000000, blk, 0), 0x2000018); /* no segment size */
    assert_int_equal(lsn_past_page_header(0x2000000, 0, seg), 0x2000000); /* unknown layout */
    assert_int_equal(lsn_past_page_header(0, blk, seg), 0);               /* no position */
    /* Other page sizes (initdb --wal-segsize, a build with another XLOG_BLCKSZ). */
    assert_int_equal(lsn_past_page_header(0x10000, 32768, 1u << 20), 0x10018);
    assert_int_equal(lsn_past_page_header(0x100000, 32768, 1u << 20), 0x100028);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parse_format_roundtrip),
        cmocka_unit_test(test_parse_rejects),
        cmocka_unit_test(test_pgtime),
        cmocka_unit_test(test_format_matches_libc),
        cmocka_unit_test(test_past_page_header),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
