/*
 * runtime.c — signals, backoff and stream (re)connection (see runtime.h).
 */
#include "runtime.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "log.h"
#include "notify.h"
#include "prio.h"

volatile sig_atomic_t runtime_stop = 0;
volatile sig_atomic_t runtime_reload = 0;

static RuntimeStateFn state_fn;
static void *state_arg;

void runtime_on_state(RuntimeStateFn fn, void *arg)
{
    state_fn = fn;
    state_arg = arg;
}

static void report_state(RuntimeState state, const char *detail)
{
    if (state_fn != NULL)
        state_fn(state_arg, state, detail);
}

static void on_stop(int sig)
{
    (void)sig;
    runtime_stop = 1;
}

static void on_hup(int sig)
{
    (void)sig;
    runtime_reload = 1;
}

void runtime_signals(void)
{
    struct sigaction sa;

    memset(&sa, 0, sizeof sa);
    sigemptyset(&sa.sa_mask);
    sa.sa_handler = on_stop;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sa.sa_handler = on_hup;
    sigaction(SIGHUP, &sa, NULL);
    sa.sa_handler = SIG_IGN;
    sigaction(SIGPIPE, &sa, NULL);
    stream_cancel_on(&runtime_stop); /* a stop also ends a connection attempt */
}

int64_t runtime_now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* The first cap - 1 bytes of a /proc file, NUL-terminated; false when it
 * cannot be read or is empty. */
static bool read_head(const char *path, char *buf, size_t cap)
{
    ssize_t len;
    int fd = open(path, O_RDONLY | O_CLOEXEC);

    if (fd < 0)
        return false;
    len = read(fd, buf, cap - 1);
    close(fd);
    if (len <= 0)
        return false;
    buf[len] = '\0';
    return true;
}

bool runtime_sched_wait(uint64_t *delay_ns, uint64_t *slices)
{
    char buf[128];
    unsigned long long run_ns, wait_ns, n;

    if (!read_head("/proc/thread-self/schedstat", buf, sizeof buf))
        return false;
    /* "<ns on a CPU> <ns waiting for one> <timeslices>" */
    if (sscanf(buf, "%llu %llu %llu", &run_ns, &wait_ns, &n) != 3)
        return false;
    *delay_ns = wait_ns;
    *slices = n;
    return true;
}

bool runtime_host_cpu(uint64_t *busy, uint64_t *total)
{
    char buf[256];
    unsigned long long v[8] = {0}; /* user nice system idle iowait irq softirq steal */

    if (!read_head("/proc/stat", buf, sizeof buf)) /* the first line is enough */
        return false;
    if (sscanf(buf, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2], &v[3],
               &v[4], &v[5], &v[6], &v[7]) < 5)
        return false;
    *busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7];
    *total = *busy + v[3] + v[4];
    return true;
}

bool runtime_precise_sleeps(void)
{
    return prctl(PR_SET_TIMERSLACK, 1000UL, 0UL, 0UL, 0UL) == 0;
}

bool runtime_nice_probe(int *base, bool *can_return)
{
    struct rlimit rl = {0, 0};
    uint64_t limit;
    char status[4096];
    bool cap;

    errno = 0;
    *base = getpriority(PRIO_PROCESS, 0);
    if (*base == -1 && errno != 0)
        return false;
    if (getrlimit(RLIMIT_NICE, &rl) != 0)
        rl.rlim_cur = 0;
    cap = read_head("/proc/self/status", status, sizeof status) && prio_capeff_sys_nice(status);
    limit = rl.rlim_cur == RLIM_INFINITY ? PRIO_RLIM_INFINITY : (uint64_t)rl.rlim_cur;
    *can_return = prio_can_return(*base, limit, cap);
    return true;
}

int runtime_thread_nice(int nice)
{
    return setpriority(PRIO_PROCESS, (id_t)gettid(), nice);
}

int backoff_next(Backoff *b)
{
    int base = b->base_ms > 0 ? b->base_ms : 100;
    int cap = b->cap_ms > 0 ? b->cap_ms : 30000;
    long d = base;
    static unsigned seed;

    if (seed == 0)
        seed = (unsigned)getpid() ^ (unsigned)runtime_now_us();
    for (int i = 0; i < b->attempt && d < cap; i++)
        d *= 2;
    if (d > cap)
        d = cap;
    if (b->attempt < 30)
        b->attempt++;
    /* Jitter keeps several instances from retrying in lock step. */
    return (int)(d / 2 + rand_r(&seed) % (d / 2 + 1));
}

