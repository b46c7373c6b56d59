/*
 * run_cmd.c — `walbust run`: the daemon.
 *
 * Data flows one way: stream → decoder → rules → sinks → confirm. The loop
 * reads whatever the replication connection has ready, decodes it, renders
 * invalidations into every sink's batch, and flushes when the connection has
 * nothing more ready (adaptive batching: a burst becomes one pipelined round
 * trip, a lone commit is applied at once) or when a batch is full (a huge
 * transaction is applied in chunks). Only after every target acknowledged a
 * batch does the flush LSN advance, to the end of the newest transaction
 * whose COMMIT was decoded before the flush (docs/guarantees.md guarantee 2).
 *
 * pgoutput without streaming sends a transaction only after it committed,
 * so applying the chunks of a large transaction before its COMMIT message
 * arrives never invalidates for aborted work (docs/guarantees.md guarantee 1); confirmation still
 * waits for the COMMIT.
 */
#include <errno.h>
#include <malloc.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "apply.h"
#include "audit_run.h"
#include "catalog.h"
#include "change.h"
#include "cmds.h"
#include "log.h"
#include "lookup_exec.h"
#include "lsn.h"
#include "mem.h"
#include "metrics.h"
#include "notify.h"
#include "pgo.h"
#include "redisurl.h"
#include "route.h"
#include "runtime.h"
#include "schema.h"
#include "visible.h"
#include "cpuwait.h"
#include "commitpace.h"
#include "sink.h"
#include "slotwatch.h"

_Static_assert(APPLY_MAX_TARGETS >= OPTS_MAX_REDIS, "apply.h holds every --redis target");

typedef struct RunStats {
    uint64_t transactions, changes, messages, widened, retries, redis_errors;
} RunStats;

/* Tables and kinds of change counted between two count_flush() calls. */
#define RUN_COUNTED 8

typedef struct Run {
    const Config *cfg;
    Rules *rules;
    AuditRun *audit;            /* the cache audit thread (NULL: off) */
    const RulesChange *chg_now; /* the change rules_eval() is emitting for */
    Sink *sinks[OPTS_MAX_REDIS];
    char targets[OPTS_MAX_REDIS][300]; /* redacted descriptions */
    int nsinks;
    Stream *stream;
    PgoDecoder *dec;
    ChangeBuf cbuf;
    ChangeTxn txn;
    bool in_txn;
    Apply *ap; /* the targets' batches and what they acknowledged (apply.h) */
    uint64_t watermark_lsn;
    int64_t watermark_at_us; /* when a watermark was queued alone; 0: not */
    char watermark_key[128];
    bool pg_lost;
    RunStats stats;
    int64_t last_report_us;
    Metrics *metrics;
    SinkStats applied;     /* sink 0's totals at the last report to metrics */
    int64_t *commit_times; /* commit timestamps awaiting acknowledgement */
    size_t ncommit_times;
    unsigned since_tick;
    int64_t batch_since_us;    /* when the unflushed batch was first seen; 0: none */
    int64_t last_flush_us;     /* when the last flush on an empty stream ended */
    bool catching_up;          /* the last commit decoded was old (pace_reads) */
    int live_nice;             /* the nice value granted at start (< 0: yield_priority) */
    bool yield_nice;           /* ... may be left while catching up and taken back */
    bool nice_yielded;         /* ... and is left now (the streaming thread at 0) */
    int64_t last_commit_time;  /* PostgreSQL's timestamp of the last commit decoded */
    bool pace_due;             /* ... not yet looked at by pace_reads */
    int64_t flush_interval_us; /* --flush-interval now (retune_flush_interval) */
    CpuWait cpuwait;           /* --flush-interval auto: where it comes from */
    CommitPace pace;           /* hold a batch only while commits come fast (hold_flush) */
    bool auto_interval;        /* ... and whether it is on */
    /* Timing of the unacknowledged batch (walbust_batch_stage_seconds):
     * when its first commit was decoded (0: none yet) and that commit's
     * age then; when the flush's visibility wait began and ended (0: the
     * flush sent nothing). */
    int64_t stage_decoded_us;
    double stage_decode_s;
    int64_t stage_vis_start_us, stage_vis_end_us;
    Visible *vis;          /* xids whose invalidations wait for visibility */
    VisibleStats vis_seen; /* visible_stats() already counted in metrics */
    uint32_t xid;          /* xid of the transaction being decoded */
    bool ever_streamed;    /* held the slot at least once (role active) */

    /* Lookups (lookup.h): calls the unflushed batch needs, the executor
     * (NULL when no rule has a lookup), its retry schedule. */
    LookupBatch *lk;
    LookupExec *lkx;
    Backoff lk_backoff;
    int64_t lk_retry_at;

    uint64_t oom_seen[OPTS_MAX_REDIS];        /* sink_stats().oom_refusals counted */
    bool by_script_noted[OPTS_MAX_REDIS];     /* sink_watermark_by_script() logged */
    uint64_t shortfalls_seen[OPTS_MAX_REDIS]; /* ... .replica_shortfalls counted */
    int64_t soft_logged_us[OPTS_MAX_REDIS];   /* last OOM or replica shortfall log line */
    Route *route;                             /* partitions/children → the rules tables above */
    struct {
        pthread_t thread;
        bool running;        /* a reload thread was started and not joined */
        atomic_int done;     /* set by the thread when fresh is final */
        Rules *fresh;        /* its result: validated rules, or NULL */
        uint32_t *relids;    /* and their tables' relids (schema_load_relids), or NULL */
        uint64_t generation; /* schema_generation() when the thread started */
        pthread_t reaper;    /* frees the rules a swap replaced */
        bool reaping;        /* the reaper was started and not joined */
    } reload;
    Schema *schema;   /* schema changes on the rules' tables (schema.h) */
    bool schema_stop; /* a schema change walbust cannot follow: exit 1 */
    bool replay;      /* pg_lost on purpose (redis recovered): reconnect at once */
    /* Slot lifecycle (slotwatch.h). */
    char mark_key[128];
    SlotWatch sw;
    bool slot_fatal; /* stopping because of a slot problem: exit 1 */
    /* Changes decoded but not yet added to walbust_changes_total: one
     * metrics update per table and kind every few dozen messages, not one
     * per change (count_change; pgbench's transactions alternate between
     * four tables, and a single counter flushed at every switch was 10 % of
     * walbust's instructions). table is the decoder's string, compared by
     * address and forgotten at each Relation message (the decoder may free
     * it then); name is a copy, kept for reuse. */
    struct {
        const char *table, *op;
        char *name;
        uint64_t n;
    } counted[RUN_COUNTED];
    size_t ncounted;
    int64_t watchdog_at_us; /* the stream loop's last notify_watchdog() (feed_watchdog) */
} Run;

/* Enough commit timestamps to time every transaction of a normal batch; a
 * batch with more transactions is timed on its first COMMIT_SAMPLES. */
#define COMMIT_SAMPLES 4096

static void emit_to_sinks(void *arg, RulesInvAction action, const char *s, size_t len,
                          const char *payload, size_t payload_len)
{
    Run *r = arg;
    if (r->in_txn)
        visible_note(r->vis, r->xid);
    apply_add(r->ap, action, s, len, payload, payload_len);
    if (action == RULES_INV_KEY && r->chg_now != NULL)
        audit_run_note(r->audit, r->rules, s, len, r->chg_now);
}

static bool sinks_have_ops(const Run *r)
{
    return lookup_batch_calls(r->lk) > 0 || apply_has_ops(r->ap);
}

static bool sinks_dirty(const Run *r)
{
    return lookup_batch_calls(r->lk) > 0 || apply_dirty(r->ap);
}

static bool sinks_full(const Run *r)
{
    return lookup_batch_full(r->lk) || apply_full(r->ap);
}

/* While Redis is retried, keep the replication connection alive with status
 * updates (at the old position) so the walsender does not time out. */
static void keepalive_tick(void *arg)
{
    Run *r = arg;

    notify_watchdog();
    metrics_positions(r->metrics, stream_confirmed(r->stream), stream_received(r->stream),
                      stream_server_end(r->stream));
    if (!r->pg_lost && (stream_confirm_soon(r->stream, apply_acked(r->ap)) < 0 ||
                        stream_confirm(r->stream, apply_acked(r->ap), false) < 0)) {
        log_warn("%s; will reconnect once redis is back", stream_errstr(r->stream));
        r->pg_lost = true;
    }
}

/* Metrics after an acknowledged batch: applied invalidations (counted on
 * the first target; every target applies the same), commit-to-ack times
 * and positions. */
static void record_ack(Run *r)
{
    const SinkStats *st = sink_stats(r->sinks[0]);
    int64_t now = pgtime_now();

    metrics_invalidations(r->metrics, METRICS_ACTION_KEY, st->keys - r->applied.keys);
    metrics_invalidations(r->metrics, METRICS_ACTION_PATTERN, st->patterns - r->applied.patterns);
    metrics_invalidations(r->metrics, METRICS_ACTION_TAG, st->tags - r->applied.tags);
    metrics_invalidations(r->metrics, METRICS_ACTION_VERSION, st->versions - r->applied.versions);
    metrics_invalidations(r->metrics, METRICS_ACTION_PUBLISH, st->publishes - r->applied.publishes);
    metrics_inc(r->metrics, METRICS_REFRESH_FENCED, st->refresh_fenced - r->applied.refresh_fenced);
    r->applied = *st;
    metrics_commits_acked(r->metrics, now, r->commit_times, r->ncommit_times);
    r->ncommit_times = 0;
    metrics_positions(r->metrics, stream_confirmed(r->stream), stream_received(r->stream),
                      stream_server_end(r->stream));
}

