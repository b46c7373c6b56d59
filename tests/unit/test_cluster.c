/*
 * test_cluster.c — cmocka tests of the pure part of cluster.c: CRC16 and
 * key slots against the Redis Cluster specification's reference values
 * (and values read back from a real cluster with CLUSTER KEYSLOT), hash-tag
 * rules, -MOVED/-ASK parsing, and CLUSTER SLOTS parsing from RESP text fed
 * through hiredis' own reader (the bytes a Redis 7 node sends).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "cluster.h"

static unsigned slot_of(const char *key)
{
    return cluster_keyslot(key, strlen(key));
}

static void test_crc16_reference(void **state)
{
    (void)state;
    /* The cluster spec: "CRC-16/XMODEM ... Output for "123456789": 31C3". */
    assert_int_equal(cluster_crc16("123456789", 9), 0x31C3);
    assert_int_equal(cluster_crc16("", 0), 0);
    /* One byte: the table entry for 'A' (0x41) in the XMODEM table. */
    assert_int_equal(cluster_crc16("A", 1), 0x58E5);
}

typedef struct SlotCase {
    const char *key;
    unsigned slot; /* CLUSTER KEYSLOT on Redis 7.0 */
} SlotCase;

static const SlotCase slot_cases[] = {
    {"123456789", 12739},
    {"foo", 12182},
    {"bar", 5061},
    {"user1000", 3443},
    {"{user1000}.following", 3443},
    {"{user1000}.followers", 3443},
    {"foo{}{bar}", 8363},    /* empty first tag: the whole key is hashed */
    {"foo{{bar}}zap", 4015}, /* the tag is "{bar" */
    {"foo{bar}{zap}", 5061}, /* only the first tag counts: "bar" */
    {"{}", 15257},
    {"a{b", 13340}, /* no closing brace: whole key */
    {"tag:user:42", 11937},
    {"", 0},
};

static void test_keyslot_table(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof slot_cases / sizeof slot_cases[0]; i++) {
        unsigned got = slot_of(slot_cases[i].key);
        if (got != slot_cases[i].slot)
            fail_msg("keyslot(\"%s\") = %u, want %u", slot_cases[i].key, got, slot_cases[i].slot);
    }
}

static void test_keyslot_hash_tag_rules(void **state)
{
    (void)state;
    /* Keys sharing a tag share a slot whatever surrounds the tag. */
    assert_int_equal(slot_of("x{order:7}y"), slot_of("order:7"));
    assert_int_equal(slot_of("{order:7}"), slot_of("zzz{order:7}"));
    /* The first '{' and the first '}' after it delimit the tag. */
    assert_int_equal(slot_of("foo{{bar}}zap"), cluster_keyslot("{bar", 4));
    assert_int_equal(slot_of("foo{bar}{zap}"), slot_of("bar"));
    /* An empty tag, or no closing brace: the whole key is hashed. */
    assert_int_equal(slot_of("foo{}{bar}"), cluster_crc16("foo{}{bar}", 10) & 16383);
    assert_int_equal(slot_of("a}b{c"), cluster_crc16("a}b{c", 5) & 16383);
    /* Length-delimited: bytes after len are not part of the key, NULs are. */
    assert_int_equal(cluster_keyslot("foobar", 3), slot_of("foo"));
    assert_int_equal(cluster_keyslot("a\0{b}", 5), slot_of("b"));
    /* Every slot is in range. */
    for (int i = 0; i < 5000; i++) {
        char k[32];
        int n = snprintf(k, sizeof k, "key:%d", i);
        assert_true(cluster_keyslot(k, (size_t)n) < CLUSTER_SLOTS);
    }
}

