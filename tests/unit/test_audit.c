/*
 * Unit tests for the cache audit's pure parts: audit.c (compare, the
 * two-read verdict, sampling, the checks-per-second bucket, nines, log
 * values) and rules_audit.c (audit keys read back into arguments, SCAN
 * patterns, the check --pg verdict on the SQL's shape).
 *
 * Table-driven from tests/fixtures/audit/:
 *   match.case    a rules file, then "pattern RULE TEXT" and
 *                 "match RULE KEY => ARGS|nomatch|ambiguous" lines
 *   compare.case  "MODE CACHED DATABASE => equal|differ" lines
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "audit.h"
#include "rules.h"

#define FIXTURES SOURCE_DIR "/tests/fixtures/audit"

static char *slurp(const char *path)
{
    FILE *f = fopen(path, "rb");
    long n;
    char *buf;

    if (f == NULL)
        fail_msg("cannot open %s", path);
    fseek(f, 0, SEEK_END);
    n = ftell(f);
    rewind(f);
    buf = malloc((size_t)n + 1);
    assert_non_null(buf);
    assert_int_equal(fread(buf, 1, (size_t)n, f), (size_t)n);
    buf[n] = '\0';
    fclose(f);
    return buf;
}

/* ---- match.case ------------------------------------------------------- */

static void check_match(const Rules *r, char *line, int lineno)
{
    char *arrow = strstr(line, " => ");
    char *key, got[512] = "";
    const char *want;
    size_t ri;
    RulesAuditArgs a;
    int rc;

    if (arrow == NULL) {
        arrow = line + strlen(line) - 3; /* "match 4 key =>" with empty args */
        assert_string_equal(arrow, " =>");
        want = "";
    } else {
        want = arrow + 4;
    }
    *arrow = '\0';
    ri = strtoul(line + 6, &key, 10);
    key++;
    rc = rules_audit_match(r, ri, key, strlen(key), &a);
    if (rc == 0)
        snprintf(got, sizeof got, "nomatch");
    else if (rc < 0)
        snprintf(got, sizeof got, "ambiguous");
    for (size_t i = 0; rc == 1 && i < a.n; i++) {
        assert_int_equal(a.lens[i], (int)strlen(a.args[i]));
        snprintf(got + strlen(got), sizeof got - strlen(got), "%s%s", i ? "|" : "", a.args[i]);
    }
    if (strcmp(got, want) != 0)
        fail_msg("match.case:%d: rule %zu key \"%s\": got \"%s\", want \"%s\"", lineno, ri, key,
                 got, want);
    rules_audit_args_release(&a);
}

static void test_match_case(void **state)
{
    char *text = slurp(FIXTURES "/match.case"), *save = NULL;
    Rules *r = NULL;
    int lineno = 0, checks = 0;

    (void)state;
    for (char *line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        lineno++;
        if (line[0] == '#' || line[0] == '\0')
            continue;
        if (strncmp(line, "rules ", 6) == 0) {
            RulesProblems p = {0};
            r = rules_parse(line + 6, strlen(line + 6), &p);
            if (r == NULL)
                fail_msg("match.case: rules do not load: %s", p.count ? p.items[0].msg : "?");
        } else if (strncmp(line, "pattern ", 8) == 0) {
            char *rest;
            size_t ri = strtoul(line + 8, &rest, 10);
            char *pat = rules_audit_pattern(r, ri);
            assert_non_null(pat);
            if (strcmp(pat, rest + 1) != 0)
                fail_msg("match.case: pattern of rule %zu is \"%s\", want \"%s\"", ri, pat,
                         rest + 1);
            free(pat);
            checks++;
        } else if (strncmp(line, "match ", 6) == 0) {
            check_match(r, line, lineno);
            checks++;
        } else {
            fail_msg("match.case: bad line: %s", line);
        }
    }
    assert_true(checks >= 20);
    assert_null(rules_audit_pattern(r, 5)); /* a rule without an audit */
    assert_true(rules_has_audits(r));
    rules_free(r);
    free(text);
}

/* ---- compare.case ------------------------------------------------------ */

/* A "quoted" value with escapes at *p into out; returns its length. */
static size_t unquote(char **p, char *out)
{
    char *s = *p;
    size_t n = 0;

    assert_int_equal(*s, '"');
    for (s++; *s != '"'; s++) {
        if (*s == '\\') {
            s++;
            if (*s == 'x') {
                char hex[3] = {s[1], s[2], 0};
                out[n++] = (char)strtol(hex, NULL, 16);
                s += 2;
                continue;
            }
            out[n++] = *s == 'n' ? '\n' : *s == 't' ? '\t' : *s;
        } else {
            out[n++] = *s;
        }
    }
    *p = s + 1;
    return n;
}

