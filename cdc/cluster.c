/*
 * cluster.c — Redis Cluster routing (see cluster.h for the contract).
 *
 * Nodes live in an array that only grows, so a node id stays valid for the
 * life of the Cluster; the slot map is a table of 16384 node ids (-1 where
 * no master serves the slot). Queued commands are kept in RESP form
 * (rconn_format) together with their slot or fixed node, so a
 * redirected or failed command can be sent again without the caller.
 *
 * cluster_exec() runs rounds: each round appends every unanswered command
 * to the pipeline of the node that should serve it (ASKING first for an
 * -ASK redirect), writes every node's pipeline, then reads the replies in
 * queue order (per node that is the order they were sent in). Redirects
 * make another round; anything else that is not a clean reply fails the
 * batch once every reply of the round has been read, so every connection
 * that survives stays in sync. Connections are rconn.c's (TCP or TLS);
 * this file never sees a socket.
 */
#include "cluster.h"
#include "mem.h"
#include "rconn.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CLUSTER_MAX_ROUNDS 8 /* redirects followed per exec */
#define CLUSTER_NO_NODE (-1)

static const char asking_cmd[] = "*1\r\n$6\r\nASKING\r\n";

typedef struct ClusterNode {
    char host[256];
    int port;
    char addr[300]; /* "host:port", IPv6 bracketed */
    Rconn *ctx;
    bool master;
    unsigned replicas; /* for a master: replicas in the map */
} ClusterNode;

typedef struct ClusterCmd {
    char *fmt; /* RESP text (rconn_format) */
    size_t len;
    int slot;      /* -1: a node command */
    int node;      /* the fixed node, or the -ASK target */
    bool asking;   /* next send goes to node, preceded by ASKING */
    int sent_to;   /* node this round, or CLUSTER_NO_NODE */
    bool sent_ask; /* ASKING preceded it this round */
    bool oom;      /* refused with -OOM in the last exec */
    redisReply *reply;
    char name[96]; /* `UNLINK "key"` for messages */
} ClusterCmd;

struct Cluster {
    ClusterConfig cfg;
    ClusterNode *nodes;
    size_t nnodes, nodes_cap;
    int slots[CLUSTER_SLOTS];
    int *masters;
    size_t nmasters, masters_cap;
    bool have_map, need_refresh;
    ClusterCmd *cmds;
    size_t ncmds, cmds_cap;
    char errstr[512];
    bool err_set; /* errstr holds this exec's first error */
};

