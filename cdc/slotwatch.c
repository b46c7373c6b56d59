/*
 * slotwatch.c — the daemon's slot lifecycle (see slotwatch.h).
 */
#include "slotwatch.h"

#include <stdio.h>
#include <string.h>

#include "log.h"
#include "lsn.h"
#include "runtime.h"
#include "slotstore.h"

void slotwatch_init(SlotWatch *w, const SlotWatchConfig *cfg)
{
    memset(w, 0, sizeof *w);
    w->cfg = *cfg;
}

/* The "slot" readiness condition fails with why, or holds when NULL. */
static void condition(SlotWatch *w, const char *why)
{
    metrics_set_condition(w->cfg.metrics, METRICS_COND_SLOT, why == NULL, why);
}

/* Read the evidence from Redis into w->ev; err says why not. */
static int read_evidence(SlotWatch *w, char *err, size_t errlen)
{
    return slotstore_read(w->cfg.sinks, w->cfg.nsinks, w->cfg.wm_key, w->cfg.mark_key, &w->ev, err,
                          errlen);
}

/* The slot checked out (or was created): write the mark when it is not
 * there yet (or names another server), and let PostgreSQL hear of
 * positions up to what the evidence and the slot itself hold. */
static int accept_slot(SlotWatch *w, Stream *s, const StreamSlot *slot, char *err, size_t errlen)
{
    SlotEvidence *ev = &w->ev;
    uint64_t limit = slotguard_known(ev);

    if (!ev->has_mark || strcmp(ev->mark.system_id, slot->system_id) != 0 ||
        strcmp(ev->mark.database, slot->database) != 0) {
        SlotMark m = {.since = slot->confirmed};

        snprintf(m.system_id, sizeof m.system_id, "%s", slot->system_id);
        snprintf(m.database, sizeof m.database, "%s", slot->database);
        if (slotstore_mark(w->cfg.sinks, w->cfg.nsinks, w->cfg.mark_key, &m, err, errlen) != 0)
            return -1;
        ev->has_mark = true;
        ev->mark = m;
    }
    if (slot->confirmed > limit)
        limit = slot->confirmed;
    if (limit > ev->here_limit)
        ev->here_limit = limit;
    stream_set_confirm_limit(s, ev->here_limit);
    w->unverified = false;
    return 0;
}

void slotwatch_undecodable(SlotWatch *w, const Stream *s)
{
    const StreamSlot *slot = stream_slot(s);
    char a[LSN_TEXT_MAX], b[LSN_TEXT_MAX];
    SlotJudgement *j = &w->lost;

    j->verdict = SLOT_LOST;
    j->from = slotguard_known(&w->ev);
    if (slot->confirmed > j->from)
        j->from = slot->confirmed;
    j->to = slot->wal_now > j->from ? slot->wal_now : j->from;
    snprintf(j->why, sizeof j->why,
             "%s; the WAL from %s (the last position walbust confirmed) to at least %s (the "
             "server's position now) cannot be applied, so caches the rules cover may hold "
             "stale entries",
             stream_errstr(s), lsn_format(j->from, a), lsn_format(j->to, b));
}

/* A Redis user that may not read or write the evidence: retrying will not
 * help, and without it walbust could not tell a lost slot. Logs the grant
 * and returns true. */
static bool evidence_denied(const SlotWatch *w, const char *err)
{
    if (strstr(err, "NOPERM") == NULL)
        return false;
    log_error("%s: walbust reads and writes %s and %s to tell whether the slot is the one it "
              "streamed from; grant them, e.g. (+get +set +eval +watch +unwatch +multi +exec ~%s "
              "~%s) in the user's ACL "
              "(docs/security.md)",
              err, w->cfg.wm_key, w->cfg.mark_key, w->cfg.wm_key, w->cfg.mark_key);
    return true;
}

/* Log and flag the lost slot (w->lost); returns -2. */
static int report_lost(SlotWatch *w)
{
    condition(w, w->lost.why);
    log_error("%s", w->lost.why);
    return -2;
}

/* The verdicts that stop or wait (never 0). Returns the hook's answer. */
static int refuse(SlotWatch *w, Stream *s, SlotVerdict v, const char *err)
{
    char why[800];

    if (v == SLOT_LOST)
        return report_lost(w);
    if (v == SLOT_MISSING) {
        condition(w, stream_errstr(s));
        log_error("%s", stream_errstr(s));
        return -1;
    }
    snprintf(why, sizeof why,
             "replication slot \"%s\" does not exist, and redis cannot tell whether walbust "
             "streamed from it before (%s): waiting for redis (--create-slot creates a slot "
             "only on first use)",
             w->cfg.slot, err);
    condition(w, why);
    log_warn("%s", why);
    return 1;
}

/* SLOT_CREATE: create the slot. Returns 0, or -1 (logged). */
static int create(SlotWatch *w, Stream *s)
{
    char lsn[LSN_TEXT_MAX];

    if (stream_create_slot(s) != STREAM_OK) {
        log_error("could not create replication slot \"%s\": %s", w->cfg.slot, stream_errstr(s));
        return -1;
    }
    log_info("created replication slot \"%s\" at %s (first use: redis holds no watermark or mark "
             "for it)",
             w->cfg.slot, lsn_format(stream_slot(s)->confirmed, lsn));
    return 0;
}

