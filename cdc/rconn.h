/*
 * rconn.h — one connection to one Redis server: the only code in walbust
 * that touches sockets and TLS.
 *
 * rconn_open() connects with a timeout (a non-blocking connect and poll)
 * over TCP or a unix socket, optionally runs a TLS handshake (OpenSSL,
 * verifying the server's certificate and name unless told not to), then
 * AUTH (ACL user and password), SELECT and PING. Commands are appended to
 * an output buffer (pipelined) and replies read one by one; every wait is
 * bounded by the command timeout, counted from the last progress (bytes
 * sent or received), like a socket receive timeout. hiredis is used only
 * for its protocol parts (redisFormatCommandArgv and the reply reader),
 * which work on buffers: Debian's hiredis 0.14 has no TLS.
 *
 * A connection whose read or write failed (I/O error, timeout, protocol
 * error, TLS alert) is unusable: the caller closes it and opens a new one.
 * An error reply from Redis is not a failure here; it is a reply.
 * The module does not log; errors go to rconn_errstr() or a caller buffer,
 * and never contain the password.
 */
#ifndef WALBUST_RCONN_H
#define WALBUST_RCONN_H

#include <hiredis/hiredis.h>
#include <stdbool.h>
#include <stddef.h>

/* A TLS client setup (CA store, client certificate), shared by every
 * connection of a target. */
typedef struct RconnTls RconnTls;

/* Load the TLS files: cacert (PEM CA bundle; NULL or "" for the system
 * store), cert and key (client certificate chain and its private key, both
 * or neither). insecure skips certificate and host name verification.
 * Returns NULL with err naming the file and the problem (missing,
 * unreadable, not PEM, key not matching the certificate). */
RconnTls *rconn_tls_new(const char *cacert, const char *cert, const char *key, bool insecure,
                        char *err, size_t errlen);

/* Free a TLS setup (after every connection using it is closed). Accepts
 * NULL. */
void rconn_tls_free(RconnTls *t);

typedef struct RconnConfig {
    const char *label; /* "redis", "redis cluster node", ... for messages */
    const char *host;  /* TCP host (name, IPv4 or unbracketed IPv6) */
    int port;
    const char *path; /* unix socket path; used instead of host when not "" */
    RconnTls *tls;    /* NULL: plain text (borrowed, must outlive) */
    const char *sni;  /* TLS server name to send and verify; NULL or "": host */
    const char *user; /* ACL user, NULL or "" for the default user */
    const char *password;
    bool has_password; /* send AUTH */
    int db;            /* SELECT when not 0 */
    int connect_timeout_ms;
    int command_timeout_ms;
} RconnConfig;

typedef struct Rconn Rconn;

/* Connect, handshake, AUTH, SELECT and PING (see the file comment).
 * Returns the connection, or NULL with a message in err naming the target
 * and what failed (for TLS: unknown CA, name mismatch, expired certificate,
 * client certificate required). cfg's strings are copied. */
Rconn *rconn_open(const RconnConfig *cfg, char *err, size_t errlen);

/* Close and free. Accepts NULL. */
void rconn_close(Rconn *c);

/* "host:port" (IPv6 bracketed) or the socket path. */
const char *rconn_addr(const Rconn *c);

/* Append a command to the output buffer (not sent yet). */
void rconn_append(Rconn *c, int argc, const char **argv, const size_t *lens);

/* A command in RESP form, as redisFormatCommandArgv() writes it: at most
 * rconn_format_max() bytes written to out; returns how many. */
size_t rconn_format_max(int argc, const size_t *lens);
size_t rconn_format(char *out, int argc, const char **argv, const size_t *lens);

/* Append a command already in RESP form. */
void rconn_append_raw(Rconn *c, const char *cmd, size_t len);

/* Send everything appended (replies that arrive meanwhile are buffered).
 * Returns 0, or -1 (rconn_errstr(); the connection is unusable). */
int rconn_flush(Rconn *c) __attribute__((warn_unused_result));

/* Send what is pending and read the next reply into *out (the caller frees
 * it with freeReplyObject). Returns 0, or -1 (rconn_errstr(); the
 * connection is unusable). */
int rconn_read(Rconn *c, redisReply **out) __attribute__((warn_unused_result));

/* Without waiting: send what is pending (as much as the socket takes) and
 * take the next reply if one has arrived in full. Returns 1 with *out (the
 * caller frees it), 0 when none is there yet, -1 on failure (rconn_errstr();
 * the connection is unusable; a server that closed it is a failure). For
 * pushed messages (a SUBSCRIBE connection) read from a caller's loop. */
int rconn_poll(Rconn *c, redisReply **out) __attribute__((warn_unused_result));

/* rconn_append + rconn_read. */
int rconn_command(Rconn *c, redisReply **out, int argc, const char **argv, const size_t *lens)
    __attribute__((warn_unused_result));

/* Why the last call failed ("connection closed by the server", "no answer
 * within 5000 ms (command timeout)", a TLS error, ...). */
const char *rconn_errstr(const Rconn *c);

/* Did the last failure come from the command timeout? */
bool rconn_timed_out(const Rconn *c);

/* ---- pure helpers (unit-tested) ---------------------------------------- */

/* Is s an IPv4 or IPv6 literal (verified as an IP address rather than a
 * DNS name, and never sent as SNI)? */
bool rconn_is_ip(const char *s);

/* A sentence for an OpenSSL certificate verification result code
 * (X509_V_ERR_*): what is wrong and what to change, e.g. for an unknown CA
 * "the server's certificate is not signed by a trusted CA (unknown CA): give
 * the CA that signed it with cacert=FILE". NULL for X509_V_OK. */
const char *rconn_verify_hint(long code);

#endif
