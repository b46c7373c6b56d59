/*
 * sink_cluster.c — the Redis sink's Cluster executor (see sink.h for the
 * contract, sink_int.h for the state it shares with sink.c).
 *
 * A redis+cluster:// target sends the same commands through cluster.c,
 * which routes each by its key's slot: keys, versions, publishes and the
 * watermark in one pipelined exec across the masters; patterns as a SCAN
 * loop on every master; tags without the script (a script may only touch
 * keys of its own slot, and members live anywhere): TYPE, then SSCAN pages
 * of the set on its node, UNLINK of each member routed by slot, and only
 * after those are acknowledged SREM of the same members from the set
 * (Redis removes a set when its last member goes). The batch ends with
 * WAIT 1 on every master that has a replica (cluster_append_wait). Members
 * first, so a failure part-way leaves the set to find them again on
 * replay; SREM rather than UNLINK of the set so a member added during the
 * walk stays indexed for the next invalidation of the tag.
 */
#include "sink_int.h"

#include "mem.h"

#include <hiredis/hiredis.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern const char redis_refresh_lua[];

Cluster *sink_cl_new(const SinkConfig *cfg, RconnTls *tls)
{
    ClusterConfig cc = {.has_password = cfg->url.has_password,
                        .connect_timeout_ms = cfg->connect_timeout_ms,
                        .command_timeout_ms = cfg->command_timeout_ms,
                        .tls = tls,
                        .replicas = cfg->url.replicas};

    snprintf(cc.seeds, sizeof cc.seeds, "%s", cfg->url.seeds);
    snprintf(cc.user, sizeof cc.user, "%s", cfg->url.user);
    snprintf(cc.password, sizeof cc.password, "%s", cfg->url.password);
    snprintf(cc.sni, sizeof cc.sni, "%s", cfg->url.sni);
    return cluster_new(&cc);
}

int sink_cl_connect(Sink *s)
{
    if (cluster_connect(s->cl) == 0)
        return 0;
    sink_set_err(s, "%s", cluster_errstr(s->cl));
    return -1;
}

/* The commands of a failed exec were refused only for lack of memory:
 * record them (their ops are kept, see refuse()) and go on. False when
 * one of them belongs to no op (it cannot be kept). */
static bool cl_refuse(Sink *s)
{
    size_t n = cluster_queued(s->cl);

    for (size_t i = 0; i < n; i++)
        if (cluster_refused_oom(s->cl, i) && (i >= s->ncl_owner || s->cl_owner[i] == SINK_NO_OWNER))
            return false;
    for (size_t i = 0; i < n; i++) {
        size_t op = s->cl_owner[i];
        if (!cluster_refused_oom(s->cl, i))
            continue;
        if (s->nrefused++ == 0)
            snprintf(s->oom_first, sizeof s->oom_first, "%s (OOM)", cluster_command_name(s->cl, i));
        if (op == SINK_NO_OP)
            s->wm_refused = true;
        else
            batch_mark(&s->b, op);
    }
    return true;
}

int sink_cl_exec(Sink *s)
{
    if (cluster_exec(s->cl) == 0 || (cluster_only_oom(s->cl) && cl_refuse(s)))
        return 0;
    sink_set_err(s, "%s", cluster_errstr(s->cl));
    return -1;
}

/* Record that cluster command i was queued for op owner. */
static void cl_own(Sink *s, size_t i, size_t owner)
{
    size_t cap = s->cl_owner_cap;

    s->cl_owner = xgrow(s->cl_owner, &cap, i + 1, sizeof *s->cl_owner);
    s->cl_owner_cap = cap;
    s->cl_owner[i] = owner;
    s->ncl_owner = i + 1;
}

/* Empty the cluster's queue (and the owners), counting the refreshes in it
 * that the fence refused (their replies are gone after the reset). */
static void cl_reset(Sink *s)
{
    for (size_t i = 0; i < s->ncl_owner && i < cluster_queued(s->cl); i++)
        sink_note_fenced(s, s->cl_owner[i], cluster_reply(s->cl, i));
    cluster_reset(s->cl);
    s->ncl_owner = 0;
}

/* Queue s->argv[0..argc), routed by argv[1], for op s->cl_op. */
static void cl_cmd(Sink *s, size_t argc)
{
    cl_own(s, cluster_append_key(s->cl, 1, (int)argc, s->argv, s->argvlen), s->cl_op);
}

static void cl_key_cmd(Sink *s, const char *cmd, const char *key, size_t len)
{
    sink_argv_reserve(s, 2);
    sink_arg_str(s, 0, cmd);
    sink_arg(s, 1, key, len);
    cl_cmd(s, 2);
}

static const char *cl_del(const Sink *s)
{
    return s->cfg.use_del ? "DEL" : "UNLINK";
}

