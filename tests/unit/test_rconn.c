/* Unit tests for rconn.c without a Redis server: the pure helpers, TLS file
 * loading errors, connect failures and timeouts against loopback sockets,
 * and pipelining against a tiny in-process RESP responder (a thread that
 * answers PING and ECHO), large enough that both directions fill their
 * socket buffers at once; a TLS 1.3 server thread that refuses clients
 * without a certificate. */
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "rconn.h"

static void test_is_ip(void **state)
{
    (void)state;
    assert_true(rconn_is_ip("127.0.0.1"));
    assert_true(rconn_is_ip("::1"));
    assert_true(rconn_is_ip("2001:db8::7"));
    assert_false(rconn_is_ip("localhost"));
    assert_false(rconn_is_ip("redis.example.com"));
    assert_false(rconn_is_ip("1.2.3"));
    assert_false(rconn_is_ip(""));
}

static void test_verify_hint(void **state)
{
    (void)state;
    assert_null(rconn_verify_hint(0));
    assert_non_null(strstr(rconn_verify_hint(20), "unknown CA")); /* UNABLE_TO_GET_ISSUER_LOCALLY */
    assert_non_null(strstr(rconn_verify_hint(18), "unknown CA")); /* DEPTH_ZERO_SELF_SIGNED */
    assert_non_null(strstr(rconn_verify_hint(19), "cacert=FILE"));   /* SELF_SIGNED_IN_CHAIN */
    assert_non_null(strstr(rconn_verify_hint(62), "name mismatch")); /* HOSTNAME_MISMATCH */
    assert_non_null(strstr(rconn_verify_hint(64), "name mismatch")); /* IP_ADDRESS_MISMATCH */
    assert_non_null(strstr(rconn_verify_hint(10), "expired"));       /* CERT_HAS_EXPIRED */
    assert_non_null(strstr(rconn_verify_hint(9), "not valid yet"));  /* CERT_NOT_YET_VALID */
    assert_non_null(strstr(rconn_verify_hint(12345), "failed verification"));
}

static void write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

static void test_tls_files(void **state)
{
    char err[512], dir[] = "/tmp/test_rconn.XXXXXX", junk[300], missing[300];
    RconnTls *t;
    (void)state;

    assert_non_null(mkdtemp(dir));
    snprintf(junk, sizeof junk, "%s/junk.pem", dir);
    snprintf(missing, sizeof missing, "%s/missing.pem", dir);
    write_file(junk, "this is not a certificate\n");

    t = rconn_tls_new(missing, NULL, NULL, false, err, sizeof err);
    assert_null(t);
    print_message("%s\n", err);
    assert_non_null(strstr(err, "TLS CA file"));
    assert_non_null(strstr(err, missing));
    assert_non_null(strstr(err, "No such file"));

    t = rconn_tls_new(junk, NULL, NULL, false, err, sizeof err);
    assert_null(t);
    print_message("%s\n", err);
    assert_non_null(strstr(err, "cannot load the TLS CA file"));
    assert_non_null(strstr(err, junk));

    /* The system store, a certificate that is not PEM, a missing key. */
    t = rconn_tls_new("", NULL, NULL, false, err, sizeof err);
    assert_non_null(t);
    rconn_tls_free(t);
    t = rconn_tls_new(NULL, junk, junk, false, err, sizeof err);
    assert_null(t);
    print_message("%s\n", err);
    assert_non_null(strstr(err, "TLS certificate file"));
    assert_non_null(strstr(err, junk));
    t = rconn_tls_new(NULL, junk, missing, false, err, sizeof err);
    assert_null(t);
    print_message("%s\n", err);
    assert_non_null(strstr(err, "TLS key file"));
    assert_non_null(strstr(err, missing));
    rconn_tls_free(NULL);
    unlink(junk);
    rmdir(dir);
}

/* A loopback listener on a free port. */
static int listener(int *port)
{
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof sa;
    int fd = socket(AF_INET, SOCK_STREAM, 0);

    assert_true(fd >= 0);
    assert_int_equal(bind(fd, (struct sockaddr *)&sa, sizeof sa), 0);
    assert_int_equal(listen(fd, 8), 0);
    assert_int_equal(getsockname(fd, (struct sockaddr *)&sa, &len), 0);
    *port = ntohs(sa.sin_port);
    return fd;
}

