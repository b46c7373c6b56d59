/*
 * rconn.c — one Redis connection over TCP, a unix socket or TLS (see
 * rconn.h for the contract).
 *
 * The socket is non-blocking from the start. Every wait is a poll() for
 * what the last operation needs (for TLS, OpenSSL says whether it wants to
 * read or write); a poll that sees no readiness within the timeout fails
 * the connection. Output is one growing buffer of RESP text, written from
 * an offset; input goes straight into a hiredis reader. While a pipeline is
 * written, whatever the server already answered is read too, so neither
 * side can stall on a full socket buffer.
 */
#include "rconn.h"

#include "mem.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define RCONN_READ_CHUNK 16384
/* How long a TLS 1.3 handshake waits for the server's verdict on the
 * client certificate (see settle_tls13()). */
#define RCONN_TLS13_SETTLE_MS 250

struct RconnTls {
    SSL_CTX *ctx;
    bool insecure;
};

struct Rconn {
    int fd;
    SSL *ssl;
    redisReader *reader;
    char *out;
    size_t out_len, out_off, out_cap;
    int command_timeout_ms;
    bool timed_out;
    bool sent; /* plain TCP: the last step() sent the rest of out */
    char label[48];
    char addr[300];
    char errstr[512];
};

static void set_err(Rconn *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void set_err(Rconn *c, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(c->errstr, sizeof c->errstr, fmt, ap);
    va_end(ap);
}

/* ---- pure helpers ------------------------------------------------------ */

bool rconn_is_ip(const char *s)
{
    unsigned char buf[sizeof(struct in6_addr)];

    return inet_pton(AF_INET, s, buf) == 1 || inet_pton(AF_INET6, s, buf) == 1;
}

const char *rconn_verify_hint(long code)
{
    switch (code) {
    case X509_V_OK:
        return NULL;
    case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY:
    case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT:
    case X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN:
    case X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT:
    case X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE:
    case X509_V_ERR_CERT_SIGNATURE_FAILURE:
        return "the server's certificate is not signed by a trusted CA (unknown CA): give the CA "
               "that signed it with cacert=FILE";
    case X509_V_ERR_HOSTNAME_MISMATCH:
    case X509_V_ERR_IP_ADDRESS_MISMATCH:
        return "the server's certificate is not issued for the name connected to (name "
               "mismatch): connect by a name the certificate lists, or name one with sni=NAME";
    case X509_V_ERR_CERT_HAS_EXPIRED:
        return "the server's certificate has expired: renew it on the server";
    case X509_V_ERR_CERT_NOT_YET_VALID:
        return "the server's certificate is not valid yet: check the clocks";
    default:
        return "the server's certificate failed verification";
    }
}

/* A sentence for a TLS failure that is not a verification result: an
 * alert from the server, or a server that does not speak TLS. */
static const char *tls_alert_hint(unsigned long e)
{
    switch (ERR_GET_REASON(e)) {
    case SSL_R_TLSV13_ALERT_CERTIFICATE_REQUIRED:
    case SSL_R_SSLV3_ALERT_HANDSHAKE_FAILURE:
        return "the server requires a client certificate (mutual TLS): add cert=FILE&key=FILE";
    case SSL_R_TLSV1_ALERT_UNKNOWN_CA:
    case SSL_R_SSLV3_ALERT_BAD_CERTIFICATE:
        return "the server does not accept the client certificate (unknown CA): use one signed "
               "by a CA the server trusts";
    case SSL_R_SSLV3_ALERT_CERTIFICATE_EXPIRED:
        return "the server says the client certificate has expired";
    case SSL_R_WRONG_VERSION_NUMBER:
    case SSL_R_PACKET_LENGTH_TOO_LONG:
        return "the server did not answer with TLS: is this a plain-text port (redis://)?";
    default:
        return "TLS error";
    }
}

/* ---- TLS setup --------------------------------------------------------- */

/* Can the file be opened for reading? Writes why not. */
static bool readable(const char *what, const char *path, char *err, size_t errlen)
{
    FILE *f = fopen(path, "r");

    if (f == NULL) {
        snprintf(err, errlen, "cannot read the TLS %s file %s: %s", what, path, strerror(errno));
        return false;
    }
    fclose(f);
    return true;
}

/* The newest OpenSSL error as text, clearing the queue. */
static const char *ssl_errtext(char *buf, size_t len)
{
    unsigned long e = ERR_peek_last_error();

    if (e == 0)
        snprintf(buf, len, "unknown error");
    else
        ERR_error_string_n(e, buf, len);
    ERR_clear_error();
    return buf;
}

static int tls_load(RconnTls *t, const char *cacert, const char *cert, const char *key, char *err,
                    size_t errlen)
{
    char why[256];

    if (cacert != NULL && cacert[0] != '\0') {
        if (!readable("CA", cacert, err, errlen))
            return -1;
        if (SSL_CTX_load_verify_locations(t->ctx, cacert, NULL) != 1) {
            snprintf(err, errlen, "cannot load the TLS CA file %s (want PEM certificates): %s",
                     cacert, ssl_errtext(why, sizeof why));
            return -1;
        }
    } else if (SSL_CTX_set_default_verify_paths(t->ctx) != 1) {
        snprintf(err, errlen, "cannot load the system CA store: %s", ssl_errtext(why, sizeof why));
        return -1;
    }
    if (cert == NULL || cert[0] == '\0')
        return 0;
    if (!readable("certificate", cert, err, errlen) || !readable("key", key, err, errlen))
        return -1;
    if (SSL_CTX_use_certificate_chain_file(t->ctx, cert) != 1) {
        snprintf(err, errlen, "cannot load the TLS certificate file %s (want PEM): %s", cert,
                 ssl_errtext(why, sizeof why));
        return -1;
    }
    if (SSL_CTX_use_PrivateKey_file(t->ctx, key, SSL_FILETYPE_PEM) != 1) {
        snprintf(err, errlen, "cannot load the TLS key file %s (want an unencrypted PEM key): %s",
                 key, ssl_errtext(why, sizeof why));
        return -1;
    }
    if (SSL_CTX_check_private_key(t->ctx) != 1) {
        snprintf(err, errlen, "the TLS key file %s does not match the certificate file %s", key,
                 cert);
        ERR_clear_error();
        return -1;
    }
    return 0;
}

RconnTls *rconn_tls_new(const char *cacert, const char *cert, const char *key, bool insecure,
                        char *err, size_t errlen)
{
    RconnTls *t = xcalloc(1, sizeof *t);
    char why[256];

    t->insecure = insecure;
    t->ctx = SSL_CTX_new(TLS_client_method());
    if (t->ctx == NULL) {
        snprintf(err, errlen, "cannot set up TLS: %s", ssl_errtext(why, sizeof why));
        free(t);
        return NULL;
    }
    SSL_CTX_set_min_proto_version(t->ctx, TLS1_2_VERSION);
    SSL_CTX_set_mode(t->ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    SSL_CTX_set_verify(t->ctx, insecure ? SSL_VERIFY_NONE : SSL_VERIFY_PEER, NULL);
    if (tls_load(t, cacert, cert, key, err, errlen) < 0) {
        rconn_tls_free(t);
        return NULL;
    }
    return t;
}

void rconn_tls_free(RconnTls *t)
{
    if (t == NULL)
        return;
    SSL_CTX_free(t->ctx);
    free(t);
}

/* ---- time and polling -------------------------------------------------- */

static long long now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Wait up to ms for events on fd. 1 ready, 0 timeout, -1 error. */
static int wait_fd(int fd, short events, int ms)
{
    struct pollfd p = {.fd = fd, .events = events};
    long long deadline = now_ms() + ms;

    for (;;) {
        int left = (int)(deadline - now_ms());
        int rc = poll(&p, 1, left > 0 ? left : 0);
        if (rc >= 0)
            return rc > 0 ? 1 : 0;
        if (errno != EINTR)
            return -1;
    }
}

/* ---- raw I/O ----------------------------------------------------------- */

/* Describe a TLS failure of the last SSL call (ret its result) in errstr. */
static void tls_fail(Rconn *c, int ret, const char *during)
{
    int e = SSL_get_error(c->ssl, ret);
    unsigned long q = ERR_peek_last_error();
    char why[256];

    if (e == SSL_ERROR_ZERO_RETURN || (e == SSL_ERROR_SYSCALL && q == 0 && errno == 0)) {
        set_err(c, "connection closed by the server during %s", during);
        return;
    }
    if (e == SSL_ERROR_SYSCALL && q == 0) {
        set_err(c, "I/O error during %s: %s", during, strerror(errno));
        return;
    }
    set_err(c, "TLS failure during %s: %s (%s)", during, tls_alert_hint(q),
            ssl_errtext(why, sizeof why));
}

/* Write up to n bytes. Returns the count (> 0), 0 when the socket would
 * block (*want gets the poll events to wait for), -1 on failure. */
static ssize_t io_write(Rconn *c, const char *p, size_t n, short *want)
{
    if (c->ssl != NULL) {
        ERR_clear_error();
        errno = 0;
        int r = SSL_write(c->ssl, p, (int)(n > INT32_MAX ? INT32_MAX : n));
        if (r > 0)
            return r;
        int e = SSL_get_error(c->ssl, r);
        if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
            *want |= e == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT;
            return 0;
        }
        tls_fail(c, r, "a write");
        return -1;
    }
    for (;;) {
        ssize_t r = send(c->fd, p, n, MSG_NOSIGNAL);
        if (r >= 0)
            return r;
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            *want |= POLLOUT;
            return 0;
        }
        set_err(c, "I/O error while sending: %s", strerror(errno));
        return -1;
    }
}

