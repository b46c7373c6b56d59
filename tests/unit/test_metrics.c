/*
 * Unit tests for metrics.c: the Prometheus text it renders (checked line by
 * line against the text-format grammar, not just by substring), label
 * escaping, histogram arithmetic, readiness, concurrent recording, and the
 * HTTP endpoints over a real loopback socket.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <ctype.h>
#include <math.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include "metrics.h"

/* ---- helpers: reading the rendered text --------------------------------- */

/* The value of the sample line that starts with `series` followed by a
 * space (series is the name plus its exact label text). Fails the test when
 * the line is missing or appears twice. */
static double sample(const char *text, const char *series)
{
    size_t n = strlen(series);
    const char *found = NULL;

    for (const char *line = text; *line;) {
        const char *eol = strchr(line, '\n');
        if (strncmp(line, series, n) == 0 && line[n] == ' ') {
            if (found != NULL)
                fail_msg("series %s appears twice", series);
            found = line + n + 1;
        }
        if (eol == NULL)
            break;
        line = eol + 1;
    }
    if (found == NULL)
        fail_msg("series %s not found in:\n%s", series, text);
    return strtod(found, NULL);
}

static bool has_line(const char *text, const char *line)
{
    size_t n = strlen(line);
    for (const char *p = text; (p = strstr(p, line)) != NULL; p++)
        if ((p == text || p[-1] == '\n') && (p[n] == '\n' || p[n] == '\0'))
            return true;
    return false;
}

static int count_lines_starting(const char *text, const char *prefix)
{
    int count = 0;
    size_t n = strlen(prefix);
    for (const char *line = text; *line;) {
        if (strncmp(line, prefix, n) == 0)
            count++;
        const char *eol = strchr(line, '\n');
        if (eol == NULL)
            break;
        line = eol + 1;
    }
    return count;
}

/* Parse one sample line per the text format 0.0.4: a metric name, optional
 * {name="value",...} where a value may only use the escapes \\ \" \n, one
 * space, a float (or +Inf/-Inf/NaN). Returns true when it parses. */
static bool valid_sample_line(const char *p, const char *end)
{
    const char *q = p;
    while (q < end && (isalnum((unsigned char)*q) || *q == '_' || *q == ':'))
        q++;
    if (q == p)
        return false;
    if (q < end && *q == '{') {
        q++;
        while (q < end && *q != '}') {
            const char *ln = q;
            while (q < end && (isalnum((unsigned char)*q) || *q == '_'))
                q++;
            if (q == ln || q + 1 >= end || q[0] != '=' || q[1] != '"')
                return false;
            for (q += 2; q < end && *q != '"'; q++) {
                if (*q == '\\') {
                    if (q + 1 >= end || strchr("\\\"n", q[1]) == NULL)
                        return false;
                    q++;
                } else if (*q == '\n') {
                    return false;
                }
            }
            if (q >= end)
                return false;
            q++; /* closing quote */
            if (q < end && *q == ',')
                q++;
        }
        if (q >= end)
            return false;
        q++; /* } */
    }
    if (q >= end || *q != ' ')
        return false;
    q++;
    if (end - q >= 4 && strncmp(q, "+Inf", 4) == 0)
        return q + 4 == end;
    char *num_end;
    strtod(q, &num_end);
    return num_end == end && num_end != q;
}

/* Every line is a HELP, a TYPE or a valid sample; every family's HELP
 * directly precedes its TYPE; every sample belongs to the last TYPE. */
static void assert_valid_exposition(const char *text)
{
    char family[128] = "";
    for (const char *line = text; *line;) {
        const char *eol = strchr(line, '\n');
        assert_non_null(eol); /* the text ends with a newline */
        if (strncmp(line, "# HELP ", 7) == 0) {
            const char *next = eol + 1;
            size_t n = strcspn(line + 7, " ");
            assert_true(n < sizeof family);
            memcpy(family, line + 7, n);
            family[n] = '\0';
            assert_true(strncmp(next, "# TYPE ", 7) == 0);
            assert_true(strncmp(next + 7, family, n) == 0 && next[7 + n] == ' ');
        } else if (strncmp(line, "# TYPE ", 7) == 0) {
            const char *type = line + 7 + strlen(family) + 1;
            assert_true(strncmp(type, "counter\n", 8) == 0 || strncmp(type, "gauge\n", 6) == 0 ||
                        strncmp(type, "histogram\n", 10) == 0);
        } else {
            if (!valid_sample_line(line, eol))
                fail_msg("invalid sample line: %.*s", (int)(eol - line), line);
            assert_true(strncmp(line, family, strlen(family)) == 0);
        }
        line = eol + 1;
    }
}

