/* Unit tests for commitpace.c, whether commits arrive more than one per
 * flush interval: not before any commit; not at ordinary rates (~1,400
 * commits/s with exponential gaps, a fixed pseudo-random sequence), even
 * with a few close commits among them; yes at ~10k commits/s and for a
 * burst, within a few commits; no longer soon after the burst; a pause of
 * an hour weighs like any long gap; out-of-order timestamps count as
 * simultaneous; the interval in use is what "busy" is measured against. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "commitpace.h"

#define T 200 /* the flush interval, µs */

static uint32_t seed = 12345;

/* An exponential gap of the given mean, µs (fixed sequence). */
static int64_t exp_gap(double mean_us)
{
    seed = seed * 1103515245u + 12345u;
    double u = ((double)(seed >> 8) + 1.0) / 16777217.0;
    return (int64_t)(-mean_us * log(u));
}

static void test_nothing_seen_is_not_busy(void **state)
{
    CommitPace p;
    (void)state;

    commitpace_init(&p);
    assert_false(commitpace_busy(&p, T));
    commitpace_add(&p, 1000000, T);
    assert_false(commitpace_busy(&p, T)); /* one commit: no pace yet */
}

/* n commits with exponential gaps of mean_us after *t: how many times
 * commitpace_busy() said yes after one. */
static int poisson_commits(CommitPace *p, int64_t *t, double mean_us, int n)
{
    int busy = 0;

    for (int i = 0; i < n; i++) {
        *t += exp_gap(mean_us);
        commitpace_add(p, *t, T);
        busy += commitpace_busy(p, T);
    }
    return busy;
}

static void test_ordinary_rate_is_not_busy(void **state)
{
    CommitPace p;
    int64_t t = 0;
    int busy;
    (void)state;

    commitpace_init(&p);
    busy = poisson_commits(&p, &t, 700.0, 200000);
    /* simulated: 0.002 % */
    assert_true(busy < 20);
    /* a few close commits among them change nothing */
    for (int i = 0; i < 50; i++) {
        t += 700;
        commitpace_add(&p, t, T);
    }
    for (int i = 0; i < 3; i++) {
        t += 5;
        commitpace_add(&p, t, T);
        assert_false(commitpace_busy(&p, T));
    }
}

static void test_high_rate_is_busy(void **state)
{
    CommitPace p;
    int64_t t = 0;
    (void)state;

    commitpace_init(&p);
    /* ~10k commits/s */
    assert_true(poisson_commits(&p, &t, 100.0, 200000) > 190000);
}

static void test_burst_is_seen_and_ends(void **state)
{
    CommitPace p;
    int64_t t = 0;
    int n = 0;
    (void)state;

    commitpace_init(&p);
    for (int i = 0; i < 100; i++) {
        t += 1000000; /* one a second */
        commitpace_add(&p, t, T);
    }
    assert_false(commitpace_busy(&p, T));
    /* back to back: busy within a few commits (the gap falls from its
     * cap, 4 intervals, under one) */
    while (!commitpace_busy(&p, T)) {
        t += 10;
        commitpace_add(&p, t, T);
        n++;
        assert_true(n <= 12);
    }
    /* the burst ends: one commit a millisecond */
    n = 0;
    while (commitpace_busy(&p, T)) {
        t += 1000;
        commitpace_add(&p, t, T);
        n++;
        assert_true(n <= 12);
    }
}

static void test_pause_is_capped(void **state)
{
    CommitPace p;
    int64_t t = 0;
    (void)state;

    commitpace_init(&p);
    for (int i = 0; i < 100; i++) {
        t += 10;
        commitpace_add(&p, t, T);
    }
    t += 3600LL * 1000000; /* an idle hour */
    commitpace_add(&p, t, T);
    assert_true(p.gap_us <= COMMITPACE_GAP_CAP * T);
}

static void test_out_of_order_counts_as_simultaneous(void **state)
{
    CommitPace p;
    int64_t t = 1000000;
    (void)state;

    commitpace_init(&p);
    commitpace_add(&p, t, T);
    for (int i = 0; i < 40; i++) {
        /* concurrent commits: each a little before the one decoded before */
        commitpace_add(&p, t - 3, T);
        commitpace_add(&p, t + 20, T);
        t += 20;
    }
    assert_true(commitpace_busy(&p, T));
    assert_true(p.last_us == t); /* the clock never went back */
}

static void test_interval_is_followed(void **state)
{
    CommitPace p;
    int64_t t = 0;
    (void)state;

    commitpace_init(&p);
    for (int i = 0; i < 200; i++) {
        t += 400; /* 2,500 commits/s, as under pgbench here */
        commitpace_add(&p, t, 1000);
    }
    /* more than one per 1 ms (auto under load), fewer than one per 0.2 ms */
    assert_true(commitpace_busy(&p, 1000));
    assert_false(commitpace_busy(&p, 200));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_nothing_seen_is_not_busy),
        cmocka_unit_test(test_ordinary_rate_is_not_busy),
        cmocka_unit_test(test_high_rate_is_busy),
        cmocka_unit_test(test_burst_is_seen_and_ends),
        cmocka_unit_test(test_pause_is_capped),
        cmocka_unit_test(test_out_of_order_counts_as_simultaneous),
        cmocka_unit_test(test_interval_is_followed),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
