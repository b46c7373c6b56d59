/* Unit tests for redisurl.c: parsing Redis target URLs and redacting them.
 *
 * Table-driven: each good URL lists every field it should produce; each bad
 * URL lists a fragment the error must contain. Every error and redaction is
 * also checked for the password never appearing. */
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <cmocka.h>

#include "redisurl.h"

typedef struct GoodCase {
    const char *url;
    RedisUrlKind kind;
    const char *host;
    int port;
    const char *path;
    const char *user;
    const char *password;
    bool has_password;
    int db;
    const char *seeds;
    const char *describe;
} GoodCase;

static const GoodCase good[] = {
    {"redis://127.0.0.1:6379", REDISURL_TCP, "127.0.0.1", 6379, "", "", "", false, 0, "",
     "127.0.0.1:6379"},
    {"redis://localhost", REDISURL_TCP, "localhost", 6379, "", "", "", false, 0, "",
     "localhost:6379"},
    {"redis://cache-1.internal_zone.example:7001/3", REDISURL_TCP, "cache-1.internal_zone.example",
     7001, "", "", "", false, 3, "", "cache-1.internal_zone.example:7001"},
    {"redis://h/", REDISURL_TCP, "h", 6379, "", "", "", false, 0, "", "h:6379"},
    {"redis://h:1/0", REDISURL_TCP, "h", 1, "", "", "", false, 0, "", "h:1"},
    {"redis://h:65535/15", REDISURL_TCP, "h", 65535, "", "", "", false, 15, "", "h:65535"},
    {"redis://alice:s3cret@10.0.0.5:6380/2", REDISURL_TCP, "10.0.0.5", 6380, "", "alice", "s3cret",
     true, 2, "", "10.0.0.5:6380"},
    {"redis://:onlypass@h", REDISURL_TCP, "h", 6379, "", "", "onlypass", true, 0, "", "h:6379"},
    {"redis://:@h", REDISURL_TCP, "h", 6379, "", "", "", true, 0, "", "h:6379"},
    {"redis://us%40er:p%3Aa%2Fs%40s%25@h:7000", REDISURL_TCP, "h", 7000, "", "us@er", "p:a/s@s%",
     true, 0, "", "h:7000"},
    {"redis://u:p@ss@h", REDISURL_TCP, "h", 6379, "", "u", "p@ss", true, 0, "", "h:6379"},
    {"redis://u:pa/ss@h/4", REDISURL_TCP, "h", 6379, "", "u", "pa/ss", true, 4, "", "h:6379"},
    {"redis://[::1]:6380/1", REDISURL_TCP, "::1", 6380, "", "", "", false, 1, "", "[::1]:6380"},
    {"redis://[::ffff:10.0.0.1]", REDISURL_TCP, "::ffff:10.0.0.1", 6379, "", "", "", false, 0, "",
     "[::ffff:10.0.0.1]:6379"},
    {"redis://:pw@[2001:db8::7]:7000/9", REDISURL_TCP, "2001:db8::7", 7000, "", "", "pw", true, 9,
     "", "[2001:db8::7]:7000"},
    {"unix:///run/redis/redis.sock", REDISURL_UNIX, "", 6379, "/run/redis/redis.sock", "", "",
     false, 0, "", "/run/redis/redis.sock"},
    {"unix:///tmp/r.sock?db=5", REDISURL_UNIX, "", 6379, "/tmp/r.sock", "", "", false, 5, "",
     "/tmp/r.sock"},
    {"unix://bob:pw%21@/tmp/r.sock?db=0", REDISURL_UNIX, "", 6379, "/tmp/r.sock", "bob", "pw!",
     true, 0, "", "/tmp/r.sock"},
    {"unix://:x@/var/a@b/r.sock", REDISURL_UNIX, "", 6379, "/var/a@b/r.sock", "", "x", true, 0, "",
     "/var/a@b/r.sock"},
    {"redis+cluster://10.0.0.1:7000", REDISURL_CLUSTER, "10.0.0.1", 7000, "", "", "", false, 0,
     "10.0.0.1:7000", "10.0.0.1:7000"},
    {"redis+cluster://:pw@a:7000,b,[::1]:7002/", REDISURL_CLUSTER, "a", 7000, "", "", "pw", true, 0,
     "a:7000,b:6379,[::1]:7002", "a:7000,b:6379,[::1]:7002"},
};

