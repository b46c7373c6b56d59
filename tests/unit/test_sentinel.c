/* Unit tests for sentinel.c: the reply to SENTINEL get-master-addr-by-name
 * and the +switch-master message, built with hiredis' own reader from RESP
 * text as a Sentinel sends it; the watch against a fake Sentinel thread on
 * loopback (asks, subscribes, hears a switch, notices the Sentinel going
 * away). (Against real Sentinels: tests/e2e/test_sentinel*.py.) */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

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

static int switch_of(const char *resp, char *host, int *port)
{
    redisReply *r = parse(resp);
    int rc = sentinel_parse_switch(r, "m1", host, 64, port);
    freeReplyObject(r);
    return rc;
}

static void test_parse_switch(void **state)
{
    char host[64] = "";
    int port = 0;
    (void)state;

#define MSG(text) "*3\r\n$7\r\nmessage\r\n$14\r\n+switch-master\r\n$%zu\r\n%s\r\n"
    char buf[256];
#define SWITCH(text) (snprintf(buf, sizeof buf, MSG(text), strlen(text), text), buf)
    assert_int_equal(switch_of(SWITCH("m1 127.0.0.1 6379 127.0.0.1 6380"), host, &port), 1);
    assert_string_equal(host, "127.0.0.1");
    assert_int_equal(port, 6380);
    assert_int_equal(switch_of(SWITCH("m1 ::1 6380 ::1 6381"), host, &port), 1);
    assert_string_equal(host, "::1");
    assert_int_equal(port, 6381);
    /* Another master, a prefix of the name, malformed: not ours. */
    port = 0;
    assert_int_equal(switch_of(SWITCH("m2 127.0.0.1 6379 127.0.0.1 6380"), host, &port), 0);
    assert_int_equal(switch_of(SWITCH("m 127.0.0.1 6379 127.0.0.1 6380"), host, &port), 0);
    assert_int_equal(switch_of(SWITCH("m1 127.0.0.1 6379 127.0.0.1"), host, &port), 0);
    assert_int_equal(switch_of(SWITCH("m1 127.0.0.1 6379 127.0.0.1 x"), host, &port), 0);
    assert_int_equal(switch_of(SWITCH("m1 127.0.0.1 6379 127.0.0.1 70000"), host, &port), 0);
    assert_int_equal(port, 0);
    /* The subscription's confirmation and a PONG are not switches. */
    assert_int_equal(
        switch_of("*3\r\n$9\r\nsubscribe\r\n$14\r\n+switch-master\r\n:1\r\n", host, &port), 0);
    assert_int_equal(switch_of("*2\r\n$4\r\npong\r\n$0\r\n\r\n", host, &port), 0);
    assert_int_equal(switch_of("+OK\r\n", host, &port), 0);
#undef SWITCH
#undef MSG
}

/* ---- a fake Sentinel ---------------------------------------------------- */

typedef struct Fake {
    int lfd, go[2]; /* the test writes a byte to go[1] for each next step */
    int subscribes;
} Fake;

static void say(int fd, const char *s)
{
    (void)!write(fd, s, strlen(s));
}

static void step_wait(Fake *f)
{
    char b;
    (void)!read(f->go[0], &b, 1);
}

/* Answers PING, get-master-addr-by-name (127.0.0.1:6380) and SUBSCRIBE;
 * then, on the test's signals, pushes a switch of another master and one of
 * m1 to 6381, and finally closes the connection. */
static void *fake_sentinel(void *arg)
{
    Fake *f = arg;
    int fd = accept(f->lfd, NULL, NULL);
    redisReader *rd = redisReaderCreate();
    char buf[4096];
    ssize_t n;

    while (f->subscribes == 0 && (n = read(fd, buf, sizeof buf)) > 0) {
        redisReply *cmd;
        redisReaderFeed(rd, buf, (size_t)n);
        while (redisReaderGetReply(rd, (void **)&cmd) == REDIS_OK && cmd != NULL) {
            const char *name = cmd->element[0]->str;
            if (strcmp(name, "PING") == 0)
                say(fd, "+PONG\r\n");
            else if (strcmp(name, "SENTINEL") == 0)
                say(fd, "*2\r\n$9\r\n127.0.0.1\r\n$4\r\n6380\r\n");
            else if (strcmp(name, "SUBSCRIBE") == 0) {
                say(fd, "*3\r\n$9\r\nsubscribe\r\n$14\r\n+switch-master\r\n:1\r\n");
                f->subscribes++;
            }
            freeReplyObject(cmd);
        }
    }
    step_wait(f);
    say(fd, "*3\r\n$7\r\nmessage\r\n$14\r\n+switch-master\r\n$32\r\n"
            "m2 127.0.0.1 6380 127.0.0.1 6381\r\n");
    say(fd, "*3\r\n$7\r\nmessage\r\n$14\r\n+switch-master\r\n$32\r\n"
            "m1 127.0.0.1 6380 127.0.0.1 6381\r\n");
    step_wait(f);
    redisReaderFree(rd);
    close(fd);
    return NULL;
}

