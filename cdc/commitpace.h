/*
 * commitpace.h — may holding a ready batch for --flush-interval gather
 * anything?
 *
 * Spacing Redis writes by the flush interval saves work only while commits
 * arrive faster than one per interval: a short wait then gathers several
 * into one write (a backlog, ~10k commits/s, a saturated database). At
 * ordinary rates the next commit is usually further away than the
 * interval, so holding a batch gathers nothing and only adds up to the
 * interval to its latency (measured on the 2-core VM of
 * docs/performance-history.md: at ~1,400 commits/s a 0.2 ms spacing applied to
 * every batch ready early put the `batch` stage's p99 at 0.47 ms against
 * 0.05 ms, and saved no CPU).
 *
 * The pace is read from PostgreSQL's commit timestamps, not from when
 * walbust decoded the commits: holding batches bunches the decoding, the
 * commits themselves are not bunched by it (a pace measured from walbust's
 * own flushes fed on its holds and kept holding). Each gap between two
 * commits counts at most COMMITPACE_GAP_CAP intervals (a pause weighs like
 * any long gap; out-of-order timestamps of concurrent commits count 0);
 * the smoothed gap weighs the newest 1/COMMITPACE_WEIGHT. "Busy" is a
 * smoothed gap under the interval. Simulated with exponential gaps and a
 * 0.2 ms interval: busy 0.002 % of the time at a mean gap of 0.7 ms
 * (~1,400 commits/s), 0.1 % at 0.5 ms, 9 % at 0.3 ms, 55 % at 0.2 ms,
 * 99.8 % at 0.1 ms (~10k commits/s).
 *
 * Pure: the caller passes the timestamps.
 */
#ifndef WALBUST_COMMITPACE_H
#define WALBUST_COMMITPACE_H

#include <stdbool.h>
#include <stdint.h>

#define COMMITPACE_GAP_CAP 4
#define COMMITPACE_WEIGHT 8

typedef struct CommitPace {
    bool started;
    int64_t last_us; /* the last commit's timestamp */
    int64_t gap_us;  /* smoothed gap between commits */
} CommitPace;

void commitpace_init(CommitPace *p);

/* A commit with timestamp t_us (any fixed epoch, µs) was decoded, while
 * the flush interval is interval_us. */
void commitpace_add(CommitPace *p, int64_t t_us, int64_t interval_us);

/* Do commits arrive more than one per interval_us, lately? */
bool commitpace_busy(const CommitPace *p, int64_t interval_us);

#endif
