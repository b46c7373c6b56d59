/*
 * audit_run.c — the audit thread of `walbust run` (see audit_run.h,
 * docs/audit.md).
 *
 * The streaming thread only matches and samples (audit_run_note()) and
 * appends to a bounded queue under a mutex; everything that waits on a
 * server happens here. The thread owns its Redis connections (one Sink per
 * target), its read-only PostgreSQL connection (in each AuditChecker) and
 * its own copy of the rules, read from the file, so a reload in the
 * streaming thread never frees rules this thread is using.
 */
#include "audit_run.h"

#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "audit.h"
#include "audit_check.h"
#include "log.h"
#include "lsn.h"
#include "mem.h"
#include "opts.h"
#include "redisurl.h"
#include "runtime.h"
#include "sink.h"

#define AUDIT_QUEUE_MAX 4096      /* sampled keys waiting for their check */
#define AUDIT_WAIT_MS 10000       /* for the watermark to pass a database read */
#define AUDIT_SHOW_BYTES 200      /* of each value in a log line */
#define AUDIT_SEEN_MAX 4096       /* findings remembered so each is logged once */
#define AUDIT_ERR_LOG_US 60000000 /* at most one failure message a minute */

/* A sampled key and the change that invalidated it. */
typedef struct Sampled {
    char *key;
    size_t len;
    char table[128]; /* the changed table */
    char lsn[LSN_TEXT_MAX];
    uint32_t xid;
    char commit_time[PGTIME_TEXT_MAX];
    int64_t due_us;
} Sampled;

/* Keys of the SCAN page being checked. */
typedef struct Page {
    AuditKeys k;
    size_t next; /* the next of k's keys to check */
} Page;

typedef struct Scan {
    bool active;
    int64_t next_us; /* when the next scan starts */
    int target;
    size_t rule;
    SinkScan sc;
    Page page;
    uint64_t checked, stale;
} Scan;

struct AuditRun {
    /* configuration (owned copies) */
    AuditRunConfig cfg;
    char *conninfo, *rules_path, *slot, **urls;
    Metrics *metrics;

    pthread_t thread;
    bool started;
    volatile sig_atomic_t stop;
    atomic_bool reload;

    /* streaming thread only */
    AuditSampler sampler;
    const Rules *note_rules; /* the rules last seen by audit_run_note() */
    size_t *note_idx;        /* ... the indices of their rules with an audit */
    size_t note_n;

    pthread_mutex_t lock; /* guards the queue */
    Sampled *q;
    size_t qhead, qlen;
    uint64_t dropped;

    /* audit thread only */
    Rules *rules;
    Sink **sinks;
    AuditChecker **checkers;
    char (*targets)[300];
    AuditBucket bucket;
    Scan scan;
    bool scan_turn; /* the scan goes first in this round */
    uint64_t seen[AUDIT_SEEN_MAX];
    size_t nseen;
    int64_t err_logged_us;
    bool refused_logged; /* a key whose values the audit's SQL refused */
    char stats_key[200];
};

/* ---- the streaming thread's side --------------------------------------- */

void audit_run_note(AuditRun *a, const Rules *rules, const char *key, size_t len,
                    const RulesChange *chg)
{
    size_t ri;
    Sampled *s;
    char lbuf[LSN_TEXT_MAX], tbuf[PGTIME_TEXT_MAX];
    const char *lsn, *when;

    if (a == NULL || a->cfg.rate <= 0)
        return;
    if (rules != a->note_rules) {
        free(a->note_idx);
        a->note_idx = audit_index_build(rules, &a->note_n);
        a->note_rules = rules;
    }
    if (a->note_n == 0 || !audit_rule_for_key_in(rules, a->note_idx, a->note_n, key, len, &ri) ||
        !audit_sample(&a->sampler, a->cfg.rate))
        return;
    pthread_mutex_lock(&a->lock);
    if (a->qlen == AUDIT_QUEUE_MAX) {
        a->dropped++;
        pthread_mutex_unlock(&a->lock);
        return;
    }
    s = &a->q[(a->qhead + a->qlen++) % AUDIT_QUEUE_MAX];
    s->key = xstrndup(key, len);
    s->len = len;
    snprintf(s->table, sizeof s->table, "%s", chg->table ? chg->table : "");
    lsn = rules_change_lsn(chg, lbuf);
    when = rules_change_time(chg, tbuf);
    snprintf(s->lsn, sizeof s->lsn, "%s", lsn ? lsn : "");
    s->xid = chg->xid;
    snprintf(s->commit_time, sizeof s->commit_time, "%s", when ? when : "");
    s->due_us = runtime_now_us() + (int64_t)a->cfg.delay_ms * 1000;
    pthread_mutex_unlock(&a->lock);
}

