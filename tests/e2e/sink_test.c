/*
 * sink_test.c — integration tests for the Redis sink against a real Redis.
 *
 * The Redis under test is named by WALBUST_REDIS (start one with
 * `scripts/stack start DIR` and source DIR/env); the program fails, rather
 * than skips, when it is unset. Keys are prefixed with a per-run id so the
 * tests never touch anything else in that Redis. Tests that need a password,
 * a unix socket or a server that goes away start their own redis-server on a
 * free loopback port (and stop it by pid). A second hiredis connection (the
 * "admin" connection) prepares data and checks what the sink did; a third
 * one subscribes to check publishes.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <hiredis/hiredis.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "redisurl.h"
#include "sink.h"

static const char *redis_env; /* WALBUST_REDIS */
static RedisUrl main_url;
static redisContext *admin; /* to the Redis under test */
static char run_id[32];

/* ---- helpers: keys, admin commands ------------------------------------ */

/* "st<pid>:<suffix>" in one of 32 rotating buffers. */
static const char *k(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static const char *k(const char *fmt, ...)
{
    static char ring[32][256];
    static unsigned next;
    char *buf = ring[next++ % 32];
    int n = snprintf(buf, sizeof ring[0], "%s:", run_id);
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(buf + n, sizeof ring[0] - (size_t)n, fmt, ap);
    va_end(ap);
    return buf;
}

static redisReply *cmd_on(redisContext *c, const char *fmt, ...)
{
    va_list ap;
    redisReply *r;

    va_start(ap, fmt);
    r = redisvCommand(c, fmt, ap);
    va_end(ap);
    if (r == NULL)
        fail_msg("redis command \"%s\" failed: %s", fmt, c->errstr);
    return r;
}

#define cmd(...) cmd_on(admin, __VA_ARGS__)

static void set_key(const char *key, const char *val)
{
    freeReplyObject(cmd("SET %s %s", key, val));
}

static bool exists(const char *key)
{
    redisReply *r = cmd("EXISTS %s", key);
    bool yes = r->integer == 1;
    freeReplyObject(r);
    return yes;
}

/* Integer value of key, or -1 when missing. */
static long long get_int(const char *key)
{
    redisReply *r = cmd("GET %s", key);
    long long v = r->type == REDIS_REPLY_STRING ? strtoll(r->str, NULL, 10) : -1;
    freeReplyObject(r);
    return v;
}

/* SET <prefix><i> for i in [0, n), pipelined. */
static void fill(redisContext *c, const char *prefix, int n)
{
    for (int i = 0; i < n; i++)
        redisAppendCommand(c, "SET %s%d v", prefix, i);
    for (int i = 0; i < n; i++) {
        void *r;
        assert_int_equal(redisGetReply(c, &r), REDIS_OK);
        freeReplyObject(r);
    }
}

static long count_prefix(const char *prefix)
{
    redisReply *r = cmd("KEYS %s*", prefix);
    long n = (long)r->elements;
    freeReplyObject(r);
    return n;
}

/* calls=N of one command in c's INFO commandstats (0 when never called). */
static long calls_on(redisContext *c, const char *name)
{
    redisReply *r = cmd_on(c, "INFO commandstats");
    char needle[64];
    const char *p;
    long calls = 0;

    snprintf(needle, sizeof needle, "cmdstat_%s:calls=", name);
    p = strstr(r->str, needle);
    if (p != NULL)
        calls = strtol(p + strlen(needle), NULL, 10);
    freeReplyObject(r);
    return calls;
}

static long cmdstat_calls(const char *name)
{
    return calls_on(admin, name);
}

static void sadd_members(const char *set, const char *prefix, int n, bool create_keys);

static void add(Sink *s, RulesInvAction a, const char *str)
{
    sink_add(s, a, str, strlen(str), NULL, 0);
}

static Sink *new_sink_url(const char *url, bool use_del, int command_timeout_ms)
{
    SinkConfig cfg = {.use_del = use_del, .command_timeout_ms = command_timeout_ms};
    char err[512];

    if (redisurl_parse(url, &cfg.url, err, sizeof err) != 0)
        fail_msg("%s", err);
    return sink_new(&cfg);
}

static Sink *new_sink(void)
{
    return new_sink_url(redis_env, false, 0);
}

static void must_flush(Sink *s)
{
    if (sink_flush(s) != 0)
        fail_msg("sink_flush failed: %s", sink_errstr(s));
    assert_false(sink_dirty(s));
    assert_int_equal(sink_pending(s), 0);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* ---- helpers: a private redis-server ------------------------------------ */

typedef struct Server {
    pid_t pid;
    int port;
    char dir[64];
    char sock[128];
    char pass[64];
} Server;

static Server srv;

static int free_port(void)
{
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    int fd = socket(AF_INET, SOCK_STREAM, 0);

    assert_true(fd >= 0);
    assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof a), 0);
    assert_int_equal(getsockname(fd, (struct sockaddr *)&a, &len), 0);
    close(fd);
    return ntohs(a.sin_port);
}

/* Connect to the private server as the default user (AUTH when it has a
 * password). NULL when it does not answer yet. */
static redisContext *srv_connect(const Server *sv)
{
    struct timeval tv = {1, 0};
    redisContext *c = redisConnectWithTimeout("127.0.0.1", sv->port, tv);
    redisReply *r;

    if (c == NULL || c->err)
        goto fail;
    redisSetTimeout(c, tv);
    if (sv->pass[0] != '\0') {
        r = redisCommand(c, "AUTH %s", sv->pass);
        if (r == NULL || r->type == REDIS_REPLY_ERROR)
            goto fail_reply;
        freeReplyObject(r);
    }
    r = redisCommand(c, "PING");
    if (r == NULL || r->type != REDIS_REPLY_STATUS)
        goto fail_reply;
    freeReplyObject(r);
    return c;
fail_reply:
    if (r != NULL)
        freeReplyObject(r);
fail:
    if (c != NULL)
        redisFree(c);
    return NULL;
}

/* Start redis-server on sv->port (picked on first start, reused after),
 * with sv->pass as requirepass when set, and a unix socket in sv->dir. */
static void srv_start(Server *sv)
{
    char port[16];
    const char *argv[20];
    int n = 0;

    if (sv->port == 0) {
        snprintf(sv->dir, sizeof sv->dir, "/tmp/sink_test.XXXXXX");
        assert_non_null(mkdtemp(sv->dir));
        snprintf(sv->sock, sizeof sv->sock, "%s/redis.sock", sv->dir);
        sv->port = free_port();
    }
    snprintf(port, sizeof port, "%d", sv->port);
    argv[n++] = "redis-server";
    argv[n++] = "--port", argv[n++] = port;
    argv[n++] = "--bind", argv[n++] = "127.0.0.1";
    argv[n++] = "--save", argv[n++] = "";
    argv[n++] = "--appendonly", argv[n++] = "no";
    argv[n++] = "--dir", argv[n++] = sv->dir;
    argv[n++] = "--unixsocket", argv[n++] = sv->sock;
    if (sv->pass[0] != '\0')
        argv[n++] = "--requirepass", argv[n++] = sv->pass;
    argv[n] = NULL;

    sv->pid = fork();
    assert_true(sv->pid >= 0);
    if (sv->pid == 0) {
        int null = open("/dev/null", O_WRONLY);
        dup2(null, 1);
        dup2(null, 2);
        execvp("redis-server", (char *const *)argv);
        _exit(127);
    }
    for (int i = 0; i < 200; i++) {
        redisContext *c = srv_connect(sv);
        if (c != NULL) {
            redisFree(c);
            return;
        }
        usleep(25 * 1000);
    }
    fail_msg("private redis-server on port %d did not start", sv->port);
}

