/*
 * fuzz_redisurl.c — libFuzzer target for redisurl_parse(), redisurl_redact()
 * and redisurl_describe(): no crash on any input, and a password never
 * shows in a redacted URL, an error message or a description (docs/security.md:
 * "Passwords never appear in logs or errors").
 *
 * Input byte 0 picks the mode:
 *  - 1..6, structured: the rest is user \x01 password \x01 tail, assembled as
 *    <scheme>user:password@tail with the scheme redis://, unix://,
 *    redis+cluster://, rediss://, redis+sentinel:// or rediss+cluster://. The same URL is built again with a twin password
 *    of the same shape (every letter and non-zero digit replaced by
 *    another of its class, so percent-escapes stay valid, invalid or %00
 *    exactly as before). Parsing and redacting both must give identical
 *    results — outcome, error text, redaction, description, host, port,
 *    db, user — and only the decoded passwords may differ: any
 *    password-dependent byte in the output would be a leak.
 *  - anything else, raw: the rest (up to a NUL) is the URL.
 * In both modes: the error text is NUL-terminated and non-empty on failure,
 * a parsed password is redacted (the redaction contains "***"), and a
 * redaction into a short buffer is a NUL-terminated prefix of the full one.
 */
#include "redisurl.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHECK(cond, ...)                                                                           \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "fuzz_redisurl: property failed: %s: ", #cond);                       \
            fprintf(stderr, __VA_ARGS__);                                                          \
            fputc('\n', stderr);                                                                   \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

#define URL_MAX 2048

typedef struct Outcome {
    int rc;
    RedisUrl u;
    char err[512];
    char red[URL_MAX * 2];
    char desc[1100];
} Outcome;

/* Parse, redact and describe url, checking what holds for any URL. */
static void outcome(const char *url, size_t small, Outcome *o)
{
    char tiny[64];

    memset(o, 0, sizeof *o);
    o->rc = redisurl_parse(url, &o->u, o->err, sizeof o->err);
    CHECK(o->rc == 0 || o->rc == -1, "rc %d", o->rc);
    CHECK(memchr(o->err, '\0', sizeof o->err) != NULL, "unterminated error");
    CHECK(o->rc == 0 || o->err[0] != '\0', "failure without a message for \"%s\"", url);
    redisurl_redact(url, o->red, sizeof o->red);
    CHECK(strlen(o->red) < sizeof o->red, "redaction overflow");
    if (o->rc == 0) {
        redisurl_describe(&o->u, o->desc, sizeof o->desc);
        CHECK(o->u.port >= 1 && o->u.port <= 65535, "port %d", o->u.port);
        CHECK(o->u.db >= 0, "db %d", o->u.db);
        CHECK(!o->u.has_password || strstr(o->red, "***") != NULL,
              "password parsed but not redacted: \"%s\"", o->red);
    }
    /* A short buffer gets a truncated, NUL-terminated prefix. */
    small = 1 + small % sizeof tiny;
    memset(tiny, 'Z', sizeof tiny);
    redisurl_redact(url, tiny, small);
    CHECK(memchr(tiny, '\0', small) != NULL, "no NUL within %zu bytes", small);
    CHECK(strncmp(tiny, o->red, strlen(tiny)) == 0 && strlen(tiny) == strnlen(o->red, small - 1),
          "short redaction \"%s\" is not a prefix of \"%s\"", tiny, o->red);
}

/* Same class, other character: a..f, A..F, 1..9 and the other letters
 * rotate within their groups; '0' and everything else stay. */
static char twin_char(char c)
{
    if (c >= 'a' && c <= 'f')
        return c == 'f' ? 'a' : (char)(c + 1);
    if (c >= 'A' && c <= 'F')
        return c == 'F' ? 'A' : (char)(c + 1);
    if (c >= 'g' && c <= 'z')
        return c == 'z' ? 'g' : (char)(c + 1);
    if (c >= 'G' && c <= 'Z')
        return c == 'Z' ? 'G' : (char)(c + 1);
    if (c >= '1' && c <= '9')
        return c == '9' ? '1' : (char)(c + 1);
    return c;
}

