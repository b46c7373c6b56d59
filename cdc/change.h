/*
 * change.h — turn decoded pgoutput row changes into rules-engine changes.
 *
 * This is where PostgreSQL's replica identity rules are interpreted (pure):
 *  - an old tuple of kind 'K' carries only identity columns; the others are
 *    sent as 'n' but are NOT NULL in the row: they become RULES_VAL_MISSING;
 *  - an update without an old tuple did not change its identity columns, so
 *    their old values equal the new ones; every other old value is missing
 *    (this is why docs/guarantees.md guarantee 7 refuses `{col}` on non-identity columns);
 *  - an unchanged TOASTed value ('u') in the new tuple takes the old image's
 *    value when the old image carries it (REPLICA IDENTITY FULL), else it is
 *    missing (guarantee 8 widens it).
 */
#ifndef WALBUST_CHANGE_H
#define WALBUST_CHANGE_H

#include <stdint.h>

#include "lsn.h"
#include "pgo.h"
#include "rules.h"

/* Transaction facts from the Begin message. The texts are formatted only
 * on demand (change_txn_texts()): most changes never need them, and
 * formatting them for every transaction was 2 % of walbust's CPU in a
 * drain. Changes carry the numbers (RulesChange.has_commit). */
typedef struct ChangeTxn {
    uint64_t final_lsn;
    uint32_t xid;
    int64_t commit_time;
    bool texts; /* lsn_text and time_text are this transaction's */
    char lsn_text[LSN_TEXT_MAX];
    char time_text[PGTIME_TEXT_MAX];
} ChangeTxn;

/* Reusable value arrays (no allocation per change once grown). */
typedef struct ChangeBuf {
    RulesValue *old_vals;
    RulesValue *new_vals;
    size_t cap;
} ChangeBuf;

/* Fill txn from a Begin message (texts not yet formatted). */
void change_txn_begin(ChangeTxn *txn, const PgoMsg *begin);

/* Format txn's lsn_text and time_text (once per transaction). */
void change_txn_texts(ChangeTxn *txn);

/* Build *out from an Insert, Update or Delete message. Values borrow the
 * message's bytes; *out is valid until the next call with the same buf or
 * until the message is released. Aborts on out of memory. */
void change_from_pgo(ChangeBuf *buf, const ChangeTxn *txn, const PgoMsg *msg, RulesChange *out);

/* Build *out for a truncate of rel (no images). */
void change_truncate(const ChangeTxn *txn, const PgoRelation *rel, RulesChange *out);

/* Build *out as chg widened to everything table's rules cover: a truncate
 * without columns or images, keeping chg's commit facts (a change of a
 * table that left the rules' partition or inheritance tree). */
void change_widen(const RulesChange *chg, const char *table, RulesChange *out);

/* Free the arrays. */
void change_buf_release(ChangeBuf *buf);

/* Apply an explicit invalidation message (prefix "walbust", emitted by
 * sql/walbust.sql): {"v":1,"op":"invalidate","keys":[...]}, "invalidate_pattern"
 * with "patterns", "invalidate_tag" with "tags". Emits RULES_INV_KEY,
 * RULES_INV_PATTERN (patterns are the caller's globs, used as written) or
 * RULES_INV_TAG (tag_prefix + tag). Returns the number emitted, or -1 with
 * a message in err for content that is not such a message (nothing is
 * emitted then). */
int change_walbust_message(const char *content, size_t len, const char *tag_prefix,
                           RulesEmitFn emit, void *arg, char *err, size_t errlen);

#endif
