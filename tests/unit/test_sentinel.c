/* Unit tests for sentinel.c's pure part: the reply to SENTINEL
 * get-master-addr-by-name, built with hiredis' own reader from RESP text
 * as a Sentinel sends it. (Discovery against real Sentinels:
 * tests/e2e/test_sentinel.py.) */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <string.h>

#include "sentinel.h"

static redisReply *parse(const char *resp)
{
    redisReader *rd = redisReaderCreate();
    void *r = NULL;

    redisReaderFeed(rd, resp, strlen(resp));
    assert_int_equal(redisReaderGetReply(rd, &r), REDIS_OK);
    assert_non_null(r);
    redisReaderFree(rd);
    return r;
}

static int addr_of(const char *resp, char *host, int *port, char *why)
{
    redisReply *r = parse(resp);
    int rc = sentinel_parse_addr(r, host, 64, port, why, 128);
    freeReplyObject(r);
    return rc;
}

static void test_parse_addr(void **state)
{
    char host[64] = "", why[128] = "";
    int port = 0;
    (void)state;

    assert_int_equal(addr_of("*2\r\n$9\r\n127.0.0.1\r\n$4\r\n6380\r\n", host, &port, why), 1);
    assert_string_equal(host, "127.0.0.1");
    assert_int_equal(port, 6380);
    assert_int_equal(addr_of("*2\r\n$3\r\n::1\r\n$5\r\n26379\r\n", host, &port, why), 1);
    assert_string_equal(host, "::1");
    assert_int_equal(port, 26379);

    /* An unknown master name: nil (RESP2) or a null array. */
    assert_int_equal(addr_of("*-1\r\n", host, &port, why), 0);
    assert_int_equal(addr_of("$-1\r\n", host, &port, why), 0);

    assert_int_equal(addr_of("-NOAUTH Authentication required.\r\n", host, &port, why), -1);
    assert_string_equal(why, "NOAUTH Authentication required.");
    assert_int_equal(addr_of("*2\r\n$1\r\nh\r\n$1\r\nx\r\n", host, &port, why), -1);
    assert_non_null(strstr(why, "bad master address"));
    assert_int_equal(addr_of("*2\r\n$1\r\nh\r\n$5\r\n65536\r\n", host, &port, why), -1);
    assert_int_equal(addr_of("*2\r\n$0\r\n\r\n$4\r\n6379\r\n", host, &port, why), -1);
    assert_int_equal(addr_of("*1\r\n$1\r\nh\r\n", host, &port, why), -1);
    assert_non_null(strstr(why, "unexpected reply"));
    assert_int_equal(addr_of(":1\r\n", host, &port, why), -1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parse_addr),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