/* Before invalidating, wait until the batch's transactions are visible to
 * other sessions (visible.h): a reader that misses after the invalidation
 * must read the new row, or its lease-fenced fill would store the old one. */
static void wait_visible(Run *r)
{
    const VisibleStats *vs;
    int rc;

    if (visible_pending(r->vis) == 0)
        return;
    rc = visible_wait(r->vis, 10000, keepalive_tick, r);
    vs = visible_stats(r->vis);
    metrics_inc(r->metrics, METRICS_VISIBILITY_QUERIES, vs->queries - r->vis_seen.queries);
    metrics_inc(r->metrics, METRICS_VISIBILITY_WAITS, vs->waits - r->vis_seen.waits);
    r->vis_seen = *vs;
    if (rc < 0)
        log_warn("%s; invalidating without the visibility check", visible_errstr(r->vis));
    else if (rc == 0 && !runtime_stop)
        log_warn("decoded transactions are still not visible to other sessions after 10 s "
                 "(synchronous replication waiting for a standby?); invalidating anyway");
}

/* Lookup-derived invalidations go to every target; the batch's commits
 * were noted for visibility when the lookups were queued. */
static void emit_derived(void *arg, RulesInvAction action, const char *s, size_t len,
                         const char *payload, size_t payload_len)
{
    Run *r = arg;
    apply_add(r->ap, action, s, len, payload, payload_len);
}

static void lookup_widened(void *arg, const char *table, unsigned n)
{
    Run *r = arg;
    r->stats.widened += n;
    metrics_widened(r->metrics, table, n);
}

/* Run the batch's lookups once its commits are visible, adding what they
 * derive to every target's batch (docs/rules.md "Lookups"). Returns 0 when
 * there were none or all ran; -1 when they failed or wait for their retry
 * time: the batch stays whole and nothing is confirmed past it. */
static int run_lookups(Run *r)
{
    LookupRenderStats st = {0, 0, 0};
    char lsn[LSN_TEXT_MAX];
    unsigned long long queries;
    int ms, rc;

    if (lookup_batch_calls(r->lk) == 0) {
        if (r->lk_backoff.attempt > 0) {
            /* The failing calls were dropped (a reload applied them
             * widened): nothing is held any more. */
            backoff_reset(&r->lk_backoff);
            r->lk_retry_at = 0;
            metrics_set_condition(r->metrics, METRICS_COND_LOOKUPS, true, NULL);
        }
        return 0;
    }
    if (runtime_now_us() < r->lk_retry_at)
        return -1;
    wait_visible(r);
    queries = lookup_exec_stats(r->lkx)->queries;
    rc = lookup_exec_run(r->lkx, r->rules, r->lk, emit_derived, lookup_widened, r, keepalive_tick,
                         r, &st);
    metrics_inc(r->metrics, METRICS_LOOKUP_QUERIES, lookup_exec_stats(r->lkx)->queries - queries);
    if (rc == 0) {
        if (r->lk_backoff.attempt > 0)
            log_info("lookups succeeded after %d retries; resuming", r->lk_backoff.attempt);
        if (st.over_limit > 0)
            log_event(LOG_LEVEL_WARN, lsn_format(apply_pending_lsn(r->ap), lsn), NULL,
                      "%zu lookup(s) returned more rows than their rule's limit; their keys "
                      "were widened to patterns",
                      st.over_limit);
        lookup_batch_clear(r->lk);
        backoff_reset(&r->lk_backoff);
        r->lk_retry_at = 0;
        metrics_set_condition(r->metrics, METRICS_COND_LOOKUPS, true, NULL);
        return 0;
    }
    /* The batch is held: no invalidation is applied until they succeed. */
    metrics_set_condition(r->metrics, METRICS_COND_LOOKUPS, false, lookup_exec_errstr(r->lkx));
    ms = backoff_next(&r->lk_backoff);
    r->lk_retry_at = runtime_now_us() + (int64_t)ms * 1000;
    r->stats.retries++;
    metrics_inc(r->metrics, METRICS_LOOKUP_ERRORS, 1);
    log_event(LOG_LEVEL_ERROR, lsn_format(apply_acked(r->ap), lsn), NULL,
              "%s; retrying in %d ms; nothing is confirmed past this position until the "
              "lookups succeed (WAL is retained by the slot)",
              lookup_exec_errstr(r->lkx), ms);
    return -1;
}

/* An out-of-memory target, or one short of replicas, is logged at most
 * this often (it is retried every APPLY_OOM_RETRY_MS or
 * APPLY_SHORTFALL_RETRY_MS; the metrics count every refusal). */
#define RUN_OOM_LOG_US (10 * 1000000)

/* Whether target i's soft failure may be logged now (RUN_OOM_LOG_US). */
static bool soft_log_due(Run *r, int i)
{
    if (runtime_now_us() - r->soft_logged_us[i] < RUN_OOM_LOG_US)
        return false;
    r->soft_logged_us[i] = runtime_now_us();
    return true;
}

/* Log target i's failed flush (tr), with acked the position confirmed. */
static void log_target_failure(Run *r, int i, const ApplyTargetResult *tr, uint64_t acked)
{
    char lsn[LSN_TEXT_MAX];

    if (tr->kind == APPLY_FAIL_OOM) {
        if (!soft_log_due(r, i))
            return;
        log_event(LOG_LEVEL_ERROR, lsn_format(acked, lsn), NULL,
                  "redis target %s failed: %s; retrying in %d ms (then at least every %d ms); "
                  "reading from postgresql goes on and new deletes are applied, but nothing is "
                  "confirmed past this position until redis accepts the refused writes (WAL is "
                  "retained by the slot; this line repeats at most every %d s)",
                  r->targets[i], tr->err, tr->retry_ms, APPLY_OOM_RETRY_MS,
                  RUN_OOM_LOG_US / 1000000);
        return;
    }
    if (sink_shortfall(r->sinks[i])) {
        if (!soft_log_due(r, i)) {
            log_debug("redis target %s: %s; retrying in %d ms", r->targets[i], tr->err,
                      tr->retry_ms);
            return;
        }
        log_event(LOG_LEVEL_ERROR, lsn_format(acked, lsn), NULL,
                  "redis target %s failed: %s; retrying in %d ms (then at least every %d ms, "
                  "each retry counted in walbust_replica_shortfalls_total); reading from "
                  "postgresql goes on and new deletes ride with each retry, but nothing is "
                  "confirmed past this position until enough replicas acknowledge (WAL is "
                  "retained by the slot; this line repeats at most every %d s)",
                  r->targets[i], tr->err, tr->retry_ms, APPLY_SHORTFALL_RETRY_MS,
                  RUN_OOM_LOG_US / 1000000);
        return;
    }
    log_event(LOG_LEVEL_ERROR, lsn_format(acked, lsn), NULL,
              "redis target %s failed: %s; retrying in %d ms; %s", r->targets[i], tr->err,
              tr->retry_ms,
              r->nsinks == 1 ? "reading from postgresql is paused until redis acknowledges "
                               "(WAL is retained by the slot)"
                             : "its batch is kept and nothing is confirmed past this position "
                               "until it acknowledges (WAL is retained by the slot)");
}

/* Count the OOM refusals and replica shortfalls of target i's last flush. */
static void count_refusals(Run *r, int i)
{
    const SinkStats *st = sink_stats(r->sinks[i]);

    metrics_inc(r->metrics, METRICS_REDIS_OOM, st->oom_refusals - r->oom_seen[i]);
    metrics_inc(r->metrics, METRICS_REPLICA_SHORTFALLS,
                st->replica_shortfalls - r->shortfalls_seen[i]);
    r->oom_seen[i] = st->oom_refusals;
    r->shortfalls_seen[i] = st->replica_shortfalls;
}

/* Report target i's state to the metrics while its last batch succeeded
 * (a failed one is reported with its error where it failed): up while
 * connected. */
static void report_target(Run *r, int i)
{
    const char *err = sink_errstr(r->sinks[i]);
    bool up = sink_connected(r->sinks[i]);

    metrics_redis_target(r->metrics, i, r->targets[i], up, err[0] ? err : "not connected");
}

