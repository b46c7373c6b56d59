/*
 * cpuwait.h — the automatic flush interval (--flush-interval auto).
 *
 * Each Redis write costs a wakeup of walbust, of the PostgreSQL backend that
 * answers the visibility query and of Redis. On an idle host a wakeup is
 * cheap and walbust writes as soon as the stream pauses (0.2 ms apart at
 * most). On a host whose CPUs are saturated (a busy database), every wakeup
 * first waits for a CPU: that wait is already latency every commit pays, and
 * the wakeups are CPU the database could have used. There, walbust gathers
 * the commits of a few such waits into one batch.
 *
 * The signal is walbust's own: how long its streaming thread waited for a
 * CPU per time it ran (the kernel's run_delay / timeslices,
 * /proc/thread-self/schedstat), smoothed over ~0.3 s. The interval is
 * CPUWAIT_FACTOR times the part of that wait above CPUWAIT_FREE_US (what
 * any wakeup costs), within [min, max]. Measured on the 2-core VM of
 * docs/performance.md: 30-40 µs per wakeup at ~1k commits/s, with moments
 * near 100 µs (the interval stays at its minimum), 150-280 µs under
 * pgbench or 10k commits/s (0.5 to 1 ms).
 *
 * Pure: the caller reads the counters (runtime_sched_wait) and the clock.
 */
#ifndef WALBUST_CPUWAIT_H
#define WALBUST_CPUWAIT_H

#include <stdbool.h>
#include <stdint.h>

/* interval = CPUWAIT_FACTOR x (the smoothed wait per wakeup - CPUWAIT_FREE_US).
 * A wakeup waits some tens of µs on an idle VM (a few µs on bare metal),
 * now and then near 100: that is not contention. */
#define CPUWAIT_FACTOR 6
#define CPUWAIT_FREE_US 80
/* A window closes after this long with at least CPUWAIT_MIN_WAKEUPS in it */
#define CPUWAIT_WINDOW_US 100000
#define CPUWAIT_MIN_WAKEUPS 20
/* ... or after this long with fewer: too few wakeups to gather anything,
 * the wait counts as 0 */
#define CPUWAIT_IDLE_WINDOW_US 1000000

typedef struct CpuWait {
    int64_t min_us, max_us; /* the interval's range */
    int64_t window_at_us;   /* when the current window began (0: not yet) */
    uint64_t delay_ns;      /* the thread's run_delay then */
    uint64_t slices;        /* ... and its timeslices */
    double wait_us;         /* smoothed wait for a CPU per wakeup */
    int64_t interval_us;    /* what cpuwait_interval_us() returns */
} CpuWait;

/* Start at min_us (min_us <= max_us). */
void cpuwait_init(CpuWait *w, int64_t min_us, int64_t max_us);

/* Feed the thread's cumulative counters (run_delay in ns, timeslices) as
 * read at now_us. Cheap when no window closes (call it as often as
 * convenient; read the counters only when cpuwait_due()). Counters that go
 * backwards restart the window. Returns true when the interval changed. */
bool cpuwait_sample(CpuWait *w, int64_t now_us, uint64_t delay_ns, uint64_t slices);

/* Should the caller read the counters and call cpuwait_sample() now? */
bool cpuwait_due(const CpuWait *w, int64_t now_us);

/* The flush interval to use now, in µs. */
int64_t cpuwait_interval_us(const CpuWait *w);

#endif