static void test_parse_redirect(void **state)
{
    char host[64];
    int port = 0;
    unsigned slot = 0;

    (void)state;
    assert_int_equal(
        cluster_parse_redirect("MOVED 3999 127.0.0.1:6381", &slot, host, sizeof host, &port),
        CLUSTER_REDIRECT_MOVED);
    assert_int_equal(slot, 3999);
    assert_string_equal(host, "127.0.0.1");
    assert_int_equal(port, 6381);

    assert_int_equal(
        cluster_parse_redirect("ASK 16383 10.0.0.5:7002", &slot, host, sizeof host, &port),
        CLUSTER_REDIRECT_ASK);
    assert_int_equal(slot, 16383);
    assert_string_equal(host, "10.0.0.5");
    assert_int_equal(port, 7002);

    /* IPv6, bare (as Redis writes it) and bracketed; empty host. */
    assert_int_equal(cluster_parse_redirect("MOVED 1 ::1:7000", &slot, host, sizeof host, &port),
                     CLUSTER_REDIRECT_MOVED);
    assert_string_equal(host, "::1");
    assert_int_equal(port, 7000);
    assert_int_equal(
        cluster_parse_redirect("ASK 2 [fe80::1]:7001", &slot, host, sizeof host, &port),
        CLUSTER_REDIRECT_ASK);
    assert_string_equal(host, "fe80::1");
    assert_int_equal(cluster_parse_redirect("MOVED 5 :7005", &slot, host, sizeof host, &port),
                     CLUSTER_REDIRECT_MOVED);
    assert_string_equal(host, "");
    assert_int_equal(port, 7005);
}

static void test_parse_redirect_rejects(void **state)
{
    static const char *bad[] = {
        "ERR wrong number of arguments",
        "MOVED",
        "MOVED 16384 127.0.0.1:7000", /* slot out of range */
        "MOVED x 127.0.0.1:7000",
        "MOVED 12 127.0.0.1",       /* no port */
        "MOVED 12 127.0.0.1:",      /* empty port */
        "MOVED 12 127.0.0.1:70000", /* port out of range */
        "MOVED 12 127.0.0.1:7a",
        "ASK 12",
        "CLUSTERDOWN The cluster is down",
        "TRYAGAIN Multiple keys request during rehashing of slot",
        "moved 12 127.0.0.1:7000", /* case matters: Redis sends upper case */
    };
    char host[64];
    int port;
    unsigned slot;

    (void)state;
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        if (cluster_parse_redirect(bad[i], &slot, host, sizeof host, &port) !=
            CLUSTER_REDIRECT_NONE)
            fail_msg("accepted \"%s\"", bad[i]);
    /* A host that does not fit the buffer is refused, not cut. */
    assert_int_equal(
        cluster_parse_redirect("MOVED 1 very-long-host-name:7000", &slot, host, 8, &port),
        CLUSTER_REDIRECT_NONE);
}

/* Parse RESP text into a reply with hiredis' reader (caller frees). */
static redisReply *resp(const char *text)
{
    redisReader *rd = redisReaderCreate();
    void *r = NULL;

    assert_non_null(rd);
    assert_int_equal(redisReaderFeed(rd, text, strlen(text)), REDIS_OK);
    assert_int_equal(redisReaderGetReply(rd, &r), REDIS_OK);
    assert_non_null(r);
    redisReaderFree(rd);
    return r;
}

/* Three masters with one replica each, Redis 7 shape: every node entry is
 * [ip, port, id, {hostname map}] (the map is an empty array in RESP2). */
static const char slots_3m[] = "*3\r\n"
                               "*4\r\n:0\r\n:5460\r\n"
                               "*4\r\n$9\r\n127.0.0.1\r\n:7000\r\n$3\r\naaa\r\n*0\r\n"
                               "*4\r\n$9\r\n127.0.0.1\r\n:7003\r\n$3\r\nddd\r\n*0\r\n"
                               "*4\r\n:5461\r\n:10922\r\n"
                               "*4\r\n$9\r\n127.0.0.1\r\n:7001\r\n$3\r\nbbb\r\n*0\r\n"
                               "*4\r\n$9\r\n127.0.0.1\r\n:7004\r\n$3\r\neee\r\n*0\r\n"
                               "*3\r\n:10923\r\n:16383\r\n"
                               "*3\r\n$1\r\n?\r\n:7002\r\n$3\r\nccc\r\n";