/* Read up to n bytes; as io_write, and end of stream is a failure. */
static ssize_t io_read(Rconn *c, char *p, size_t n, short *want)
{
    if (c->ssl != NULL) {
        ERR_clear_error();
        errno = 0;
        int r = SSL_read(c->ssl, p, (int)n);
        if (r > 0)
            return r;
        int e = SSL_get_error(c->ssl, r);
        if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
            *want |= e == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT;
            return 0;
        }
        tls_fail(c, r, "a read");
        return -1;
    }
    for (;;) {
        ssize_t r = recv(c->fd, p, n, 0);
        if (r > 0)
            return r;
        if (r == 0) {
            set_err(c, "connection closed by the server");
            return -1;
        }
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            *want |= POLLIN;
            return 0;
        }
        set_err(c, "I/O error while receiving: %s", strerror(errno));
        return -1;
    }
}

/* One step: write what is pending, read what arrived; when neither made
 * progress, wait for the socket. Returns 0 or -1 (errstr set).
 *
 * Over plain TCP, once everything is sent the next step waits for the
 * reply instead of trying a read first: the server cannot have answered
 * what it has not read yet, and each read that finds nothing is a system
 * call (two per round trip, measured). Not over TLS, whose library may
 * hold decrypted bytes the socket no longer shows. */