static void check_twins(const Outcome *a, const Outcome *b)
{
    CHECK(a->rc == b->rc, "outcome depends on the password: %d vs %d (%s | %s)", a->rc, b->rc,
          a->err, b->err);
    CHECK(strcmp(a->err, b->err) == 0, "error text depends on the password:\n  %s\n  %s", a->err,
          b->err);
    CHECK(strcmp(a->red, b->red) == 0, "redaction depends on the password:\n  %s\n  %s", a->red,
          b->red);
    if (a->rc != 0)
        return;
    CHECK(strcmp(a->desc, b->desc) == 0, "description depends on the password");
    CHECK(a->u.kind == b->u.kind && a->u.port == b->u.port && a->u.db == b->u.db &&
              a->u.has_password == b->u.has_password && strcmp(a->u.host, b->u.host) == 0 &&
              strcmp(a->u.path, b->u.path) == 0 && strcmp(a->u.user, b->u.user) == 0 &&
              strcmp(a->u.seeds, b->u.seeds) == 0 && a->u.tls == b->u.tls &&
              a->u.replicas == b->u.replicas && strcmp(a->u.cacert, b->u.cacert) == 0 &&
              strcmp(a->u.master_name, b->u.master_name) == 0 &&
              strcmp(a->u.sentinel_password, b->u.sentinel_password) == 0,
          "parsed fields other than the password depend on it");
}

static void structured(uint8_t mode, const char *rest, size_t n, size_t small)
{
    static const char *const schemes[] = {"redis://",  "unix://",          "redis+cluster://",
                                          "rediss://", "redis+sentinel://", "rediss+cluster://"};
    const char *scheme = schemes[(mode - 1) % 6];
    const char *s1 = memchr(rest, '\x01', n), *s2;
    char url[URL_MAX], twin[URL_MAX];
    size_t ulen, plen, tlen, off;
    Outcome *a, *b;

    if (s1 == NULL || (s2 = memchr(s1 + 1, '\x01', n - (size_t)(s1 + 1 - rest))) == NULL)
        return;
    ulen = (size_t)(s1 - rest);
    plen = (size_t)(s2 - s1 - 1);
    tlen = n - (size_t)(s2 + 1 - rest);
    if (strlen(scheme) + ulen + plen + tlen + 3 > URL_MAX)
        return;
    off = (size_t)snprintf(url, sizeof url, "%s%.*s:", scheme, (int)ulen, rest);
    memcpy(url + off, s1 + 1, plen);
    url[off + plen] = '@';
    memcpy(url + off + plen + 1, s2 + 1, tlen);
    url[off + plen + 1 + tlen] = '\0';
    if (strlen(url) != off + plen + 1 + tlen)
        return; /* a NUL inside: not a URL anyone can pass */
    /* Not a userinfo in a unix URL: an unescaped "@/" in it is ambiguous
     * (RFC 3986 wants '@' percent-encoded there; the parser ends the
     * userinfo at the last "@/"), and "unix:///..." is a socket path. */
    if (strcmp(scheme, "unix://") == 0 && (memmem(url, off + plen, "@/", 2) != NULL || (ulen > 0 && rest[0] == '/')))
        return;
    memcpy(twin, url, sizeof twin);
    for (size_t i = off; i < off + plen; i++)
        twin[i] = twin_char(url[i]);
    a = malloc(sizeof *a);
    b = malloc(sizeof *b);
    CHECK(a != NULL && b != NULL, "out of memory");
    outcome(url, small, a);
    outcome(twin, small, b);
    check_twins(a, b);
    free(a);
    free(b);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *url;
    Outcome *o;

    if (size < 2 || size > URL_MAX)
        return 0;
    if (data[0] >= 1 && data[0] <= 6) {
        structured(data[0], (const char *)data + 1, size - 1, data[size - 1]);
        return 0;
    }
    url = malloc(size);
    o = malloc(sizeof *o);
    CHECK(url != NULL && o != NULL, "out of memory");
    memcpy(url, data + 1, size - 1);
    url[size - 1] = '\0';
    outcome(url, data[0], o);
    free(o);
    free(url);
    return 0;
}
