/*
 * audit_check.c — one audit check with its I/O (see audit_check.h).
 *
 * The key is read with a small script (TYPE, then GET for a string) so a
 * key of another type is told apart from an error on every target form
 * (a Cluster fails a batch on any error reply, WRONGTYPE included).
 */
#include "audit_check.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "audit.h"
#include "lookup_exec.h"
#include "lsn.h"
#include "mem.h"
#include "runtime.h"

#define AUDIT_PG_TIMEOUT_MS 5000
#define AUDIT_POLL_MS 20

/* {0}: absent; {2}: not a string; {1, value}. */
static const char read_script[] = "local t = redis.call('TYPE', KEYS[1])['ok'] "
                                  "if t == 'none' then return {0} end "
                                  "if t ~= 'string' then return {2} end "
                                  "return {1, redis.call('GET', KEYS[1])}";

static const char heal_script[] = "if redis.call('GET', KEYS[1]) == ARGV[1] then "
                                  "return redis.call('UNLINK', KEYS[1]) end return 0";

struct AuditChecker {
    Sink *sink;
    LookupExec *db;
    char *watermark_key;
    int wait_ms;
    const volatile sig_atomic_t *stop;
    char errstr[1024];
};

AuditChecker *audit_checker_new(Sink *sink, const char *conninfo, const char *watermark_key,
                                int wait_ms, const volatile sig_atomic_t *stop)
{
    AuditChecker *c = xcalloc(1, sizeof *c);

    c->sink = sink;
    c->db = lookup_exec_new(conninfo, AUDIT_PG_TIMEOUT_MS);
    lookup_exec_set_name(c->db, "walbust audit");
    c->watermark_key = xstrdup(watermark_key);
    c->wait_ms = wait_ms;
    c->stop = stop;
    return c;
}

void audit_checker_free(AuditChecker *c)
{
    if (c == NULL)
        return;
    lookup_exec_free(c->db);
    free(c->watermark_key);
    free(c);
}

const char *audit_checker_errstr(const AuditChecker *c)
{
    return c->errstr;
}

void audit_finding_release(AuditFinding *f)
{
    free(f->cached);
    free(f->db);
    memset(f, 0, sizeof *f);
}

/* One key read: kind, and the value (owned) for a string. */
typedef struct KeyRead {
    AuditKeyKind kind;
    char *val;
    size_t len;
} KeyRead;

static int take_read(void *arg, const redisReply *r)
{
    KeyRead *k = arg;

    if (r->type != REDIS_REPLY_ARRAY || r->elements < 1 ||
        r->element[0]->type != REDIS_REPLY_INTEGER)
        return -1;
    k->kind = r->element[0]->integer == 0   ? AUDIT_KEY_ABSENT
              : r->element[0]->integer == 2 ? AUDIT_KEY_NOT_STR
                                            : AUDIT_KEY_VALUE;
    if (k->kind == AUDIT_KEY_VALUE) {
        if (r->elements != 2 || r->element[1]->type != REDIS_REPLY_STRING)
            return -1;
        k->len = r->element[1]->len;
        k->val = xmalloc(k->len + 1);
        memcpy(k->val, r->element[1]->str, k->len);
        k->val[k->len] = '\0';
    }
    return 0;
}

static int read_key(AuditChecker *c, const char *key, size_t len, KeyRead *k)
{
    const char *argv[4] = {"EVAL", read_script, "1", key};
    size_t lens[4] = {4, sizeof read_script - 1, 1, len};

    memset(k, 0, sizeof *k);
    if (sink_call(c->sink, 3, 4, argv, lens, take_read, k) != 0) {
        snprintf(c->errstr, sizeof c->errstr, "could not read the key: %s",
                 sink_errstr(c->sink)[0] ? sink_errstr(c->sink) : "unexpected reply");
        free(k->val);
        k->val = NULL;
        return -1;
    }
    return 0;
}

static int take_lsn(void *arg, const redisReply *r)
{
    uint64_t *lsn = arg;
    char text[LSN_TEXT_MAX];

    *lsn = 0;
    if (r->type == REDIS_REPLY_NIL)
        return 0;
    if (r->type != REDIS_REPLY_STRING || r->len >= sizeof text)
        return -1;
    memcpy(text, r->str, r->len);
    text[r->len] = '\0';
    return lsn_parse(text, lsn) ? 0 : -1;
}

