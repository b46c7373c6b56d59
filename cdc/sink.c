/*
 * sink.c — the Redis sink (see sink.h for the contract).
 *
 * The batch (queue order, deduplication) is batch.c's, which has no I/O.
 * sink_flush() walks its ops in order and appends commands to the
 * connection's output buffer (one pipeline): the watermark first (EVAL of
 * redis/watermark.lua, which only moves it forward, or a WATCHed SET:
 * pipe_watermark()), SCRIPT LOAD when
 * the batch has tags, then UNLINK/DEL (consecutive keys grouped, at most
 * SINK_KEYS_PER_CMD per command), EVALSHA of the tag script, INCR and
 * PUBLISH. Every appended command is remembered in a pending list so each
 * reply can be checked and any error named. A pattern op first drains the
 * pipeline (everything before it is applied), then runs a SCAN loop in which
 * the commands for one page of matches travel with the request for the next
 * page, so each page costs one round trip. Success means every reply arrived
 * and none was an error; then the batch is cleared and counted.
 *
 * The tag script is sent with SCRIPT LOAD in the same pipeline as its
 * EVALSHA calls, so a SCRIPT FLUSH or a Redis restart between flushes cannot
 * leave the sink calling a missing script. Its SHA1 is learnt from Redis
 * once per sink (the first flush with tags).
 *
 * Any I/O error (including a command timeout) closes the connection so
 * the next flush reconnects; an error reply keeps the connection, because
 * every reply was still read and the stream is in sync. Connections are
 * rconn.c's (TCP, unix socket or TLS); this file never sees a socket.
 *
 * A redis+cluster:// target's batch goes through sink_cluster.c instead
 * (sink_cl_flush()), which shares this file's state and argument helpers
 * (sink_int.h).
 *
 * With ?replicas=N the batch ends with WAIT N: it counts as acknowledged
 * only when WAIT reports at least N replicas, so a failover cannot hand
 * the promoted replica a state older than what was confirmed.
 */
#include "sink.h"

#include "batch.h"
#include "cluster.h"
#include "lsn.h"
#include "mem.h"
#include "rconn.h"
#include "sentinel.h"
#include "sink_int.h"

#include <hiredis/hiredis.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

extern const char redis_tag_invalidate_lua[];
extern const char redis_refresh_lua[];
extern const char redis_watermark_lua[];

#define SINK_FENCE_PREFIX "walbust:fence:" /* refresh: the LSN of the stored row */

#define SINK_DEFAULT_CONNECT_MS 2000
#define SINK_DEFAULT_COMMAND_MS 5000
#define SINK_DEFAULT_MAX_OPS 10000
#define SINK_DEFAULT_MAX_BYTES (8u << 20)
#define SINK_KEYS_PER_CMD 512  /* keys per UNLINK/DEL command */
#define SINK_WAIT_MS 1000      /* WAIT timeout with ?replicas=N */
#define SINK_WATCH_POLL_MS 100 /* sink_watch() looks at most this often */

void sink_set_err(Sink *s, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(s->errstr, sizeof s->errstr, fmt, ap);
    va_end(ap);
}

/* ---- lifecycle ------------------------------------------------------- */

Sink *sink_new(const SinkConfig *cfg)
{
    Sink *s = xrealloc(NULL, sizeof *s);

    memset(s, 0, sizeof *s);
    s->cfg = *cfg;
    if (s->cfg.connect_timeout_ms <= 0)
        s->cfg.connect_timeout_ms = SINK_DEFAULT_CONNECT_MS;
    if (s->cfg.command_timeout_ms <= 0)
        s->cfg.command_timeout_ms = SINK_DEFAULT_COMMAND_MS;
    if (s->cfg.max_ops == 0)
        s->cfg.max_ops = SINK_DEFAULT_MAX_OPS;
    if (s->cfg.max_bytes == 0)
        s->cfg.max_bytes = SINK_DEFAULT_MAX_BYTES;
    if (cfg->url.tls) {
        const RedisUrl *u = &cfg->url;
        s->tls = rconn_tls_new(u->cacert, u->cert, u->key, u->insecure, s->config_err,
                               sizeof s->config_err);
    }
    if (cfg->url.kind == REDISURL_CLUSTER)
        s->cl = sink_cl_new(&s->cfg, s->tls);
    return s;
}

const char *sink_config_error(const Sink *s)
{
    return s->config_err[0] != '\0' ? s->config_err : NULL;
}

static void disconnect(Sink *s)
{
    rconn_close(s->c);
    s->c = NULL;
    s->npend = 0;
    s->wm_held = 0; /* a WATCH lives as long as its connection */
}

void sink_free(Sink *s)
{
    if (s == NULL)
        return;
    disconnect(s);
    cluster_free(s->cl);
    sentinel_watch_free(s->watch);
    rconn_tls_free(s->tls);
    batch_release(&s->b);
    free(s->cl_owner);
    free(s->wm_key);
    free(s->wm_value);
    free(s->pend);
    free(s->argv);
    free(s->argvlen);
    free(s->fence);
    free(s);
}

bool sink_connected(const Sink *s)
{
    if (s->cl != NULL)
        return cluster_connected(s->cl);
    return s->c != NULL;
}

const char *sink_errstr(const Sink *s)
{
    return s->errstr;
}

const SinkStats *sink_stats(const Sink *s)
{
    return &s->stats;
}

void sink_set_use_del(Sink *s, bool use_del)
{
    s->cfg.use_del = use_del;
}

/* ---- batch ----------------------------------------------------------- */

void sink_add(Sink *s, RulesInvAction action, const char *str, size_t len, const char *payload,
              size_t payload_len)
{
    (void)batch_add(&s->b, action, str, len, payload, payload_len);
}

void sink_set_watermark(Sink *s, const char *key, const char *value, bool reset)
{
    free(s->wm_key);
    free(s->wm_value);
    s->wm_key = xstrdup(key);
    s->wm_value = xstrdup(value);
    s->wm_reset = reset;
}

size_t sink_pending(const Sink *s)
{
    return s->b.nops;
}

bool sink_dirty(const Sink *s)
{
    return s->b.nops > 0 || s->wm_key != NULL;
}

