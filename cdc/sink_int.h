/*
 * sink_int.h — inside the Redis sink: the state sink.c (a single node,
 * and the pipeline) shares with sink_cluster.c (the Cluster executor).
 * Not for other modules: they use sink.h.
 */
#ifndef WALBUST_SINK_INT_H
#define WALBUST_SINK_INT_H

#include <stdbool.h>
#include <stddef.h>

#include <hiredis/hiredis.h>

#include "batch.h"
#include "cluster.h"
#include "rconn.h"
#include "sentinel.h"
#include "sink.h"

#define SINK_SCAN_COUNT "1000" /* SCAN COUNT hint */
#define SINK_NO_OP ((size_t)-1)
#define SINK_NO_OWNER ((size_t)-2) /* a cluster command that is no op's */
#define SINK_CLUSTER_WAIT_MS 200   /* WAIT for a replica after a cluster batch */

/* What reply a pipelined command expects. */
typedef enum PendKind {
    PEND_OK,        /* +OK (SET) */
    PEND_INT,       /* an integer (UNLINK, DEL, INCR, EVALSHA, PUBLISH) */
    PEND_SHA,       /* the script's SHA1 (SCRIPT LOAD) */
    PEND_SCAN,      /* [cursor, [keys...]] */
    PEND_WAIT,      /* WAIT: an integer >= the replicas asked for */
    PEND_WM,        /* the watermark script: an integer (1 set, 0 already newer) */
    PEND_WM_QUEUED, /* the watermark SET inside MULTI: +QUEUED */
    PEND_WM_EXEC,   /* its EXEC: [+OK], or nil when the WATCHed key changed */
    PEND_WM_GET,    /* GET of the watermark right after WATCH: what it holds */
    PEND_WM_WATCH,  /* UNWATCH or WATCH: +OK; NOPERM makes wm_script_only */
    PEND_WM_MULTI,  /* MULTI: +OK; NOPERM also makes wm_script_only, and fails */
} PendKind;

/* A command whose reply is outstanding, with enough to name it in errors. */
typedef struct Pending {
    PendKind kind;
    const char *cmd; /* "UNLINK", "INCR", ... */
    size_t op;       /* the op it came from, or SINK_NO_OP (watermark, script) */
    size_t nkeys;    /* keys in a grouped UNLINK/DEL */
    bool scan_match; /* issued for a key found by the op's pattern */
} Pending;

struct Sink {
    SinkConfig cfg;
    Rconn *c;
    RconnTls *tls;        /* rediss: the CA store and client certificate */
    char config_err[512]; /* a TLS file could not be loaded */
    Cluster *cl;          /* redis+cluster:// targets: routing by cluster.c, c unused */
    SentinelWatch *watch; /* redis+sentinel://: +switch-master (sink_watch), or NULL */
    long long watch_at;   /* monotonic ms of the next sink_watch() poll */
    char errstr[512];
    SinkStats stats;

    Batch b; /* the queued invalidations (batch.c) */
    char *wm_key, *wm_value;
    bool wm_reset; /* set the watermark even when it is lower */
    /* The LSN of the watermark this connection WATCHes and saw the key
     * hold (GET after WATCH): while no other client writes the key, the
     * next, higher one is a plain SET in MULTI/EXEC (sink.c
     * pipe_watermark). 0: unknown; the script compares. */
    uint64_t wm_held;
    bool wm_seen;        /* this flush's GET returned the value it wrote */
    bool wm_retry;       /* this flush's EXEC found the key changed: send by script */
    bool wm_script_only; /* the ACL user may not WATCH/MULTI: always the script */

    Pending *pend;
    size_t npend, pend_cap;
    const char **argv;
    size_t *argvlen;
    size_t argv_cap;
    char sha[41];  /* tag script SHA1, "" until learnt */
    char rsha[41]; /* refresh script SHA1, "" until learnt */
    char *fence;   /* the fence key of the op being sent */
    size_t fence_cap;
    char why[256];       /* a formatted reason for reply_ok */
    size_t nrefused;     /* OOM refusals in this flush */
    size_t fenced;       /* refreshes the fence refused in this flush */
    bool wm_refused;     /* the watermark SET was one of them */
    bool oom;            /* the last flush failed only on OOM refusals */
    bool shortfall;      /* ... only because too few replicas acknowledged it */
    bool readonly;       /* a READONLY reply: reconnect (and rediscover) */
    char oom_first[200]; /* the first refused command and Redis' words */
    size_t *cl_owner;    /* cluster command index -> op (SINK_NO_OP: watermark) */
    size_t ncl_owner, cl_owner_cap;
    size_t cl_op; /* the op cl_cmd() queues for */
};

/* Write the sink's error (printf-style). */
void sink_set_err(Sink *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* The argument vector of the command being built: room for n arguments,
 * argument i as bytes or as a C string (borrowed until the command is
 * sent). */
void sink_argv_reserve(Sink *s, size_t n);
void sink_arg(Sink *s, size_t i, const char *p, size_t n);
void sink_arg_str(Sink *s, size_t i, const char *p);

/* Put `SCAN cursor MATCH <op's pattern> COUNT n` / `PUBLISH <op's
 * channel> <payload>` into the argument vector; returns the count. */
size_t sink_scan_args(Sink *s, const char *cursor, size_t op);
size_t sink_publish_args(Sink *s, size_t op);

/* Put the watermark script's EVAL into the argument vector from index 0;
 * returns the argument count (its key is argument 3). */
size_t sink_watermark_args(Sink *s);

/* Put op i's refresh or stale script arguments from index at (after
 * "EVAL"/"EVALSHA" and the script); returns the argument count. */
size_t sink_refresh_args(Sink *s, size_t i, size_t at);

/* The WAIT timeout for ?replicas=N, well inside the command timeout. */
int sink_wait_ms(const Sink *s);

/* Count op's refresh reply r when the fence refused it (refresh.lua's 0). */
void sink_note_fenced(Sink *s, size_t op, const redisReply *r);

/* Is r a SCAN/SSCAN page ([cursor, [items...]])? */
bool sink_page_ok(const redisReply *r);

/* The Cluster executor (sink_cluster.c): the cluster client for cfg's
 * seeds, its connect, and the flush of the queued batch through it, with
 * sink_flush()'s contract (OOM refusals recorded in s->nrefused). */
Cluster *sink_cl_new(const SinkConfig *cfg, RconnTls *tls);
int sink_cl_connect(Sink *s);
int sink_cl_flush(Sink *s);

/* Run the commands queued in the cluster client (one pipelined exec
 * across the masters). Returns 0 when all were acknowledged or only
 * refused for lack of memory (recorded), -1 otherwise (errstr set). */
int sink_cl_exec(Sink *s);

#endif
