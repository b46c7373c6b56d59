/*
 * sentinel.h — find the current master of a Redis Sentinel deployment.
 *
 * sentinel_find_master() asks the Sentinels in turn (SENTINEL
 * get-master-addr-by-name) for the address of the named master, the first
 * Sentinel that knows it wins; sentinel_check_master() then asks that
 * server's ROLE, so a Sentinel whose view is stale (a failover in
 * progress) cannot send walbust's writes to a replica. The caller connects
 * to the master itself and repeats both after any connection failure or a
 * READONLY reply: that is how a failover is followed.
 *
 * Connections go through rconn.c; this module never sees a socket. It does
 * not log; errors go to caller buffers and never contain a password.
 */
#ifndef WALBUST_SENTINEL_H
#define WALBUST_SENTINEL_H

#include "rconn.h"

#include <stdbool.h>
#include <stddef.h>

typedef struct SentinelConfig {
    const char *sentinels;   /* "host:port,host:port,[v6]:port" */
    const char *master_name; /* as in the Sentinels' configuration */
    const char *user;        /* the Sentinels' ACL user, "" for default */
    const char *password;
    bool has_password;
    RconnTls *tls;   /* NULL: plain text */
    const char *sni; /* "" or NULL: each Sentinel's host */
    int connect_timeout_ms, command_timeout_ms;
} SentinelConfig;

/* Parse a SENTINEL get-master-addr-by-name reply: [host, port]. Returns 1
 * with host (hostlen bytes) and port filled, 0 for a nil reply (the
 * Sentinel does not know the master), -1 for anything else (why says what,
 * whylen bytes). Pure. */
int sentinel_parse_addr(const redisReply *r, char *host, size_t hostlen, int *port, char *why,
                        size_t whylen);

/* Ask each Sentinel in turn for the master's address. Returns 0 with
 * host/port, or -1 with err naming the Sentinels and the last failure. */
int sentinel_find_master(const SentinelConfig *cfg, char *host, size_t hostlen, int *port,
                         char *err, size_t errlen);

/* Is the server at the end of c a master (ROLE)? Returns 0, or -1 with err
 * saying what it is ("is a replica of ..."). */
int sentinel_check_master(Rconn *c, char *err, size_t errlen);

#endif