/* Wait until the watermark is at or past lsn. 1 reached, 0 not in time. */
static int wait_confirmed(AuditChecker *c, uint64_t lsn, uint64_t *seen)
{
    const char *argv[2] = {"GET", c->watermark_key};
    size_t lens[2] = {3, strlen(c->watermark_key)};
    int64_t deadline = runtime_now_us() + (int64_t)c->wait_ms * 1000;

    for (;;) {
        if (sink_call(c->sink, 1, 2, argv, lens, take_lsn, seen) != 0) {
            snprintf(c->errstr, sizeof c->errstr, "could not read the watermark %s: %s",
                     c->watermark_key, sink_errstr(c->sink));
            return -1;
        }
        if (*seen >= lsn)
            return 1;
        if (runtime_now_us() >= deadline || (c->stop != NULL && *c->stop))
            return 0;
        nanosleep(&(struct timespec){0, AUDIT_POLL_MS * 1000000L}, NULL);
    }
}

/* The database value through rule ri's audit. rows > 1: not checkable. */
static int read_db(AuditChecker *c, const Rules *r, size_t ri, const RulesAuditArgs *args,
                   LookupAuditRead *rd)
{
    if (lookup_exec_audit(c->db, r, ri, args, rd) != 0) {
        snprintf(c->errstr, sizeof c->errstr, "%s", lookup_exec_errstr(c->db));
        return -1;
    }
    return 0;
}

static AuditKey key_of(const KeyRead *k)
{
    return (AuditKey){k->kind, k->val, k->len};
}

static AuditDb db_of(const LookupAuditRead *rd)
{
    return (AuditDb){rd->value == NULL, rd->value, rd->len};
}

static const char refused_why[] =
    "the audit's SQL refused the values read from the key (is it a key of another template that "
    "the audit key also matches?)";

/* The database refused the values (rd->refused): skipped, never a finding. */
static void skip_refused(AuditFinding *f, const LookupAuditRead *rd)
{
    f->outcome = AUDIT_OUT_SKIPPED;
    f->why = refused_why;
    f->refused = true;
    snprintf(f->refusal, sizeof f->refusal, "%s", rd->refusal);
}

static const char *skip_reason(const KeyRead *k)
{
    if (k->kind == AUDIT_KEY_ABSENT)
        return "the key does not exist";
    if (k->kind == AUDIT_KEY_NOT_STR)
        return "the key is not a string";
    return "the key holds a lease or stale marker";
}

/* Steps 3: after confirmed >= P, the key and (if still V) the database
 * again. */
static int second_read(AuditChecker *c, const Rules *r, size_t ri, bool json, const char *key,
                       size_t len, const RulesAuditArgs *args, const KeyRead *v1, AuditFinding *f)
{
    KeyRead v2;
    LookupAuditRead d2;
    AuditKey a1 = key_of(v1), a2;
    AuditDb db2;
    int w = wait_confirmed(c, f->read_lsn, &f->confirmed);

    if (w <= 0) {
        f->outcome = w == 0 ? AUDIT_OUT_UNVERIFIED : AUDIT_OUT_ERROR;
        return w == 0 ? 0 : -1;
    }
    if (read_key(c, key, len, &v2) != 0)
        return -1;
    a2 = key_of(&v2);
    f->outcome = AUDIT_OUT_CLEAN;
    if (audit_second(json, &a1, &a2, NULL) == AUDIT_VERIFY) {
        if (read_db(c, r, ri, args, &d2) != 0) {
            free(v2.val);
            return -1;
        }
        db2 = db_of(&d2);
        if (d2.refused) /* its rows 0 is not "no row": never stale */
            skip_refused(f, &d2);
        else if (d2.rows <= 1 && audit_second(json, &a1, &a2, &db2) == AUDIT_STALE)
            f->outcome = AUDIT_OUT_STALE;
        lookup_audit_read_release(&d2);
    }
    free(v2.val);
    return 0;
}

