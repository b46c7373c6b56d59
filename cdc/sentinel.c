/*
 * sentinel.c — master discovery through Redis Sentinel (see sentinel.h).
 *
 * Each query opens a short-lived connection to one Sentinel (rconn_open
 * with the Sentinels' credentials; a Sentinel has no databases), asks,
 * and closes it: discovery happens only at (re)connect, after a failure,
 * so there is nothing to keep open.
 */
#include "sentinel.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int sentinel_parse_addr(const redisReply *r, char *host, size_t hostlen, int *port, char *why,
                        size_t whylen)
{
    long p;
    char *end;

    if (r->type == REDIS_REPLY_NIL)
        return 0;
    if (r->type == REDIS_REPLY_ERROR) {
        snprintf(why, whylen, "%s", r->str);
        return -1;
    }
    if (r->type != REDIS_REPLY_ARRAY || r->elements != 2 ||
        r->element[0]->type != REDIS_REPLY_STRING || r->element[1]->type != REDIS_REPLY_STRING) {
        snprintf(why, whylen, "unexpected reply to SENTINEL get-master-addr-by-name");
        return -1;
    }
    p = strtol(r->element[1]->str, &end, 10);
    if (*end != '\0' || p < 1 || p > 65535 || r->element[0]->len == 0 ||
        r->element[0]->len >= hostlen) {
        snprintf(why, whylen, "bad master address in the reply");
        return -1;
    }
    memcpy(host, r->element[0]->str, r->element[0]->len + 1);
    *port = (int)p;
    return 1;
}

/* The next "host:port" of the list at *p (IPv6 bracketed); advances *p.
 * Returns false at the end or on a malformed entry. */
static bool next_addr(const char **p, char *host, size_t hostlen, int *port)
{
    const char *s = *p, *end = strchr(s, ','), *colon;
    size_t n = end ? (size_t)(end - s) : strlen(s), hl;

    if (n == 0)
        return false;
    *p = end ? end + 1 : s + n;
    colon = NULL;
    for (size_t i = 0; i < n; i++)
        if (s[i] == ':')
            colon = s + i;
    if (colon == NULL)
        return false;
    *port = atoi(colon + 1);
    hl = (size_t)(colon - s);
    if (hl >= 2 && s[0] == '[' && s[hl - 1] == ']') {
        s++;
        hl -= 2;
    }
    if (hl == 0 || hl >= hostlen)
        return false;
    memcpy(host, s, hl);
    host[hl] = '\0';
    return *port > 0;
}

/* Ask one Sentinel. 1: found, 0: does not know the master, -1: failed
 * (why set). */
static int ask(const SentinelConfig *cfg, const char *shost, int sport, char *host, size_t hostlen,
               int *port, char *why, size_t whylen)
{
    RconnConfig rc = {.label = "redis sentinel",
                      .host = shost,
                      .port = sport,
                      .tls = cfg->tls,
                      .sni = cfg->sni,
                      .user = cfg->user,
                      .password = cfg->password,
                      .has_password = cfg->has_password,
                      .connect_timeout_ms = cfg->connect_timeout_ms,
                      .command_timeout_ms = cfg->command_timeout_ms};
    const char *argv[3] = {"SENTINEL", "get-master-addr-by-name", cfg->master_name};
    size_t lens[3] = {8, 23, strlen(cfg->master_name)};
    Rconn *c = rconn_open(&rc, why, whylen);
    redisReply *r;
    int found;

    if (c == NULL)
        return -1;
    if (rconn_command(c, &r, 3, argv, lens) < 0) {
        snprintf(why, whylen, "redis sentinel at %s: %s", rconn_addr(c), rconn_errstr(c));
        rconn_close(c);
        return -1;
    }
    found = sentinel_parse_addr(r, host, hostlen, port, why, whylen);
    if (found < 0) {
        char inner[256];
        snprintf(inner, sizeof inner, "%s", why);
        snprintf(why, whylen, "redis sentinel at %s: %s", rconn_addr(c), inner);
    } else if (found == 0) {
        snprintf(why, whylen, "redis sentinel at %s does not monitor a master named \"%s\"",
                 rconn_addr(c), cfg->master_name);
    }
    freeReplyObject(r);
    rconn_close(c);
    return found;
}

int sentinel_find_master(const SentinelConfig *cfg, char *host, size_t hostlen, int *port,
                         char *err, size_t errlen)
{
    const char *p = cfg->sentinels;
    char shost[256], why[512] = "no sentinel address";
    int sport;

    while (next_addr(&p, shost, sizeof shost, &sport))
        if (ask(cfg, shost, sport, host, hostlen, port, why, sizeof why) == 1)
            return 0;
    snprintf(err, errlen, "no redis sentinel (%s) named the master \"%s\"; last error: %s",
             cfg->sentinels, cfg->master_name, why);
    return -1;
}

int sentinel_check_master(Rconn *c, char *err, size_t errlen)
{
    const char *argv[1] = {"ROLE"};
    size_t lens[1] = {4};
    redisReply *r;
    int rc = -1;

    if (rconn_command(c, &r, 1, argv, lens) < 0) {
        snprintf(err, errlen, "redis at %s: ROLE: %s", rconn_addr(c), rconn_errstr(c));
        return -1;
    }
    if (r->type == REDIS_REPLY_ARRAY && r->elements >= 1 &&
        r->element[0]->type == REDIS_REPLY_STRING && strcmp(r->element[0]->str, "master") == 0)
        rc = 0;
    else if (r->type == REDIS_REPLY_ARRAY && r->elements >= 3 &&
             r->element[0]->type == REDIS_REPLY_STRING && r->element[1]->type == REDIS_REPLY_STRING)
        snprintf(err, errlen,
                 "redis at %s is a %s of %s, not the master (the sentinels' view is stale, a "
                 "failover is in progress?)",
                 rconn_addr(c), r->element[0]->str, r->element[1]->str);
    else
        snprintf(err, errlen, "redis at %s: unexpected reply to ROLE%s%s", rconn_addr(c),
                 r->type == REDIS_REPLY_ERROR ? ": " : "",
                 r->type == REDIS_REPLY_ERROR ? r->str : "");
    freeReplyObject(r);
    return rc;
}