static void srv_stop(Server *sv)
{
    if (sv->pid > 0) {
        kill(sv->pid, SIGTERM);
        waitpid(sv->pid, NULL, 0);
        sv->pid = 0;
    }
}

static int srv_teardown(void **state)
{
    (void)state;
    srv_stop(&srv);
    if (srv.dir[0] != '\0') {
        unlink(srv.sock);
        rmdir(srv.dir);
    }
    memset(&srv, 0, sizeof srv);
    return 0;
}

/* ---- keys ------------------------------------------------------------- */

static void check_keys_deleted(bool use_del)
{
    Sink *s = new_sink_url(redis_env, use_del, 0);
    const char *mode = use_del ? "del" : "unlink";

    set_key(k("%s:a", mode), "1");
    set_key(k("%s:b", mode), "1");
    set_key(k("%s:keep", mode), "1");
    fill(admin, k("%s:many:", mode), 1200);
    freeReplyObject(cmd("CONFIG RESETSTAT"));

    add(s, RULES_INV_KEY, k("%s:a", mode));
    add(s, RULES_INV_KEY, k("%s:b", mode));
    add(s, RULES_INV_KEY, k("%s:absent", mode));
    for (int i = 0; i < 1200; i++)
        add(s, RULES_INV_KEY, k("%s:many:%d", mode, i));
    assert_int_equal(sink_pending(s), 1203);
    must_flush(s);

    assert_false(exists(k("%s:a", mode)));
    assert_false(exists(k("%s:b", mode)));
    assert_true(exists(k("%s:keep", mode)));
    assert_int_equal(count_prefix(k("%s:many:", mode)), 0);
    assert_int_equal(sink_stats(s)->keys, 1203);
    /* 1203 consecutive keys travel in ceil(1203/512) = 3 commands. */
    assert_int_equal(cmdstat_calls(use_del ? "del" : "unlink"), 3);
    assert_int_equal(cmdstat_calls(use_del ? "unlink" : "del"), 0);
    sink_free(s);
}

static void test_keys_unlink(void **state)
{
    (void)state;
    check_keys_deleted(false);
}

static void test_keys_del(void **state)
{
    (void)state;
    check_keys_deleted(true);
}

static void test_set_use_del(void **state)
{
    Sink *s = new_sink();
    (void)state;

    set_key(k("toggle"), "1");
    sadd_members(k("tag:toggle"), k("toggle:m"), 3, true);
    freeReplyObject(cmd("CONFIG RESETSTAT"));
    sink_set_use_del(s, true);
    add(s, RULES_INV_KEY, k("toggle"));
    add(s, RULES_INV_TAG, k("tag:toggle"));
    must_flush(s);
    assert_false(exists(k("toggle")));
    assert_false(exists(k("tag:toggle")));
    /* One DEL for the key; the tag script deletes members and set with DEL. */
    assert_int_equal(cmdstat_calls("del"), 3);
    assert_int_equal(cmdstat_calls("unlink"), 0);

    sink_set_use_del(s, false);
    sadd_members(k("tag:toggle"), k("toggle:m"), 3, true);
    freeReplyObject(cmd("CONFIG RESETSTAT"));
    add(s, RULES_INV_TAG, k("tag:toggle"));
    must_flush(s);
    assert_int_equal(cmdstat_calls("unlink"), 2);
    assert_int_equal(cmdstat_calls("del"), 0);
    sink_free(s);
}

/* Keys with NUL, spaces, quotes and CRLF are sent binary-safe. */
static void test_binary_key(void **state)
{
    char key[64];
    size_t n = (size_t)snprintf(key, sizeof key, "%s:bin \"x\"\r\n", run_id);
    Sink *s = new_sink();
    (void)state;

    key[n++] = '\0';
    key[n++] = 'z';
    freeReplyObject(cmd("SET %b v", key, n));
    freeReplyObject(cmd("SET %b v", key, n - 2)); /* the prefix before the NUL */
    sink_add(s, RULES_INV_KEY, key, n, NULL, 0);
    must_flush(s);
    redisReply *r = cmd("EXISTS %b", key, n);
    assert_int_equal(r->integer, 0);
    freeReplyObject(r);
    r = cmd("EXISTS %b", key, n - 2);
    assert_int_equal(r->integer, 1);
    freeReplyObject(r);
    sink_free(s);
}

/* ---- deduplication and bounds ------------------------------------------ */

static void test_dedupe(void **state)
{
    Sink *s = new_sink();
    (void)state;

    set_key(k("dd:key"), "1");
    for (int i = 0; i < 3; i++) {
        add(s, RULES_INV_KEY, k("dd:key"));
        add(s, RULES_INV_PATTERN, k("dd:pat:*"));
        add(s, RULES_INV_TAG, k("dd:tag"));
        add(s, RULES_INV_TAG_PATTERN, k("dd:tags:*"));
        add(s, RULES_INV_VERSION, k("dd:ver"));
        add(s, RULES_INV_VERSION_PATTERN, k("dd:vers:*"));
    }
    /* The same string under another action is a different invalidation. */
    add(s, RULES_INV_VERSION, k("dd:key"));
    assert_int_equal(sink_pending(s), 7);
    const char *msg = "{\"op\":\"update\"}";
    sink_add(s, RULES_INV_PUBLISH, k("dd:chan"), strlen(k("dd:chan")), msg, strlen(msg));
    sink_add(s, RULES_INV_PUBLISH, k("dd:chan"), strlen(k("dd:chan")), msg, strlen(msg));
    assert_int_equal(sink_pending(s), 9);
    assert_true(sink_dirty(s));
    must_flush(s);

    assert_int_equal(get_int(k("dd:ver")), 1); /* incremented once, not thrice */
    assert_int_equal(get_int(k("dd:key")), 1); /* deleted, then INCR'd after */
    const SinkStats *st = sink_stats(s);
    assert_int_equal(st->keys, 1);
    assert_int_equal(st->patterns, 1);
    assert_int_equal(st->tags, 2);
    assert_int_equal(st->versions, 3);
    assert_int_equal(st->publishes, 2);
    assert_int_equal(st->errors, 0);

    /* After a flush the same strings are queued again (a new batch). */
    add(s, RULES_INV_VERSION, k("dd:ver"));
    add(s, RULES_INV_VERSION, k("dd:ver"));
    assert_int_equal(sink_pending(s), 1);
    must_flush(s);
    assert_int_equal(get_int(k("dd:ver")), 2);
    sink_free(s);
}

/* ---- refresh and stale ops ------------------------------------------------ */

static void add_refresh(Sink *s, const char *key, const char *lsn, const char *row)
{
    char payload[256];
    int n = snprintf(payload, sizeof payload, "json%c%s%c0%c%s", 0, lsn, 0, 0, row);
    sink_add(s, RULES_INV_REFRESH, key, strlen(key), payload, (size_t)n);
}

/* Refresh ops keep their order and are fenced; a delete after a store in
 * the same batch is not merged with an earlier delete of the key. */
