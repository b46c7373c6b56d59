/*
 * bare_consumer.c — the replication stream's ceiling, for bench/run.
 *
 * Reads a pgoutput slot exactly the way walbust does (libpq, replication
 * connection, START_REPLICATION ... (proto_version '2', publication_names,
 * messages 'true'), PQgetCopyData in async mode with poll) and discards every
 * message: no decoding beyond the message type byte, no Redis. It answers
 * keepalives and confirms everything it received, so the slot advances like
 * walbust's. It stops at the first Commit whose end LSN is past --until
 * (bench/run passes the LSN of a marker message inside the last
 * transaction), and prints one JSON line:
 *
 *   {"seconds":..., "messages":..., "changes":..., "commits":..., "bytes":...,
 *    "cpu_user":..., "cpu_sys":...}
 *
 * seconds runs from just before START_REPLICATION to the last Commit;
 * cpu_user/cpu_sys are the process's own CPU seconds (getrusage).
 *
 * usage: bare_consumer --pg CONNINFO --slot S --publication P --until X/X
 *        [--binary] [--timeout SECONDS] [--status-ms MS] [--pace-us N] [--rcvbuf BYTES]
 *        [--rcvlowat BYTES]
 *
 * --status-ms (default 1000) is how often received positions are confirmed;
 * bench/run uses 10 when it measures the slot's lag under live load.
 *
 * --pace-us N: read the socket at most once per N µs, as walbust does while
 * catching up (stream_set_pace); shows how much of the "ceiling" is the
 * consumer's own read pattern (default 0: read every message as it comes).
 *
 * --rcvbuf BYTES: set the replication socket's receive buffer (SO_RCVBUF;
 * default: the kernel's autotuning), to study how the walsender's cost per
 * message depends on whether its sends find the TCP window open.
 * --rcvlowat BYTES: wake only when this much is waiting (SO_RCVLOWAT; poll
 * still returns at the status interval), for the same study
 * (docs/performance-history.md, "What decides the drain's mode").
 *
 * --probe: for every transaction carrying a logical message with prefix
 * "probe", print "<message content> <CLOCK_MONOTONIC ns>" when its Commit
 * arrives (the stream's own COMMIT-to-consumer latency, bench/run's
 * baseline for walbust's COMMIT-to-key-gone latency).
 *
 * Exit status: 0 when --until was reached, 1 on error or timeout.
 */
#include <errno.h>
#include <libpq-fe.h>
#include <poll.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>

typedef struct Bare {
    PGconn *conn;
    uint64_t until;
    uint64_t received;
    uint64_t messages, changes, commits, bytes;
    double start, last_commit;
    double last_status;
    double status_interval;
    double pace_us, last_read; /* --pace-us; when the socket was last read */
    int rcvbuf;                /* --rcvbuf, 0: autotuned */
    int rcvlowat;              /* --rcvlowat, 0: the kernel's (1 byte) */
    bool probe;
    char probe_id[64]; /* content of a "probe" message in this transaction */
} Bare;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static uint64_t get_u64(const char *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = (v << 8) | (unsigned char)p[i];
    return v;
}

static void put_u64(char *p, uint64_t v)
{
    for (int i = 7; i >= 0; i--) {
        p[i] = (char)(v & 0xff);
        v >>= 8;
    }
}

static int parse_lsn(const char *s, uint64_t *out)
{
    unsigned hi, lo;
    if (sscanf(s, "%X/%X", &hi, &lo) != 2)
        return -1;
    *out = (uint64_t)hi << 32 | lo;
    return 0;
}

/* Standby status update confirming everything received. */
static int send_status(Bare *b)
{
    char buf[34];
    buf[0] = 'r';
    put_u64(buf + 1, b->received);
    put_u64(buf + 9, b->received);
    put_u64(buf + 17, b->received);
    put_u64(buf + 25, 0);
    buf[33] = 0;
    if (PQputCopyData(b->conn, buf, sizeof buf) <= 0 || PQflush(b->conn) != 0)
        return -1;
    b->last_status = now_s();
    return 0;
}

