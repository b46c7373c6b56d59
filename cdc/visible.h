/*
 * visible.h — wait until decoded commits are visible to other sessions.
 *
 * Logical decoding reads WAL as soon as it is flushed, but PostgreSQL makes a
 * commit visible to other sessions a moment later (after ProcArray removal;
 * with synchronous replication only once a standby acknowledged). If walbust
 * invalidated a key inside that gap, a reader could miss the cache, take a
 * lease (docs/freshness.md), read the still-old row and fill it: stale until
 * TTL. So before a batch is sent to Redis, walbust notes the xid of every
 * transaction that queued an invalidation and waits until a fresh snapshot
 * (pg_current_snapshot(), PostgreSQL 13+) sees all of them as completed.
 *
 * The snapshot parser and the visibility test are pure; visible_wait() runs
 * one query per poll on its own plain connection (opened lazily).
 */
#ifndef WALBUST_VISIBLE_H
#define WALBUST_VISIBLE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* A parsed pg_snapshot: xmin, xmax and the in-progress list (64-bit xids). */
typedef struct VisibleSnapshot {
    uint64_t xmin;
    uint64_t xmax;
    uint64_t *xip; /* sorted ascending; owned, freed by visible_snapshot_release() */
    size_t nxip;
} VisibleSnapshot;

/* Parse pg_snapshot text "xmin:xmax:xip,xip,..." into *out (which the
 * caller releases with visible_snapshot_release() on success). Returns 0,
 * or -1 on malformed text (out left empty). Aborts on out of memory. */
int visible_snapshot_parse(const char *text, VisibleSnapshot *out)
    __attribute__((warn_unused_result));

/* Free what visible_snapshot_parse() allocated; s may be zeroed. */
void visible_snapshot_release(VisibleSnapshot *s);

/* True when the transaction with 32-bit xid (a recent one: within 2^31 of
 * s->xmax) has completed as far as snapshot s is concerned: below xmax and
 * not in the in-progress list. */
bool visible_snapshot_sees(const VisibleSnapshot *s, uint32_t xid);

typedef struct Visible Visible;

/* A tracker that checks visibility over its own connection to conninfo
 * (copied). Never NULL (aborts on out of memory); connects on first use. */
Visible *visible_new(const char *conninfo);

/* Open the connection now (it is otherwise opened by the first check, which
 * would then wait for it). Returns 0, or -1 with the message in
 * visible_errstr() (the next check tries again). */
int visible_connect(Visible *v);

/* Close the connection and free v (NULL is fine). */
void visible_free(Visible *v);

/* Note a decoded, committed transaction whose invalidations are queued.
 * Repeats of the last noted xid are ignored. */
void visible_note(Visible *v, uint32_t xid);

/* Send the snapshot query now, without waiting for its reply, unless one
 * is in flight or the last snapshot already sees xid: called when the first
 * transaction of a batch begins, so that the round trip overlaps decoding
 * the rest of the batch and visible_wait() usually finds the reply there.
 * Errors surface in the next visible_wait(). */
void visible_prefetch(Visible *v, uint32_t xid);

/* Number of noted xids not yet seen as visible. */
size_t visible_pending(const Visible *v);

/* Wait until every noted xid is visible, polling (50 µs apart, backing off
 * to 1 ms) for at most timeout_ms, calling tick(arg) (when not NULL) while sleeping. Returns 1
 * when all are visible, 0 on timeout, -1 when visibility could not be
 * checked (message in visible_errstr(); the connection is reopened on the
 * next call). The noted set is cleared in every case: the caller proceeds. */
int visible_wait(Visible *v, int timeout_ms, void (*tick)(void *), void *arg);

/* Counters since visible_new(). */
typedef struct VisibleStats {
    uint64_t queries;    /* pg_current_snapshot() queries sent */
    uint64_t prefetches; /* of those, sent early by visible_prefetch() */
    uint64_t waits;      /* snapshots that did not see a decoded commit yet */
    bool prepared;       /* the open connection runs the query as a prepared statement */
} VisibleStats;

const VisibleStats *visible_stats(const Visible *v);

/* The last error of visible_wait(); "" if none. Valid until the next call. */
const char *visible_errstr(const Visible *v);

#endif
