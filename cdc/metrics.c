/*
 * metrics.c — Prometheus metrics and health endpoints (see metrics.h).
 *
 * Two threads share a Metrics: the daemon's loop records events, and
 * libmicrohttpd's internal polling thread renders them on request. Plain
 * counters and gauges are C11 atomics (relaxed: each value is independent,
 * a scrape needs no cross-metric snapshot). The labelled counters
 * (changes{table,op}, widened{table}, the refresh and stale ones by table),
 * the per-target Redis state and the
 * histogram sit behind one mutex, held only for a lookup-and-add or while
 * rendering copies them into text.
 *
 * A labelled counter map is an array of entries in first-seen order (so the
 * output is stable from scrape to scrape) plus an open-addressing index of
 * entry positions keyed by a hash of the label values, so recording a change
 * costs one hash and usually one comparison however many tables there are.
 *
 * The listening socket is created here rather than by libmicrohttpd so a
 * bind failure can name the address and the errno ("address in use"), and
 * so ":PORT" can mean every interface, IPv6 and IPv4 alike.
 */
#include "metrics.h"
#include "mem.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <microhttpd.h>
#include <netdb.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#ifndef WALBUST_VERSION
#define WALBUST_VERSION "0.0.0"
#endif

#define METRICS_MAX_TARGETS 8

/* Upper bounds (seconds) of walbust_commit_to_ack_seconds; +Inf is implied. */
static const double ack_buckets[] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                     0.5,   1,      2.5,   5,    10,    30,   60,  300};
#define ACK_NBUCKETS (sizeof ack_buckets / sizeof ack_buckets[0])

/* ... and of walbust_batch_stage_seconds: sub-millisecond, where a
 * loopback round trip sits. */
static const double stage_buckets[] = {0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
                                       0.01,    0.025,  0.05,    0.1,    0.25,  1,      10};
#define STAGE_NBUCKETS (sizeof stage_buckets / sizeof stage_buckets[0])
static const char *const stage_names[METRICS_STAGE_COUNT] = {"decode", "batch", "visibility",
                                                             "redis"};

static const char *const action_names[METRICS_ACTION_COUNT] = {"key", "pattern", "tag", "version",
                                                               "publish"};

typedef struct LabelEntry {
    char *a; /* first label value */
    char *b; /* second label value, or NULL for a one-label metric */
    uint32_t hash;
    uint64_t value;
} LabelEntry;

typedef struct LabelMap {
    LabelEntry *entries; /* in first-seen order */
    size_t n, cap;
    uint32_t *index;  /* entry position + 1; 0 = empty slot */
    size_t index_cap; /* power of two, kept at most half full */
} LabelMap;

typedef struct RedisTarget {
    char *name; /* NULL: index never reported */
    bool up;
    char *reason; /* why it is down; NULL: none given */
} RedisTarget;

static const char *const cond_names[METRICS_COND_COUNT] = {"rules_valid", "publication", "slot",
                                                           "lookups"};
static const char *const role_names[METRICS_ROLE_COUNT] = {"starting", "active", "standby"};

struct Metrics {
    atomic_uint_fast64_t counters[METRICS_COUNTER_COUNT];
    atomic_uint_fast64_t actions[METRICS_ACTION_COUNT];
    atomic_uint_fast64_t confirmed, received, server_end;
    atomic_bool postgres_up;
    atomic_uint_fast64_t flush_interval_ns;

    pthread_mutex_t lock; /* guards everything below */
    LabelMap changes;     /* table, op */
    LabelMap widened;     /* table */
    /* The refresh and stale rules' counters, by table. */
    LabelMap refresh_writes, refresh_fallback, stale_marked;
    LabelMap audit_checked, audit_stale; /* table */
    RedisTarget targets[METRICS_MAX_TARGETS];
    bool cond_failed[METRICS_COND_COUNT];
    char *cond_reason[METRICS_COND_COUNT];
    MetricsRole role;
    char *role_detail;
    uint64_t ack_counts[ACK_NBUCKETS + 1]; /* per bucket, not cumulative; last = +Inf */
    double ack_sum;
    uint64_t ack_count;
    uint64_t stage_counts[METRICS_STAGE_COUNT][STAGE_NBUCKETS + 1]; /* as ack_counts */
    double stage_sum[METRICS_STAGE_COUNT];
    uint64_t stage_count;

    struct MHD_Daemon *daemon;
};

/* ---- labelled counter maps ---------------------------------------------- */

static uint32_t label_hash(const char *a, const char *b)
{
    uint32_t h = 2166136261u; /* FNV-1a over a, a NUL, then b */
    for (const unsigned char *p = (const unsigned char *)a; *p; p++)
        h = (h ^ *p) * 16777619u;
    h = (h ^ 0xff) * 16777619u;
    if (b != NULL)
        for (const unsigned char *p = (const unsigned char *)b; *p; p++)
            h = (h ^ *p) * 16777619u;
    return h;
}