void audit_run_reload(AuditRun *a)
{
    if (a == NULL)
        return;
    a->note_rules = NULL; /* new rules may be allocated where the old were */
    atomic_store(&a->reload, true);
}

/* ---- rules ------------------------------------------------------------- */

/* Read and compile the rules file; NULL (with a warning) when it does not
 * load now (the streaming thread reports the problems). */
static Rules *load_rules(const char *path)
{
    FILE *f = fopen(path, "rb");
    RulesProblems pr = {0};
    char *text = NULL;
    size_t n = 0, cap = 0;
    Rules *r = NULL;

    if (f == NULL) {
        log_warn("audit: could not read the rules file %s", path);
        return NULL;
    }
    for (;;) {
        text = xgrow(text, &cap, n + 65536, 1);
        size_t got = fread(text + n, 1, 65536, f);
        n += got;
        if (got == 0)
            break;
    }
    fclose(f);
    r = rules_parse(text, n, &pr);
    if (r == NULL)
        log_warn("audit: the rules file %s does not load; the audit keeps its rules", path);
    rules_problems_release(&pr);
    free(text);
    return r;
}

static void scan_reset(Scan *s, bool active, int64_t next_us);

static void maybe_reload(AuditRun *a)
{
    Rules *r;

    if (!atomic_exchange(&a->reload, false) || (r = load_rules(a->rules_path)) == NULL)
        return;
    rules_free(a->rules);
    a->rules = r;
    scan_reset(&a->scan, false, runtime_now_us()); /* rule indexes changed: scan anew */
}

/* ---- reporting ---------------------------------------------------------- */

static uint64_t fingerprint(const char *key, size_t klen, const AuditFinding *f)
{
    uint64_t h = UINT64_C(14695981039346656037);

    for (size_t i = 0; i < klen; i++)
        h = (h ^ (unsigned char)key[i]) * UINT64_C(1099511628211);
    h = (h ^ 0xff) * UINT64_C(1099511628211);
    for (size_t i = 0; i < f->cached_len; i++)
        h = (h ^ (unsigned char)f->cached[i]) * UINT64_C(1099511628211);
    return h;
}

/* Has this finding (key, value) been logged? Remembers it if not. */
static bool seen_before(AuditRun *a, uint64_t fp)
{
    for (size_t i = 0; i < a->nseen; i++)
        if (a->seen[i] == fp)
            return true;
    if (a->nseen == AUDIT_SEEN_MAX)
        a->nseen = 0; /* forget the oldest batch: a repeat is logged again */
    a->seen[a->nseen++] = fp;
    return false;
}