bool sink_full(const Sink *s)
{
    return s->b.nops >= s->cfg.max_ops || batch_bytes(&s->b) >= s->cfg.max_bytes;
}

/* Forget the batch after it was applied; give back oversized buffers. */
static void clear_batch(Sink *s)
{
    batch_clear(&s->b, s->cfg.max_bytes);
    free(s->wm_key);
    free(s->wm_value);
    s->wm_key = s->wm_value = NULL;
}

static void count_applied(Sink *s)
{
    for (size_t i = 0; i < s->b.nops; i++) {
        switch (s->b.ops[i].action) {
        case RULES_INV_KEY:
            s->stats.keys++;
            break;
        case RULES_INV_PATTERN:
            s->stats.patterns++;
            break;
        case RULES_INV_TAG:
        case RULES_INV_TAG_PATTERN:
            s->stats.tags++;
            break;
        case RULES_INV_VERSION:
        case RULES_INV_VERSION_PATTERN:
            s->stats.versions++;
            break;
        case RULES_INV_PUBLISH:
            s->stats.publishes++;
            break;
        case RULES_INV_REFRESH:
            s->stats.refreshes++;
            break;
        case RULES_INV_STALE:
            s->stats.stales++;
            break;
        }
    }
    s->stats.refresh_fenced += s->fenced;
}

/* ---- connection ------------------------------------------------------ */

static const char *target(const Sink *s, char *buf, size_t len)
{
    return redisurl_describe(&s->cfg.url, buf, len);
}

/* Record an I/O failure of the connection (during `what`) and drop it so
 * the next flush reconnects. Returns -1. */
static int io_fail(Sink *s, const char *what)
{
    char t[300];

    target(s, t, sizeof t);
    if (rconn_timed_out(s->c))
        sink_set_err(s,
                     "redis at %s did not answer %s within %d ms (command timeout); "
                     "the connection was closed",
                     t, what, s->cfg.command_timeout_ms);
    else
        sink_set_err(s, "redis I/O error at %s during %s: %s", t, what, rconn_errstr(s->c));
    disconnect(s);
    return -1;
}

/* Run one command synchronously (no pipeline may be pending). On success
 * *out holds the reply (caller frees); an error reply is still a success
 * here. I/O errors drop the connection and return -1. */
static int command(Sink *s, const char *what, int argc, const char **argv, const size_t *lens,
                   redisReply **out)
{
    if (rconn_command(s->c, out, argc, argv, lens) < 0)
        return io_fail(s, what);
    return 0;
}

/* PING on the open connection. */
static int ping(Sink *s)
{
    const char *argv[1] = {"PING"};
    size_t lens[1] = {4};
    redisReply *r;
    char t[300];

    if (command(s, "PING", 1, argv, lens, &r) < 0)
        return -1;
    target(s, t, sizeof t);
    if (r->type == REDIS_REPLY_ERROR) {
        sink_set_err(s, "redis PING failed at %s: %s", t, r->str);
        freeReplyObject(r);
        disconnect(s);
        return -1;
    }
    freeReplyObject(r);
    return 0;
}

/* The URL's Sentinels, their credentials and the timeouts. */
static SentinelConfig sentinel_cfg(const Sink *s)
{
    const RedisUrl *u = &s->cfg.url;
    SentinelConfig sc = {.sentinels = u->seeds,
                         .master_name = u->master_name,
                         .user = u->sentinel_user,
                         .password = u->sentinel_password,
                         .has_password = u->sentinel_has_password,
                         .tls = s->tls,
                         .sni = u->sni,
                         .connect_timeout_ms = s->cfg.connect_timeout_ms,
                         .command_timeout_ms = s->cfg.command_timeout_ms};
    return sc;
}

/* redis+sentinel://: ask the Sentinels for the master, connect to it
 * (the URL's credentials and db) and make sure it is one (ROLE). */
static int sentinel_connect(Sink *s, RconnConfig *rc)
{
    SentinelConfig sc = sentinel_cfg(s);
    char host[256];
    int port;

    if (sentinel_find_master(&sc, host, sizeof host, &port, s->errstr, sizeof s->errstr) < 0)
        return -1;
    rc->host = host;
    rc->port = port;
    s->c = rconn_open(rc, s->errstr, sizeof s->errstr);
    if (s->c == NULL)
        return -1;
    if (sentinel_check_master(s->c, s->errstr, sizeof s->errstr) < 0) {
        disconnect(s);
        return -1;
    }
    return 0;
}

int sink_connect(Sink *s)
{
    const RedisUrl *u = &s->cfg.url;
    RconnConfig rc = {.label = "redis",
                      .host = u->host,
                      .port = u->port,
                      .path = u->kind == REDISURL_UNIX ? u->path : NULL,
                      .tls = s->tls,
                      .sni = u->sni,
                      .user = u->user,
                      .password = u->password,
                      .has_password = u->has_password,
                      .db = u->db,
                      .connect_timeout_ms = s->cfg.connect_timeout_ms,
                      .command_timeout_ms = s->cfg.command_timeout_ms};

    disconnect(s);
    if (s->config_err[0] != '\0') {
        sink_set_err(s, "%s", s->config_err);
        return -1;
    }
    if (s->cl != NULL)
        return sink_cl_connect(s);
    if (u->kind == REDISURL_SENTINEL)
        return sentinel_connect(s, &rc);
    s->c = rconn_open(&rc, s->errstr, sizeof s->errstr);
    return s->c != NULL ? 0 : -1;
}

