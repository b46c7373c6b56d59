/*
 * prio.h — may walbust yield a granted priority while it catches up?
 *
 * An operator may start walbust at a negative nice value (systemd
 * Nice=-5): on saturated CPUs that cuts its latency tails by a fifth to a
 * quarter. While it catches up on a backlog, the same priority buys
 * nothing (the walsender sets the pace: the drain was no faster) and takes
 * the CPU first from the backends and from the walsender that feeds
 * walbust: in 4 of 10 measured drains the backends' p99 latency went above
 * 50 ms, against none at nice 0 (docs/operations.md, "A CPU-bound database
 * host"). So the streaming thread goes to nice 0 while catching up
 * and back to the granted value once live, but only when it is allowed to
 * go back: lowering a nice value needs CAP_SYS_NICE or an RLIMIT_NICE soft
 * limit that reaches it (the lowest value allowed is 20 - rlim_cur).
 *
 * Pure: the caller reads the process's state (runtime_nice_probe()).
 */
#ifndef WALBUST_PRIO_H
#define WALBUST_PRIO_H

#include <stdbool.h>
#include <stdint.h>

/* RLIMIT_NICE's "no limit" (RLIM_INFINITY), for callers without
 * <sys/resource.h>. */
#define PRIO_RLIM_INFINITY UINT64_MAX

/* True when a thread at nice 0 may return to nice `base` (< 0): with
 * CAP_SYS_NICE, or when RLIMIT_NICE's soft limit rlim_cur allows values
 * down to base. False for base >= 0 (no priority granted: nothing to
 * yield). */
bool prio_can_return(int base, uint64_t rlim_cur, bool cap_sys_nice);

/* True when the "CapEff:" line of /proc/self/status text holds
 * CAP_SYS_NICE; false when it does not or the line is missing or
 * malformed. */
bool prio_capeff_sys_nice(const char *status);

#endif
