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
 * docs/performance-history.md: 30-40 µs per wakeup at ~1k commits/s, with moments
 * near 100 µs (the interval stays at its minimum), 150-280 µs under
 * pgbench or 10k commits/s (0.5 to 1 ms).
 *
 * That wait alone misses a saturated host on which the scheduler serves a
 * thread that mostly sleeps at once (Linux favours woken sleepers): under
 * pgbench on the Xeon VM of docs/performance-history.md walbust waited too little
 * to leave 0.2 ms while PostgreSQL had no idle CPU left, and its
 * flushes cost pgbench 11-17 % of its TPS. So the host's CPU time is a
 * second signal: the share of all CPUs' time that was not idle
 * (/proc/stat), smoothed alike; above CPUWAIT_HOST_FREE the interval rises
 * linearly to max at CPUWAIT_HOST_FULL. The interval is the larger of the
 * two.
 *
 * Pure: the caller reads the counters (runtime_sched_wait, runtime_host_cpu)
 * and the clock.
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

/* The host's share of CPU time not idle: from CPUWAIT_HOST_FREE the
 * interval rises, at CPUWAIT_HOST_FULL it is max. */
#define CPUWAIT_HOST_FREE 0.80
#define CPUWAIT_HOST_FULL 0.95

/* The host's cumulative CPU time (any unit, e.g. /proc/stat's ticks): not
 * idle (busy) and in all (total). */
typedef struct CpuHost {
    uint64_t busy, total;
} CpuHost;

typedef struct CpuWait {
    int64_t min_us, max_us; /* the interval's range */
    int64_t window_at_us;   /* when the current window began (0: not yet) */
    uint64_t delay_ns;      /* the thread's run_delay then */
    uint64_t slices;        /* ... and its timeslices */
    bool host_known;        /* host was given then */
    CpuHost host;           /* ... as it was */
    double wait_us;         /* smoothed wait for a CPU per wakeup */
    double busy;            /* smoothed share of the host's CPU time not idle */
    int64_t interval_us;    /* what cpuwait_interval_us() returns */
} CpuWait;

/* Start at min_us (min_us <= max_us). */
void cpuwait_init(CpuWait *w, int64_t min_us, int64_t max_us);

/* Feed the thread's cumulative counters (run_delay in ns, timeslices) as
 * read at now_us. Cheap when no window closes (call it as often as
 * convenient; read the counters only when cpuwait_due()). Counters that go
 * backwards restart the window. Returns true when the interval changed. */
bool cpuwait_sample(CpuWait *w, int64_t now_us, uint64_t delay_ns, uint64_t slices);

/* cpuwait_sample() with the host's counters as read at now_us too (NULL:
 * unknown; the host signal then counts as idle). */
bool cpuwait_sample_host(CpuWait *w, int64_t now_us, uint64_t delay_ns, uint64_t slices,
                         const CpuHost *host);

/* Should the caller read the counters and call cpuwait_sample() now? */
bool cpuwait_due(const CpuWait *w, int64_t now_us);

/* The flush interval to use now, in µs. */
int64_t cpuwait_interval_us(const CpuWait *w);

#endif