static void log_stale(AuditRun *a, int t, const RulesAuditInfo *info, const char *key, size_t len,
                      const AuditFinding *f, const Sampled *why, int healed)
{
    char k[600], v[4 * AUDIT_SHOW_BYTES + 32], d[4 * AUDIT_SHOW_BYTES + 32], change[400];
    char p[LSN_TEXT_MAX], c[LSN_TEXT_MAX];

    audit_show(key, len, 128, k, sizeof k);
    audit_show(f->cached, f->cached_len, AUDIT_SHOW_BYTES, v, sizeof v);
    if (f->db != NULL)
        audit_show(f->db, f->db_len, AUDIT_SHOW_BYTES, d, sizeof d);
    else
        snprintf(d, sizeof d, "(no row: the key must not exist)");
    if (why != NULL)
        snprintf(change, sizeof change,
                 "invalidated by the change to %s at LSN %s, xid %u, committed %s (then filled "
                 "again with older data, or left stale by a change no rule maps to it)",
                 why->table, why->lsn, (unsigned)why->xid, why->commit_time);
    else
        snprintf(change, sizeof change,
                 "found by the background scan, which does not know the change that made it "
                 "stale: either no rule invalidates this key for a change to a table its value "
                 "is built from, or a reader filled it with older data after an invalidation");
    log_event(LOG_LEVEL_WARN, why ? why->lsn : NULL, info->table,
              "audit: stale cache entry %s at %s: cached %s, database %s (read at WAL %s; the "
              "key still held the cached value after walbust confirmed %s); %s; audit of the "
              "rule for %s (rules file line %d)%s",
              k, a->targets[t], v, d, lsn_format(f->read_lsn, p), lsn_format(f->confirmed, c),
              change, info->table, info->line,
              healed > 0    ? "; deleted (--audit-heal)"
              : healed == 0 ? "; not deleted: it changed meanwhile"
                            : "");
}

static void check_failed(AuditRun *a, int t, const char *what)
{
    int64_t now = runtime_now_us();

    if (now - a->err_logged_us < AUDIT_ERR_LOG_US && a->err_logged_us != 0)
        return;
    a->err_logged_us = now;
    log_warn("audit: a check on %s failed: %s (further failures within a minute are not "
             "logged; the audit retries and never affects invalidation)",
             a->targets[t], what);
}

static int ignore_reply(void *arg, const redisReply *r)
{
    (void)arg;
    (void)r;
    return 0;
}

/* Once per run: keys the audit's SQL refuses are skipped, not errors. */
static void note_refused(AuditRun *a, const RulesAuditInfo *info, const char *key, size_t len,
                         const AuditFinding *f)
{
    char k[600];

    if (a->refused_logged)
        return;
    a->refused_logged = true;
    audit_show(key, len, 128, k, sizeof k);
    log_info("audit: %s is not checked: the audit's SQL refused the values read from it (%s); "
             "the audit key \"%s\" of the rule for %s (rules file line %d) matches it, but it "
             "is likely a key of another template; such keys are skipped (logged once; give the "
             "audit key literal text no other key has, docs/audit.md)",
             k, f->refusal, info->key, info->table, info->line);
}

/* Count one check in the target's hash walbust:audit:<slot> (read by
 * walbust status): checked, stale, and the same per table. */
static void count_in_redis(AuditRun *a, int t, const char *table, bool stale)
{
    static const char script[] =
        "redis.call('HINCRBY', KEYS[1], 'checked', 1) "
        "redis.call('HINCRBY', KEYS[1], 'checked:' .. ARGV[1], 1) "
        "if ARGV[2] == '1' then redis.call('HINCRBY', KEYS[1], 'stale', 1) "
        "redis.call('HINCRBY', KEYS[1], 'stale:' .. ARGV[1], 1) end return 0";
    const char *argv[6] = {"EVAL", script, "1", a->stats_key, table, stale ? "1" : "0"};
    size_t lens[6] = {4, sizeof script - 1, 1, strlen(a->stats_key), strlen(table), 1};

    if (sink_call(a->sinks[t], 3, 6, argv, lens, ignore_reply, NULL) != 0)
        check_failed(a, t, sink_errstr(a->sinks[t]));
}

/* Check key against rule ri on target t; count and report. Returns the
 * outcome. */