static long long mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Poll until the watch returns something other than 0 (at most 2 s). */
static int poll_until(SentinelWatch *w, char *host, int *port, char *err)
{
    long long end = mono_ms() + 2000;
    int rc = 0;

    while (rc == 0 && mono_ms() < end) {
        rc = sentinel_watch_poll(w, mono_ms(), host, 64, port, err, 512);
        if (rc == 0)
            usleep(2000);
    }
    return rc;
}

static void test_watch(void **state)
{
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof sa;
    char list[64], host[64] = "", err[512] = "";
    int port = 0;
    Fake f = {0};
    pthread_t th;
    (void)state;

    f.lfd = socket(AF_INET, SOCK_STREAM, 0);
    assert_int_equal(bind(f.lfd, (struct sockaddr *)&sa, sizeof sa), 0);
    assert_int_equal(listen(f.lfd, 4), 0);
    assert_int_equal(getsockname(f.lfd, (struct sockaddr *)&sa, &len), 0);
    assert_int_equal(pipe(f.go), 0);
    assert_int_equal(pthread_create(&th, NULL, fake_sentinel, &f), 0);
    snprintf(list, sizeof list, "127.0.0.1:%d", ntohs(sa.sin_port));
    SentinelConfig cfg = {.sentinels = list,
                          .master_name = "m1",
                          .connect_timeout_ms = 1000,
                          .command_timeout_ms = 1000};
    SentinelWatch *w = sentinel_watch_new(&cfg);

    /* Subscribing names the master the Sentinel knows now. */
    assert_int_equal(poll_until(w, host, &port, err), 1);
    assert_string_equal(host, "127.0.0.1");
    assert_int_equal(port, 6380);
    for (int i = 0; i < 500 && !sentinel_watch_subscribed(w); i++) {
        assert_int_equal(sentinel_watch_poll(w, mono_ms(), host, 64, &port, err, sizeof err), 0);
        usleep(2000);
    }
    assert_true(sentinel_watch_subscribed(w));
    assert_int_equal(sentinel_watch_poll(w, mono_ms(), host, 64, &port, err, sizeof err), 0);

    /* A switch of another master is ignored, ours is reported. */
    (void)!write(f.go[1], "x", 1);
    assert_int_equal(poll_until(w, host, &port, err), 2);
    assert_int_equal(port, 6381);

    /* The Sentinel goes away: a failure naming it, then a pause. */
    (void)!write(f.go[1], "x", 1);
    assert_int_equal(poll_until(w, host, &port, err), -1);
    print_message("%s\n", err);
    assert_non_null(strstr(err, list));
    assert_non_null(strstr(err, "connection closed by the server"));
    assert_false(sentinel_watch_subscribed(w));
    assert_int_equal(sentinel_watch_poll(w, mono_ms(), host, 64, &port, err, sizeof err), 0);
    pthread_join(th, NULL);
    close(f.lfd);
    /* Nobody listens now: the next try (after the pause) fails at once. */
    assert_int_equal(sentinel_watch_poll(w, mono_ms() + 60000, host, 64, &port, err, sizeof err),
                     -1);
    print_message("%s\n", err);
    assert_non_null(strstr(err, "Connection refused"));
    sentinel_watch_free(w);
    close(f.go[0]);
    close(f.go[1]);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parse_addr),
        cmocka_unit_test(test_parse_switch),
        cmocka_unit_test(test_watch),
    };
    signal(SIGPIPE, SIG_IGN);
    return cmocka_run_group_tests(tests, NULL, NULL);
}