static void test_compare_case(void **state)
{
    char *text = slurp(FIXTURES "/compare.case"), *save = NULL;
    int checks = 0;

    (void)state;
    for (char *line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        char v[256], d[256], *p = strchr(line, ' ');
        size_t vn, dn = 0;
        bool json, absent = false, want;
        if (line[0] == '#' || line[0] == '\0')
            continue;
        json = strncmp(line, "json", 4) == 0;
        p++;
        vn = unquote(&p, v);
        p++;
        if (strncmp(p, "absent", 6) == 0) {
            absent = true;
            p += 6;
        } else {
            dn = unquote(&p, d);
        }
        want = strcmp(p, " => equal") == 0;
        assert_true(want || strcmp(p, " => differ") == 0);
        if (audit_equal(json, v, vn, &(AuditDb){absent, d, dn}) != want)
            fail_msg("compare.case: %s: got %s", line, want ? "differ" : "equal");
        checks++;
    }
    assert_true(checks >= 15);
    free(text);
}

/* ---- the two-read verdict ------------------------------------------------ */

static void test_verdict(void **state)
{
    AuditKey absent = {AUDIT_KEY_ABSENT, NULL, 0}, other = {AUDIT_KEY_NOT_STR, NULL, 0};
    AuditKey v = {AUDIT_KEY_VALUE, "old", 3}, changed = {AUDIT_KEY_VALUE, "new", 3};
    AuditKey lease = {AUDIT_KEY_VALUE, "\0walbust-lease:1.2.3", 20};
    AuditKey stale_marker = {AUDIT_KEY_VALUE, "\0walbust-lease:stale:0::old", 27};
    AuditDb d_new = {false, "new", 3}, d_old = {false, "old", 3}, d_absent = {true, NULL, 0};

    (void)state;
    /* Step 1: nothing to check. */
    assert_int_equal(audit_first(false, &absent, &d_new), AUDIT_SKIP);
    assert_int_equal(audit_first(false, &other, &d_new), AUDIT_SKIP);
    assert_int_equal(audit_first(false, &lease, &d_new), AUDIT_SKIP);
    assert_int_equal(audit_first(false, &stale_marker, &d_new), AUDIT_SKIP);
    assert_true(audit_is_marker(lease.val, lease.len));
    assert_false(audit_is_marker("walbust-lease:x", 15));
    assert_false(audit_is_marker("\0walbust-lease", 14));
    /* Step 2. */
    assert_int_equal(audit_first(false, &v, &d_old), AUDIT_CLEAN);
    assert_int_equal(audit_first(false, &v, &d_new), AUDIT_VERIFY);
    assert_int_equal(audit_first(false, &v, &d_absent), AUDIT_VERIFY);
    /* Step 3: gone or changed is never a finding. */
    assert_int_equal(audit_second(false, &v, &absent, NULL), AUDIT_CLEAN);
    assert_int_equal(audit_second(false, &v, &changed, NULL), AUDIT_CLEAN);
    assert_int_equal(audit_second(false, &v, &lease, NULL), AUDIT_CLEAN);
    assert_int_equal(audit_second(false, &v, &other, NULL), AUDIT_CLEAN);
    /* Still V: read the database again; now equal (the row came back to V). */
    assert_int_equal(audit_second(false, &v, &v, NULL), AUDIT_VERIFY);
    assert_int_equal(audit_second(false, &v, &v, &d_old), AUDIT_CLEAN);
    assert_int_equal(audit_second(false, &v, &v, &d_new), AUDIT_STALE);
    assert_int_equal(audit_second(false, &v, &v, &d_absent), AUDIT_STALE);
}

/* ---- sampling, the bucket, nines, log values, rates -------------------- */

static void test_sample(void **state)
{
    AuditSampler s = {0};
    int taken = 0;

    (void)state;
    for (int i = 0; i < 10000; i++)
        taken += audit_sample(&s, 0.01);
    assert_int_equal(taken, 100);
    s = (AuditSampler){0};
    taken = 0;
    for (int i = 0; i < 1000; i++)
        taken += audit_sample(&s, 1.0);
    assert_int_equal(taken, 1000);
    taken = 0;
    for (int i = 0; i < 1000; i++)
        taken += audit_sample(&s, 0.0);
    assert_int_equal(taken, 0);
}

