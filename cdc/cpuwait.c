/*
 * cpuwait.c — the automatic flush interval from walbust's wait for a CPU
 * and the host's busy CPU time (cpuwait.h).
 */
#include "cpuwait.h"

#include <stddef.h>

/* Weight of the newest window in the smoothed wait: ~3 windows (~0.3 s)
 * to follow a change of load, without jumping on one noisy window. */
#define CPUWAIT_ALPHA 0.3

void cpuwait_init(CpuWait *w, int64_t min_us, int64_t max_us)
{
    *w = (CpuWait){.min_us = min_us, .max_us = max_us < min_us ? min_us : max_us};
    w->interval_us = w->min_us;
}

bool cpuwait_due(const CpuWait *w, int64_t now_us)
{
    return w->window_at_us == 0 || now_us - w->window_at_us >= CPUWAIT_WINDOW_US;
}

static void restart(CpuWait *w, int64_t now_us, uint64_t delay_ns, uint64_t slices,
                    const CpuHost *host)
{
    w->window_at_us = now_us;
    w->delay_ns = delay_ns;
    w->slices = slices;
    w->host_known = host != NULL;
    if (host != NULL)
        w->host = *host;
}

/* Smooth in the host's share of busy CPU time over the window that ends
 * with host (unknown, or counters that went backwards: idle). */
static void sample_host(CpuWait *w, const CpuHost *host)
{
    double busy = 0;

    if (host != NULL && w->host_known && host->total > w->host.total &&
        host->busy >= w->host.busy && host->busy - w->host.busy <= host->total - w->host.total)
        busy = (double)(host->busy - w->host.busy) / (double)(host->total - w->host.total);
    w->busy += CPUWAIT_ALPHA * (busy - w->busy);
}

bool cpuwait_sample(CpuWait *w, int64_t now_us, uint64_t delay_ns, uint64_t slices)
{
    return cpuwait_sample_host(w, now_us, delay_ns, slices, NULL);
}

bool cpuwait_sample_host(CpuWait *w, int64_t now_us, uint64_t delay_ns, uint64_t slices,
                         const CpuHost *host)
{
    int64_t span = now_us - w->window_at_us;
    uint64_t wakeups;
    double wait_us, target, by_host;
    int64_t old = w->interval_us;

    if (w->window_at_us == 0 || span < 0 || delay_ns < w->delay_ns || slices < w->slices) {
        restart(w, now_us, delay_ns, slices, host);
        return false;
    }
    if (span < CPUWAIT_WINDOW_US)
        return false;
    wakeups = slices - w->slices;
    if (wakeups < CPUWAIT_MIN_WAKEUPS && span < CPUWAIT_IDLE_WINDOW_US)
        return false; /* let the window grow until it has enough to judge */
    wait_us = wakeups < CPUWAIT_MIN_WAKEUPS
                  ? 0 /* nearly idle: nothing to gather, write at once */
                  : (double)(delay_ns - w->delay_ns) / 1000.0 / (double)wakeups;
    w->wait_us += CPUWAIT_ALPHA * (wait_us - w->wait_us);
    sample_host(w, host);
    restart(w, now_us, delay_ns, slices, host);

    target = CPUWAIT_FACTOR * (w->wait_us - CPUWAIT_FREE_US);
    by_host = (w->busy - CPUWAIT_HOST_FREE) / (CPUWAIT_HOST_FULL - CPUWAIT_HOST_FREE);
    by_host = (double)w->min_us + (double)(w->max_us - w->min_us) * by_host;
    if (by_host > target)
        target = by_host;
    if (target < (double)w->min_us)
        w->interval_us = w->min_us;
    else if (target > (double)w->max_us)
        w->interval_us = w->max_us;
    else
        w->interval_us = (int64_t)target;
    return w->interval_us != old;
}

int64_t cpuwait_interval_us(const CpuWait *w)
{
    return w->interval_us;
}