static int step(Rconn *c)
{
    char buf[RCONN_READ_CHUNK];
    short want = 0;
    bool progress = false;
    ssize_t n;

    if (c->out_off < c->out_len) {
        n = io_write(c, c->out + c->out_off, c->out_len - c->out_off, &want);
        if (n < 0)
            return -1;
        c->out_off += (size_t)n;
        progress = n > 0;
        if (c->out_off == c->out_len) {
            c->out_off = c->out_len = 0;
            c->sent = c->ssl == NULL;
            return 0;
        }
    }
    if (c->sent) {
        c->sent = false;
        want = POLLIN;
        goto wait;
    }
    n = io_read(c, buf, sizeof buf, &want);
    if (n < 0)
        return -1;
    if (n > 0) {
        if (redisReaderFeed(c->reader, buf, (size_t)n) != REDIS_OK)
            mem_oom();
        return 0;
    }
    if (progress)
        return 0;
wait:
    switch (wait_fd(c->fd, want, c->command_timeout_ms)) {
    case 1:
        return 0;
    case 0:
        c->timed_out = true;
        set_err(c, "no answer within %d ms (command timeout)", c->command_timeout_ms);
        return -1;
    default:
        set_err(c, "poll failed: %s", strerror(errno));
        return -1;
    }
}

