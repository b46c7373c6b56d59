/*
 * slotguard.c — lost-slot judgement and the Redis mark (see slotguard.h).
 */
#include "slotguard.h"

#include <stdio.h>
#include <string.h>

#include "lsn.h"

void slotguard_format_mark(const SlotMark *m, char *buf, size_t len)
{
    char since[LSN_TEXT_MAX];

    snprintf(buf, len, "v1 system=%s since=%s database=%s", m->system_id,
             lsn_format(m->since, since), m->database);
}

/* Copy the value of "name=" at *p up to the next space into out. */
static bool field(const char **p, const char *name, char *out, size_t len)
{
    size_t n = strlen(name), v;

    if (strncmp(*p, name, n) != 0)
        return false;
    *p += n;
    v = strcspn(*p, " ");
    if (v == 0 || v >= len)
        return false;
    memcpy(out, *p, v);
    out[v] = '\0';
    *p += v;
    if (**p == ' ')
        (*p)++;
    return true;
}

bool slotguard_parse_mark(const char *text, SlotMark *m)
{
    const char *p = text;
    char since[LSN_TEXT_MAX];
    SlotMark tmp = {0};

    if (strncmp(p, "v1 ", 3) != 0)
        return false;
    p += 3;
    if (!field(&p, "system=", tmp.system_id, sizeof tmp.system_id) ||
        !field(&p, "since=", since, sizeof since) || !lsn_parse(since, &tmp.since) ||
        strncmp(p, "database=", 9) != 0)
        return false;
    p += 9; /* the rest of the text: a database name may hold spaces */
    if (*p == '\0' || strlen(p) >= sizeof tmp.database)
        return false;
    snprintf(tmp.database, sizeof tmp.database, "%s", p);
    *m = tmp;
    return true;
}

uint64_t slotguard_known(const SlotEvidence *ev)
{
    uint64_t known = ev->streamed_here ? ev->here_limit : 0;

    if (ev->redis_read && ev->has_watermark && ev->watermark > known)
        known = ev->watermark;
    if (ev->redis_read && ev->has_mark && ev->mark.since > known)
        known = ev->mark.since;
    return known;
}

static SlotVerdict lost(SlotJudgement *out, uint64_t from, uint64_t to, const char *fmt,
                        const char *slot_name, const char *extra)
{
    char a[LSN_TEXT_MAX], b[LSN_TEXT_MAX], what[400];

    out->verdict = SLOT_LOST;
    out->from = from;
    out->to = to > from ? to : from;
    snprintf(what, sizeof what, fmt, slot_name, extra);
    snprintf(out->why, sizeof out->why,
             "%s; the WAL from %s (the last position walbust confirmed) to %s was never "
             "applied, so caches the rules cover may hold stale entries",
             what, lsn_format(out->from, a), lsn_format(out->to, b));
    return SLOT_LOST;
}

/* The mark names another server or database than the one connected. */
static bool elsewhere(const StreamSlot *slot, const SlotEvidence *ev)
{
    return ev->redis_read && ev->has_mark && slot->system_id[0] != '\0' &&
           (strcmp(ev->mark.system_id, slot->system_id) != 0 ||
            strcmp(ev->mark.database, slot->database) != 0);
}

SlotVerdict slotguard_judge(const char *slot_name, const StreamSlot *slot, const SlotEvidence *ev,
                            bool create, SlotJudgement *out)
{
    uint64_t known = slotguard_known(ev);
    uint64_t now = slot->exists ? slot->confirmed : slot->wal_now;
    char extra[200];

    memset(out, 0, sizeof *out);
    if (elsewhere(slot, ev)) {
        snprintf(extra, sizeof extra,
                 "system %s, database \"%s\" (this server: system %s, "
                 "database \"%s\")",
                 ev->mark.system_id, ev->mark.database, slot->system_id, slot->database);
        return lost(out, known, now,
                    "walbust streamed from replication slot \"%s\" on another PostgreSQL server "
                    "or database, %s",
                    slot_name, extra);
    }
    if (slot->lost) {
        if (slot->confirmed > known)
            known = slot->confirmed;
        return lost(out, known, slot->wal_now,
                    "replication slot \"%s\" is lost (wal_status=lost%s): PostgreSQL removed WAL "
                    "it still needed (max_slot_wal_keep_size)",
                    slot_name, "");
    }
    if (!slot->exists) {
        if (ev->streamed_here || (ev->redis_read && (ev->has_watermark || ev->has_mark)))
            return lost(out, known, slot->wal_now,
                        "replication slot \"%s\" does not exist although walbust streamed from "
                        "it before%s: it was dropped (by hand, by a failover to a standby, or a "
                        "restore), and a new slot starts at the server's current position",
                        slot_name, ev->streamed_here ? "" : " (redis holds its watermark)");
        if (!ev->redis_read)
            return out->verdict = SLOT_WAIT;
        return out->verdict = create ? SLOT_CREATE : SLOT_MISSING;
    }
    if (!ev->redis_read)
        return out->verdict = SLOT_UNVERIFIED;
#ifndef WALBUST_TEST_BROKEN_CONFIRM
    /* Only a walbust that reports no position before its watermark holds
     * it (the mark says so) makes "ahead of the watermark" a proof; what
     * this process reported alone is not (another instance on the same
     * slot may have moved it since, and Redis may have lost the keys).
     * `make broken` (confirms before Redis acknowledged) skips this check:
     * it would stop that build at the next start instead of letting the
     * fault campaign see the invalidations it lost. */
    if (ev->has_mark && slot->confirmed > known)
        return lost(out, known, slot->confirmed,
                    "replication slot \"%s\" starts past the last position walbust confirmed%s: "
                    "it was dropped and re-created, or advanced by another consumer, since "
                    "walbust streamed from it",
                    slot_name, slot->created ? " (created just now)" : "");
#endif
    return out->verdict = SLOT_OK;
}