static AuditOutcome check_on(AuditRun *a, int t, size_t ri, const char *key, size_t len,
                             const Sampled *why)
{
    RulesAuditInfo info;
    AuditFinding f;
    AuditOutcome out;
    int healed = -1;

    if (!rules_audit_info(a->rules, ri, &info))
        return AUDIT_OUT_SKIPPED;
    if (audit_check_key(a->checkers[t], a->rules, ri, key, len, &f) != 0)
        check_failed(a, t, audit_checker_errstr(a->checkers[t]));
    out = f.outcome;
    if (out == AUDIT_OUT_SKIPPED && f.refused)
        note_refused(a, &info, key, len, &f);
    if (out == AUDIT_OUT_CLEAN || out == AUDIT_OUT_STALE) {
        metrics_audit(a->metrics, info.table, out == AUDIT_OUT_STALE);
        count_in_redis(a, t, info.table, out == AUDIT_OUT_STALE);
    }
    if (out == AUDIT_OUT_STALE && !seen_before(a, fingerprint(key, len, &f))) {
        if (a->cfg.heal)
            healed = audit_checker_heal(a->checkers[t], key, len, f.cached, f.cached_len);
        log_stale(a, t, &info, key, len, &f, why, healed);
    } else if (out == AUDIT_OUT_STALE && a->cfg.heal) {
        (void)audit_checker_heal(a->checkers[t], key, len, f.cached, f.cached_len);
    } else if (out == AUDIT_OUT_UNVERIFIED) {
        check_failed(a, t,
                     "walbust's confirmed position did not pass the database read within "
                     "10 s (walbust is lagging): the key is not counted");
    }
    audit_finding_release(&f);
    return out;
}

/* ---- sampled keys ----------------------------------------------------- */

/* Take the queue's head when it is due. */
static bool take_due(AuditRun *a, Sampled *out, int64_t now)
{
    bool got = false;

    pthread_mutex_lock(&a->lock);
    if (a->qlen > 0 && a->q[a->qhead].due_us <= now) {
        *out = a->q[a->qhead];
        a->qhead = (a->qhead + 1) % AUDIT_QUEUE_MAX;
        a->qlen--;
        got = true;
    }
    pthread_mutex_unlock(&a->lock);
    return got;
}

static int64_t next_due(AuditRun *a)
{
    int64_t due = 0;

    pthread_mutex_lock(&a->lock);
    if (a->qlen > 0)
        due = a->q[a->qhead].due_us;
    pthread_mutex_unlock(&a->lock);
    return due;
}

static void check_sampled(AuditRun *a, Sampled *s)
{
    size_t ri;

    if (audit_rule_for_key(a->rules, s->key, s->len, &ri))
        for (int t = 0; t < a->cfg.nurls && !a->stop; t++)
            (void)check_on(a, t, ri, s->key, s->len, s);
    free(s->key);
}

/* ---- the background scan ------------------------------------------------ */

static void page_clear(Page *p)
{
    audit_keys_clear(&p->k);
    p->next = 0;
}

/* Start over (active: now), keeping the page's buffers. */
static void scan_reset(Scan *s, bool active, int64_t next_us)
{
    Page page = s->page;

    page_clear(&page);
    *s = (Scan){.active = active, .next_us = next_us, .page = page};
}

/* The next rule with an audit from ri on (rules_rule_count(): none). */
static size_t next_audited(const Rules *r, size_t ri)
{
    RulesAuditInfo info;

    while (ri < rules_rule_count(r) && !rules_audit_info(r, ri, &info))
        ri++;
    return ri;
}

static void scan_end(AuditRun *a, int64_t now)
{
    Scan *s = &a->scan;

    if (s->checked > 0 || s->stale > 0)
        log_info("audit: background scan done: %llu key%s checked, %llu stale",
                 (unsigned long long)s->checked, s->checked == 1 ? "" : "s",
                 (unsigned long long)s->stale);
    page_clear(&s->page);
    s->active = false;
    s->next_us = now + (int64_t)a->cfg.scan_interval_s * 1000000;
}

/* Move the scan on to its next page (next rule, next target). */
static void scan_fetch(AuditRun *a, int64_t now)
{
    Scan *s = &a->scan;
    char *pattern;

    page_clear(&s->page);
    if (s->sc.done) {
        s->rule = next_audited(a->rules, s->rule + 1);
        s->sc = (SinkScan){0};
        if (s->rule >= rules_rule_count(a->rules)) {
            s->rule = next_audited(a->rules, 0);
            if (++s->target >= a->cfg.nurls) {
                scan_end(a, now);
                return;
            }
        }
    }
    pattern = rules_audit_pattern(a->rules, s->rule);
    if (pattern == NULL ||
        sink_scan_page(a->sinks[s->target], &s->sc, pattern, audit_keys_take, &s->page.k) != 0) {
        check_failed(a, s->target, pattern ? sink_errstr(a->sinks[s->target]) : "no audit");
        scan_end(a, now); /* tried again after the interval */
    }
    free(pattern);
}

