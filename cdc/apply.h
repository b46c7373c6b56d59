/*
 * apply.h — the apply stage: queue invalidations for every Redis target,
 * drive the targets, and say which commit every one of them acknowledged.
 *
 * Invalidations are queued in commit order on every target (apply_add);
 * apply_commit() records the end of each decoded COMMIT. apply_flush()
 * tries every target that holds work and whose retry time has come (each
 * target has its own capped, jittered backoff) and advances the
 * acknowledged position to the newest commit that EVERY target applied
 * (docs/guarantees.md guarantee 2): a target with nothing queued has
 * applied everything decoded so far. A failed target keeps its batch, in
 * order, and is retried; once every failed target is back, the caller is
 * told to replay from what PostgreSQL was told (a failed Redis may have
 * lost what it acknowledged before), never to confirm past the failure.
 * A target that refused only writes for lack of memory (OOM) has applied
 * the deletes of its batch, holds the refused writes, and is retried at
 * least every APPLY_OOM_RETRY_MS; confirmation waits for those writes.
 * A batch short of replica acknowledgements was applied on the master; it
 * is kept and sent again, with what was queued since, at least every
 * APPLY_SHORTFALL_RETRY_MS, and reading may go on meanwhile as for OOM;
 * once enough replicas acknowledge, it counts as acknowledged without a
 * replay (the master lost nothing).
 *
 * Targets are reached through ApplyTargetOps (the Redis sink in
 * production, a fake in tests/unit/test_apply.c). The module does not
 * log and keeps no metrics: apply_flush() returns what happened to each
 * target (error text, kind, retry delay) for the caller to log and count.
 * It does no I/O of its own; time comes from ApplyConfig.now_us.
 */
#ifndef WALBUST_APPLY_H
#define WALBUST_APPLY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "rules.h"

#define APPLY_MAX_TARGETS 8
#define APPLY_ERR_MAX 512
/* A target that refuses writes for lack of memory keeps receiving deletes
 * at least this often while its refused writes are retried. */
#define APPLY_OOM_RETRY_MS 500
/* A batch that fewer replicas than asked for acknowledged (?replicas=N) is
 * sent again at least this often, not after a backoff that grows to 30 s:
 * confirmation resumes soon after a replica is back (e.g. the old master
 * rejoining as a replica after a failover). */
#define APPLY_SHORTFALL_RETRY_MS 500

/* What a target must do. obj is the target given to apply_add_target().
 * add/set_watermark queue; flush sends everything queued and waits for the
 * replies: 0 when all were acknowledged (the target's batch is then empty),
 * -1 otherwise (the batch is kept; after an OOM refusal it holds only the
 * refused writes). */
typedef struct ApplyTargetOps {
    void (*add)(void *obj, RulesInvAction action, const char *str, size_t len, const char *payload,
                size_t payload_len);
    void (*set_watermark)(void *obj, const char *key, const char *value, bool reset);
    size_t (*pending)(const void *obj); /* queued invalidations */
    bool (*dirty)(const void *obj);     /* anything (also a watermark) queued */
    bool (*full)(const void *obj);      /* flush now to bound memory */
    int (*flush)(void *obj);
    bool (*oom)(const void *obj);       /* last flush failed only on OOM refusals */
    bool (*shortfall)(const void *obj); /* ... only on too few replica acks (may be NULL) */
    bool (*connected)(const void *obj); /* a live connection */
    const char *(*errstr)(const void *obj);
} ApplyTargetOps;

typedef struct ApplyConfig {
    int64_t (*now_us)(void);      /* monotonic clock */
    int (*delay_ms)(int attempt); /* retry delay after `attempt` earlier ones */
} ApplyConfig;

/* Why a target's flush failed. */
typedef enum ApplyFailKind {
    APPLY_FAIL_IO,      /* connection lost or unreachable (not connected after) */
    APPLY_FAIL_REFUSED, /* Redis answered with an error (READONLY, NOPERM, ...) */
    APPLY_FAIL_OOM,     /* only writes refused for lack of memory; deletes applied */
} ApplyFailKind;

