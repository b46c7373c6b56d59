/*
 * audit.h — the cache audit's decisions (docs/audit.md), without I/O.
 *
 * An audit check of one key is two reads of the key around one read of the
 * database. The callers (audit_run.c in the daemon, audit_cmd.c for
 * `walbust audit`) do the I/O; this module decides:
 *
 *   1. key value V (GET). Absent, not a string, or a lease/stale marker of
 *      the freshness protocol: nothing to check (AUDIT_SKIP).
 *   2. database value D (the audit SQL) and the WAL insert position P read
 *      right after it. V equal to D: AUDIT_CLEAN. Otherwise AUDIT_VERIFY:
 *   3. wait until walbust's confirmed position (the watermark in the same
 *      Redis) is at or past P, then read the key again (V2) and, if V2 is V,
 *      the database again (D2, no position needed). V2 is V and differs
 *      from D2: AUDIT_STALE. Anything else (gone, changed, or now equal to
 *      the database) is not a finding.
 *
 * Also here: compare exact/json, sampling at a rate, a token bucket for the
 * checks-per-second cap, the consistency in nines, and a printable,
 * truncated form of a value for the log. Pure: no I/O, no logging.
 */
#ifndef WALBUST_AUDIT_H
#define WALBUST_AUDIT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* A lease or stale marker of the freshness protocol (redis/walbust.lua)
 * starts with these 15 bytes: NUL, then "walbust-lease:". */
#define AUDIT_MARKER_PREFIX "\0walbust-lease:"
#define AUDIT_MARKER_LEN 15

/* What a GET of the key returned. */
typedef enum AuditKeyKind {
    AUDIT_KEY_ABSENT,  /* nil */
    AUDIT_KEY_VALUE,   /* a string: val/len */
    AUDIT_KEY_NOT_STR, /* another type (WRONGTYPE): not audited */
} AuditKeyKind;

typedef struct AuditKey {
    AuditKeyKind kind;
    const char *val; /* borrowed */
    size_t len;
} AuditKey;

/* What the audit SQL returned: no row or SQL NULL (absent: the key must
 * not exist), or one value. */
typedef struct AuditDb {
    bool absent;
    const char *val; /* borrowed */
    size_t len;
} AuditDb;

typedef enum AuditStep {
    AUDIT_SKIP,   /* nothing to compare (absent key, marker, not a string) */
    AUDIT_CLEAN,  /* consistent, or not a finding */
    AUDIT_VERIFY, /* V differs from D: wait for confirmed >= P, read again */
    AUDIT_STALE,  /* a stale entry */
} AuditStep;

/* Does v begin with the lease-marker prefix (a lease or a stale marker)? */
bool audit_is_marker(const char *v, size_t len);

/* Is the cached value v equal to the database value d? Never when d is
 * absent. json: both parse as JSON and are equal as values (object key
 * order and whitespace ignored, numbers compared as numbers); a v that is
 * not JSON is never equal. exact: the same bytes. */
bool audit_equal(bool json, const char *v, size_t vlen, const AuditDb *d);

/* Step 1-2: the key as first read, the database value. */
AuditStep audit_first(bool json, const AuditKey *v, const AuditDb *d);

/* Step 3: after confirmed >= P, the key read again (v2) beside the first
 * read (v1); d2 is the database read again after v2, or NULL when it has
 * not been read yet. Returns AUDIT_CLEAN when v2 is not v1's bytes (gone or
 * changed: not a finding), AUDIT_VERIFY when d2 is needed (v2 is v1 and d2
 * NULL), AUDIT_CLEAN when v1 now equals d2, else AUDIT_STALE. */
AuditStep audit_second(bool json, const AuditKey *v1, const AuditKey *v2, const AuditDb *d2);

/* Sampling at a rate: every change is offered, and exactly rate of them
 * (0..1, spread evenly, deterministic) are taken. */
typedef struct AuditSampler {
    double acc;
} AuditSampler;

bool audit_sample(AuditSampler *s, double rate);

/* Parse a sampling rate given in percent ("1", "0.5", "100%") into a
 * fraction 0..1. False when it is not a number from 0 to 100. */
bool audit_parse_rate(const char *text, double *out) __attribute__((warn_unused_result));

/* A token bucket: rate tokens per second, at most burst (>= 1) stored. */
typedef struct AuditBucket {
    double rate, burst, tokens;
    int64_t last_us;
} AuditBucket;

void audit_bucket_init(AuditBucket *b, double rate, double burst, int64_t now_us);

/* Take one token if there is one. */
bool audit_bucket_take(AuditBucket *b, int64_t now_us);

/* Microseconds until a token is available (0: now). */
int64_t audit_bucket_wait_us(const AuditBucket *b, int64_t now_us);

/* Consistency as text for operators: "99.999% (5.0 nines): 1 stale in
 * 100000 checks", "no stale entry in 2000 checks (at least 3.3 nines)",
 * "no checks yet". */
void audit_consistency(uint64_t checked, uint64_t stale, char *out, size_t n);

/* The consistency in nines, -log10(stale / checked); with no stale entry
 * the lower bound log10(checked); 0 with no checks. */
double audit_nines(uint64_t checked, uint64_t stale);

/* v as a quoted, printable string for a log line: at most max bytes of it,
 * bytes outside printable ASCII as \xHH, '"' and '\' escaped, and
 * "...(N bytes)" after it when cut. out gets at most n bytes (NUL
 * included). */
void audit_show(const char *v, size_t len, size_t max, char *out, size_t n);

#endif
