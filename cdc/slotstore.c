/*
 * slotstore.c — the lost-slot evidence in Redis (see slotstore.h).
 */
#include "slotstore.h"

#include <stdio.h>

#include "lsn.h"

int slotstore_read(Sink *const *sinks, int n, const char *wm_key, const char *mark_key,
                   SlotEvidence *ev, char *err, size_t errlen)
{
    ev->redis_read = ev->has_watermark = ev->has_mark = false;
    ev->watermark = 0;
    for (int i = 0; i < n; i++) {
        char buf[SLOTGUARD_MARK_MAX];
        uint64_t lsn;
        SlotMark m;
        int rc = sink_get(sinks[i], wm_key, buf, sizeof buf);

        if (rc == 1) {
            ev->has_watermark = true;
            if (lsn_parse(buf, &lsn) && lsn > ev->watermark)
                ev->watermark = lsn;
        }
        if (rc >= 0)
            rc = sink_get(sinks[i], mark_key, buf, sizeof buf);
        if (rc < 0) {
            snprintf(err, errlen, "%s", sink_errstr(sinks[i]));
            ev->has_watermark = ev->has_mark = false;
            ev->watermark = 0;
            return -1;
        }
        if (rc == 1 && !ev->has_mark && slotguard_parse_mark(buf, &m)) {
            ev->has_mark = true;
            ev->mark = m;
        }
    }
    ev->redis_read = true;
    return 0;
}

int slotstore_mark(Sink *const *sinks, int n, const char *mark_key, const SlotMark *m, char *err,
                   size_t errlen)
{
    char text[SLOTGUARD_MARK_MAX];

    slotguard_format_mark(m, text, sizeof text);
    for (int i = 0; i < n; i++) {
        if (sink_set(sinks[i], mark_key, text) != 0) {
            snprintf(err, errlen, "%s", sink_errstr(sinks[i]));
            return -1;
        }
    }
    return 0;
}