/* ---- commands ---------------------------------------------------------- */

void rconn_append_raw(Rconn *c, const char *cmd, size_t len)
{
    c->out = xgrow(c->out, &c->out_cap, c->out_len + len, 1);
    memcpy(c->out + c->out_len, cmd, len);
    c->out_len += len;
}

/* "<prefix><n>\r\n" at p; returns the end. */
static char *put_header(char *p, char prefix, size_t n)
{
    char digits[24];
    int nd = 0;

    do {
        digits[nd++] = (char)('0' + n % 10);
        n /= 10;
    } while (n > 0);
    *p++ = prefix;
    while (nd > 0)
        *p++ = digits[--nd];
    *p++ = '\r';
    *p++ = '\n';
    return p;
}

size_t rconn_format_max(int argc, const size_t *lens)
{
    size_t need = 1 + 20 + 2;

    for (int i = 0; i < argc; i++)
        need += 1 + 20 + 2 + lens[i] + 2;
    return need;
}

size_t rconn_format(char *out, int argc, const char **argv, const size_t *lens)
{
    char *p = put_header(out, '*', (size_t)argc);

    for (int i = 0; i < argc; i++) {
        p = put_header(p, '$', lens[i]);
        if (lens[i] > 0)
            memcpy(p, argv[i], lens[i]);
        p += lens[i];
        *p++ = '\r';
        *p++ = '\n';
    }
    return (size_t)(p - out);
}

/* Straight into the output buffer: no allocation and no sprintf() per
 * argument, as redisFormatCommandArgv() has (1.6 % of walbust's CPU in a
 * drain, with the copy and the free after it). cluster.c keeps its queued
 * commands in the same form (rconn_format). */
void rconn_append(Rconn *c, int argc, const char **argv, const size_t *lens)
{
    c->out = xgrow(c->out, &c->out_cap, c->out_len + rconn_format_max(argc, lens), 1);
    c->out_len += rconn_format(c->out + c->out_len, argc, argv, lens);
}

int rconn_flush(Rconn *c)
{
    c->timed_out = false;
    while (c->out_len > 0)
        if (step(c) < 0)
            return -1;
    return 0;
}

int rconn_read(Rconn *c, redisReply **out)
{
    c->timed_out = false;
    for (;;) {
        void *r = NULL;
        if (redisReaderGetReply(c->reader, &r) != REDIS_OK) {
            set_err(c, "protocol error: %s", c->reader->errstr);
            return -1;
        }
        if (r != NULL) {
            *out = r;
            return 0;
        }
        if (step(c) < 0)
            return -1;
    }
}

int rconn_poll(Rconn *c, redisReply **out)
{
    char buf[RCONN_READ_CHUNK];

    c->timed_out = false;
    for (;;) {
        void *r = NULL;
        short want = 0;
        ssize_t n;

        if (redisReaderGetReply(c->reader, &r) != REDIS_OK) {
            set_err(c, "protocol error: %s", c->reader->errstr);
            return -1;
        }
        if (r != NULL) {
            *out = r;
            return 1;
        }
        if (c->out_off < c->out_len) {
            n = io_write(c, c->out + c->out_off, c->out_len - c->out_off, &want);
            if (n < 0)
                return -1;
            c->out_off += (size_t)n;
            if (c->out_off == c->out_len)
                c->out_off = c->out_len = 0;
        }
        n = io_read(c, buf, sizeof buf, &want);
        if (n < 0)
            return -1;
        if (n == 0)
            return 0;
        if (redisReaderFeed(c->reader, buf, (size_t)n) != REDIS_OK)
            mem_oom();
    }
}

