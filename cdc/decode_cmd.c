/*
 * decode_cmd.c — `walbust decode`: committed changes as JSON lines.
 *
 * Reads an existing slot without ever confirming (so a second run shows the
 * same changes), or, without --slot, a temporary slot that starts now. With
 * --rules each line also lists the invalidations the rules would produce: a
 * dry run, nothing is written to Redis. Rules with a lookup run it as the
 * change is printed (on a read-only connection: the database as it is now,
 * not as of the commit); the keys it derives are listed with the rest.
 */
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "change.h"
#include "cmds.h"
#include "log.h"
#include "lookup_exec.h"
#include "lsn.h"
#include "pgo.h"
#include "route.h"
#include "runtime.h"
#include "mem.h"

typedef struct Decode {
    const Config *cfg;
    Rules *rules;
    PgoDecoder *dec;
    ChangeBuf cbuf;
    ChangeTxn txn;
    bool in_txn;
    long changes;
    uint64_t until;
    bool done;
    cJSON *inv; /* invalidations of the current line, with --rules */
    LookupBatch *lk;
    LookupExec *lkx; /* NULL unless a rule has a lookup */
    unsigned lk_widened;
    Route *route; /* with --rules: partitions/children → the rules tables above */
} Decode;

static void print_line(cJSON *o)
{
    char *text = mem_check(cJSON_PrintUnformatted(o));
    fputs(text, stdout);
    fputc('\n', stdout);
    fflush(stdout);
    cJSON_free(text);
    cJSON_Delete(o);
}

static cJSON *line_header(const Decode *d, const char *op)
{
    cJSON *o = mem_check(cJSON_CreateObject());
    cJSON_AddStringToObject(o, "lsn", d->txn.lsn_text);
    cJSON_AddNumberToObject(o, "xid", d->txn.xid);
    cJSON_AddStringToObject(o, "commit_time", d->txn.time_text);
    cJSON_AddStringToObject(o, "op", op);
    return o;
}

static cJSON *value_json(const PgoValue *v)
{
    if (v->kind == PGO_VAL_NULL)
        return cJSON_CreateNull();
    {
        char *s = xmalloc((size_t)v->len + 1);
        cJSON *j;
        memcpy(s, v->data, v->len);
        s[v->len] = '\0';
        j = cJSON_CreateString(s);
        free(s);
        return mem_check(j);
    }
}

/* Images as objects: an old 'K' tuple carries identity columns only. */
static cJSON *tuple_json(const PgoRelation *rel, const PgoTuple *t, char old_kind, cJSON *unchanged)
{
    cJSON *o = mem_check(cJSON_CreateObject());

    for (uint16_t i = 0; i < rel->ncols; i++) {
        const PgoValue *v = &t->values[i];
        if (old_kind == 'K' && !rel->cols[i].key)
            continue;
        if (v->kind == PGO_VAL_UNCHANGED) {
            if (unchanged != NULL)
                cJSON_AddItemToArray(unchanged, cJSON_CreateString(rel->cols[i].name));
            continue;
        }
        cJSON_AddItemToObject(o, rel->cols[i].name, value_json(v));
    }
    return o;
}

static const char *const action_names[] = {
    [RULES_INV_KEY] = "keys",
    [RULES_INV_PATTERN] = "patterns",
    [RULES_INV_TAG] = "tags",
    [RULES_INV_TAG_PATTERN] = "tag_patterns",
    [RULES_INV_VERSION] = "versions",
    [RULES_INV_VERSION_PATTERN] = "version_patterns",
    [RULES_INV_PUBLISH] = "publish",
    [RULES_INV_REFRESH] = "refresh",
    [RULES_INV_STALE] = "stale",
};

static void collect(void *arg, RulesInvAction action, const char *s, size_t len,
                    const char *payload, size_t payload_len)
{
    Decode *d = arg;
    cJSON *arr = cJSON_GetObjectItemCaseSensitive(d->inv, action_names[action]);
    char *copy;

    (void)len;
    if (arr == NULL)
        arr = cJSON_AddArrayToObject(d->inv, action_names[action]);
    for (const cJSON *e = arr->child; action != RULES_INV_PUBLISH && e != NULL; e = e->next)
        if (cJSON_IsString(e) && strcmp(e->valuestring, s) == 0)
            return; /* several lookup rows rendered it */
    if (action == RULES_INV_PUBLISH) {
        cJSON *p = mem_check(cJSON_CreateObject());
        copy = xstrndup(payload, payload_len);
        cJSON_AddStringToObject(p, "channel", s);
        cJSON_AddStringToObject(p, "payload", copy);
        free(copy);
        cJSON_AddItemToArray(arr, p);
        return;
    }
    cJSON_AddItemToArray(arr, cJSON_CreateString(s));
}

