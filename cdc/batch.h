/*
 * batch.h — a batch of invalidations waiting for Redis (pure: no I/O).
 *
 * Invalidations are added in commit order. Keys, patterns, tags and
 * versions are deduplicated (each distinct (action, string) is kept once,
 * at its first position); publishes are never merged, because every
 * message counts, and neither are refreshes and stale marks (their order
 * matters); a delete queued after one of those is not merged with an
 * earlier delete, since it must run after the store. Strings live in one arena of bytes (each NUL-terminated,
 * addressed by offset, so the arena may move when it grows); an
 * open-addressing hash set of op indices finds duplicates.
 *
 * The struct is visible so the sink can walk ops in order; only the
 * functions below change it.
 */
#ifndef WALBUST_BATCH_H
#define WALBUST_BATCH_H

#include "rules.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* One queued invalidation; strings live in the arena. */
typedef struct BatchOp {
    RulesInvAction action;
    size_t off, len;                 /* the key, pattern, tag or channel */
    size_t payload_off, payload_len; /* publish only */
    bool refused;                    /* marked by batch_mark (kept by batch_keep_marked) */
} BatchOp;

typedef struct Batch {
    char *arena;
    size_t arena_len, arena_cap;
    BatchOp *ops;
    size_t nops, ops_cap;
    uint32_t *set;  /* op index + 1; 0 = empty slot */
    size_t set_cap; /* power of two, or 0 */
    size_t set_used;
    size_t dedup_floor; /* ops before this index are not merged with new ones */
} Batch;

/* Queue one invalidation (copies str and payload). Returns false when it
 * duplicates one already queued (and was dropped). Aborts on OOM. */
bool batch_add(Batch *b, RulesInvAction action, const char *str, size_t len, const char *payload,
               size_t payload_len);

/* The string and the payload of op (NUL-terminated). */
const char *batch_str(const Batch *b, const BatchOp *op);
const char *batch_payload(const Batch *b, const BatchOp *op);

/* Bytes held (arena, ops and set), for the memory bound. */
size_t batch_bytes(const Batch *b);

/* Does the batch hold a tag or tag-pattern op? */
bool batch_has_tags(const Batch *b);

/* Empty the batch; an arena grown past max_arena bytes is given back. */
void batch_clear(Batch *b, size_t max_arena);

/* Mark op i (refused by Redis, to be kept), and clear every mark. */
void batch_mark(Batch *b, size_t i);
void batch_unmark_all(Batch *b);

/* Keep only the marked ops, in their order, in a fresh arena (the rest
 * was applied); marks are cleared. */
void batch_keep_marked(Batch *b);

/* Free what the batch holds (the struct itself is the caller's). */
void batch_release(Batch *b);

#endif
