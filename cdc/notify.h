/*
 * notify.h — systemd service notifications (sd_notify via libsystemd).
 *
 * All functions are no-ops when NOTIFY_SOCKET is unset (not started by
 * systemd), so the daemon calls them unconditionally.
 */
#ifndef WALBUST_NOTIFY_H
#define WALBUST_NOTIFY_H

#include <stdint.h>

/* READY=1 with a STATUS= line. */
void notify_ready(const char *status);

/* WATCHDOG=1 when the watchdog is enabled and half its interval passed
 * since the last ping (call it from the loop as often as you like). */
void notify_watchdog(void);

/* STATUS= only. */
void notify_status(const char *status);

/* STOPPING=1. */
void notify_stopping(void);

#endif