int rconn_command(Rconn *c, redisReply **out, int argc, const char **argv, const size_t *lens)
{
    rconn_append(c, argc, argv, lens);
    return rconn_read(c, out);
}

const char *rconn_errstr(const Rconn *c)
{
    return c->errstr;
}

bool rconn_timed_out(const Rconn *c)
{
    return c->timed_out;
}

const char *rconn_addr(const Rconn *c)
{
    return c->addr;
}

void rconn_close(Rconn *c)
{
    if (c == NULL)
        return;
    if (c->ssl != NULL)
        SSL_free(c->ssl); /* no close_notify: the socket may be dead */
    if (c->fd >= 0)
        close(c->fd);
    if (c->reader != NULL)
        redisReaderFree(c->reader);
    free(c->out);
    free(c);
}

/* ---- opening ----------------------------------------------------------- */

/* Finish a non-blocking connect of fd within the deadline. */
static int connect_wait(int fd, const struct sockaddr *sa, socklen_t len, long long deadline,
                        char *why, size_t whylen)
{
    int soerr = 0;
    socklen_t sl = sizeof soerr;
    int left;

    if (connect(fd, sa, len) == 0)
        return 0;
    if (errno != EINPROGRESS) {
        snprintf(why, whylen, "%s", strerror(errno));
        return -1;
    }
    left = (int)(deadline - now_ms());
    if (left <= 0 || wait_fd(fd, POLLOUT, left) != 1) {
        snprintf(why, whylen, "no connection within the connect timeout");
        return -1;
    }
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl) < 0 || soerr != 0) {
        snprintf(why, whylen, "%s", strerror(soerr ? soerr : errno));
        return -1;
    }
    return 0;
}

static int open_unix(Rconn *c, const char *path, long long deadline, char *why, size_t whylen)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};

    if (strlen(path) >= sizeof sa.sun_path) {
        snprintf(why, whylen, "socket path too long");
        return -1;
    }
    memcpy(sa.sun_path, path, strlen(path) + 1);
    c->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) {
        snprintf(why, whylen, "socket: %s", strerror(errno));
        return -1;
    }
    return connect_wait(c->fd, (struct sockaddr *)&sa, sizeof sa, deadline, why, whylen);
}

/* Try every address of host:port until one connects. */
static int open_tcp(Rconn *c, const char *host, int port, long long deadline, char *why,
                    size_t whylen)
{
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
    struct addrinfo *res, *ai;
    char service[16];
    int one = 1, rc;

    snprintf(service, sizeof service, "%d", port);
    rc = getaddrinfo(host, service, &hints, &res);
    if (rc != 0) {
        snprintf(why, whylen, "cannot resolve %s: %s", host, gai_strerror(rc));
        return -1;
    }
    rc = -1;
    for (ai = res; ai != NULL && rc < 0; ai = ai->ai_next) {
        if (c->fd >= 0)
            close(c->fd);
        c->fd =
            socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, ai->ai_protocol);
        if (c->fd < 0) {
            snprintf(why, whylen, "socket: %s", strerror(errno));
            continue;
        }
        rc = connect_wait(c->fd, ai->ai_addr, ai->ai_addrlen, deadline, why, whylen);
    }
    freeaddrinfo(res);
    if (rc == 0) {
        (void)setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        (void)setsockopt(c->fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
    }
    return rc;
}

/* In TLS 1.3 the client's handshake is over before the server has judged
 * the client's certificate: the server answers the client's Finished with
 * session tickets (accepted) or an alert such as "certificate required",
 * then closes, resetting the connection. When that reset arrives before
 * the first command is written, the write fails with "connection reset"
 * and the alert, already received, is never read: the error would not name
 * the certificate (one refusal in a hundred on an idle machine, most of
 * them under load). So wait for the server's first record (one round trip),
 * at most RCONN_TLS13_SETTLE_MS: a server that sends no tickets costs that
 * wait once per connection. */
