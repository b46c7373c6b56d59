/* Unit tests for slotguard.c: the lost-slot judgement and the mark. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <cmocka.h>

#include "slotguard.h"

#define SYS "7301234567890123456"

static StreamSlot slot_at(bool exists, uint64_t confirmed, uint64_t wal_now)
{
    StreamSlot s = {.exists = exists, .confirmed = confirmed, .wal_now = wal_now};

    snprintf(s.system_id, sizeof s.system_id, SYS);
    snprintf(s.database, sizeof s.database, "app");
    return s;
}

static SlotEvidence redis_with(bool watermark, uint64_t wm, bool mark)
{
    SlotEvidence ev = {
        .redis_read = true, .has_watermark = watermark, .watermark = wm, .has_mark = mark};

    snprintf(ev.mark.system_id, sizeof ev.mark.system_id, SYS);
    snprintf(ev.mark.database, sizeof ev.mark.database, "app");
    ev.mark.since = 0x100;
    return ev;
}

/* One row of the decision table. */
typedef struct Case {
    const char *name;
    StreamSlot slot;
    SlotEvidence ev;
    bool create;
    SlotVerdict want;
    uint64_t from, to; /* SLOT_LOST */
} Case;

static void test_decision_table(void **state)
{
    SlotEvidence unread = {0};
    SlotEvidence here = {.streamed_here = true, .here_limit = 0x500};
    SlotEvidence here_read = redis_with(true, 0x400, true);
    StreamSlot lost_slot = slot_at(true, 0x300, 0x9000);
    SlotEvidence other = redis_with(true, 0x500, true);
    SlotEvidence here_nokeys = {.streamed_here = true, .here_limit = 0x500, .redis_read = true};
    Case cases[] = {
        {"first use, create", slot_at(false, 0, 0x900), redis_with(false, 0, false), true,
         SLOT_CREATE, 0, 0},
        {"first use, no create", slot_at(false, 0, 0x900), redis_with(false, 0, false), false,
         SLOT_MISSING, 0, 0},
        {"missing, watermark, create", slot_at(false, 0, 0x900), redis_with(true, 0x500, false),
         true, SLOT_LOST, 0x500, 0x900},
        {"missing, mark only", slot_at(false, 0, 0x900), redis_with(false, 0, true), true,
         SLOT_LOST, 0x100, 0x900},
        {"missing, streamed here, redis down", slot_at(false, 0, 0x900), here, true, SLOT_LOST,
         0x500, 0x900},
        {"missing, redis down", slot_at(false, 0, 0x900), unread, true, SLOT_WAIT, 0, 0},
        {"exists, redis down", slot_at(true, 0x600, 0x900), unread, false, SLOT_UNVERIFIED, 0, 0},
        {"exists, first use", slot_at(true, 0x600, 0x900), redis_with(false, 0, false), false,
         SLOT_OK, 0, 0},
        {"exists, behind watermark", slot_at(true, 0x400, 0x900), redis_with(true, 0x500, true),
         false, SLOT_OK, 0, 0},
        {"exists, at watermark", slot_at(true, 0x500, 0x900), redis_with(true, 0x500, true), false,
         SLOT_OK, 0, 0},
        {"re-created past watermark", slot_at(true, 0x800, 0x900), redis_with(true, 0x500, true),
         true, SLOT_LOST, 0x500, 0x800},
        {"ahead, old walbust without mark", slot_at(true, 0x800, 0x900),
         redis_with(true, 0x500, false), false, SLOT_OK, 0, 0},
        {"ahead, streamed here, redis lost the keys", slot_at(true, 0x800, 0x900), here_nokeys,
         false, SLOT_OK, 0, 0},
        {"ahead of what this process reported", slot_at(true, 0x800, 0x900), here_read, false,
         SLOT_LOST, 0x450, 0x800},
        {"wal_status lost", lost_slot, redis_with(true, 0x200, true), true, SLOT_LOST, 0x300,
         0x9000},
        {"another server", slot_at(true, 0x100, 0x900), other, false, SLOT_LOST, 0x500, 0x500},
    };
    (void)state;

    here_read.streamed_here = true;
    here_read.here_limit = 0x450;
    cases[13].ev = here_read;
    lost_slot.lost = true;
    cases[14].slot = lost_slot;
    snprintf(cases[15].ev.mark.system_id, sizeof cases[15].ev.mark.system_id, "999");
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        SlotJudgement j;
        SlotVerdict v =
            slotguard_judge("walbust", &cases[i].slot, &cases[i].ev, cases[i].create, &j);

        if (v != cases[i].want)
            fail_msg("%s: verdict %d, want %d", cases[i].name, v, cases[i].want);
        assert_int_equal(j.verdict, v);
        if (v == SLOT_LOST) {
            if (j.from != cases[i].from || j.to != cases[i].to)
                fail_msg("%s: range %llx..%llx, want %llx..%llx", cases[i].name,
                         (unsigned long long)j.from, (unsigned long long)j.to,
                         (unsigned long long)cases[i].from, (unsigned long long)cases[i].to);
            assert_non_null(strstr(j.why, "\"walbust\""));
            assert_non_null(strstr(j.why, "was never applied"));
        }
    }
}

static void test_range_is_named(void **state)
{
    StreamSlot s = slot_at(false, 0, 0x2000000);
    SlotEvidence ev = redis_with(true, 0x16B3748, false);
    SlotJudgement j;
    (void)state;

    assert_int_equal(slotguard_judge("walbust", &s, &ev, true, &j), SLOT_LOST);
    assert_non_null(strstr(j.why, "from 0/16B3748"));
    assert_non_null(strstr(j.why, "to 0/2000000"));
    assert_non_null(strstr(j.why, "does not exist"));
}

static void test_mark_roundtrip(void **state)
{
    SlotMark m = {.since = 0x16B3748}, back;
    char text[SLOTGUARD_MARK_MAX];
    (void)state;

    snprintf(m.system_id, sizeof m.system_id, SYS);
    snprintf(m.database, sizeof m.database, "my app db");
    slotguard_format_mark(&m, text, sizeof text);
    assert_string_equal(text, "v1 system=" SYS " since=0/16B3748 database=my app db");
    assert_true(slotguard_parse_mark(text, &back));
    assert_string_equal(back.system_id, SYS);
    assert_string_equal(back.database, "my app db");
    assert_int_equal(back.since, 0x16B3748);
}

static void test_mark_rejects(void **state)
{
    static const char *const bad[] = {
        "",
        "v2 system=1 since=0/1 database=a",
        "v1 system= since=0/1 database=a",
        "v1 system=1 since=x/1 database=a",
        "v1 system=1 since=0/1 database=",
        "v1 system=1 database=a",
        "0/16B3748",
    };
    SlotMark m;
    (void)state;

    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        if (slotguard_parse_mark(bad[i], &m))
            fail_msg("accepted \"%s\"", bad[i]);
}

static void test_known(void **state)
{
    SlotEvidence ev = redis_with(true, 0x500, true);
    (void)state;

    assert_int_equal(slotguard_known(&ev), 0x500);
    ev.streamed_here = true;
    ev.here_limit = 0x700;
    assert_int_equal(slotguard_known(&ev), 0x700);
    ev.redis_read = false; /* unread fields do not count */
    ev.here_limit = 0x50;
    assert_int_equal(slotguard_known(&ev), 0x50);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_decision_table), cmocka_unit_test(test_range_is_named),
        cmocka_unit_test(test_mark_roundtrip), cmocka_unit_test(test_mark_rejects),
        cmocka_unit_test(test_known),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