static void test_good_urls(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++) {
        const GoodCase *g = &good[i];
        RedisUrl u;
        char err[512] = "";
        char desc[300];
        print_message("good: %s\n", g->url);
        assert_int_equal(redisurl_parse(g->url, &u, err, sizeof err), 0);
        assert_string_equal(err, "");
        assert_int_equal(u.kind, g->kind);
        assert_string_equal(u.host, g->host);
        assert_int_equal(u.port, g->port);
        assert_string_equal(u.path, g->path);
        assert_string_equal(u.user, g->user);
        assert_string_equal(u.password, g->password);
        assert_int_equal(u.has_password, g->has_password);
        assert_int_equal(u.db, g->db);
        assert_string_equal(u.seeds, g->seeds);
        assert_string_equal(redisurl_describe(&u, desc, sizeof desc), g->describe);
    }
}

typedef struct BadCase {
    const char *url;
    const char *fragment; /* must appear in the error */
} BadCase;

static const BadCase bad[] = {
    {"", "empty URL"},
    {"http://h:6379", "unknown scheme"},
    {"redis:/h", "unknown scheme"},
    {"h:6379", "unknown scheme"},
    {"REDIS://h", "unknown scheme"},
    {"redis://h?cacert=/x", "needs TLS: use rediss://"},
    {"redis+cluster://h?insecure=1", "needs TLS"},
    {"rediss://h?cert=/c", "cert= and key= go together"},
    {"rediss://h?key=/k", "cert= and key= go together"},
    {"rediss://h?insecure=yes", "bad insecure \"yes\""},
    {"rediss://h?cacert=", "empty parameter cacert"},
    {"rediss://h?cacert=%zz", "bad percent-escape in parameter cacert"},
    {"redis://h?replicas=x", "bad replicas \"x\""},
    {"redis://h?replicas=101", "bad replicas"},
    {"redis://h?sentinel_user=u", "only for redis+sentinel://"},
    {"redis+sentinel://h", "missing master name"},
    {"redis+sentinel://h/", "missing master name"},
    {"redis+sentinel://h/my*master", "bad character '*' in the master name"},
    {"redis+sentinel://h/m/x", "bad database \"x\""},
    {"redis+sentinel://h/m?sentinel_user=u", "sentinel_user= needs sentinel_password="},
    {"rediss+cluster://a:1?db=2", "unknown parameter \"db\""},
    {"redis://", "missing host"},
    {"redis://:6379", "missing host"},
    {"redis://:pw@:6379/1", "missing host"},
    {"redis:///0", "missing host"},
    {"redis://h:", "bad port \"\""},
    {"redis://h:abc", "bad port \"abc\""},
    {"redis://h:0", "bad port \"0\""},
    {"redis://h:65536", "bad port \"65536\""},
    {"redis://h:99999999999", "bad port"},
    {"redis://h:-1", "bad port"},
    {"redis://h:6379x", "bad port \"6379x\""},
    {"redis://h/x", "bad database \"x\""},
    {"redis://h/-1", "bad database \"-1\""},
    {"redis://h/1/2", "bad database \"1/2\""},
    {"redis://h/99999999999", "bad database"},
    {"redis://h/0?db=1", "unknown parameter \"db\""},
    {"redis://h?x", "bad parameter \"x\" (want name=value)"},
    {"redis://h#frag", "bad character '#'"},
    {"redis://ho st", "bad character ' '"},
    {"redis://[::1", "unterminated IPv6"},
    {"redis://[]:6379", "missing host"},
    {"redis://[::1]x", "unexpected \"x\" after the host"},
    {"redis://[::g]", "bad character 'g'"},
    {"redis://[fe80::1%25eth0]", "bad character '%'"},
    {"redis://u:p%zz@h", "bad percent-escape in the password"},
    {"redis://u:p%4@h", "bad percent-escape in the password"},
    {"redis://u:p%00@h", "bad percent-escape in the password"},
    {"redis://u%g1:p@h", "bad percent-escape in the user name"},
    {"redis://secretword@h", "without a password"},
    {"unix://", "absolute socket path"},
    {"unix://relative.sock", "absolute socket path"},
    {"unix:///", "missing socket path"},
    {"unix:///tmp/r.sock?db=x", "bad database \"x\""},
    {"unix:///tmp/r.sock?db=", "bad database \"\""},
    {"unix:///tmp/r.sock?timeout=1", "unknown parameter \"timeout\""},
    {"redis+cluster://", "missing host"},
    {"redis+cluster://a:7000,,b:7001", "missing host"},
    {"redis+cluster://a:7000,b:x", "bad port \"x\""},
    {"redis+cluster://a:7000/1", "only database 0"},
};

