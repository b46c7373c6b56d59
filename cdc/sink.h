/*
 * sink.h — the Redis sink: batches invalidations and applies them.
 *
 * Invalidations are queued with sink_add() in commit order; sink_flush()
 * applies the whole batch to Redis in one pipelined round trip (plus SCAN
 * loops for patterns) and reports success only when every reply arrived and
 * none was an error. A failed flush keeps the batch intact so the caller can
 * retry it later (after sink_reconnect()); nothing is dropped.
 *
 * Within a batch, keys, patterns, tags and versions are deduplicated (each
 * distinct string is applied once); publishes are never merged. Memory is
 * bounded by the batch: the caller flushes when sink_full() says so, which
 * is how a transaction of millions of rows is applied in chunks.
 *
 * Commands: keys → UNLINK (or DEL); patterns → SCAN MATCH + UNLINK;
 * tags → EVAL of redis/tag_invalidate.lua (members and set, atomically);
 * tag patterns → SCAN MATCH over set names, then as tags; versions → INCR;
 * version patterns → SCAN MATCH + INCR each; publish → PUBLISH;
 * refresh and stale → EVALSHA of redis/refresh.lua (fenced store, stale
 * marker; see rules.h for their payloads). Publishes, refreshes and stale
 * marks are never merged: their order within the batch is kept.
 *
 * The sink does not log; errors go to sink_errstr().
 */
#ifndef WALBUST_SINK_H
#define WALBUST_SINK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <hiredis/hiredis.h>

#include "apply.h"
#include "redisurl.h"
#include "rules.h"

typedef struct SinkConfig {
    RedisUrl url;
    int connect_timeout_ms; /* default 2000 when 0 */
    int command_timeout_ms; /* default 5000 when 0; SCAN loops per call */
    bool use_del;           /* DEL instead of UNLINK */
    size_t max_ops;         /* sink_full() threshold; default 10000 */
    size_t max_bytes;       /* sink_full() threshold; default 8 MiB */
} SinkConfig;

typedef struct SinkStats {
    uint64_t keys, patterns, tags, versions, publishes; /* applied, cumulative */
    uint64_t errors;                                    /* failed flushes */
    uint64_t replica_shortfalls;                        /* WAIT reported fewer than ?replicas=N */
    uint64_t oom_refusals;      /* writes Redis refused for lack of memory */
    uint64_t refreshes, stales; /* refresh and stale ops applied (stored, fenced or deleted) */
    uint64_t refresh_fenced;    /* refreshes of those not stored: the fence held a newer
                                   commit's LSN (redis/refresh.lua answered 0) */
} SinkStats;

typedef struct Sink Sink;

/* Create a sink (not connected). Aborts on out of memory. cfg is copied. */
Sink *sink_new(const SinkConfig *cfg);

/* Why the target can never work as configured (a TLS file missing or
 * unreadable, named in the message), or NULL. Checked once after
 * sink_new(); such a sink's connects fail with the same message. */
const char *sink_config_error(const Sink *s);

/* Free the sink, closing its connection. Accepts NULL. */
void sink_free(Sink *s);

/* (Re)connect: connect with the timeout, AUTH, SELECT db, PING.
 * Returns 0 or -1 (sink_errstr() says why, never with the password). */
int sink_connect(Sink *s) __attribute__((warn_unused_result));

/* Is there a live connection? */
bool sink_connected(const Sink *s);

/* Queue one invalidation (see RulesEmitFn). Copies s and payload. */
void sink_add(Sink *s, RulesInvAction action, const char *str, size_t len, const char *payload,
              size_t payload_len);

/* Queue the confirmed-LSN watermark (docs/freshness.md) to run first in
 * the next flush: key is set to value, an LSN "X/X", only when it holds no
 * LSN or an older one (redis/watermark.lua: an older instance or a replay
 * never moves it back; or a plain SET in MULTI/EXEC while this connection
 * WATCHes the key and knows it holds an older value of its own), or in any
 * case with reset (a new slot after a lost one). Replaces a previously
 * queued watermark. */
void sink_set_watermark(Sink *s, const char *key, const char *value, bool reset);

/* True once Redis refused UNWATCH, WATCH or MULTI with NOPERM (an ACL
 * user granted only what earlier versions sent, docs/security.md): every
 * watermark then goes by the compare-and-set script, which costs Redis
 * more per batch. */
bool sink_watermark_by_script(const Sink *s);

/* Queued invalidations (after deduplication), not counting the watermark. */
size_t sink_pending(const Sink *s);

/* True when anything (invalidations or a watermark) waits for a flush. */
bool sink_dirty(const Sink *s);