static void defer_lookup(void *arg, const RulesLookupCall *call)
{
    lookup_batch_add(((Decode *)arg)->lk, call);
}

static void lookup_widened(void *arg, const char *table, unsigned n)
{
    (void)table;
    ((Decode *)arg)->lk_widened += n;
}

/* Run the change's lookups now and list what they derive. */
static void add_lookups(Decode *d, const RulesChange *chg)
{
    if (d->lkx == NULL || rules_eval_lookups(d->rules, chg, defer_lookup, d) == 0)
        return;
    if (lookup_batch_calls(d->lk) > 0 &&
        lookup_exec_run(d->lkx, d->rules, d->lk, collect, lookup_widened, d, NULL, NULL, NULL))
        cJSON_AddStringToObject(d->inv, "lookup_error", lookup_exec_errstr(d->lkx));
    lookup_batch_clear(d->lk);
}

/* Evaluate chg as walbust run does: against the relation's own rules and
 * those of the partitioned or inheritance parents above it (route.h). */
static void eval_routed(Decode *d, const PgoRelation *rel, const RulesChange *chg,
                        RulesEvalStats *st)
{
    RouteResult rr;
    char err[512];

    if (route_change(d->route, d->rules, rel, &rr, err, sizeof err) != 0) {
        fprintf(stderr, "walbust decode: %s: %s; showing only its own rules\n", rel->qualname,
                err);
        rules_eval(d->rules, chg, collect, d, st);
        add_lookups(d, chg);
        return;
    }
    for (size_t i = 0; i < rr.n; i++) {
        RulesChange c = *chg;
        c.table = rr.targets[i].table;
        c.partition_row = rr.partition_row && chg->op != RULES_TRUNCATE;
        if (rr.targets[i].widen)
            change_widen(chg, rr.targets[i].table, &c);
        rules_eval(d->rules, &c, collect, d, st);
        add_lookups(d, &c);
    }
}

static void add_invalidations(Decode *d, cJSON *line, const PgoRelation *rel,
                              const RulesChange *chg)
{
    RulesEvalStats st = {0};

    if (d->rules == NULL)
        return;
    d->inv = mem_check(cJSON_CreateObject());
    d->lk_widened = 0;
    eval_routed(d, rel, chg, &st);
    st.widened += d->lk_widened;
    if (st.widened > 0)
        cJSON_AddNumberToObject(d->inv, "widened", st.widened);
    cJSON_AddItemToObject(line, "invalidations", d->inv);
    d->inv = NULL;
}

static void on_change(Decode *d, const PgoMsg *m)
{
    static const char *const ops[] = {[PGO_INSERT] = "insert", [PGO_UPDATE] = "update",
                                      [PGO_DELETE] = "delete"};
    const PgoRelation *rel = m->u.change.rel;
    cJSON *o = line_header(d, ops[m->kind]);
    cJSON *unchanged = mem_check(cJSON_CreateArray());
    RulesChange chg;

    cJSON_AddStringToObject(o, "table", rel->qualname);
    if (m->u.change.old_kind != 0)
        cJSON_AddItemToObject(o, "old",
                              tuple_json(rel, &m->u.change.old_tuple, m->u.change.old_kind, NULL));
    if (m->kind != PGO_DELETE)
        cJSON_AddItemToObject(o, "new", tuple_json(rel, &m->u.change.new_tuple, 0, unchanged));
    cJSON_AddItemToObject(o, "unchanged", unchanged);
    change_from_pgo(&d->cbuf, &d->txn, m, &chg);
    add_invalidations(d, o, rel, &chg);
    print_line(o);
    d->changes++;
    if (d->cfg->max_changes > 0 && d->changes >= d->cfg->max_changes)
        d->done = true;
}

static void on_truncate(Decode *d, const PgoMsg *m)
{
    cJSON *o = line_header(d, "truncate");
    cJSON *tables = cJSON_AddArrayToObject(o, "tables");

    for (uint32_t i = 0; i < m->u.truncate.nrels; i++)
        cJSON_AddItemToArray(tables, cJSON_CreateString(m->u.truncate.rels[i]->qualname));
    cJSON_AddBoolToObject(o, "cascade", (m->u.truncate.options & PGO_TRUNCATE_CASCADE) != 0);
    cJSON_AddBoolToObject(o, "restart_identity",
                          (m->u.truncate.options & PGO_TRUNCATE_RESTART_IDENTITY) != 0);
    if (d->rules != NULL) {
        d->inv = mem_check(cJSON_CreateObject());
        for (uint32_t i = 0; i < m->u.truncate.nrels; i++) {
            RulesChange chg;
            change_truncate(&d->txn, m->u.truncate.rels[i], &chg);
            eval_routed(d, m->u.truncate.rels[i], &chg, NULL);
        }
        cJSON_AddItemToObject(o, "invalidations", d->inv);
        d->inv = NULL;
    }
    print_line(o);
}