static void test_bad_urls(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        RedisUrl u;
        char err[512] = "";
        print_message("bad: %s\n", bad[i].url);
        assert_int_equal(redisurl_parse(bad[i].url, &u, err, sizeof err), -1);
        assert_non_null(strstr(err, "invalid redis URL"));
        if (strstr(err, bad[i].fragment) == NULL)
            fail_msg("error \"%s\" lacks \"%s\"", err, bad[i].fragment);
    }
}

static void test_long_fields(void **state)
{
    char url[2048], err[512];
    RedisUrl u;
    (void)state;

    memset(url, 0, sizeof url);
    strcpy(url, "redis://");
    memset(url + 8, 'h', 300);
    assert_int_equal(redisurl_parse(url, &u, err, sizeof err), -1);
    assert_non_null(strstr(err, "host longer than 255"));

    snprintf(url, sizeof url, "redis://:%0300d@h", 7);
    assert_int_equal(redisurl_parse(url, &u, err, sizeof err), -1);
    assert_non_null(strstr(err, "password longer than 255"));
    assert_null(strstr(err, "0000000007"));

    /* 255 bytes of password fit exactly. */
    snprintf(url, sizeof url, "redis://:%0255d@h", 7);
    assert_int_equal(redisurl_parse(url, &u, err, sizeof err), 0);
    assert_int_equal(strlen(u.password), 255);

    snprintf(url, sizeof url, "unix:///%0300d", 1);
    assert_int_equal(redisurl_parse(url, &u, err, sizeof err), -1);
    assert_non_null(strstr(err, "socket path longer"));

    assert_int_equal(redisurl_parse(NULL, &u, err, sizeof err), -1);
    /* A tiny error buffer is truncated, not overrun. */
    char small[8];
    assert_int_equal(redisurl_parse("redis://h:0", &u, small, sizeof small), -1);
    assert_int_equal(strlen(small), sizeof small - 1);
}

typedef struct RedactCase {
    const char *url;
    const char *want;
} RedactCase;

static const RedactCase redact[] = {
    {"redis://alice:s3cret@h:6379/2", "redis://alice:***@h:6379/2"},
    {"redis://:s3cret@h", "redis://:***@h"},
    {"redis://s3cret@h", "redis://***@h"},
    {"redis://u:p@ss:s3cret@h", "redis://u:***@h"},
    {"redis://u:s3/cret@h/1", "redis://u:***@h/1"},
    {"redis://h:6379/0", "redis://h:6379/0"},
    {"unix://bob:s3cret@/tmp/r.sock?db=1", "unix://bob:***@/tmp/r.sock?db=1"},
    {"unix:///tmp/a@b.sock", "unix:///tmp/a@b.sock"},
    {"redis+cluster://:s3cret@a:1,b:2", "redis+cluster://:***@a:1,b:2"},
    {"ftp://u:s3cret@h", "ftp://u:***@h"},
    {"u:s3cret@h", "u:***@h"},
    {"s3cret@h", "***@h"},
    {"redis+sentinel://:s3cret@s1,s2/m?sentinel_password=s3cret&replicas=1",
     "redis+sentinel://:***@s1,s2/m?sentinel_password=***&replicas=1"},
    {"redis+sentinel://s1/m?replicas=1&sentinel_password=s3cret",
     "redis+sentinel://s1/m?replicas=1&sentinel_password=***"},
    {"", ""},
};

static void test_redact(void **state)
{
    char buf[256];
    (void)state;
    for (size_t i = 0; i < sizeof redact / sizeof redact[0]; i++) {
        assert_string_equal(redisurl_redact(redact[i].url, buf, sizeof buf), redact[i].want);
        assert_null(strstr(buf, "s3cret"));
    }
    assert_string_equal(redisurl_redact(NULL, buf, sizeof buf), "");
    char tiny[10];
    redisurl_redact("redis://u:s3cret@h", tiny, sizeof tiny);
    assert_string_equal(tiny, "redis://u");
}

