/* Unit tests for apply.c against fake targets (no Redis): a position is
 * confirmed only once every target acknowledged it (guarantee 2), a
 * target that failed keeps its batch, gets it again in commit order once
 * it is back, and the caller is then told to replay (guarantees 2 and 4);
 * a target out of memory still gets deletes while its refused writes hold
 * confirmation back; retries follow each target's own schedule. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <string.h>

#include "apply.h"

/* ---- a fake Redis target ---------------------------------------------- */

#define FAKE_MAX 64

typedef struct Fake {
    char queued[FAKE_MAX][40]; /* "k:key", "v:key", "p:chan", "w:value" (watermark last) */
    int nq;
    char wm[40];                    /* queued watermark value, "" when none */
    char applied[FAKE_MAX * 4][40]; /* what the server acknowledged, in order */
    int na;
    bool down;   /* connection refused: nothing is applied */
    bool refuse; /* every command answered with an error (READONLY) */
    bool oom;    /* writes (INCR, PUBLISH, the watermark) refused for lack of memory */
    bool last_oom;
    bool few_replicas; /* everything applied, but too few replicas acknowledged it */
    bool last_short;
    int flushes;
    int max_ops; /* full() threshold */
    char err[64];
} Fake;

static int64_t now_us;

static int64_t fake_now(void)
{
    return now_us;
}

/* Deterministic backoff: 100 ms, 200 ms, 400 ms, ... capped at 10 s. */
static int fake_delay(int attempt)
{
    int ms = 100;
    for (int i = 0; i < attempt && ms < 10000; i++)
        ms *= 2;
    return ms > 10000 ? 10000 : ms;
}

static void fake_add(void *obj, RulesInvAction action, const char *str, size_t len,
                     const char *payload, size_t payload_len)
{
    Fake *f = obj;
    char tag = action == RULES_INV_KEY       ? 'k'
               : action == RULES_INV_VERSION ? 'v'
               : action == RULES_INV_PUBLISH ? 'p'
                                             : '?';
    (void)payload;
    (void)payload_len;
    assert_true(f->nq < FAKE_MAX);
    snprintf(f->queued[f->nq++], sizeof f->queued[0], "%c:%.*s", tag, (int)len, str);
}

static void fake_set_watermark(void *obj, const char *key, const char *value, bool reset)
{
    Fake *f = obj;
    (void)key;
    (void)reset;
    snprintf(f->wm, sizeof f->wm, "%s", value);
}

static size_t fake_pending(const void *obj)
{
    return (size_t)((const Fake *)obj)->nq;
}

static bool fake_dirty(const void *obj)
{
    const Fake *f = obj;
    return f->nq > 0 || f->wm[0] != '\0';
}

static bool fake_full(const void *obj)
{
    const Fake *f = obj;
    return f->max_ops > 0 && f->nq >= f->max_ops;
}

static void fake_apply(Fake *f, const char *what)
{
    snprintf(f->applied[f->na++], sizeof f->applied[0], "%s", what);
}

/* Out of memory: deletes are applied, writes are kept (in order). */
static int fake_flush_oom(Fake *f)
{
    int kept = 0;

    for (int i = 0; i < f->nq; i++) {
        if (f->queued[i][0] == 'k')
            fake_apply(f, f->queued[i]);
        else
            memmove(f->queued[kept++], f->queued[i], sizeof f->queued[0]);
    }
    f->nq = kept;
    f->last_oom = true;
    snprintf(f->err, sizeof f->err, "OOM command not allowed");
    return -1;
}

static int fake_flush(void *obj)
{
    Fake *f = obj;
    char w[48];

    f->flushes++;
    f->last_oom = false;
    f->last_short = false;
    if (f->down) {
        snprintf(f->err, sizeof f->err, "connection refused");
        return -1;
    }
    if (f->refuse) {
        snprintf(f->err, sizeof f->err, "READONLY You can't write against a read only replica");
        return -1;
    }
    if (f->oom)
        return fake_flush_oom(f);
    if (f->few_replicas) { /* applied on the master, kept to be sent again */
        for (int i = 0; i < f->nq; i++)
            fake_apply(f, f->queued[i]);
        f->last_short = true;
        snprintf(f->err, sizeof f->err, "only 0 of the 1 replicas asked for acknowledged");
        return -1;
    }
    for (int i = 0; i < f->nq; i++)
        fake_apply(f, f->queued[i]);
    if (f->wm[0] != '\0') {
        snprintf(w, sizeof w, "w:%s", f->wm);
        fake_apply(f, w);
    }
    f->nq = 0;
    f->wm[0] = '\0';
    f->err[0] = '\0';
    return 0;
}

