/*
 * redisurl.h — parse Redis target URLs (pure).
 *
 * Accepted forms (docs/cli.md):
 *   redis://[[user]:password@]host[:port][/db][?params]
 *   rediss://...                              (the same over TLS)
 *   unix://[[user]:password@]/path/to/redis.sock[?db=N&params]
 *   redis+cluster://host:port[,host:port...][?params]
 *   rediss+cluster://...                      (every node over TLS)
 *   redis+sentinel://host:port[,host:port...]/MASTER_NAME[/db][?params]
 *   rediss+sentinel://...                     (Sentinels and master over TLS)
 * host may be a bracketed IPv6 literal. Percent-escapes in user, password
 * and parameter values are decoded. Default port 6379 (26379 for Sentinel
 * addresses), default db 0. The userinfo ends at the last '@', so an '@'
 * in a parameter value must be written %40.
 *
 * Parameters (joined with '&'):
 *   replicas=N            acknowledged only once WAIT reports N replicas
 *   cacert=FILE, cert=FILE, key=FILE, sni=NAME, insecure=1   (TLS only)
 *   sentinel_user=U, sentinel_password=P    (Sentinel only: credentials of
 *                         the Sentinels; the userinfo is the master's)
 */
#ifndef WALBUST_REDISURL_H
#define WALBUST_REDISURL_H

#include <stdbool.h>
#include <stddef.h>

typedef enum RedisUrlKind {
    REDISURL_TCP,
    REDISURL_UNIX,
    REDISURL_CLUSTER,
    REDISURL_SENTINEL,
} RedisUrlKind;

#define REDISURL_PATH_MAX 512

typedef struct RedisUrl {
    RedisUrlKind kind;
    char host[256]; /* TCP/cluster: first seed host; unbracketed */
    int port;
    char path[256];     /* UNIX: socket path */
    char user[128];     /* "" when absent */
    char password[256]; /* "" when absent */
    bool has_password;
    int db;
    char seeds[1024];               /* CLUSTER, SENTINEL: the comma-separated host:port list */
    int replicas;                   /* ?replicas=N, 0 when absent */
    bool tls;                       /* rediss schemes */
    char cacert[REDISURL_PATH_MAX]; /* "" = the system store */
    char cert[REDISURL_PATH_MAX];   /* client certificate, "" = none */
    char key[REDISURL_PATH_MAX];    /* its private key */
    char sni[256];                  /* server name to send and verify, "" = host */
    bool insecure;                  /* skip certificate and name verification */
    char master_name[128];          /* SENTINEL: the monitored master */
    char sentinel_user[128];        /* SENTINEL: the Sentinels' ACL user */
    char sentinel_password[256];
    bool sentinel_has_password;
} RedisUrl;

/* Parse url into *out. Returns 0, or -1 with a message in err (errlen
 * bytes) that quotes the URL with any password replaced by "***". */
int redisurl_parse(const char *url, RedisUrl *out, char *err, size_t errlen)
    __attribute__((warn_unused_result));

/* Write url with the password (if any) and any sentinel_password value
 * replaced by "***" into buf. Works on
 * unparsable input too (best effort). Returns buf. */
char *redisurl_redact(const char *url, char *buf, size_t buflen);

/* Human-readable target for messages: "127.0.0.1:6379" or the socket path. */
const char *redisurl_describe(const RedisUrl *u, char *buf, size_t buflen);

#endif