static RconnConfig cfg_for(int port, int command_ms)
{
    RconnConfig c = {.label = "redis",
                     .host = "127.0.0.1",
                     .port = port,
                     .connect_timeout_ms = 1000,
                     .command_timeout_ms = command_ms};
    return c;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* rconn_format writes what hiredis' redisFormatCommandArgv writes, for
 * empty, binary and long arguments and argument counts past 9. */
static void test_format_matches_hiredis(void **state)
{
    static char big[100000];
    const char *argv[12];
    size_t lens[12];
    (void)state;

    for (size_t i = 0; i < sizeof big; i++)
        big[i] = (char)(i * 7);
    for (int argc = 1; argc <= 12; argc++) {
        for (int i = 0; i < argc; i++) {
            argv[i] = i % 3 == 0 ? "" : i % 3 == 1 ? "UNLINK" : big;
            lens[i] = i % 3 == 0 ? 0 : i % 3 == 1 ? 6 : (size_t)(i * 9973) % sizeof big;
        }
        char *want = NULL;
        int wlen = redisFormatCommandArgv(&want, argc, argv, lens);
        size_t max = rconn_format_max(argc, lens);
        char *got = malloc(max);

        assert_non_null(got);
        size_t glen = rconn_format(got, argc, argv, lens);
        assert_true(glen <= max);
        assert_int_equal(glen, (size_t)wlen);
        assert_memory_equal(got, want, glen);
        free(got);
        redisFreeCommand(want);
    }
}

static void test_refused(void **state)
{
    char err[512];
    int port, fd = listener(&port);
    RconnConfig c;
    (void)state;

    close(fd); /* nothing listens there now */
    c = cfg_for(port, 500);
    assert_null(rconn_open(&c, err, sizeof err));
    print_message("%s\n", err);
    assert_non_null(strstr(err, "could not connect to redis at 127.0.0.1:"));
    assert_non_null(strstr(err, "Connection refused"));

    c.path = "/nonexistent/redis.sock";
    assert_null(rconn_open(&c, err, sizeof err));
    print_message("%s\n", err);
    assert_non_null(strstr(err, "/nonexistent/redis.sock"));
    assert_non_null(strstr(err, "No such file"));
}

/* The kernel completes the connection, nobody ever answers: the PING of
 * rconn_open times out after the command timeout. */
static void test_silent_server(void **state)
{
    char err[512];
    int port, fd = listener(&port);
    RconnConfig c = cfg_for(port, 200);
    double t0 = now_s();
    (void)state;

    assert_null(rconn_open(&c, err, sizeof err));
    print_message("after %.3f s: %s\n", now_s() - t0, err);
    assert_true(now_s() - t0 >= 0.18 && now_s() - t0 < 1.0);
    assert_non_null(strstr(err, "did not answer PING within 200 ms (command timeout)"));
    close(fd);
}

/* ---- a RESP responder thread ------------------------------------------- */

typedef struct Responder {
    int lfd;
    long commands;
} Responder;

static void reply_to(int fd, const redisReply *cmd)
{
    char head[64];
    const redisReply *name = cmd->element[0];

    if (strcasecmp(name->str, "PING") == 0) {
        (void)!write(fd, "+PONG\r\n", 7);
    } else if (strcasecmp(name->str, "ECHO") == 0 && cmd->elements == 2) {
        int n = snprintf(head, sizeof head, "$%zu\r\n", cmd->element[1]->len);
        (void)!write(fd, head, (size_t)n);
        (void)!write(fd, cmd->element[1]->str, cmd->element[1]->len);
        (void)!write(fd, "\r\n", 2);
    } else {
        (void)!write(fd, "-ERR unknown command\r\n", 22);
    }
}

static void *respond(void *arg)
{
    Responder *r = arg;
    int fd = accept(r->lfd, NULL, NULL);
    redisReader *rd = redisReaderCreate();
    char buf[65536];
    ssize_t n;

    while ((n = read(fd, buf, sizeof buf)) > 0) {
        void *cmd;
        redisReaderFeed(rd, buf, (size_t)n);
        while (redisReaderGetReply(rd, &cmd) == REDIS_OK && cmd != NULL) {
            reply_to(fd, cmd);
            r->commands++;
            freeReplyObject(cmd);
        }
    }
    redisReaderFree(rd);
    close(fd);
    return NULL;
}

/* 20,000 pipelined ECHOs of 1 KiB each way (20 MiB), every reply read back
 * in order; then an error reply is a reply, not a failure. */
static void test_pipeline(void **state)
{
    enum { N = 20000, SIZE = 1024 };
    Responder r = {0};
    pthread_t th;
    char err[512], payload[SIZE + 1];
    int port;
    Rconn *c;
    (void)state;

    r.lfd = listener(&port);
    assert_int_equal(pthread_create(&th, NULL, respond, &r), 0);
    RconnConfig cfg = cfg_for(port, 5000);
    c = rconn_open(&cfg, err, sizeof err);
    if (c == NULL)
        fail_msg("%s", err);
    snprintf(err, sizeof err, "127.0.0.1:%d", port);
    assert_string_equal(rconn_addr(c), err);
    for (int i = 0; i < N; i++) {
        snprintf(payload, sizeof payload, "%08d", i);
        memset(payload + 8, 'x', SIZE - 8);
        payload[SIZE] = '\0';
        const char *argv[2] = {"ECHO", payload};
        size_t lens[2] = {4, SIZE};
        rconn_append(c, 2, argv, lens);
    }
    assert_int_equal(rconn_flush(c), 0);
    for (int i = 0; i < N; i++) {
        redisReply *rep;
        char want[9];
        assert_int_equal(rconn_read(c, &rep), 0);
        assert_int_equal(rep->type, REDIS_REPLY_STRING);
        assert_int_equal(rep->len, SIZE);
        snprintf(want, sizeof want, "%08d", i);
        assert_memory_equal(rep->str, want, 8);
        freeReplyObject(rep);
    }
    const char *argv[1] = {"NOPE"};
    size_t lens[1] = {4};
    redisReply *rep;
    assert_int_equal(rconn_command(c, &rep, 1, argv, lens), 0);
    assert_int_equal(rep->type, REDIS_REPLY_ERROR);
    freeReplyObject(rep);
    rconn_close(c);
    pthread_join(th, NULL);
    assert_int_equal(r.commands, N + 2); /* PING, the ECHOs, NOPE */
    close(r.lfd);
}

/* The server goes away mid-session: the read fails with a clear error. */
static void *accept_ping_close(void *arg)
{
    Responder *r = arg;
    int fd = accept(r->lfd, NULL, NULL);
    char buf[256];

    (void)!read(fd, buf, sizeof buf);
    (void)!write(fd, "+PONG\r\n", 7);
    (void)!read(fd, buf, sizeof buf);
    close(fd);
    return NULL;
}

static void test_closed_by_server(void **state)
{
    Responder r = {0};
    pthread_t th;
    char err[512];
    int port;
    redisReply *rep;
    const char *argv[1] = {"PING"};
    size_t lens[1] = {4};
    (void)state;

    r.lfd = listener(&port);
    assert_int_equal(pthread_create(&th, NULL, accept_ping_close, &r), 0);
    RconnConfig cfg = cfg_for(port, 2000);
    Rconn *c = rconn_open(&cfg, err, sizeof err);
    assert_non_null(c);
    assert_int_equal(rconn_command(c, &rep, 1, argv, lens), -1);
    print_message("%s\n", rconn_errstr(c));
    assert_non_null(strstr(rconn_errstr(c), "connection closed by the server"));
    assert_false(rconn_timed_out(c));
    rconn_close(c);
    pthread_join(th, NULL);
    close(r.lfd);
}

/* ---- a TLS 1.3 server that demands a client certificate ---------------- */

#define REFUSALS 100

typedef struct TlsRefuser {
    int lfd;
    SSL_CTX *ctx;
} TlsRefuser;

static int accept_any(int ok, X509_STORE_CTX *x)
{
    (void)ok;
    (void)x;
    return 1;
}

/* A self-signed certificate for localhost with its key. */
static void make_cert(EVP_PKEY **key, X509 **crt)
{
    *key = EVP_EC_gen("P-256");
    *crt = X509_new();
    assert_non_null(*key);
    assert_non_null(*crt);
    X509_set_version(*crt, 2);
    ASN1_INTEGER_set(X509_get_serialNumber(*crt), 1);
    X509_gmtime_adj(X509_getm_notBefore(*crt), -3600);
    X509_gmtime_adj(X509_getm_notAfter(*crt), 3600);
    X509_NAME *n = X509_get_subject_name(*crt);
    X509_NAME_add_entry_by_txt(n, "CN", MBSTRING_ASC, (const unsigned char *)"localhost", -1, -1,
                               0);
    X509_set_issuer_name(*crt, n);
    X509_set_pubkey(*crt, *key);
    assert_true(X509_sign(*crt, *key, EVP_sha256()) > 0);
}

/* Each connection: the handshake fails for want of a client certificate
 * (the server sends its alert), then the socket is closed with a reset, as
 * Redis does when the client's first command is already waiting. */
static void *refuse_clients(void *arg)
{
    TlsRefuser *r = arg;
    struct linger lg = {.l_onoff = 1, .l_linger = 0};

    for (int i = 0; i < REFUSALS; i++) {
        int fd = accept(r->lfd, NULL, NULL);
        if (fd < 0)
            break;
        SSL *ssl = SSL_new(r->ctx);
        SSL_set_fd(ssl, fd);
        (void)SSL_accept(ssl); /* fails: the client sends no certificate */
        SSL_free(ssl);
        setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
        close(fd);
    }
    return NULL;
}

/* In TLS 1.3 the client's handshake ends before the server judged the
 * client certificate; the server's alert and reset then race the client's
 * first command. Every refusal must still name the missing certificate,
 * never just "connection reset" (seen in CI under ASan). */
static void test_missing_client_cert_named(void **state)
{
    char dir[] = "/tmp/test_rconn.XXXXXX", ca[300], err[512];
    TlsRefuser r = {0};
    EVP_PKEY *key;
    X509 *crt;
    pthread_t th;
    int port, named = 0;
    (void)state;

    make_cert(&key, &crt);
    assert_non_null(mkdtemp(dir));
    snprintf(ca, sizeof ca, "%s/ca.pem", dir);
    FILE *f = fopen(ca, "w");
    assert_non_null(f);
    assert_int_equal(PEM_write_X509(f, crt), 1);
    fclose(f);
    r.ctx = SSL_CTX_new(TLS_server_method());
    assert_non_null(r.ctx);
    SSL_CTX_set_min_proto_version(r.ctx, TLS1_3_VERSION);
    assert_int_equal(SSL_CTX_use_certificate(r.ctx, crt), 1);
    assert_int_equal(SSL_CTX_use_PrivateKey(r.ctx, key), 1);
    SSL_CTX_set_verify(r.ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, accept_any);
    r.lfd = listener(&port);
    assert_int_equal(pthread_create(&th, NULL, refuse_clients, &r), 0);

    RconnTls *t = rconn_tls_new(ca, NULL, NULL, false, err, sizeof err);
    assert_non_null(t);
    RconnConfig cfg = cfg_for(port, 2000);
    cfg.host = "localhost";
    cfg.tls = t;
    for (int i = 0; i < REFUSALS; i++) {
        Rconn *c = rconn_open(&cfg, err, sizeof err);
        assert_null(c);
        if (strstr(err, "requires a client certificate") != NULL)
            named++;
        else
            print_message("refusal %d: %s\n", i, err);
    }
    print_message("%d of %d refusals name the client certificate\n", named, REFUSALS);
    assert_int_equal(named, REFUSALS);

    pthread_join(th, NULL);
    close(r.lfd);
    rconn_tls_free(t);
    SSL_CTX_free(r.ctx);
    X509_free(crt);
    EVP_PKEY_free(key);
    unlink(ca);
    rmdir(dir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_is_ip),
        cmocka_unit_test(test_verify_hint),
        cmocka_unit_test(test_tls_files),
        cmocka_unit_test(test_format_matches_hiredis),
        cmocka_unit_test(test_refused),
        cmocka_unit_test(test_silent_server),
        cmocka_unit_test(test_pipeline),
        cmocka_unit_test(test_closed_by_server),
        cmocka_unit_test(test_missing_client_cert_named),
    };
    signal(SIGPIPE, SIG_IGN);
    return cmocka_run_group_tests(tests, NULL, NULL);
}