/* TLS, replicas and Sentinel parameters. */
static void test_params(void **state)
{
    RedisUrl u;
    char err[512], desc[300];
    (void)state;

    assert_int_equal(redisurl_parse("rediss://alice:pw@cache.example:6380/2?cacert=/etc/ca%20x.pem"
                                    "&cert=/c.pem&key=/k.pem&sni=redis.internal&replicas=2",
                                    &u, err, sizeof err),
                     0);
    assert_int_equal(u.kind, REDISURL_TCP);
    assert_true(u.tls);
    assert_false(u.insecure);
    assert_string_equal(u.host, "cache.example");
    assert_int_equal(u.port, 6380);
    assert_int_equal(u.db, 2);
    assert_string_equal(u.cacert, "/etc/ca x.pem");
    assert_string_equal(u.cert, "/c.pem");
    assert_string_equal(u.key, "/k.pem");
    assert_string_equal(u.sni, "redis.internal");
    assert_int_equal(u.replicas, 2);

    assert_int_equal(redisurl_parse("redis://h", &u, err, sizeof err), 0);
    assert_false(u.tls);
    assert_int_equal(u.replicas, 0);

    assert_int_equal(
        redisurl_parse("rediss+cluster://a:7000,b:7001?insecure=1", &u, err, sizeof err), 0);
    assert_int_equal(u.kind, REDISURL_CLUSTER);
    assert_true(u.tls);
    assert_true(u.insecure);
    assert_string_equal(u.seeds, "a:7000,b:7001");

    assert_int_equal(redisurl_parse("unix:///tmp/r.sock?replicas=1&db=3", &u, err, sizeof err), 0);
    assert_int_equal(u.db, 3);
    assert_int_equal(u.replicas, 1);

    assert_int_equal(redisurl_parse("redis+sentinel://:mpw@s1,s2:26380,[::1]/mymaster/4"
                                    "?sentinel_user=sen&sentinel_password=spw%21&replicas=1",
                                    &u, err, sizeof err),
                     0);
    assert_int_equal(u.kind, REDISURL_SENTINEL);
    assert_false(u.tls);
    assert_string_equal(u.seeds, "s1:26379,s2:26380,[::1]:26379");
    assert_string_equal(u.master_name, "mymaster");
    assert_int_equal(u.db, 4);
    assert_string_equal(u.password, "mpw");
    assert_string_equal(u.sentinel_user, "sen");
    assert_string_equal(u.sentinel_password, "spw!");
    assert_true(u.sentinel_has_password);
    assert_string_equal(redisurl_describe(&u, desc, sizeof desc),
                        "mymaster@s1:26379,s2:26380,[::1]:26379");

    assert_int_equal(redisurl_parse("rediss+sentinel://s1/m", &u, err, sizeof err), 0);
    assert_true(u.tls);
    assert_int_equal(u.port, 26379);
}

/* Bad URLs that carry a password: the error quotes the URL redacted. */
static void test_errors_never_show_password(void **state)
{
    static const char *const urls[] = {
        "redis://u:s3cret@h:0",
        "redis://u:s3cret@h/x",
        "redis://u:s3cret@",
        "redis://:s3cret%zz@h",
        "unix://u:s3cret@/",
        "unix://u:s3cret@/tmp/s?db=q",
        "rediss://u:s3cret@h?cert=c",
        "http://u:s3cret@h",
        "redis+cluster://:s3cret@a:1/2",
        "redis://s3cret@h",
        /* found by fuzz_redisurl: a relative unix path has no "@/" */
        "unix://u:s3cret@relative.sock",
        "unix://alice:p%40s3cret@h:1",
    };
    (void)state;
    for (size_t i = 0; i < sizeof urls / sizeof urls[0]; i++) {
        RedisUrl u;
        char err[512];
        assert_int_equal(redisurl_parse(urls[i], &u, err, sizeof err), -1);
        print_message("%s\n", err);
        assert_null(strstr(err, "s3cret"));
        assert_non_null(strstr(err, "***"));
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_good_urls),   cmocka_unit_test(test_bad_urls),
        cmocka_unit_test(test_long_fields), cmocka_unit_test(test_redact),
        cmocka_unit_test(test_params),      cmocka_unit_test(test_errors_never_show_password),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
