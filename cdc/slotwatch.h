/*
 * slotwatch.h — the daemon's slot lifecycle: is the slot the one walbust
 * streamed from?
 *
 * At every connect (runtime_open_stream()'s slot hook) the slot is judged
 * against the evidence in Redis (slotguard.h, slotstore.h): a first use
 * is accepted (and created with --create-slot), the slot walbust streamed
 * from goes on, a missing, invalidated, re-created or foreign one is lost.
 * When Redis cannot be read at connect, the stream opens unverified and
 * the slot is checked before the first watermark (slotwatch_verify()). A
 * lost slot can be recreated (slotwatch_recreate(), slotwatch_mark_new())
 * for --on-slot-lost flush-rules; the caller flushes the caches between.
 *
 * PostgreSQL hears of a position only once every target holds a watermark
 * at or past it (slotwatch_allow() raises the stream's confirm limit), so
 * a slot of walbust's own is never ahead of the watermark.
 *
 * This module logs what it finds (lost slots, waits, denied evidence) and
 * sets the "slot" readiness condition; the stream and the sinks are the
 * caller's.
 */
#ifndef WALBUST_SLOTWATCH_H
#define WALBUST_SLOTWATCH_H

#include <stdbool.h>
#include <stdint.h>

#include "metrics.h"
#include "sink.h"
#include "slotguard.h"
#include "stream.h"

typedef struct SlotWatchConfig {
    const char *slot;     /* --slot */
    const char *conninfo; /* --pg, to recreate a lost slot */
    bool create_slot;     /* --create-slot */
    const char *wm_key;   /* walbust:confirmed:<slot> */
    const char *mark_key; /* walbust:slot:<slot> */
    Sink *const *sinks;   /* every target (borrowed) */
    int nsinks;
    Metrics *metrics; /* the "slot" condition; may be NULL */
} SlotWatchConfig;

/* The struct is visible so the caller may embed it; read its fields, and
 * change them only through the functions below. */
typedef struct SlotWatch {
    SlotWatchConfig cfg;
    SlotEvidence ev;    /* what walbust knows of its use of the slot */
    StreamSlot seen;    /* the slot when the stream was opened */
    bool unverified;    /* redis was unreadable then: verify before a watermark */
    int64_t verify_at;  /* monotonic µs of the next late verification */
    SlotJudgement lost; /* verdict SLOT_LOST: why and which range */
    bool fatal;         /* the evidence may not be read or written (NOPERM): stop, exit 1 */
} SlotWatch;

/* Start watching (cfg is copied; its strings and sinks are borrowed). */
void slotwatch_init(SlotWatch *w, const SlotWatchConfig *cfg);

/* The slot hook (RuntimeSlotFn's contract) for stream s in status st:
 * 0 to go on, 1 to retry later, -2 when the slot is lost (w->lost), -1 on
 * another fatal error. Logs what it decides. */
int slotwatch_hook(SlotWatch *w, Stream *s, StreamStatus st);

/* s could not decode past a change (STREAM_LOST with the slot not
 * invalidated): record the slot as lost from the last confirmed position. */
void slotwatch_undecodable(SlotWatch *w, const Stream *s);

/* The stream opened unverified (w->unverified): check the slot as it was
 * then, at most once a second and only once every target is connected.
 * Returns 0 once checked (s may confirm up to the evidence), -1 while not
 * (no watermark may be written yet); then w->lost.verdict == SLOT_LOST
 * when the slot turned out lost, or w->fatal when the evidence is denied. */
int slotwatch_verify(SlotWatch *w, Stream *s);

/* Streaming from the slot now: a slot that goes missing later is lost. */
void slotwatch_streaming(SlotWatch *w);

/* Every target holds the watermark wm: let s confirm up to it. */
void slotwatch_allow(SlotWatch *w, Stream *s, uint64_t wm);

/* Drop the slot when it exists and create it anew; *at is where the new
 * slot starts. Returns 0, or -1 (logged). */
int slotwatch_recreate(SlotWatch *w, uint64_t *at);

/* The slot was recreated at `at` on was's server and the caches were
 * flushed: record the new mark on every target and forget the loss.
 * Returns 0, or -1 (logged). */
int slotwatch_mark_new(SlotWatch *w, const StreamSlot *was, uint64_t at);

#endif
