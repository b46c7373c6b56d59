/*
 * sentinel.c — master discovery through Redis Sentinel (see sentinel.h).
 *
 * Each query opens a short-lived connection to one Sentinel (rconn_open
 * with the Sentinels' credentials; a Sentinel has no databases), asks,
 * and closes it: discovery happens only at (re)connect, after a failure,
 * so there is nothing to keep open.
 */
#include "sentinel.h"

#include "mem.h"

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

static int min_ms(int a, int b)
{
    return a > 0 && a < b ? a : b;
}

/* How to reach the Sentinel at host:port; cap_ms > 0 caps both timeouts. */
static RconnConfig conn_config(const SentinelConfig *cfg, const char *host, int port, int cap_ms)
{
    return (RconnConfig){.label = "redis sentinel",
                         .host = host,
                         .port = port,
                         .tls = cfg->tls,
                         .sni = cfg->sni,
                         .user = cfg->user,
                         .password = cfg->password,
                         .has_password = cfg->has_password,
                         .connect_timeout_ms = cap_ms > 0 ? min_ms(cfg->connect_timeout_ms, cap_ms)
                                                          : cfg->connect_timeout_ms,
                         .command_timeout_ms = cap_ms > 0 ? min_ms(cfg->command_timeout_ms, cap_ms)
                                                          : cfg->command_timeout_ms};
}

/* Ask one Sentinel. 1: found, 0: does not know the master, -1: failed
 * (why set). */
