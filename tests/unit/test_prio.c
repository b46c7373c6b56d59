/* Unit tests for prio.c, whether walbust may yield a granted nice value
 * while catching up: never when none was granted (nice 0 or positive);
 * with CAP_SYS_NICE always; by RLIMIT_NICE only when its soft limit
 * reaches the granted value (20 - rlim_cur), unlimited included; and
 * CAP_SYS_NICE read from /proc/self/status's CapEff line, not from the
 * other capability lines, and not from a missing or malformed one. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "prio.h"

static void test_nothing_granted_nothing_to_yield(void **state)
{
    (void)state;
    assert_false(prio_can_return(0, PRIO_RLIM_INFINITY, true));
    assert_false(prio_can_return(5, 40, true));
    assert_false(prio_can_return(19, 0, false));
}

static void test_cap_sys_nice_may_return(void **state)
{
    (void)state;
    assert_true(prio_can_return(-5, 0, true));
    assert_true(prio_can_return(-20, 0, true));
}

static void test_rlimit_nice_must_reach_the_value(void **state)
{
    (void)state;
    /* systemd's default: RLIMIT_NICE 0, nothing below 20 */
    assert_false(prio_can_return(-5, 0, false));
    /* LimitNICE=-5 is rlim_cur 25: -5 and above */
    assert_true(prio_can_return(-5, 25, false));
    assert_true(prio_can_return(-4, 25, false));
    assert_false(prio_can_return(-6, 25, false));
    /* 20: nice 0 at best */
    assert_false(prio_can_return(-1, 20, false));
    assert_true(prio_can_return(-20, 40, false));
    assert_true(prio_can_return(-20, 1000, false));
    assert_true(prio_can_return(-20, PRIO_RLIM_INFINITY, false));
}

static void test_capeff_is_parsed(void **state)
{
    (void)state;
    /* bit 23 set in CapEff only */
    assert_true(prio_capeff_sys_nice("Name:\twalbust\nCapInh:\t0000000000000000\n"
                                     "CapPrm:\t0000000000800000\nCapEff:\t0000000000800000\n"
                                     "CapBnd:\t000001ffffffffff\n"));
    /* root's full set */
    assert_true(prio_capeff_sys_nice("CapEff:\t000001fffeffffff\n"));
    /* everything but bit 23 */
    assert_false(prio_capeff_sys_nice("CapEff:\t000001ffff7fffff\n"));
    /* permitted and bounding sets do not count */
    assert_false(prio_capeff_sys_nice("CapPrm:\t0000000000800000\nCapEff:\t0000000000000000\n"
                                      "CapBnd:\t0000000000800000\n"));
    /* the last line without a newline */
    assert_true(prio_capeff_sys_nice("Name:\tx\nCapEff:\t0000000000800000"));
}

static void test_capeff_missing_or_malformed(void **state)
{
    (void)state;
    assert_false(prio_capeff_sys_nice(""));
    assert_false(prio_capeff_sys_nice("Name:\twalbust\nCapPrm:\t0000000000800000\n"));
    assert_false(prio_capeff_sys_nice("CapEff:\t\n"));
    assert_false(prio_capeff_sys_nice("CapEff:\tzz00000000800000\n"));
    assert_false(prio_capeff_sys_nice("CapEff:\t0000000000800000 junk\n"));
    assert_false(prio_capeff_sys_nice("XCapEff:\t0000000000800000\n"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_nothing_granted_nothing_to_yield),
        cmocka_unit_test(test_cap_sys_nice_may_return),
        cmocka_unit_test(test_rlimit_nice_must_reach_the_value),
        cmocka_unit_test(test_capeff_is_parsed),
        cmocka_unit_test(test_capeff_missing_or_malformed),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
