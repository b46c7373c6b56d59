/*
 * stream.h — the logical replication client (libpq, pgoutput).
 *
 * Lifecycle: stream_new() → stream_connect() (connect in replication mode,
 * IDENTIFY_SYSTEM, check wal_level, publication and slot; create the slot
 * when asked) → optional catalog queries on stream_conn() →
 * stream_start() (START_REPLICATION ... LOGICAL) → stream_next() in a loop,
 * stream_confirm() after Redis acknowledged → stream_close() on error and
 * stream_connect() again to reconnect; stream_free() at the end.
 *
 * Keepalives are handled inside stream_next(): a reply request is answered
 * at once; a status update is sent at least every status interval. When the
 * caller declares itself idle (stream_set_idle: nothing decoded but not yet
 * acknowledged), keepalive positions are confirmed so an idle or unpublished
 * workload does not pin WAL (docs/guarantees.md guarantee 5).
 *
 * The module logs nothing; errors go to stream_errstr() and are classified
 * so the caller can decide to retry, stand by or stop.
 */
#ifndef WALBUST_STREAM_H
#define WALBUST_STREAM_H

#include <libpq-fe.h>
#include <signal.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef enum StreamStatus {
    STREAM_OK = 0,
    STREAM_RETRY,   /* transient: server unreachable, connection lost */
    STREAM_BUSY,    /* slot is active for another process: stand by */
    STREAM_FATAL,   /* configuration problem: retrying will not help */
    STREAM_LOST,    /* the slot cannot go on: wal_status=lost (its WAL was removed),
                     * or it cannot decode past a change (publication missing then) */
    STREAM_MISSING, /* the slot does not exist; the connection stays open so
                     * the caller may stream_create_slot() */
} StreamStatus;

/* What stream_connect() found out about the slot (and the server). */
typedef struct StreamSlot {
    bool exists;        /* found, or created by stream_create_slot() */
    bool created;       /* created by stream_create_slot() on this connection */
    bool lost;          /* wal_status = lost */
    uint64_t confirmed; /* confirmed_flush_lsn (created: the consistent point) */
    uint64_t wal_now;   /* the server's WAL position at the check */
    char system_id[32]; /* IDENTIFY_SYSTEM systemid */
    char database[64];  /* the connection's database */
} StreamSlot;

typedef struct StreamConfig {
    const char *conninfo; /* conninfo string or URI; "" for libpq defaults */
    const char *slot;
    const char *publication;
    bool temporary_slot;    /* create a TEMPORARY slot named `slot` */
    bool confirm;           /* false: never confirm anything (decode --slot) */
    int status_interval_ms; /* default 10000 */
} StreamConfig;

/* One XLogData payload. buf is valid until the next stream_next(),
 * stream_close() or stream_free(). */
typedef struct StreamData {
    const char *buf;
    size_t len;
    uint64_t wal_start;
} StreamData;

typedef struct Stream Stream;

/* Create a stream (not connected). cfg strings are borrowed and must outlive
 * the stream. Aborts on out of memory. */
Stream *stream_new(const StreamConfig *cfg);

/* Close and free. Accepts NULL. */
void stream_free(Stream *s);

/* Connect and run the start-up checks (a temporary slot is created here).
 * Returns STREAM_OK, or another status with stream_errstr() saying what
 * failed and what to do. STREAM_MISSING and STREAM_LOST keep the
 * connection open (stream_slot() says what was found); the caller decides,
 * then calls stream_create_slot() or stream_close(). STREAM_LOST is also
 * returned when the previous stream ended because the publication did not
 * exist at a change it had to decode and the publication exists now: the
 * slot can never decode past that change. */
StreamStatus stream_connect(Stream *s) __attribute__((warn_unused_result));

/* The slot facts of the last stream_connect(); valid until the next one. */
const StreamSlot *stream_slot(const Stream *s);

/* After STREAM_MISSING: create the (persistent) slot on the open
 * connection. Returns STREAM_OK (stream_slot() then says created, with its
 * consistent point as confirmed) or STREAM_FATAL (connection closed). */
StreamStatus stream_create_slot(Stream *s) __attribute__((warn_unused_result));

/* The connection between stream_connect() and stream_start(), for simple
 * queries (replication connections allow only the simple protocol). */
PGconn *stream_conn(Stream *s);

/* START_REPLICATION from start_lsn (0: the slot's confirmed position).
 * STREAM_BUSY when the slot is active for another PID. Afterwards
 * stream_confirmed() is where streaming really starts: the larger of
 * start_lsn and the slot's confirmed position. */
StreamStatus stream_start(Stream *s, uint64_t start_lsn) __attribute__((warn_unused_result));

/* Wait up to timeout_ms (0: do not wait) for the next XLogData message.
 * Returns 1 with *out filled, 0 when none arrived in time or a keepalive
 * moved stream_confirmed() (while idle), -1 when the connection failed
 * (stream_errstr() says why; call stream_close()). */