/* ---- rendering ---------------------------------------------------------- */

static void test_render_families(void **state)
{
    static const struct {
        const char *name, *type;
    } families[] = {
        {"walbust_changes_total", "counter"},
        {"walbust_transactions_total", "counter"},
        {"walbust_invalidations_total", "counter"},
        {"walbust_widened_total", "counter"},
        {"walbust_redis_errors_total", "counter"},
        {"walbust_retries_total", "counter"},
        {"walbust_visibility_queries_total", "counter"},
        {"walbust_visibility_waits_total", "counter"},
        {"walbust_lookup_queries_total", "counter"},
        {"walbust_lookup_errors_total", "counter"},
        {"walbust_refresh_writes_total", "counter"},
        {"walbust_refresh_fenced_total", "counter"},
        {"walbust_refresh_fallback_deletes_total", "counter"},
        {"walbust_stale_marked_total", "counter"},
        {"walbust_confirmed_lsn", "gauge"},
        {"walbust_received_lsn", "gauge"},
        {"walbust_lag_bytes", "gauge"},
        {"walbust_commit_to_ack_seconds", "histogram"},
        {"walbust_batch_stage_seconds", "histogram"},
        {"walbust_postgres_up", "gauge"},
        {"walbust_redis_up", "gauge"},
        {"walbust_redis_target_up", "gauge"},
        {"walbust_role", "gauge"},
        {"walbust_condition", "gauge"},
        {"walbust_ready", "gauge"},
    };
    (void)state;
    Metrics *m = metrics_new();
    char *text = metrics_render(m);
    char line[160];

    assert_valid_exposition(text);
    for (size_t i = 0; i < sizeof families / sizeof families[0]; i++) {
        snprintf(line, sizeof line, "# TYPE %s %s", families[i].name, families[i].type);
        if (!has_line(text, line))
            fail_msg("missing \"%s\"", line);
        snprintf(line, sizeof line, "# HELP %s ", families[i].name);
        assert_int_equal(count_lines_starting(text, line), 1);
    }
    /* Every action is present from the start, so rate() works at once. */
    static const char *const actions[] = {"key", "pattern", "tag", "version", "publish"};
    for (size_t i = 0; i < 5; i++) {
        snprintf(line, sizeof line, "walbust_invalidations_total{action=\"%s\"}", actions[i]);
        assert_true(sample(text, line) == 0);
    }
    assert_true(sample(text, "walbust_postgres_up") == 0);
    assert_true(sample(text, "walbust_redis_up") == 0);
    assert_true(sample(text, "walbust_commit_to_ack_seconds_count") == 0);
    assert_true(sample(text, "walbust_batch_stage_seconds_count{stage=\"redis\"}") == 0);
    assert_true(sample(text, "walbust_role{role=\"starting\"}") == 1);
    assert_true(sample(text, "walbust_role{role=\"active\"}") == 0);
    assert_true(sample(text, "walbust_role{role=\"standby\"}") == 0);
    assert_true(sample(text, "walbust_condition{condition=\"rules_valid\"}") == 1);
    assert_true(sample(text, "walbust_condition{condition=\"publication\"}") == 1);
    assert_true(sample(text, "walbust_condition{condition=\"slot\"}") == 1);
    assert_true(sample(text, "walbust_condition{condition=\"lookups\"}") == 1);
    assert_true(sample(text, "walbust_ready") == 0);
    free(text);
    metrics_free(m);
}

static void test_counters_monotonic(void **state)
{
    (void)state;
    Metrics *m = metrics_new();
    double prev_tx = 0, prev_err = 0, prev_retry = 0, prev_tag = 0;

    for (uint64_t step = 1; step <= 5; step++) {
        metrics_inc(m, METRICS_TRANSACTIONS, step);
        metrics_inc(m, METRICS_REDIS_ERRORS, 1);
        metrics_inc(m, METRICS_RETRIES, 2 * step);
        metrics_invalidations(m, METRICS_ACTION_TAG, step * 10);
        char *text = metrics_render(m);
        double tx = sample(text, "walbust_transactions_total");
        double err = sample(text, "walbust_redis_errors_total");
        double retry = sample(text, "walbust_retries_total");
        double tag = sample(text, "walbust_invalidations_total{action=\"tag\"}");
        assert_true(tx == prev_tx + (double)step);
        assert_true(err == prev_err + 1);
        assert_true(retry == prev_retry + 2.0 * (double)step);
        assert_true(tag == prev_tag + 10.0 * (double)step);
        assert_true(sample(text, "walbust_invalidations_total{action=\"key\"}") == 0);
        prev_tx = tx, prev_err = err, prev_retry = retry, prev_tag = tag;
        free(text);
    }
    assert_true(prev_tx == 15);
    /* Out-of-range enum values are ignored, not written out of bounds. */
    metrics_inc(m, METRICS_COUNTER_COUNT, 7);
    metrics_invalidations(m, METRICS_ACTION_COUNT, 7);
    char *text = metrics_render(m);
    assert_true(sample(text, "walbust_transactions_total") == 15);
    free(text);
    metrics_free(m);
}