int sink_watch(Sink *s, char *err, size_t errlen)
{
    struct timespec ts;
    char host[256], addr[300];
    long long now;
    int port, rc;

    if (s->cfg.url.kind != REDISURL_SENTINEL || s->config_err[0] != '\0')
        return 0;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    now = (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
    if (now < s->watch_at)
        return 0;
    s->watch_at = now + SINK_WATCH_POLL_MS;
    if (s->watch == NULL) {
        SentinelConfig sc = sentinel_cfg(s);
        s->watch = sentinel_watch_new(&sc);
    }
    rc = sentinel_watch_poll(s->watch, now, host, sizeof host, &port, err, errlen);
    if (rc <= 0)
        return rc;
    snprintf(addr, sizeof addr, strchr(host, ':') ? "[%s]:%d" : "%s:%d", host, port);
    if (s->c != NULL && strcmp(addr, rconn_addr(s->c)) != 0) {
        snprintf(err, errlen, "the redis sentinels name %s as the master of \"%s\"%s, not %s", addr,
                 s->cfg.url.master_name, rc == 2 ? " (+switch-master)" : "", rconn_addr(s->c));
        disconnect(s);
        return 1;
    }
    if (rc == 1)
        return 0;
    snprintf(err, errlen,
             "the redis sentinels switched the master of \"%s\" to %s (+switch-master)%s",
             s->cfg.url.master_name, addr, s->c != NULL ? "; already connected to it" : "");
    return 2;
}

int sink_ping(Sink *s)
{
    if (s->c == NULL || s->cl != NULL)
        return sink_connect(s);
    return ping(s);
}

/* ---- single commands (outside a flush) ------------------------------- */

/* Run one command on key argv[keyarg] now, routed like the batch, and hand
 * its reply to take(), whose result is returned (-1 on an I/O error or, in
 * a cluster, an error reply). No pipeline may be pending. */
static int one_cmd(Sink *s, size_t keyarg, int argc, const char **argv, const size_t *lens,
                   int (*take)(Sink *, const redisReply *, void *), void *arg)
{
    redisReply *r = NULL;
    int rc;

    if (s->cl != NULL) {
        if (!cluster_connected(s->cl) && sink_cl_connect(s) < 0)
            return -1;
        cluster_reset(s->cl);
        (void)cluster_append_key(s->cl, keyarg, argc, argv, lens);
        if (sink_cl_exec(s) < 0) {
            cluster_reset(s->cl);
            return -1;
        }
        rc = take(s, cluster_reply(s->cl, 0), arg);
        cluster_reset(s->cl);
        return rc;
    }
    if (s->c == NULL && sink_connect(s) < 0)
        return -1;
    if (command(s, argv[0], argc, argv, lens, &r) < 0)
        return -1;
    rc = take(s, r, arg);
    freeReplyObject(r);
    return rc;
}

static int one_key_cmd(Sink *s, int argc, const char **argv,
                       int (*take)(Sink *, const redisReply *, void *), void *arg)
{
    size_t lens[3];

    for (int i = 0; i < argc; i++)
        lens[i] = strlen(argv[i]);
    return one_cmd(s, 1, argc, argv, lens, take, arg);
}

typedef struct GetBuf {
    char *buf;
    size_t len;
} GetBuf;

static int take_get(Sink *s, const redisReply *r, void *arg)
{
    GetBuf *g = arg;
    char t[300];

    if (r->type == REDIS_REPLY_NIL)
        return 0;
    if (r->type == REDIS_REPLY_STRING) {
        snprintf(g->buf, g->len, "%.*s", (int)r->len, r->str);
        return 1;
    }
    sink_set_err(s, "redis GET failed at %s: %s", target(s, t, sizeof t),
                 r->type == REDIS_REPLY_ERROR ? r->str : "unexpected reply");
    return -1;
}

static int take_ok(Sink *s, const redisReply *r, void *arg)
{
    char t[300];

    (void)arg;
    if (r->type == REDIS_REPLY_STATUS)
        return 0;
    sink_set_err(s, "redis SET failed at %s: %s", target(s, t, sizeof t),
                 r->type == REDIS_REPLY_ERROR ? r->str : "unexpected reply");
    return -1;
}

int sink_get(Sink *s, const char *key, char *buf, size_t len)
{
    const char *argv[2] = {"GET", key};
    GetBuf g = {buf, len};

    if (len > 0)
        buf[0] = '\0';
    return one_key_cmd(s, 2, argv, take_get, &g);
}

int sink_set(Sink *s, const char *key, const char *value)
{
    const char *argv[3] = {"SET", key, value};

    return one_key_cmd(s, 3, argv, take_ok, NULL);
}

/* ---- pipeline -------------------------------------------------------- */

void sink_argv_reserve(Sink *s, size_t n)
{
    size_t cap = s->argv_cap;

    s->argv = xgrow(s->argv, &cap, n, sizeof *s->argv);
    s->argvlen = xgrow(s->argvlen, &s->argv_cap, n, sizeof *s->argvlen);
}

/* Append the command in s->argv[0..argc) and remember its reply. */
static void pipe_cmd(Sink *s, size_t argc, PendKind kind, size_t op, size_t nkeys, bool scan_match)
{
    rconn_append(s->c, (int)argc, s->argv, s->argvlen);
    s->pend = xgrow(s->pend, &s->pend_cap, s->npend + 1, sizeof *s->pend);
    s->pend[s->npend++] = (Pending){kind, s->argv[0], op, nkeys, scan_match};
}

void sink_arg(Sink *s, size_t i, const char *p, size_t n)
{
    s->argv[i] = p;
    s->argvlen[i] = n;
}

void sink_arg_str(Sink *s, size_t i, const char *p)
{
    sink_arg(s, i, p, strlen(p));
}

size_t sink_publish_args(Sink *s, size_t op)
{
    const BatchOp *o = &s->b.ops[op];

    sink_argv_reserve(s, 3);
    sink_arg_str(s, 0, "PUBLISH");
    sink_arg(s, 1, batch_str(&s->b, o), o->len);
    sink_arg(s, 2, batch_payload(&s->b, o), o->payload_len);
    return 3;
}

size_t sink_watermark_args(Sink *s)
{
    sink_argv_reserve(s, 6);
    sink_arg_str(s, 0, "EVAL");
    sink_arg_str(s, 1, redis_watermark_lua);
    sink_arg_str(s, 2, "1");
    sink_arg_str(s, 3, s->wm_key);
    sink_arg_str(s, 4, s->wm_value);
    if (!s->wm_reset)
        return 5;
    sink_arg_str(s, 5, "reset");
    return 6;
}

/* Name a pending command for an error message: `UNLINK "user:1" (and 3 more
 * keys)` or `INCR of a key matching "user:*"`. Non-printable bytes become
 * '?' and long strings are cut. */
static void describe(const Sink *s, const Pending *p, char *buf, size_t len)
{
    char str[72];
    size_t n = 0;

    if (p->op == SINK_NO_OP) {
        snprintf(buf, len, "%s", p->cmd);
        return;
    }
    const BatchOp *op = &s->b.ops[p->op];
    for (; n < op->len && n < 64; n++) {
        unsigned char c = (unsigned char)s->b.arena[op->off + n];
        str[n] = c >= 0x20 && c < 0x7f ? (char)c : '?';
    }
    if (n < op->len)
        str[n++] = '~';
    str[n] = '\0';
    if (p->scan_match)
        snprintf(buf, len, "%s of a key matching \"%s\"", p->cmd, str);
    else if (p->nkeys > 1)
        snprintf(buf, len, "%s \"%s\" (and %zu more keys)", p->cmd, str, p->nkeys - 1);
    else
        snprintf(buf, len, "%s \"%s\"", p->cmd, str);
}

/* The WAIT timeout: well inside the command timeout. */
int sink_wait_ms(const Sink *s)
{
    int ms = s->cfg.command_timeout_ms / 2;
    return ms < SINK_WAIT_MS ? ms : SINK_WAIT_MS;
}

/* With ?replicas=N: WAIT N, so every write sent before it on this
 * connection is on N replicas when it answers >= N. */
static void pipe_wait(Sink *s)
{
    char n[16], ms[16];

    if (s->cfg.url.replicas <= 0)
        return;
    snprintf(n, sizeof n, "%d", s->cfg.url.replicas);
    snprintf(ms, sizeof ms, "%d", sink_wait_ms(s));
    sink_argv_reserve(s, 3);
    sink_arg_str(s, 0, "WAIT");
    sink_arg_str(s, 1, n);
    sink_arg_str(s, 2, ms);
    pipe_cmd(s, 3, PEND_WAIT, SINK_NO_OP, 0, false);
    s->pend[s->npend - 1].cmd = "WAIT for replicas";
}

/* Is r the reply that p expects? Writes a reason when not. */
static bool reply_ok(Sink *s, const Pending *p, const redisReply *r, const char **why)
{
    *why = "unexpected reply type";
    /* The queued SET was refused for lack of memory (refuse()). */
    if (p->kind == PEND_WM_EXEC && r->type == REDIS_REPLY_ERROR && s->wm_refused &&
        strncmp(r->str, "EXECABORT", 9) == 0)
        return true;
    /* An ACL user granted only what older versions sent: the watermark
     * goes by script from now on. Without a WATCH nothing is sent plain;
     * a refused MULTI (its SET ran alone) fails the batch, and the retry
     * goes by script. */
    if ((p->kind == PEND_WM_WATCH || p->kind == PEND_WM_MULTI) && r->type == REDIS_REPLY_ERROR &&
        strncmp(r->str, "NOPERM", 6) == 0) {
        s->wm_script_only = true;
        if (p->kind == PEND_WM_WATCH)
            return true;
    }
    if (r->type == REDIS_REPLY_ERROR) {
        *why = r->str;
        return false;
    }
    switch (p->kind) {
    case PEND_OK:
        return r->type == REDIS_REPLY_STATUS;
    case PEND_INT:
    case PEND_WM:
        return r->type == REDIS_REPLY_INTEGER;
    case PEND_WM_QUEUED:
        return r->type == REDIS_REPLY_STATUS && strcmp(r->str, "QUEUED") == 0;
    case PEND_WM_EXEC:
        if (r->type == REDIS_REPLY_NIL) { /* another client wrote the key */
            s->wm_retry = true;
            return true;
        }
        if (r->type != REDIS_REPLY_ARRAY || r->elements != 1)
            return false;
        if (r->element[0]->type == REDIS_REPLY_ERROR)
            *why = r->element[0]->str;
        return r->element[0]->type == REDIS_REPLY_STATUS;
    case PEND_WM_WATCH:
    case PEND_WM_MULTI:
        return r->type == REDIS_REPLY_STATUS;
    case PEND_WM_GET:
        s->wm_seen =
            !s->wm_script_only && r->type == REDIS_REPLY_STRING && strcmp(r->str, s->wm_value) == 0;
        return r->type == REDIS_REPLY_STRING || r->type == REDIS_REPLY_NIL;
    case PEND_SHA:
        *why = "SCRIPT LOAD returned an unexpected SHA1";
        return r->type == REDIS_REPLY_STRING &&
               strcmp(r->str, p->nkeys == 1 ? s->rsha : s->sha) == 0; /* 1: refresh.lua */
    case PEND_WAIT:
        if (r->type != REDIS_REPLY_INTEGER)
            return false;
        if (r->integer >= s->cfg.url.replicas)
            return true;
        s->stats.replica_shortfalls++;
        s->shortfall = true;
        snprintf(s->why, sizeof s->why,
                 "only %lld of the %d replicas asked for (replicas=%d) acknowledged the batch "
                 "within %d ms; it is not confirmed and will be sent again",
                 r->integer, s->cfg.url.replicas, s->cfg.url.replicas, sink_wait_ms(s));
        *why = s->why;
        return false;
    case PEND_SCAN:
        return r->type == REDIS_REPLY_ARRAY && r->elements == 2 &&
               r->element[0]->type == REDIS_REPLY_STRING &&
               r->element[1]->type == REDIS_REPLY_ARRAY;
    }
    return false;
}

/* Record an OOM refusal of p's write (the watermark or an op), which
 * keeps that op for the next flush while the rest of the batch goes on.
 * False when p is not such a write. */
static bool refuse(Sink *s, const Pending *p, const char *err)
{
    bool wm = p->kind == PEND_WM || p->kind == PEND_WM_QUEUED;

    if (p->op == SINK_NO_OP && !wm)
        return false; /* SCRIPT LOAD: the batch fails as usual */
    if (s->nrefused++ == 0) {
        char what[160];
        describe(s, p, what, sizeof what);
        snprintf(s->oom_first, sizeof s->oom_first, "%s (%s)", what, err);
    }
    if (p->op == SINK_NO_OP)
        s->wm_refused = true;
    else
        batch_mark(&s->b, p->op);
    return true;
}

/* A refresh op's reply 0: the fence held a newer commit's row (refresh.lua). */
void sink_note_fenced(Sink *s, size_t op, const redisReply *r)
{
    if (op < s->b.nops && s->b.ops[op].action == RULES_INV_REFRESH && r != NULL &&
        r->type == REDIS_REPLY_INTEGER && r->integer == 0)
        s->fenced++;
}

/* Read every outstanding reply. The last SCAN reply is handed to *scan
 * (caller frees) when scan is not NULL. Returns 0 when all replies were
 * as expected; -1 on the first bad one (the rest are still read, so the
 * connection stays usable) or on an I/O error (connection dropped). */
static int drain(Sink *s, redisReply **scan)
{
    int rc = 0;
    char what[160];

    for (size_t k = 0; k < s->npend; k++) {
        const Pending *p = &s->pend[k];
        const char *why;
        redisReply *r = NULL;
        if (rconn_read(s->c, &r) < 0) {
            describe(s, p, what, sizeof what);
            if (scan != NULL && *scan != NULL) {
                freeReplyObject(*scan);
                *scan = NULL;
            }
            return io_fail(s, what);
        }
        if (!reply_ok(s, p, r, &why)) {
            if (r->type == REDIS_REPLY_ERROR && strncmp(r->str, "READONLY", 8) == 0)
                s->readonly = true; /* a replica now: the master moved */
            if (r->type == REDIS_REPLY_ERROR && strncmp(r->str, "OOM", 3) == 0 &&
                refuse(s, p, r->str)) {
                freeReplyObject(r);
                continue;
            }
            if (rc == 0) {
                char t[300];
                describe(s, p, what, sizeof what);
                sink_set_err(s, "redis at %s refused %s: %s", target(s, t, sizeof t), what, why);
            }
            rc = -1;
        } else if (p->kind == PEND_SCAN && scan != NULL) {
            *scan = r;
            continue;
        } else {
            sink_note_fenced(s, p->op, r);
        }
        freeReplyObject(r);
    }
    s->npend = 0;
    if (rc < 0 && scan != NULL && *scan != NULL) {
        freeReplyObject(*scan);
        *scan = NULL;
    }
    return rc;
}

/* Append UNLINK/DEL for keys[0..n) in commands of SINK_KEYS_PER_CMD. */
static void pipe_delete(Sink *s, const char *const *keys, const size_t *lens, size_t n, size_t op,
                        bool scan_match)
{
    const char *cmd = s->cfg.use_del ? "DEL" : "UNLINK";

    sink_argv_reserve(s, SINK_KEYS_PER_CMD + 1);
    for (size_t i = 0; i < n; i += SINK_KEYS_PER_CMD) {
        size_t m = n - i < SINK_KEYS_PER_CMD ? n - i : SINK_KEYS_PER_CMD;
        sink_arg_str(s, 0, cmd);
        for (size_t k = 0; k < m; k++)
            sink_arg(s, 1 + k, keys[i + k], lens[i + k]);
        pipe_cmd(s, m + 1, PEND_INT, op, m, scan_match);
    }
}

static void pipe_tag(Sink *s, const char *tag, size_t len, size_t op, bool scan_match)
{
    sink_argv_reserve(s, 5);
    sink_arg_str(s, 0, "EVALSHA");
    sink_arg_str(s, 1, s->sha);
    sink_arg_str(s, 2, "1");
    sink_arg(s, 3, tag, len);
    sink_arg_str(s, 4, s->cfg.use_del ? "del" : "unlink");
    pipe_cmd(s, 5, PEND_INT, op, 1, scan_match);
}

static void pipe_incr(Sink *s, const char *key, size_t len, size_t op, bool scan_match)
{
    sink_argv_reserve(s, 2);
    sink_arg_str(s, 0, "INCR");
    sink_arg(s, 1, key, len);
    pipe_cmd(s, 2, PEND_INT, op, 1, scan_match);
}

/* Append one grouped delete for the run of KEY ops starting at i (at most
 * SINK_KEYS_PER_CMD of them). Returns the index after the run. */
static size_t pipe_key_run(Sink *s, size_t i)
{
    size_t n = 0;

    sink_argv_reserve(s, SINK_KEYS_PER_CMD + 1);
    sink_arg_str(s, 0, s->cfg.use_del ? "DEL" : "UNLINK");
    while (i + n < s->b.nops && n < SINK_KEYS_PER_CMD && s->b.ops[i + n].action == RULES_INV_KEY) {
        const BatchOp *op = &s->b.ops[i + n];
        sink_arg(s, 1 + n, batch_str(&s->b, op), op->len);
        n++;
    }
    pipe_cmd(s, n + 1, PEND_INT, i, n, false);
    return i + n;
}

/* ---- SCAN loops ------------------------------------------------------ */

size_t sink_scan_args(Sink *s, const char *cursor, size_t op)
{
    const BatchOp *o = &s->b.ops[op];

    sink_argv_reserve(s, 6);
    sink_arg_str(s, 0, "SCAN");
    sink_arg_str(s, 1, cursor);
    sink_arg_str(s, 2, "MATCH");
    sink_arg(s, 3, batch_str(&s->b, o), o->len);
    sink_arg_str(s, 4, "COUNT");
    sink_arg_str(s, 5, SINK_SCAN_COUNT);
    return 6;
}

static void pipe_scan(Sink *s, const char *cursor, size_t op)
{
    pipe_cmd(s, sink_scan_args(s, cursor, op), PEND_SCAN, op, 0, false);
}

/* Queue the pattern op's action for one page of matched keys. */
static void pipe_matches(Sink *s, size_t op, const redisReply *keys)
{
    size_t n = keys->elements;
    const char **kp = xrealloc(NULL, (n ? n : 1) * sizeof *kp);
    size_t *kl = xrealloc(NULL, (n ? n : 1) * sizeof *kl);

    for (size_t i = 0; i < n; i++) {
        kp[i] = keys->element[i]->str;
        kl[i] = keys->element[i]->len;
    }
    switch (s->b.ops[op].action) {
    case RULES_INV_TAG_PATTERN:
        for (size_t i = 0; i < n; i++)
            pipe_tag(s, kp[i], kl[i], op, true);
        break;
    case RULES_INV_VERSION_PATTERN:
        for (size_t i = 0; i < n; i++)
            pipe_incr(s, kp[i], kl[i], op, true);
        break;
    default:
        pipe_delete(s, kp, kl, n, op, true);
        break;
    }
    free(kp);
    free(kl);
}

/* Apply pattern op `op`: SCAN the whole keyspace for its pattern. The
 * actions for each page are sent together with the next SCAN request. The
 * pipeline must be empty on entry. */
static int run_scan(Sink *s, size_t op)
{
    char cursor[32] = "0";

    pipe_scan(s, cursor, op);
    for (;;) {
        redisReply *page = NULL;
        if (drain(s, &page) < 0)
            return -1;
        if (page == NULL)
            return 0; /* the last page's actions were acknowledged */
        const redisReply *next = page->element[0];
        for (size_t i = 0; i < page->element[1]->elements; i++)
            if (page->element[1]->element[i]->type != REDIS_REPLY_STRING) {
                sink_set_err(s, "redis SCAN returned a non-string key");
                freeReplyObject(page);
                return -1;
            }
        pipe_matches(s, op, page->element[1]);
        snprintf(cursor, sizeof cursor, "%s", next->str);
        freeReplyObject(page);
        if (strcmp(cursor, "0") != 0)
            pipe_scan(s, cursor, op);
    }
}

/* ---- flush ----------------------------------------------------------- */

static bool batch_has_refresh(const Batch *b)
{
    for (size_t i = 0; i < b->nops; i++)
        if (b->ops[i].action == RULES_INV_REFRESH || b->ops[i].action == RULES_INV_STALE)
            return true;
    return false;
}

/* Learn a script's SHA1 into sha (once per sink) with a synchronous SCRIPT LOAD. */
static int learn_script(Sink *s, const char *script, char *sha)
{
    const char *argv[3] = {"SCRIPT", "LOAD", script};
    size_t lens[3] = {6, 4, strlen(script)};
    redisReply *r;
    char t[300];

    if (sha[0] != '\0')
        return 0;
    if (command(s, "SCRIPT LOAD", 3, argv, lens, &r) < 0)
        return -1;
    if (r->type != REDIS_REPLY_STRING || r->len != 40) {
        sink_set_err(s, "redis at %s refused SCRIPT LOAD of the %s script: %s",
                     target(s, t, sizeof t), script == redis_refresh_lua ? "refresh" : "tag",
                     r->type == REDIS_REPLY_ERROR ? r->str : "unexpected reply");
        freeReplyObject(r);
        return -1;
    }
    memcpy(sha, r->str, 41);
    freeReplyObject(r);
    return 0;
}

static int learn_sha(Sink *s)
{
    return learn_script(s, redis_tag_invalidate_lua, s->sha);
}

/* Is the queued watermark past the one the key is known to hold? */
static bool wm_ahead(const Sink *s)
{
    uint64_t next;

    return s->wm_held != 0 && !s->wm_reset && !s->wm_script_only && lsn_parse(s->wm_value, &next) &&
           next > s->wm_held;
}

static void pipe_wm_cmd(Sink *s, size_t argc, PendKind kind, const char *what)
{
    pipe_cmd(s, argc, kind, SINK_NO_OP, 0, false);
    s->pend[s->npend - 1].cmd = what;
}

/* Append the watermark. It must only move forward (docs/guarantees.md),
 * which redis/watermark.lua checks in Redis, at a cost: under load the
 * script was about half of Redis' CPU per batch (33-34 µs against 2.3 for
 * the UNLINK; docs/performance-history.md). So the script runs only when the
 * value the key holds is unknown, and is followed by WATCH and GET. While
 * the GET saw this connection's own last value and no other client has
 * written the key since (WATCH), the next, higher value is a plain SET in
 * MULTI/EXEC; if another client did write it, EXEC does nothing (nil) and
 * the flush sends the script after all (flush_batch). A WATCH is this
 * connection's: a reconnect forgets it (disconnect()). */
static void pipe_watermark(Sink *s, bool plain)
{
    s->wm_held = 0;
    s->wm_seen = s->wm_retry = false;
    sink_argv_reserve(s, 6);
    if (plain) {
        sink_arg_str(s, 0, "MULTI");
        pipe_wm_cmd(s, 1, PEND_WM_MULTI, "MULTI for the watermark SET");
        sink_arg_str(s, 0, "SET");
        sink_arg_str(s, 1, s->wm_key);
        sink_arg_str(s, 2, s->wm_value);
        pipe_wm_cmd(s, 3, PEND_WM_QUEUED, "the watermark SET");
        sink_arg_str(s, 0, "EXEC");
        pipe_wm_cmd(s, 1, PEND_WM_EXEC, "EXEC of the watermark SET");
    } else {
        /* A WATCH from an earlier flush would see the script's own write
         * (and the next EXEC abort): drop it first. */
        if (!s->wm_script_only) {
            sink_arg_str(s, 0, "UNWATCH");
            pipe_wm_cmd(s, 1, PEND_WM_WATCH, "UNWATCH before the watermark script");
        }
        pipe_wm_cmd(s, sink_watermark_args(s), PEND_WM, "the watermark SET");
    }
    if (s->wm_script_only)
        return;
    sink_arg_str(s, 0, "WATCH");
    sink_arg_str(s, 1, s->wm_key);
    pipe_wm_cmd(s, 2, PEND_WM_WATCH, "WATCH of the watermark");
    sink_arg_str(s, 0, "GET");
    sink_arg_str(s, 1, s->wm_key);
    pipe_wm_cmd(s, 2, PEND_WM_GET, "GET of the watermark");
}

/* Send the watermark and, when tags are queued, the script (so EVALSHA
 * cannot meet NOSCRIPT after a SCRIPT FLUSH or restart). */
static void pipe_prologue(Sink *s, bool tags, bool refresh)
{
    if (s->wm_key != NULL)
        pipe_watermark(s, wm_ahead(s));
    sink_argv_reserve(s, 3);
    if (tags) {
        sink_arg_str(s, 0, "SCRIPT");
        sink_arg_str(s, 1, "LOAD");
        sink_arg_str(s, 2, redis_tag_invalidate_lua);
        pipe_cmd(s, 3, PEND_SHA, SINK_NO_OP, 0, false);
        s->pend[s->npend - 1].cmd = "SCRIPT LOAD";
    }
    if (refresh) {
        sink_arg_str(s, 0, "SCRIPT");
        sink_arg_str(s, 1, "LOAD");
        sink_arg_str(s, 2, redis_refresh_lua);
        pipe_cmd(s, 3, PEND_SHA, SINK_NO_OP, 1, false);
        s->pend[s->npend - 1].cmd = "SCRIPT LOAD of the refresh script";
    }
}

/* The fence key beside a refreshed key: in the key's hash slot (its hash
 * tag kept, or the whole key made the tag), so Cluster runs the script. */
static const char *fence_key(Sink *s, const char *key, size_t len, size_t *flen)
{
    const char *open = memchr(key, '{', len);
    const char *close = open ? memchr(open + 1, '}', len - (size_t)(open + 1 - key)) : NULL;
    bool tagged = close != NULL && close > open + 1;
    size_t n = sizeof SINK_FENCE_PREFIX - 1;

    s->fence = xgrow(s->fence, &s->fence_cap, n + len + 3, 1);
    memcpy(s->fence, SINK_FENCE_PREFIX, n);
    if (!tagged)
        s->fence[n++] = '{';
    memcpy(s->fence + n, key, len);
    n += len;
    if (!tagged)
        s->fence[n++] = '}';
    s->fence[n] = '\0';
    *flen = n;
    return s->fence;
}

/* Put the refresh script's arguments for op i into argv from index at:
 * numkeys, key[, fence], mode, lsn, seconds, value. Returns the argc. */
size_t sink_refresh_args(Sink *s, size_t i, size_t at)
{
    const BatchOp *op = &s->b.ops[i];
    const char *key = batch_str(&s->b, op);
    const char *p = batch_payload(&s->b, op), *end = p + op->payload_len;
    bool stale = op->action == RULES_INV_STALE;
    size_t flen, k = at;

    sink_argv_reserve(s, at + 8);
    sink_arg_str(s, k++, stale ? "1" : "2");
    sink_arg(s, k++, key, op->len);
    if (!stale) {
        const char *f = fence_key(s, key, op->len, &flen);
        sink_arg(s, k++, f, flen);
    }
    for (int f = 0; f < 4; f++) {
        const char *nul = f < 3 ? memchr(p, '\0', (size_t)(end - p)) : end;
        if (nul == NULL)
            nul = end;
        sink_arg(s, k++, p, (size_t)(nul - p));
        p = nul < end ? nul + 1 : end;
    }
    return k;
}

static void pipe_refresh(Sink *s, size_t i)
{
    size_t argc;

    sink_argv_reserve(s, 10);
    sink_arg_str(s, 0, "EVALSHA");
    sink_arg_str(s, 1, s->rsha);
    argc = sink_refresh_args(s, i, 2);
    pipe_cmd(s, argc, PEND_INT, i, 1, false);
    s->pend[s->npend - 1].cmd = "the refresh script";
}

static int flush_batch(Sink *s)
{
    bool tags = batch_has_tags(&s->b);
    size_t i = 0;

    s->nrefused = 0;
    s->fenced = 0;
    s->wm_refused = false;
    s->wm_seen = s->wm_retry = false;
    batch_unmark_all(&s->b);

    bool refresh = batch_has_refresh(&s->b);

    if (tags && learn_sha(s) < 0)
        return -1;
    if (refresh && learn_script(s, redis_refresh_lua, s->rsha) < 0)
        return -1;
    s->npend = 0;
    pipe_prologue(s, tags, refresh);
    while (i < s->b.nops) {
        const BatchOp *op = &s->b.ops[i];
        const char *str = batch_str(&s->b, op);
        switch (op->action) {
        case RULES_INV_KEY:
            i = pipe_key_run(s, i);
            continue;
        case RULES_INV_TAG:
            pipe_tag(s, str, op->len, i, false);
            break;
        case RULES_INV_VERSION:
            pipe_incr(s, str, op->len, i, false);
            break;
        case RULES_INV_PUBLISH:
            pipe_cmd(s, sink_publish_args(s, i), PEND_INT, i, 1, false);
            break;
        case RULES_INV_REFRESH:
        case RULES_INV_STALE:
            pipe_refresh(s, i);
            break;
        case RULES_INV_PATTERN:
        case RULES_INV_TAG_PATTERN:
        case RULES_INV_VERSION_PATTERN:
            if (drain(s, NULL) < 0 || run_scan(s, i) < 0)
                return -1;
            break;
        }
        i++;
    }
    pipe_wait(s);
    if (drain(s, NULL) < 0)
        return -1;
    if (s->wm_retry) { /* another client wrote the key: let the script compare */
        pipe_watermark(s, false);
        pipe_wait(s);
        if (drain(s, NULL) < 0)
            return -1;
    }
    if (s->wm_key != NULL && s->wm_seen && !lsn_parse(s->wm_value, &s->wm_held))
        s->wm_held = 0;
    return 0;
}

/* After a flush whose only failures were OOM refusals: count what was
 * applied, and keep only the refused ops (and the watermark if refused)
 * as the batch, in their order, in a fresh arena. */
static void keep_refused(Sink *s)
{
    for (size_t i = 0; i < s->b.nops; i++) {
        RulesInvAction a = s->b.ops[i].action;
        if (s->b.ops[i].refused)
            continue;
        s->stats.keys += a == RULES_INV_KEY;
        s->stats.patterns += a == RULES_INV_PATTERN;
        s->stats.tags += a == RULES_INV_TAG || a == RULES_INV_TAG_PATTERN;
        s->stats.publishes += a == RULES_INV_PUBLISH;
        s->stats.refreshes += a == RULES_INV_REFRESH;
        s->stats.stales += a == RULES_INV_STALE;
    }
    s->stats.refresh_fenced += s->fenced;
    batch_keep_marked(&s->b);
    if (!s->wm_refused) {
        free(s->wm_key);
        free(s->wm_value);
        s->wm_key = s->wm_value = NULL;
    }
}

/* The batch was sent and every delete acknowledged, but Redis refused
 * some writes for lack of memory. Returns -1. */
static int oom_fail(Sink *s)
{
    char t[300], more[64] = "";

    if (s->nrefused > 1)
        snprintf(more, sizeof more, " and %zu more writes", s->nrefused - 1);
    keep_refused(s);
    s->oom = true;
    s->stats.oom_refusals += s->nrefused;
    sink_set_err(s,
                 "redis at %s is out of memory and refused %s%s; the deletes of the batch were "
                 "applied, the refused writes are kept and sent again (nothing is confirmed past "
                 "them): free memory in redis, raise maxmemory, or use an evicting "
                 "maxmemory-policy (allkeys-lru) on a cache",
                 target(s, t, sizeof t), s->oom_first, more);
    return -1;
}

bool sink_watermark_by_script(const Sink *s)
{
    return s->wm_script_only;
}

bool sink_oom(const Sink *s)
{
    return s->oom;
}

bool sink_shortfall(const Sink *s)
{
    return s->shortfall;
}

int sink_flush(Sink *s)
{
    s->oom = false;
    s->shortfall = false;
    s->readonly = false;
    if (!sink_dirty(s))
        return 0;
    if (s->cl != NULL) {
        if (sink_cl_flush(s) < 0)
            goto fail;
        if (s->nrefused > 0) {
            (void)oom_fail(s);
            goto fail;
        }
        goto done;
    }
    if (s->c == NULL && sink_connect(s) < 0)
        goto fail;
    if (flush_batch(s) < 0) {
        /* After an error reply the stream is in sync, but a half-drained
         * pipeline (error in an earlier drain) is not: start afresh. */
        if (s->c != NULL && (s->npend > 0 || s->readonly))
            disconnect(s);
        goto fail;
    }
    if (s->nrefused > 0) {
        (void)oom_fail(s);
        goto fail;
    }
done:
    count_applied(s);
    clear_batch(s);
    return 0;
fail:
    s->stats.errors++;
    return -1;
}

/* ---- the sink as an apply target (apply.h) --------------------------- */

static void target_add(void *obj, RulesInvAction action, const char *str, size_t len,
                       const char *payload, size_t payload_len)
{
    sink_add(obj, action, str, len, payload, payload_len);
}

static void target_set_watermark(void *obj, const char *key, const char *value, bool reset)
{
    sink_set_watermark(obj, key, value, reset);
}

static size_t target_pending(const void *obj)
{
    return sink_pending(obj);
}

static bool target_dirty(const void *obj)
{
    return sink_dirty(obj);
}

static bool target_full(const void *obj)
{
    return sink_full(obj);
}

static int target_flush(void *obj)
{
    return sink_flush(obj);
}

static bool target_oom(const void *obj)
{
    return sink_oom(obj);
}

static bool target_shortfall(const void *obj)
{
    return sink_shortfall(obj);
}

static bool target_connected(const void *obj)
{
    return sink_connected(obj);
}

static const char *target_errstr(const void *obj)
{
    return sink_errstr(obj);
}

const ApplyTargetOps sink_apply_ops = {
    .add = target_add,
    .set_watermark = target_set_watermark,
    .pending = target_pending,
    .dirty = target_dirty,
    .full = target_full,
    .flush = target_flush,
    .oom = target_oom,
    .shortfall = target_shortfall,
    .connected = target_connected,
    .errstr = target_errstr,
};

/* ---- single commands for the audit (docs/audit.md) ------------------------- */

typedef struct CallArg {
    SinkReplyFn fn;
    void *arg;
} CallArg;

static int take_call(Sink *s, const redisReply *r, void *arg)
{
    CallArg *ca = arg;

    (void)s;
    return ca->fn(ca->arg, r);
}

int sink_call(Sink *s, size_t keyarg, int argc, const char **argv, const size_t *lens,
              SinkReplyFn fn, void *arg)
{
    CallArg ca = {fn, arg};

    return one_cmd(s, keyarg, argc, argv, lens, take_call, &ca);
}

int sink_scan_page(Sink *s, SinkScan *sc, const char *pattern, SinkReplyFn fn, void *arg)
{
    const char *argv[6] = {"SCAN", sc->cursor, "MATCH", pattern, "COUNT", "100"};
    size_t lens[6] = {4, strlen(sc->cursor), 5, strlen(pattern), 5, 3};
    const redisReply *page;
    redisReply *r = NULL;
    int rc;

    if (sc->cursor[0] == '\0')
        snprintf(sc->cursor, sizeof sc->cursor, "0");
    lens[1] = strlen(sc->cursor);
    if (s->cl != NULL) {
        if (!cluster_connected(s->cl) && sink_cl_connect(s) < 0)
            return -1;
        if (sc->node >= cluster_master_count(s->cl))
            return 0;
        cluster_reset(s->cl);
        (void)cluster_append_node(s->cl, cluster_master_id(s->cl, sc->node), 6, argv, lens);
        if (sink_cl_exec(s) < 0) {
            cluster_reset(s->cl);
            return -1;
        }
        page = cluster_reply(s->cl, 0);
    } else {
        if (s->c == NULL && sink_connect(s) < 0)
            return -1;
        if (command(s, "SCAN", 6, argv, lens, &r) < 0)
            return -1;
        page = r;
    }
    if (!sink_page_ok(page)) {
        sink_set_err(s, "redis SCAN returned an unexpected reply%s%s",
                     page->type == REDIS_REPLY_ERROR ? ": " : "",
                     page->type == REDIS_REPLY_ERROR ? page->str : "");
        rc = -1;
    } else {
        snprintf(sc->cursor, sizeof sc->cursor, "%s", page->element[0]->str);
        rc = fn(arg, page->element[1]);
        if (strcmp(sc->cursor, "0") == 0) {
            sc->node++;
            sc->done = s->cl == NULL || sc->node >= cluster_master_count(s->cl);
        }
    }
    if (r != NULL)
        freeReplyObject(r);
    if (s->cl != NULL)
        cluster_reset(s->cl);
    return rc;
}