static void test_refresh_order_and_fence(void **state)
{
    Sink *s = new_sink();
    char fence[300];
    (void)state;

    add(s, RULES_INV_KEY, k("rf:a"));
    add_refresh(s, k("rf:a"), "0/10", "{\"v\":\"1\"}");
    add(s, RULES_INV_KEY, k("rf:a")); /* must run after the store */
    add_refresh(s, k("rf:b"), "0/10", "{\"v\":\"1\"}");
    add_refresh(s, k("rf:b"), "0/20", "{\"v\":\"2\"}");
    add_refresh(s, k("rf:b"), "0/15", "{\"v\":\"older\"}"); /* fenced: refused */
    assert_int_equal(sink_pending(s), 6);
    must_flush(s);
    assert_false(exists(k("rf:a")));
    redisReply *r = cmd("GET %s", k("rf:b"));
    assert_string_equal(r->str, "{\"v\":\"2\"}");
    freeReplyObject(r);
    snprintf(fence, sizeof fence, "walbust:fence:{%s}", k("rf:b"));
    r = cmd("GET %s", fence);
    assert_string_equal(r->str, "0/20");
    freeReplyObject(r);
    assert_int_equal(sink_stats(s)->refreshes, 4);
    assert_int_equal(sink_stats(s)->refresh_fenced, 1); /* the 0/15 one */

    /* A replay of an older commit is refused too and counted once. */
    add_refresh(s, k("rf:b"), "0/12", "{\"v\":\"replayed\"}");
    add_refresh(s, k("rf:c"), "0/12", "{\"v\":\"new\"}");
    must_flush(s);
    assert_int_equal(sink_stats(s)->refreshes, 6);
    assert_int_equal(sink_stats(s)->refresh_fenced, 2);

    /* stale: a plain value becomes a marker holding it */
    set_key(k("rf:page"), "old");
    char stale[] = "stale\0\0005\0";
    sink_add(s, RULES_INV_STALE, k("rf:page"), strlen(k("rf:page")), stale, sizeof stale - 1);
    must_flush(s);
    r = cmd("GET %s", k("rf:page"));
    assert_int_equal(r->len, 27);
    assert_memory_equal(r->str, "\0walbust-lease:stale:0::old", 27);
    freeReplyObject(r);
    sink_free(s);
}

static void test_full(void **state)
{
    SinkConfig cfg = {.url = main_url, .max_ops = 3};
    Sink *s = sink_new(&cfg);
    (void)state;

    assert_false(sink_full(s));
    assert_false(sink_dirty(s));
    add(s, RULES_INV_KEY, "a");
    add(s, RULES_INV_KEY, "a");
    add(s, RULES_INV_KEY, "b");
    assert_false(sink_full(s));
    add(s, RULES_INV_KEY, "c");
    assert_true(sink_full(s));
    sink_free(s);

    cfg.max_ops = 0;
    cfg.max_bytes = 4096;
    s = sink_new(&cfg);
    char big[1500];
    memset(big, 'x', sizeof big);
    sink_add(s, RULES_INV_PUBLISH, "c", 1, big, sizeof big);
    assert_false(sink_full(s));
    sink_add(s, RULES_INV_PUBLISH, "c", 1, big, sizeof big);
    sink_add(s, RULES_INV_PUBLISH, "c", 1, big, sizeof big);
    assert_true(sink_full(s));
    sink_free(s);
}

/* Nothing queued: flush succeeds without connecting. */
static void test_empty_flush(void **state)
{
    Sink *s = new_sink_url("redis://127.0.0.1:1", false, 0);
    (void)state;

    assert_int_equal(sink_flush(s), 0);
    assert_false(sink_connected(s));
    sink_free(s);
}

/* ---- patterns ------------------------------------------------------------ */

static void test_patterns(void **state)
{
    static const char *const deleted[] = {"p:a:1", "p:a:2", "p:*:lit", "p:c:x", "p:d:x", "p:?:q"};
    static const char *const kept[] = {"p:b:1", "p:x:lit", "p:ab:lit", "p:e:x",
                                       "q:a:1", "p:a",     "p:z:q"};
    Sink *s = new_sink();
    (void)state;

    for (size_t i = 0; i < sizeof deleted / sizeof deleted[0]; i++)
        set_key(k("%s", deleted[i]), "1");
    for (size_t i = 0; i < sizeof kept / sizeof kept[0]; i++)
        set_key(k("%s", kept[i]), "1");
    fill(admin, k("p:big:"), 3000);
    fill(admin, k("p:bigkeep:"), 3000);

    add(s, RULES_INV_PATTERN, k("p:a:*"));
    add(s, RULES_INV_PATTERN, k("p:\\*:lit")); /* escaped star: only the literal key */
    add(s, RULES_INV_PATTERN, k("p:[cd]:x"));  /* class */
    add(s, RULES_INV_PATTERN, k("p:\\?:q"));   /* escaped question mark */
    add(s, RULES_INV_PATTERN, k("p:big:*"));   /* many SCAN pages and UNLINK chunks */
    add(s, RULES_INV_PATTERN, k("nothing:*"));
    must_flush(s);

    for (size_t i = 0; i < sizeof deleted / sizeof deleted[0]; i++)
        if (exists(k("%s", deleted[i])))
            fail_msg("%s should have been deleted", deleted[i]);
    for (size_t i = 0; i < sizeof kept / sizeof kept[0]; i++)
        if (!exists(k("%s", kept[i])))
            fail_msg("%s should have been kept", kept[i]);
    assert_int_equal(count_prefix(k("p:big:")), 0);
    assert_int_equal(count_prefix(k("p:bigkeep:")), 3000);
    assert_int_equal(sink_stats(s)->patterns, 6);
    sink_free(s);
}

/* Batch order holds across a pattern: key, pattern, version in order. */
static void test_pattern_order(void **state)
{
    Sink *s = new_sink();
    (void)state;

    set_key(k("po:1"), "1");
    add(s, RULES_INV_VERSION, k("po:v"));     /* creates po:v = 1 ... */
    add(s, RULES_INV_PATTERN, k("po:*"));     /* ... which this pattern then deletes */
    add(s, RULES_INV_VERSION, k("po:after")); /* created after the SCAN */
    must_flush(s);
    assert_false(exists(k("po:1")));
    assert_false(exists(k("po:v")));
    assert_int_equal(get_int(k("po:after")), 1);
    sink_free(s);
}

/* ---- tags ------------------------------------------------------------- */

static void sadd_members(const char *set, const char *prefix, int n, bool create_keys)
{
    for (int i = 0; i < n; i++) {
        redisAppendCommand(admin, "SADD %s %s%d", set, prefix, i);
        if (create_keys)
            redisAppendCommand(admin, "SET %s%d v", prefix, i);
    }
    for (int i = 0; i < n * (create_keys ? 2 : 1); i++) {
        void *r;
        assert_int_equal(redisGetReply(admin, &r), REDIS_OK);
        assert_int_not_equal(((redisReply *)r)->type, REDIS_REPLY_ERROR);
        freeReplyObject(r);
    }
}