/* Log, count and report what apply_flush() did to target i. */
static void on_target_result(Run *r, int i, const ApplyTargetResult *tr, uint64_t acked)
{
    if (tr->outcome == APPLY_RECOVERED) {
        log_info("redis acknowledged after %d retries (target %s); resuming", tr->attempts,
                 r->targets[i]);
        r->soft_logged_us[i] = 0; /* the next outage is logged at once */
        notify_status("streaming");
    } else if (tr->outcome == APPLY_FAILED) {
        count_refusals(r, i);
        /* Any failed batch means the target is not applying
         * invalidations, whether the connection is gone or Redis
         * answers with an error (OOM, READONLY, NOPERM, ...). */
        metrics_redis_target(r->metrics, i, r->targets[i], false, tr->err);

        /* Report what was acknowledged before the failure now, not
         * after the coalescing delay: while Redis is down the slot
         * shows exactly the position walbust will resume from. */
        if (!r->pg_lost && stream_confirm(r->stream, acked, /* force= */ true) < 0)
            r->pg_lost = true;
        metrics_positions(r->metrics, stream_confirmed(r->stream), stream_received(r->stream),
                          stream_server_end(r->stream));
        r->stats.redis_errors++;
        r->stats.retries++;
        metrics_inc(r->metrics, METRICS_REDIS_ERRORS, 1);
        metrics_inc(r->metrics, METRICS_RETRIES, 1);
        log_target_failure(r, i, tr, acked);
        notify_status("waiting for redis");
    }
    if (!r->by_script_noted[i] && sink_watermark_by_script(r->sinks[i])) {
        r->by_script_noted[i] = true;
        log_info("redis target %s: the user may not run WATCH, UNWATCH or MULTI (NOPERM), so "
                 "every watermark goes by the compare-and-set script, which costs redis more per "
                 "batch; grant +watch +unwatch +multi +exec on the watermark (docs/security.md)",
                 r->targets[i]);
    }
    if (apply_attempts(r->ap, i) == 0)
        report_target(r, i);
}

/* Replay from what PostgreSQL was told (the slot shows where walbust
 * resumes after a Redis failure), not from what the failed Redis
 * acknowledged before it perhaps lost it: with the watermark ahead of
 * PostgreSQL (maybe_watermark), that can be less. */
static void rewind_to_reported(Run *r)
{
    uint64_t from = stream_reported(r->stream);

    stream_rewind(r->stream, from);
    apply_rewind(r->ap, from);
}

static void before_send(void *arg)
{
    Run *r = arg;

    r->stage_vis_start_us = runtime_now_us();
    wait_visible(r);
    r->stage_vis_end_us = runtime_now_us();
}

/* A flush moved the acknowledged position: record where the batch's first
 * commit spent its time (when the flush sent anything) and start timing
 * the next batch. */
static void record_stages(Run *r)
{
    if (r->stage_decoded_us != 0 && r->stage_vis_start_us != 0) {
        double st[METRICS_STAGE_COUNT];

        st[METRICS_STAGE_DECODE] = r->stage_decode_s;
        st[METRICS_STAGE_BATCH] = (double)(r->stage_vis_start_us - r->stage_decoded_us) / 1e6;
        st[METRICS_STAGE_VISIBILITY] = (double)(r->stage_vis_end_us - r->stage_vis_start_us) / 1e6;
        st[METRICS_STAGE_REDIS] = (double)(runtime_now_us() - r->stage_vis_end_us) / 1e6;
        metrics_batch_stages(r->metrics, st);
    }
    r->stage_decoded_us = 0;
}

/* Apply to every target whose turn it is (apply.h) and confirm the newest
 * commit every target acknowledged (docs/guarantees.md guarantee 2).
 * Returns the number of targets still holding unacknowledged work. */
static int flush_targets(Run *r)
{
    ApplyResult res;
    char lsn[LSN_TEXT_MAX];

    if (run_lookups(r) != 0)
        return r->nsinks; /* nothing is applied or confirmed past them */
    r->stage_vis_start_us = 0;
    apply_flush(r->ap, before_send, r, &res);
    for (int i = 0; i < r->nsinks; i++)
        on_target_result(r, i, &res.t[i], res.was_acked);
    if (res.replay) {
        /* A failed Redis may have lost what it acknowledged earlier (a
         * restart without persistence, a failover): replay from the
         * confirmed position, as after a crash (docs/guarantees.md guarantee 2). */
        rewind_to_reported(r);
        r->stage_decoded_us = 0;
        log_info("redis recovered; replaying from %s so that nothing applied only to the "
                 "failed redis is missed",
                 lsn_format(apply_acked(r->ap), lsn));
        r->pg_lost = true;
        r->replay = true;
        return 0;
    }
    /* Every target holds the watermark: PostgreSQL may hear of it (not
     * after a failure: the replay starts from what it was told). */
    if (res.holding == 0)
        slotwatch_allow(&r->sw, r->stream, r->watermark_lsn);
    if (res.acked > res.was_acked) {
        /* Reported within a few ms (a status update per batch would double
         * the walsender's work on small batches); at once when stopping. */
        if (!r->pg_lost && (runtime_stop ? stream_confirm(r->stream, res.acked, /* force= */ true)
                                         : stream_confirm_soon(r->stream, res.acked)) < 0) {
            log_warn("%s", stream_errstr(r->stream));
            r->pg_lost = true;
        }
        record_ack(r);
        record_stages(r);
    }
    return res.holding;
}

/* Milliseconds until the earliest retry of a target holding work (0: a
 * flush is due now), at most cap. */
static int flush_wait_ms(const Run *r, int cap)
{
    int64_t now = runtime_now_us();
    int64_t best = (int64_t)cap * 1000;
    int64_t due = apply_due_in_us(r->ap);

    if (!r->in_txn && apply_pending_lsn(r->ap) > apply_acked(r->ap) && !sinks_have_ops(r))
        return 0; /* a commit without queued work: only needs confirming */
    if (lookup_batch_calls(r->lk) > 0) {
        if (r->lk_retry_at <= now)
            return 0;
        if (r->lk_retry_at - now < best)
            best = r->lk_retry_at - now;
    }
    if (due == 0)
        return 0;
    if (due < best)
        best = due;
    return (int)((best + 999) / 1000);
}

/* Flush until every target acknowledged (all = true) or no target's batch
 * is full (all = false), retrying with each target's backoff; reading from
 * PostgreSQL pauses meanwhile (docs/guarantees.md guarantee 3) while status updates keep the
 * connection alive. Returns 0, or -1 when asked to stop first. */
static void watch_targets(Run *r);

static int flush_wait(Run *r, bool all)
{
    for (;;) {
        int holding = flush_targets(r);

        if (all ? holding == 0 || apply_only_soft_holds(r->ap) : !sinks_full(r))
            return 0;
        if (runtime_stop)
            return -1;
        runtime_sleep(flush_wait_ms(r, 1000), keepalive_tick, r);
        /* A failover is the likeliest reason a batch keeps failing: follow
         * a +switch-master now rather than after the batch landed. */
        watch_targets(r);
    }
}

static int flush_batch(Run *r)
{
    return flush_wait(r, /* all= */ true);
}

static int verify_slot_late(Run *r);

/* Record the confirmed position in Redis for readers (docs/freshness.md); it rides
 * with the next flush. PostgreSQL hears of a position only once every
 * target holds it (flush_targets), so the slot is never ahead of it. */
static void maybe_watermark(Run *r)
{
    uint64_t confirmed = stream_confirmed(r->stream);
    char lsn[LSN_TEXT_MAX];

    /* The watermark is the evidence of the slot's past: never overwrite
     * it before the slot was checked against it, nor while the stream is
     * about to reconnect (a replay may start before it). */
    if (r->pg_lost || (r->sw.unverified && verify_slot_late(r) != 0))
        return;
    if (confirmed < apply_acked(r->ap))
        confirmed = apply_acked(r->ap);
    /* A reader's pg_current_wal_insert_lsn() after a commit that ended at
     * a page boundary is past the next page's header, where no record
     * ends: without this it would wait for some later WAL. */
    confirmed = stream_past_page_header(r->stream, confirmed);
    if (confirmed <= r->watermark_lsn)
        return;
    lsn_format(confirmed, lsn);
    apply_set_watermark(r->ap, r->watermark_key, lsn, /* reset= */ false);
    r->watermark_lsn = confirmed;
    r->watermark_at_us = runtime_now_us();
}

/* A watermark queued alone waits up to this long (or --flush-interval,
 * when that is longer: the next batch comes no later) for the next batch
 * to ride with, instead of costing a Redis round trip of its own after
 * every batch (at ~1k commits/s that was half of all round trips). Readers
 * that wait for it (walbust_caught_up) poll at 2 ms and more. */
#define RUN_WATERMARK_DELAY_US 1000

/* --flush-interval, or floor_us when that is longer: a larger interval
 * stretches the waits that are tied to the next flush. */
static int64_t interval_at_least(const Run *r, int64_t floor_us)
{
    return r->flush_interval_us > floor_us ? r->flush_interval_us : floor_us;
}

/* Milliseconds to keep a lone watermark back (0: send it now, or there is
 * none, or other work is due anyway). */
static int watermark_hold_ms(const Run *r)
{
    int64_t left;

    if (r->watermark_at_us == 0 || sinks_have_ops(r) ||
        (!r->in_txn && apply_pending_lsn(r->ap) > apply_acked(r->ap)) || !sinks_dirty(r))
        return 0;
    left = r->watermark_at_us + interval_at_least(r, RUN_WATERMARK_DELAY_US) - runtime_now_us();
    return left > 0 ? (int)((left + 999) / 1000) : 0;
}

static void defer_lookup(void *arg, const RulesLookupCall *call)
{
    Run *r = arg;

    visible_note(r->vis, r->xid);
    lookup_batch_add(r->lk, call);
}