static int settle_tls13(Rconn *c, long long deadline, char *why, size_t whylen)
{
    if (SSL_version(c->ssl) != TLS1_3_VERSION)
        return 0;
    int left = (int)(deadline - now_ms());
    if (left <= 0 ||
        wait_fd(c->fd, POLLIN, left < RCONN_TLS13_SETTLE_MS ? left : RCONN_TLS13_SETTLE_MS) != 1)
        return 0;
    char b;
    ERR_clear_error();
    errno = 0;
    int r = SSL_peek(c->ssl, &b, 1);
    int e = r > 0 ? SSL_ERROR_NONE : SSL_get_error(c->ssl, r);
    if (e == SSL_ERROR_NONE || e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE)
        return 0;
    tls_fail(c, r, "the TLS handshake");
    snprintf(why, whylen, "%s", c->errstr);
    return -1;
}

/* The TLS handshake within the deadline, verifying name (unless
 * insecure). */
static int handshake(Rconn *c, RconnTls *t, const char *name, long long deadline, char *why,
                     size_t whylen)
{
    bool ip = rconn_is_ip(name);

    c->ssl = SSL_new(t->ctx);
    if (c->ssl == NULL || SSL_set_fd(c->ssl, c->fd) != 1)
        mem_oom();
    if (!ip)
        SSL_set_tlsext_host_name(c->ssl, name);
    if (!t->insecure) {
        int ok = ip ? X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(c->ssl), name)
                    : SSL_set1_host(c->ssl, name);
        if (ok != 1) {
            snprintf(why, whylen, "cannot verify the TLS server name \"%s\"", name);
            return -1;
        }
    }
    for (;;) {
        ERR_clear_error();
        errno = 0;
        int r = SSL_connect(c->ssl);
        if (r == 1)
            return settle_tls13(c, deadline, why, whylen);
        int e = SSL_get_error(c->ssl, r);
        int left = (int)(deadline - now_ms());
        if ((e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) && left > 0 &&
            wait_fd(c->fd, e == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT, left) == 1)
            continue;
        if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
            snprintf(why, whylen, "TLS handshake not finished within the connect timeout");
            return -1;
        }
        long v = SSL_get_verify_result(c->ssl);
        if (v != X509_V_OK) {
            snprintf(why, whylen, "TLS handshake failed: %s (%s)", rconn_verify_hint(v),
                     X509_verify_cert_error_string(v));
            ERR_clear_error();
            return -1;
        }
        tls_fail(c, r, "the TLS handshake");
        snprintf(why, whylen, "%s", c->errstr);
        return -1;
    }
}

/* Run one command during open. An I/O failure or a reply of another type
 * than want_type fails with a complete message in why ("redis AUTH failed
 * at host:port as user alice: WRONGPASS ..."). */
static int open_command(Rconn *c, const char *name, const char *detail, int argc, const char **argv,
                        const size_t *lens, int want_type, char *why, size_t whylen)
{
    redisReply *r;
    int rc = 0;

    if (rconn_command(c, &r, argc, argv, lens) < 0) {
        if (c->timed_out)
            snprintf(why, whylen, "%s at %s did not answer %s within %d ms (command timeout)",
                     c->label, c->addr, name, c->command_timeout_ms);
        else
            snprintf(why, whylen, "%s I/O error at %s during %s: %s", c->label, c->addr, name,
                     c->errstr);
        return -1;
    }
    if (r->type != want_type) {
        snprintf(why, whylen, "%s %s failed at %s%s: %s", c->label, name, c->addr, detail,
                 r->type == REDIS_REPLY_ERROR ? r->str : "unexpected reply");
        rc = -1;
    }
    freeReplyObject(r);
    return rc;
}

