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

/* Upper-case hex of v without leading zeros ("0" for 0) at p; returns the
 * end. Hand-written because it runs once per transaction (snprintf showed
 * up in profiles of single-row transaction workloads). */
static char *put_hex(char *p, uint32_t v)
{
    static const char digits[] = "0123456789ABCDEF";
    int shift = 28;

    while (shift > 0 && (v >> shift) == 0)
        shift -= 4;
    for (; shift >= 0; shift -= 4)
        *p++ = digits[(v >> shift) & 0xf];
    return p;
}

char *lsn_format(uint64_t lsn, char *buf)
{
    char *p = put_hex(buf, (uint32_t)(lsn >> 32));

    *p++ = '/';
    p = put_hex(p, (uint32_t)lsn);
    *p = '\0';
    return buf;
}

/* Proleptic Gregorian date of a day count since 1970-01-01 (H. Hinnant's
 * civil_from_days), valid for any int64 day count that fits a year in int. */
static void civil_from_days(int64_t z, int64_t *y, unsigned *m, unsigned *d)
{
    z += 719468;
    int64_t era = (z >= 0 ? z : z - 146096) / 146097;
    unsigned doe = (unsigned)(z - era * 146097);
    unsigned yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    unsigned doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    unsigned mp = (5 * doy + 2) / 153;

    *d = doy - (153 * mp + 2) / 5 + 1;
    *m = mp < 10 ? mp + 3 : mp - 9;
    *y = (int64_t)yoe + era * 400 + (*m <= 2);
}

/* The general path (years outside 0000-9999): gmtime_r and snprintf. */
static char *pgtime_format_slow(int64_t secs, int64_t frac, char *buf)
{
    struct tm tm;
    time_t t = (time_t)secs;

    if (gmtime_r(&t, &tm) == NULL) {
        snprintf(buf, PGTIME_TEXT_MAX, "invalid");
        return buf;
    }
    snprintf(buf, PGTIME_TEXT_MAX, "%04d-%02d-%02dT%02d:%02d:%02d.%06dZ", tm.tm_year + 1900,
             tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, (int)frac);
    return buf;
}

/* n decimal digits of v, zero-padded, at p; returns the end. */
static char *put_dec(char *p, unsigned v, int n)
{
    for (int i = n - 1; i >= 0; i--) {
        p[i] = (char)('0' + v % 10);
        v /= 10;
    }
    return p + n;
}

char *pgtime_format(int64_t pg_us, char *buf)
{
    /* Arithmetic instead of gmtime_r + snprintf: gmtime_r takes glibc's
     * timezone lock, and this runs once per transaction. */
    int64_t unix_us, secs, frac;
    int64_t days, sod, year;
    unsigned mon, mday;
    char *p = buf;

    /* The value comes off the wire: adding the epoch offset must not
     * overflow (PostgreSQL's own timestamps end long before this). */
    if (pg_us > INT64_MAX - PG_EPOCH_OFFSET_US) {
        snprintf(buf, PGTIME_TEXT_MAX, "invalid");
        return buf;
    }
    unix_us = pg_us + PG_EPOCH_OFFSET_US;
    secs = unix_us / 1000000;
    frac = unix_us % 1000000;
    if (frac < 0) {
        frac += 1000000;
        secs -= 1;
    }
    days = secs / 86400;
    sod = secs % 86400;
    if (sod < 0) {
        sod += 86400;
        days -= 1;
    }
    civil_from_days(days, &year, &mon, &mday);
    if (year < 0 || year > 9999)
        return pgtime_format_slow(secs, frac, buf);
    p = put_dec(p, (unsigned)year, 4);
    *p++ = '-';
    p = put_dec(p, mon, 2);
    *p++ = '-';
    p = put_dec(p, mday, 2);
    *p++ = 'T';
    p = put_dec(p, (unsigned)(sod / 3600), 2);
    *p++ = ':';
    p = put_dec(p, (unsigned)(sod / 60 % 60), 2);
    *p++ = ':';
    p = put_dec(p, (unsigned)(sod % 60), 2);
    *p++ = '.';
    p = put_dec(p, (unsigned)frac, 6);
    *p++ = 'Z';
    *p = '\0';
    return buf;
}

int64_t pgtime_now(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000 - PG_EPOCH_OFFSET_US;
}

/* PostgreSQL's page header sizes (SizeOfXLogShortPHD, SizeOfXLogLongPHD:
 * MAXALIGNed on every platform it supports). */
#define LSN_SHORT_PAGE_HEADER 24
#define LSN_LONG_PAGE_HEADER 40

uint64_t lsn_past_page_header(uint64_t lsn, uint64_t block, uint64_t segment)
{
    if (block == 0 || lsn == 0 || lsn % block != 0)
        return lsn;
    if (segment != 0 && lsn % segment == 0)
        return lsn + LSN_LONG_PAGE_HEADER;
    return lsn + LSN_SHORT_PAGE_HEADER;
}