/* One step of the scan: check one key (true), or fetch a page (false). */
static bool scan_step(AuditRun *a, int64_t now)
{
    Scan *s = &a->scan;

    if (!s->active) {
        if (a->cfg.scan_interval_s < 0 || now < s->next_us)
            return false;
        scan_reset(s, true, now);
        s->rule = next_audited(a->rules, 0);
        if (s->rule >= rules_rule_count(a->rules)) {
            scan_end(a, now);
            return false;
        }
    }
    if (s->page.next < s->page.k.n) {
        size_t i = s->page.next++;
        AuditOutcome out =
            check_on(a, s->target, s->rule, s->page.k.keys[i], s->page.k.lens[i], NULL);
        s->checked += out == AUDIT_OUT_CLEAN || out == AUDIT_OUT_STALE;
        s->stale += out == AUDIT_OUT_STALE;
        return true;
    }
    scan_fetch(a, now);
    return false;
}

/* ---- the thread ---------------------------------------------------------- */

static void nap_ms(int ms)
{
    nanosleep(&(struct timespec){ms / 1000, (long)(ms % 1000) * 1000000L}, NULL);
}

static void open_targets(AuditRun *a)
{
    int n = a->cfg.nurls;
    char wm[200];

    a->sinks = xcalloc((size_t)n + 1, sizeof *a->sinks);
    a->checkers = xcalloc((size_t)n + 1, sizeof *a->checkers);
    a->targets = xcalloc((size_t)n + 1, sizeof *a->targets);
    snprintf(wm, sizeof wm, "walbust:confirmed:%s", a->slot);
    for (int t = 0; t < n; t++) {
        SinkConfig sc = {0};
        char err[512];
        if (redisurl_parse(a->urls[t], &sc.url, err, sizeof err) != 0)
            memset(&sc.url, 0, sizeof sc.url); /* run refused it already */
        redisurl_describe(&sc.url, a->targets[t], sizeof a->targets[t]);
        a->sinks[t] = sink_new(&sc);
        a->checkers[t] = audit_checker_new(a->sinks[t], a->conninfo, wm, AUDIT_WAIT_MS, &a->stop);
    }
}

static void *audit_thread(void *arg)
{
    AuditRun *a = arg;

    open_targets(a);
    audit_bucket_init(&a->bucket, a->cfg.max_checks, 1, runtime_now_us());
    /* Let walbust settle before the first scan. */
    a->scan.next_us =
        runtime_now_us() +
        (int64_t)(a->cfg.scan_interval_s < 10 ? a->cfg.scan_interval_s : 10) * 1000000;
    while (!a->stop) {
        int64_t now = runtime_now_us(), due;
        Sampled s;
        maybe_reload(a);
        if (a->rules == NULL || !rules_has_audits(a->rules)) {
            nap_ms(200);
            continue;
        }
        if (audit_bucket_wait_us(&a->bucket, now) > 0) {
            nap_ms(10);
            continue;
        }
        /* Samples and the scan take turns, so neither starves the other. */
        a->scan_turn = !a->scan_turn;
        if (!a->scan_turn && take_due(a, &s, now)) {
            (void)audit_bucket_take(&a->bucket, now);
            check_sampled(a, &s);
        } else if (scan_step(a, now)) {
            (void)audit_bucket_take(&a->bucket, now);
        } else if (a->scan_turn && take_due(a, &s, now)) {
            (void)audit_bucket_take(&a->bucket, now);
            check_sampled(a, &s);
        } else if (a->scan.active) {
            nap_ms(10); /* a page was fetched: pace SCAN at ~100 pages a second */
        } else {
            due = next_due(a);
            nap_ms(due == 0 || due - now > 50000 ? 50 : (int)((due - now) / 1000) + 1);
        }
    }
    return NULL;
}

