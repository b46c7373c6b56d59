/*
 * audit_cmd.c — `walbust audit`: check the audited keys present in Redis
 * against the database, on demand (docs/audit.md, docs/cli.md).
 *
 * For every Redis target and every rule with an "audit", SCAN the audit
 * key's pattern (its placeholders widened to `*`), then check each key
 * found the sound way (audit_check.h): a key is stale only when it differs
 * from the database and still holds the same value after the running
 * walbust confirmed past the database read. Prints each stale key and a
 * summary. Exit 0: nothing stale; 1: stale keys found; 2: usage or
 * configuration error, or the audit could not be completed (a server
 * failed, or walbust's confirmed position did not pass a read in time, so
 * a difference could not be verified).
 */
#include <cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "audit.h"
#include "audit_check.h"
#include "cmds.h"
#include "lsn.h"
#include "mem.h"
#include "redisurl.h"
#include "sink.h"

#define AUDIT_CMD_WAIT_MS 10000
#define AUDIT_SHOW_BYTES 200

typedef struct Tally {
    unsigned long long checked, clean, stale, skipped, unverified;
} Tally;

typedef struct AuditCmd {
    const Config *cfg;
    const Rules *rules;
    Tally t;
    long budget; /* keys still to check; < 0: no limit */
    /* Keys skipped because the audit's SQL refused their values, and the
     * first of them with its rule and PostgreSQL's message. */
    unsigned long long refused;
    size_t refused_rule;
    char refused_key[600], refusal[256];
} AuditCmd;

static void print_stale(const AuditCmd *a, const char *target, size_t ri, const char *key,
                        size_t len, const AuditFinding *f)
{
    RulesAuditInfo info;
    char shown_key[600], cached[4 * AUDIT_SHOW_BYTES], db[4 * AUDIT_SHOW_BYTES];
    char p[LSN_TEXT_MAX], conf[LSN_TEXT_MAX];

    (void)rules_audit_info(a->rules, ri, &info);
    audit_show(key, len, 128, shown_key, sizeof shown_key);
    audit_show(f->cached, f->cached_len, AUDIT_SHOW_BYTES, cached, sizeof cached);
    if (f->db != NULL)
        audit_show(f->db, f->db_len, AUDIT_SHOW_BYTES, db, sizeof db);
    else
        snprintf(db, sizeof db, "(no row: the key must not exist)");
    printf("stale: %s at %s (audit of the rule for %s, %s line %d): cached %s, database %s "
           "(read at WAL %s; the key still held the cached value after walbust confirmed %s)\n",
           shown_key, target, info.table, a->cfg->rules, info.line, cached, db,
           lsn_format(f->read_lsn, p), lsn_format(f->confirmed, conf));
}

static void note_refused(AuditCmd *a, size_t ri, const char *key, size_t len, const AuditFinding *f)
{
    a->refused_rule = ri;
    audit_show(key, len, 128, a->refused_key, sizeof a->refused_key);
    snprintf(a->refusal, sizeof a->refusal, "%s", f->refusal);
}

/* Say why keys were skipped when the audit's SQL refused their values. */
static void print_refused(const AuditCmd *a)
{
    RulesAuditInfo info;

    if (a->refused == 0 || !rules_audit_info(a->rules, a->refused_rule, &info))
        return;
    fprintf(stderr,
            "walbust audit: %llu key%s skipped: the audit's SQL refused the values read from "
            "%s, e.g. %s (audit key \"%s\" of the rule for %s, %s line %d: %s); such a key "
            "matches the audit key but is likely a key of another template, and is not "
            "checked (give the audit key literal text no other key has; docs/audit.md)\n",
            a->refused, a->refused == 1 ? "" : "s", a->refused == 1 ? "it" : "them", a->refused_key,
            info.key, info.table, a->cfg->rules, info.line, a->refusal);
}

/* Check every key of k against rule ri. -1 when a server failed. */
static int check_keys(AuditCmd *a, AuditChecker *ck, const char *target, size_t ri,
                      const AuditKeys *k)
{
    for (size_t i = 0; i < k->n && a->budget != 0; i++) {
        AuditFinding f;
        if (audit_check_key(ck, a->rules, ri, k->keys[i], k->lens[i], &f) != 0) {
            fprintf(stderr, "walbust audit: %s: %s\n", target, audit_checker_errstr(ck));
            audit_finding_release(&f);
            return -1;
        }
        if (f.outcome == AUDIT_OUT_SKIPPED) {
            a->t.skipped++;
            if (f.refused && a->refused++ == 0)
                note_refused(a, ri, k->keys[i], k->lens[i], &f);
            audit_finding_release(&f);
            continue;
        }
        a->t.checked++;
        a->budget -= a->budget > 0;
        if (f.outcome == AUDIT_OUT_CLEAN)
            a->t.clean++;
        else if (f.outcome == AUDIT_OUT_STALE)
            a->t.stale++, print_stale(a, target, ri, k->keys[i], k->lens[i], &f);
        else
            a->t.unverified++;
        audit_finding_release(&f);
    }
    return 0;
}