static void test_label_escaping(void **state)
{
    (void)state;
    Metrics *m = metrics_new();

    metrics_change(m, "public.\"quoted\"", "insert");
    metrics_change(m, "public.back\\slash", "update");
    metrics_change(m, "public.new\nline", "delete");
    metrics_change_n(m, "public.new\nline", "delete", 3);
    metrics_change_n(m, "public.new\nline", "insert", 0); /* no series */
    metrics_widened(m, "s.\"a\\b\nc\"", 3);
    metrics_redis_up(m, 0, "redis://10.0.0.1:6379/\"0\"", true);
    char *text = metrics_render(m);

    assert_valid_exposition(text);
    assert_true(
        sample(text, "walbust_changes_total{table=\"public.\\\"quoted\\\"\",op=\"insert\"}") == 1);
    assert_true(
        sample(text, "walbust_changes_total{table=\"public.back\\\\slash\",op=\"update\"}") == 1);
    assert_true(sample(text, "walbust_changes_total{table=\"public.new\\nline\",op=\"delete\"}") ==
                4);
    assert_null(strstr(text, "table=\"public.new\\nline\",op=\"insert\""));
    assert_true(sample(text, "walbust_widened_total{table=\"s.\\\"a\\\\b\\nc\\\"\"}") == 3);
    assert_true(
        sample(text, "walbust_redis_target_up{target=\"redis://10.0.0.1:6379/\\\"0\\\"\"}") == 1);
    free(text);
    metrics_free(m);
}

/* Refresh and stale counters: per table, summed across changes; a change
 * with nothing to count creates no series; fenced is a plain counter. */
static void test_refresh_counters(void **state)
{
    (void)state;
    Metrics *m = metrics_new();

    metrics_refresh(m, "public.product", 2, 0, 1);
    metrics_refresh(m, "public.product", 2, 0, 1);
    metrics_refresh(m, "public.product", 0, 2, 1);
    metrics_refresh(m, "public.page", 0, 0, 3);
    metrics_refresh(m, "public.other", 0, 0, 0);
    metrics_refresh(m, NULL, 1, 1, 1);
    metrics_refresh(NULL, "public.product", 1, 1, 1);
    metrics_inc(m, METRICS_REFRESH_FENCED, 3);
    char *text = metrics_render(m);

    assert_valid_exposition(text);
    assert_true(sample(text, "walbust_refresh_writes_total{table=\"public.product\"}") == 4);
    assert_true(sample(text, "walbust_refresh_fallback_deletes_total{table=\"public.product\"}") ==
                2);
    assert_true(sample(text, "walbust_stale_marked_total{table=\"public.product\"}") == 3);
    assert_true(sample(text, "walbust_stale_marked_total{table=\"public.page\"}") == 3);
    assert_int_equal(
        count_lines_starting(text, "walbust_refresh_writes_total{table=\"public.page\"}"), 0);
    assert_int_equal(
        count_lines_starting(text, "walbust_stale_marked_total{table=\"public.other\"}"), 0);
    assert_true(sample(text, "walbust_refresh_fenced_total") == 3);
    free(text);
    metrics_free(m);
}

/* The audit's counters: checked and stale per table, stale present (0)
 * from the first check so a rate over it starts at zero. */
static void test_audit_counters(void **state)
{
    Metrics *m = metrics_new();
    char *text;

    (void)state;
    metrics_audit(m, "public.products", false);
    metrics_audit(m, "public.products", true);
    metrics_audit(m, "public.products", false);
    metrics_audit(m, "public.teams", false);
    text = metrics_render(m);
    assert_valid_exposition(text);
    assert_true(sample(text, "walbust_audit_checked_total{table=\"public.products\"}") == 3);
    assert_true(sample(text, "walbust_audit_stale_total{table=\"public.products\"}") == 1);
    assert_true(sample(text, "walbust_audit_checked_total{table=\"public.teams\"}") == 1);
    assert_true(has_line(text, "walbust_audit_stale_total{table=\"public.teams\"} 0"));
    free(text);
    metrics_free(m);
}

/* Many distinct label sets (forcing the index to grow several times), each
 * counted exactly. */
