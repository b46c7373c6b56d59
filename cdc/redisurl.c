/*
 * redisurl.c — parse and redact Redis target URLs (see redisurl.h).
 *
 * The grammar is small enough for a hand-written scanner over (pointer,
 * length) spans: scheme, optional userinfo, then a kind-specific tail
 * (host[:port][/db], /socket/path[?db=N], or a comma-separated seed list).
 * Every error message quotes the URL through redisurl_redact(), and no
 * message ever quotes the userinfo, so a password cannot leak through an
 * error. Pure: no I/O, no allocation.
 */
#include "redisurl.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#define REDISURL_DEFAULT_PORT 6379

typedef struct Span {
    const char *p;
    size_t n;
} Span;

typedef struct SchemeEntry {
    const char *prefix;
    RedisUrlKind kind;
} SchemeEntry;

static const SchemeEntry schemes[] = {
    {"redis://", REDISURL_TCP},
    {"unix://", REDISURL_UNIX},
    {"redis+cluster://", REDISURL_CLUSTER},
};

/* Write `invalid redis URL "<redacted>": <reason>` into err. Returns -1. */
static int fail(const char *url, char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static int fail(const char *url, char *err, size_t errlen, const char *fmt, ...)
{
    char red[512];
    char reason[256];
    va_list ap;

    if (err == NULL || errlen == 0)
        return -1;
    va_start(ap, fmt);
    vsnprintf(reason, sizeof reason, fmt, ap);
    va_end(ap);
    redisurl_redact(url, red, sizeof red);
    snprintf(err, errlen, "invalid redis URL \"%s\": %s", red, reason);
    return -1;
}

/* Where the userinfo ends ('@'), or NULL when there is none. rest is the
 * text after "scheme://". For unix URLs the userinfo must be followed by the
 * absolute socket path, so the last "@/" ends it; otherwise the last '@'
 * (the host, port and db cannot contain one). Choosing the last occurrence
 * errs towards redacting too much rather than too little. */
static const char *userinfo_end(const char *rest, bool is_unix)
{
    const char *at = NULL;

    if (is_unix) {
        if (rest[0] == '/')
            return NULL;
        for (const char *p = strstr(rest, "@/"); p != NULL; p = strstr(p + 1, "@/"))
            at = p;
        return at;
    }
    return strrchr(rest, '@');
}

char *redisurl_redact(const char *url, char *buf, size_t buflen)
{
    const char *rest, *sep, *at, *colon;
    bool is_unix;

    if (buf == NULL || buflen == 0)
        return buf;
    if (url == NULL) {
        buf[0] = '\0';
        return buf;
    }
    sep = strstr(url, "://");
    rest = sep != NULL ? sep + 3 : url;
    is_unix = sep != NULL && (size_t)(sep - url) == 4 && strncmp(url, "unix", 4) == 0;
    at = userinfo_end(rest, is_unix);
    /* "unix://user:pw@relative.sock" is invalid (no "@/"), yet its error
     * message quotes it: redact up to the last '@' there too. */
    if (at == NULL && is_unix && rest[0] != '/')
        at = strrchr(rest, '@');
    if (at == NULL) {
        snprintf(buf, buflen, "%s", url);
        return buf;
    }
    /* Keep "user:" when there is a colon; a bare userinfo may be a password. */
    colon = memchr(rest, ':', (size_t)(at - rest));
    if (colon != NULL)
        snprintf(buf, buflen, "%.*s***%s", (int)(colon + 1 - url), url, at);
    else
        snprintf(buf, buflen, "%.*s***%s", (int)(rest - url), url, at);
    return buf;
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Percent-decode s into out (outlen bytes, NUL-terminated). Returns 0, -1
 * on a bad or NUL escape, -2 when the result does not fit. */
static int pct_decode(Span s, char *out, size_t outlen)
{
    size_t o = 0;

    for (size_t i = 0; i < s.n; i++) {
        char c = s.p[i];
        if (c == '%') {
            int hi, lo;
            if (i + 2 >= s.n)
                return -1;
            hi = hexval(s.p[i + 1]);
            lo = hexval(s.p[i + 2]);
            if (hi < 0 || lo < 0 || (hi == 0 && lo == 0))
                return -1;
            c = (char)(hi * 16 + lo);
            i += 2;
        }
        if (o + 1 >= outlen)
            return -2;
        out[o++] = c;
    }
    out[o] = '\0';
    return 0;
}

/* Parse decimal digits s as an int in [lo, hi]. */
static bool parse_int(Span s, long lo, long hi, int *out)
{
    long v = 0;

    if (s.n == 0 || s.n > 10)
        return false;
    for (size_t i = 0; i < s.n; i++) {
        if (s.p[i] < '0' || s.p[i] > '9')
            return false;
        v = v * 10 + (s.p[i] - '0');
    }
    if (v < lo || v > hi)
        return false;
    *out = (int)v;
    return true;
}

static int parse_userinfo(const char *url, Span ui, RedisUrl *out, char *err, size_t errlen)
{
    const char *colon = memchr(ui.p, ':', ui.n);
    Span user, pass;
    int rc;

    if (colon == NULL)
        return fail(url, err, errlen,
                    "user information without a password; write user:password@ "
                    "(or :password@ for the default user)");
    user = (Span){ui.p, (size_t)(colon - ui.p)};
    pass = (Span){colon + 1, ui.n - user.n - 1};
    rc = pct_decode(user, out->user, sizeof out->user);
    if (rc == -1)
        return fail(url, err, errlen, "bad percent-escape in the user name");
    if (rc == -2)
        return fail(url, err, errlen, "user name longer than %zu bytes", sizeof out->user - 1);
    rc = pct_decode(pass, out->password, sizeof out->password);
    if (rc == -1)
        return fail(url, err, errlen, "bad percent-escape in the password");
    if (rc == -2)
        return fail(url, err, errlen, "password longer than %zu bytes", sizeof out->password - 1);
    out->has_password = true;
    return 0;
}

static bool host_char(char c, bool ipv6)
{
    if (ipv6)
        return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F') ||
               c == ':' || c == '.';
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9'))
        return true;
    return c == '.' || c == '-' || c == '_';
}

/* Parse "host[:port]" or "[v6][:port]" at the start of s, stopping at any
 * byte in `stops`. Writes the unbracketed host and port; *used gets the
 * number of bytes consumed. */
static int parse_hostport(const char *url, Span s, const char *stops, char *host, size_t hostlen,
                          int *port, size_t *used, char *err, size_t errlen)
{
    size_t i = 0, hstart, hend;
    bool v6 = s.n > 0 && s.p[0] == '[';

    if (v6) {
        const char *close = memchr(s.p, ']', s.n);
        if (close == NULL)
            return fail(url, err, errlen, "unterminated IPv6 address (missing ']')");
        hstart = 1;
        hend = (size_t)(close - s.p);
        i = hend + 1;
    } else {
        hstart = 0;
        while (i < s.n && s.p[i] != ':' && strchr(stops, s.p[i]) == NULL)
            i++;
        hend = i;
    }
    if (hend == hstart)
        return fail(url, err, errlen, "missing host");
    for (size_t k = hstart; k < hend; k++)
        if (!host_char(s.p[k], v6))
            return fail(url, err, errlen, "bad character '%c' in host \"%.*s\"", s.p[k],
                        (int)(hend - hstart), s.p + hstart);
    if (hend - hstart >= hostlen)
        return fail(url, err, errlen, "host longer than %zu bytes", hostlen - 1);
    memcpy(host, s.p + hstart, hend - hstart);
    host[hend - hstart] = '\0';
    *port = REDISURL_DEFAULT_PORT;
    if (i < s.n && s.p[i] == ':') {
        size_t pstart = ++i;
        while (i < s.n && strchr(stops, s.p[i]) == NULL)
            i++;
        Span ps = {s.p + pstart, i - pstart};
        if (!parse_int(ps, 1, 65535, port))
            return fail(url, err, errlen, "bad port \"%.*s\" (want a number from 1 to 65535)",
                        (int)ps.n, ps.p);
    } else if (i < s.n && strchr(stops, s.p[i]) == NULL) {
        return fail(url, err, errlen, "unexpected \"%.*s\" after the host", (int)(s.n - i),
                    s.p + i);
    }
    *used = i;
    return 0;
}

/* "/N" or "/" or "": the database number. */
static int parse_db_path(const char *url, Span s, int *db, char *err, size_t errlen)
{
    *db = 0;
    if (s.n == 0)
        return 0;
    if (s.p[0] != '/')
        return fail(url, err, errlen, "unexpected \"%.*s\" after the port", (int)s.n, s.p);
    s.p++;
    s.n--;
    if (s.n == 0)
        return 0;
    if (!parse_int(s, 0, 2147483647, db))
        return fail(url, err, errlen,
                    "bad database \"%.*s\" (want /N with N a non-negative number)", (int)s.n, s.p);
    return 0;
}

static int parse_tcp(const char *url, Span s, RedisUrl *out, char *err, size_t errlen)
{
    size_t used;

    if (parse_hostport(url, s, "/", out->host, sizeof out->host, &out->port, &used, err, errlen) <
        0)
        return -1;
    return parse_db_path(url, (Span){s.p + used, s.n - used}, &out->db, err, errlen);
}

static int parse_unix(const char *url, Span s, RedisUrl *out, char *err, size_t errlen)
{
    const char *q = memchr(s.p, '?', s.n);
    size_t plen = q != NULL ? (size_t)(q - s.p) : s.n;

    if (plen == 0 || s.p[0] != '/')
        return fail(url, err, errlen,
                    "unix:// needs an absolute socket path "
                    "(unix:///run/redis.sock)");
    if (plen == 1)
        return fail(url, err, errlen, "missing socket path");
    if (plen >= sizeof out->path)
        return fail(url, err, errlen, "socket path longer than %zu bytes", sizeof out->path - 1);
    memcpy(out->path, s.p, plen);
    out->path[plen] = '\0';
    out->db = 0;
    if (q == NULL)
        return 0;
    Span qs = {q + 1, s.n - plen - 1};
    if (qs.n < 3 || strncmp(qs.p, "db=", 3) != 0)
        return fail(url, err, errlen, "unknown parameter \"%.*s\" (only ?db=N is accepted)",
                    (int)qs.n, qs.p);
    Span num = {qs.p + 3, qs.n - 3};
    if (!parse_int(num, 0, 2147483647, &out->db))
        return fail(url, err, errlen,
                    "bad database \"%.*s\" (want ?db=N with N a non-negative number)", (int)num.n,
                    num.p);
    return 0;
}

/* Append "host:port" (IPv6 bracketed) to out->seeds. */
static int add_seed(const char *url, RedisUrl *out, const char *host, int port, char *err,
                    size_t errlen)
{
    size_t len = strlen(out->seeds);
    bool v6 = strchr(host, ':') != NULL;
    int n = snprintf(out->seeds + len, sizeof out->seeds - len, "%s%s%s%s:%d", len > 0 ? "," : "",
                     v6 ? "[" : "", host, v6 ? "]" : "", port);

    if (n < 0 || (size_t)n >= sizeof out->seeds - len)
        return fail(url, err, errlen, "seed list longer than %zu bytes", sizeof out->seeds - 1);
    return 0;
}

static int parse_cluster(const char *url, Span s, RedisUrl *out, char *err, size_t errlen)
{
    size_t i = 0;
    int db;

    for (;;) {
        char host[sizeof out->host];
        int port;
        size_t used;
        Span rest = {s.p + i, s.n - i};
        if (parse_hostport(url, rest, ",/", host, sizeof host, &port, &used, err, errlen) < 0)
            return -1;
        if (out->seeds[0] == '\0') {
            memcpy(out->host, host, sizeof out->host);
            out->port = port;
        }
        if (add_seed(url, out, host, port, err, errlen) < 0)
            return -1;
        i += used;
        if (i < s.n && s.p[i] == ',') {
            i++;
            continue;
        }
        break;
    }
    if (parse_db_path(url, (Span){s.p + i, s.n - i}, &db, err, errlen) < 0)
        return -1;
    if (db != 0)
        return fail(url, err, errlen, "redis+cluster:// supports only database 0");
    out->db = 0;
    return 0;
}

int redisurl_parse(const char *url, RedisUrl *out, char *err, size_t errlen)
{
    const SchemeEntry *sch = NULL;
    const char *rest, *at;

    memset(out, 0, sizeof *out);
    out->port = REDISURL_DEFAULT_PORT;
    if (url == NULL || url[0] == '\0')
        return fail("", err, errlen, "empty URL (want redis://host:port)");
    for (size_t i = 0; i < sizeof schemes / sizeof schemes[0]; i++)
        if (strncmp(url, schemes[i].prefix, strlen(schemes[i].prefix)) == 0)
            sch = &schemes[i];
    if (sch == NULL) {
        if (strncmp(url, "rediss://", 9) == 0)
            return fail(url, err, errlen, "TLS (rediss://) is not supported");
        return fail(url, err, errlen,
                    "unknown scheme (want redis://, unix:// or redis+cluster://)");
    }
    out->kind = sch->kind;
    rest = url + strlen(sch->prefix);
    at = userinfo_end(rest, sch->kind == REDISURL_UNIX);
    if (at != NULL) {
        if (parse_userinfo(url, (Span){rest, (size_t)(at - rest)}, out, err, errlen) < 0)
            return -1;
        rest = at + 1;
    }
    Span tail = {rest, strlen(rest)};
    switch (sch->kind) {
    case REDISURL_TCP:
        return parse_tcp(url, tail, out, err, errlen);
    case REDISURL_UNIX:
        return parse_unix(url, tail, out, err, errlen);
    case REDISURL_CLUSTER:
        return parse_cluster(url, tail, out, err, errlen);
    }
    return fail(url, err, errlen, "unknown scheme");
}

const char *redisurl_describe(const RedisUrl *u, char *buf, size_t buflen)
{
    if (buf == NULL || buflen == 0)
        return buf;
    switch (u->kind) {
    case REDISURL_UNIX:
        snprintf(buf, buflen, "%s", u->path);
        break;
    case REDISURL_CLUSTER:
        snprintf(buf, buflen, "%s", u->seeds);
        break;
    case REDISURL_TCP:
    default:
        if (strchr(u->host, ':') != NULL)
            snprintf(buf, buflen, "[%s]:%d", u->host, u->port);
        else
            snprintf(buf, buflen, "%s:%d", u->host, u->port);
        break;
    }
    return buf;
}
