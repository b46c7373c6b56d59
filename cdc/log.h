/*
 * log.h — one event per line on stderr, as text or JSON.
 *
 * Text: "2026-11-27T03:22:20.123Z walbust[123] info: message".
 * JSON: {"ts":"...","level":"info","pid":123,"msg":"...","lsn":"0/1","table":"public.t"}
 * Messages must never contain passwords: callers describe servers with
 * log_describe_pg()/redisurl_redact(), never with the raw conninfo.
 */
#ifndef WALBUST_LOG_H
#define WALBUST_LOG_H

#include <stdbool.h>

typedef enum LogLevel {
    LOG_LEVEL_DEBUG,
    LOG_LEVEL_INFO,
    LOG_LEVEL_WARN,
    LOG_LEVEL_ERROR,
} LogLevel;

/* Configure output. format: "text" or "json"; level: debug, info, warn,
 * error. Returns -1 (and changes nothing) on an unknown value. */
int log_configure(const char *format, const char *level);

/* Is the output JSON (--log-format json)? */
bool log_is_json(void);

/* Would a message at this level be written? */
bool log_enabled(LogLevel level);

/* Log one event. lsn and table may be NULL; in JSON they become fields, in
 * text they are appended as "lsn=... table=...". */
void log_event(LogLevel level, const char *lsn, const char *table, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

#define log_error(...) log_event(LOG_LEVEL_ERROR, NULL, NULL, __VA_ARGS__)
#define log_warn(...) log_event(LOG_LEVEL_WARN, NULL, NULL, __VA_ARGS__)
#define log_info(...) log_event(LOG_LEVEL_INFO, NULL, NULL, __VA_ARGS__)
#define log_debug(...) log_event(LOG_LEVEL_DEBUG, NULL, NULL, __VA_ARGS__)

#endif
