/*
 * Unit tests for notify.c against a test-owned NOTIFY_SOCKET: an AF_UNIX
 * datagram socket in a temporary directory stands in for systemd, and each
 * test reads back exactly the datagrams the module sent.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "notify.h"

typedef struct Fixture {
    char dir[64];
    char path[128];
    int fd;
} Fixture;

static int setup(void **state)
{
    Fixture *f = calloc(1, sizeof *f);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    struct timeval tv = {2, 0};

    if (f == NULL)
        return -1;
    snprintf(f->dir, sizeof f->dir, "/tmp/walbust-notify.XXXXXX");
    if (mkdtemp(f->dir) == NULL)
        return -1;
    snprintf(f->path, sizeof f->path, "%s/notify.sock", f->dir);
    snprintf(sa.sun_path, sizeof sa.sun_path, "%s", f->path);
    f->fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (f->fd < 0 || bind(f->fd, (struct sockaddr *)&sa, sizeof sa) != 0)
        return -1;
    setsockopt(f->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setenv("NOTIFY_SOCKET", f->path, 1);
    unsetenv("WATCHDOG_USEC");
    unsetenv("WATCHDOG_PID");
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    Fixture *f = *state;
    unsetenv("NOTIFY_SOCKET");
    unsetenv("WATCHDOG_USEC");
    unsetenv("WATCHDOG_PID");
    close(f->fd);
    unlink(f->path);
    rmdir(f->dir);
    free(f);
    return 0;
}

/* The next datagram as a string. sd_notify sends synchronously, so after a
 * notify_* call returns its datagram is already queued. */
static void expect_datagram(Fixture *f, const char *want)
{
    char buf[1024];
    ssize_t n = recv(f->fd, buf, sizeof buf - 1, MSG_DONTWAIT);
    if (n < 0)
        fail_msg("expected datagram \"%s\", got none (%s)", want, strerror(errno));
    buf[n] = '\0';
    assert_string_equal(buf, want);
}

static void expect_nothing(Fixture *f)
{
    char buf[1024];
    ssize_t n = recv(f->fd, buf, sizeof buf - 1, MSG_DONTWAIT);
    if (n >= 0) {
        buf[n] = '\0';
        fail_msg("unexpected datagram \"%s\"", buf);
    }
    assert_true(errno == EAGAIN || errno == EWOULDBLOCK);
}

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

static void test_ready_status_stopping(void **state)
{
    Fixture *f = *state;

    notify_ready("streaming from slot walbust at 0/16B3748");
    expect_datagram(f, "READY=1\nSTATUS=streaming from slot walbust at 0/16B3748");
    notify_status("redis down, retrying");
    expect_datagram(f, "STATUS=redis down, retrying");
    notify_stopping();
    expect_datagram(f, "STOPPING=1");
    expect_nothing(f);
}

/* A newline in a status would start a new assignment: it is flattened. */
static void test_status_one_line(void **state)
{
    Fixture *f = *state;

    notify_status("line one\nWATCHDOG=1\r\nthree");
    expect_datagram(f, "STATUS=line one WATCHDOG=1  three");
    notify_ready(NULL);
    expect_datagram(f, "READY=1\nSTATUS=");
}

static void test_watchdog(void **state)
{
    Fixture *f = *state;
    char pid[32];

    /* No WATCHDOG_USEC: the watchdog is off, nothing is sent. */
    notify_watchdog();
    expect_nothing(f);

    /* Enabled for us: a ping at once, then at most one per half interval. */
    snprintf(pid, sizeof pid, "%ld", (long)getpid());
    setenv("WATCHDOG_USEC", "400000", 1);
    setenv("WATCHDOG_PID", pid, 1);
    notify_watchdog();
    expect_datagram(f, "WATCHDOG=1");
    notify_watchdog();
    notify_watchdog();
    expect_nothing(f);
    sleep_ms(250); /* past half of 400 ms */
    notify_watchdog();
    expect_datagram(f, "WATCHDOG=1");
    notify_watchdog();
    expect_nothing(f);

    /* WATCHDOG_PID names another process: not ours to ping. */
    snprintf(pid, sizeof pid, "%ld", (long)getpid() + 1);
    setenv("WATCHDOG_PID", pid, 1);
    sleep_ms(250);
    notify_watchdog();
    expect_nothing(f);

    /* No WATCHDOG_PID at all: the interval applies to whoever reads it. */
    unsetenv("WATCHDOG_PID");
    notify_watchdog();
    expect_datagram(f, "WATCHDOG=1");
}

/* Not started by systemd: every call is a harmless no-op. */
static void test_no_socket(void **state)
{
    Fixture *f = *state;
    char pid[32];

    unsetenv("NOTIFY_SOCKET");
    snprintf(pid, sizeof pid, "%ld", (long)getpid());
    setenv("WATCHDOG_USEC", "1000", 1);
    setenv("WATCHDOG_PID", pid, 1);
    notify_ready("x");
    notify_status("x");
    notify_watchdog();
    notify_stopping();
    expect_nothing(f);

    /* And it picks the socket up when it appears (nothing is cached). */
    setenv("NOTIFY_SOCKET", f->path, 1);
    notify_stopping();
    expect_datagram(f, "STOPPING=1");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_ready_status_stopping, setup, teardown),
        cmocka_unit_test_setup_teardown(test_status_one_line, setup, teardown),
        cmocka_unit_test_setup_teardown(test_watchdog, setup, teardown),
        cmocka_unit_test_setup_teardown(test_no_socket, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