static void test_bucket(void **state)
{
    AuditBucket b;
    int64_t t = 1000000;
    int n = 0;

    (void)state;
    audit_bucket_init(&b, 10, 1, t);
    assert_true(audit_bucket_take(&b, t));
    assert_false(audit_bucket_take(&b, t));
    assert_int_equal(audit_bucket_wait_us(&b, t), 100000);
    assert_int_equal(audit_bucket_wait_us(&b, t + 40000), 60000);
    assert_true(audit_bucket_take(&b, t + 100000));
    /* Over 10 s at most 10 per second, bursts capped at one. */
    for (int64_t at = t + 100000; at < t + 10100000; at += 1000)
        n += audit_bucket_take(&b, at);
    assert_true(n >= 99 && n <= 101);
}

static void test_nines(void **state)
{
    char out[160];

    (void)state;
    assert_true(audit_nines(0, 0) == 0);
    assert_true(audit_nines(1000, 0) > 2.99 && audit_nines(1000, 0) < 3.01);
    assert_true(audit_nines(100000, 1) > 4.99 && audit_nines(100000, 1) < 5.01);
    assert_true(audit_nines(10, 10) == 0);
    audit_consistency(0, 0, out, sizeof out);
    assert_string_equal(out, "no checks yet");
    audit_consistency(2000, 0, out, sizeof out);
    assert_string_equal(out, "no stale entry in 2000 checks (at least 3.3 nines)");
    audit_consistency(100000, 1, out, sizeof out);
    assert_string_equal(out, "99.9990% (5.0 nines): 1 stale in 100000 checks");
}

static void test_show(void **state)
{
    char out[64];

    (void)state;
    audit_show("ab\"c\\", 5, 100, out, sizeof out);
    assert_string_equal(out, "\"ab\\\"c\\\\\"");
    audit_show("\0walbust", 8, 100, out, sizeof out);
    assert_string_equal(out, "\"\\x00walbust\"");
    audit_show("0123456789", 10, 4, out, sizeof out);
    assert_string_equal(out, "\"0123\"...(10 bytes)");
    audit_show("0123456789", 10, 100, out, 6);
    assert_string_equal(out, "\"012\"");
}

static void test_parse_rate(void **state)
{
    double v;

    (void)state;
    assert_true(audit_parse_rate("1", &v) && v == 0.01);
    assert_true(audit_parse_rate("100%", &v) && v == 1.0);
    assert_true(audit_parse_rate("0", &v) && v == 0.0);
    assert_true(audit_parse_rate("0.5", &v) && v == 0.005);
    assert_false(audit_parse_rate("101", &v));
    assert_false(audit_parse_rate("-1", &v));
    assert_false(audit_parse_rate("1x", &v));
    assert_false(audit_parse_rate("", &v));
    assert_false(audit_parse_rate("nan", &v));
}

/* rules_check_audit(): the shape PostgreSQL reports for the SQL. */
static void test_check_shape(void **state)
{
    static const char json[] =
        "{\"rules\": [{\"table\": \"p\", \"keys\": [\"p:{id}\"], \"audit\": {\"key\": "
        "\"p:{id}\", \"sql\": \"SELECT v FROM p WHERE id = $1\", \"args\": [\"{id}\"]}}]}";
    RulesProblems pr = {0};
    Rules *r = rules_parse(json, sizeof json - 1, &pr);

    (void)state;
    assert_non_null(r);
    assert_int_equal(rules_check_audit(r, 0, &(RulesAuditShape){NULL, 0, 1, 1}, &pr), 0);
    assert_int_equal(rules_check_audit(r, 0, &(RulesAuditShape){NULL, 0, 2, 3}, &pr), 2);
    assert_non_null(strstr(pr.items[0].msg, "takes 2 parameters but \"args\" has 1"));
    assert_non_null(strstr(pr.items[1].msg, "returns 3 columns; it must return exactly one"));
    assert_int_equal(
        rules_check_audit(r, 0, &(RulesAuditShape){"relation \"p\" does not exist", 15, 0, 0}, &pr),
        1);
    assert_non_null(strstr(pr.items[2].msg, "does not prepare: relation \"p\" does not exist "
                                            "(at character 15 of the SQL)"));
    assert_true(pr.items[2].line == 1 && pr.items[2].column > 1);
    rules_problems_release(&pr);
    rules_free(r);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_match_case),  cmocka_unit_test(test_compare_case),
        cmocka_unit_test(test_verdict),     cmocka_unit_test(test_sample),
        cmocka_unit_test(test_bucket),      cmocka_unit_test(test_nines),
        cmocka_unit_test(test_show),        cmocka_unit_test(test_parse_rate),
        cmocka_unit_test(test_check_shape),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