int slotwatch_hook(SlotWatch *w, Stream *s, StreamStatus st)
{
    const StreamSlot *slot = stream_slot(s);
    char err[512] = "";
    SlotVerdict v;

    if (read_evidence(w, err, sizeof err) != 0 && evidence_denied(w, err))
        return -1;
    if (st == STREAM_LOST && !slot->lost) {
        slotwatch_undecodable(w, s);
        return report_lost(w);
    }
    v = slotguard_judge(w->cfg.slot, slot, &w->ev, w->cfg.create_slot, &w->lost);
    if (v == SLOT_LOST || v == SLOT_MISSING || v == SLOT_WAIT)
        return refuse(w, s, v, err);
    if (v == SLOT_CREATE && create(w, s) != 0)
        return -1;
    if (v == SLOT_UNVERIFIED) /* not the error itself: the first batch's retries log it */
        log_warn("could not read the slot's watermark from redis; streaming, and checking "
                 "replication slot \"%s\" against it before confirming anything",
                 w->cfg.slot);
    condition(w, NULL);
    w->seen = *slot;
    if (v == SLOT_UNVERIFIED || accept_slot(w, s, slot, err, sizeof err) != 0) {
        if (v != SLOT_UNVERIFIED && evidence_denied(w, err))
            return -1;
        if (v != SLOT_UNVERIFIED)
            log_warn("could not record the slot's mark in redis (%s); trying again before the "
                     "first confirmation",
                     err);
        w->unverified = true;
        stream_set_confirm_limit(s, slot->confirmed > w->ev.here_limit ? slot->confirmed
                                                                       : w->ev.here_limit);
    }
    return 0;
}

int slotwatch_verify(SlotWatch *w, Stream *s)
{
    char err[512];
    int64_t now = runtime_now_us();

    if (now < w->verify_at)
        return -1;
    w->verify_at = now + 1000000;
    for (int i = 0; i < w->cfg.nsinks; i++)
        if (!sink_connected(w->cfg.sinks[i]))
            return -1;
    if (read_evidence(w, err, sizeof err) != 0) {
        w->fatal = evidence_denied(w, err);
        return -1;
    }
    if (slotguard_judge(w->cfg.slot, &w->seen, &w->ev, w->cfg.create_slot, &w->lost) == SLOT_LOST) {
        (void)report_lost(w);
        return -1;
    }
    if (accept_slot(w, s, &w->seen, err, sizeof err) != 0) {
        w->fatal = evidence_denied(w, err);
        return -1;
    }
    log_info("replication slot \"%s\" checked against the watermark in redis: it is the one "
             "walbust streamed from",
             w->cfg.slot);
    return 0;
}

void slotwatch_streaming(SlotWatch *w)
{
    w->ev.streamed_here = true;
}

void slotwatch_allow(SlotWatch *w, Stream *s, uint64_t wm)
{
    if (wm <= w->ev.here_limit)
        return;
    w->ev.here_limit = wm;
    stream_set_confirm_limit(s, wm);
}

int slotwatch_recreate(SlotWatch *w, uint64_t *at)
{
    char err[512], sql[320];
    PGconn *conn = stream_plain_connect(w->cfg.conninfo, err, sizeof err);
    PGresult *res;

    if (conn == NULL) {
        log_error("slot recovery: %s", err);
        return -1;
    }
    snprintf(sql, sizeof sql,
             "SELECT pg_catalog.pg_drop_replication_slot(slot_name) FROM "
             "pg_catalog.pg_replication_slots WHERE slot_name = '%s'",
             w->cfg.slot);
    res = PQexec(conn, sql);
    if (PQresultStatus(res) == PGRES_TUPLES_OK) {
        PQclear(res);
        snprintf(sql, sizeof sql,
                 "SELECT lsn FROM pg_catalog.pg_create_logical_replication_slot('%s', "
                 "'pgoutput')",
                 w->cfg.slot);
        res = PQexec(conn, sql);
    }
    if (PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) != 1 ||
        !lsn_parse(PQgetvalue(res, 0, 0), at)) {
        log_error("slot recovery: could not recreate slot \"%s\": %s", w->cfg.slot,
                  PQerrorMessage(conn));
        PQclear(res);
        PQfinish(conn);
        return -1;
    }
    PQclear(res);
    PQfinish(conn);
    return 0;
}

int slotwatch_mark_new(SlotWatch *w, const StreamSlot *was, uint64_t at)
{
    SlotMark m = {.since = at};
    char err[512];

    snprintf(m.system_id, sizeof m.system_id, "%s", was->system_id);
    snprintf(m.database, sizeof m.database, "%s", was->database);
    if (slotstore_mark(w->cfg.sinks, w->cfg.nsinks, w->cfg.mark_key, &m, err, sizeof err) != 0) {
        log_error("slot recovery: could not record the new slot in redis: %s", err);
        return -1;
    }
    w->ev.has_mark = true;
    w->ev.mark = m;
    w->ev.here_limit = at;
    memset(&w->lost, 0, sizeof w->lost);
    return 0;
}