/* Evaluate one change against the rules of chg->table. */
static void eval_change(Run *r, const RulesChange *chg)
{
    RulesEvalStats st = {0};
    char lsn[LSN_TEXT_MAX];

    r->chg_now = chg;
    rules_eval(r->rules, chg, emit_to_sinks, r, &st);
    r->chg_now = NULL;
    if (r->lkx != NULL)
        (void)rules_eval_lookups(r->rules, chg, defer_lookup, r);
    schema_note_eval(r->schema, chg->table, &st);
    metrics_refresh(r->metrics, chg->table, st.refreshes, st.refresh_deletes, st.stales);
    if (st.widened > 0) {
        r->stats.widened += st.widened;
        metrics_widened(r->metrics, chg->table, st.widened);
        log_event(LOG_LEVEL_WARN, lsn_format(r->txn.final_lsn, lsn), chg->table,
                  "%u invalidation(s) widened to patterns: the change does not carry a value "
                  "a template needs (replica identity changed, a column the template names was "
                  "dropped or renamed, or an unchanged TOASTed value without old image)",
                  st.widened);
    }
}

/* Tables already invalidated as a whole by this message: a TRUNCATE of a
 * partitioned table lists every partition, and each maps to the same root;
 * its rules are widened once, not once per partition. */
typedef struct TruncSeen {
    const char **tables;
    size_t n, cap;
} TruncSeen;

static bool trunc_seen(TruncSeen *seen, const char *table)
{
    for (size_t i = 0; i < seen->n; i++)
        if (strcmp(seen->tables[i], table) == 0)
            return true;
    seen->tables = xgrow(seen->tables, &seen->cap, seen->n + 1, sizeof *seen->tables);
    seen->tables[seen->n++] = table;
    return false;
}

/* Evaluate chg against every rules table route_change() names for rel:
 * the relation itself and the partitioned or inheritance parents above it.
 * Returns -1 when the catalog could not be asked (replay: nothing past this
 * change is confirmed). */
static int eval_routed(Run *r, const PgoRelation *rel, RulesChange *chg, TruncSeen *seen)
{
    RouteResult rr;
    char err[512], lsn[LSN_TEXT_MAX];

    if (route_change(r->route, r->rules, rel, &rr, err, sizeof err) != 0) {
        log_event(LOG_LEVEL_ERROR, lsn_format(r->txn.final_lsn, lsn), rel->qualname,
                  "could not look up the partitions and parents of this table: %s; reconnecting "
                  "to replay from the confirmed position",
                  err);
        return -1;
    }
    if (rr.orphan)
        log_event(LOG_LEVEL_WARN, lsn_format(r->txn.final_lsn, lsn), rel->qualname,
                  "changes of a table that is neither published nor under a rules table any "
                  "more (detached or dropped since): invalidating everything the rules of the "
                  "%zu partitioned or parent table(s) cover",
                  rr.n);
    chg->partition_row = rr.partition_row && chg->op != RULES_TRUNCATE;
    for (size_t i = 0; i < rr.n; i++) {
        RulesChange c = *chg;
        c.table = rr.targets[i].table;
        if ((chg->op == RULES_TRUNCATE || rr.targets[i].widen) && trunc_seen(seen, c.table))
            continue;
        if (rr.targets[i].widen)
            change_widen(chg, rr.targets[i].table, &c);
        eval_change(r, &c);
    }
    return 0;
}

/* Add the changes counted so far to the metrics (count_change). */
static void count_flush(Run *r)
{
    for (size_t i = 0; i < r->ncounted; i++) {
        metrics_change_n(r->metrics, r->counted[i].name, r->counted[i].op, r->counted[i].n);
        r->counted[i].n = 0;
        r->counted[i].table = NULL;
    }
    r->ncounted = 0;
}

/* Count one change of table (the decoder's string) and op (a literal). */
static void count_change(Run *r, const char *table, const char *op)
{
    size_t i;

    for (i = 0; i < r->ncounted; i++)
        if (r->counted[i].table == table && r->counted[i].op == op) {
            r->counted[i].n++;
            return;
        }
    if (r->ncounted == RUN_COUNTED)
        count_flush(r);
    i = r->ncounted++;
    if (r->counted[i].name == NULL || strcmp(r->counted[i].name, table) != 0) {
        free(r->counted[i].name);
        r->counted[i].name = xstrdup(table);
    }
    r->counted[i].table = table;
    r->counted[i].op = op;
    r->counted[i].n = 1;
}

static int apply_change(Run *r, const PgoMsg *m)
{
    RulesChange chg;
    TruncSeen seen = {0};
    int rc;

    change_from_pgo(&r->cbuf, &r->txn, m, &chg);
    r->stats.changes++;
    count_change(r, chg.table,
                 chg.op == RULES_INSERT   ? "insert"
                 : chg.op == RULES_UPDATE ? "update"
                                          : "delete");
    rc = eval_routed(r, m->u.change.rel, &chg, &seen);
    free(seen.tables);
    return rc;
}

static int apply_truncate(Run *r, const PgoMsg *m)
{
    TruncSeen seen = {0};
    int rc = 0;

    for (uint32_t i = 0; i < m->u.truncate.nrels && rc == 0; i++) {
        RulesChange chg;
        change_truncate(&r->txn, m->u.truncate.rels[i], &chg);
        r->stats.changes++;
        count_change(r, chg.table, "truncate");
        rc = eval_routed(r, m->u.truncate.rels[i], &chg, &seen);
    }
    free(seen.tables);
    return rc;
}

static void apply_message(Run *r, const PgoMsg *m, uint64_t wal_start)
{
    char err[256], lsn[LSN_TEXT_MAX];

    if (schema_on_message(r->schema, m) || strcmp(m->u.message.prefix, "walbust") != 0)
        return;
    r->stats.messages++;
    if (change_walbust_message(m->u.message.content, m->u.message.len, rules_tag_prefix(r->rules),
                               emit_to_sinks, r, err, sizeof err) < 0)
        log_event(LOG_LEVEL_ERROR, lsn_format(wal_start, lsn), NULL,
                  "ignored malformed walbust message (not emitted by sql/walbust.sql?): %s", err);
}

/* A commit older than this when decoded means walbust is catching up on a
 * backlog (a restart, a burst, a walsender slower than walbust), not
 * following live writes. */
#define RUN_BACKLOG_AGE_US 5000
/* While catching up, read the replication socket at most this often (a fifth
 * of it while a lot more waits: stream_set_pace): the walsender is the slower
 * side then, and reading each message as it arrives cost ~0.3 recv() calls per
 * change in a drain. 1 ms and the 1 ms flush interval below (200 µs each
 * before) cut walbust's CPU per change in a drain by a quarter to a third at
 * the same rate. Live commits are never paced. */
#define RUN_BACKLOG_READ_PACE_US 1000

/* A negative nice value granted at start (systemd Nice=-5) shortens the
 * latency tails on saturated CPUs, but while catching up on a backlog it
 * takes the CPU from the backends and the walsender for nothing (prio.h):
 * the streaming thread yields it then, when it may take it back. */
static void start_priority(Run *r)
{
    int base;
    bool can_return;

    r->yield_nice = r->nice_yielded = false;
    if (!runtime_nice_probe(&base, &can_return) || base >= 0)
        return;
    r->live_nice = base;
    r->yield_nice = can_return;
    if (can_return)
        log_info("running at nice %d; the streaming thread goes to nice 0 while catching up on "
                 "a backlog and back to %d once live",
                 base, base);
    else
        log_info("running at nice %d, also while catching up on a backlog, where it takes CPU "
                 "from PostgreSQL's backends; to yield it then, let walbust return to it "
                 "(systemd LimitNICE=%d, which allows nice values down to %d, or CAP_SYS_NICE; "
                 "docs/operations.md, \"A CPU-bound database host\")",
                 base, 20 - base, base);
}

/* Yield the granted nice value while catching up, take it back once live
 * (start_priority). Called by pace_reads. */
static void yield_priority(Run *r)
{
    int want;

    if (!r->yield_nice || r->catching_up == r->nice_yielded)
        return;
    want = r->catching_up ? 0 : r->live_nice;
    if (runtime_thread_nice(want) != 0) {
        log_warn("could not set the streaming thread's nice value to %d (%s); it stays at %d", want,
                 strerror(errno), r->nice_yielded ? 0 : r->live_nice);
        r->yield_nice = false;
        return;
    }
    r->nice_yielded = r->catching_up;
    log_debug("streaming thread at nice %d (%s)", want,
              r->catching_up ? "catching up on a backlog" : "live");
}

/* Pace socket reads and flushes while the decoded commits are old
 * (stream_set_pace, hold_flush). Uses PostgreSQL's commit timestamps: with
 * a clock skew of more than 5 ms (database host behind walbust's) live
 * changes would be paced too, costing at most RUN_BACKLOG_FLUSH_INTERVAL_US
 * of latency; skew the other way only costs CPU. Called before the socket
 * is read, with the last commit decoded until then: one clock read per
 * read rather than one per commit. */
static void pace_reads(Run *r)
{
    int64_t age;

    if (!r->pace_due)
        return;
    r->pace_due = false;
    age = pgtime_now() - r->last_commit_time;
    r->catching_up = age > RUN_BACKLOG_AGE_US;
    stream_set_pace(r->stream, r->catching_up ? RUN_BACKLOG_READ_PACE_US : 0);
    yield_priority(r);
}

/* /readyz: not ready while the rules do not validate against the schema,
 * nor while the publication is missing (dropped while walbust runs). */