static void test_labelled_counts(void **state)
{
    (void)state;
    static const char *const ops[] = {"insert", "update", "delete", "truncate"};
    Metrics *m = metrics_new();
    char table[64], series[160];

    for (int t = 0; t < 300; t++) {
        snprintf(table, sizeof table, "public.t%d", t);
        for (int o = 0; o < 4; o++)
            for (int k = 0; k < (t % 5) + o; k++)
                metrics_change(m, table, ops[o]);
        metrics_widened(m, table, (uint64_t)t);
    }
    char *text = metrics_render(m);
    assert_valid_exposition(text);
    for (int t = 0; t < 300; t++) {
        for (int o = 0; o < 4; o++) {
            snprintf(series, sizeof series, "walbust_changes_total{table=\"public.t%d\",op=\"%s\"}",
                     t, ops[o]);
            if ((t % 5) + o == 0)
                assert_int_equal(count_lines_starting(text, series), 0);
            else
                assert_true(sample(text, series) == (double)((t % 5) + o));
        }
        snprintf(series, sizeof series, "walbust_widened_total{table=\"public.t%d\"}", t);
        assert_true(sample(text, series) == (double)t);
    }
    /* "a"+"bc" and "ab"+"c" are different label sets. */
    metrics_change(m, "ab", "c");
    metrics_change(m, "a", "bc");
    free(text);
    text = metrics_render(m);
    assert_true(sample(text, "walbust_changes_total{table=\"ab\",op=\"c\"}") == 1);
    assert_true(sample(text, "walbust_changes_total{table=\"a\",op=\"bc\"}") == 1);
    free(text);
    metrics_free(m);
}

/* walbust_batch_stage_seconds: one observation per stage per batch, in
 * sub-millisecond buckets; clock skew counts as 0, a NaN drops the batch. */
static void test_batch_stages(void **state)
{
    (void)state;
    /* decode, batch, visibility, redis */
    static const double batches[][METRICS_STAGE_COUNT] = {
        {0.00004, 0.0002, 0.00003, 0.00012},
        {-0.002 /* skew */, 0.0009, 0.0003, 0.0004},
        {0.03, 0.0011, 0.00005, 20},
    };
    const double dropped[METRICS_STAGE_COUNT] = {0.001, NAN, 0.001, 0.001};
    Metrics *m = metrics_new();

    for (size_t i = 0; i < sizeof batches / sizeof batches[0]; i++)
        metrics_batch_stages(m, batches[i]);
    metrics_batch_stages(m, dropped);
    char *text = metrics_render(m);
    assert_valid_exposition(text);
#define B(st, le) sample(text, "walbust_batch_stage_seconds_bucket{stage=\"" st "\",le=\"" le "\"}")
    assert_true(B("decode", "5e-05") == 2); /* 0.00004 and the skewed 0 */
    assert_true(B("decode", "0.025") == 2);
    assert_true(B("decode", "0.05") == 3);
    assert_true(B("batch", "0.0001") == 0);
    assert_true(B("batch", "0.00025") == 1);
    assert_true(B("batch", "0.001") == 2);
    assert_true(B("batch", "0.0025") == 3);
    assert_true(B("visibility", "5e-05") == 2); /* le is inclusive */
    assert_true(B("visibility", "0.0005") == 3);
    assert_true(B("redis", "0.00025") == 1);
    assert_true(B("redis", "0.0005") == 2);
    assert_true(B("redis", "10") == 2);
    assert_true(B("redis", "+Inf") == 3);
#undef B
    static const char *const stages[] = {"decode", "batch", "visibility", "redis"};
    for (size_t i = 0; i < 4; i++) {
        char name[96];
        double sum = 0;

        for (size_t b = 0; b < sizeof batches / sizeof batches[0]; b++)
            sum += batches[b][i] > 0 ? batches[b][i] : 0;
        snprintf(name, sizeof name, "walbust_batch_stage_seconds_count{stage=\"%s\"}", stages[i]);
        assert_true(sample(text, name) == 3);
        snprintf(name, sizeof name, "walbust_batch_stage_seconds_sum{stage=\"%s\"}", stages[i]);
        assert_true(fabs(sample(text, name) - sum) < 1e-9);
    }
    free(text);
    metrics_free(m);
}

