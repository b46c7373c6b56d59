/*
 * slotguard.h — is the slot the one walbust streamed from?
 *
 * A slot that walbust streamed from and that is now missing, invalidated
 * (wal_status = lost) or re-created is a lost slot: the WAL between the last
 * position walbust confirmed and the new slot's start was never applied.
 * PostgreSQL keeps no identity for a slot (no creation time, no id), so
 * walbust keeps the evidence itself, next to the caches it protects:
 *
 *   walbust:confirmed:<slot>  the watermark (docs/freshness.md): the newest position
 *                             walbust confirmed. The daemon reports a
 *                             position to PostgreSQL only after Redis
 *                             acknowledged a watermark at or past it, so a
 *                             slot of its own is never ahead of it;
 *   walbust:slot:<slot>       the mark: which server and database the slot
 *                             lives on, since which position walbust uses
 *                             it, and that the watermark is kept that way
 *                             ("v1 system=<id> since=<lsn> database=<name>").
 *
 * A slot whose confirmed position is past the watermark was therefore moved
 * by someone else: re-created, or advanced by another consumer. When Redis
 * lost both keys it lost the caches with them, and starting afresh is
 * consistent. slotguard_judge() is pure: the caller reads the slot
 * (stream_slot()) and the evidence (Redis, and what this process did).
 */
#ifndef WALBUST_SLOTGUARD_H
#define WALBUST_SLOTGUARD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "stream.h"

#define SLOTGUARD_MARK_MAX 256

typedef struct SlotMark {
    char system_id[32];
    char database[64];
    uint64_t since;
} SlotMark;

/* What walbust knows about its past use of the slot. */
typedef struct SlotEvidence {
    bool streamed_here;  /* this process streamed from it (a standby has not) */
    uint64_t here_limit; /* the newest position this process may have reported */
    bool redis_read;     /* the keys below were read from every target */
    bool has_watermark;
    uint64_t watermark; /* the newest over the targets */
    bool has_mark;
    SlotMark mark;
} SlotEvidence;

typedef enum SlotVerdict {
    SLOT_OK,         /* the slot walbust used, or a first use of an existing slot */
    SLOT_CREATE,     /* missing, never used, --create-slot: create it */
    SLOT_MISSING,    /* missing, never used, no --create-slot: a configuration error */
    SLOT_UNVERIFIED, /* exists, Redis unreadable: verify before the first watermark */
    SLOT_WAIT,       /* missing, Redis unreadable: first use or lost cannot be told */
    SLOT_LOST,       /* lost: from..to was never applied */
} SlotVerdict;

typedef struct SlotJudgement {
    SlotVerdict verdict;
    uint64_t from, to; /* SLOT_LOST: the WAL range that was not applied */
    char why[640];     /* SLOT_LOST: what happened, with the range */
} SlotJudgement;

/* Decide what the slot's state means given the evidence. slot_name names
 * the slot in messages; create says whether --create-slot was given.
 * Fills *out and returns its verdict. */
SlotVerdict slotguard_judge(const char *slot_name, const StreamSlot *slot, const SlotEvidence *ev,
                            bool create, SlotJudgement *out);

/* The mark's text for slot (at least SLOTGUARD_MARK_MAX bytes). */
void slotguard_format_mark(const SlotMark *m, char *buf, size_t len);

/* Parse a mark's text. Returns false when it is not a v1 mark. */
bool slotguard_parse_mark(const char *text, SlotMark *m) __attribute__((warn_unused_result));

/* The newest position the evidence shows walbust confirmed (0: none). */
uint64_t slotguard_known(const SlotEvidence *ev);

#endif