/* Should the caller flush now to keep memory bounded? */
bool sink_full(const Sink *s);

/* Apply every queued command. Returns 0 when Redis acknowledged all of them
 * (the batch is then cleared), -1 otherwise (batch kept; connection closed
 * if it is unusable; sink_errstr() says what failed). Connects first when
 * not connected. */
int sink_flush(Sink *s) __attribute__((warn_unused_result));

/* True when the last sink_flush() failed only because Redis refused writes
 * (the watermark SET, INCR, PUBLISH) with -OOM (maxmemory reached under
 * noeviction): every other command of the batch was applied, and the batch
 * now holds only the refused writes, in order, to be sent again. The
 * caller may keep queueing (deletes keep flowing with the next flushes)
 * but must not confirm past the refused writes while sink_dirty(). On a
 * Cluster target the same holds for refusals from any master. */
bool sink_oom(const Sink *s);

/* Did the last sink_flush() fail only because fewer replicas than
 * ?replicas=N acknowledged the batch (WAIT)? The batch was applied on the
 * master and is kept to be sent again. */
bool sink_shortfall(const Sink *s);

/* Read the string at key into buf (len bytes, NUL-terminated, cut to fit),
 * connecting first when needed. Outside sink_flush() only; the queued
 * batch is untouched. Returns 1 when the key holds a string, 0 when it does
 * not exist, -1 on an I/O error or an error reply (sink_errstr()). */
int sink_get(Sink *s, const char *key, char *buf, size_t len) __attribute__((warn_unused_result));

/* SET key value now (not queued), connecting first when needed. Outside
 * sink_flush() only. Returns 0 when Redis acknowledged, -1 otherwise
 * (sink_errstr()). */
int sink_set(Sink *s, const char *key, const char *value) __attribute__((warn_unused_result));

/* Change DEL/UNLINK choice (after a rules reload). */
void sink_set_use_del(Sink *s, bool use_del);

/* redis+sentinel:// targets: follow the Sentinels' +switch-master as it
 * happens instead of waiting for a write to fail (a SentinelWatch, see
 * sentinel.h). Call it from the main loop between flushes, as often as
 * convenient (it looks at most every 100 ms); it does not wait for the
 * network, except that (re)connecting to a Sentinel costs up to about a
 * second, at most every 0.5-30 s while Sentinels fail. Returns 1 when the
 * Sentinels name a master other than the one the connection is open to:
 * the connection is closed (the next flush or sink_connect() finds the new
 * master; the queued batch is kept) and err says which master they name
 * now; 2 when a +switch-master arrived that needs nothing (no connection
 * open, or already connected to the new master after an error) and err
 * says so; 0 when there is nothing to do (also for other kinds of target);
 * -1 when the watch lost its Sentinel (err says which and why; it tries
 * the next one later: failovers are still followed on errors and
 * READONLY). */
int sink_watch(Sink *s, char *err, size_t errlen);

/* PING with the command timeout: 0 when Redis answers. */
int sink_ping(Sink *s);

/* Receives one reply of sink_call() or the keys of one SCAN page (an
 * array of strings); valid only during the call. Its result is returned. */
typedef int (*SinkReplyFn)(void *arg, const redisReply *r);

/* Run one command now (outside sink_flush()), routed by argv[keyarg] on a
 * Cluster, connecting first when needed; hand its reply to fn. Returns
 * fn's result, or -1 on an I/O error or, on a Cluster, an error reply
 * (sink_errstr()). */
int sink_call(Sink *s, size_t keyarg, int argc, const char **argv, const size_t *lens,
              SinkReplyFn fn, void *arg) __attribute__((warn_unused_result));

/* A SCAN over the whole target (every master of a Cluster), one page per
 * sink_scan_page(). Start zeroed; done once every node was walked. */
typedef struct SinkScan {
    size_t node;     /* Cluster: index into the masters */
    char cursor[32]; /* "" or "0": start */
    bool done;
} SinkScan;

/* Ask for the next page of keys matching pattern and hand the keys (an
 * array reply of strings) to fn. Returns fn's result (0 when the walk is
 * already done), or -1 (sink_errstr()). */
int sink_scan_page(Sink *s, SinkScan *sc, const char *pattern, SinkReplyFn fn, void *arg)
    __attribute__((warn_unused_result));

const char *sink_errstr(const Sink *s);
const SinkStats *sink_stats(const Sink *s);

/* The sink as an apply target (apply.h): apply_add_target(a, &sink_apply_ops, sink). */
extern const ApplyTargetOps sink_apply_ops;

#endif