static void test_histogram(void **state)
{
    (void)state;
    static const double obs[] = {0.0005, 0.003, 0.003, 0.7, 45, 1000, -1 /* clock skew: 0 */,
                                 0.001};
    Metrics *m = metrics_new();
    double sum = 0;

    const int64_t now = INT64_C(850000000000000); /* PostgreSQL µs: in 2026 */
    int64_t commits[8];
    size_t n = 0;

    /* The first half one by one, the rest as commit timestamps acked at
     * once (metrics_commits_acked): the same histogram either way. */
    for (size_t i = 0; i < sizeof obs / sizeof obs[0]; i++) {
        if (i < 4)
            metrics_commit_to_ack(m, obs[i]);
        else
            commits[n++] = now - (int64_t)(obs[i] * 1e6);
        sum += obs[i] > 0 ? obs[i] : 0;
    }
    metrics_commits_acked(m, now, commits, n);
    metrics_commit_to_ack(m, NAN); /* ignored */
    char *text = metrics_render(m);
    assert_valid_exposition(text);
#define B(le) sample(text, "walbust_commit_to_ack_seconds_bucket{le=\"" le "\"}")
    assert_true(B("0.001") == 3); /* 0.0005, 0 and 0.001 (le is inclusive) */
    assert_true(B("0.0025") == 3);
    assert_true(B("0.005") == 5);
    assert_true(B("0.5") == 5);
    assert_true(B("1") == 6);
    assert_true(B("30") == 6);
    assert_true(B("60") == 7);
    assert_true(B("300") == 7);
    assert_true(B("+Inf") == 8);
#undef B
    assert_true(sample(text, "walbust_commit_to_ack_seconds_count") == 8);
    assert_true(fabs(sample(text, "walbust_commit_to_ack_seconds_sum") - sum) < 1e-6);

    /* Buckets are cumulative: non-decreasing in order of appearance. */
    double prev = -1;
    int buckets = 0;
    for (const char *p = text; (p = strstr(p, "walbust_commit_to_ack_seconds_bucket{")) != NULL;
         p++) {
        double v = strtod(strchr(p, ' ') + 1, NULL);
        assert_true(v >= prev);
        prev = v;
        buckets++;
    }
    assert_true(buckets > 5);
    free(text);
    metrics_free(m);
}

static void test_positions(void **state)
{
    (void)state;
    Metrics *m = metrics_new();

    metrics_positions(m, 1000, 1500, 4000);
    char *text = metrics_render(m);
    assert_true(sample(text, "walbust_confirmed_lsn") == 1000);
    assert_true(sample(text, "walbust_received_lsn") == 1500);
    assert_true(sample(text, "walbust_lag_bytes") == 3000);
    free(text);

    /* Server end not known yet: received is a lower bound for it. */
    metrics_positions(m, 1000, 1500, 0);
    text = metrics_render(m);
    assert_true(sample(text, "walbust_lag_bytes") == 500);
    free(text);

    /* Caught up (or confirmed ahead of a stale server end): no lag. */
    metrics_positions(m, 5000, 5000, 4000);
    text = metrics_render(m);
    assert_true(sample(text, "walbust_lag_bytes") == 0);
    free(text);

    /* Full 64-bit LSNs are exact. */
    metrics_positions(m, UINT64_C(0x3F00000000), UINT64_C(0x3F00000000), UINT64_C(0x3F00010000));
    text = metrics_render(m);
    assert_true(has_line(text, "walbust_confirmed_lsn 270582939648"));
    assert_true(has_line(text, "walbust_lag_bytes 65536"));
    free(text);
    metrics_free(m);
}

static void test_ready(void **state)
{
    (void)state;
    Metrics *m = metrics_new();
    char *text;

    assert_false(metrics_ready(m));
    metrics_redis_up(m, 0, "redis://a:6379", true);
    assert_false(metrics_ready(m)); /* not streaming */
    metrics_postgres_up(m, true);
    assert_true(metrics_ready(m));
    metrics_redis_up(m, 1, "redis://b:6379", false);
    assert_false(metrics_ready(m));
    text = metrics_render(m);
    assert_true(sample(text, "walbust_redis_up") == 0);
    assert_true(sample(text, "walbust_postgres_up") == 1);
    assert_true(sample(text, "walbust_redis_target_up{target=\"redis://a:6379\"}") == 1);
    assert_true(sample(text, "walbust_redis_target_up{target=\"redis://b:6379\"}") == 0);
    free(text);
    metrics_redis_up(m, 1, "redis://b:6379", true);
    assert_true(metrics_ready(m));
    text = metrics_render(m);
    assert_true(sample(text, "walbust_redis_up") == 1);
    free(text);
    metrics_postgres_up(m, false);
    assert_false(metrics_ready(m));
    metrics_redis_up(m, 8, "ignored", false); /* out of range: ignored */
    metrics_redis_up(m, -1, "ignored", false);
    metrics_postgres_up(m, true);
    assert_true(metrics_ready(m));
    assert_false(metrics_ready(NULL));
    metrics_free(m);
    metrics_free(NULL);
}