static void labelmap_reindex(LabelMap *map, size_t cap)
{
    free(map->index);
    map->index = xmalloc(cap * sizeof *map->index);
    memset(map->index, 0, cap * sizeof *map->index);
    map->index_cap = cap;
    for (size_t i = 0; i < map->n; i++) {
        size_t slot = map->entries[i].hash & (cap - 1);
        while (map->index[slot] != 0)
            slot = (slot + 1) & (cap - 1);
        map->index[slot] = (uint32_t)(i + 1);
    }
}

/* Add n to the entry (a, b), creating it at 0 first if it is new. */
static void labelmap_add(LabelMap *map, const char *a, const char *b, uint64_t n)
{
    uint32_t h = label_hash(a, b);
    size_t slot;

    if (map->index_cap == 0 || (map->n + 1) * 2 > map->index_cap)
        labelmap_reindex(map, map->index_cap ? map->index_cap * 2 : 16);
    slot = h & (map->index_cap - 1);
    for (; map->index[slot] != 0; slot = (slot + 1) & (map->index_cap - 1)) {
        LabelEntry *e = &map->entries[map->index[slot] - 1];
        if (e->hash == h && strcmp(e->a, a) == 0 &&
            (b == NULL ? e->b == NULL : e->b != NULL && strcmp(e->b, b) == 0)) {
            e->value += n;
            return;
        }
    }
    if (map->n == map->cap) {
        map->cap = map->cap ? map->cap * 2 : 16;
        map->entries = xrealloc(map->entries, map->cap * sizeof *map->entries);
    }
    map->entries[map->n] = (LabelEntry){xstrdup(a), b ? xstrdup(b) : NULL, h, n};
    map->index[slot] = (uint32_t)(++map->n);
}

static void labelmap_release(LabelMap *map)
{
    for (size_t i = 0; i < map->n; i++) {
        free(map->entries[i].a);
        free(map->entries[i].b);
    }
    free(map->entries);
    free(map->index);
    memset(map, 0, sizeof *map);
}

/* ---- lifecycle and recording ------------------------------------------- */

Metrics *metrics_new(void)
{
    Metrics *m = xmalloc(sizeof *m);

    memset(m, 0, sizeof *m);
    for (int i = 0; i < METRICS_COUNTER_COUNT; i++)
        atomic_init(&m->counters[i], 0);
    for (int i = 0; i < METRICS_ACTION_COUNT; i++)
        atomic_init(&m->actions[i], 0);
    atomic_init(&m->confirmed, 0);
    atomic_init(&m->received, 0);
    atomic_init(&m->server_end, 0);
    atomic_init(&m->postgres_up, false);
    if (pthread_mutex_init(&m->lock, NULL) != 0) {
        fprintf(stderr, "walbust: could not initialise the metrics mutex\n");
        abort();
    }
    return m;
}

void metrics_free(Metrics *m)
{
    if (m == NULL)
        return;
    if (m->daemon != NULL)
        MHD_stop_daemon(m->daemon); /* joins the HTTP thread, closes the socket */
    labelmap_release(&m->changes);
    labelmap_release(&m->widened);
    labelmap_release(&m->refresh_writes);
    labelmap_release(&m->refresh_fallback);
    labelmap_release(&m->stale_marked);
    labelmap_release(&m->audit_checked);
    labelmap_release(&m->audit_stale);
    for (int i = 0; i < METRICS_MAX_TARGETS; i++) {
        free(m->targets[i].name);
        free(m->targets[i].reason);
    }
    for (int i = 0; i < METRICS_COND_COUNT; i++)
        free(m->cond_reason[i]);
    free(m->role_detail);
    pthread_mutex_destroy(&m->lock);
    free(m);
}

void metrics_inc(Metrics *m, MetricsCounter c, uint64_t n)
{
    if (m == NULL || (int)c < 0 || c >= METRICS_COUNTER_COUNT)
        return;
    atomic_fetch_add_explicit(&m->counters[c], n, memory_order_relaxed);
}

void metrics_invalidations(Metrics *m, MetricsAction a, uint64_t n)
{
    if (m == NULL || (int)a < 0 || a >= METRICS_ACTION_COUNT)
        return;
    atomic_fetch_add_explicit(&m->actions[a], n, memory_order_relaxed);
}

void metrics_change(Metrics *m, const char *table, const char *op)
{
    metrics_change_n(m, table, op, 1);
}

void metrics_change_n(Metrics *m, const char *table, const char *op, uint64_t n)
{
    if (m == NULL || table == NULL || op == NULL || n == 0)
        return;
    pthread_mutex_lock(&m->lock);
    labelmap_add(&m->changes, table, op, n);
    pthread_mutex_unlock(&m->lock);
}

void metrics_widened(Metrics *m, const char *table, uint64_t n)
{
    if (m == NULL || table == NULL)
        return;
    pthread_mutex_lock(&m->lock);
    labelmap_add(&m->widened, table, NULL, n);
    pthread_mutex_unlock(&m->lock);
}