static bool fake_oom(const void *obj)
{
    return ((const Fake *)obj)->last_oom;
}

static bool fake_shortfall(const void *obj)
{
    return ((const Fake *)obj)->last_short;
}

static bool fake_connected(const void *obj)
{
    return !((const Fake *)obj)->down;
}

static const char *fake_errstr(const void *obj)
{
    return ((const Fake *)obj)->err;
}

static const ApplyTargetOps fake_ops = {
    .add = fake_add,
    .set_watermark = fake_set_watermark,
    .pending = fake_pending,
    .dirty = fake_dirty,
    .full = fake_full,
    .flush = fake_flush,
    .oom = fake_oom,
    .shortfall = fake_shortfall,
    .connected = fake_connected,
    .errstr = fake_errstr,
};

/* ---- helpers ------------------------------------------------------------ */

static Apply *new_stage(Fake *fakes, int n)
{
    Apply *a = apply_new(&(ApplyConfig){.now_us = fake_now, .delay_ms = fake_delay});

    now_us = 1000000;
    memset(fakes, 0, sizeof *fakes * (size_t)n);
    for (int i = 0; i < n; i++)
        assert_int_equal(apply_add_target(a, &fake_ops, &fakes[i]), i);
    return a;
}

static void key(Apply *a, const char *k)
{
    apply_add(a, RULES_INV_KEY, k, strlen(k), NULL, 0);
}

static void incr(Apply *a, const char *k)
{
    apply_add(a, RULES_INV_VERSION, k, strlen(k), NULL, 0);
}

static void flush(Apply *a, ApplyResult *res)
{
    apply_flush(a, NULL, NULL, res);
    assert_true(res->acked <= apply_pending_lsn(a));
    assert_int_equal(res->acked, apply_acked(a));
}

/* The fake's applied list equals the expected items, in order. */
static void assert_applied(const Fake *f, const char *const *want, int n)
{
    assert_int_equal(f->na, n);
    for (int i = 0; i < n; i++)
        assert_string_equal(f->applied[i], want[i]);
}

/* ---- tests -------------------------------------------------------------- */

static void test_confirms_only_what_every_target_acked(void **state)
{
    Fake f[2];
    Apply *a = new_stage(f, 2);
    ApplyResult res;
    (void)state;

    key(a, "a");
    apply_commit(a, 100);
    f[1].down = true;
    flush(a, &res);
    assert_int_equal(res.t[0].outcome, APPLY_ACKED);
    assert_int_equal(res.t[1].outcome, APPLY_FAILED);
    assert_int_equal(res.t[1].kind, APPLY_FAIL_IO);
    assert_int_equal(res.t[1].retry_ms, 100);
    assert_string_equal(res.t[1].err, "connection refused");
    assert_int_equal(res.holding, 1);
    assert_int_equal(apply_acked(a), 0); /* target 1 has not applied commit 100 */

    key(a, "b");
    apply_commit(a, 200);
    now_us += 100 * 1000;
    flush(a, &res); /* still down */
    assert_int_equal(res.t[1].retry_ms, 200);
    assert_int_equal(apply_acked(a), 0);
    assert_int_equal(apply_attempts(a, 1), 2);

    /* Target 0 keeps applying while target 1 waits for its retry. */
    key(a, "c");
    apply_commit(a, 300);
    flush(a, &res);
    assert_int_equal(res.t[0].outcome, APPLY_ACKED);
    assert_int_equal(res.t[1].outcome, APPLY_NOT_TRIED);
    assert_int_equal(apply_acked(a), 0);
    assert_true(apply_due_in_us(a) > 0);

    /* Back: it gets everything it missed, in commit order, and the caller
     * is told to replay instead of confirming past the failure. */
    f[1].down = false;
    now_us += 200 * 1000;
    assert_int_equal(apply_due_in_us(a), 0);
    flush(a, &res);
    assert_int_equal(res.t[1].outcome, APPLY_RECOVERED);
    assert_int_equal(res.t[1].attempts, 2);
    assert_true(res.replay);
    assert_int_equal(apply_acked(a), 0);
    assert_applied(&f[1], (const char *[]){"k:a", "k:b", "k:c"}, 3);
    assert_applied(&f[0], (const char *[]){"k:a", "k:b", "k:c"}, 3);

    /* The replay: from what PostgreSQL was told (0), the same commits. */
    apply_rewind(a, 0);
    key(a, "a");
    apply_commit(a, 100);
    key(a, "b");
    apply_commit(a, 200);
    flush(a, &res);
    assert_false(res.replay);
    assert_int_equal(res.was_acked, 0);
    assert_int_equal(apply_acked(a), 200);
    apply_free(a);
}

