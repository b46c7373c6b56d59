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
 * A SentinelWatch follows failovers as they happen: it keeps one Sentinel
 * connection subscribed to +switch-master and, polled from the caller's
 * loop without blocking, says when the Sentinels name a new master (and,
 * on every (re)subscription, which master they name now), so the caller
 * can reconnect before a write fails. It only speeds things up: the
 * caller still follows failovers on errors and READONLY.
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

/* Parse a message pushed on a +switch-master subscription: ["message",
 * "+switch-master", "NAME OLDHOST OLDPORT NEWHOST NEWPORT"]. Returns 1
 * with the new master's host (hostlen bytes) and port when it is about
 * master_name, 0 for anything else (another master, a subscribe
 * confirmation, a PONG, a malformed message). Pure. */
int sentinel_parse_switch(const redisReply *r, const char *master_name, char *host, size_t hostlen,
                          int *port);

typedef struct SentinelWatch SentinelWatch;

/* A watch over cfg's Sentinels (strings copied; cfg->tls borrowed, must
 * outlive the watch). Nothing is connected until the first poll. */
SentinelWatch *sentinel_watch_new(const SentinelConfig *cfg);

/* Close and free. Accepts NULL. */
void sentinel_watch_free(SentinelWatch *w);

/* Drive the watch without waiting for the network (now_ms: a monotonic
 * clock). When not subscribed and its retry time has come, connect to the
 * next Sentinel (bounded by a connect timeout of at most 1 s), ask it for
 * the master and SUBSCRIBE +switch-master; when subscribed, take what has
 * arrived, and PING a quiet connection now and then so a dead Sentinel is
 * noticed. Returns 1 with host/port for the master a Sentinel names on
 * (re)subscribing, 2 with host/port when a +switch-master for the master
 * arrived (the newest, when several did), 0 when there is nothing new, -1
 * when the subscription failed just now
 * (err says which Sentinel and why; retried after a pause that grows to
 * 30 s). */
int sentinel_watch_poll(SentinelWatch *w, long long now_ms, char *host, size_t hostlen, int *port,
                        char *err, size_t errlen);

/* Is the watch subscribed to a Sentinel right now? */
bool sentinel_watch_subscribed(const SentinelWatch *w);

#endif