/* A target refusing batches, a failed condition and a standby each make
 * the instance unready, and /readyz's reasons name every one of them. */
static void test_ready_reasons(void **state)
{
    (void)state;
    Metrics *m = metrics_new();
    char why[1024], small[40];
    char *text;

    metrics_postgres_up(m, true);
    metrics_role(m, METRICS_ROLE_ACTIVE, NULL);
    metrics_redis_target(m, 0, "redis://a:6379", true, NULL);
    assert_true(metrics_ready_reasons(m, why, sizeof why));
    assert_string_equal(why, "");

    metrics_redis_target(m, 0, "redis://a:6379", false,
                         "OOM command not allowed when used memory > 'maxmemory'.");
    metrics_set_condition(m, METRICS_COND_RULES_VALID, false,
                          "column public.users.name no longer exists");
    metrics_set_condition(m, METRICS_COND_SLOT, false, NULL);
    assert_false(metrics_ready_reasons(m, why, sizeof why));
    assert_string_equal(why, "redis target redis://a:6379 is down: OOM command not allowed "
                             "when used memory > 'maxmemory'.\n"
                             "rules_valid: column public.users.name no longer exists\n"
                             "slot: not ok\n");
    text = metrics_render(m);
    assert_true(sample(text, "walbust_redis_up") == 0);
    assert_true(sample(text, "walbust_condition{condition=\"rules_valid\"}") == 0);
    assert_true(sample(text, "walbust_condition{condition=\"publication\"}") == 1);
    assert_true(sample(text, "walbust_condition{condition=\"slot\"}") == 0);
    assert_true(sample(text, "walbust_ready") == 0);
    free(text);
    /* Cut to the buffer, still NUL-terminated. */
    assert_false(metrics_ready_reasons(m, small, sizeof small));
    assert_int_equal(strlen(small), sizeof small - 1);

    metrics_redis_target(m, 0, "redis://a:6379", true, "ignored when up");
    metrics_set_condition(m, METRICS_COND_RULES_VALID, true, NULL);
    metrics_set_condition(m, METRICS_COND_SLOT, true, "ignored");
    assert_true(metrics_ready_reasons(m, why, sizeof why));
    text = metrics_render(m);
    assert_true(sample(text, "walbust_ready") == 1);
    assert_true(sample(text, "walbust_role{role=\"active\"}") == 1);
    free(text);

    /* A standby: not ready, says why, but its Redis stays up. */
    metrics_postgres_up(m, false);
    metrics_role(m, METRICS_ROLE_STANDBY, "replication slot \"s\" is active for PID 42");
    assert_false(metrics_ready_reasons(m, why, sizeof why));
    assert_string_equal(why, "standing by: replication slot \"s\" is active for PID 42\n");
    text = metrics_render(m);
    assert_true(sample(text, "walbust_role{role=\"standby\"}") == 1);
    assert_true(sample(text, "walbust_role{role=\"active\"}") == 0);
    assert_true(sample(text, "walbust_redis_up") == 1);
    free(text);
    metrics_set_condition(m, METRICS_COND_COUNT, false, "out of range: ignored");
    metrics_set_condition(NULL, METRICS_COND_SLOT, false, "no registry: ignored");
    metrics_role(m, METRICS_ROLE_ACTIVE, NULL);
    metrics_postgres_up(m, true);
    assert_true(metrics_ready(m));
    metrics_free(m);
}

/* ---- concurrency -------------------------------------------------------- */

#define WORKERS 4
#define PER_WORKER 20000

static void *worker(void *arg)
{
    Metrics *m = arg;
    for (int i = 0; i < PER_WORKER; i++) {
        metrics_change(m, i % 2 ? "public.a" : "public.b", "insert");
        metrics_inc(m, METRICS_TRANSACTIONS, 1);
        metrics_commit_to_ack(m, 0.002);
    }
    return NULL;
}

static void test_concurrent_recording(void **state)
{
    (void)state;
    Metrics *m = metrics_new();
    pthread_t th[WORKERS];

    for (int i = 0; i < WORKERS; i++)
        assert_int_equal(pthread_create(&th[i], NULL, worker, m), 0);
    for (int i = 0; i < 50; i++) /* scrape while they record */
        free(metrics_render(m));
    for (int i = 0; i < WORKERS; i++)
        pthread_join(th[i], NULL);
    char *text = metrics_render(m);
    assert_true(sample(text, "walbust_transactions_total") == WORKERS * PER_WORKER);
    assert_true(sample(text, "walbust_changes_total{table=\"public.a\",op=\"insert\"}") ==
                WORKERS * PER_WORKER / 2);
    assert_true(sample(text, "walbust_commit_to_ack_seconds_count") == WORKERS * PER_WORKER);
    assert_true(sample(text, "walbust_commit_to_ack_seconds_bucket{le=\"0.001\"}") == 0);
    assert_true(sample(text, "walbust_commit_to_ack_seconds_bucket{le=\"0.0025\"}") ==
                WORKERS * PER_WORKER);
    free(text);
    metrics_free(m);
}

