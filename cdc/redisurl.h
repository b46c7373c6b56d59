/*
 * redisurl.h — parse Redis target URLs (pure).
 *
 * Accepted forms (SPEC §2):
 *   redis://[[user]:password@]host[:port][/db]
 *   unix://[[user]:password@]/path/to/redis.sock[?db=N]
 *   redis+cluster://host:port[,host:port...]   (parsed; cluster routing is
 *                                               a separate module)
 * host may be a bracketed IPv6 literal. Percent-escapes in user and password
 * are decoded. Default port 6379, default db 0.
 */
#ifndef WALBUST_REDISURL_H
#define WALBUST_REDISURL_H

#include <stdbool.h>
#include <stddef.h>

typedef enum RedisUrlKind {
    REDISURL_TCP,
    REDISURL_UNIX,
    REDISURL_CLUSTER,
} RedisUrlKind;

typedef struct RedisUrl {
    RedisUrlKind kind;
    char host[256];     /* TCP/cluster: first seed host; unbracketed */
    int port;
    char path[256];     /* UNIX: socket path */
    char user[128];     /* "" when absent */
    char password[256]; /* "" when absent */
    bool has_password;
    int db;
    char seeds[1024];   /* CLUSTER: the comma-separated host:port list */
} RedisUrl;

/* Parse url into *out. Returns 0, or -1 with a message in err (errlen
 * bytes) that quotes the URL with any password replaced by "***". */
int redisurl_parse(const char *url, RedisUrl *out, char *err, size_t errlen)
    __attribute__((warn_unused_result));

/* Write url with the password (if any) replaced by "***" into buf. Works on
 * unparsable input too (best effort). Returns buf. */
char *redisurl_redact(const char *url, char *buf, size_t buflen);

/* Human-readable target for messages: "127.0.0.1:6379" or the socket path. */
const char *redisurl_describe(const RedisUrl *u, char *buf, size_t buflen);

#endif