static void test_tags(void **state)
{
    Sink *s = new_sink();
    (void)state;

    sadd_members(k("tag:t1"), k("t1:m"), 3, true);
    freeReplyObject(cmd("SADD %s %s", k("tag:t1"), k("t1:never-created")));
    set_key(k("t1:other"), "1");
    sadd_members(k("tag:big"), k("big:m"), 10000, true);
    sadd_members(k("tag:keep"), k("keep:m"), 5, true);
    set_key(k("tag:string"), "x"); /* not a set: deleted as a key */

    add(s, RULES_INV_TAG, k("tag:t1"));
    add(s, RULES_INV_TAG, k("tag:big"));
    add(s, RULES_INV_TAG, k("tag:absent"));
    add(s, RULES_INV_TAG, k("tag:string"));
    must_flush(s);

    assert_false(exists(k("tag:t1")));
    for (int i = 0; i < 3; i++)
        assert_false(exists(k("t1:m%d", i)));
    assert_true(exists(k("t1:other")));
    assert_false(exists(k("tag:big")));
    assert_int_equal(count_prefix(k("big:m")), 0);
    assert_true(exists(k("tag:keep")));
    assert_int_equal(count_prefix(k("keep:m")), 5);
    assert_false(exists(k("tag:string")));
    assert_int_equal(sink_stats(s)->tags, 4);

    /* The script survives SCRIPT FLUSH between flushes (sent again each time). */
    freeReplyObject(cmd("SCRIPT FLUSH"));
    sadd_members(k("tag:t2"), k("t2:m"), 2, true);
    add(s, RULES_INV_TAG, k("tag:t2"));
    must_flush(s);
    assert_false(exists(k("tag:t2")));
    assert_int_equal(count_prefix(k("t2:m")), 0);
    sink_free(s);
}

/* The shipped script itself: return value and DEL mode. */
static void test_tag_script_direct(void **state)
{
    extern const char redis_tag_invalidate_lua[];
    (void)state;

    sadd_members(k("tag:direct"), k("direct:m"), 1500, true);
    freeReplyObject(cmd("SADD %s %s", k("tag:direct"), k("direct:missing")));
    redisReply *r = cmd("EVAL %s 1 %s del", redis_tag_invalidate_lua, k("tag:direct"));
    assert_int_equal(r->type, REDIS_REPLY_INTEGER);
    assert_int_equal(r->integer, 1501); /* 1500 members that existed + the set */
    freeReplyObject(r);
    assert_false(exists(k("tag:direct")));
    r = cmd("EVAL %s 1 %s", redis_tag_invalidate_lua, k("tag:direct"));
    assert_int_equal(r->integer, 0);
    freeReplyObject(r);
}

static void test_tag_patterns(void **state)
{
    Sink *s = new_sink();
    (void)state;

    sadd_members(k("tag:tp:1"), k("tp1:m"), 4, true);
    sadd_members(k("tag:tp:2"), k("tp2:m"), 600, true);
    sadd_members(k("tag:tq:1"), k("tq1:m"), 4, true);
    add(s, RULES_INV_TAG_PATTERN, k("tag:tp:*"));
    must_flush(s);

    assert_false(exists(k("tag:tp:1")));
    assert_false(exists(k("tag:tp:2")));
    assert_int_equal(count_prefix(k("tp1:m")), 0);
    assert_int_equal(count_prefix(k("tp2:m")), 0);
    assert_true(exists(k("tag:tq:1")));
    assert_int_equal(count_prefix(k("tq1:m")), 4);
    assert_int_equal(sink_stats(s)->tags, 1);
    sink_free(s);
}

/* ---- versions ----------------------------------------------------------- */

static void test_versions(void **state)
{
    Sink *s = new_sink();
    (void)state;

    set_key(k("v:existing"), "5");
    set_key(k("vp:1:version"), "1");
    set_key(k("vp:2:version"), "10");
    set_key(k("vp:1:other"), "7");
    for (int i = 0; i < 1500; i++) /* several SCAN pages of matches */
        redisAppendCommand(admin, "SET %s 0", k("vp:many%d:version", i));
    for (int i = 0; i < 1500; i++) {
        void *r;
        assert_int_equal(redisGetReply(admin, &r), REDIS_OK);
        freeReplyObject(r);
    }

    add(s, RULES_INV_VERSION, k("v:existing"));
    add(s, RULES_INV_VERSION, k("v:new"));
    add(s, RULES_INV_VERSION_PATTERN, k("vp:*:version"));
    must_flush(s);

    assert_int_equal(get_int(k("v:existing")), 6);
    assert_int_equal(get_int(k("v:new")), 1);
    assert_int_equal(get_int(k("vp:1:version")), 2);
    assert_int_equal(get_int(k("vp:2:version")), 11);
    assert_int_equal(get_int(k("vp:3:version")), -1); /* never created */
    assert_int_equal(get_int(k("vp:1:other")), 7);
    for (int i = 0; i < 1500; i += 97)
        assert_int_equal(get_int(k("vp:many%d:version", i)), 1);
    assert_int_equal(sink_stats(s)->versions, 3);
    sink_free(s);
}

/* An error reply fails the flush, names the command, keeps the batch and the
 * connection; once the data is fixed the same batch goes through. */
static void test_error_reply(void **state)
{
    Sink *s = new_sink();
    (void)state;

    set_key(k("err:a"), "1");
    set_key(k("err:ver"), "not a number");
    add(s, RULES_INV_KEY, k("err:a"));
    add(s, RULES_INV_VERSION, k("err:ver"));
    add(s, RULES_INV_VERSION, k("err:ver2"));
    assert_int_equal(sink_flush(s), -1);
    const char *e = sink_errstr(s);
    print_message("error: %s\n", e);
    if (strstr(e, "INCR") == NULL || strstr(e, k("err:ver")) == NULL ||
        strstr(e, "not an integer") == NULL)
        fail_msg("unexpected error: %s", e);
    assert_true(sink_connected(s));
    assert_int_equal(sink_pending(s), 3);
    assert_int_equal(sink_stats(s)->errors, 1);
    assert_int_equal(sink_stats(s)->keys, 0);

    freeReplyObject(cmd("DEL %s %s", k("err:ver"), k("err:ver2")));
    set_key(k("err:a"), "1");
    must_flush(s);
    assert_false(exists(k("err:a")));
    assert_int_equal(get_int(k("err:ver")), 1);
    assert_int_equal(get_int(k("err:ver2")), 1); /* at least once: INCR may repeat */
    sink_free(s);
}

/* ---- publish and watermark ------------------------------------------------ */

static redisContext *subscribe(const char *chan)
{
    redisContext *c = redisConnectWithTimeout(main_url.host, main_url.port, (struct timeval){2, 0});
    assert_non_null(c);
    assert_int_equal(c->err, 0);
    redisSetTimeout(c, (struct timeval){5, 0});
    redisReply *r = cmd_on(c, "SUBSCRIBE %s", chan);
    assert_int_equal(r->type, REDIS_REPLY_ARRAY);
    freeReplyObject(r);
    return c;
}

static void expect_message(redisContext *c, const char *chan, const char *payload, size_t len)
{
    void *v = NULL;
    assert_int_equal(redisGetReply(c, &v), REDIS_OK);
    redisReply *r = v;
    assert_int_equal(r->type, REDIS_REPLY_ARRAY);
    assert_int_equal(r->elements, 3);
    assert_string_equal(r->element[0]->str, "message");
    assert_string_equal(r->element[1]->str, chan);
    assert_int_equal(r->element[2]->len, len);
    assert_memory_equal(r->element[2]->str, payload, len);
    freeReplyObject(r);
}