void backoff_reset(Backoff *b)
{
    b->attempt = 0;
}

void runtime_sleep(int ms, void (*tick)(void *), void *arg)
{
    int64_t end = runtime_now_us() + (int64_t)ms * 1000;

    while (!runtime_stop) {
        int64_t left = (end - runtime_now_us()) / 1000;
        struct timespec ts;

        if (left <= 0)
            break;
        if (left > 200)
            left = 200;
        ts.tv_sec = 0;
        ts.tv_nsec = (long)left * 1000000;
        nanosleep(&ts, NULL);
        notify_watchdog(); /* waiting for a server is not hanging */
        if (tick != NULL)
            tick(arg);
    }
}

/* Run the slot hook on a fresh connection. Returns STREAM_OK to go on,
 * STREAM_RETRY to retry (logged), or -1/-2 through *rc to stop. */
static StreamStatus judge_slot(Stream *s, StreamStatus st, RuntimeSlotFn slot, void *arg, int *rc)
{
    int verdict;

    if (slot == NULL) {
        if (st == STREAM_OK)
            return STREAM_OK;
        log_error("%s", stream_errstr(s));
        *rc = st == STREAM_LOST ? -2 : -1;
        stream_close(s);
        return STREAM_FATAL;
    }
    verdict = slot(arg, s, st);
    if (verdict == 0)
        return STREAM_OK;
    stream_close(s);
    if (verdict == 1)
        return STREAM_RETRY;
    *rc = verdict;
    return STREAM_FATAL;
}

int runtime_open_stream(Stream *s, uint64_t start_lsn, RuntimeSlotFn slot, RuntimeCheckFn check,
                        void *arg)
{
    Backoff b = {0, 200, 10000};
    bool standby_logged = false;
    char lsn[LSN_TEXT_MAX];

    while (!runtime_stop) {
        StreamStatus st = stream_connect(s);
        int rc = -1;

        if (st == STREAM_OK || st == STREAM_MISSING || st == STREAM_LOST) {
            st = judge_slot(s, st, slot, arg, &rc);
            if (st == STREAM_FATAL)
                return rc;
            if (st == STREAM_RETRY) {
                int ms = backoff_next(&b);
                report_state(RUNTIME_CONNECTING, "waiting to verify the slot");
                notify_status("waiting to verify the slot");
                runtime_sleep(ms, NULL, NULL);
                continue;
            }
        }
        if (st == STREAM_OK && check != NULL && check(arg, stream_conn(s)) != 0) {
            stream_close(s);
            return -1;
        }
        if (st == STREAM_OK)
            st = stream_start(s, start_lsn);
        switch (st) {
        case STREAM_OK:
            report_state(RUNTIME_STREAMING, NULL);
            log_info("streaming from %s (slot position %s)", stream_describe(s),
                     lsn_format(stream_confirmed(s), lsn));
            return 0;
        case STREAM_FATAL:
        case STREAM_MISSING:
            log_error("%s", stream_errstr(s));
            stream_close(s);
            return -1;
        case STREAM_LOST:
            log_error("%s", stream_errstr(s));
            return -2;
        case STREAM_BUSY:
            if (!standby_logged) {
                log_info("standing by: %s; taking over when it is released",
                         stream_errstr(s));
                notify_status("standing by: the slot is active in another process");
            }
            standby_logged = true;
            report_state(RUNTIME_STANDBY, stream_errstr(s));
            runtime_sleep(1000, NULL, NULL);
            break;
        case STREAM_RETRY: {
            int ms = backoff_next(&b);

            if (runtime_stop)
                break; /* the attempt was cut short by the stop request */
            log_error("%s; retrying in %d ms", stream_errstr(s), ms);
            report_state(RUNTIME_CONNECTING, stream_errstr(s));
            notify_status("waiting for postgresql");
            runtime_sleep(ms, NULL, NULL);
            break;
        }
        }
    }
    return -1;
}
