/*
 * commitpace.c — the pace of commits, from their timestamps
 * (commitpace.h).
 */
#include "commitpace.h"

void commitpace_init(CommitPace *p)
{
    *p = (CommitPace){0};
}

void commitpace_add(CommitPace *p, int64_t t_us, int64_t interval_us)
{
    int64_t cap = COMMITPACE_GAP_CAP * interval_us;
    int64_t gap;

    if (!p->started) {
        p->started = true;
        p->last_us = t_us;
        p->gap_us = cap;
        return;
    }
    gap = t_us - p->last_us;
    if (gap < 0)
        gap = 0; /* concurrent commits: timestamps slightly out of order */
    else
        p->last_us = t_us;
    if (gap > cap)
        gap = cap;
    p->gap_us += (gap - p->gap_us) / COMMITPACE_WEIGHT;
}

bool commitpace_busy(const CommitPace *p, int64_t interval_us)
{
    return p->started && p->gap_us < interval_us;
}
