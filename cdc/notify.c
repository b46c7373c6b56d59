/*
 * notify.c — systemd service notifications (see notify.h).
 *
 * Thin wrappers around libsystemd's sd_notify(), which sends one datagram to
 * the socket named by NOTIFY_SOCKET and does nothing (returns 0) when it is
 * unset. The environment is left in place (unset_environment = 0) so every
 * later notification still finds the socket. The watchdog interval comes
 * from WATCHDOG_USEC (and WATCHDOG_PID, which must be ours) through
 * sd_watchdog_enabled(), read on every call so nothing is cached across a
 * changed environment; pings are rate-limited to one per half interval,
 * which is what systemd recommends. Called from the daemon's loop only
 * (the last-ping time is not shared between threads).
 */
#include "notify.h"

#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <systemd/sd-daemon.h>
#include <time.h>

static uint64_t last_ping_us; /* CLOCK_MONOTONIC; 0 = never pinged */

static uint64_t now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

/* Copy status into buf as one line: the protocol separates assignments with
 * newlines, so an embedded newline would start a bogus assignment. */
static const char *one_line(const char *status, char *buf, size_t len)
{
    snprintf(buf, len, "%s", status != NULL ? status : "");
    for (char *p = buf; *p; p++)
        if (*p == '\n' || *p == '\r')
            *p = ' ';
    return buf;
}

void notify_ready(const char *status)
{
    char line[512];
    sd_notifyf(0, "READY=1\nSTATUS=%s", one_line(status, line, sizeof line));
}

void notify_status(const char *status)
{
    char line[512];
    sd_notifyf(0, "STATUS=%s", one_line(status, line, sizeof line));
}

void notify_stopping(void)
{
    sd_notify(0, "STOPPING=1");
}

void notify_watchdog(void)
{
    uint64_t interval = 0, now;

    if (sd_watchdog_enabled(0, &interval) <= 0 || interval == 0)
        return;
    now = now_us();
    if (last_ping_us != 0 && now - last_ping_us < interval / 2)
        return;
    if (sd_notify(0, "WATCHDOG=1") > 0)
        last_ping_us = now;
}
