/*
 * apply.c — the apply stage (see apply.h): every target's batch, retry
 * schedule and acknowledged commit, and the position all of them hold.
 */
#include "apply.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mem.h"

typedef struct ApplyTarget {
    const ApplyTargetOps *ops;
    void *obj;
    int attempts;     /* failed flushes in a row */
    int64_t retry_at; /* monotonic µs of the next attempt */
    uint64_t acked;   /* newest commit this target applied */
} ApplyTarget;

struct Apply {
    ApplyConfig cfg;
    ApplyTarget t[APPLY_MAX_TARGETS];
    int n;
    uint64_t pending_lsn;       /* end of the newest decoded commit */
    uint64_t acked_lsn;         /* end of the newest commit every target acknowledged */
    bool replay_after_recovery; /* a flush failed: replay once all are back */
};

Apply *apply_new(const ApplyConfig *cfg)
{
    Apply *a = xcalloc(1, sizeof *a);

    a->cfg = *cfg;
    return a;
}

void apply_free(Apply *a)
{
    free(a);
}

int apply_add_target(Apply *a, const ApplyTargetOps *ops, void *obj)
{
    if (a->n >= APPLY_MAX_TARGETS)
        return -1;
    a->t[a->n] = (ApplyTarget){.ops = ops, .obj = obj, .acked = a->acked_lsn};
    return a->n++;
}

int apply_ntargets(const Apply *a)
{
    return a->n;
}

void apply_add(Apply *a, RulesInvAction action, const char *str, size_t len, const char *payload,
               size_t payload_len)
{
    for (int i = 0; i < a->n; i++)
        a->t[i].ops->add(a->t[i].obj, action, str, len, payload, payload_len);
}

void apply_set_watermark(Apply *a, const char *key, const char *value, bool reset)
{
    for (int i = 0; i < a->n; i++)
        a->t[i].ops->set_watermark(a->t[i].obj, key, value, reset);
}

void apply_commit(Apply *a, uint64_t lsn)
{
    a->pending_lsn = lsn;
}

uint64_t apply_pending_lsn(const Apply *a)
{
    return a->pending_lsn;
}

uint64_t apply_acked(const Apply *a)
{
    return a->acked_lsn;
}

void apply_rewind(Apply *a, uint64_t lsn)
{
    a->acked_lsn = a->pending_lsn = lsn;
    for (int i = 0; i < a->n; i++)
        a->t[i].acked = lsn;
}

void apply_start_at(Apply *a, uint64_t lsn)
{
    a->acked_lsn = a->pending_lsn = lsn;
}

bool apply_has_ops(const Apply *a)
{
    for (int i = 0; i < a->n; i++)
        if (a->t[i].ops->pending(a->t[i].obj) > 0)
            return true;
    return false;
}

bool apply_dirty(const Apply *a)
{
    for (int i = 0; i < a->n; i++)
        if (a->t[i].ops->dirty(a->t[i].obj))
            return true;
    return false;
}

bool apply_full(const Apply *a)
{
    for (int i = 0; i < a->n; i++)
        if (a->t[i].ops->full(a->t[i].obj))
            return true;
    return false;
}

bool apply_only_soft_holds(const Apply *a)
{
    bool any = false;

    for (int i = 0; i < a->n; i++) {
        const ApplyTarget *t = &a->t[i];
        bool soft;
        if (!t->ops->dirty(t->obj))
            continue;
        soft = t->ops->oom(t->obj) || (t->ops->shortfall != NULL && t->ops->shortfall(t->obj));
        if (!soft || t->ops->full(t->obj))
            return false;
        any = true;
    }
    return any;
}

int64_t apply_due_in_us(const Apply *a)
{
    int64_t now = a->cfg.now_us();
    int64_t best = INT64_MAX;

    for (int i = 0; i < a->n; i++) {
        if (!a->t[i].ops->dirty(a->t[i].obj))
            continue;
        if (a->t[i].retry_at <= now)
            return 0;
        if (a->t[i].retry_at - now < best)
            best = a->t[i].retry_at - now;
    }
    return best;
}