/* A target that lost what it acknowledged (a restart without persistence)
 * gets the unacknowledged ops once it is back, then the replay. */
static void test_replay_after_recovery(void **state)
{
    Fake f[1];
    Apply *a = new_stage(f, 1);
    ApplyResult res;
    (void)state;

    key(a, "a");
    apply_commit(a, 100);
    flush(a, &res);
    assert_int_equal(apply_acked(a), 100);

    key(a, "b"); /* a chunk of the transaction ending at 200 */
    flush(a, &res);
    assert_int_equal(apply_acked(a), 100); /* its COMMIT was not decoded yet */
    f[0].down = true;
    key(a, "c");
    apply_commit(a, 200);
    flush(a, &res);
    assert_int_equal(res.t[0].outcome, APPLY_FAILED);
    assert_int_equal(apply_acked(a), 100);
    assert_false(res.replay);

    f[0].na = 0; /* the restarted Redis lost "b" */
    f[0].down = false;
    now_us += 100 * 1000;
    flush(a, &res);
    assert_applied(&f[0], (const char *[]){"k:c"}, 1);
    assert_true(res.replay);
    assert_int_equal(res.acked, 100); /* not 200: "b" may be gone */

    apply_rewind(a, 100);
    key(a, "b");
    key(a, "c");
    apply_commit(a, 200);
    flush(a, &res);
    assert_false(res.replay);
    assert_int_equal(apply_acked(a), 200);
    assert_applied(&f[0], (const char *[]){"k:c", "k:b", "k:c"}, 3);
    apply_free(a);
}

/* A failover announced without a failed flush (apply_replay_needed, a
 * Sentinel's +switch-master): the next flush applies, but asks for the
 * replay instead of confirming past what the old master may have lost. */
static void test_replay_needed(void **state)
{
    Fake f[1];
    Apply *a = new_stage(f, 1);
    ApplyResult res;
    (void)state;

    key(a, "a");
    apply_commit(a, 100);
    flush(a, &res);
    assert_int_equal(apply_acked(a), 100);

    key(a, "b"); /* a chunk acknowledged by the old master */
    flush(a, &res);
    apply_replay_needed(a);
    key(a, "c");
    apply_commit(a, 200);
    flush(a, &res);
    assert_int_equal(res.t[0].outcome, APPLY_ACKED);
    assert_true(res.replay);
    assert_int_equal(apply_acked(a), 100); /* not 200: "b" may be gone */

    apply_rewind(a, 100);
    key(a, "b");
    key(a, "c");
    apply_commit(a, 200);
    flush(a, &res);
    assert_false(res.replay);
    assert_int_equal(apply_acked(a), 200);
    apply_free(a);
}

/* Commit order on each target through failures and retries. */
static void test_commit_order(void **state)
{
    Fake f[2];
    Apply *a = new_stage(f, 2);
    ApplyResult res;
    char k[16];
    const char *want[40];
    static char names[40][16];
    (void)state;

    for (int i = 0; i < 40; i++) {
        snprintf(k, sizeof k, "%d", i);
        key(a, k);
        apply_commit(a, (uint64_t)(i + 1) * 10);
        snprintf(names[i], sizeof names[i], "k:%d", i);
        want[i] = names[i];
        f[i % 2].down = i % 7 == 3; /* each target fails now and then */
        f[1 - i % 2].down = false;
        now_us += 50 * 1000;
        flush(a, &res);
    }
    f[0].down = f[1].down = false;
    for (int i = 0; i < 20 && apply_dirty(a); i++) {
        now_us += 10 * 1000 * 1000;
        flush(a, &res);
    }
    assert_false(apply_dirty(a));
    assert_applied(&f[0], want, 40);
    assert_applied(&f[1], want, 40);
    apply_free(a);
}