static void test_publish(void **state)
{
    static const char p1[] = "{\"table\":\"public.users\",\"op\":\"update\",\"keys\":[\"u:1\"]}";
    static const char p2[] = "bin\0ary \r\n payload"; /* binary-safe, includes a NUL */
    const char *chan = k("chan");
    redisContext *sub = subscribe(chan);
    Sink *s = new_sink();
    (void)state;

    set_key(k("pub:key"), "1");
    set_key(k("pub:pat:1"), "1");
    add(s, RULES_INV_KEY, k("pub:key"));
    add(s, RULES_INV_PATTERN, k("pub:pat:*"));
    sink_add(s, RULES_INV_PUBLISH, chan, strlen(chan), p1, strlen(p1));
    sink_add(s, RULES_INV_PUBLISH, chan, strlen(chan), p2, sizeof p2 - 1);
    sink_add(s, RULES_INV_PUBLISH, chan, strlen(chan), p1, strlen(p1));
    must_flush(s);

    expect_message(sub, chan, p1, strlen(p1));
    expect_message(sub, chan, p2, sizeof p2 - 1);
    expect_message(sub, chan, p1, strlen(p1));
    /* Invalidations queued before the publish were applied before it. */
    assert_false(exists(k("pub:key")));
    assert_false(exists(k("pub:pat:1")));
    assert_int_equal(sink_stats(s)->publishes, 3);
    redisFree(sub);
    sink_free(s);
}

/* GET key must return want. */
static void expect_get(const char *key, const char *want)
{
    redisReply *r = cmd("GET %s", key);

    assert_int_equal(r->type, REDIS_REPLY_STRING);
    assert_string_equal(r->str, want);
    freeReplyObject(r);
}

static void test_watermark(void **state)
{
    Sink *s = new_sink();
    (void)state;

    sink_set_watermark(s, k("confirmed:walbust"), "0/16B3740", false);
    sink_set_watermark(s, k("confirmed:walbust"), "0/16B3748", false); /* replaces */
    assert_true(sink_dirty(s));
    assert_int_equal(sink_pending(s), 0);
    must_flush(s);
    redisReply *r = cmd("GET %s", k("confirmed:walbust"));
    assert_string_equal(r->str, "0/16B3748");
    freeReplyObject(r);

    /* With invalidations: the watermark lands too. */
    sink_set_watermark(s, k("confirmed:walbust"), "1/0", false);
    add(s, RULES_INV_KEY, k("wm:x"));
    must_flush(s);
    expect_get(k("confirmed:walbust"), "1/0");

    /* Forward only: an older position (another instance, a replay) is
     * acknowledged but leaves the newer one; compared as LSNs, not text. */
    sink_set_watermark(s, k("confirmed:walbust"), "0/FFFFFFFF", false);
    must_flush(s);
    assert_false(sink_dirty(s));
    expect_get(k("confirmed:walbust"), "1/0");
    sink_set_watermark(s, k("confirmed:walbust"), "A/0", false);
    must_flush(s);
    expect_get(k("confirmed:walbust"), "A/0");
    /* reset (a new slot after a lost one) may move it back. */
    sink_set_watermark(s, k("confirmed:walbust"), "0/5", true);
    must_flush(s);
    expect_get(k("confirmed:walbust"), "0/5");
    /* A value that is no LSN is replaced. */
    freeReplyObject(cmd("SET %s junk", k("confirmed:walbust")));
    sink_set_watermark(s, k("confirmed:walbust"), "0/1", false);
    must_flush(s);
    expect_get(k("confirmed:walbust"), "0/1");
    sink_free(s);
}

/* Flush watermark `value` and check how it travelled: by the
 * compare-and-set script (EVAL) or as a WATCHed plain SET (EXEC; both in
 * one flush: the EXEC found the key changed and the script followed), and
 * what the key holds after. */
static void wm_step(Sink *s, redisContext *c, const char *value, long evals, long execs,
                    const char *holds)
{
    long e0 = calls_on(c, "eval"), x0 = calls_on(c, "exec");
    redisReply *r;

    sink_set_watermark(s, "walbust:confirmed:w", value, false);
    must_flush(s);
    e0 = calls_on(c, "eval") - e0;
    x0 = calls_on(c, "exec") - x0;
    if (e0 != evals || x0 != execs)
        fail_msg("watermark %s: %ld EVAL and %ld EXEC, expected %ld and %ld", value, e0, x0, evals,
                 execs);
    r = cmd_on(c, "GET walbust:confirmed:w");
    assert_int_equal(r->type, REDIS_REPLY_STRING);
    assert_string_equal(r->str, holds);
    freeReplyObject(r);
}

/* The watermark by WATCH: the script runs when the key's value is not
 * known (first write, after another client wrote it, after a reconnect);
 * otherwise a plain SET in MULTI/EXEC, which does nothing when another
 * client wrote the key since (the script then compares). It never moves
 * back, whatever another client writes in between. */
static void test_watermark_watched(void **state)
{
    char url[128];
    redisContext *c;
    Sink *s;
    (void)state;

    srv_start(&srv);
    c = srv_connect(&srv);
    assert_non_null(c);
    snprintf(url, sizeof url, "redis://127.0.0.1:%d", srv.port);
    s = new_sink_url(url, false, 0);

    wm_step(s, c, "0/10", 1, 0, "0/10"); /* unknown: the script */
    wm_step(s, c, "0/20", 0, 1, "0/20"); /* WATCHed: a plain SET */
    /* A batch without a watermark keeps the WATCH. */
    add(s, RULES_INV_KEY, "w:a");
    must_flush(s);
    wm_step(s, c, "0/30", 0, 1, "0/30");

    /* Another client writes a newer position: EXEC finds the key changed,
     * the script keeps the newer one, and the WATCH no longer vouches for
     * the value (the next write is by script too, until it sets the key). */
    freeReplyObject(cmd_on(c, "SET walbust:confirmed:w 5/0"));
    wm_step(s, c, "0/40", 1, 1, "5/0");
    wm_step(s, c, "0/50", 1, 0, "5/0");
    wm_step(s, c, "6/0", 1, 0, "6/0");
    wm_step(s, c, "6/10", 0, 1, "6/10");

    /* Another client writes an older one, deletes the key, or writes a
     * value that is no LSN: the next position is set by script. */
    freeReplyObject(cmd_on(c, "SET walbust:confirmed:w 0/1"));
    wm_step(s, c, "7/0", 1, 1, "7/0");
    freeReplyObject(cmd_on(c, "DEL walbust:confirmed:w"));
    wm_step(s, c, "7/10", 1, 1, "7/10");
    freeReplyObject(cmd_on(c, "SET walbust:confirmed:w junk"));
    wm_step(s, c, "7/20", 1, 1, "7/20");

    /* An older position queued (a replay) is not sent as a plain SET. */
    wm_step(s, c, "7/18", 1, 0, "7/20");
    wm_step(s, c, "7/30", 1, 0, "7/30");
    /* reset (a new slot after a lost one) always goes by script. */
    sink_set_watermark(s, "walbust:confirmed:w", "0/5", true);
    must_flush(s);
    wm_step(s, c, "0/6", 0, 1, "0/6");

    /* The connection dropped: a new one has no WATCH. */
    freeReplyObject(cmd_on(c, "CLIENT KILL SKIPME yes"));
    sink_set_watermark(s, "walbust:confirmed:w", "0/7", false);
    assert_int_equal(sink_flush(s), -1); /* noticed on this write */
    wm_step(s, c, "0/8", 1, 0, "0/8");
    wm_step(s, c, "0/9", 0, 1, "0/9");

    /* Out of memory on the plain SET: refused like the script's SET, kept,
     * and sent again (by script: the WATCH did not see it land). */
    freeReplyObject(cmd_on(c, "CONFIG SET maxmemory-policy noeviction"));
    freeReplyObject(cmd_on(c, "CONFIG SET maxmemory 1"));
    sink_set_watermark(s, "walbust:confirmed:w", "0/A", false);
    add(s, RULES_INV_KEY, "w:b");
    assert_int_equal(sink_flush(s), -1);
    assert_true(sink_oom(s));
    assert_non_null(strstr(sink_errstr(s), "refused the watermark SET"));
    assert_true(sink_dirty(s));
    freeReplyObject(cmd_on(c, "CONFIG SET maxmemory 0"));
    long e0 = calls_on(c, "eval");
    must_flush(s);
    assert_int_equal(calls_on(c, "eval") - e0, 1);
    redisReply *r = cmd_on(c, "GET walbust:confirmed:w");
    assert_string_equal(r->str, "0/A");
    freeReplyObject(r);
    wm_step(s, c, "0/B", 0, 1, "0/B");

    sink_free(s);
    redisFree(c);
}

