/*
 * batch.c — the pure batch of invalidations (see batch.h).
 */
#include "batch.h"

#include "mem.h"

#include <stdlib.h>
#include <string.h>

/* Ops that carry a payload are kept in order and never merged. */
static bool keeps_order(RulesInvAction a)
{
    return a == RULES_INV_PUBLISH || a == RULES_INV_REFRESH || a == RULES_INV_STALE;
}

/* Multiply and fold: mixes a word's bits into all of the result's. */
static uint64_t mix(uint64_t h, uint64_t w)
{
    h = (h ^ w) * UINT64_C(0x9E3779B97F4A7C15);
    return h ^ (h >> 29);
}

/* The set's hash of (action, bytes): eight bytes at a time (a byte-wise
 * hash was 6 % of walbust's CPU in a drain), finished so that the low
 * bits the set uses depend on every input byte. Equality is always
 * checked on the bytes, so the hash only decides speed. */
static uint64_t op_hash(RulesInvAction action, const char *p, size_t n)
{
    uint64_t h =
        mix(UINT64_C(0x243F6A8885A308D3), (uint64_t)action << 32 | (uint64_t)(n & 0xffffffff));
    uint64_t w;

    for (; n >= 8; p += 8, n -= 8) {
        memcpy(&w, p, 8);
        h = mix(h, w);
    }
    if (n > 0) {
        w = 0;
        memcpy(&w, p, n);
        h = mix(h, w);
    }
    return mix(h, h >> 32);
}

/* Insert op index i, whose op_hash() is h, into the set (the caller
 * ensured room). */
static void set_insert(Batch *b, size_t i, uint64_t h)
{
    size_t mask = b->set_cap - 1;
    size_t j = (size_t)h & mask;

    while (b->set[j] != 0)
        j = (j + 1) & mask;
    b->set[j] = (uint32_t)(i + 1);
    b->set_used++;
}

/* Empty the set and insert every deduplicated op again. */
static void set_rebuild(Batch *b)
{
    b->set_used = 0;
    if (b->set_cap > 0)
        memset(b->set, 0, b->set_cap * sizeof *b->set);
    for (size_t i = 0; i < b->nops; i++) {
        const BatchOp *op = &b->ops[i];
        if (!keeps_order(op->action))
            set_insert(b, i, op_hash(op->action, b->arena + op->off, op->len));
    }
}

/* Keep the load factor under 1/2, rehashing every deduplicated op. */
static void set_reserve(Batch *b)
{
    size_t cap = b->set_cap ? b->set_cap : 64;

    if ((b->set_used + 1) * 2 <= b->set_cap)
        return;
    while ((b->set_used + 1) * 2 > cap)
        cap *= 2;
    free(b->set);
    b->set = xcalloc(cap, sizeof *b->set);
    b->set_cap = cap;
    set_rebuild(b);
}

static bool set_contains(const Batch *b, uint64_t h, RulesInvAction action, const char *p, size_t n)
{
    size_t mask, j;

    if (b->set_cap == 0)
        return false;
    mask = b->set_cap - 1;
    j = (size_t)h & mask;
    for (; b->set[j] != 0; j = (j + 1) & mask) {
        const BatchOp *op = &b->ops[b->set[j] - 1];
        if (b->set[j] - 1 < b->dedup_floor)
            continue; /* queued before a refresh or stale op: must run again */
        if (op->action == action && op->len == n && memcmp(b->arena + op->off, p, n) == 0)
            return true;
    }
    return false;
}

/* Copy n bytes plus a NUL into the arena; returns their offset. */
static size_t arena_put(Batch *b, const char *p, size_t n)
{
    size_t off = b->arena_len;

    b->arena = xgrow(b->arena, &b->arena_cap, off + n + 1, 1);
    if (n > 0)
        memcpy(b->arena + off, p, n);
    b->arena[off + n] = '\0';
    b->arena_len = off + n + 1;
    return off;
}

bool batch_add(Batch *b, RulesInvAction action, const char *str, size_t len, const char *payload,
               size_t payload_len)
{
    BatchOp op = {.action = action};
    uint64_t h = 0;

    if (!keeps_order(action)) {
        h = op_hash(action, str, len); /* once: looked up, then inserted */
        if (set_contains(b, h, action, str, len))
            return false;
        set_reserve(b); /* before the op is pushed: a rehash must not see it */
    }
    op.off = arena_put(b, str, len);
    op.len = len;
    if (keeps_order(action)) {
        op.payload_off = arena_put(b, payload, payload_len);
        op.payload_len = payload_len;
    }
    b->ops = xgrow(b->ops, &b->ops_cap, b->nops + 1, sizeof *b->ops);
    b->ops[b->nops++] = op;
    if (!keeps_order(action))
        set_insert(b, b->nops - 1, h);
    else if (action != RULES_INV_PUBLISH)
        b->dedup_floor = b->nops; /* a later delete of a stored key is not a duplicate */
    return true;
}

const char *batch_str(const Batch *b, const BatchOp *op)
{
    return b->arena + op->off;
}

const char *batch_payload(const Batch *b, const BatchOp *op)
{
    return b->arena + op->payload_off;
}

size_t batch_bytes(const Batch *b)
{
    return b->arena_len + b->nops * sizeof *b->ops + b->set_cap * sizeof *b->set;
}

bool batch_has_tags(const Batch *b)
{
    for (size_t i = 0; i < b->nops; i++)
        if (b->ops[i].action == RULES_INV_TAG || b->ops[i].action == RULES_INV_TAG_PATTERN)
            return true;
    return false;
}

void batch_clear(Batch *b, size_t max_arena)
{
    b->nops = 0;
    b->dedup_floor = 0;
    b->arena_len = 0;
    set_rebuild(b);
    if (b->arena_cap > max_arena) {
        free(b->arena);
        b->arena = NULL;
        b->arena_cap = 0;
    }
}

void batch_mark(Batch *b, size_t i)
{
    b->ops[i].refused = true;
}

void batch_unmark_all(Batch *b)
{
    for (size_t i = 0; i < b->nops; i++)
        b->ops[i].refused = false;
}

void batch_keep_marked(Batch *b)
{
    char *old = b->arena;
    size_t n = 0;

    b->arena = NULL;
    b->arena_len = b->arena_cap = 0;
    for (size_t i = 0; i < b->nops; i++) {
        BatchOp op = b->ops[i];
        if (!op.refused)
            continue;
        op.off = arena_put(b, old + op.off, op.len);
        if (keeps_order(op.action))
            op.payload_off = arena_put(b, old + op.payload_off, op.payload_len);
        op.refused = false;
        b->ops[n++] = op;
    }
    free(old);
    b->nops = n;
    b->dedup_floor = 0; /* after the last kept refresh or stale op (batch_add) */
    for (size_t i = 0; i < n; i++)
        if (keeps_order(b->ops[i].action) && b->ops[i].action != RULES_INV_PUBLISH)
            b->dedup_floor = i + 1;
    set_rebuild(b);
}

void batch_release(Batch *b)
{
    free(b->arena);
    free(b->ops);
    free(b->set);
    memset(b, 0, sizeof *b);
}