/* One CopyData message. Returns 1 when --until was reached. */
static int handle(Bare *b, const char *m, int len)
{
    if (m[0] == 'k' && len >= 18) {
        /* Everything before the server's sent position was discarded. */
        if (get_u64(m + 1) > b->received)
            b->received = get_u64(m + 1);
        if (m[17] && send_status(b) < 0)
            return -1;
        return 0;
    }
    if (m[0] != 'w' || len < 26)
        return 0;
    b->messages++;
    b->bytes += (uint64_t)len - 25;
    switch (m[25]) {
    case 'M': {
        /* 'M', flags, lsn (8), prefix\0, Int32 length, content */
        const char *pfx = m + 35, *p = m + 41;
        if (b->probe && len >= 45 && memcmp(pfx, "probe", 6) == 0) {
            uint32_t n = ((uint32_t)(unsigned char)p[0] << 24) |
                         ((uint32_t)(unsigned char)p[1] << 16) |
                         ((uint32_t)(unsigned char)p[2] << 8) | (unsigned char)p[3];
            if (n < sizeof b->probe_id && (size_t)n <= (size_t)len - 45) {
                memcpy(b->probe_id, p + 4, n);
                b->probe_id[n] = '\0';
            }
        }
        break;
    }
    case 'I':
    case 'U':
    case 'D':
        b->changes++;
        break;
    case 'C':
        b->commits++;
        if (len >= 25 + 1 + 1 + 8 + 8) {
            uint64_t end = get_u64(m + 25 + 1 + 1 + 8);
            if (end > b->received)
                b->received = end;
            b->last_commit = now_s();
            if (b->probe_id[0] != '\0') {
                struct timespec ts;
                clock_gettime(CLOCK_MONOTONIC, &ts);
                printf("%s %lld\n", b->probe_id, (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec);
                fflush(stdout);
                b->probe_id[0] = '\0';
            }
            if (end > b->until)
                return 1;
        }
        break;
    default:
        break;
    }
    return 0;
}

static int stream(Bare *b, double timeout)
{
    for (;;) {
        char *buf = NULL;
        int len = PQgetCopyData(b->conn, &buf, 1);
        if (len > 0) {
            int rc = handle(b, buf, len);
            PQfreemem(buf);
            if (rc != 0)
                return rc > 0 ? 0 : -1;
            continue;
        }
        if (len < 0) {
            fprintf(stderr, "bare_consumer: stream ended: %s", PQerrorMessage(b->conn));
            return -1;
        }
        if (now_s() - b->start > timeout) {
            fprintf(stderr, "bare_consumer: timed out\n");
            return -1;
        }
        if (now_s() - b->last_status > b->status_interval && send_status(b) < 0)
            return -1;
        struct pollfd pfd = {.fd = PQsocket(b->conn), .events = POLLIN};
        if (poll(&pfd, 1, (int)(b->status_interval * 1000) + 1) < 0 && errno != EINTR)
            return -1;
        if (b->pace_us > 0) {
            double since_us = (now_s() - b->last_read) * 1e6;
            if (since_us >= 0 && since_us < b->pace_us) {
                struct timespec ts = {0, (long)((b->pace_us - since_us) * 1000)};
                nanosleep(&ts, NULL);
            }
            b->last_read = now_s();
        }
        if (PQconsumeInput(b->conn) == 0) {
            fprintf(stderr, "bare_consumer: %s", PQerrorMessage(b->conn));
            return -1;
        }
    }
}

int main(int argc, char **argv)
{
    const char *pg = "", *slot = NULL, *pub = NULL, *until = NULL;
    bool binary = false;
    double timeout = 3600;
    Bare b = {.status_interval = 1.0};
    char sql[512];

    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--binary") == 0) {
            binary = true;
            continue;
        }
        if (strcmp(a, "--probe") == 0) {
            b.probe = true;
            continue;
        }
        if (v == NULL) {
            fprintf(stderr, "bare_consumer: %s needs a value\n", a);
            return 1;
        }
        if (strcmp(a, "--pg") == 0)
            pg = v;
        else if (strcmp(a, "--slot") == 0)
            slot = v;
        else if (strcmp(a, "--publication") == 0)
            pub = v;
        else if (strcmp(a, "--until") == 0)
            until = v;
        else if (strcmp(a, "--timeout") == 0)
            timeout = atof(v);
        else if (strcmp(a, "--status-ms") == 0)
            b.status_interval = atof(v) / 1000.0;
        else if (strcmp(a, "--pace-us") == 0)
            b.pace_us = atof(v);
        else if (strcmp(a, "--rcvbuf") == 0)
            b.rcvbuf = atoi(v);
        else if (strcmp(a, "--rcvlowat") == 0)
            b.rcvlowat = atoi(v);
        else {
            fprintf(stderr, "bare_consumer: unknown option %s\n", a);
            return 1;
        }
        i++;
    }
    if (slot == NULL || pub == NULL || until == NULL || parse_lsn(until, &b.until) < 0) {
        fprintf(stderr, "usage: bare_consumer --pg C --slot S --publication P --until X/X "
                        "[--binary] [--timeout S] [--status-ms MS] [--pace-us N] [--rcvbuf B] "
                        "[--rcvlowat B]\n");
        return 1;
    }
    {
        const char *keys[] = {"dbname", "replication", "fallback_application_name", NULL};
        const char *vals[] = {pg, "database", "bare_consumer", NULL};
        b.conn = PQconnectdbParams(keys, vals, 1);
    }
    if (PQstatus(b.conn) != CONNECTION_OK) {
        fprintf(stderr, "bare_consumer: %s", PQerrorMessage(b.conn));
        return 1;
    }
    if (b.rcvbuf > 0 &&
        setsockopt(PQsocket(b.conn), SOL_SOCKET, SO_RCVBUF, &b.rcvbuf, sizeof b.rcvbuf) != 0) {
        perror("bare_consumer: SO_RCVBUF");
        return 1;
    }
    if (b.rcvlowat > 0 && setsockopt(PQsocket(b.conn), SOL_SOCKET, SO_RCVLOWAT, &b.rcvlowat,
                                     sizeof b.rcvlowat) != 0) {
        perror("bare_consumer: SO_RCVLOWAT");
        return 1;
    }
    snprintf(sql, sizeof sql,
             "START_REPLICATION SLOT \"%s\" LOGICAL 0/0 (proto_version '2', "
             "publication_names '\"%s\"', messages 'true'%s)",
             slot, pub, binary ? ", binary 'true'" : "");
    b.start = b.last_status = now_s();
    PGresult *res = PQexec(b.conn, sql);
    if (PQresultStatus(res) != PGRES_COPY_BOTH) {
        fprintf(stderr, "bare_consumer: %s", PQerrorMessage(b.conn));
        return 1;
    }
    PQclear(res);
    int rc = stream(&b, timeout);
    if (rc == 0)
        (void)send_status(&b);
    /* Its own CPU: the floor for a consumer's CPU per change (bench/run). */
    struct rusage ru;
    (void)getrusage(RUSAGE_SELF, &ru);
    printf("{\"seconds\":%.6f,\"messages\":%llu,\"changes\":%llu,\"commits\":%llu,"
           "\"bytes\":%llu,\"cpu_user\":%.6f,\"cpu_sys\":%.6f}\n",
           b.last_commit - b.start, (unsigned long long)b.messages, (unsigned long long)b.changes,
           (unsigned long long)b.commits, (unsigned long long)b.bytes,
           (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6,
           (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6);
    PQfinish(b.conn);
    return rc == 0 ? 0 : 1;
}