typedef enum ApplyOutcome {
    APPLY_NOT_TRIED, /* nothing queued, or its retry time has not come */
    APPLY_ACKED,     /* flushed and acknowledged */
    APPLY_RECOVERED, /* acknowledged after `attempts` failed flushes */
    APPLY_FAILED,    /* failed; retried in retry_ms */
} ApplyOutcome;

typedef struct ApplyTargetResult {
    ApplyOutcome outcome;
    ApplyFailKind kind;      /* APPLY_FAILED only */
    int retry_ms;            /* APPLY_FAILED only */
    int attempts;            /* failed flushes in a row (before success for RECOVERED) */
    char err[APPLY_ERR_MAX]; /* APPLY_FAILED: the target's error text */
} ApplyTargetResult;

typedef struct ApplyResult {
    int holding;        /* targets still holding unacknowledged work */
    bool replay;        /* every failed target is back: replay (apply_rewind) */
    uint64_t acked;     /* apply_acked() after the flush */
    uint64_t was_acked; /* apply_acked() before it */
    ApplyTargetResult t[APPLY_MAX_TARGETS];
} ApplyResult;

typedef struct Apply Apply;

/* A stage with no targets, acknowledged position 0. Aborts on OOM. */
Apply *apply_new(const ApplyConfig *cfg);
void apply_free(Apply *a); /* accepts NULL; does not free the targets */

/* Add a target (borrowed: obj must outlive a). Returns its index, or -1
 * when APPLY_MAX_TARGETS are there already. */
int apply_add_target(Apply *a, const ApplyTargetOps *ops, void *obj);
int apply_ntargets(const Apply *a);

/* Queue one invalidation on every target, in commit order. */
void apply_add(Apply *a, RulesInvAction action, const char *str, size_t len, const char *payload,
               size_t payload_len);

/* Queue the confirmed-position watermark on every target (moved forward
 * only, or set in any case with reset: see sink_set_watermark()). */
void apply_set_watermark(Apply *a, const char *key, const char *value, bool reset);

/* A COMMIT ending at lsn was decoded: everything queued so far belongs to
 * it or earlier commits. */
void apply_commit(Apply *a, uint64_t lsn);

/* The newest decoded commit, and the newest that every target
 * acknowledged (never ahead of the first). */
uint64_t apply_pending_lsn(const Apply *a);
uint64_t apply_acked(const Apply *a);

/* Start over at lsn: decoded and acknowledged positions both lsn, each
 * target's too (a replay from lsn). apply_start_at() keeps what each
 * target acknowledged (a reconnect that resumes at lsn). */
void apply_rewind(Apply *a, uint64_t lsn);
void apply_start_at(Apply *a, uint64_t lsn);

/* Any target with queued invalidations / with anything queued / full? */
bool apply_has_ops(const Apply *a);
bool apply_dirty(const Apply *a);
bool apply_full(const Apply *a);

/* Does every target that holds work hold only writes refused for lack of
 * memory, or a batch it applied that too few replicas acknowledged (and is
 * not full)? Then reading may go on so deletes keep being applied (with
 * each retry); confirmation still waits. False when no target holds work. */
bool apply_only_soft_holds(const Apply *a);

/* Microseconds until the earliest retry of a target holding work: 0 when
 * a flush is due now, INT64_MAX when no target holds work. */
int64_t apply_due_in_us(const Apply *a);

/* Failed flushes in a row of target i (0: healthy). */
int apply_attempts(const Apply *a, int i);

/* A target may have lost what it acknowledged without a flush failing
 * (its Redis was replaced: a Sentinel announced a new master). As after a
 * failed flush, the next apply_flush() that finds every target clean asks
 * for a replay (res->replay) instead of confirming past it. */
void apply_replay_needed(Apply *a);

/* Flush every target that holds work and whose retry time has come;
 * before_send(arg) runs once before the first flush when not NULL. Fills
 * res (every field). After res->replay the caller rewinds (apply_rewind)
 * to the position PostgreSQL was told and replays from there. */
void apply_flush(Apply *a, void (*before_send)(void *), void *arg, ApplyResult *res);

#endif