/* Is buf valid UTF-8 without NUL bytes (printable as a JSON string)?
 * Rejects overlong forms and surrogates, as JSON readers do. */
static bool valid_utf8(const char *buf, size_t len)
{
    const unsigned char *p = (const unsigned char *)buf, *end = p + len;

    while (p < end) {
        unsigned c = *p;
        size_t n;

        if (c == 0)
            return false;
        if (c < 0x80) {
            p++;
            continue;
        }
        n = c >= 0xc2 && c <= 0xdf   ? 1
            : c >= 0xe0 && c <= 0xef ? 2
            : c >= 0xf0 && c <= 0xf4 ? 3
                                     : 0;
        if (n == 0 || (size_t)(end - p) <= n)
            return false;
        for (size_t i = 1; i <= n; i++)
            if ((p[i] & 0xc0) != 0x80)
                return false;
        if ((c == 0xe0 && p[1] < 0xa0) || (c == 0xed && p[1] >= 0xa0) ||
            (c == 0xf0 && p[1] < 0x90) || (c == 0xf4 && p[1] >= 0x90))
            return false;
        p += n + 1;
    }
    return true;
}

/* buf in base64 (RFC 4648, padded), malloc'd; the caller frees. */
static char *base64(const char *buf, size_t len)
{
    static const char tab[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    const unsigned char *p = (const unsigned char *)buf;
    char *out = xmalloc((len + 2) / 3 * 4 + 1), *o = out;

    for (size_t i = 0; i < len; i += 3) {
        unsigned v = (unsigned)p[i] << 16;
        if (i + 1 < len)
            v |= (unsigned)p[i + 1] << 8;
        if (i + 2 < len)
            v |= p[i + 2];
        *o++ = tab[(v >> 18) & 63];
        *o++ = tab[(v >> 12) & 63];
        *o++ = i + 1 < len ? tab[(v >> 6) & 63] : '=';
        *o++ = i + 2 < len ? tab[v & 63] : '=';
    }
    *o = '\0';
    return out;
}

/* The message content: its JSON value when it parses as JSON, else a
 * string when it is UTF-8 text, else base64 under "content_base64". */
static void add_content(cJSON *o, const char *buf, size_t len)
{
    cJSON *content = valid_utf8(buf, len) ? cJSON_ParseWithLength(buf, len) : NULL;
    char *text;

    if (content == NULL && valid_utf8(buf, len)) {
        text = xstrndup(buf, len);
        content = mem_check(cJSON_CreateString(text));
        free(text);
    }
    if (content != NULL) {
        cJSON_AddItemToObject(o, "content", content);
        return;
    }
    text = base64(buf, len);
    cJSON_AddStringToObject(o, "content_base64", text);
    free(text);
}

/* Logical messages of every prefix are printed; the rules only act on
 * those with the prefix "walbust" (sql/walbust.sql). */
static void on_message(Decode *d, const PgoMsg *m)
{
    cJSON *o;
    char err[256];
    bool ours = strcmp(m->u.message.prefix, "walbust") == 0;

    o = line_header(d, "message");
    if (!m->u.message.transactional) {
        /* Not part of a transaction: no commit facts. */
        cJSON_ReplaceItemInObject(o, "lsn", cJSON_CreateString(lsn_format(m->u.message.lsn, err)));
        cJSON_DeleteItemFromObject(o, "xid");
        cJSON_DeleteItemFromObject(o, "commit_time");
    }
    cJSON_AddStringToObject(o, "prefix", m->u.message.prefix);
    cJSON_AddBoolToObject(o, "transactional", m->u.message.transactional);
    add_content(o, m->u.message.content, m->u.message.len);
    if (d->rules != NULL && ours) {
        d->inv = mem_check(cJSON_CreateObject());
        if (change_walbust_message(m->u.message.content, m->u.message.len,
                                   rules_tag_prefix(d->rules), collect, d, err, sizeof err) < 0)
            cJSON_AddStringToObject(d->inv, "error", err);
        cJSON_AddItemToObject(o, "invalidations", d->inv);
        d->inv = NULL;
    }
    print_line(o);
}

/* Returns 0, or -1 on undecodable input (logged). */
static int on_data(Decode *d, const StreamData *data)
{
    PgoMsg m;
    char lsn[LSN_TEXT_MAX];

    if (pgo_decode(d->dec, data->buf, data->len, &m) != 0) {
        log_event(LOG_LEVEL_ERROR, lsn_format(data->wal_start, lsn), NULL,
                  "could not decode pgoutput message: %s", pgo_errstr(d->dec));
        return -1;
    }
    switch (m.kind) {
    case PGO_BEGIN:
        change_txn_begin(&d->txn, &m);
        change_txn_texts(&d->txn); /* every line prints them */
        d->in_txn = true;
        break;
    case PGO_COMMIT:
        d->in_txn = false;
        if (d->until != 0 && m.u.commit.end_lsn >= d->until)
            d->done = true;
        break;
    case PGO_INSERT:
    case PGO_UPDATE:
    case PGO_DELETE:
        on_change(d, &m);
        break;
    case PGO_TRUNCATE:
        on_truncate(d, &m);
        break;
    case PGO_MESSAGE:
        on_message(d, &m);
        break;
    default:
        break;
    }
    return 0;
}

static int decode_loop(Decode *d, Stream *s)
{
    while (!runtime_stop && !d->done) {
        StreamData data;
        int rc = stream_next(s, 500, &data);

        if (rc < 0) {
            log_error("%s", stream_errstr(s));
            return -1;
        }
        if (rc == 0) {
            if (d->until != 0 && !d->in_txn && stream_server_end(s) >= d->until)
                d->done = true;
            continue;
        }
        if (on_data(d, &data) != 0)
            return -2; /* replaying would fail the same way */
    }
    return 0;
}

/* The first connection, tried once: a dry run against a server that is
 * unreachable, refuses or never answers (connect_timeout) fails at once,
 * naming it, instead of retrying for ever like the daemon. A slot active in
 * another process is waited for, as before. Returns 0 when streaming, -1
 * (logged) otherwise. */
static int open_first(Stream *s)
{
    StreamStatus st = stream_connect(s);

    if (st == STREAM_OK)
        st = stream_start(s, 0);
    if (st == STREAM_OK) {
        log_info("streaming from %s", stream_describe(s));
        return 0;
    }
    if (runtime_stop) {
        log_info("stopped while connecting to postgresql");
        return -1;
    }
    if (st == STREAM_BUSY)
        return runtime_open_stream(s, 0, NULL, NULL, NULL);
    log_error("%s", stream_errstr(s));
    return -1;
}

int cmd_decode(const Config *cfg)
{
    Decode d = {.cfg = cfg};
    char tmpslot[64];
    StreamConfig sc = {.conninfo = cfg->pg, .slot = cfg->slot, .publication = cfg->publication,
                       .confirm = false};
    Stream *s;
    int rc = 1;

    if (cfg->until != NULL && !lsn_parse(cfg->until, &d.until)) {
        fprintf(stderr, "walbust decode: --until needs an LSN like 0/16B3748, got \"%s\"\n",
                cfg->until);
        return 2;
    }
    if (cfg->rules != NULL && (d.rules = cmd_load_rules(cfg->rules, stderr)) == NULL)
        return 1;
    d.lk = lookup_batch_new();
    if (rules_has_lookups(d.rules))
        d.lkx = lookup_exec_new(cfg->pg, 5000);
    if (d.rules != NULL)
        d.route = route_new(cfg->pg, cfg->publication);
    if (!cfg->slot_given) {
        snprintf(tmpslot, sizeof tmpslot, "walbust_decode_%d", (int)getpid());
        sc.slot = tmpslot;
        sc.temporary_slot = true;
    }
    runtime_signals();
    d.dec = pgo_new();
    s = stream_new(&sc);
    for (bool first = true;; first = false) {
        int lr;
        if ((first ? open_first(s) : runtime_open_stream(s, 0, NULL, NULL, NULL)) != 0)
            break;
        lr = decode_loop(&d, s);
        if (lr == 0) {
            rc = 0;
            break;
        }
        if (lr == -2)
            break;
        /* A temporary slot dies with its connection: nothing to resume. */
        if (sc.temporary_slot)
            break;
        stream_close(s);
        pgo_reset(d.dec);
    }
    if (runtime_stop && rc != 0 && !d.done)
        rc = 0;
    stream_free(s);
    pgo_free(d.dec);
    change_buf_release(&d.cbuf);
    lookup_exec_free(d.lkx);
    lookup_batch_free(d.lk);
    route_free(d.route);
    rules_free(d.rules);
    return rc;
}