/* AUTH, SELECT, PING; why gets a complete message. */
static int open_session(Rconn *c, const RconnConfig *cfg, char *why, size_t whylen)
{
    const char *argv[3] = {"AUTH"};
    size_t lens[3] = {4};
    int argc = 1;
    char db[16], detail[160] = "";
    bool user = cfg->user != NULL && cfg->user[0] != '\0';

    if (cfg->has_password) {
        if (user) {
            argv[argc] = cfg->user;
            lens[argc++] = strlen(cfg->user);
            snprintf(detail, sizeof detail, " as user %s", cfg->user);
        }
        argv[argc] = cfg->password != NULL ? cfg->password : "";
        lens[argc] = strlen(argv[argc]);
        argc++;
        /* Redis' AUTH errors never echo the password. */
        if (open_command(c, "AUTH", detail, argc, argv, lens, REDIS_REPLY_STATUS, why, whylen) < 0)
            return -1;
    }
    if (cfg->db != 0) {
        argv[0] = "SELECT";
        lens[0] = 6;
        argv[1] = db;
        lens[1] = (size_t)snprintf(db, sizeof db, "%d", cfg->db);
        snprintf(detail, sizeof detail, "SELECT %d", cfg->db);
        if (open_command(c, detail, "", 2, argv, lens, REDIS_REPLY_STATUS, why, whylen) < 0)
            return -1;
    }
    argv[0] = "PING";
    lens[0] = 4;
    if (open_command(c, "PING", "", 1, argv, lens, REDIS_REPLY_STATUS, why, whylen) < 0) {
        if (strstr(why, "NOAUTH") != NULL)
            snprintf(why + strlen(why), whylen - strlen(why),
                     " (put the password in the URL: redis://[user]:password@host:port)");
        return -1;
    }
    return 0;
}

static void describe_addr(Rconn *c, const RconnConfig *cfg)
{
    if (cfg->path != NULL && cfg->path[0] != '\0')
        snprintf(c->addr, sizeof c->addr, "%s", cfg->path);
    else if (strchr(cfg->host, ':') != NULL)
        snprintf(c->addr, sizeof c->addr, "[%s]:%d", cfg->host, cfg->port);
    else
        snprintf(c->addr, sizeof c->addr, "%s:%d", cfg->host, cfg->port);
}

Rconn *rconn_open(const RconnConfig *cfg, char *err, size_t errlen)
{
    Rconn *c = xcalloc(1, sizeof *c);
    long long deadline = now_ms() + cfg->connect_timeout_ms;
    char why[400] = "";
    int rc;

    c->fd = -1;
    c->command_timeout_ms = cfg->command_timeout_ms > 0 ? cfg->command_timeout_ms : 5000;
    snprintf(c->label, sizeof c->label, "%s", cfg->label ? cfg->label : "redis");
    describe_addr(c, cfg);
    c->reader = redisReaderCreate();
    if (c->reader == NULL)
        mem_oom();
    if (cfg->path != NULL && cfg->path[0] != '\0')
        rc = open_unix(c, cfg->path, deadline, why, sizeof why);
    else
        rc = open_tcp(c, cfg->host, cfg->port, deadline, why, sizeof why);
    if (rc < 0) {
        snprintf(err, errlen, "could not connect to %s at %s: %s", c->label, c->addr, why);
    } else if (cfg->tls != NULL &&
               handshake(c, cfg->tls, cfg->sni && cfg->sni[0] ? cfg->sni : cfg->host, deadline, why,
                         sizeof why) < 0) {
        snprintf(err, errlen, "could not set up TLS with %s at %s: %s", c->label, c->addr, why);
        rc = -1;
    } else if (open_session(c, cfg, err, errlen) < 0) {
        /* A TLS port closes on plain text at once. */
        if (cfg->tls == NULL &&
            (strstr(err, "closed by the server") != NULL || strstr(err, "reset by peer") != NULL))
            snprintf(err + strlen(err), errlen - strlen(err),
                     " (if this port expects TLS, use rediss://)");
        rc = -1;
    }
    if (rc == 0)
        return c;
    rconn_close(c);
    return NULL;
}
