/*
 * lsn.c — LSN and timestamp text conversions (see lsn.h).
 */
#include "lsn.h"

#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

static bool parse_half(const char *s, size_t n, uint32_t *out)
{
    uint64_t v = 0;

    if (n == 0 || n > 8)
        return false;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        int d;
        if (c >= '0' && c <= '9')
            d = c - '0';
        else if (c >= 'a' && c <= 'f')
            d = c - 'a' + 10;
        else if (c >= 'A' && c <= 'F')
            d = c - 'A' + 10;
        else
            return false;
        v = v * 16 + (uint64_t)d;
    }
    *out = (uint32_t)v;
    return true;
}

bool lsn_parse(const char *text, uint64_t *out)
{
    const char *slash;
    uint32_t hi, lo;

    if (text == NULL)
        return false;
    slash = strchr(text, '/');
    if (slash == NULL)
        return false;
    if (!parse_half(text, (size_t)(slash - text), &hi) ||
        !parse_half(slash + 1, strlen(slash + 1), &lo))
        return false;
    *out = ((uint64_t)hi << 32) | lo;
    return true;
}

char *lsn_format(uint64_t lsn, char *buf)
{
    snprintf(buf, LSN_TEXT_MAX, "%" PRIX32 "/%" PRIX32, (uint32_t)(lsn >> 32), (uint32_t)lsn);
    return buf;
}

char *pgtime_format(int64_t pg_us, char *buf)
{
    int64_t unix_us = pg_us + PG_EPOCH_OFFSET_US;
    int64_t secs = unix_us / 1000000;
    int64_t frac = unix_us % 1000000;
    struct tm tm;
    time_t t;

    if (frac < 0) {
        frac += 1000000;
        secs -= 1;
    }
    t = (time_t)secs;
    if (gmtime_r(&t, &tm) == NULL) {
        snprintf(buf, PGTIME_TEXT_MAX, "invalid");
        return buf;
    }
    snprintf(buf, PGTIME_TEXT_MAX, "%04d-%02d-%02dT%02d:%02d:%02d.%06dZ", tm.tm_year + 1900,
             tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, (int)frac);
    return buf;
}

int64_t pgtime_now(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000 - PG_EPOCH_OFFSET_US;
}