static void schema_readiness(Run *r)
{
    const char *first;
    size_t n = schema_problems(r->schema, &first);
    char why[512];

    metrics_set_condition(r->metrics, METRICS_COND_RULES_VALID, n == 0, first);
    if (!schema_publication_missing(r->schema)) {
        metrics_set_condition(r->metrics, METRICS_COND_PUBLICATION, true, NULL);
        return;
    }
    snprintf(why, sizeof why,
             "publication \"%s\" does not exist (dropped while walbust runs): the next change "
             "to a table it published stops the stream; re-create it with walbust setup before "
             "anything is written (docs/operations.md, runbook: publication or slot missing)",
             r->cfg->publication);
    metrics_set_condition(r->metrics, METRICS_COND_PUBLICATION, false, why);
}

/* A schema change on the rules' tables was seen in this transaction (or the
 * periodic re-check is due): re-validate and act before its COMMIT counts
 * (schema.h). Its invalidations join the batch that confirms the COMMIT.
 * Returns -1 when walbust must stop (logged). */
static int on_schema_change(Run *r)
{
    char err[1024], lsn[LSN_TEXT_MAX];

    lsn_format(r->in_txn ? r->txn.final_lsn : apply_pending_lsn(r->ap), lsn);
    if (r->in_txn) {
        /* The COMMIT is decoded before other sessions see it: the catalog
         * must show this transaction's DDL before it is read. */
        visible_note(r->vis, r->xid);
        wait_visible(r);
    }
    if (schema_apply(r->schema, lsn, err, sizeof err) == 0) {
        schema_readiness(r);
        return 0;
    }
    if (!runtime_stop) {
        log_event(LOG_LEVEL_ERROR, lsn, NULL, "%s", err);
        r->schema_stop = true;
        runtime_stop = 1;
    }
    return -1;
}

static int64_t hold_left_us(const Run *r);

/* Returns 0, or -1 when the message could not be decoded (reconnect and
 * replay: nothing is confirmed past it). */
static int on_data(Run *r, const StreamData *data)
{
    PgoMsg m;
    char lsn[LSN_TEXT_MAX];

    if (pgo_decode(r->dec, data->buf, data->len, &m) != 0) {
        log_event(LOG_LEVEL_ERROR, lsn_format(data->wal_start, lsn), NULL,
                  "could not decode pgoutput message (%zu bytes): %s; reconnecting to replay "
                  "from the confirmed position",
                  data->len, pgo_errstr(r->dec));
        return -1;
    }
    switch (m.kind) {
    case PGO_BEGIN:
        change_txn_begin(&r->txn, &m);
        r->in_txn = true;
        r->xid = m.u.begin.xid;
        /* The first transaction of a batch: start the visibility query now,
         * so its round trip overlaps the rest of the batch, unless the
         * batch will be held (its reply would predate what gathers). */
        if (visible_pending(r->vis) == 0 && !sinks_have_ops(r) && hold_left_us(r) == 0)
            visible_prefetch(r->vis, r->xid);
        break;
    case PGO_COMMIT:
        if (schema_due(r->schema, /* idle= */ false) && on_schema_change(r) != 0)
            return -1; /* not confirmed: replayed on restart */
        r->in_txn = false;
        apply_commit(r->ap, m.u.commit.end_lsn);
        if (r->stage_decoded_us == 0) {
            r->stage_decoded_us = runtime_now_us();
            r->stage_decode_s = ((double)pgtime_now() - (double)m.u.commit.commit_time) / 1e6;
        }
        r->last_commit_time = m.u.commit.commit_time; /* pace_reads, before the next read */
        r->pace_due = true;
        commitpace_add(&r->pace, m.u.commit.commit_time, r->flush_interval_us);
        r->stats.transactions++;
        metrics_inc(r->metrics, METRICS_TRANSACTIONS, 1);
        if (r->ncommit_times < COMMIT_SAMPLES)
            r->commit_times[r->ncommit_times++] = m.u.commit.commit_time;
#ifdef WALBUST_TEST_BROKEN_CONFIRM
        /* Deliberately wrong, for proving that the fault campaign sees a
         * loss: confirm at decode time, before Redis acknowledged, past
         * the watermark gate too (it alone would hold the position back to
         * what Redis acknowledged; see slotguard.c for the other half).
         * Only in `make broken` builds (build/broken/walbust). */
        apply_start_at(r->ap, apply_pending_lsn(r->ap));
        stream_set_confirm_limit(r->stream, UINT64_MAX);
        (void)stream_confirm(r->stream, apply_acked(r->ap), true);
#endif
        break;
    case PGO_INSERT:
    case PGO_UPDATE:
    case PGO_DELETE:
        if (apply_change(r, &m) != 0)
            return -1;
        break;
    case PGO_TRUNCATE:
        if (apply_truncate(r, &m) != 0)
            return -1;
        break;
    case PGO_RELATION:
        count_flush(r); /* the decoder may have freed the counted table's name */
        schema_on_relation(r->schema, m.u.relation.rel);
        break;
    case PGO_MESSAGE:
        apply_message(r, &m, data->wal_start);
        break;
    default:
        break;
    }
    if (sinks_full(r))
        (void)flush_wait(r, /* all= */ false); /* bounded memory: pause until there is room */
    return 0;
}

/* Validate rules against the live catalog, logging each problem. reload:
 * a SIGHUP's new rules (refused, the old ones stay), else start-up. */
static int check_catalog(Run *r, PGconn *conn, const Rules *rules, bool reload)
{
    char err[512];
    RulesProblems problems = {0};
    Catalog *cat = catalog_load(conn, rules, r->cfg->publication, err, sizeof err);
    int rc = 0;

    if (cat == NULL) {
        log_error("%s", err);
        return -1;
    }
    if (rules_check_catalog(rules, r->cfg->publication, catalog_lookup, cat, &problems) > 0) {
        cmd_print_problems(NULL, "", r->cfg->rules, &problems); /* as log events */
        if (reload)
            log_error("rules reload refused: the %zu problem(s) logged above would miss "
                      "invalidations; keeping the previous rules (fix %s and reload again; "
                      "walbust check --rules %s --pg ... shows the same)",
                      problems.count, r->cfg->rules, r->cfg->rules);
        else
            log_error("refusing to start: the %zu problem(s) logged above would miss "
                      "invalidations; fix them, then restart (walbust check --rules %s --pg "
                      "... shows the same)",
                      problems.count, r->cfg->rules);
        rc = -1;
    }
    rules_problems_release(&problems);
    catalog_free(cat);
    return rc;
}

static int startup_check(void *arg, PGconn *conn)
{
    Run *r = arg;
    static bool checked = false;
    char err[1024];

    if (checked)
        return 0;
    if (schema_startup(r->schema, "start", err, sizeof err) != 0) {
        log_error("%s", err);
        return -1;
    }
    schema_readiness(r);
    if (check_catalog(r, conn, r->rules, /* reload= */ false) != 0)
        return -1;
    checked = true;
    return 0;
}

/* statement_timeout of the lookup connection. */
#define RUN_LOOKUP_TIMEOUT_MS 5000

/* The reload thread: compile the new rules and validate them against the
 * catalog on a connection of its own, while the loop keeps streaming with
 * the old rules. Only reads r->cfg; hands the result over in r->reload. */
static void *reload_thread(void *arg)
{
    Run *r = arg;
    Rules *fresh = cmd_load_rules(r->cfg->rules, NULL);
    PGconn *conn;
    char err[512];

    if (fresh == NULL) {
        log_error("rules reload failed: %s has the problems logged above; keeping the previous "
                  "rules (fix the file and reload again)",
                  r->cfg->rules);
    } else if ((conn = stream_plain_connect(r->cfg->pg, err, sizeof err)) == NULL) {
        log_error("rules reload: %s; keeping the previous rules", err);
        rules_free(fresh);
        fresh = NULL;
    } else {
        if (check_catalog(r, conn, fresh, /* reload= */ true) != 0) {
            rules_free(fresh);
            fresh = NULL;
        } else {
            /* So that the swap needs no catalog check on the streaming
             * thread (schema_set_rules_checked()). */
            r->reload.relids = xcalloc(rules_table_count(fresh) + 1, sizeof *r->reload.relids);
            if (schema_load_relids(conn, fresh, r->reload.relids, err, sizeof err) != 0) {
                log_warn("rules reload: %s; the new tables are checked after the swap", err);
                free(r->reload.relids);
                r->reload.relids = NULL;
            }
        }
        PQfinish(conn);
    }
    r->reload.fresh = fresh;
    atomic_store(&r->reload.done, 1);
    return NULL;
}

/* SIGHUP: start the reload thread (one at a time; a SIGHUP meanwhile starts
 * another one after it). */
static void reload_begin(Run *r)
{
    runtime_reload = 0;
    log_info("SIGHUP: reloading rules from %s (streaming goes on meanwhile)", r->cfg->rules);
    atomic_store(&r->reload.done, 0);
    r->reload.fresh = NULL;
    r->reload.relids = NULL;
    r->reload.generation = schema_generation(r->schema);
    if (pthread_create(&r->reload.thread, NULL, reload_thread, r) != 0) {
        log_error("rules reload: could not start a thread; keeping the previous rules");
        return;
    }
    r->reload.running = true;
}

static void *reaper_thread(void *arg)
{
    rules_free(arg);
    /* The old rules and what the reload thread parsed were freed in two
     * malloc arenas that glibc would otherwise keep: hand them back. */
    malloc_trim(0);
    return NULL;
}

static void reap_join(Run *r)
{
    if (r->reload.reaping)
        pthread_join(r->reload.reaper, NULL);
    r->reload.reaping = false;
}