int audit_check_key(AuditChecker *c, const Rules *r, size_t ri, const char *key, size_t len,
                    AuditFinding *f)
{
    RulesAuditInfo info;
    RulesAuditArgs args;
    KeyRead v1 = {0};
    LookupAuditRead d1 = {0};
    AuditKey a1;
    AuditDb db1;
    int rc = 0, m;

    memset(f, 0, sizeof *f);
    f->outcome = AUDIT_OUT_SKIPPED;
    if (len >= 8 && memcmp(key, "walbust:", 8) == 0) {
        f->why = "walbust's own key (watermark, slot mark, fence, audit counts)";
        return 0;
    }
    if (!rules_audit_info(r, ri, &info) || (m = rules_audit_match(r, ri, key, len, &args)) == 0) {
        f->why = "the key does not match the audit key";
        return 0;
    }
    if (m < 0) {
        f->why = "the key splits into the audit key's values in more than one way";
        return 0;
    }
    if (read_key(c, key, len, &v1) != 0) {
        rc = -1;
        goto cleanup;
    }
    a1 = key_of(&v1);
    if (audit_first(info.json, &a1, &(AuditDb){true, NULL, 0}) == AUDIT_SKIP) {
        f->why = skip_reason(&v1);
        goto cleanup;
    }
    if (read_db(c, r, ri, &args, &d1) != 0) {
        rc = -1;
        goto cleanup;
    }
    if (d1.refused) {
        skip_refused(f, &d1);
        goto cleanup;
    }
    if (d1.rows > 1) {
        f->why = "the audit's SQL returned more than one row";
        goto cleanup;
    }
    f->read_lsn = d1.lsn;
    db1 = db_of(&d1);
    f->outcome = AUDIT_OUT_CLEAN;
    if (audit_first(info.json, &a1, &db1) == AUDIT_VERIFY)
        rc = second_read(c, r, ri, info.json, key, len, &args, &v1, f);
    if (rc == 0 && (f->outcome == AUDIT_OUT_STALE || f->outcome == AUDIT_OUT_UNVERIFIED)) {
        f->cached = v1.val;
        f->cached_len = v1.len;
        v1.val = NULL;
        f->db = d1.value;
        f->db_len = d1.len;
        d1.value = NULL;
    }
cleanup:
    if (rc != 0)
        f->outcome = AUDIT_OUT_ERROR;
    free(v1.val);
    lookup_audit_read_release(&d1);
    rules_audit_args_release(&args);
    return rc;
}

static int take_int(void *arg, const redisReply *r)
{
    if (r->type != REDIS_REPLY_INTEGER)
        return -1;
    *(long long *)arg = r->integer;
    return 0;
}

int audit_checker_heal(AuditChecker *c, const char *key, size_t len, const char *value, size_t vlen)
{
    const char *argv[5] = {"EVAL", heal_script, "1", key, value};
    size_t lens[5] = {4, sizeof heal_script - 1, 1, len, vlen};
    long long n = 0;

    if (sink_call(c->sink, 3, 5, argv, lens, take_int, &n) != 0) {
        snprintf(c->errstr, sizeof c->errstr, "could not delete the stale key: %s",
                 sink_errstr(c->sink));
        return -1;
    }
    return n > 0 ? 1 : 0;
}

/* Without the arguments: no allocation (the streaming thread asks this of
 * every key it invalidates, sampled or not). */
static bool rule_matches(const Rules *r, size_t i, const char *key, size_t len)
{
    return rules_audit_match(r, i, key, len, NULL) == 1;
}

bool audit_rule_for_key(const Rules *r, const char *key, size_t len, size_t *ri)
{
    for (size_t i = 0; i < rules_rule_count(r); i++) {
        if (rule_matches(r, i, key, len)) {
            *ri = i;
            return true;
        }
    }
    return false;
}

size_t *audit_index_build(const Rules *r, size_t *n)
{
    size_t *idx = xcalloc(rules_rule_count(r) + 1, sizeof *idx);
    RulesAuditInfo info;

    *n = 0;
    for (size_t i = 0; i < rules_rule_count(r); i++)
        if (rules_audit_info(r, i, &info))
            idx[(*n)++] = i;
    return idx;
}

bool audit_rule_for_key_in(const Rules *r, const size_t *idx, size_t n, const char *key, size_t len,
                           size_t *ri)
{
    for (size_t k = 0; k < n; k++) {
        if (rule_matches(r, idx[k], key, len)) {
            *ri = idx[k];
            return true;
        }
    }
    return false;
}

int audit_keys_take(void *arg, const redisReply *page)
{
    AuditKeys *k = arg;

    for (size_t i = 0; i < page->elements; i++) {
        size_t cap = k->cap;
        k->keys = xgrow(k->keys, &cap, k->n + 1, sizeof *k->keys);
        k->lens = xgrow(k->lens, &k->cap, k->n + 1, sizeof *k->lens);
        k->keys[k->n] = xstrndup(page->element[i]->str, page->element[i]->len);
        k->lens[k->n++] = page->element[i]->len;
    }
    return 0;
}

void audit_keys_clear(AuditKeys *k)
{
    for (size_t i = 0; i < k->n; i++)
        free(k->keys[i]);
    k->n = 0;
}

void audit_keys_free(AuditKeys *k)
{
    audit_keys_clear(k);
    free(k->keys);
    free(k->lens);
    *k = (AuditKeys){0};
}