/* Is r a [cursor, [strings...]] page? */
bool sink_page_ok(const redisReply *r)
{
    if (r == NULL || r->type != REDIS_REPLY_ARRAY || r->elements != 2 ||
        r->element[0]->type != REDIS_REPLY_STRING || r->element[1]->type != REDIS_REPLY_ARRAY)
        return false;
    for (size_t i = 0; i < r->element[1]->elements; i++)
        if (r->element[1]->element[i]->type != REDIS_REPLY_STRING)
            return false;
    return true;
}

/* Delete the members of one page of the tag set (routed by their slots),
 * then, once acknowledged, remove them from the set. */
static int cl_tag_page(Sink *s, const char *tag, size_t len, const redisReply *members)
{
    size_t n = members->elements;

    if (n == 0)
        return 0;
    for (size_t i = 0; i < n; i++)
        cl_key_cmd(s, cl_del(s), members->element[i]->str, members->element[i]->len);
    if (sink_cl_exec(s) < 0)
        return -1;
    sink_argv_reserve(s, n + 2);
    sink_arg_str(s, 0, "SREM");
    sink_arg(s, 1, tag, len);
    for (size_t i = 0; i < n; i++)
        sink_arg(s, 2 + i, members->element[i]->str, members->element[i]->len);
    cl_cmd(s, n + 2);
    return sink_cl_exec(s);
}

/* Invalidate one tag (see the section comment). The queue must be empty. */
static int cl_tag(Sink *s, const char *tag, size_t len)
{
    char cursor[32] = "0";
    const redisReply *r;

    cl_reset(s);
    cl_key_cmd(s, "TYPE", tag, len);
    if (sink_cl_exec(s) < 0)
        return -1;
    r = cluster_reply(s->cl, 0);
    if (r->type != REDIS_REPLY_STATUS) {
        sink_set_err(s, "redis cluster TYPE of a tag set returned an unexpected reply");
        return -1;
    }
    if (strcmp(r->str, "none") == 0)
        return 0;
    if (strcmp(r->str, "set") != 0) { /* another type in the tag namespace */
        cl_reset(s);
        cl_key_cmd(s, cl_del(s), tag, len);
        return sink_cl_exec(s);
    }
    do {
        cl_reset(s);
        sink_argv_reserve(s, 5);
        sink_arg_str(s, 0, "SSCAN");
        sink_arg(s, 1, tag, len);
        sink_arg_str(s, 2, cursor);
        sink_arg_str(s, 3, "COUNT");
        sink_arg_str(s, 4, SINK_SCAN_COUNT);
        cl_cmd(s, 5);
        if (sink_cl_exec(s) < 0)
            return -1;
        r = cluster_reply(s->cl, 0);
        if (!sink_page_ok(r)) {
            sink_set_err(s, "redis cluster SSCAN of a tag set returned an unexpected reply");
            return -1;
        }
        snprintf(cursor, sizeof cursor, "%s", r->element[0]->str);
        if (cl_tag_page(s, tag, len, r->element[1]) < 0)
            return -1;
    } while (strcmp(cursor, "0") != 0);
    cl_reset(s);
    return 0;
}

/* Copy a page of tag-set names out of the cluster's reply (they are
 * applied one by one with cl_tag(), which reuses the queue). */
static int cl_tags_of_page(Sink *s, const redisReply *keys)
{
    size_t n = keys->elements, total = 0, off = 0;
    char *buf;
    size_t *lens = xrealloc(NULL, (n ? n : 1) * sizeof *lens);
    int rc = 0;

    for (size_t i = 0; i < n; i++)
        total += (lens[i] = keys->element[i]->len);
    buf = xrealloc(NULL, total ? total : 1);
    for (size_t i = 0; i < n; i++) {
        memcpy(buf + off, keys->element[i]->str, lens[i]);
        off += lens[i];
    }
    off = 0;
    for (size_t i = 0; i < n && rc == 0; i++) {
        rc = cl_tag(s, buf + off, lens[i]);
        off += lens[i];
    }
    free(buf);
    free(lens);
    return rc;
}

/* SCAN node id for pattern op `op` and apply it to every match. */
static int cl_scan_node(Sink *s, size_t op, int id)
{
    const BatchOp *o = &s->b.ops[op];
    char cursor[32] = "0";

    do {
        const redisReply *r;
        cl_reset(s);
        size_t argc = sink_scan_args(s, cursor, op);

        cl_own(s, cluster_append_node(s->cl, id, (int)argc, s->argv, s->argvlen), SINK_NO_OWNER);
        if (sink_cl_exec(s) < 0)
            return -1;
        r = cluster_reply(s->cl, 0);
        if (!sink_page_ok(r)) {
            sink_set_err(s, "redis cluster node %s: SCAN returned an unexpected reply",
                         cluster_node_addr(s->cl, id));
            return -1;
        }
        snprintf(cursor, sizeof cursor, "%s", r->element[0]->str);
        if (o->action == RULES_INV_TAG_PATTERN) {
            if (cl_tags_of_page(s, r->element[1]) < 0)
                return -1;
            continue;
        }
        for (size_t i = 0; i < r->element[1]->elements; i++) {
            const redisReply *k = r->element[1]->element[i];
            cl_key_cmd(s, o->action == RULES_INV_VERSION_PATTERN ? "INCR" : cl_del(s), k->str,
                       k->len);
        }
        if (sink_cl_exec(s) < 0)
            return -1;
    } while (strcmp(cursor, "0") != 0);
    cl_reset(s);
    return 0;
}