/* Free rules a swap replaced off the streaming thread: with 10,000 rules
 * freeing them and trimming the heap took ~50 ms. */
static void reap_rules(Run *r, Rules *old)
{
    reap_join(r);
    if (pthread_create(&r->reload.reaper, NULL, reaper_thread, old) == 0) {
        r->reload.reaping = true;
        return;
    }
    reaper_thread(old);
}

/* Swap in the validated rules once the thread is done (between changes:
 * a transaction may see the old rules for its first changes and the new
 * ones after, as with any reload). */
static void reload_finish(Run *r)
{
    Rules *fresh;
    int64_t t0 = runtime_now_us();

    pthread_join(r->reload.thread, NULL);
    r->reload.running = false;
    fresh = r->reload.fresh;
    r->reload.fresh = NULL;
    if (fresh == NULL) {
        free(r->reload.relids);
        r->reload.relids = NULL;
        return;
    }
    if (lookup_batch_calls(r->lk) > 0) {
        /* Queued calls belong to the old rules: apply them widened. */
        log_warn("rules reload: %zu queued lookup(s) applied widened to patterns",
                 lookup_batch_calls(r->lk));
        lookup_batch_widen(r->lk, r->rules, emit_derived, lookup_widened, r);
        lookup_batch_clear(r->lk);
    }
    if (r->lkx == NULL && rules_has_lookups(fresh))
        r->lkx = lookup_exec_new(r->cfg->pg, RUN_LOOKUP_TIMEOUT_MS);
    reap_rules(r, r->rules);
    r->rules = fresh;
    route_rules_changed(r->route);
    schema_set_rules_checked(r->schema, fresh, r->reload.relids, r->reload.generation);
    free(r->reload.relids);
    r->reload.relids = NULL;
    schema_readiness(r);
    for (int i = 0; i < r->nsinks; i++)
        sink_set_use_del(r->sinks[i], rules_use_del(fresh));
    audit_run_reload(r->audit);
    log_debug("rules swap: %.1f ms on the streaming thread",
              (double)(runtime_now_us() - t0) / 1000.0);
    log_info("rules reloaded: %zu tables", rules_table_count(fresh));
}

static void reload_rules(Run *r)
{
    if (r->reload.running && atomic_load(&r->reload.done) && !schema_busy(r->schema))
        reload_finish(r);
    if (runtime_reload && !r->reload.running)
        reload_begin(r);
}

static void report(Run *r, bool force)
{
    int64_t now = runtime_now_us();
    char lsn[LSN_TEXT_MAX];

    count_flush(r);
    if (!force && now - r->last_report_us < 60 * 1000000LL)
        return;
    r->last_report_us = now;
    log_info("transactions=%llu changes=%llu messages=%llu widened=%llu retries=%llu "
             "confirmed=%s",
             (unsigned long long)r->stats.transactions, (unsigned long long)r->stats.changes,
             (unsigned long long)r->stats.messages, (unsigned long long)r->stats.widened,
             (unsigned long long)r->stats.retries, lsn_format(stream_confirmed(r->stream), lsn));
}

/* Stream until stopped or the connection fails. */
/* Under sustained load the connection always has more ready, so "flush
 * when nothing more is ready" alone would hold a batch until it is full
 * (10,000 invalidations). Bound how long decoded work may wait instead
 * (or --flush-interval, when that is longer). */
#define RUN_MAX_BATCH_AGE_US 1000

/* Has the unflushed batch waited RUN_MAX_BATCH_AGE_US or --flush-interval
 * (and may a flush run now)? Called every few messages while the stream
 * has more ready. */
static bool batch_overdue(Run *r)
{
    int64_t now;

    if (!sinks_have_ops(r) && apply_pending_lsn(r->ap) <= apply_acked(r->ap)) {
        r->batch_since_us = 0;
        return false;
    }
    now = runtime_now_us();
    if (r->batch_since_us == 0)
        r->batch_since_us = now;
    if (now - r->batch_since_us < interval_at_least(r, RUN_MAX_BATCH_AGE_US) ||
        flush_wait_ms(r, 1000) != 0)
        return false;
    r->batch_since_us = 0;
    return true;
}

/* While commits arrive faster than one per interval (commitpace.h) or a
 * backlog is caught up, flushes are spaced by --flush-interval (0.2 ms, or
 * up to 1 ms under CPU contention with the default auto). Flushing more
 * often than that buys no latency anyone could see, but each flush costs a
 * wakeup, a Redis round trip and the batch overhead: in a backlog drain
 * walbust outpaces the walsender and would flush every few changes.
 * Measured: -35 % CPU per change in the drain, latency unchanged. A larger
 * interval trades latency for less CPU per change, on walbust, Redis and
 * PostgreSQL's snapshot session alike (docs/performance-history.md). The spacing
 * is at least this while catching up on a backlog (commits older than
 * RUN_BACKLOG_AGE_US), where a millisecond more on a commit already that
 * old changes nothing anyone sees, but fewer, larger batches cost fewer
 * round trips and wakeups per change. */
#define RUN_BACKLOG_FLUSH_INTERVAL_US 1000

/* --flush-interval auto: its range. 0.2 ms is the old fixed default
 * (below it flushing buys no latency anyone could see); 1 ms bounds the
 * latency it may add. Under pgbench on a saturated 2-core host, 1 ms cut
 * the CPU walbust, Redis and walbust's sessions take per transaction by
 * a fifth to a third; a 2 ms cap saved no more, for more latency
 * (docs/performance-history.md). */
#define RUN_AUTO_FLUSH_MIN_US 200
#define RUN_AUTO_FLUSH_MAX_US 1000

static void start_flush_interval(Run *r)
{
    uint64_t delay_ns, slices;

    r->flush_interval_us = r->cfg->flush_interval_us;
    r->auto_interval = r->cfg->flush_interval_auto;
    if (r->auto_interval && !runtime_sched_wait(&delay_ns, &slices)) {
        log_warn("--flush-interval auto: cannot read how long walbust waits for a CPU "
                 "(/proc/thread-self/schedstat: /proc not mounted, or a kernel without "
                 "CONFIG_SCHED_INFO); using a fixed %g ms. Set --flush-interval to a number "
                 "of milliseconds to silence this",
                 RUN_AUTO_FLUSH_MIN_US / 1000.0);
        r->auto_interval = false;
    }
    if (r->cfg->flush_interval_auto)
        r->flush_interval_us = RUN_AUTO_FLUSH_MIN_US;
    cpuwait_init(&r->cpuwait, RUN_AUTO_FLUSH_MIN_US, RUN_AUTO_FLUSH_MAX_US);
    commitpace_init(&r->pace);
    /* The holds above are a fraction of a millisecond: let them end on
     * time (the streaming thread only; nothing to do when refused). */
    (void)runtime_precise_sleeps();
    metrics_flush_interval(r->metrics, (double)r->flush_interval_us / 1e6);
}

/* --flush-interval auto: follow the streaming thread's wait for a CPU and
 * how busy the host's CPUs are (cpuwait.h). A clock read per call; the
 * counters every 100 ms. */
static void retune_flush_interval(Run *r)
{
    int64_t now;
    uint64_t delay_ns, slices;
    CpuHost host;

    if (!r->auto_interval)
        return;
    now = runtime_now_us();
    if (!cpuwait_due(&r->cpuwait, now) || !runtime_sched_wait(&delay_ns, &slices))
        return;
    if (cpuwait_sample_host(&r->cpuwait, now, delay_ns, slices,
                            runtime_host_cpu(&host.busy, &host.total) ? &host : NULL)) {
        r->flush_interval_us = cpuwait_interval_us(&r->cpuwait);
        metrics_flush_interval(r->metrics, (double)r->flush_interval_us / 1e6);
    }
}

/* How long a batch ready now would be held (hold_flush), in µs; 0: not. */
static int64_t hold_left_us(const Run *r)
{
    int64_t interval =
        r->catching_up ? interval_at_least(r, RUN_BACKLOG_FLUSH_INTERVAL_US) : r->flush_interval_us;
    int64_t since = runtime_now_us() - r->last_flush_us;

    if (since < 0 || since >= interval)
        return 0;
    if (!r->catching_up && !commitpace_busy(&r->pace, interval))
        return 0;
    return interval - since;
}

/* When the last flush ended less than --flush-interval ago and more than
 * one commit arrives per interval (commitpace.h) or a backlog is being
 * caught up, sleep out the rest (so more of the stream gathers) and return
 * true: the caller reads again before flushing. At ordinary rates, where
 * holding a batch would gather nothing, it never sleeps. */
static bool hold_flush(Run *r)
{
    int64_t left;
    struct timespec ts = {0, 0};

    /* A commit without queued work costs no round trip: never held. */
    if (!sinks_have_ops(r) || (left = hold_left_us(r)) == 0)
        return false;
    ts.tv_sec = (time_t)(left / 1000000);
    ts.tv_nsec = (long)(left % 1000000) * 1000;
    nanosleep(&ts, NULL);
    return true;
}

/* redis+sentinel:// targets: reconnect as soon as the Sentinels announce
 * a new master (+switch-master), even with no batch in flight, instead of
 * at the next write; what the old master acknowledged is replayed as
 * after any Redis failure (flush_targets). */
