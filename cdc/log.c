/*
 * log.c — line-oriented logging to stderr (see log.h).
 */
#include "log.h"

#include <cjson/cJSON.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static bool log_json = false;
static LogLevel log_min = LOG_LEVEL_INFO;

static const char *const level_names[] = {"debug", "info", "warn", "error"};

int log_configure(const char *format, const char *level)
{
    bool json = log_json;
    int min = -1;

    if (format != NULL) {
        if (strcmp(format, "text") == 0)
            json = false;
        else if (strcmp(format, "json") == 0)
            json = true;
        else
            return -1;
    }
    if (level != NULL) {
        for (int i = 0; i < 4; i++)
            if (strcmp(level, level_names[i]) == 0)
                min = i;
        if (strcmp(level, "warning") == 0)
            min = LOG_LEVEL_WARN;
        if (min < 0)
            return -1;
        log_min = (LogLevel)min;
    }
    log_json = json;
    return 0;
}

bool log_is_json(void)
{
    return log_json;
}

bool log_enabled(LogLevel level)
{
    return level >= log_min;
}

static void timestamp(char *buf, size_t len)
{
    struct timespec ts;
    struct tm tm;

    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    snprintf(buf, len, "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ", tm.tm_year + 1900, tm.tm_mon + 1,
             tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, ts.tv_nsec / 1000000);
}

static void write_json(LogLevel level, const char *ts, const char *lsn, const char *table,
                       const char *msg)
{
    cJSON *o = cJSON_CreateObject();
    char *line;

    if (o == NULL)
        abort();
    cJSON_AddStringToObject(o, "ts", ts);
    cJSON_AddStringToObject(o, "level", level_names[level]);
    cJSON_AddNumberToObject(o, "pid", (double)getpid());
    cJSON_AddStringToObject(o, "msg", msg);
    if (lsn != NULL)
        cJSON_AddStringToObject(o, "lsn", lsn);
    if (table != NULL)
        cJSON_AddStringToObject(o, "table", table);
    line = cJSON_PrintUnformatted(o);
    if (line == NULL)
        abort();
    fprintf(stderr, "%s\n", line);
    cJSON_free(line);
    cJSON_Delete(o);
}

void log_event(LogLevel level, const char *lsn, const char *table, const char *fmt, ...)
{
    char msg[2048];
    char ts[40];
    va_list ap;
    size_t n;

    if (!log_enabled(level))
        return;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    /* One event per line: strip trailing newlines (libpq messages end in one)
     * and fold inner ones. */
    n = strlen(msg);
    while (n > 0 && (msg[n - 1] == '\n' || msg[n - 1] == ' '))
        msg[--n] = '\0';
    for (char *p = msg; *p; p++)
        if (*p == '\n' || *p == '\t' || *p == '\r')
            *p = ' ';
    timestamp(ts, sizeof ts);
    flockfile(stderr); /* one line even when several threads log */
    if (log_json) {
        write_json(level, ts, lsn, table, msg);
    } else {
        fprintf(stderr, "%s walbust[%d] %s: %s", ts, (int)getpid(), level_names[level], msg);
        if (lsn != NULL)
            fprintf(stderr, " lsn=%s", lsn);
        if (table != NULL)
            fprintf(stderr, " table=%s", table);
        fputc('\n', stderr);
    }
    fflush(stderr);
    funlockfile(stderr);
}