/* Out of memory: deletes flow, refused writes hold confirmation back and
 * are retried at least every APPLY_OOM_RETRY_MS. */
static void test_oom_holds_writes_not_deletes(void **state)
{
    Fake f[1];
    Apply *a = new_stage(f, 1);
    ApplyResult res;
    (void)state;

    f[0].oom = true;
    key(a, "k1");
    incr(a, "v1");
    apply_commit(a, 100);
    flush(a, &res);
    assert_int_equal(res.t[0].outcome, APPLY_FAILED);
    assert_int_equal(res.t[0].kind, APPLY_FAIL_OOM);
    assert_applied(&f[0], (const char *[]){"k:k1"}, 1);
    assert_true(apply_only_soft_holds(a));
    assert_int_equal(f[0].nq, 1); /* only the refused INCR is kept */
    assert_int_equal(apply_acked(a), 0);

    /* Many failures later (the backoff alone would wait 25 s), the retry
     * delay is still capped. */
    for (int i = 0; i < 8; i++) {
        now_us += APPLY_OOM_RETRY_MS * 1000;
        flush(a, &res);
        assert_int_equal(res.t[0].outcome, APPLY_FAILED);
        assert_true(res.t[0].retry_ms <= APPLY_OOM_RETRY_MS);
    }
    key(a, "k2");
    apply_commit(a, 200);
    now_us += APPLY_OOM_RETRY_MS * 1000;
    flush(a, &res);
    assert_applied(&f[0], (const char *[]){"k:k1", "k:k2"}, 2);
    assert_int_equal(apply_acked(a), 0); /* v1 still refused */

    /* A target that is full is no longer "only OOM": reading must pause. */
    f[0].max_ops = 1;
    assert_false(apply_only_soft_holds(a));
    f[0].max_ops = 0;

    f[0].oom = false;
    now_us += APPLY_OOM_RETRY_MS * 1000;
    flush(a, &res);
    assert_int_equal(res.t[0].outcome, APPLY_RECOVERED);
    assert_applied(&f[0], (const char *[]){"k:k1", "k:k2", "v:v1"}, 3);
    assert_true(res.replay); /* as after any failure */
    assert_int_equal(apply_acked(a), 0);
    apply_free(a);
}

/* Too few replicas acknowledged: the batch is retried at least every
 * APPLY_SHORTFALL_RETRY_MS however many times it failed, and is never
 * confirmed meanwhile. */
static void test_replica_shortfall_retried_soon(void **state)
{
    Fake f[1];
    Apply *a = new_stage(f, 1);
    ApplyResult res;
    (void)state;

    f[0].few_replicas = true;
    key(a, "k1");
    apply_commit(a, 100);
    for (int i = 0; i < 10; i++) { /* the backoff alone would reach 30 s */
        flush(a, &res);
        assert_int_equal(res.t[0].outcome, APPLY_FAILED);
        assert_int_equal(res.t[0].kind, APPLY_FAIL_REFUSED);
        assert_true(res.t[0].retry_ms <= APPLY_SHORTFALL_RETRY_MS);
        assert_int_equal(apply_acked(a), 0);
        assert_true(apply_only_soft_holds(a)); /* reading goes on: deletes flow */
        now_us += APPLY_SHORTFALL_RETRY_MS * 1000;
    }
    key(a, "k2"); /* decoded meanwhile: sent with the next retry */
    apply_commit(a, 200);
    flush(a, &res);
    assert_int_equal(res.t[0].outcome, APPLY_FAILED);
    assert_string_equal(f[0].applied[f[0].na - 1], "k:k2");
    f[0].max_ops = 1; /* a full target pauses reading */
    assert_false(apply_only_soft_holds(a));
    f[0].max_ops = 0;
    now_us += APPLY_SHORTFALL_RETRY_MS * 1000;
    f[0].few_replicas = false;
    flush(a, &res);
    assert_int_equal(res.t[0].outcome, APPLY_RECOVERED);
    /* The master had it all: confirmed, no replay of what it applied. */
    assert_false(res.replay);
    assert_int_equal(apply_acked(a), 200);
    apply_free(a);
}