/* ---- HTTP --------------------------------------------------------------- */

static int free_port(void)
{
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof sa;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(fd >= 0);
    assert_int_equal(bind(fd, (struct sockaddr *)&sa, sizeof sa), 0);
    assert_int_equal(getsockname(fd, (struct sockaddr *)&sa, &len), 0);
    close(fd);
    return ntohs(sa.sin_port);
}

/* One HTTP/1.0 request on a fresh connection; returns the status code and
 * the whole response (headers and body) in a malloc'd *resp. */
static int http(int family, int port, const char *method, const char *path, char **resp)
{
    struct sockaddr_storage ss = {0};
    socklen_t sl;
    struct timeval tv = {5, 0};
    char req[256];
    size_t len = 0, cap = 8192;
    char *buf = malloc(cap);
    int fd = socket(family, SOCK_STREAM, 0);
    ssize_t n;

    assert_non_null(buf);
    assert_true(fd >= 0);
    if (family == AF_INET) {
        struct sockaddr_in *sa = (struct sockaddr_in *)&ss;
        sa->sin_family = AF_INET;
        sa->sin_port = htons((uint16_t)port);
        sa->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        sl = sizeof *sa;
    } else {
        struct sockaddr_in6 *sa = (struct sockaddr_in6 *)&ss;
        sa->sin6_family = AF_INET6;
        sa->sin6_port = htons((uint16_t)port);
        sa->sin6_addr = in6addr_loopback;
        sl = sizeof *sa;
    }
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    assert_int_equal(connect(fd, (struct sockaddr *)&ss, sl), 0);
    snprintf(req, sizeof req, "%s %s HTTP/1.0\r\nHost: localhost\r\n\r\n", method, path);
    assert_int_equal(send(fd, req, strlen(req), MSG_NOSIGNAL), (ssize_t)strlen(req));
    while ((n = recv(fd, buf + len, cap - len - 1, 0)) > 0) {
        len += (size_t)n;
        if (cap - len < 1024) {
            cap *= 2;
            buf = realloc(buf, cap);
            assert_non_null(buf);
        }
    }
    assert_int_equal(n, 0); /* clean EOF, not a timeout */
    close(fd);
    buf[len] = '\0';
    *resp = buf;
    assert_true(strncmp(buf, "HTTP/1.", 7) == 0);
    return atoi(buf + 9);
}

static const char *body_of(const char *resp)
{
    const char *b = strstr(resp, "\r\n\r\n");
    assert_non_null(b);
    return b + 4;
}