static void watch_targets(Run *r)
{
    for (int i = 0; i < r->nsinks; i++) {
        char err[700];
        int rc = sink_watch(r->sinks[i], err, sizeof err);

        if (rc == 2)
            log_info("redis target %s: %s", r->targets[i], err);
        if (rc == -1)
            log_info("redis target %s: not hearing of failovers for now (%s); they are still "
                     "followed when a write fails",
                     r->targets[i], err);
        if (rc != 1)
            continue;
        log_warn("redis target %s: %s; reconnecting", r->targets[i], err);
        apply_replay_needed(r->ap);
        if (sink_connect(r->sinks[i]) == 0)
            log_info("connected to redis at %s", r->targets[i]);
        else
            log_warn("redis target %s: %s; will retry with the next batch", r->targets[i],
                     sink_errstr(r->sinks[i]));
        report_target(r, i);
    }
}

/* notify_watchdog() from the stream loop, at most every
 * RUN_WATCHDOG_EVERY_US: it reads WATCHDOG_USEC and WATCHDOG_PID from the
 * environment on every call (2 % of walbust's instructions under pgbench,
 * twice per batch), and systemd's watchdog intervals are seconds. */
#define RUN_WATCHDOG_EVERY_US 100000

static void feed_watchdog(Run *r)
{
    int64_t now = runtime_now_us();

    if (now - r->watchdog_at_us < RUN_WATCHDOG_EVERY_US)
        return;
    r->watchdog_at_us = now;
    notify_watchdog();
}

static void stream_loop(Run *r)
{
    while (!runtime_stop && !r->pg_lost) {
        StreamData data;
        bool dirty = false;
        int rc;

        if (runtime_reload || r->reload.running)
            reload_rules(r);
        stream_set_idle(r->stream, !r->in_txn && !sinks_have_ops(r) &&
                                       apply_pending_lsn(r->ap) <= apply_acked(r->ap));
        /* A message already buffered needs no deadline: the clock is read
         * only before waiting (two reads per message were 7 % of walbust's
         * CPU in a drain). */
        rc = stream_next_buffered(r->stream, &data);
        if (rc == 0) {
            /* A decoded commit not yet acknowledged also needs a flush,
             * even when its changes were sent earlier (mid-transaction
             * flush) or produced none: otherwise it stays unconfirmed
             * until the next change arrives. */
            int wait_ms, hold_ms;

            pace_reads(r);
            dirty = sinks_dirty(r) || (!r->in_txn && apply_pending_lsn(r->ap) > apply_acked(r->ap));
            wait_ms = dirty ? flush_wait_ms(r, 1000) : 1000;
            hold_ms = dirty ? watermark_hold_ms(r) : 0;
            if (hold_ms > 0) {
                dirty = false; /* only a fresh watermark: let the next batch carry it */
                wait_ms = hold_ms;
            }
            rc = stream_next(r->stream, wait_ms, &data);
        }
        if (rc > 0) {
            if (on_data(r, &data) != 0)
                break;
            if (++r->since_tick >= 4096) {
                /* A long burst: keep the watchdog fed and gauges fresh. */
                r->since_tick = 0;
                watch_targets(r);
                notify_watchdog();
            }
            if ((r->since_tick & 31) != 0)
                continue;
            count_flush(r);
            retune_flush_interval(r);
            if (batch_overdue(r) &&
                (r->nsinks == 1 ? flush_batch(r) != 0 : flush_wait(r, false) != 0))
                return;
            continue;
        }
        if (rc < 0) {
            log_warn("%s", stream_errstr(r->stream));
            break;
        }
        /* Nothing more is ready: apply what was gathered. One target:
         * wait for it (reading pauses while Redis fails, docs/guarantees.md guarantee 3).
         * Several: a failing target keeps its batch (bounded by sink_full)
         * and is retried on its own backoff while the others keep
         * applying; confirmation waits for all of them. */
        count_flush(r);
        retune_flush_interval(r);
        if (dirty && flush_wait_ms(r, 1000) == 0) {
            if (hold_flush(r))
                continue;
            r->batch_since_us = 0;
            if (r->nsinks == 1 ? flush_batch(r) != 0 : flush_wait(r, false) != 0)
                return;
            r->last_flush_us = runtime_now_us();
        } else if (!dirty) {
            metrics_positions(r->metrics, stream_confirmed(r->stream), stream_received(r->stream),
                              stream_server_end(r->stream));
        }
        if (!r->in_txn && schema_due(r->schema, /* idle= */ true) && on_schema_change(r) != 0)
            return;
        maybe_watermark(r);
        watch_targets(r);
        feed_watchdog(r);
        report(r, false);
    }
}

/* The retry delay of a target after `attempt` failed flushes in a row:
 * capped exponential backoff with jitter (runtime.h defaults). */
static int retry_delay(int attempt)
{
    Backoff b = {.attempt = attempt};

    return backoff_next(&b);
}

static int setup_sinks(Run *r)
{
    for (int i = 0; i < r->cfg->nredis; i++) {
        SinkConfig sc = {0};
        char err[512];

        if (redisurl_parse(r->cfg->redis[i], &sc.url, err, sizeof err) != 0) {
            log_error("%s", err);
            return -1;
        }
        redisurl_describe(&sc.url, r->targets[i], sizeof r->targets[i]);
        sc.use_del = rules_use_del(r->rules);
        r->sinks[i] = sink_new(&sc);
        r->nsinks++;
        (void)apply_add_target(r->ap, &sink_apply_ops, r->sinks[i]);
        if (sink_config_error(r->sinks[i]) != NULL) {
            log_error("redis target %s: %s", r->targets[i], sink_config_error(r->sinks[i]));
            return -1;
        }
        if (sc.url.insecure)
            log_warn("redis target %s: insecure=1: the server's TLS certificate and name are "
                     "NOT verified; anyone on the path can impersonate it",
                     r->targets[i]);
        if (sink_connect(r->sinks[i]) != 0)
            log_warn("redis target %s: %s; will retry before the first batch", r->targets[i],
                     sink_errstr(r->sinks[i]));
        else
            log_info("connected to redis at %s", r->targets[i]);
        report_target(r, i);
    }
    return 0;
}

/* runtime_open_stream() reports what it is doing: the role gauge follows,
 * and a standby, which applies nothing, keeps its Redis gauges true by
 * PINGing each target (once a second, as it polls the slot) rather than
 * showing Redis down. */
static void on_runtime_state(void *arg, RuntimeState state, const char *detail)
{
    Run *r = arg;

    switch (state) {
    case RUNTIME_STREAMING:
        metrics_role(r->metrics, METRICS_ROLE_ACTIVE, NULL);
        /* The stream checked the publication when it connected. */
        metrics_set_condition(r->metrics, METRICS_COND_PUBLICATION, true, NULL);
        r->ever_streamed = true;
        break;
    case RUNTIME_STANDBY:
        metrics_role(r->metrics, METRICS_ROLE_STANDBY, detail);
        for (int i = 0; i < r->nsinks; i++) {
            bool up = sink_ping(r->sinks[i]) == 0;
            metrics_redis_target(r->metrics, i, r->targets[i], up, sink_errstr(r->sinks[i]));
        }
        break;
    case RUNTIME_CONNECTING:
        metrics_role(r->metrics, r->ever_streamed ? METRICS_ROLE_ACTIVE : METRICS_ROLE_STARTING,
                     detail);
        break;
    }
}

/* ---- slot lifecycle (slotwatch.h) ---- */

/* runtime_open_stream()'s slot hook (RuntimeSlotFn). */
static int slot_hook(void *arg, Stream *s, StreamStatus st)
{
    Run *r = arg;

    return slotwatch_hook(&r->sw, s, st);
}

/* The stream was opened while Redis could not be read: returns 0 once the
 * slot checked out, -1 while not (no watermark may be written yet). A lost
 * slot leaves the stream loop (cmd_run follows --on-slot-lost); evidence
 * walbust may not read stops it (drain, then exit 1). */
static int verify_slot_late(Run *r)
{
    if (slotwatch_verify(&r->sw, r->stream) == 0)
        return 0;
    if (r->sw.lost.verdict == SLOT_LOST)
        r->pg_lost = true;
    if (r->sw.fatal) {
        r->slot_fatal = true;
        runtime_stop = 1;
    }
    return -1;
}

/* --on-slot-lost=flush-rules: the slot's WAL is gone, so changes since its
 * confirmed position cannot be replayed. Recreate the slot first (changes
 * from now on are captured), then invalidate everything the rules cover,
 * widened as for a truncate of every table, so nothing cached before can
 * survive; the watermark and the mark then describe the new slot. Returns 0
 * when all is done. */
static int recover_lost_slot(Run *r)
{
    char a[LSN_TEXT_MAX], b[LSN_TEXT_MAX];
    ChangeTxn txn = {0};
    uint64_t at = 0;

    if (slotwatch_recreate(&r->sw, &at) != 0)
        return -1;
    log_warn("recreated lost slot \"%s\" at %s; the WAL from %s to %s was not applied: "
             "invalidating everything the rules cover",
             r->cfg->slot, lsn_format(at, a), lsn_format(r->sw.lost.from, b), a);

    snprintf(txn.lsn_text, sizeof txn.lsn_text, "0/0");
    pgtime_format(pgtime_now(), txn.time_text);
    for (size_t i = 0; i < rules_table_count(r->rules); i++) {
        RulesChange chg = {.table = rules_table(r->rules, i),
                           .op = RULES_TRUNCATE,
                           .lsn = txn.lsn_text,
                           .commit_time = txn.time_text};
        rules_eval(r->rules, &chg, emit_to_sinks, r, NULL);
    }
    /* Everything before the new slot's start is now invalidated: the
     * watermark may say so (readers waiting for an older LSN may go on). */
    apply_set_watermark(r->ap, r->watermark_key, a, /* reset= */ true);
    r->watermark_lsn = at;
    if (flush_batch(r) != 0 || slotwatch_mark_new(&r->sw, stream_slot(r->stream), at) != 0)
        return -1;
    apply_rewind(r->ap, 0);
    log_info("caches the rules cover are flushed; streaming from the new slot");
    return 0;
}

