/*
 * runtime.h — what the long-running commands share: signal flags, capped
 * exponential backoff with jitter, and connecting the replication stream
 * with retries (unreachable server: retry; slot busy: stand by).
 */
#ifndef WALBUST_RUNTIME_H
#define WALBUST_RUNTIME_H

#include <signal.h>
#include <stdbool.h>
#include <stdint.h>

#include "lsn.h"
#include "stream.h"

extern volatile sig_atomic_t runtime_stop;   /* SIGTERM / SIGINT */
extern volatile sig_atomic_t runtime_reload; /* SIGHUP */

/* Install handlers that only set the flags above; ignore SIGPIPE. A stop
 * request also ends connection attempts (stream_cancel_on). */
void runtime_signals(void);

typedef struct Backoff {
    int attempt;
    int base_ms; /* first delay; default 100 */
    int cap_ms;  /* largest delay; default 30000 */
} Backoff;

/* The next delay: min(cap, base * 2^attempt), jittered to [d/2, d]. */
int backoff_next(Backoff *b);
void backoff_reset(Backoff *b);

/* Sleep ms in slices, returning early when runtime_stop is set. Between
 * slices, calls tick(arg) when not NULL. */
void runtime_sleep(int ms, void (*tick)(void *), void *arg);

/* Hook run on the connection after the start-up checks and before
 * START_REPLICATION (e.g. the rules' catalog check). Returns 0 to go on,
 * -1 to stop with a fatal error (already logged). */
typedef int (*RuntimeCheckFn)(void *arg, PGconn *conn);

/* What runtime_open_stream() is doing, for a caller that reports it (the
 * metrics' role gauge). detail: the server's message, or NULL. */
typedef enum RuntimeState {
    RUNTIME_CONNECTING, /* connecting, or waiting to retry after detail */
    RUNTIME_STANDBY,    /* the slot is active in another process (detail says which) */
    RUNTIME_STREAMING,  /* streaming */
} RuntimeState;

typedef void (*RuntimeStateFn)(void *arg, RuntimeState state, const char *detail);

/* Have runtime_open_stream() call fn(arg, ...) on each attempt's outcome
 * (standing by: about once a second); fn = NULL stops it. */
void runtime_on_state(RuntimeStateFn fn, void *arg);

/* Hook run after stream_connect() returned STREAM_OK, STREAM_MISSING or
 * STREAM_LOST, before the check above: decides what the slot's state
 * (stream_slot()) means, and may create the slot (stream_create_slot()).
 * Returns 0 to go on (the slot exists), 1 to retry with backoff (logged),
 * -2 when the slot is lost (logged), -1 on another fatal error (logged). */
typedef int (*RuntimeSlotFn)(void *arg, Stream *s, StreamStatus st);

/* Connect and start streaming from start_lsn, retrying transient errors
 * with backoff and standing by while the slot is active elsewhere. Without
 * a slot hook, a missing slot is fatal. Returns 0 when streaming, -2 when
 * the slot is lost (logged), -1 on another fatal error (logged) or when
 * runtime_stop was set. */
int runtime_open_stream(Stream *s, uint64_t start_lsn, RuntimeSlotFn slot, RuntimeCheckFn check,
                        void *arg);

/* Monotonic clock in microseconds. */
int64_t runtime_now_us(void);

/* The calling thread's scheduler counters (/proc/thread-self/schedstat):
 * total time spent runnable but waiting for a CPU (ns) and the number of
 * times it was given one. false when the kernel does not report them. */
bool runtime_sched_wait(uint64_t *delay_ns, uint64_t *slices);

/* The host's cumulative CPU time from /proc/stat's first line, in ticks:
 * not idle (user, nice, system, irq, softirq, steal) and in all (those plus
 * idle and iowait). False when it cannot be read. */
bool runtime_host_cpu(uint64_t *busy, uint64_t *total);

/* Let the calling thread's short sleeps (the flush interval's 0.2 ms, the
 * visibility check's 50 µs) end when asked: Linux lets a timer fire up to
 * its thread's "timer slack" late, 50 µs by default, a quarter of a 0.2 ms
 * hold. Sets it to 1 µs (PR_SET_TIMERSLACK); false when refused. */
bool runtime_precise_sleeps(void);

/* The process's nice value (*base) and whether a thread that yields it
 * (nice 0) may return to it: prio_can_return() on RLIMIT_NICE and on
 * CAP_SYS_NICE in /proc/self/status. False when the nice value cannot be
 * read. */
bool runtime_nice_probe(int *base, bool *can_return);

/* Set the calling thread's nice value (setpriority on its thread id).
 * Returns 0, or -1 with errno set. */
int runtime_thread_nice(int nice);

#endif