/* A sink for user w (password pw) on the private server, granted the
 * commands in `grants` and the watermark selector `selector`. */
static Sink *acl_sink(redisContext *c, const char *grants, const char *selector)
{
    char url[128], cmdline[512];

    snprintf(cmdline, sizeof cmdline, "ACL SETUSER w reset on >pw ~w:* -@all %s %s", grants,
             selector);
    redisReply *r = redisCommand(c, cmdline);
    assert_non_null(r);
    if (r->type == REDIS_REPLY_ERROR)
        fail_msg("%s: %s", cmdline, r->str);
    freeReplyObject(r);
    snprintf(url, sizeof url, "redis://w:pw@127.0.0.1:%d", srv.port);
    return new_sink_url(url, false, 0);
}

/* An ACL user granted what earlier versions sent (no WATCH, UNWATCH,
 * MULTI, EXEC) keeps working: every watermark goes by script. One granted
 * WATCH but not MULTI gets one failed batch (its SET ran outside a
 * transaction: still forward, the key was WATCHed and held an older
 * value), and then the script too. */
static void test_watermark_acl(void **state)
{
    const char *base = "+ping +select +unlink +scan +evalsha +script|load +type +sscan +incr "
                       "+publish";
    redisContext *c;
    Sink *s;
    (void)state;

    srv_start(&srv);
    c = srv_connect(&srv);
    assert_non_null(c);

    s = acl_sink(c, base, "(+get +set +eval ~walbust:confirmed:w ~walbust:slot:w)");
    add(s, RULES_INV_KEY, "w:a");
    wm_step(s, c, "0/10", 1, 0, "0/10");
    assert_true(sink_watermark_by_script(s));
    wm_step(s, c, "0/20", 1, 0, "0/20");
    freeReplyObject(cmd_on(c, "SET walbust:confirmed:w 9/0"));
    wm_step(s, c, "0/30", 1, 0, "9/0");
    sink_free(s);

    freeReplyObject(cmd_on(c, "SET walbust:confirmed:w 0/1"));
    s = acl_sink(c, base, "(+get +set +eval +watch +unwatch ~walbust:confirmed:w ~walbust:slot:w)");
    wm_step(s, c, "0/40", 1, 0, "0/40");
    assert_false(sink_watermark_by_script(s));
    sink_set_watermark(s, "walbust:confirmed:w", "0/50", false);
    assert_int_equal(sink_flush(s), -1);
    print_message("%s\n", sink_errstr(s));
    assert_non_null(strstr(sink_errstr(s), "MULTI for the watermark SET: NOPERM"));
    assert_true(sink_watermark_by_script(s));
    long e0 = calls_on(c, "eval");
    must_flush(s);
    assert_int_equal(calls_on(c, "eval") - e0, 1);
    wm_step(s, c, "0/60", 1, 0, "0/60");
    sink_free(s);

    /* Granted all of them: WATCHed plain SETs. */
    s = acl_sink(c, base,
                 "(+get +set +eval +watch +unwatch +multi +exec ~walbust:confirmed:w "
                 "~walbust:slot:w)");
    wm_step(s, c, "0/70", 1, 0, "0/70");
    wm_step(s, c, "0/80", 0, 1, "0/80");
    assert_false(sink_watermark_by_script(s));
    sink_free(s);
    redisFree(c);
}

/* ---- connections ------------------------------------------------------- */

/* A cluster none of whose seeds answers: the error names the seeds, the
 * batch is kept (cluster routing itself: tests/e2e/test_cluster.py). */
static void test_cluster_refused(void **state)
{
    char url[96], seeds[64];
    int p1 = free_port(), p2 = free_port();
    (void)state;

    snprintf(seeds, sizeof seeds, "127.0.0.1:%d,127.0.0.1:%d", p1, p2);
    snprintf(url, sizeof url, "redis+cluster://%s", seeds);
    Sink *s = new_sink_url(url, false, 0);
    assert_int_equal(sink_connect(s), -1);
    assert_non_null(strstr(sink_errstr(s), "could not load the redis cluster slot map"));
    assert_non_null(strstr(sink_errstr(s), seeds));
    assert_false(sink_connected(s));
    add(s, RULES_INV_KEY, "x");
    assert_int_equal(sink_flush(s), -1);
    assert_int_equal(sink_pending(s), 1);
    sink_free(s);
}

static void test_connect_refused(void **state)
{
    int port = free_port();
    char url[64], want[128];
    (void)state;

    snprintf(url, sizeof url, "redis://:hunter2@127.0.0.1:%d", port);
    Sink *s = new_sink_url(url, false, 0);
    assert_int_equal(sink_connect(s), -1);
    snprintf(want, sizeof want, "could not connect to redis at 127.0.0.1:%d: Connection refused",
             port);
    assert_string_equal(sink_errstr(s), want);
    assert_false(sink_connected(s));
    assert_int_equal(sink_ping(s), -1);
    sink_free(s);
}

static void check_connect_fails(const char *url, const char *fragment)
{
    Sink *s = new_sink_url(url, false, 0);
    assert_int_equal(sink_connect(s), -1);
    print_message("error: %s\n", sink_errstr(s));
    if (strstr(sink_errstr(s), fragment) == NULL)
        fail_msg("error \"%s\" lacks \"%s\"", sink_errstr(s), fragment);
    assert_null(strstr(sink_errstr(s), "hunter2"));
    assert_null(strstr(sink_errstr(s), "wrongpw"));
    assert_null(strstr(sink_errstr(s), "alicepw"));
    assert_false(sink_connected(s));
    sink_free(s);
}