static void test_parse_slots(void **state)
{
    redisReply *r = resp(slots_3m);
    char err[128] = "";
    size_t n = 0;
    ClusterRange *rg;
    unsigned covered = 0;

    (void)state;
    rg = cluster_parse_slots(r, &n, err, sizeof err);
    assert_non_null(rg);
    assert_int_equal(n, 3);
    assert_int_equal(rg[0].first, 0);
    assert_int_equal(rg[0].last, 5460);
    assert_string_equal(rg[0].host, "127.0.0.1");
    assert_int_equal(rg[0].port, 7000); /* the master, not the replica */
    assert_int_equal(rg[0].replicas, 1);
    assert_int_equal(rg[2].replicas, 0);
    assert_int_equal(rg[1].port, 7001);
    assert_string_equal(rg[2].host, ""); /* "?" = unknown address */
    assert_int_equal(rg[2].port, 7002);
    for (size_t i = 0; i < n; i++)
        covered += rg[i].last - rg[i].first + 1;
    assert_int_equal(covered, CLUSTER_SLOTS);
    free(rg);
    freeReplyObject(r);
}

static void test_parse_slots_rejects(void **state)
{
    static const char *bad[] = {
        "-ERR This instance has cluster support disabled\r\n",
        "*0\r\n",                                                  /* no slot */
        "*1\r\n*2\r\n:0\r\n:10\r\n",                               /* no master */
        "*1\r\n*3\r\n:10\r\n:5\r\n*2\r\n$1\r\nh\r\n:1\r\n",        /* first > last */
        "*1\r\n*3\r\n:0\r\n:16384\r\n*2\r\n$1\r\nh\r\n:1\r\n",     /* past the last slot */
        "*1\r\n*3\r\n:0\r\n:5\r\n*2\r\n$1\r\nh\r\n$4\r\n7000\r\n", /* port as string */
        "*1\r\n*3\r\n:0\r\n:5\r\n*1\r\n$1\r\nh\r\n",               /* no port */
        "*1\r\n*3\r\n:0\r\n:5\r\n*2\r\n$1\r\nh\r\n:0\r\n",         /* port 0 */
    };
    (void)state;
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        redisReply *r = resp(bad[i]);
        char err[128] = "";
        size_t n = 99;
        ClusterRange *rg = cluster_parse_slots(r, &n, err, sizeof err);
        if (rg != NULL)
            fail_msg("accepted case %zu", i);
        assert_int_equal(n, 0);
        assert_true(err[0] != '\0');
        freeReplyObject(r);
    }
    {
        redisReply *r = resp(bad[0]);
        char err[128];
        size_t n;
        assert_null(cluster_parse_slots(r, &n, err, sizeof err));
        assert_non_null(strstr(err, "cluster support disabled"));
        freeReplyObject(r);
    }
}

/* A client that was never connected: not connected, no masters, and an
 * exec against unreachable seeds fails with a message naming them. */
static void test_unreachable_seed(void **state)
{
    ClusterConfig cfg = {
        .seeds = "127.0.0.1:1", .connect_timeout_ms = 500, .command_timeout_ms = 500};
    Cluster *c = cluster_new(&cfg);
    const char *argv[2] = {"UNLINK", "k"};
    size_t lens[2] = {6, 1};

    (void)state;
    assert_false(cluster_connected(c));
    assert_int_equal(cluster_master_count(c), 0);
    assert_int_equal(cluster_append_key(c, 1, 2, argv, lens), 0);
    assert_int_equal(cluster_queued(c), 1);
    assert_int_equal(cluster_exec(c), -1);
    assert_non_null(strstr(cluster_errstr(c), "127.0.0.1:1"));
    assert_int_equal(cluster_connect(c), -1);
    assert_false(cluster_connected(c));
    cluster_reset(c);
    assert_int_equal(cluster_queued(c), 0);
    cluster_free(c);
    cluster_free(NULL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_crc16_reference),        cmocka_unit_test(test_keyslot_table),
        cmocka_unit_test(test_keyslot_hash_tag_rules), cmocka_unit_test(test_parse_redirect),
        cmocka_unit_test(test_parse_redirect_rejects), cmocka_unit_test(test_parse_slots),
        cmocka_unit_test(test_parse_slots_rejects),    cmocka_unit_test(test_unreachable_seed),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
