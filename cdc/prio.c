/*
 * prio.c — may walbust yield a granted priority while it catches up?
 * (see prio.h).
 */
#include "prio.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#define PRIO_CAP_SYS_NICE 23 /* linux/capability.h */

bool prio_can_return(int base, uint64_t rlim_cur, bool cap_sys_nice)
{
    if (base >= 0)
        return false;
    if (cap_sys_nice || rlim_cur >= 40) /* RLIM_INFINITY included */
        return true;
    /* The lowest nice value RLIMIT_NICE allows is 20 - rlim_cur. */
    return 20 - (int)rlim_cur <= base;
}

bool prio_capeff_sys_nice(const char *status)
{
    const char *p = status;
    unsigned long long caps;
    char *end;

    while (p != NULL && strncmp(p, "CapEff:", 7) != 0) {
        p = strchr(p, '\n');
        if (p != NULL)
            p++;
    }
    if (p == NULL)
        return false;
    p += 7;
    while (*p == ' ' || *p == '\t')
        p++;
    errno = 0;
    caps = strtoull(p, &end, 16);
    if (end == p || errno != 0 || (*end != '\n' && *end != '\0'))
        return false;
    return (caps >> PRIO_CAP_SYS_NICE) & 1;
}