/* SCAN rule ri's audit pattern on one target and check what it finds. */
static int audit_rule(AuditCmd *a, Sink *sink, AuditChecker *ck, const char *target, size_t ri)
{
    char *pattern = rules_audit_pattern(a->rules, ri);
    SinkScan sc = {0};
    AuditKeys k = {0};
    int rc = 0;

    while (rc == 0 && !sc.done && a->budget != 0) {
        if (sink_scan_page(sink, &sc, pattern, audit_keys_take, &k) != 0) {
            fprintf(stderr, "walbust audit: %s: %s\n", target, sink_errstr(sink));
            rc = -1;
            break;
        }
        rc = check_keys(a, ck, target, ri, &k);
        audit_keys_clear(&k);
    }
    audit_keys_free(&k);
    free(pattern);
    return rc;
}

static int audit_target(AuditCmd *a, const char *url, const char *watermark)
{
    SinkConfig sc = {0};
    char err[512], target[300];
    Sink *sink;
    AuditChecker *ck;
    int rc = 0;

    if (redisurl_parse(url, &sc.url, err, sizeof err) != 0) {
        fprintf(stderr, "walbust audit: %s\n", err);
        return -1;
    }
    redisurl_describe(&sc.url, target, sizeof target);
    sink = sink_new(&sc);
    if (sink_config_error(sink) != NULL || sink_connect(sink) != 0) {
        fprintf(stderr, "walbust audit: redis target %s: %s\n", target,
                sink_config_error(sink) ? sink_config_error(sink) : sink_errstr(sink));
        sink_free(sink);
        return -1;
    }
    ck = audit_checker_new(sink, a->cfg->pg, watermark, AUDIT_CMD_WAIT_MS, NULL);
    for (size_t ri = 0; rc == 0 && ri < rules_rule_count(a->rules); ri++) {
        RulesAuditInfo info;
        if (rules_audit_info(a->rules, ri, &info))
            rc = audit_rule(a, sink, ck, target, ri);
    }
    audit_checker_free(ck);
    sink_free(sink);
    return rc;
}

int cmd_audit(const Config *cfg)
{
    AuditCmd a = {.cfg = cfg, .budget = cfg->sample > 0 ? cfg->sample : -1};
    char watermark[200], cons[160];
    Rules *rules = cmd_load_rules(cfg->rules, stderr);
    int rc = 0;

    if (rules == NULL)
        return 2;
    if (!rules_has_audits(rules)) {
        fprintf(stderr,
                "walbust audit: %s has no rule with an \"audit\"; add one, e.g. \"audit\": "
                "{\"key\": \"product:{id}\", \"sql\": \"SELECT row_to_json(p)::text FROM "
                "public.products p WHERE id = $1\", \"args\": [\"{id}\"], \"compare\": \"json\"} "
                "(docs/audit.md)\n",
                cfg->rules);
        rules_free(rules);
        return 2;
    }
    a.rules = rules;
    snprintf(watermark, sizeof watermark, "walbust:confirmed:%s", cfg->slot);
    for (int i = 0; rc == 0 && i < cfg->nredis && a.budget != 0; i++)
        rc = audit_target(&a, cfg->redis[i], watermark);
    audit_consistency(a.t.checked, a.t.stale, cons, sizeof cons);
    printf("audited %llu key%s: %llu clean, %llu stale, %llu unverified; %llu skipped (absent, "
           "lease or stale markers, not strings, not checkable); consistency: %s\n",
           a.t.checked, a.t.checked == 1 ? "" : "s", a.t.clean, a.t.stale, a.t.unverified,
           a.t.skipped, cons);
    print_refused(&a);
    if (a.t.unverified > 0)
        fprintf(stderr,
                "walbust audit: %llu key%s differed from the database but walbust's confirmed "
                "position (%s) did not pass the database read within %d s, so they could not "
                "be verified; is walbust running with --slot %s against this Redis?\n",
                a.t.unverified, a.t.unverified == 1 ? "" : "s", watermark, AUDIT_CMD_WAIT_MS / 1000,
                cfg->slot);
    rules_free(rules);
    if (a.t.stale > 0)
        return 1;
    return rc != 0 || a.t.unverified > 0 ? 2 : 0;
}