int apply_attempts(const Apply *a, int i)
{
    return a->t[i].attempts;
}

/* Target t's flush failed: schedule its retry and describe the failure. */
static void target_failed(Apply *a, ApplyTarget *t, ApplyTargetResult *tr)
{
    int ms = a->cfg.delay_ms(t->attempts);
    bool shortfall = false;

    if (t->attempts < 30)
        t->attempts++;
    tr->outcome = APPLY_FAILED;
    if (t->ops->oom(t->obj)) {
        tr->kind = APPLY_FAIL_OOM;
        /* Out of memory: deletes keep flowing at a short interval. */
        if (ms > APPLY_OOM_RETRY_MS)
            ms = APPLY_OOM_RETRY_MS;
    } else {
        tr->kind = t->ops->connected(t->obj) ? APPLY_FAIL_REFUSED : APPLY_FAIL_IO;
        shortfall = t->ops->shortfall != NULL && t->ops->shortfall(t->obj);
        if (shortfall && ms > APPLY_SHORTFALL_RETRY_MS)
            ms = APPLY_SHORTFALL_RETRY_MS;
    }
    tr->retry_ms = ms;
    tr->attempts = t->attempts;
    snprintf(tr->err, sizeof tr->err, "%s", t->ops->errstr(t->obj));
    t->retry_at = a->cfg.now_us() + (int64_t)ms * 1000;
    /* A failed Redis may lose what it acknowledged before (a restart
     * without persistence, a failover): replay once every target is back.
     * Not after a replica shortfall alone: the master applied everything,
     * and the WAIT that succeeds on the same connection covers it all (a
     * connection lost meanwhile fails as I/O, and a failover followed is
     * replayed by the caller, apply_replay_needed()). */
    if (!shortfall)
        a->replay_after_recovery = true;
}

/* Flush target t when it holds work and its time has come. */
static void flush_one(Apply *a, ApplyTarget *t, int64_t now, bool *sent,
                      void (*before_send)(void *), void *arg, ApplyTargetResult *tr)
{
    if (!t->ops->dirty(t->obj) || now < t->retry_at)
        return;
    if (!*sent && before_send != NULL)
        before_send(arg);
    *sent = true;
    if (t->ops->flush(t->obj) != 0) {
        target_failed(a, t, tr);
        return;
    }
    tr->outcome = t->attempts > 0 ? APPLY_RECOVERED : APPLY_ACKED;
    tr->attempts = t->attempts;
    t->attempts = 0;
    t->retry_at = 0;
}

void apply_replay_needed(Apply *a)
{
    a->replay_after_recovery = true;
}

void apply_flush(Apply *a, void (*before_send)(void *), void *arg, ApplyResult *res)
{
    uint64_t target = a->pending_lsn;
    uint64_t acked = UINT64_MAX;
    int64_t now = a->cfg.now_us();
    bool sent = false;

    memset(res, 0, sizeof *res);
    res->was_acked = a->acked_lsn;
    for (int i = 0; i < a->n; i++) {
        ApplyTarget *t = &a->t[i];

        flush_one(a, t, now, &sent, before_send, arg, &res->t[i]);
        if (!t->ops->dirty(t->obj))
            t->acked = target;
        else
            res->holding++;
        if (t->acked < acked)
            acked = t->acked;
    }
    if (res->holding == 0 && a->replay_after_recovery) {
        /* Chunks of a transaction applied before a failure may be gone
         * from the failed Redis while the rest of it is retried: do not
         * confirm past the failure, replay instead (as after a crash). */
        a->replay_after_recovery = false;
        res->replay = true;
    } else if (acked != UINT64_MAX && acked > a->acked_lsn) {
        a->acked_lsn = acked;
    }
    res->acked = a->acked_lsn;
}