static int ask(const SentinelConfig *cfg, const char *shost, int sport, char *host, size_t hostlen,
               int *port, char *why, size_t whylen)
{
    RconnConfig rc = conn_config(cfg, shost, sport, 0);
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

/* ---- following +switch-master ------------------------------------------ */

#define SENTINEL_WATCH_PING_MS 5000     /* PING a subscription quiet this long */
#define SENTINEL_WATCH_OPEN_MAX_MS 1000 /* connect and PING bound: poll runs in a loop */
#define SENTINEL_WATCH_RETRY_MAX_MS 30000

int sentinel_parse_switch(const redisReply *r, const char *master_name, char *host, size_t hostlen,
                          int *port)
{
    char buf[600], *tok[5], *save = NULL, *end;
    int n = 0;
    long p;

    if (r->type != REDIS_REPLY_ARRAY || r->elements != 3)
        return 0;
    for (size_t i = 0; i < 3; i++)
        if (r->element[i]->type != REDIS_REPLY_STRING)
            return 0;
    if (strcmp(r->element[0]->str, "message") != 0 ||
        strcmp(r->element[1]->str, "+switch-master") != 0 || r->element[2]->len >= sizeof buf)
        return 0;
    memcpy(buf, r->element[2]->str, r->element[2]->len + 1);
    for (char *t = strtok_r(buf, " ", &save); t != NULL && n < 5; t = strtok_r(NULL, " ", &save))
        tok[n++] = t;
    if (n != 5 || strcmp(tok[0], master_name) != 0 || strlen(tok[3]) >= hostlen)
        return 0;
    p = strtol(tok[4], &end, 10);
    if (*end != '\0' || p < 1 || p > 65535)
        return 0;
    strcpy(host, tok[3]);
    *port = (int)p;
    return 1;
}

struct SentinelWatch {
    SentinelConfig cfg; /* strings owned by the watch */
    Rconn *c;
    int next;   /* the Sentinel (index in cfg.sentinels) to try next */
    int fails;  /* failed subscriptions in a row */
    bool asked; /* the answer to get-master-addr-by-name is due */
    bool subscribed;
    long long retry_at, heard_at, ping_at; /* ping_at: PING outstanding since */
};

static char *dup_or_empty(const char *s)
{
    return xstrdup(s != NULL ? s : "");
}

SentinelWatch *sentinel_watch_new(const SentinelConfig *cfg)
{
    SentinelWatch *w = xcalloc(1, sizeof *w);

    w->cfg = *cfg;
    w->cfg.sentinels = dup_or_empty(cfg->sentinels);
    w->cfg.master_name = dup_or_empty(cfg->master_name);
    w->cfg.user = dup_or_empty(cfg->user);
    w->cfg.password = dup_or_empty(cfg->password);
    w->cfg.sni = dup_or_empty(cfg->sni);
    return w;
}

void sentinel_watch_free(SentinelWatch *w)
{
    if (w == NULL)
        return;
    rconn_close(w->c);
    free((char *)w->cfg.sentinels);
    free((char *)w->cfg.master_name);
    free((char *)w->cfg.user);
    free((char *)w->cfg.password);
    free((char *)w->cfg.sni);
    free(w);
}

bool sentinel_watch_subscribed(const SentinelWatch *w)
{
    return w->subscribed;
}

/* The idx-th Sentinel of the list (modulo its length). */
static bool nth_addr(const char *list, int idx, char *host, size_t hostlen, int *port)
{
    const char *p = list;
    int n = 0;

    while (next_addr(&p, host, hostlen, port))
        n++;
    if (n == 0)
        return false;
    p = list;
    for (int i = 0; i <= idx % n; i++)
        (void)next_addr(&p, host, hostlen, port);
    return true;
}

/* Connect to the next Sentinel, ask for the master and SUBSCRIBE. */
static int watch_open(SentinelWatch *w, char *err, size_t errlen)
{
    char shost[256];
    int sport;
    const char *argv[3] = {"SENTINEL", "get-master-addr-by-name", w->cfg.master_name};
    size_t lens[3] = {8, 23, strlen(w->cfg.master_name)};
    const char *sub[2] = {"SUBSCRIBE", "+switch-master"};
    size_t sublens[2] = {9, 14};

    if (!nth_addr(w->cfg.sentinels, w->next, shost, sizeof shost, &sport)) {
        snprintf(err, errlen, "no redis sentinel address in \"%s\"", w->cfg.sentinels);
        return -1;
    }
    RconnConfig rc = conn_config(&w->cfg, shost, sport, SENTINEL_WATCH_OPEN_MAX_MS);
    w->c = rconn_open(&rc, err, errlen);
    if (w->c == NULL)
        return -1;
    rconn_append(w->c, 3, argv, lens);
    rconn_append(w->c, 2, sub, sublens);
    if (rconn_flush(w->c) < 0) {
        snprintf(err, errlen, "redis sentinel at %s: %s", rconn_addr(w->c), rconn_errstr(w->c));
        return -1;
    }
    w->asked = true;
    return 0;
}

/* Drop the connection; the next Sentinel is tried after a growing pause.
 * Returns -1. */
static int watch_fail(SentinelWatch *w, long long now_ms)
{
    int delay = 500;

    rconn_close(w->c);
    w->c = NULL;
    w->subscribed = false;
    w->ping_at = 0;
    w->next++;
    for (int i = 0; i < w->fails && delay < SENTINEL_WATCH_RETRY_MAX_MS; i++)
        delay *= 2;
    w->retry_at = now_ms + min_ms(delay, SENTINEL_WATCH_RETRY_MAX_MS);
    w->fails++;
    return -1;
}

/* One reply on the watch connection: 1 the master named on subscribing,
 * 2 a +switch-master (host/port set for both), 0 nothing for the caller,
 * -1 a failure (err set). */
static int watch_take(SentinelWatch *w, const redisReply *r, char *host, size_t hostlen, int *port,
                      char *err, size_t errlen)
{
    char why[256];
    int rc;

    if (w->asked) {
        w->asked = false;
        rc = sentinel_parse_addr(r, host, hostlen, port, why, sizeof why);
        if (rc == 0)
            snprintf(err, errlen, "redis sentinel at %s does not monitor a master named \"%s\"",
                     rconn_addr(w->c), w->cfg.master_name);
        else if (rc < 0)
            snprintf(err, errlen, "redis sentinel at %s: %s", rconn_addr(w->c), why);
        return rc > 0 ? 1 : -1;
    }
    if (r->type == REDIS_REPLY_ERROR) {
        snprintf(err, errlen, "redis sentinel at %s: SUBSCRIBE +switch-master: %s",
                 rconn_addr(w->c), r->str);
        return -1;
    }
    if (r->type == REDIS_REPLY_ARRAY && r->elements >= 1 &&
        r->element[0]->type == REDIS_REPLY_STRING) {
        if (strcmp(r->element[0]->str, "subscribe") == 0) {
            w->subscribed = true;
            w->fails = 0;
        } else if (strcmp(r->element[0]->str, "pong") == 0) {
            w->ping_at = 0;
        }
    }
    return sentinel_parse_switch(r, w->cfg.master_name, host, hostlen, port) ? 2 : 0;
}

int sentinel_watch_poll(SentinelWatch *w, long long now_ms, char *host, size_t hostlen, int *port,
                        char *err, size_t errlen)
{
    const char *ping[1] = {"PING"};
    size_t ping_len[1] = {4};
    redisReply *r;
    int found = 0, rc;

    if (w->c == NULL) {
        if (now_ms < w->retry_at)
            return 0;
        if (watch_open(w, err, errlen) < 0)
            return watch_fail(w, now_ms);
        w->heard_at = now_ms;
    }
    while ((rc = rconn_poll(w->c, &r)) > 0) {
        int got = watch_take(w, r, host, hostlen, port, err, errlen);

        freeReplyObject(r);
        w->heard_at = now_ms;
        if (got < 0)
            return watch_fail(w, now_ms);
        if (got > 0)
            found = got; /* the newest news wins */
    }
    if (rc < 0) {
        snprintf(err, errlen, "redis sentinel at %s: %s", rconn_addr(w->c), rconn_errstr(w->c));
        return watch_fail(w, now_ms);
    }
    if (!w->subscribed && now_ms - w->heard_at > w->cfg.command_timeout_ms) {
        snprintf(err, errlen, "redis sentinel at %s did not confirm SUBSCRIBE within %d ms",
                 rconn_addr(w->c), w->cfg.command_timeout_ms);
        return watch_fail(w, now_ms);
    }
    if (w->ping_at != 0 && now_ms - w->ping_at > w->cfg.command_timeout_ms) {
        snprintf(err, errlen, "redis sentinel at %s did not answer PING within %d ms",
                 rconn_addr(w->c), w->cfg.command_timeout_ms);
        return watch_fail(w, now_ms);
    }
    if (w->ping_at == 0 && w->subscribed && now_ms - w->heard_at >= SENTINEL_WATCH_PING_MS) {
        rconn_append(w->c, 1, ping, ping_len);
        w->ping_at = now_ms;
    }
    return found;
}