static void test_auth_and_db(void **state)
{
    char url[512], want[128];
    redisContext *c;
    (void)state;

    snprintf(srv.pass, sizeof srv.pass, "hunter2:@/%%");
    srv_start(&srv);
    c = srv_connect(&srv);
    assert_non_null(c);
    freeReplyObject(cmd_on(c, "ACL SETUSER alice on >alicepw ~* &* +@all"));

    /* No password, a wrong one, a wrong user password. */
    snprintf(url, sizeof url, "redis://127.0.0.1:%d", srv.port);
    check_connect_fails(url, "NOAUTH");
    snprintf(url, sizeof url, "redis://:wrongpw@127.0.0.1:%d", srv.port);
    snprintf(want, sizeof want, "redis AUTH failed at 127.0.0.1:%d: WRONGPASS", srv.port);
    check_connect_fails(url, want);
    snprintf(url, sizeof url, "redis://alice:wrongpw@127.0.0.1:%d", srv.port);
    check_connect_fails(url, "as user alice: WRONGPASS");
    snprintf(url, sizeof url, "redis://:hunter2%%3A%%40%%2F%%25@127.0.0.1:%d/4000", srv.port);
    check_connect_fails(url, "redis SELECT 4000 failed");

    /* Default user (percent-escaped password) selecting db 3. */
    freeReplyObject(cmd_on(c, "SELECT 3"));
    freeReplyObject(cmd_on(c, "SET k3 v"));
    freeReplyObject(cmd_on(c, "SELECT 0"));
    freeReplyObject(cmd_on(c, "SET k3 v"));
    snprintf(url, sizeof url, "redis://:hunter2%%3A%%40%%2F%%25@127.0.0.1:%d/3", srv.port);
    Sink *s = new_sink_url(url, false, 0);
    assert_int_equal(sink_ping(s), 0);
    add(s, RULES_INV_KEY, "k3");
    must_flush(s);
    redisReply *r = cmd_on(c, "EXISTS k3");
    assert_int_equal(r->integer, 1); /* db 0 untouched */
    freeReplyObject(r);
    freeReplyObject(cmd_on(c, "SELECT 3"));
    r = cmd_on(c, "EXISTS k3");
    assert_int_equal(r->integer, 0);
    freeReplyObject(r);
    sink_free(s);

    /* ACL user with db 2, then the unix socket with ?db=5. */
    freeReplyObject(cmd_on(c, "SELECT 2"));
    freeReplyObject(cmd_on(c, "SET k2 v"));
    snprintf(url, sizeof url, "redis://alice:alicepw@127.0.0.1:%d/2", srv.port);
    s = new_sink_url(url, false, 0);
    add(s, RULES_INV_KEY, "k2");
    must_flush(s);
    sink_free(s);
    r = cmd_on(c, "EXISTS k2");
    assert_int_equal(r->integer, 0);
    freeReplyObject(r);

    freeReplyObject(cmd_on(c, "SELECT 5"));
    freeReplyObject(cmd_on(c, "SET k5 v"));
    snprintf(url, sizeof url, "unix://alice:alicepw@%s?db=5", srv.sock);
    s = new_sink_url(url, false, 0);
    add(s, RULES_INV_VERSION, "k5ver");
    add(s, RULES_INV_KEY, "k5");
    must_flush(s);
    sink_free(s);
    r = cmd_on(c, "EXISTS k5");
    assert_int_equal(r->integer, 0);
    freeReplyObject(r);
    r = cmd_on(c, "GET k5ver");
    assert_string_equal(r->str, "1");
    freeReplyObject(r);
    redisFree(c);
}

/* Redis goes away: flushes fail and keep the batch; when Redis is back
 * (empty, with no scripts cached) the same batch flushes completely. */
static void test_redis_down_and_back(void **state)
{
    char url[128], port[16];
    (void)state;

    srv_start(&srv);
    snprintf(url, sizeof url, "redis://127.0.0.1:%d", srv.port);
    snprintf(port, sizeof port, ":%d", srv.port);
    Sink *s = new_sink_url(url, false, 1000);
    add(s, RULES_INV_TAG, "tag:warmup"); /* learn the script SHA before the restart */
    must_flush(s);
    assert_true(sink_connected(s));

    srv_stop(&srv);
    add(s, RULES_INV_KEY, "gone:1");
    add(s, RULES_INV_PATTERN, "gone:p:*");
    add(s, RULES_INV_TAG, "tag:t");
    add(s, RULES_INV_VERSION, "ver");
    sink_set_watermark(s, "wm", "0/AB", false);
    assert_int_equal(sink_flush(s), -1);
    print_message("error: %s\n", sink_errstr(s));
    assert_non_null(strstr(sink_errstr(s), port));
    assert_false(sink_connected(s));
    assert_int_equal(sink_pending(s), 4);
    assert_int_equal(sink_flush(s), -1);
    assert_non_null(strstr(sink_errstr(s), "could not connect to redis at 127.0.0.1"));
    assert_non_null(strstr(sink_errstr(s), "Connection refused"));
    assert_int_equal(sink_pending(s), 4);
    assert_true(sink_dirty(s));
    assert_int_equal(sink_stats(s)->errors, 2);

    srv_start(&srv);
    redisContext *c = srv_connect(&srv);
    assert_non_null(c);
    freeReplyObject(cmd_on(c, "SET gone:1 v"));
    freeReplyObject(cmd_on(c, "SET gone:p:1 v"));
    freeReplyObject(cmd_on(c, "SET stays v"));
    freeReplyObject(cmd_on(c, "SADD tag:t m1 m2"));
    freeReplyObject(cmd_on(c, "SET m1 v"));
    must_flush(s);
    redisReply *r = cmd_on(c, "EXISTS gone:1 gone:p:1 tag:t m1");
    assert_int_equal(r->integer, 0);
    freeReplyObject(r);
    r = cmd_on(c, "MGET stays ver wm");
    assert_string_equal(r->element[0]->str, "v");
    assert_string_equal(r->element[1]->str, "1");
    assert_string_equal(r->element[2]->str, "0/AB");
    freeReplyObject(r);
    redisFree(c);
    sink_free(s);
}

/* A Redis that stops answering (CLIENT PAUSE) trips the command timeout;
 * the flush fails fast, and succeeds once Redis answers again. */
static void test_command_timeout(void **state)
{
    Sink *s = new_sink_url(redis_env, false, 300);
    (void)state;

    assert_int_equal(sink_connect(s), 0);
    set_key(k("to:a"), "1");
    add(s, RULES_INV_KEY, k("to:a"));
    freeReplyObject(cmd("CLIENT PAUSE 1500 ALL"));
    double t0 = now_s();
    assert_int_equal(sink_flush(s), -1);
    double took = now_s() - t0;
    print_message("error after %.3f s: %s\n", took, sink_errstr(s));
    if (strstr(sink_errstr(s), "did not answer") == NULL ||
        strstr(sink_errstr(s), "300 ms") == NULL)
        fail_msg("unexpected error: %s", sink_errstr(s));
    assert_true(took >= 0.25 && took < 1.2);
    assert_false(sink_connected(s));
    assert_int_equal(sink_pending(s), 1);

    /* Reconnecting while paused also times out (at the connection PING). */
    assert_int_equal(sink_flush(s), -1);
    assert_non_null(strstr(sink_errstr(s), "did not answer PING"));

    usleep(1600 * 1000);
    must_flush(s);
    assert_false(exists(k("to:a")));
    assert_int_equal(sink_ping(s), 0);
    sink_free(s);
}

/* maxmemory reached under noeviction: Redis refuses SET and INCR with
 * -OOM but still deletes. The flush fails (sink_oom), every delete of the
 * batch is applied, the batch keeps only the refused writes (the INCR and
 * the watermark), and later batches' deletes keep being applied; once
 * memory is back everything held lands. */