void metrics_refresh(Metrics *m, const char *table, uint64_t writes, uint64_t fallback_deletes,
                     uint64_t stale_marks)
{
    if (m == NULL || table == NULL || (writes == 0 && fallback_deletes == 0 && stale_marks == 0))
        return;
    pthread_mutex_lock(&m->lock);
    if (writes > 0)
        labelmap_add(&m->refresh_writes, table, NULL, writes);
    if (fallback_deletes > 0)
        labelmap_add(&m->refresh_fallback, table, NULL, fallback_deletes);
    if (stale_marks > 0)
        labelmap_add(&m->stale_marked, table, NULL, stale_marks);
    pthread_mutex_unlock(&m->lock);
}

void metrics_audit(Metrics *m, const char *table, bool stale)
{
    if (m == NULL || table == NULL)
        return;
    pthread_mutex_lock(&m->lock);
    labelmap_add(&m->audit_checked, table, NULL, 1);
    /* Present from the first check, so a rate over it starts at 0. */
    labelmap_add(&m->audit_stale, table, NULL, stale ? 1 : 0);
    pthread_mutex_unlock(&m->lock);
}

void metrics_positions(Metrics *m, uint64_t confirmed, uint64_t received, uint64_t server_end)
{
    if (m == NULL)
        return;
    atomic_store_explicit(&m->confirmed, confirmed, memory_order_relaxed);
    atomic_store_explicit(&m->received, received, memory_order_relaxed);
    atomic_store_explicit(&m->server_end, server_end, memory_order_relaxed);
}

/* Index of the bucket that holds v among n upper bounds: the first bound
 * >= v (n: +Inf). A binary search: in a drain every commit is seconds old
 * and a linear scan read every bound. */