/* A lost slot (r->sw.lost, logged): follow --on-slot-lost. Returns 0 when the
 * slot was recreated and the caches flushed, -1 to stop. */
static int slot_lost(Run *r)
{
    if (strcmp(r->cfg->on_slot_lost, "flush-rules") == 0)
        return recover_lost_slot(r);
    log_error("stopping: replication slot \"%s\" is lost (above) and --on-slot-lost is fail "
              "(--create-slot creates a slot only on first use, never over a lost one). To go "
              "on, restart once with --on-slot-lost flush-rules (walbust recreates the slot, "
              "then invalidates everything the rules cover), or by hand: SELECT "
              "pg_drop_replication_slot('%s') if it still exists, walbust setup, flush the "
              "caches the rules cover, then DEL %s and start walbust (docs/operations.md, "
              "runbook: lost slot)",
              r->cfg->slot, r->cfg->slot, r->mark_key);
    return -1;
}

static void run_free(Run *r)
{
    audit_run_stop(r->audit);
    schema_free(r->schema);
    if (r->reload.running) {
        pthread_join(r->reload.thread, NULL);
        rules_free(r->reload.fresh);
        free(r->reload.relids);
    }
    reap_join(r);
    metrics_free(r->metrics);
    route_free(r->route);
    visible_free(r->vis);
    lookup_exec_free(r->lkx);
    lookup_batch_free(r->lk);
    free(r->commit_times);
    for (size_t i = 0; i < RUN_COUNTED; i++)
        free(r->counted[i].name);
    for (int i = 0; i < r->nsinks; i++)
        sink_free(r->sinks[i]);
    apply_free(r->ap);
    stream_free(r->stream);
    pgo_free(r->dec);
    change_buf_release(&r->cbuf);
    rules_free(r->rules);
}

/* A stream that ends right after it started (a server that accepts
 * START_REPLICATION and then fails, again and again) must not reconnect
 * in a tight loop: wait the capped, jittered backoff, which starts over
 * only after the stream stayed up this long. */
#define RUN_HEALTHY_STREAM_US (30 * 1000000LL)

static void reconnect_pause(Backoff *b, int64_t streaming_since)
{
    int ms;

    if (runtime_now_us() - streaming_since >= RUN_HEALTHY_STREAM_US)
        backoff_reset(b);
    ms = backoff_next(b);
    if (b->attempt > 1)
        log_warn("the replication stream failed %d times in a row within %lld s of starting; "
                 "reconnecting in %d ms",
                 b->attempt, RUN_HEALTHY_STREAM_US / 1000000, ms);
    notify_status("waiting for postgresql");
    runtime_sleep(ms, NULL, NULL);
}

int cmd_run(const Config *cfg)
{
    Run r = {.cfg = cfg};
    StreamConfig sc = {
        .conninfo = cfg->pg, .slot = cfg->slot, .publication = cfg->publication, .confirm = true};
    Backoff reconnect = {0, 200, 10000};
    int64_t streaming_since = 0;
    int rc = 1;

    r.rules = cmd_load_rules(cfg->rules, NULL);
    if (r.rules == NULL)
        return 1;
    snprintf(r.watermark_key, sizeof r.watermark_key, "walbust:confirmed:%s", cfg->slot);
    snprintf(r.mark_key, sizeof r.mark_key, "walbust:slot:%s", cfg->slot);
    runtime_signals();
    r.metrics = metrics_new();
    r.ap = apply_new(&(ApplyConfig){.now_us = runtime_now_us, .delay_ms = retry_delay});
    r.vis = visible_new(cfg->pg);
    r.lk = lookup_batch_new();
    if (rules_has_lookups(r.rules))
        r.lkx = lookup_exec_new(cfg->pg, RUN_LOOKUP_TIMEOUT_MS);
    r.route = route_new(cfg->pg, cfg->publication);
    r.commit_times = malloc(COMMIT_SAMPLES * sizeof *r.commit_times);
    if (r.commit_times == NULL)
        abort();
    {
        char err[512];
        if (metrics_listen(r.metrics, cfg->metrics, err, sizeof err) != 0) {
            log_error("%s", err);
            goto done;
        }
        if (strcmp(cfg->metrics, "off") != 0)
            log_info("metrics on http://%s/metrics", cfg->metrics);
    }
    if (setup_sinks(&r) != 0)
        goto done;
    start_flush_interval(&r);
    start_priority(&r);
    r.audit = audit_run_from_config(cfg, r.rules, r.metrics);
    slotwatch_init(&r.sw, &(SlotWatchConfig){.slot = cfg->slot,
                                             .conninfo = cfg->pg,
                                             .create_slot = cfg->create_slot,
                                             .wm_key = r.watermark_key,
                                             .mark_key = r.mark_key,
                                             .sinks = r.sinks,
                                             .nsinks = r.nsinks,
                                             .metrics = r.metrics});
    notify_ready("connecting to postgresql");
    runtime_on_state(on_runtime_state, &r);
    r.dec = pgo_new();
    r.stream = stream_new(&sc);
    {
        SchemaConfig schc = {.conninfo = cfg->pg,
                             .publication = cfg->publication,
                             .rules_path = cfg->rules,
                             .recheck_s = (int)cfg->schema_recheck,
                             .emit = emit_to_sinks,
                             .tick = keepalive_tick,
                             .arg = &r};
        r.schema = schema_new(&schc, r.rules);
    }
    r.last_report_us = runtime_now_us();
    while (!runtime_stop) {
        uint64_t start = stream_confirmed(r.stream);
        int open_rc;

        if (apply_acked(r.ap) > start)
            start = apply_acked(r.ap);
        metrics_postgres_up(r.metrics, false);
        open_rc = runtime_open_stream(r.stream, start, slot_hook, startup_check, &r);
        if (open_rc == -2) {
            if (r.sw.lost.verdict != SLOT_LOST) /* found at START_REPLICATION */
                slotwatch_undecodable(&r.sw, r.stream);
            if (slot_lost(&r) != 0)
                break;
            stream_free(r.stream);
            r.stream = stream_new(&sc); /* forget the lost slot's positions */
            continue;
        }
        if (open_rc != 0)
            break;
        /* Everything before the slot's position was acknowledged before
         * (by this or an earlier run): what a stop would replay from. */
        if (apply_acked(r.ap) < stream_confirmed(r.stream))
            apply_start_at(r.ap, stream_confirmed(r.stream));
        r.pg_lost = false;
        r.replay = false;
        slotwatch_streaming(&r.sw); /* a slot that goes missing now is lost */
        metrics_postgres_up(r.metrics, true);
        notify_status("streaming");
        streaming_since = runtime_now_us();
        /* The first commit's visibility check should not wait for a
         * connection (a failure here is retried by that check). */
        (void)visible_connect(r.vis);
        stream_loop(&r);
        metrics_postgres_up(r.metrics, false);
        if (runtime_stop)
            break;
        if (r.sw.lost.verdict == SLOT_LOST) { /* found by the late check */
            if (slot_lost(&r) != 0)
                break;
            stream_free(r.stream);
            r.stream = stream_new(&sc);
            continue;
        }
        /* Connection lost or undecodable data: apply what was gathered
         * (harmless if repeated), then replay from the confirmed position. */
        if (sinks_dirty(&r))
            (void)flush_batch(&r);
        stream_close(r.stream);
        count_flush(&r);
        pgo_reset(r.dec);
        r.in_txn = false;
        r.stage_decoded_us = 0; /* the replay times its batches afresh */
        apply_start_at(r.ap, apply_acked(r.ap));
        if (!r.replay)
            reconnect_pause(&reconnect, streaming_since);
    }
    if (runtime_stop) {
        char lsn[LSN_TEXT_MAX];

        notify_stopping();
        /* Drain: finish the in-flight batch, record the watermark (which
         * must hold a position before PostgreSQL hears of it), confirm, exit
         * cleanly. */
        if (sinks_dirty(&r) && flush_batch(&r) != 0)
            log_warn("stopping before redis acknowledged the last batch; it will be replayed "
                     "from %s on restart",
                     lsn_format(apply_acked(r.ap), lsn));
        else {
            maybe_watermark(&r);
            if (sinks_dirty(&r) && flush_batch(&r) != 0)
                log_warn("stopping before redis acknowledged the watermark %s",
                         lsn_format(r.watermark_lsn, lsn));
            else if (!r.pg_lost)
                (void)stream_confirm(r.stream, apply_acked(r.ap), true);
        }
        report(&r, true);
        log_info("stopped");
        rc = (r.schema_stop || r.slot_fatal) ? 1 : 0;
    }
done:
    runtime_on_state(NULL, NULL);
    run_free(&r);
    return rc;
}
