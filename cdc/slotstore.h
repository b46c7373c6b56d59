/*
 * slotstore.h — the lost-slot evidence in Redis (see slotguard.h): reads the
 * watermark and the mark from every target, and writes the mark.
 */
#ifndef WALBUST_SLOTSTORE_H
#define WALBUST_SLOTSTORE_H

#include <stddef.h>

#include "sink.h"
#include "slotguard.h"

/* Read wm_key and mark_key from each of the n sinks into ev's Redis
 * fields (the newest watermark; the first mark found). A watermark that is
 * not an LSN still counts as evidence, at position 0. Returns 0 with
 * ev->redis_read set, or -1 with ev->redis_read clear and err saying which
 * target failed. */
int slotstore_read(Sink *const *sinks, int n, const char *wm_key, const char *mark_key,
                   SlotEvidence *ev, char *err, size_t errlen) __attribute__((warn_unused_result));

/* SET mark_key to the mark on each of the n sinks. Returns 0 when every
 * target acknowledged, else -1 with err set. */
int slotstore_mark(Sink *const *sinks, int n, const char *mark_key, const SlotMark *m, char *err,
                   size_t errlen) __attribute__((warn_unused_result));

#endif