static void test_http_endpoints(void **state)
{
    (void)state;
    Metrics *m = metrics_new();
    int port = free_port();
    char addr[64], err[256] = "", *resp;

    snprintf(addr, sizeof addr, "127.0.0.1:%d", port);
    assert_int_equal(metrics_listen(m, addr, err, sizeof err), 0);

    assert_int_equal(http(AF_INET, port, "GET", "/healthz", &resp), 200);
    assert_string_equal(body_of(resp), "ok\n");
    free(resp);

    assert_int_equal(http(AF_INET, port, "GET", "/readyz", &resp), 503);
    assert_non_null(strstr(body_of(resp), "not streaming from postgresql"));
    free(resp);
    metrics_postgres_up(m, true);
    assert_int_equal(http(AF_INET, port, "GET", "/readyz", &resp), 503);
    assert_non_null(strstr(body_of(resp), "redis"));
    free(resp);
    metrics_redis_up(m, 0, "redis://127.0.0.1:6379", true);
    assert_int_equal(http(AF_INET, port, "GET", "/readyz", &resp), 200);
    free(resp);
    metrics_redis_target(m, 0, "redis://127.0.0.1:6379", false, "READONLY You can't write");
    metrics_set_condition(m, METRICS_COND_PUBLICATION, false, "publication \"p\" was dropped");
    assert_int_equal(http(AF_INET, port, "GET", "/readyz", &resp), 503);
    assert_string_equal(body_of(resp), "redis target redis://127.0.0.1:6379 is down: READONLY "
                                       "You can't write\npublication: publication \"p\" was "
                                       "dropped\n");
    free(resp);
    metrics_redis_target(m, 0, "redis://127.0.0.1:6379", true, NULL);
    metrics_set_condition(m, METRICS_COND_PUBLICATION, true, NULL);
    assert_int_equal(http(AF_INET, port, "GET", "/readyz", &resp), 200);
    assert_string_equal(body_of(resp), "ready\n");
    free(resp);

    metrics_inc(m, METRICS_TRANSACTIONS, 41);
    assert_int_equal(http(AF_INET, port, "GET", "/metrics", &resp), 200);
    assert_non_null(strstr(resp, "Content-Type: text/plain; version=0.0.4"));
    assert_valid_exposition(body_of(resp));
    assert_true(sample(body_of(resp), "walbust_transactions_total") == 41);
    free(resp);
    metrics_inc(m, METRICS_TRANSACTIONS, 1); /* the scrape sees the loop move */
    assert_int_equal(http(AF_INET, port, "GET", "/metrics", &resp), 200);
    assert_true(sample(body_of(resp), "walbust_transactions_total") == 42);
    free(resp);

    assert_int_equal(http(AF_INET, port, "GET", "/nope", &resp), 404);
    free(resp);
    assert_int_equal(http(AF_INET, port, "POST", "/metrics", &resp), 405);
    free(resp);

    /* The port is taken: a second server says so, naming the address. */
    Metrics *m2 = metrics_new();
    assert_int_equal(metrics_listen(m2, addr, err, sizeof err), -1);
    assert_non_null(strstr(err, addr));
    assert_non_null(strstr(err, "in use"));
    metrics_free(m2);
    metrics_free(m); /* stops the server */

    /* After metrics_free the port is closed. */
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET,
                             .sin_port = htons((uint16_t)port),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    assert_int_not_equal(connect(fd, (struct sockaddr *)&sa, sizeof sa), 0);
    close(fd);
}

static void test_listen_addresses(void **state)
{
    (void)state;
    static const char *const bad[] = {"9187",
                                      "127.0.0.1",
                                      "127.0.0.1:",
                                      "127.0.0.1:x",
                                      "[::1:9187",
                                      "[::1]9187",
                                      "no.such.host.invalid:9187"};
    char err[256], addr[64], *resp;
    Metrics *m = metrics_new();

    assert_int_equal(metrics_listen(m, "off", err, sizeof err), 0);
    assert_int_equal(metrics_listen(m, NULL, err, sizeof err), 0);
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        err[0] = '\0';
        assert_int_equal(metrics_listen(m, bad[i], err, sizeof err), -1);
        assert_non_null(strstr(err, "metrics address"));
    }
    metrics_free(m);

    /* ":PORT" listens on every interface (reachable on IPv4 loopback). */
    int port = free_port();
    m = metrics_new();
    snprintf(addr, sizeof addr, ":%d", port);
    assert_int_equal(metrics_listen(m, addr, err, sizeof err), 0);
    assert_int_equal(http(AF_INET, port, "GET", "/healthz", &resp), 200);
    free(resp);
    metrics_free(m);

    /* "[::1]:PORT", when this machine has IPv6 loopback. */
    int probe = socket(AF_INET6, SOCK_STREAM, 0);
    struct sockaddr_in6 sa6 = {.sin6_family = AF_INET6, .sin6_addr = IN6ADDR_LOOPBACK_INIT};
    bool v6 = probe >= 0 && bind(probe, (struct sockaddr *)&sa6, sizeof sa6) == 0;
    if (probe >= 0)
        close(probe);
    if (!v6) {
        print_message("no IPv6 loopback here: [::1] not tested\n");
        return;
    }
    port = free_port();
    m = metrics_new();
    snprintf(addr, sizeof addr, "[::1]:%d", port);
    assert_int_equal(metrics_listen(m, addr, err, sizeof err), 0);
    assert_int_equal(http(AF_INET6, port, "GET", "/healthz", &resp), 200);
    free(resp);
    metrics_free(m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_render_families), cmocka_unit_test(test_counters_monotonic),
        cmocka_unit_test(test_label_escaping),  cmocka_unit_test(test_refresh_counters),
        cmocka_unit_test(test_labelled_counts), cmocka_unit_test(test_audit_counters),
        cmocka_unit_test(test_histogram),       cmocka_unit_test(test_batch_stages),
        cmocka_unit_test(test_positions),       cmocka_unit_test(test_ready),
        cmocka_unit_test(test_ready_reasons),   cmocka_unit_test(test_concurrent_recording),
        cmocka_unit_test(test_http_endpoints),  cmocka_unit_test(test_listen_addresses),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
