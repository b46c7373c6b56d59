/*
 * lsn.h — PostgreSQL log sequence numbers and timestamps as text.
 *
 * An LSN is a 64-bit WAL byte position, written by PostgreSQL as two
 * upper-case hex halves "X/X" (e.g. "0/16B3748"). Replication messages carry
 * timestamps as microseconds since 2000-01-01 00:00:00 UTC. Pure functions.
 */
#ifndef WALBUST_LSN_H
#define WALBUST_LSN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define LSN_TEXT_MAX 24 /* "FFFFFFFF/FFFFFFFF" plus NUL, with room */
#define PGTIME_TEXT_MAX 96

/* Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01). */
#define PG_EPOCH_OFFSET_US INT64_C(946684800000000)

/* Parse "X/X" into *out. Returns false (and leaves *out alone) on anything
 * else: empty halves, non-hex characters, halves over 32 bits, trailing text. */
bool lsn_parse(const char *text, uint64_t *out) __attribute__((warn_unused_result));

/* Format lsn as "X/X" into buf (at least LSN_TEXT_MAX bytes). Returns buf. */
char *lsn_format(uint64_t lsn, char *buf);

/* Format a PostgreSQL timestamp (µs since 2000-01-01 UTC) as RFC 3339 UTC
 * with microseconds, "2026-11-27T03:22:20.123456Z", into buf (at least
 * PGTIME_TEXT_MAX bytes). Returns buf. */
char *pgtime_format(int64_t pg_us, char *buf);

/* The position just past the WAL page header that starts at lsn, when lsn
 * is a page boundary (block: the server's wal_block_size, segment: its
 * wal_segment_size; the first page of a segment has the long header);
 * otherwise, or when block is 0 (unknown), lsn itself. No record ends
 * inside a page header, so a consumer that has applied everything up to a
 * commit ending at a page boundary has also applied everything up to just
 * past the header, which is where pg_current_wal_insert_lsn() points after
 * such a commit. */
uint64_t lsn_past_page_header(uint64_t lsn, uint64_t block, uint64_t segment);

/* Current time as a PostgreSQL timestamp (µs since 2000-01-01 UTC). */
int64_t pgtime_now(void);

#endif