/* Run pattern op `op` on every master of the current map (a copy of the
 * list: a refresh during the walk may change it). */
static int cl_scan(Sink *s, size_t op)
{
    size_t n = cluster_master_count(s->cl);
    int *ids = xrealloc(NULL, (n ? n : 1) * sizeof *ids);
    int rc = 0;

    for (size_t i = 0; i < n; i++)
        ids[i] = cluster_master_id(s->cl, i);
    for (size_t i = 0; i < n && rc == 0; i++)
        rc = cl_scan_node(s, op, ids[i]);
    free(ids);
    return rc;
}

/* End the batch with WAIT on the masters (see cluster_append_wait); with
 * ?replicas=N every master must report N replicas. */
static int cl_wait(Sink *s)
{
    int n = s->cfg.url.replicas;
    int ms = n > 0 ? sink_wait_ms(s) : SINK_CLUSTER_WAIT_MS;
    size_t first = cluster_append_wait(s->cl, n, ms);

    for (size_t i = first; i < cluster_queued(s->cl); i++)
        cl_own(s, i, SINK_NO_OWNER);
    if (sink_cl_exec(s) < 0)
        return -1;
    for (size_t i = first; n > 0 && i < cluster_queued(s->cl); i++) {
        const redisReply *r = cluster_reply(s->cl, i);
        if (r->type == REDIS_REPLY_INTEGER && r->integer >= n)
            continue;
        s->stats.replica_shortfalls++;
        s->shortfall = true;
        sink_set_err(
            s,
            "redis cluster: only %lld of the %d replicas asked for (replicas=%d) acknowledged "
            "the batch on a master within %d ms; it is not confirmed and will be sent again",
            r->type == REDIS_REPLY_INTEGER ? r->integer : 0LL, n, n, ms);
        return -1;
    }
    return 0;
}

/* Queue the watermark and every simple op; run tags and patterns in
 * order, each after what precedes it was acknowledged. */
int sink_cl_flush(Sink *s)
{
    if (!cluster_connected(s->cl) && sink_cl_connect(s) < 0)
        return -1;
    cl_reset(s);
    s->nrefused = 0;
    s->fenced = 0;
    s->wm_refused = false;
    batch_unmark_all(&s->b);
    s->cl_op = SINK_NO_OP;
    if (s->wm_key != NULL) { /* routed by its key, the script's KEYS[1] */
        /* Build the arguments before reading s->argv: they may move it. */
        int argc = (int)sink_watermark_args(s);
        cl_own(s, cluster_append_key(s->cl, 3, argc, s->argv, s->argvlen), SINK_NO_OP);
    }
    for (size_t i = 0; i < s->b.nops; i++) {
        const BatchOp *op = &s->b.ops[i];
        const char *str = batch_str(&s->b, op);
        s->cl_op = i;
        switch (op->action) {
        case RULES_INV_KEY:
            cl_key_cmd(s, cl_del(s), str, op->len);
            break;
        case RULES_INV_VERSION:
            cl_key_cmd(s, "INCR", str, op->len);
            break;
        case RULES_INV_PUBLISH:
            cl_cmd(s, sink_publish_args(s, i));
            break;
        case RULES_INV_REFRESH:
        case RULES_INV_STALE: { /* EVAL: each node learns nothing to forget */
            int argc;
            sink_argv_reserve(s, 10);
            sink_arg_str(s, 0, "EVAL");
            sink_arg_str(s, 1, redis_refresh_lua);
            argc = (int)sink_refresh_args(s, i, 2); /* may move s->argv: before reading it */
            cl_own(s, cluster_append_key(s->cl, 3, argc, s->argv, s->argvlen), i);
            break;
        }
        case RULES_INV_TAG:
            if (sink_cl_exec(s) < 0 || cl_tag(s, str, op->len) < 0)
                return -1;
            break;
        case RULES_INV_PATTERN:
        case RULES_INV_TAG_PATTERN:
        case RULES_INV_VERSION_PATTERN:
            if (sink_cl_exec(s) < 0 || cl_scan(s, i) < 0)
                return -1;
            break;
        }
    }
    if (cl_wait(s) < 0)
        return -1;
    cl_reset(s); /* counts the fenced refreshes of the last exec */
    return 0;
}