/* ---- walbust status: the audit's counts ------------------------------------ */

typedef struct Counts {
    cJSON *fields; /* the hash walbust:audit:<slot> as an object */
} Counts;

static int take_hash(void *arg, const redisReply *r)
{
    Counts *c = arg;

    if (r->type != REDIS_REPLY_ARRAY || r->elements % 2 != 0)
        return -1;
    for (size_t i = 0; i + 1 < r->elements; i += 2) {
        const redisReply *k = r->element[i], *v = r->element[i + 1];
        char name[256];
        cJSON *prev;
        double add;
        if (k->type != REDIS_REPLY_STRING || v->type != REDIS_REPLY_STRING)
            continue;
        snprintf(name, sizeof name, "%.*s", (int)k->len, k->str);
        add = strtod(v->str, NULL);
        prev = cJSON_GetObjectItemCaseSensitive(c->fields, name);
        if (prev != NULL)
            cJSON_SetNumberValue(prev, prev->valuedouble + add);
        else
            cJSON_AddNumberToObject(c->fields, name, add);
    }
    return 0;
}

/* "public.t 99.9% (3.0 nines): 1 stale in 1000 checks; ..." per table. */
static void table_lines(const cJSON *fields, char *out, size_t n)
{
    const cJSON *it;
    size_t o = 0;

    out[0] = '\0';
    cJSON_ArrayForEach(it, fields)
    {
        char stale_name[300], cons[160];
        const cJSON *st;
        if (strncmp(it->string, "checked:", 8) != 0 || o >= n)
            continue;
        snprintf(stale_name, sizeof stale_name, "stale:%s", it->string + 8);
        st = cJSON_GetObjectItemCaseSensitive(fields, stale_name);
        audit_consistency((uint64_t)it->valuedouble, st ? (uint64_t)st->valuedouble : 0, cons,
                          sizeof cons);
        o += (size_t)snprintf(out + o, n - o, "%s%s %s", o ? "; " : "", it->string + 8, cons);
    }
}

void cmd_audit_status(const Config *cfg, const Rules *rules, cJSON *obj)
{
    Counts c = {cJSON_CreateObject()};
    char key[200], cons[160], tables[1024], err[512];
    const char *failed = NULL;
    double checked, stale;

    if (c.fields == NULL)
        mem_oom();
    if (rules == NULL || !rules_has_audits(rules)) {
        cJSON_Delete(c.fields);
        return;
    }
    snprintf(key, sizeof key, "walbust:audit:%s", cfg->slot);
    for (int i = 0; i < cfg->nredis; i++) {
        SinkConfig sc = {.connect_timeout_ms = 1000, .command_timeout_ms = 2000};
        const char *argv[2] = {"HGETALL", key};
        size_t lens[2] = {7, strlen(key)};
        Sink *s;
        if (redisurl_parse(cfg->redis[i], &sc.url, err, sizeof err) != 0) {
            failed = err;
            continue;
        }
        s = sink_new(&sc);
        if (sink_call(s, 1, 2, argv, lens, take_hash, &c) != 0) {
            snprintf(err, sizeof err, "%s", sink_errstr(s));
            failed = err;
        }
        sink_free(s);
    }
    checked = cJSON_GetNumberValue(cJSON_GetObjectItemCaseSensitive(c.fields, "checked"));
    stale = cJSON_GetNumberValue(cJSON_GetObjectItemCaseSensitive(c.fields, "stale"));
    checked = checked == checked ? checked : 0; /* NaN: not counted yet */
    stale = stale == stale ? stale : 0;
    audit_consistency((uint64_t)checked, (uint64_t)stale, cons, sizeof cons);
    table_lines(c.fields, tables, sizeof tables);
    cJSON_AddNumberToObject(obj, "audit_checked", checked);
    cJSON_AddNumberToObject(obj, "audit_stale", stale);
    cJSON_AddNumberToObject(obj, "audit_nines", audit_nines((uint64_t)checked, (uint64_t)stale));
    cJSON_AddStringToObject(obj, "audit_consistency", cons);
    if (tables[0] != '\0')
        cJSON_AddStringToObject(obj, "audit_tables", tables);
    if (failed != NULL)
        cJSON_AddStringToObject(obj, "audit_error", failed);
    cJSON_Delete(c.fields);
}
