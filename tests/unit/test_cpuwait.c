/* Unit tests for cpuwait.c, the automatic flush interval: an idle or
 * lightly loaded thread keeps the minimum; a thread that waits for a CPU
 * gets CPUWAIT_FACTOR x its wait, capped; the interval comes back down when
 * the contention ends, also when wakeups become too few to measure; short
 * windows and counters that go backwards change nothing; a host whose CPUs
 * are nearly all busy raises the interval even when walbust itself is
 * served at once. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "cpuwait.h"

#define MIN_US 200
#define MAX_US 2000

/* A thread that, every 100 ms window from t, ran `wakeups` times and
 * waited wait_us per wakeup; windows counts them. Returns the time after. */
typedef struct Thread {
    int64_t now_us;
    uint64_t delay_ns, slices;
} Thread;

static void windows(CpuWait *w, Thread *t, int n, uint64_t wakeups, double wait_us)
{
    for (int i = 0; i < n; i++) {
        t->now_us += CPUWAIT_WINDOW_US;
        t->slices += wakeups;
        t->delay_ns += (uint64_t)(wait_us * 1000.0 * (double)wakeups);
        assert_true(cpuwait_due(w, t->now_us));
        cpuwait_sample(w, t->now_us, t->delay_ns, t->slices);
    }
}

static void start(CpuWait *w, Thread *t)
{
    *t = (Thread){.now_us = 1000000, .delay_ns = 5000000, .slices = 1000};
    cpuwait_init(w, MIN_US, MAX_US);
    assert_int_equal(cpuwait_interval_us(w), MIN_US);
    assert_true(cpuwait_due(w, t->now_us)); /* no window yet */
    assert_false(cpuwait_sample(w, t->now_us, t->delay_ns, t->slices));
    assert_int_equal(cpuwait_interval_us(w), MIN_US);
}

static void test_uncontended_keeps_minimum(void **state)
{
    CpuWait w;
    Thread t;
    (void)state;

    start(&w, &t);
    /* ~1k commits/s on an idle 2-core VM: 3,000 wakeups/s, 35 µs each;
     * and noise: a window of 150 µs now and then. */
    windows(&w, &t, 50, 300, 35.0);
    assert_int_equal(cpuwait_interval_us(&w), MIN_US);
    for (int i = 0; i < 10; i++) {
        windows(&w, &t, 1, 300, 150.0);
        windows(&w, &t, 4, 300, 35.0);
        assert_int_equal(cpuwait_interval_us(&w), MIN_US);
    }
}

static void test_contended_follows_wait_and_caps(void **state)
{
    CpuWait w;
    Thread t;
    (void)state;

    start(&w, &t);
    /* A saturated host: 250 µs per wakeup. After ~2 s of it the smoothed
     * wait is 250 µs (±1 %): the interval is 6 x (250 - 80) = 1.02 ms. */
    windows(&w, &t, 20, 250, 250.0);
    assert_in_range(cpuwait_interval_us(&w), 1000, CPUWAIT_FACTOR * (250 - CPUWAIT_FREE_US));
    /* Three windows (0.3 s) after the load began it has moved. */
    start(&w, &t);
    windows(&w, &t, 3, 250, 250.0);
    assert_in_range(cpuwait_interval_us(&w), MIN_US + 1, 1000 - 1);
    /* Never more than the cap, whatever the wait. */
    windows(&w, &t, 30, 100, 5000.0);
    assert_int_equal(cpuwait_interval_us(&w), MAX_US);
}

static void test_comes_back_down(void **state)
{
    CpuWait w;
    Thread t;
    (void)state;

    start(&w, &t);
    windows(&w, &t, 20, 250, 250.0);
    assert_true(cpuwait_interval_us(&w) > MIN_US);
    /* The load ends, commits go on: back to the minimum within ~2 s. */
    windows(&w, &t, 20, 300, 20.0);
    assert_int_equal(cpuwait_interval_us(&w), MIN_US);

    /* The load ends with the commits: too few wakeups to measure. Windows
     * of 100 ms stay open until 1 s has passed, then count as no wait. */
    windows(&w, &t, 20, 250, 250.0);
    assert_true(cpuwait_interval_us(&w) > MIN_US);
    for (int i = 0; i < 9; i++) {
        t.now_us += CPUWAIT_WINDOW_US;
        t.slices += 1;
        t.delay_ns += 300000;
        assert_false(cpuwait_sample(&w, t.now_us, t.delay_ns, t.slices));
    }
    assert_true(cpuwait_interval_us(&w) > MIN_US);
    for (int i = 0; i < 20; i++) {
        t.now_us += CPUWAIT_IDLE_WINDOW_US;
        t.slices += 5;
        t.delay_ns += 5 * 300000;
        cpuwait_sample(&w, t.now_us, t.delay_ns, t.slices);
    }
    assert_int_equal(cpuwait_interval_us(&w), MIN_US);
}