static size_t bucket_of(const double *bounds, size_t n, double v)
{
    size_t lo = 0, hi = n;

    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (v > bounds[mid])
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* One commit-to-ack observation; the caller holds m->lock. */
static void observe_ack(Metrics *m, double seconds)
{
    if (isnan(seconds))
        return;
    /* A commit stamped ahead of our clock (skew between hosts) counts as 0:
     * a negative observation would make _sum decrease, which Prometheus
     * reads as a counter reset. */
    if (seconds < 0)
        seconds = 0;
    m->ack_counts[bucket_of(ack_buckets, ACK_NBUCKETS, seconds)]++;
    m->ack_sum += isinf(seconds) ? 0 : seconds;
    m->ack_count++;
}

void metrics_commit_to_ack(Metrics *m, double seconds)
{
    if (m == NULL)
        return;
    pthread_mutex_lock(&m->lock);
    observe_ack(m, seconds);
    pthread_mutex_unlock(&m->lock);
}

void metrics_commits_acked(Metrics *m, int64_t now, const int64_t *commit_us, size_t n)
{
    if (m == NULL || n == 0)
        return;
    pthread_mutex_lock(&m->lock);
    /* In doubles: commit times come off the wire and must not overflow. */
    for (size_t i = 0; i < n; i++)
        observe_ack(m, ((double)now - (double)commit_us[i]) / 1e6);
    pthread_mutex_unlock(&m->lock);
}

void metrics_postgres_up(Metrics *m, bool up)
{
    if (m == NULL)
        return;
    atomic_store_explicit(&m->postgres_up, up, memory_order_relaxed);
}

/* Replace *slot with a copy of v (NULL clears it), without reallocating
 * when the text is unchanged (the loop reports every batch). */
static void set_text(char **slot, const char *v)
{
    if (v == NULL) {
        free(*slot);
        *slot = NULL;
    } else if (*slot == NULL || strcmp(*slot, v) != 0) {
        free(*slot);
        *slot = xstrdup(v);
    }
}

void metrics_redis_target(Metrics *m, int index, const char *target, bool up, const char *reason)
{
    if (m == NULL || index < 0 || index >= METRICS_MAX_TARGETS)
        return;
    pthread_mutex_lock(&m->lock);
    RedisTarget *t = &m->targets[index];
    if (target != NULL)
        set_text(&t->name, target);
    else if (t->name == NULL)
        t->name = xstrdup("");
    t->up = up;
    set_text(&t->reason, up ? NULL : reason);
    pthread_mutex_unlock(&m->lock);
}

void metrics_redis_up(Metrics *m, int index, const char *target, bool up)
{
    metrics_redis_target(m, index, target, up, NULL);
}

void metrics_set_condition(Metrics *m, MetricsCondition c, bool ok, const char *reason)
{
    if (m == NULL || (int)c < 0 || c >= METRICS_COND_COUNT)
        return;
    pthread_mutex_lock(&m->lock);
    m->cond_failed[c] = !ok;
    set_text(&m->cond_reason[c], ok ? NULL : reason);
    pthread_mutex_unlock(&m->lock);
}

void metrics_role(Metrics *m, MetricsRole role, const char *detail)
{
    if (m == NULL || (int)role < 0 || role >= METRICS_ROLE_COUNT)
        return;
    pthread_mutex_lock(&m->lock);
    m->role = role;
    set_text(&m->role_detail, detail);
    pthread_mutex_unlock(&m->lock);
}

/* Every reported target up and at least one reported. Caller holds lock. */
static bool redis_all_up_locked(const Metrics *m)
{
    int seen = 0;

    for (int i = 0; i < METRICS_MAX_TARGETS; i++) {
        if (m->targets[i].name == NULL)
            continue;
        seen++;
        if (!m->targets[i].up)
            return false;
    }
    return seen > 0;
}

/* Append one reason line to buf (used bytes in *used), cut at len. */
static void why_line(char *buf, size_t len, size_t *used, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static void why_line(char *buf, size_t len, size_t *used, const char *fmt, ...)
{
    va_list ap;
    int n;

    if (*used + 1 >= len)
        return;
    va_start(ap, fmt);
    n = vsnprintf(buf + *used, len - *used, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    *used += (size_t)n < len - *used ? (size_t)n : len - *used - 1;
    if (*used + 1 < len) {
        buf[(*used)++] = '\n';
        buf[*used] = '\0';
    }
}

/* Every Redis target's reason for not being ready. Caller holds lock. */
static void redis_reasons_locked(const Metrics *m, char *buf, size_t len, size_t *used)
{
    int seen = 0;

    for (int i = 0; i < METRICS_MAX_TARGETS; i++) {
        const RedisTarget *t = &m->targets[i];
        if (t->name == NULL)
            continue;
        seen++;
        if (t->up)
            continue;
        if (t->reason != NULL)
            why_line(buf, len, used, "redis target %s is down: %s", t->name, t->reason);
        else
            why_line(buf, len, used, "redis target %s is down", t->name);
    }
    if (seen == 0)
        why_line(buf, len, used, "no redis target has answered yet");
}

bool metrics_ready_reasons(Metrics *m, char *buf, size_t len)
{
    size_t used = 0;

    if (len == 0)
        return m != NULL && metrics_ready(m);
    buf[0] = '\0';
    if (m == NULL) {
        why_line(buf, len, &used, "no metrics registry");
        return false;
    }
    pthread_mutex_lock(&m->lock);
    if (m->role == METRICS_ROLE_STANDBY)
        why_line(buf, len, &used, "standing by: %s",
                 m->role_detail ? m->role_detail : "the slot is active in another process");
    else if (!atomic_load_explicit(&m->postgres_up, memory_order_relaxed))
        why_line(buf, len, &used, "not streaming from postgresql%s%s", m->role_detail ? ": " : "",
                 m->role_detail ? m->role_detail : "");
    redis_reasons_locked(m, buf, len, &used);
    for (int c = 0; c < METRICS_COND_COUNT; c++)
        if (m->cond_failed[c])
            why_line(buf, len, &used, "%s: %s", cond_names[c],
                     m->cond_reason[c] ? m->cond_reason[c] : "not ok");
    pthread_mutex_unlock(&m->lock);
    return used == 0;
}

bool metrics_ready(Metrics *m)
{
    char why[1024];
    return m != NULL && metrics_ready_reasons(m, why, sizeof why);
}

/* ---- rendering ---------------------------------------------------------- */

typedef struct StrBuf {
    char *data;
    size_t len, cap;
} StrBuf;

static void sb_printf(StrBuf *sb, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void sb_printf(StrBuf *sb, const char *fmt, ...)
{
    va_list ap;
    int n;

    for (;;) {
        va_start(ap, fmt);
        n = vsnprintf(sb->data + sb->len, sb->cap - sb->len, fmt, ap);
        va_end(ap);
        if (n < 0) {
            fprintf(stderr, "walbust: metrics formatting failed\n");
            abort();
        }
        if ((size_t)n < sb->cap - sb->len)
            break;
        sb->cap = (sb->cap + (size_t)n + 1) * 2;
        sb->data = xrealloc(sb->data, sb->cap);
    }
    sb->len += (size_t)n;
}

/* A label value escaped per the text format: \\, \" and \n. */
static void sb_label(StrBuf *sb, const char *v)
{
    for (; *v; v++) {
        if (*v == '\\')
            sb_printf(sb, "\\\\");
        else if (*v == '"')
            sb_printf(sb, "\\\"");
        else if (*v == '\n')
            sb_printf(sb, "\\n");
        else
            sb_printf(sb, "%c", *v);
    }
}

static void sb_header(StrBuf *sb, const char *name, const char *type, const char *help)
{
    sb_printf(sb, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static void sb_scalar(StrBuf *sb, const char *name, const char *type, const char *help, uint64_t v)
{
    sb_header(sb, name, type, help);
    sb_printf(sb, "%s %llu\n", name, (unsigned long long)v);
}

static void render_labelmap(StrBuf *sb, const char *name, const LabelMap *map, const char *la,
                            const char *lb)
{
    for (size_t i = 0; i < map->n; i++) {
        const LabelEntry *e = &map->entries[i];
        sb_printf(sb, "%s{%s=\"", name, la);
        sb_label(sb, e->a);
        if (lb != NULL && e->b != NULL) {
            sb_printf(sb, "\",%s=\"", lb);
            sb_label(sb, e->b);
        }
        sb_printf(sb, "\"} %llu\n", (unsigned long long)e->value);
    }
}

/* The refresh and stale rules' counters (docs/rules.md "Refresh"). */
static void render_refresh(StrBuf *sb, Metrics *m)
{
    sb_header(sb, "walbust_refresh_writes_total", "counter",
              "Refresh writes (the new row stored in a key, fenced by the commit LSN) produced "
              "by refresh rules, by table.");
    render_labelmap(sb, "walbust_refresh_writes_total", &m->refresh_writes, "table", NULL);
    sb_scalar(sb, "walbust_refresh_fenced_total", "counter",
              "Refresh writes Redis did not store because the key's fence held a newer commit's "
              "row (a replay, a standby that took over, another walbust).",
              atomic_load_explicit(&m->counters[METRICS_REFRESH_FENCED], memory_order_relaxed));
    sb_header(sb, "walbust_refresh_fallback_deletes_total", "counter",
              "Refresh entries that deleted their key instead of storing the row because the "
              "change lacked a column's value (an unchanged TOASTed value), by table.");
    render_labelmap(sb, "walbust_refresh_fallback_deletes_total", &m->refresh_fallback, "table",
                    NULL);
    sb_header(sb, "walbust_stale_marked_total", "counter",
              "Keys marked stale (served old while one reader rebuilds) by stale rules, by table; "
              "a key that does not exist stays absent.");
    render_labelmap(sb, "walbust_stale_marked_total", &m->stale_marked, "table", NULL);
}

static void render_counters(StrBuf *sb, Metrics *m)
{
    sb_header(sb, "walbust_changes_total", "counter",
              "Row changes decoded from committed transactions, by table and operation.");
    render_labelmap(sb, "walbust_changes_total", &m->changes, "table", "op");
    sb_scalar(sb, "walbust_transactions_total", "counter", "Committed transactions decoded.",
              atomic_load_explicit(&m->counters[METRICS_TRANSACTIONS], memory_order_relaxed));
    sb_header(sb, "walbust_invalidations_total", "counter",
              "Invalidations applied to Redis, by action.");
    for (int a = 0; a < METRICS_ACTION_COUNT; a++)
        sb_printf(sb, "walbust_invalidations_total{action=\"%s\"} %llu\n", action_names[a],
                  (unsigned long long)atomic_load_explicit(&m->actions[a], memory_order_relaxed));
    sb_header(sb, "walbust_widened_total", "counter",
              "Keys widened to patterns because a needed value was missing, by table.");
    render_labelmap(sb, "walbust_widened_total", &m->widened, "table", NULL);
    sb_header(sb, "walbust_audit_checked_total", "counter",
              "Cached keys the audit compared with the database, by the audit's table.");
    render_labelmap(sb, "walbust_audit_checked_total", &m->audit_checked, "table", NULL);
    sb_header(sb, "walbust_audit_stale_total", "counter",
              "Audited keys found stale (differing from the database after walbust confirmed "
              "past the read), by the audit's table.");
    render_labelmap(sb, "walbust_audit_stale_total", &m->audit_stale, "table", NULL);
    sb_scalar(sb, "walbust_redis_errors_total", "counter", "Failed Redis batches.",
              atomic_load_explicit(&m->counters[METRICS_REDIS_ERRORS], memory_order_relaxed));
    sb_scalar(sb, "walbust_retries_total", "counter", "Redis batch retries after a failure.",
              atomic_load_explicit(&m->counters[METRICS_RETRIES], memory_order_relaxed));
    sb_scalar(sb, "walbust_visibility_queries_total", "counter",
              "pg_current_snapshot() queries asking whether decoded commits are visible yet.",
              atomic_load_explicit(&m->counters[METRICS_VISIBILITY_QUERIES], memory_order_relaxed));
    sb_scalar(sb, "walbust_visibility_waits_total", "counter",
              "Snapshots that did not yet see a decoded commit (walbust waited and asked again; "
              "steady growth means commits wait, e.g. for a synchronous standby).",
              atomic_load_explicit(&m->counters[METRICS_VISIBILITY_WAITS], memory_order_relaxed));
    sb_scalar(sb, "walbust_redis_oom_refusals_total", "counter",
              "Writes (watermark SET, INCR, PUBLISH) Redis refused with OOM (maxmemory reached "
              "under noeviction); deletes still applied, the writes are retried and nothing is "
              "confirmed past them.",
              atomic_load_explicit(&m->counters[METRICS_REDIS_OOM], memory_order_relaxed));
    sb_scalar(sb, "walbust_replica_shortfalls_total", "counter",
              "Batches that WAIT did not report on as many replicas as ?replicas=N asks; each "
              "is sent again and not confirmed.",
              atomic_load_explicit(&m->counters[METRICS_REPLICA_SHORTFALLS], memory_order_relaxed));
    sb_scalar(sb, "walbust_lookup_queries_total", "counter",
              "Lookup queries run (rules with a lookup; one per distinct rule and arguments per "
              "batch).",
              atomic_load_explicit(&m->counters[METRICS_LOOKUP_QUERIES], memory_order_relaxed));
    sb_scalar(sb, "walbust_lookup_errors_total", "counter",
              "Failed lookup runs; the batch is held and retried, nothing is confirmed past it.",
              atomic_load_explicit(&m->counters[METRICS_LOOKUP_ERRORS], memory_order_relaxed));
    render_refresh(sb, m);
}

static void render_positions(StrBuf *sb, Metrics *m)
{
    uint64_t confirmed = atomic_load_explicit(&m->confirmed, memory_order_relaxed);
    uint64_t received = atomic_load_explicit(&m->received, memory_order_relaxed);
    uint64_t server_end = atomic_load_explicit(&m->server_end, memory_order_relaxed);
    /* The server's WAL end is only learnt from keepalives; what we have
     * received is a lower bound for it. */
    uint64_t end = server_end > received ? server_end : received;

    sb_scalar(sb, "walbust_confirmed_lsn", "gauge",
              "LSN (as bytes) confirmed to PostgreSQL: every invalidation before it is in Redis.",
              confirmed);
    sb_scalar(sb, "walbust_received_lsn", "gauge", "LSN (as bytes) received from PostgreSQL.",
              received);
    sb_scalar(sb, "walbust_server_lsn", "gauge",
              "PostgreSQL's WAL end (as bytes) as last reported by the server.", end);
    sb_scalar(sb, "walbust_lag_bytes", "gauge",
              "Bytes of WAL between the server's WAL end and the confirmed LSN.",
              end > confirmed ? end - confirmed : 0);
}

static void render_flush_interval(StrBuf *sb, Metrics *m)
{
    sb_header(sb, "walbust_flush_interval_seconds", "gauge",
              "Least time between the end of one Redis write and the start of the next "
              "(--flush-interval; with auto, what it chose last).");
    sb_printf(sb, "walbust_flush_interval_seconds %.6f\n",
              (double)atomic_load_explicit(&m->flush_interval_ns, memory_order_relaxed) / 1e9);
}

void metrics_flush_interval(Metrics *m, double seconds)
{
    if (m == NULL || !(seconds >= 0))
        return;
    atomic_store_explicit(&m->flush_interval_ns, (uint_fast64_t)(seconds * 1e9 + 0.5),
                          memory_order_relaxed);
}

void metrics_batch_stages(Metrics *m, const double seconds[METRICS_STAGE_COUNT])
{
    size_t b[METRICS_STAGE_COUNT];
    double v[METRICS_STAGE_COUNT];

    if (m == NULL)
        return;
    for (int i = 0; i < METRICS_STAGE_COUNT; i++) {
        if (isnan(seconds[i]))
            return;
        v[i] = seconds[i] < 0 || isinf(seconds[i]) ? 0 : seconds[i];
        b[i] = bucket_of(stage_buckets, STAGE_NBUCKETS, v[i]);
    }
    pthread_mutex_lock(&m->lock);
    for (int i = 0; i < METRICS_STAGE_COUNT; i++) {
        m->stage_counts[i][b[i]]++;
        m->stage_sum[i] += v[i];
    }
    m->stage_count++;
    pthread_mutex_unlock(&m->lock);
}

/* One histogram series: cumulative buckets from per-bucket counts[0..n]
 * (counts[n]: above the last bound), then _sum and _count. label: e.g.
 * stage="redis", or "" for none. */
static void render_series(StrBuf *sb, const char *name, const char *label, const double *bounds,
                          size_t n, const uint64_t *counts, double sum, uint64_t count)
{
    const char *sep = *label != '\0' ? "," : "";
    uint64_t cum = 0;

    for (size_t b = 0; b < n; b++) {
        cum += counts[b];
        sb_printf(sb, "%s_bucket{%s%sle=\"%g\"} %llu\n", name, label, sep, bounds[b],
                  (unsigned long long)cum);
    }
    cum += counts[n];
    sb_printf(sb, "%s_bucket{%s%sle=\"+Inf\"} %llu\n", name, label, sep, (unsigned long long)cum);
    if (*label != '\0') {
        sb_printf(sb, "%s_sum{%s} %.9g\n", name, label, sum);
        sb_printf(sb, "%s_count{%s} %llu\n", name, label, (unsigned long long)count);
    } else {
        sb_printf(sb, "%s_sum %.9g\n", name, sum);
        sb_printf(sb, "%s_count %llu\n", name, (unsigned long long)count);
    }
}

static void render_stages(StrBuf *sb, Metrics *m)
{
    sb_header(sb, "walbust_batch_stage_seconds", "histogram",
              "Where acknowledged batches spent their time, by stage: decode (commit timestamp "
              "to decoded), batch (decoded to flushed), visibility, redis.");
    for (int i = 0; i < METRICS_STAGE_COUNT; i++) {
        char label[32];

        snprintf(label, sizeof label, "stage=\"%s\"", stage_names[i]);
        render_series(sb, "walbust_batch_stage_seconds", label, stage_buckets, STAGE_NBUCKETS,
                      m->stage_counts[i], m->stage_sum[i], m->stage_count);
    }
}

static void render_histogram(StrBuf *sb, Metrics *m)
{
    sb_header(sb, "walbust_commit_to_ack_seconds", "histogram",
              "Seconds from a transaction's commit timestamp to Redis acknowledging it.");
    render_series(sb, "walbust_commit_to_ack_seconds", "", ack_buckets, ACK_NBUCKETS, m->ack_counts,
                  m->ack_sum, m->ack_count);
}

static void render_health(StrBuf *sb, Metrics *m)
{
    sb_scalar(sb, "walbust_postgres_up", "gauge", "1 while streaming from PostgreSQL, else 0.",
              atomic_load_explicit(&m->postgres_up, memory_order_relaxed) ? 1 : 0);
    sb_scalar(sb, "walbust_redis_up", "gauge",
              "1 while every Redis target accepts batches (a standby: answers PING), else 0.",
              redis_all_up_locked(m) ? 1 : 0);
    sb_header(sb, "walbust_redis_target_up", "gauge",
              "1 while this Redis target accepts batches (a standby: answers PING).");
    for (int i = 0; i < METRICS_MAX_TARGETS; i++) {
        if (m->targets[i].name == NULL)
            continue;
        sb_printf(sb, "walbust_redis_target_up{target=\"");
        sb_label(sb, m->targets[i].name);
        sb_printf(sb, "\"} %d\n", m->targets[i].up ? 1 : 0);
    }
    sb_header(sb, "walbust_role", "gauge",
              "1 for this instance's role: starting, active (holds the slot) or standby "
              "(the slot is active in another process).");
    for (int r = 0; r < METRICS_ROLE_COUNT; r++)
        sb_printf(sb, "walbust_role{role=\"%s\"} %d\n", role_names[r], (int)m->role == r ? 1 : 0);
    sb_header(sb, "walbust_condition", "gauge",
              "1 while this readiness condition holds (rules_valid, publication, slot, lookups).");
    for (int c = 0; c < METRICS_COND_COUNT; c++)
        sb_printf(sb, "walbust_condition{condition=\"%s\"} %d\n", cond_names[c],
                  m->cond_failed[c] ? 0 : 1);
}

char *metrics_render(Metrics *m)
{
    StrBuf sb = {xmalloc(4096), 0, 4096};

    sb.data[0] = '\0';
    sb_header(&sb, "walbust_build_info", "gauge", "walbust version.");
    sb_printf(&sb, "walbust_build_info{version=\"%s\"} 1\n", WALBUST_VERSION);
    pthread_mutex_lock(&m->lock);
    render_counters(&sb, m);
    render_positions(&sb, m);
    render_flush_interval(&sb, m);
    render_histogram(&sb, m);
    render_stages(&sb, m);
    render_health(&sb, m);
    pthread_mutex_unlock(&m->lock);
    /* Computed outside the lock (it takes it); a scrape needs no snapshot. */
    sb_scalar(&sb, "walbust_ready", "gauge",
              "1 while /readyz answers 200: invalidations are being applied.",
              metrics_ready(m) ? 1 : 0);
    return sb.data;
}

/* ---- HTTP --------------------------------------------------------------- */

static enum MHD_Result reply(struct MHD_Connection *conn, unsigned int status, char *body,
                             const char *ctype)
{
    struct MHD_Response *r =
        MHD_create_response_from_buffer(strlen(body), body, MHD_RESPMEM_MUST_FREE);
    enum MHD_Result ret;

    if (r == NULL) {
        free(body);
        return MHD_NO;
    }
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, ctype);
    ret = MHD_queue_response(conn, status, r);
    MHD_destroy_response(r);
    return ret;
}

static enum MHD_Result handle(void *cls, struct MHD_Connection *conn, const char *url,
                              const char *method, const char *version, const char *upload_data,
                              size_t *upload_data_size, void **con_cls)
{
    static const char text[] = "text/plain; charset=utf-8";
    Metrics *m = cls;
    char why[4096];

    (void)version;
    (void)upload_data;
    (void)upload_data_size;
    (void)con_cls;
    if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0)
        return reply(conn, MHD_HTTP_METHOD_NOT_ALLOWED, xstrdup("method not allowed\n"), text);
    if (strcmp(url, "/metrics") == 0)
        return reply(conn, MHD_HTTP_OK, metrics_render(m),
                     "text/plain; version=0.0.4; charset=utf-8");
    if (strcmp(url, "/healthz") == 0)
        return reply(conn, MHD_HTTP_OK, xstrdup("ok\n"), text);
    if (strcmp(url, "/readyz") == 0) {
        if (metrics_ready_reasons(m, why, sizeof why))
            return reply(conn, MHD_HTTP_OK, xstrdup("ready\n"), text);
        return reply(conn, MHD_HTTP_SERVICE_UNAVAILABLE, xstrdup(why), text);
    }
    return reply(conn, MHD_HTTP_NOT_FOUND,
                 xstrdup("not found: try /metrics, /healthz or /readyz\n"), text);
}

/* Split "host:port", "[v6]:port" or ":port" into host (empty = any) and port. */
static int split_addr(const char *addr, char *host, size_t hostlen, char *port, size_t portlen)
{
    const char *colon;
    size_t hl;

    if (addr[0] == '[') {
        const char *close = strchr(addr, ']');
        if (close == NULL || close[1] != ':')
            return -1;
        hl = (size_t)(close - addr - 1);
        addr++;
        colon = close + 1;
    } else {
        colon = strrchr(addr, ':');
        if (colon == NULL)
            return -1;
        hl = (size_t)(colon - addr);
    }
    if (hl >= hostlen || strlen(colon + 1) >= portlen || colon[1] == '\0' ||
        strspn(colon + 1, "0123456789") != strlen(colon + 1))
        return -1;
    memcpy(host, addr, hl);
    host[hl] = '\0';
    strcpy(port, colon + 1);
    return 0;
}

/* A listening socket bound to ai, or -1 with errno set. dual: accept IPv4
 * too on an IPv6 wildcard socket. */
static int bind_listen(const struct addrinfo *ai, bool dual)
{
    int one = 1, zero = 0, e;
    int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);

    if (fd < 0)
        return -1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (dual && ai->ai_family == AF_INET6)
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);
    if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(fd, 64) == 0)
        return fd;
    e = errno;
    close(fd);
    errno = e;
    return -1;
}

/* Resolve, create, bind and listen. ":PORT" tries the IPv6 wildcard (which
 * takes IPv4 too) and falls back to IPv4 only where IPv6 is unavailable.
 * Returns the socket or -1 with err set. */
static int open_listener(const char *addr, char *err, size_t errlen)
{
    static const int any_families[] = {AF_INET6, AF_INET};
    char host[256], port[16];
    int fd = -1, rc = 0, e = 0;
    bool any;

    if (split_addr(addr, host, sizeof host, port, sizeof port) != 0) {
        snprintf(err, errlen,
                 "invalid metrics address \"%s\": use HOST:PORT, [IPV6]:PORT, :PORT or off", addr);
        return -1;
    }
    any = host[0] == '\0';
    for (int i = 0; i < (any ? 2 : 1) && fd < 0; i++) {
        struct addrinfo hints = {0}, *res = NULL;
        hints.ai_socktype = SOCK_STREAM;
        hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
        hints.ai_family = any ? any_families[i] : AF_UNSPEC;
        rc = getaddrinfo(any ? NULL : host, port, &hints, &res);
        if (rc != 0)
            continue;
        fd = bind_listen(res, any);
        e = errno;
        freeaddrinfo(res);
    }
    if (fd >= 0)
        return fd;
    if (rc != 0)
        snprintf(err, errlen, "could not resolve metrics address \"%s\": %s", addr,
                 gai_strerror(rc));
    else
        snprintf(err, errlen,
                 "could not listen for metrics on %s: %s (choose another --metrics "
                 "address, or --metrics off)",
                 addr, strerror(e));
    return -1;
}

int metrics_listen(Metrics *m, const char *addr, char *err, size_t errlen)
{
    int fd;

    if (addr == NULL || strcmp(addr, "off") == 0)
        return 0;
    if (m->daemon != NULL) {
        snprintf(err, errlen, "metrics server already listening");
        return -1;
    }
    fd = open_listener(addr, err, errlen);
    if (fd < 0)
        return -1;
    m->daemon = MHD_start_daemon(MHD_USE_AUTO_INTERNAL_THREAD, 0, NULL, NULL, handle, m,
                                 MHD_OPTION_LISTEN_SOCKET, fd, MHD_OPTION_CONNECTION_LIMIT,
                                 (unsigned int)64, MHD_OPTION_CONNECTION_TIMEOUT, (unsigned int)10,
                                 MHD_OPTION_END);
    if (m->daemon == NULL) {
        /* Whether libmicrohttpd closed the socket on failure depends on its
         * version; at start-up no other thread opens descriptors, so close
         * it only if it is still open. */
        if (fcntl(fd, F_GETFD) != -1)
            close(fd);
        snprintf(err, errlen, "could not start the metrics server on %s", addr);
        return -1;
    }
    return 0;
}