static void test_oom(void **state)
{
    char url[128];
    redisContext *c;
    redisReply *r;
    Sink *s;
    (void)state;

    srv_start(&srv);
    c = srv_connect(&srv);
    assert_non_null(c);
    freeReplyObject(cmd_on(c, "SET oom:a 1"));
    freeReplyObject(cmd_on(c, "SET oom:b 1"));
    freeReplyObject(cmd_on(c, "SET oom:ver 5"));
    freeReplyObject(cmd_on(c, "SET oom:p:1 1"));
    freeReplyObject(cmd_on(c, "SADD tag:oom oom:member"));
    freeReplyObject(cmd_on(c, "SET oom:member 1"));
    freeReplyObject(cmd_on(c, "CONFIG SET maxmemory-policy noeviction"));
    freeReplyObject(cmd_on(c, "CONFIG SET maxmemory 1"));

    snprintf(url, sizeof url, "redis://127.0.0.1:%d", srv.port);
    s = new_sink_url(url, false, 0);
    sink_set_watermark(s, "walbust:confirmed:oom", "0/10", false);
    add(s, RULES_INV_KEY, "oom:a");
    add(s, RULES_INV_VERSION, "oom:ver");
    add(s, RULES_INV_PATTERN, "oom:p:*");
    add(s, RULES_INV_TAG, "tag:oom");
    sink_add(s, RULES_INV_PUBLISH, "oom:chan", 8, "m", 1);
    assert_int_equal(sink_flush(s), -1);
    print_message("%s\n", sink_errstr(s));
    assert_true(sink_oom(s));
    assert_non_null(strstr(sink_errstr(s), "out of memory and refused the watermark SET"));
    assert_non_null(strstr(sink_errstr(s), "and 1 more writes"));
    assert_non_null(strstr(sink_errstr(s), "maxmemory"));
    r = cmd_on(c, "EXISTS oom:a oom:p:1 oom:member tag:oom walbust:confirmed:oom");
    assert_int_equal(r->integer, 0); /* deletes applied, the watermark not */
    freeReplyObject(r);
    assert_int_equal(sink_pending(s), 1); /* only the INCR is held */
    assert_true(sink_dirty(s));           /* and the watermark */
    assert_int_equal(sink_stats(s)->oom_refusals, 2);

    /* The next batch's deletes still go through. */
    add(s, RULES_INV_KEY, "oom:b");
    assert_int_equal(sink_flush(s), -1);
    assert_true(sink_oom(s));
    r = cmd_on(c, "EXISTS oom:b");
    assert_int_equal(r->integer, 0);
    freeReplyObject(r);
    assert_int_equal(sink_pending(s), 1);

    /* Memory back: the held writes land, once. */
    freeReplyObject(cmd_on(c, "CONFIG SET maxmemory 0"));
    must_flush(s);
    assert_false(sink_oom(s));
    r = cmd_on(c, "GET oom:ver");
    assert_string_equal(r->str, "6");
    freeReplyObject(r);
    r = cmd_on(c, "GET walbust:confirmed:oom");
    assert_string_equal(r->str, "0/10");
    freeReplyObject(r);
    sink_free(s);
    redisFree(c);
}

/* ?replicas=1 against a master without a replica: WAIT answers 0, so the
 * batch is not acknowledged (but kept); with a replica attached it is. */
static void test_replicas(void **state)
{
    Server replica = {0};
    char url[160], port[16];
    redisContext *c;
    Sink *s;
    (void)state;

    srv_start(&srv);
    c = srv_connect(&srv);
    assert_non_null(c);
    freeReplyObject(cmd_on(c, "SET rep:a 1"));
    snprintf(url, sizeof url, "redis://127.0.0.1:%d/0?replicas=1", srv.port);
    s = new_sink_url(url, false, 0);
    add(s, RULES_INV_KEY, "rep:a");
    double t0 = now_s();
    assert_int_equal(sink_flush(s), -1);
    print_message("after %.3f s: %s\n", now_s() - t0, sink_errstr(s));
    assert_non_null(strstr(sink_errstr(s), "only 0 of the 1 replicas asked for (replicas=1)"));
    assert_int_equal(sink_pending(s), 1);
    assert_int_equal(sink_stats(s)->replica_shortfalls, 1);

    srv_start(&replica);
    redisContext *rc = srv_connect(&replica);
    assert_non_null(rc);
    snprintf(port, sizeof port, "%d", srv.port);
    freeReplyObject(cmd_on(rc, "REPLICAOF 127.0.0.1 %s", port));
    for (int i = 0; i < 200; i++) {
        redisReply *r = cmd_on(c, "INFO replication");
        bool online = strstr(r->str, "state=online") != NULL;
        freeReplyObject(r);
        if (online)
            break;
        usleep(50 * 1000);
    }
    must_flush(s);
    redisReply *r = cmd_on(rc, "EXISTS rep:a");
    assert_int_equal(r->integer, 0); /* on the replica too */
    freeReplyObject(r);
    sink_free(s);
    redisFree(rc);
    redisFree(c);
    srv_stop(&replica);
    unlink(replica.sock);
    rmdir(replica.dir);
}

static int unpause(void **state)
{
    (void)state;
    freeReplyObject(cmd("CLIENT UNPAUSE"));
    return 0;
}

int main(void)
{
    char err[512];

    /* Writes to a dead server must fail with EPIPE, not kill us (walbust's
     * main ignores SIGPIPE the same way). */
    signal(SIGPIPE, SIG_IGN);
    redis_env = getenv("WALBUST_REDIS");
    if (redis_env == NULL || redis_env[0] == '\0') {
        fprintf(stderr, "sink_test: WALBUST_REDIS is not set; this test needs a real Redis "
                        "(scripts/stack start DIR, then source DIR/env)\n");
        return 1;
    }
    if (redisurl_parse(redis_env, &main_url, err, sizeof err) != 0 ||
        main_url.kind != REDISURL_TCP || main_url.has_password || main_url.db != 0) {
        fprintf(stderr, "sink_test: WALBUST_REDIS must be a plain redis://host:port: %s\n", err);
        return 1;
    }
    admin = redisConnectWithTimeout(main_url.host, main_url.port, (struct timeval){2, 0});
    if (admin == NULL || admin->err) {
        fprintf(stderr, "sink_test: could not connect to %s: %s\n", redis_env,
                admin ? admin->errstr : "out of memory");
        return 1;
    }
    redisSetTimeout(admin, (struct timeval){10, 0});
    snprintf(run_id, sizeof run_id, "st%ld", (long)getpid());

    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_keys_unlink),
        cmocka_unit_test(test_keys_del),
        cmocka_unit_test(test_set_use_del),
        cmocka_unit_test(test_binary_key),
        cmocka_unit_test(test_dedupe),
        cmocka_unit_test(test_refresh_order_and_fence),
        cmocka_unit_test(test_full),
        cmocka_unit_test(test_empty_flush),
        cmocka_unit_test(test_patterns),
        cmocka_unit_test(test_pattern_order),
        cmocka_unit_test(test_tags),
        cmocka_unit_test(test_tag_script_direct),
        cmocka_unit_test(test_tag_patterns),
        cmocka_unit_test(test_versions),
        cmocka_unit_test(test_error_reply),
        cmocka_unit_test(test_publish),
        cmocka_unit_test(test_watermark),
        cmocka_unit_test(test_cluster_refused),
        cmocka_unit_test(test_connect_refused),
        cmocka_unit_test_teardown(test_auth_and_db, srv_teardown),
        cmocka_unit_test_teardown(test_redis_down_and_back, srv_teardown),
        cmocka_unit_test_teardown(test_oom, srv_teardown),
        cmocka_unit_test_teardown(test_watermark_watched, srv_teardown),
        cmocka_unit_test_teardown(test_watermark_acl, srv_teardown),
        cmocka_unit_test_teardown(test_replicas, srv_teardown),
        cmocka_unit_test_teardown(test_command_timeout, unpause),
    };
    int failed = cmocka_run_group_tests(tests, NULL, NULL);

    /* Remove this run's keys. */
    redisReply *r = redisCommand(admin, "KEYS %s:*", run_id);
    for (size_t i = 0; r != NULL && i < r->elements; i++)
        redisAppendCommand(admin, "UNLINK %b", r->element[i]->str, r->element[i]->len);
    for (size_t i = 0; r != NULL && i < r->elements; i++) {
        void *x;
        if (redisGetReply(admin, &x) == REDIS_OK)
            freeReplyObject(x);
    }
    if (r != NULL)
        freeReplyObject(r);
    redisFree(admin);
    return failed;
}