static void test_short_windows_and_resets(void **state)
{
    CpuWait w;
    Thread t;
    (void)state;

    start(&w, &t);
    /* Before the window is over nothing changes, however bad the wait. */
    assert_false(cpuwait_due(&w, t.now_us + CPUWAIT_WINDOW_US - 1));
    assert_false(cpuwait_sample(&w, t.now_us + CPUWAIT_WINDOW_US / 2, t.delay_ns + 1000000000,
                                t.slices + 100));
    assert_int_equal(cpuwait_interval_us(&w), MIN_US);
    /* Counters that go backwards (another thread's, a restarted reading)
     * restart the window: no sample from a negative difference. */
    t.now_us += CPUWAIT_WINDOW_US;
    assert_false(cpuwait_sample(&w, t.now_us, t.delay_ns - 1000, t.slices + 500));
    assert_int_equal(cpuwait_interval_us(&w), MIN_US);
    t.delay_ns -= 1000;
    t.slices += 500;
    windows(&w, &t, 5, 300, 30.0);
    assert_int_equal(cpuwait_interval_us(&w), MIN_US);
    /* A clock that goes backwards restarts the window too. */
    assert_false(cpuwait_sample(&w, t.now_us - 5, t.delay_ns + 100000000, t.slices + 200));
    assert_int_equal(cpuwait_interval_us(&w), MIN_US);
}

/* Like windows(), with the host's CPUs busy `busy` of the time (NULL host
 * when busy < 0: unknown). */
static void host_windows(CpuWait *w, Thread *t, CpuHost *h, int n, uint64_t wakeups, double wait_us,
                         double busy)
{
    for (int i = 0; i < n; i++) {
        t->now_us += CPUWAIT_WINDOW_US;
        t->slices += wakeups;
        t->delay_ns += (uint64_t)(wait_us * 1000.0 * (double)wakeups);
        h->total += 2000; /* two CPUs, 100 ms, in µs */
        h->busy += (uint64_t)(2000 * (busy < 0 ? 0 : busy));
        cpuwait_sample_host(w, t->now_us, t->delay_ns, t->slices, busy < 0 ? NULL : h);
    }
}

static void test_busy_host_raises(void **state)
{
    CpuWait w;
    Thread t;
    CpuHost h = {.busy = 123456, .total = 987654};
    (void)state;

    /* walbust is served at once (35 µs per wakeup), but the host's CPUs
     * are 97 % busy (pgbench): after ~2 s the interval is the maximum. */
    start(&w, &t);
    host_windows(&w, &t, &h, 20, 300, 35.0, 0.97);
    assert_int_equal(cpuwait_interval_us(&w), MAX_US);
    /* The load ends: back to the minimum within ~2 s. */
    host_windows(&w, &t, &h, 20, 300, 35.0, 0.30);
    assert_int_equal(cpuwait_interval_us(&w), MIN_US);
    /* Half way between CPUWAIT_HOST_FREE and _FULL: about half way. */
    host_windows(&w, &t, &h, 40, 300, 35.0, (CPUWAIT_HOST_FREE + CPUWAIT_HOST_FULL) / 2);
    assert_in_range(cpuwait_interval_us(&w), MIN_US + (MAX_US - MIN_US) / 2 - 50,
                    MIN_US + (MAX_US - MIN_US) / 2 + 50);
    /* Busy, but under CPUWAIT_HOST_FREE: the minimum. */
    host_windows(&w, &t, &h, 40, 300, 35.0, CPUWAIT_HOST_FREE - 0.05);
    assert_int_equal(cpuwait_interval_us(&w), MIN_US);
    /* The larger signal wins: a long wait on a host that is not busy. */
    host_windows(&w, &t, &h, 20, 250, 250.0, 0.10);
    assert_in_range(cpuwait_interval_us(&w), 1000, CPUWAIT_FACTOR * (250 - CPUWAIT_FREE_US));
}

static void test_host_unknown_or_backwards(void **state)
{
    CpuWait w;
    Thread t;
    CpuHost h = {.busy = 1000, .total = 2000};
    (void)state;

    /* No host counters (no /proc/stat): only the wait counts. */
    start(&w, &t);
    host_windows(&w, &t, &h, 20, 300, 35.0, -1);
    assert_int_equal(cpuwait_interval_us(&w), MIN_US);
    /* Counters that go backwards, or more busy time than time: no sample
     * (idle), never a jump. */
    start(&w, &t);
    host_windows(&w, &t, &h, 1, 300, 35.0, 0.97);
    for (int i = 0; i < 20; i++) {
        CpuHost back = {.busy = h.busy + 5000, .total = h.total + 10};
        t.now_us += CPUWAIT_WINDOW_US;
        t.slices += 300;
        t.delay_ns += 300 * 35000;
        cpuwait_sample_host(&w, t.now_us, t.delay_ns, t.slices, i % 2 ? &back : &h);
    }
    assert_int_equal(cpuwait_interval_us(&w), MIN_US);
}

static void test_fixed_range(void **state)
{
    CpuWait w;
    Thread t = {.now_us = 1, .delay_ns = 0, .slices = 0};
    (void)state;

    /* min == max: a fixed interval whatever the load. */
    cpuwait_init(&w, 500, 500);
    cpuwait_sample(&w, t.now_us, 0, 0);
    windows(&w, &t, 10, 250, 1000.0);
    assert_int_equal(cpuwait_interval_us(&w), 500);
    /* max < min is taken as min. */
    cpuwait_init(&w, 500, 100);
    assert_int_equal(w.max_us, 500);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_uncontended_keeps_minimum),
        cmocka_unit_test(test_contended_follows_wait_and_caps),
        cmocka_unit_test(test_comes_back_down),
        cmocka_unit_test(test_short_windows_and_resets),
        cmocka_unit_test(test_busy_host_raises),
        cmocka_unit_test(test_host_unknown_or_backwards),
        cmocka_unit_test(test_fixed_range),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