int stream_next(Stream *s, int timeout_ms, StreamData *out) __attribute__((warn_unused_result));

/* stream_next() for what is already buffered: never reads the socket or
 * the clock. Returns 1 with *out filled, 0 when no complete message is
 * buffered or a keepalive moved stream_confirmed() (stream_next() then
 * returns 0 at once), -1 when the connection failed. Lets the caller work
 * out how long to wait only when it will wait. */
int stream_next_buffered(Stream *s, StreamData *out) __attribute__((warn_unused_result));

/* Record that everything up to flush_lsn is durably applied. Sends a status
 * update when force is true or the status interval has elapsed (also with an
 * unchanged position: this keeps the walsender from timing out while Redis
 * is down). Returns 0, or -1 when the connection failed. */
int stream_confirm(Stream *s, uint64_t flush_lsn, bool force);

/* Record that everything up to flush_lsn is durably applied, and have it
 * reported within a few milliseconds: sent now when the last status update
 * is older than that, else by stream_next() once it is due (stream_next()
 * must keep being called). For the steady stream of acknowledgements in the
 * daemon loop; use stream_confirm() with force before stopping. Returns 0,
 * or -1 when the connection failed. */
int stream_confirm_soon(Stream *s, uint64_t flush_lsn);

/* Never report a flush position past limit to the server, although
 * stream_confirmed() may be ahead (the daemon reports a position only once
 * the Redis watermark holds it, so a slot can be told apart from one that
 * was re-created). The limit only rises; without a call there is none. A
 * position held back is sent within a few ms of the limit reaching it. */
void stream_set_confirm_limit(Stream *s, uint64_t limit);

/* Declare whether everything decoded so far is acknowledged. When it is, a
 * keepalive that arrived while it was not (its end covers only what was
 * sent before it) is confirmed now, instead of waiting for the server's
 * next keepalive, which may come only after the next status interval. */
void stream_set_idle(Stream *s, bool idle);

/* Read the socket at most once per pace_us (0: as soon as bytes arrive), or
 * per fifth of it while more than a read's worth (16 kB) was left waiting.
 * For catching up on a backlog: the walsender is then the slower side, and
 * a consumer that reads every message as it arrives spends a system call
 * and a wakeup on every few hundred bytes. The pause happens only when
 * nothing complete is buffered. */
void stream_set_pace(Stream *s, int pace_us);

/* Positions: confirmed (flush) LSN, last received XLogData start, and the
 * server's WAL end from the last message. */
uint64_t stream_confirmed(const Stream *s);
/* The newest flush position the server may have been told: confirmed,
 * capped by stream_set_confirm_limit(). */
uint64_t stream_reported(const Stream *s);

/* Forget positions confirmed past lsn that the server was never told (never
 * below stream_reported()): the caller replays from lsn, e.g. after a
 * Redis failure that may have lost what it acknowledged. */
void stream_rewind(Stream *s, uint64_t lsn);
uint64_t stream_received(const Stream *s);
uint64_t stream_server_end(const Stream *s);

/* Server facts from the last stream_connect(). */
int stream_server_version(const Stream *s);
/* lsn_past_page_header() with the server's WAL page and segment sizes:
 * the position a reader's pg_current_wal_insert_lsn() may show once
 * everything up to lsn is applied (lsn itself before the first connect). */
uint64_t stream_past_page_header(const Stream *s, uint64_t lsn);
const char *stream_describe(const Stream *s); /* "host:port/db", no password */

/* Drop the connection (keeps configuration and positions). */
void stream_close(Stream *s);

const char *stream_errstr(const Stream *s);

/* Default connect_timeout (seconds) of every connection, replication or
 * plain, unless the conninfo or PGCONNECT_TIMEOUT sets one. */
#define STREAM_CONNECT_TIMEOUT_S 10

/* Make every later connection attempt (stream_connect, stream_plain_connect)
 * give up within 100 ms once *flag is nonzero (a SIGTERM flag); NULL: never.
 * The flag is borrowed for the life of the process. */
void stream_cancel_on(const volatile sig_atomic_t *flag);

/* Open a plain (non-replication) connection to conninfo. Returns NULL with
 * a message in err (no password) on failure. Caller PQfinish()es. */
PGconn *stream_plain_connect(const char *conninfo, char *err, size_t errlen);

/* libpq's message for the last failure on conn (NULL: "out of memory")
 * into buf, without the trailing newline. */
void stream_pg_message(PGconn *conn, char *buf, size_t len);

/* A "schema.table" name as SQL, "schema"."table" with each part escaped by
 * PQescapeIdentifier (a name without a schema part as one identifier).
 * Returns a malloc'd string the caller frees; aborts on out of memory. */
char *stream_quote_table(PGconn *conn, const char *name);

/* "host:port/dbname as user" of a connection, never the password. */
void stream_describe_conn(PGconn *conn, char *buf, size_t len);

#endif