/* A refusal that is not a shortfall still backs off past the cap. */
static void test_refusal_backs_off(void **state)
{
    Fake f[1];
    Apply *a = new_stage(f, 1);
    ApplyResult res;
    int longest = 0;
    (void)state;

    f[0].refuse = true;
    key(a, "k1");
    apply_commit(a, 100);
    for (int i = 0; i < 10; i++) {
        flush(a, &res);
        assert_int_equal(res.t[0].outcome, APPLY_FAILED);
        if (res.t[0].retry_ms > longest)
            longest = res.t[0].retry_ms;
        now_us += (int64_t)res.t[0].retry_ms * 1000;
    }
    assert_true(longest > APPLY_SHORTFALL_RETRY_MS);
    apply_free(a);
}

/* An error reply from a connected target is a refusal, not an I/O error;
 * a target is not flushed before its retry time. */
static void test_refused_and_schedule(void **state)
{
    Fake f[1];
    Apply *a = new_stage(f, 1);
    ApplyResult res;
    (void)state;

    assert_int_equal(apply_due_in_us(a), INT64_MAX); /* nothing queued */
    f[0].refuse = true;
    key(a, "a");
    apply_commit(a, 100);
    flush(a, &res);
    assert_int_equal(res.t[0].kind, APPLY_FAIL_REFUSED);
    assert_non_null(strstr(res.t[0].err, "READONLY"));
    assert_int_equal(apply_due_in_us(a), 100 * 1000);
    now_us += 99 * 1000;
    flush(a, &res);
    assert_int_equal(res.t[0].outcome, APPLY_NOT_TRIED);
    assert_int_equal(f[0].flushes, 1);
    assert_int_equal(apply_due_in_us(a), 1000);
    now_us += 1000;
    flush(a, &res);
    assert_int_equal(f[0].flushes, 2);
    assert_int_equal(res.t[0].retry_ms, 200);
    apply_free(a);
}

static int sends;

static void count_send(void *arg)
{
    (void)arg;
    sends++;
}

/* before_send runs once per flush that sends anything; a watermark alone
 * makes a target dirty without ops, and its ack confirms the commit. */
static void test_before_send_and_watermark(void **state)
{
    Fake f[2];
    Apply *a = new_stage(f, 2);
    ApplyResult res;
    (void)state;

    sends = 0;
    apply_flush(a, count_send, NULL, &res);
    assert_int_equal(sends, 0);
    apply_commit(a, 50); /* a commit that produced no invalidation */
    apply_flush(a, count_send, NULL, &res);
    assert_int_equal(sends, 0);
    assert_int_equal(res.acked, 50);

    apply_set_watermark(a, "walbust:confirmed:s", "0/32", false);
    assert_true(apply_dirty(a));
    assert_false(apply_has_ops(a));
    apply_flush(a, count_send, NULL, &res);
    assert_int_equal(sends, 1);
    assert_applied(&f[0], (const char *[]){"w:0/32"}, 1);
    assert_applied(&f[1], (const char *[]){"w:0/32"}, 1);

    /* apply_start_at keeps each target's acknowledged commit. */
    apply_start_at(a, 40);
    assert_int_equal(apply_acked(a), 40);
    assert_int_equal(apply_pending_lsn(a), 40);
    apply_free(a);
}

static void test_target_limit(void **state)
{
    Fake f[APPLY_MAX_TARGETS];
    Apply *a = new_stage(f, APPLY_MAX_TARGETS);
    (void)state;

    assert_int_equal(apply_ntargets(a), APPLY_MAX_TARGETS);
    assert_int_equal(apply_add_target(a, &fake_ops, &f[0]), -1);
    apply_free(a);
    apply_free(NULL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_confirms_only_what_every_target_acked),
        cmocka_unit_test(test_replay_after_recovery),
        cmocka_unit_test(test_replay_needed),
        cmocka_unit_test(test_commit_order),
        cmocka_unit_test(test_oom_holds_writes_not_deletes),
        cmocka_unit_test(test_refused_and_schedule),
        cmocka_unit_test(test_replica_shortfall_retried_soon),
        cmocka_unit_test(test_refusal_backs_off),
        cmocka_unit_test(test_before_send_and_watermark),
        cmocka_unit_test(test_target_limit),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