AuditRun *audit_run_start(const AuditRunConfig *cfg, Metrics *metrics, char *err, size_t errlen)
{
    AuditRun *a = xcalloc(1, sizeof *a);

    err[0] = '\0';
    a->cfg = *cfg;
    a->conninfo = xstrdup(cfg->conninfo ? cfg->conninfo : "");
    a->rules_path = xstrdup(cfg->rules_path);
    a->slot = xstrdup(cfg->slot);
    a->urls = xcalloc((size_t)cfg->nurls + 1, sizeof *a->urls);
    for (int i = 0; i < cfg->nurls; i++)
        a->urls[i] = xstrdup(cfg->urls[i]);
    a->cfg.nurls = cfg->nurls;
    a->metrics = metrics;
    a->q = xcalloc(AUDIT_QUEUE_MAX, sizeof *a->q);
    snprintf(a->stats_key, sizeof a->stats_key, "walbust:audit:%s", cfg->slot);
    pthread_mutex_init(&a->lock, NULL);
    a->rules = load_rules(cfg->rules_path);
    if (a->rules != NULL && pthread_create(&a->thread, NULL, audit_thread, a) == 0) {
        a->started = true;
        return a;
    }
    snprintf(err, errlen, "could not start the audit thread");
    audit_run_stop(a);
    return NULL;
}

void audit_run_stop(AuditRun *a)
{
    Sampled s;

    if (a == NULL)
        return;
    a->stop = 1;
    if (a->started)
        pthread_join(a->thread, NULL);
    while (take_due(a, &s, INT64_MAX))
        free(s.key);
    if (a->dropped > 0)
        log_info("audit: %llu sampled key%s not checked: the queue of %d was full",
                 (unsigned long long)a->dropped, a->dropped == 1 ? "" : "s", AUDIT_QUEUE_MAX);
    for (int t = 0; a->sinks != NULL && t < a->cfg.nurls; t++) {
        audit_checker_free(a->checkers[t]);
        sink_free(a->sinks[t]);
    }
    audit_keys_free(&a->scan.page.k);
    free(a->note_idx);
    free(a->sinks);
    free(a->checkers);
    free(a->targets);
    for (int i = 0; i < a->cfg.nurls; i++)
        free(a->urls[i]);
    free(a->urls);
    rules_free(a->rules);
    pthread_mutex_destroy(&a->lock);
    free(a->q);
    free(a->conninfo);
    free(a->rules_path);
    free(a->slot);
    free(a);
}

AuditRun *audit_run_from_config(const Config *c, const Rules *rules, Metrics *metrics)
{
    AuditRunConfig ac = {c->pg,
                         c->redis,
                         c->nredis,
                         c->rules,
                         c->slot,
                         0.01,
                         c->audit_delay > 0 ? (int)c->audit_delay : 1000,
                         c->audit_max_checks > 0 ? (int)c->audit_max_checks : 20,
                         c->audit_no_scan             ? -1
                         : c->audit_scan_interval > 0 ? (int)c->audit_scan_interval
                                                      : 300,
                         c->audit_heal};
    AuditRun *a;
    char err[256];

    if (!audit_parse_rate(c->audit_rate, &ac.rate))
        ac.rate = 0.01;
    if (ac.rate <= 0 && ac.scan_interval_s < 0)
        return NULL; /* --audit-rate 0 --audit-no-scan: off */
    a = audit_run_start(&ac, metrics, err, sizeof err);
    if (a == NULL)
        log_warn("audit: %s; walbust runs without it", err);
    else if (rules_has_audits(rules))
        log_info("audit: checking %g%% of the audited keys walbust invalidates, %d ms later%s; "
                 "at most %d checks a second%s",
                 ac.rate * 100, ac.delay_ms,
                 ac.scan_interval_s < 0 ? "; no background scan" : ", and scanning Redis",
                 ac.max_checks, ac.heal ? "; deleting stale entries (--audit-heal)" : "");
    return a;
}