static void set_err(Cluster *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Keep the first error of an exec (the root cause), later ones are noise. */
static void set_err(Cluster *c, const char *fmt, ...)
{
    va_list ap;

    if (c->err_set)
        return;
    va_start(ap, fmt);
    vsnprintf(c->errstr, sizeof c->errstr, fmt, ap);
    va_end(ap);
    c->err_set = true;
}

/* ---- pure helpers ------------------------------------------------------ */

uint16_t cluster_crc16(const char *buf, size_t len)
{
    uint16_t crc = 0;

    for (size_t i = 0; i < len; i++) {
        crc ^= (uint16_t)((unsigned char)buf[i] << 8);
        for (int b = 0; b < 8; b++)
            crc = (crc & 0x8000) ? (uint16_t)((crc << 1) ^ 0x1021) : (uint16_t)(crc << 1);
    }
    return crc;
}

unsigned cluster_keyslot(const char *key, size_t len)
{
    const char *open = memchr(key, '{', len);

    if (open != NULL) {
        size_t start = (size_t)(open - key) + 1;
        const char *close = memchr(key + start, '}', len - start);
        if (close != NULL && close > key + start)
            return cluster_crc16(key + start, (size_t)(close - key) - start) & (CLUSTER_SLOTS - 1);
    }
    return cluster_crc16(key, len) & (CLUSTER_SLOTS - 1);
}

/* Split "host:port" (IPv6 may be bare or bracketed) at its last colon. */
static bool split_hostport(const char *s, size_t n, char *host, size_t hostlen, int *port)
{
    const char *colon = NULL;
    long p = 0;
    size_t hl;

    for (size_t i = 0; i < n; i++)
        if (s[i] == ':')
            colon = s + i;
    if (colon == NULL || colon + 1 == s + n || s + n - colon > 6)
        return false;
    for (const char *q = colon + 1; q < s + n; q++) {
        if (*q < '0' || *q > '9')
            return false;
        p = p * 10 + (*q - '0');
    }
    if (p < 1 || p > 65535)
        return false;
    hl = (size_t)(colon - s);
    if (hl >= 2 && s[0] == '[' && s[hl - 1] == ']') {
        s++;
        hl -= 2;
    }
    if (hl >= hostlen)
        return false;
    memcpy(host, s, hl);
    host[hl] = '\0';
    *port = (int)p;
    return true;
}

ClusterRedirect cluster_parse_redirect(const char *err, unsigned *slot, char *host, size_t hostlen,
                                       int *port)
{
    ClusterRedirect kind;
    const char *p, *sp;
    unsigned long v = 0;

    if (strncmp(err, "MOVED ", 6) == 0) {
        kind = CLUSTER_REDIRECT_MOVED;
        p = err + 6;
    } else if (strncmp(err, "ASK ", 4) == 0) {
        kind = CLUSTER_REDIRECT_ASK;
        p = err + 4;
    } else {
        return CLUSTER_REDIRECT_NONE;
    }
    if (*p < '0' || *p > '9')
        return CLUSTER_REDIRECT_NONE;
    for (; *p >= '0' && *p <= '9'; p++) {
        v = v * 10 + (unsigned long)(*p - '0');
        if (v >= CLUSTER_SLOTS)
            return CLUSTER_REDIRECT_NONE;
    }
    if (*p != ' ')
        return CLUSTER_REDIRECT_NONE;
    p++;
    sp = strchr(p, ' ');
    if (!split_hostport(p, sp ? (size_t)(sp - p) : strlen(p), host, hostlen, port))
        return CLUSTER_REDIRECT_NONE;
    *slot = (unsigned)v;
    return kind;
}

/* One CLUSTER SLOTS entry: [first, last, [host, port, ...], replicas...]. */
static bool parse_range(const redisReply *e, ClusterRange *out)
{
    const redisReply *m;

    if (e->type != REDIS_REPLY_ARRAY || e->elements < 3)
        return false;
    if (e->element[0]->type != REDIS_REPLY_INTEGER || e->element[1]->type != REDIS_REPLY_INTEGER)
        return false;
    if (e->element[0]->integer < 0 || e->element[1]->integer >= CLUSTER_SLOTS ||
        e->element[0]->integer > e->element[1]->integer)
        return false;
    m = e->element[2];
    if (m->type != REDIS_REPLY_ARRAY || m->elements < 2 ||
        m->element[0]->type != REDIS_REPLY_STRING || m->element[1]->type != REDIS_REPLY_INTEGER ||
        m->element[1]->integer < 0 || m->element[1]->integer > 65535 ||
        m->element[0]->len >= sizeof out->host)
        return false;
    out->first = (unsigned)e->element[0]->integer;
    out->last = (unsigned)e->element[1]->integer;
    /* "?" or "" means the node does not know its own address. */
    if (strcmp(m->element[0]->str, "?") == 0)
        out->host[0] = '\0';
    else
        memcpy(out->host, m->element[0]->str, m->element[0]->len + 1);
    out->port = (int)m->element[1]->integer;
    out->replicas = (unsigned)(e->elements - 3);
    return out->port > 0;
}

ClusterRange *cluster_parse_slots(const redisReply *r, size_t *n, char *err, size_t errlen)
{
    ClusterRange *ranges;

    *n = 0;
    if (r == NULL || r->type != REDIS_REPLY_ARRAY) {
        snprintf(err, errlen, "CLUSTER SLOTS did not return an array%s%s",
                 r && r->type == REDIS_REPLY_ERROR ? ": " : "",
                 r && r->type == REDIS_REPLY_ERROR ? r->str : "");
        return NULL;
    }
    if (r->elements == 0) {
        snprintf(err, errlen, "CLUSTER SLOTS lists no slot (is the cluster created?)");
        return NULL;
    }
    ranges = xrealloc(NULL, r->elements * sizeof *ranges);
    for (size_t i = 0; i < r->elements; i++) {
        if (!parse_range(r->element[i], &ranges[i])) {
            snprintf(err, errlen, "CLUSTER SLOTS entry %zu is malformed", i);
            free(ranges);
            return NULL;
        }
    }
    *n = r->elements;
    return ranges;
}

/* ---- nodes ------------------------------------------------------------- */

/* The id of host:port, adding it to the node table if unknown. */
static int node_for(Cluster *c, const char *host, int port)
{
    ClusterNode *nd;

    for (size_t i = 0; i < c->nnodes; i++)
        if (c->nodes[i].port == port && strcmp(c->nodes[i].host, host) == 0)
            return (int)i;
    c->nodes = xgrow(c->nodes, &c->nodes_cap, c->nnodes + 1, sizeof *c->nodes);
    nd = &c->nodes[c->nnodes];
    memset(nd, 0, sizeof *nd);
    snprintf(nd->host, sizeof nd->host, "%s", host);
    nd->port = port;
    if (strchr(host, ':') != NULL)
        snprintf(nd->addr, sizeof nd->addr, "[%s]:%d", host, port);
    else
        snprintf(nd->addr, sizeof nd->addr, "%s:%d", host, port);
    return (int)c->nnodes++;
}

static void node_close(Cluster *c, int id)
{
    rconn_close(c->nodes[id].ctx);
    c->nodes[id].ctx = NULL;
}

/* Record an I/O failure on node id during `what`, drop its connection and
 * ask for a map refresh (the node may have failed over). */
static void node_io_fail(Cluster *c, int id, const char *what)
{
    ClusterNode *nd = &c->nodes[id];

    if (rconn_timed_out(nd->ctx))
        set_err(c,
                "redis cluster node %s did not answer %s within %d ms (command timeout); "
                "the connection was closed",
                nd->addr, what, c->cfg.command_timeout_ms);
    else
        set_err(c, "redis I/O error at cluster node %s during %s: %s", nd->addr, what,
                rconn_errstr(nd->ctx));
    node_close(c, id);
    c->need_refresh = true;
}

/* Run one command on node id's idle connection; *out gets the reply. */
static int node_command(Cluster *c, int id, const char *what, int argc, const char **argv,
                        const size_t *lens, redisReply **out)
{
    if (rconn_command(c->nodes[id].ctx, out, argc, argv, lens) < 0) {
        node_io_fail(c, id, what);
        return -1;
    }
    return 0;
}

/* Connect node id unless connected (rconn_open: TLS, AUTH, PING). */
static int node_connect(Cluster *c, int id)
{
    ClusterNode *nd = &c->nodes[id];
    RconnConfig rc = {.label = "redis cluster node",
                      .host = nd->host,
                      .port = nd->port,
                      .tls = c->cfg.tls,
                      .sni = c->cfg.sni,
                      .user = c->cfg.user,
                      .password = c->cfg.password,
                      .has_password = c->cfg.has_password,
                      .connect_timeout_ms = c->cfg.connect_timeout_ms,
                      .command_timeout_ms = c->cfg.command_timeout_ms};
    char err[512];

    if (nd->ctx != NULL)
        return 0;
    nd->ctx = rconn_open(&rc, err, sizeof err);
    if (nd->ctx == NULL) {
        set_err(c, "%s", err);
        c->need_refresh = true;
        return -1;
    }
    return 0;
}

/* ---- lifecycle --------------------------------------------------------- */

/* Add every seed of cfg->seeds to the node table. */
static void add_seeds(Cluster *c)
{
    const char *p = c->cfg.seeds;

    while (*p != '\0') {
        const char *end = strchr(p, ',');
        size_t n = end ? (size_t)(end - p) : strlen(p);
        char host[256];
        int port;
        if (split_hostport(p, n, host, sizeof host, &port))
            (void)node_for(c, host, port);
        p += n;
        if (*p == ',')
            p++;
    }
}

Cluster *cluster_new(const ClusterConfig *cfg)
{
    Cluster *c = xrealloc(NULL, sizeof *c);

    memset(c, 0, sizeof *c);
    c->cfg = *cfg;
    for (size_t i = 0; i < CLUSTER_SLOTS; i++)
        c->slots[i] = CLUSTER_NO_NODE;
    add_seeds(c);
    return c;
}

void cluster_reset(Cluster *c)
{
    for (size_t i = 0; i < c->ncmds; i++) {
        free(c->cmds[i].fmt);
        if (c->cmds[i].reply != NULL)
            freeReplyObject(c->cmds[i].reply);
    }
    c->ncmds = 0;
}

void cluster_free(Cluster *c)
{
    if (c == NULL)
        return;
    cluster_reset(c);
    for (size_t i = 0; i < c->nnodes; i++)
        node_close(c, (int)i);
    free(c->nodes);
    free(c->masters);
    free(c->cmds);
    free(c);
}

const char *cluster_errstr(const Cluster *c)
{
    return c->errstr;
}

size_t cluster_master_count(const Cluster *c)
{
    return c->nmasters;
}

int cluster_master_id(const Cluster *c, size_t i)
{
    return c->masters[i];
}

const char *cluster_node_addr(const Cluster *c, int id)
{
    return c->nodes[id].addr;
}

bool cluster_connected(const Cluster *c)
{
    if (!c->have_map || c->need_refresh || c->nmasters == 0)
        return false;
    for (size_t i = 0; i < c->nmasters; i++)
        if (c->nodes[c->masters[i]].ctx == NULL)
            return false;
    return true;
}

/* ---- slot map ---------------------------------------------------------- */

/* Adopt ranges (from node `from`, whose host stands in for an empty one):
 * rebuild the slot table and the master list, close connections to nodes
 * that are no longer masters. */
static void adopt_map(Cluster *c, const ClusterRange *ranges, size_t n, int from)
{
    for (size_t i = 0; i < CLUSTER_SLOTS; i++)
        c->slots[i] = CLUSTER_NO_NODE;
    for (size_t i = 0; i < c->nnodes; i++)
        c->nodes[i].master = false;
    c->nmasters = 0;
    for (size_t i = 0; i < n; i++) {
        const char *host = ranges[i].host[0] ? ranges[i].host : c->nodes[from].host;
        int id = node_for(c, host, ranges[i].port);
        for (unsigned s = ranges[i].first; s <= ranges[i].last; s++)
            c->slots[s] = id;
        if (!c->nodes[id].master) {
            c->nodes[id].master = true;
            c->nodes[id].replicas = ranges[i].replicas;
            c->masters = xgrow(c->masters, &c->masters_cap, c->nmasters + 1, sizeof *c->masters);
            c->masters[c->nmasters++] = id;
        }
    }
    for (size_t i = 0; i < c->nnodes; i++)
        if (!c->nodes[i].master)
            node_close(c, (int)i);
    c->have_map = true;
    c->need_refresh = false;
}

/* Ask node id for CLUSTER SLOTS and adopt the answer. */
static int refresh_from(Cluster *c, int id)
{
    const char *argv[2] = {"CLUSTER", "SLOTS"};
    size_t lens[2] = {7, 5};
    redisReply *r;
    ClusterRange *ranges;
    size_t n;
    char why[256];

    if (node_connect(c, id) < 0 || node_command(c, id, "CLUSTER SLOTS", 2, argv, lens, &r) < 0)
        return -1;
    ranges = cluster_parse_slots(r, &n, why, sizeof why);
    freeReplyObject(r);
    if (ranges == NULL) {
        set_err(c, "redis cluster node %s: %s", c->nodes[id].addr, why);
        return -1;
    }
    adopt_map(c, ranges, n, id);
    free(ranges);
    return 0;
}

int cluster_refresh(Cluster *c)
{
    size_t nm = c->nmasters;
    int *order = xrealloc(NULL, (nm + c->nnodes) * sizeof *order);
    size_t n = 0;
    int rc = -1;

    /* Current masters first (most likely current), then every node ever
     * seen, seeds included; the table may grow while we walk a copy. */
    for (size_t i = 0; i < nm; i++)
        order[n++] = c->masters[i];
    for (size_t i = 0; i < c->nnodes; i++)
        if (!c->nodes[i].master)
            order[n++] = (int)i;
    c->err_set = false;
    for (size_t i = 0; i < n && rc < 0; i++)
        rc = refresh_from(c, order[i]);
    free(order);
    if (rc < 0) {
        char first[sizeof c->errstr];
        memcpy(first, c->errstr, sizeof first);
        c->err_set = false;
        set_err(c, "could not load the redis cluster slot map from any node (%s); last error: %s",
                c->cfg.seeds, first);
    }
    return rc;
}

int cluster_connect(Cluster *c)
{
    if (cluster_refresh(c) < 0)
        return -1;
    c->err_set = false;
    for (size_t i = 0; i < c->nmasters; i++)
        if (node_connect(c, c->masters[i]) < 0)
            return -1;
    return 0;
}

/* ---- command queue ----------------------------------------------------- */

/* Name a command for messages: `UNLINK "key"`, non-printables as '?'. */
static void name_cmd(ClusterCmd *cmd, int argc, const char **argv, const size_t *lens)
{
    char arg[64];
    size_t n = 0;
    size_t cl = lens[0] < 24 ? lens[0] : 24;

    if (argc > 1) {
        for (; n < lens[1] && n < 48; n++) {
            unsigned char ch = (unsigned char)argv[1][n];
            arg[n] = ch >= 0x20 && ch < 0x7f && ch != '"' ? (char)ch : '?';
        }
        if (n < lens[1])
            arg[n++] = '~';
    }
    arg[n] = '\0';
    if (argc > 1)
        snprintf(cmd->name, sizeof cmd->name, "%.*s \"%s\"", (int)cl, argv[0], arg);
    else
        snprintf(cmd->name, sizeof cmd->name, "%.*s", (int)cl, argv[0]);
}

static size_t append(Cluster *c, int slot, int node, int argc, const char **argv,
                     const size_t *lens)
{
    ClusterCmd *cmd;
    char *fmt = xmalloc(rconn_format_max(argc, lens));
    size_t len = rconn_format(fmt, argc, argv, lens);

    c->cmds = xgrow(c->cmds, &c->cmds_cap, c->ncmds + 1, sizeof *c->cmds);
    cmd = &c->cmds[c->ncmds];
    memset(cmd, 0, sizeof *cmd);
    cmd->fmt = fmt;
    cmd->len = len;
    cmd->slot = slot;
    cmd->node = node;
    cmd->sent_to = CLUSTER_NO_NODE;
    name_cmd(cmd, argc, argv, lens);
    return c->ncmds++;
}

size_t cluster_append_key(Cluster *c, size_t keyarg, int argc, const char **argv,
                          const size_t *lens)
{
    int slot = (int)cluster_keyslot(argv[keyarg], lens[keyarg]);
    return append(c, slot, CLUSTER_NO_NODE, argc, argv, lens);
}

size_t cluster_append_node(Cluster *c, int id, int argc, const char **argv, const size_t *lens)
{
    return append(c, -1, id, argc, argv, lens);
}

size_t cluster_append_wait(Cluster *c, int replicas, int timeout_ms)
{
    char ms[16], n[16];
    const char *argv[3] = {"WAIT", n, ms};
    size_t lens[3] = {4, 0, 0};
    size_t first = c->ncmds;

    lens[1] = (size_t)snprintf(n, sizeof n, "%d", replicas > 0 ? replicas : 1);
    lens[2] = (size_t)snprintf(ms, sizeof ms, "%d", timeout_ms);
    for (size_t i = 0; i < c->nmasters; i++)
        if (replicas > 0 || c->nodes[c->masters[i]].replicas > 0)
            (void)append(c, -1, c->masters[i], 3, argv, lens);
    return first;
}

size_t cluster_queued(const Cluster *c)
{
    return c->ncmds;
}

const redisReply *cluster_reply(const Cluster *c, size_t i)
{
    return c->cmds[i].reply;
}

bool cluster_refused_oom(const Cluster *c, size_t i)
{
    return c->cmds[i].reply == NULL && c->cmds[i].oom;
}

bool cluster_only_oom(const Cluster *c)
{
    size_t oom = 0;

    for (size_t i = 0; i < c->ncmds; i++) {
        if (c->cmds[i].reply != NULL)
            continue;
        if (!c->cmds[i].oom)
            return false;
        oom++;
    }
    return oom > 0;
}

const char *cluster_command_name(const Cluster *c, size_t i)
{
    return c->cmds[i].name;
}

/* ---- exec -------------------------------------------------------------- */

/* Which node should get cmd now, or CLUSTER_NO_NODE (error set). */
static int route(Cluster *c, const ClusterCmd *cmd)
{
    int id;

    if (cmd->asking || cmd->slot < 0)
        return cmd->node;
    id = c->slots[cmd->slot];
    if (id == CLUSTER_NO_NODE) {
        set_err(c, "no redis cluster master serves slot %d (for %s); is the cluster down?",
                cmd->slot, cmd->name);
        c->need_refresh = true;
    }
    return id;
}

/* Append every unanswered command to its node's pipeline. Returns the
 * number that could not be sent. */
static size_t send_round(Cluster *c)
{
    size_t unsent = 0;

    for (size_t i = 0; i < c->ncmds; i++) {
        ClusterCmd *cmd = &c->cmds[i];
        int id;
        cmd->sent_to = CLUSTER_NO_NODE;
        cmd->oom = false;
        if (cmd->reply != NULL)
            continue;
        id = route(c, cmd);
        if (id == CLUSTER_NO_NODE || node_connect(c, id) < 0) {
            unsent++;
            continue;
        }
        cmd->sent_ask = cmd->asking;
        if (cmd->asking)
            rconn_append_raw(c->nodes[id].ctx, asking_cmd, sizeof asking_cmd - 1);
        rconn_append_raw(c->nodes[id].ctx, cmd->fmt, cmd->len);
        cmd->sent_to = id;
    }
    return unsent;
}

/* Write every node's pipeline before reading any reply, so the nodes work
 * in parallel. */
static void write_all(Cluster *c)
{
    for (size_t i = 0; i < c->nnodes; i++)
        if (c->nodes[i].ctx != NULL && rconn_flush(c->nodes[i].ctx) < 0)
            node_io_fail(c, (int)i, "sending a pipeline");
}

/* Read one reply from node id; NULL after an I/O error. */
static redisReply *read_reply(Cluster *c, int id, const char *what)
{
    redisReply *r = NULL;

    if (c->nodes[id].ctx == NULL)
        return NULL; /* failed earlier this round; error already set */
    if (rconn_read(c->nodes[id].ctx, &r) < 0) {
        node_io_fail(c, id, what);
        return NULL;
    }
    return r;
}

/* Act on an error reply to cmd from node id. Returns true when the command
 * should simply be sent again (a redirect). */
static bool on_error_reply(Cluster *c, ClusterCmd *cmd, int id, const char *err)
{
    char host[256];
    int port;
    unsigned slot;
    ClusterRedirect kind = cluster_parse_redirect(err, &slot, host, sizeof host, &port);

    if (kind != CLUSTER_REDIRECT_NONE && cmd->slot >= 0) {
        int to = node_for(c, host[0] ? host : c->nodes[id].host, port);
        if (kind == CLUSTER_REDIRECT_MOVED) {
            c->slots[slot] = to;
            c->need_refresh = true;
        } else {
            cmd->asking = true;
            cmd->node = to;
        }
        return true;
    }
    /* -TRYAGAIN (a multi-key command during a migration) and -CLUSTERDOWN
     * (a master failed, no replica promoted yet) fail the batch: the caller
     * retries with backoff; after CLUSTERDOWN the map is re-read first. */
    if (strncmp(err, "CLUSTERDOWN", 11) == 0)
        c->need_refresh = true;
    cmd->oom = strncmp(err, "OOM", 3) == 0;
    set_err(c, "redis cluster node %s refused %s: %s", c->nodes[id].addr, cmd->name, err);
    return false;
}

/* Read the replies of one round. *redirected counts commands to re-send.
 * Returns the number of commands that failed. */
static size_t read_round(Cluster *c, size_t *redirected)
{
    size_t failed = 0;

    for (size_t i = 0; i < c->ncmds; i++) {
        ClusterCmd *cmd = &c->cmds[i];
        int id = cmd->sent_to;
        redisReply *r;
        if (id == CLUSTER_NO_NODE)
            continue;
        if (cmd->sent_ask) {
            r = read_reply(c, id, "ASKING");
            if (r != NULL)
                freeReplyObject(r);
        }
        cmd->asking = false;
        r = read_reply(c, id, cmd->name);
        if (r == NULL) {
            failed++;
            continue;
        }
        if (r->type != REDIS_REPLY_ERROR) {
            cmd->reply = r;
            continue;
        }
        if (on_error_reply(c, cmd, id, r->str))
            (*redirected)++;
        else
            failed++;
        freeReplyObject(r);
    }
    return failed;
}

int cluster_exec(Cluster *c)
{
    c->err_set = false;
    for (int round = 0; round < CLUSTER_MAX_ROUNDS; round++) {
        size_t failed, redirected = 0;
        if ((c->need_refresh || !c->have_map) && cluster_refresh(c) < 0)
            return -1;
        c->err_set = false;
        failed = send_round(c);
        write_all(c);
        failed += read_round(c, &redirected);
        if (failed > 0)
            return -1;
        if (redirected == 0)
            return 0;
    }
    c->err_set = false;
    set_err(c, "redis cluster kept redirecting commands after %d rounds (resharding?)",
            CLUSTER_MAX_ROUNDS);
    c->need_refresh = true;
    return -1;
}
