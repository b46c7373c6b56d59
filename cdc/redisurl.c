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
#include <stddef.h>
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
    bool tls;
} SchemeEntry;

static const SchemeEntry schemes[] = {
    {"redis://", REDISURL_TCP, false},
    {"rediss://", REDISURL_TCP, true},
    {"unix://", REDISURL_UNIX, false},
    {"redis+cluster://", REDISURL_CLUSTER, false},
    {"rediss+cluster://", REDISURL_CLUSTER, true},
    {"redis+sentinel://", REDISURL_SENTINEL, false},
    {"rediss+sentinel://", REDISURL_SENTINEL, true},
};

#define REDISURL_SENTINEL_PORT 26379
#define SENTINEL_PW_PARAM "sentinel_password="

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

/* A bounded writer: appends what fits, always NUL-terminated, so a short
 * buffer gets a prefix of the full text. */
typedef struct Out {
    char *buf;
    size_t len, cap;
} Out;

static void out_put(Out *o, const char *p, size_t n)
{
    for (size_t i = 0; i < n && o->len + 1 < o->cap; i++)
        o->buf[o->len++] = p[i];
    o->buf[o->len] = '\0';
}

/* Copy the text after the userinfo, replacing every sentinel_password
 * parameter value (up to the next '&') with "***". */
static void out_tail(Out *o, const char *tail)
{
    const char *q = strchr(tail, '?');
    const char *p = tail;

    if (q == NULL) {
        out_put(o, tail, strlen(tail));
        return;
    }
    for (const char *m = strstr(q, SENTINEL_PW_PARAM); m != NULL;
         m = strstr(m, SENTINEL_PW_PARAM)) {
        size_t n = strlen(SENTINEL_PW_PARAM);
        if (m[-1] != '?' && m[-1] != '&') {
            m += n;
            continue;
        }
        out_put(o, p, (size_t)(m - p) + n);
        out_put(o, "***", 3);
        m += n;
        m += strcspn(m, "&");
        p = m;
    }
    out_put(o, p, strlen(p));
}

char *redisurl_redact(const char *url, char *buf, size_t buflen)
{
    const char *rest, *sep, *at, *colon;
    bool is_unix;
    Out o = {buf, 0, buflen};

    if (buf == NULL || buflen == 0)
        return buf;
    buf[0] = '\0';
    if (url == NULL)
        return buf;
    sep = strstr(url, "://");
    rest = sep != NULL ? sep + 3 : url;
    is_unix = sep != NULL && (size_t)(sep - url) == 4 && strncmp(url, "unix", 4) == 0;
    at = userinfo_end(rest, is_unix);
    /* "unix://user:pw@relative.sock" is invalid (no "@/"), yet its error
     * message quotes it: redact up to the last '@' there too. */
    if (at == NULL && is_unix && rest[0] != '/')
        at = strrchr(rest, '@');
    if (at == NULL) {
        out_put(&o, url, (size_t)(rest - url));
        out_tail(&o, rest);
        return buf;
    }
    /* Keep "user:" when there is a colon; a bare userinfo may be a password. */
    colon = memchr(rest, ':', (size_t)(at - rest));
    out_put(&o, url, (size_t)((colon != NULL ? colon + 1 : rest) - url));
    out_put(&o, "***", 3);
    out_tail(&o, at);
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
    if (s.n == 0 || s.p[0] != '/')
        return fail(url, err, errlen,
                    "unix:// needs an absolute socket path "
                    "(unix:///run/redis.sock)");
    if (s.n == 1)
        return fail(url, err, errlen, "missing socket path");
    if (s.n >= sizeof out->path)
        return fail(url, err, errlen, "socket path longer than %zu bytes", sizeof out->path - 1);
    memcpy(out->path, s.p, s.n);
    out->path[s.n] = '\0';
    out->db = 0;
    return 0;
}

/* Decode a parameter value into out (outlen bytes). */
static int param_str(const char *url, Span name, Span v, char *out, size_t outlen, char *err,
                     size_t errlen)
{
    int rc = pct_decode(v, out, outlen);

    if (rc == -1)
        return fail(url, err, errlen, "bad percent-escape in parameter %.*s", (int)name.n, name.p);
    if (rc == -2)
        return fail(url, err, errlen, "parameter %.*s longer than %zu bytes", (int)name.n, name.p,
                    outlen - 1);
    if (out[0] == '\0')
        return fail(url, err, errlen, "empty parameter %.*s", (int)name.n, name.p);
    return 0;
}

static bool span_is(Span s, const char *lit)
{
    return s.n == strlen(lit) && memcmp(s.p, lit, s.n) == 0;
}

/* Where a parameter's value goes: a string field, or NULL for the special
 * cases handled in parse_param. */
static char *param_field(RedisUrl *out, Span name, size_t *len)
{
    static const struct {
        const char *name;
        size_t off, len;
    } fields[] = {
        {"cacert", offsetof(RedisUrl, cacert), sizeof((RedisUrl *)0)->cacert},
        {"cert", offsetof(RedisUrl, cert), sizeof((RedisUrl *)0)->cert},
        {"key", offsetof(RedisUrl, key), sizeof((RedisUrl *)0)->key},
        {"sni", offsetof(RedisUrl, sni), sizeof((RedisUrl *)0)->sni},
        {"sentinel_user", offsetof(RedisUrl, sentinel_user), sizeof((RedisUrl *)0)->sentinel_user},
        {"sentinel_password", offsetof(RedisUrl, sentinel_password),
         sizeof((RedisUrl *)0)->sentinel_password},
    };

    for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++)
        if (span_is(name, fields[i].name)) {
            *len = fields[i].len;
            return (char *)out + fields[i].off;
        }
    return NULL;
}

/* One name=value parameter. */
static int parse_param(const char *url, Span name, Span v, RedisUrl *out, char *err, size_t errlen)
{
    bool tls_param = span_is(name, "cacert") || span_is(name, "cert") || span_is(name, "key") ||
                     span_is(name, "sni") || span_is(name, "insecure");
    bool sentinel_param = span_is(name, "sentinel_user") || span_is(name, "sentinel_password");
    size_t len;
    char *field;

    if (tls_param && !out->tls)
        return fail(url, err, errlen,
                    "parameter %.*s needs TLS: use rediss://, rediss+cluster:// or "
                    "rediss+sentinel://",
                    (int)name.n, name.p);
    if (sentinel_param && out->kind != REDISURL_SENTINEL)
        return fail(url, err, errlen, "parameter %.*s is only for redis+sentinel://", (int)name.n,
                    name.p);
    if (span_is(name, "db") && out->kind == REDISURL_UNIX) {
        if (!parse_int(v, 0, 2147483647, &out->db))
            return fail(url, err, errlen,
                        "bad database \"%.*s\" (want ?db=N with N a non-negative number)", (int)v.n,
                        v.p);
        return 0;
    }
    if (span_is(name, "replicas")) {
        if (!parse_int(v, 0, 100, &out->replicas))
            return fail(url, err, errlen, "bad replicas \"%.*s\" (want a number from 0 to 100)",
                        (int)v.n, v.p);
        return 0;
    }
    if (span_is(name, "insecure")) {
        if (!span_is(v, "1") && !span_is(v, "0"))
            return fail(url, err, errlen, "bad insecure \"%.*s\" (want 1 or 0)", (int)v.n, v.p);
        out->insecure = v.p[0] == '1';
        return 0;
    }
    field = param_field(out, name, &len);
    if (field == NULL)
        return fail(url, err, errlen,
                    "unknown parameter \"%.*s\" (accepted: %sreplicas, cacert, cert, key, sni, "
                    "insecure, sentinel_user, sentinel_password)",
                    (int)name.n, name.p, out->kind == REDISURL_UNIX ? "db, " : "");
    if (param_str(url, name, v, field, len, err, errlen) < 0)
        return -1;
    if (span_is(name, "sentinel_password"))
        out->sentinel_has_password = true;
    return 0;
}

/* "name=value&name=value" after the '?'. */
static int parse_query(const char *url, Span q, RedisUrl *out, char *err, size_t errlen)
{
    size_t i = 0;

    while (i < q.n) {
        const char *amp = memchr(q.p + i, '&', q.n - i);
        Span item = {q.p + i, amp ? (size_t)(amp - q.p) - i : q.n - i};
        const char *eq = memchr(item.p, '=', item.n);
        if (eq == NULL || eq == item.p)
            return fail(url, err, errlen, "bad parameter \"%.*s\" (want name=value)", (int)item.n,
                        item.p);
        Span name = {item.p, (size_t)(eq - item.p)};
        Span v = {eq + 1, item.n - name.n - 1};
        if (parse_param(url, name, v, out, err, errlen) < 0)
            return -1;
        i += item.n + 1;
    }
    if ((out->cert[0] != '\0') != (out->key[0] != '\0'))
        return fail(url, err, errlen,
                    "cert= and key= go together (the client certificate and its private key)");
    if (out->sentinel_has_password == false && out->sentinel_user[0] != '\0')
        return fail(url, err, errlen, "sentinel_user= needs sentinel_password=");
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

/* "host:port[,host:port...]" at the start of s into out->seeds (the first
 * also into host and port). Returns the bytes used, or -1. */
static long parse_seeds(const char *url, Span s, int defport, RedisUrl *out, char *err,
                        size_t errlen)
{
    size_t i = 0;

    for (;;) {
        char host[sizeof out->host];
        int port;
        size_t used;
        Span rest = {s.p + i, s.n - i};
        if (parse_hostport(url, rest, ",/", host, sizeof host, &port, &used, err, errlen) < 0)
            return -1;
        if (memchr(rest.p, ':', used) == NULL || (rest.p[0] == '[' && rest.p[used - 1] == ']'))
            port = defport;
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
    return (long)i;
}

static int parse_cluster(const char *url, Span s, RedisUrl *out, char *err, size_t errlen)
{
    long i = parse_seeds(url, s, REDISURL_DEFAULT_PORT, out, err, errlen);
    int db;

    if (i < 0)
        return -1;
    if (parse_db_path(url, (Span){s.p + i, s.n - (size_t)i}, &db, err, errlen) < 0)
        return -1;
    if (db != 0)
        return fail(url, err, errlen, "redis+cluster:// supports only database 0");
    out->db = 0;
    return 0;
}

/* "sentinel[,sentinel...]/MASTER_NAME[/db]". */
static int parse_sentinel(const char *url, Span s, RedisUrl *out, char *err, size_t errlen)
{
    long i = parse_seeds(url, s, REDISURL_SENTINEL_PORT, out, err, errlen);
    size_t k, n;

    if (i < 0)
        return -1;
    s.p += i;
    s.n -= (size_t)i;
    if (s.n < 2 || s.p[0] != '/')
        return fail(url, err, errlen,
                    "missing master name (want redis+sentinel://host:port/MASTER_NAME)");
    for (k = 1; k < s.n && s.p[k] != '/'; k++)
        if (!host_char(s.p[k], false))
            return fail(url, err, errlen, "bad character '%c' in the master name", s.p[k]);
    n = k - 1;
    if (n == 0 || n >= sizeof out->master_name)
        return fail(url, err, errlen, "master name empty or longer than %zu bytes",
                    sizeof out->master_name - 1);
    memcpy(out->master_name, s.p + 1, n);
    out->master_name[n] = '\0';
    return parse_db_path(url, (Span){s.p + k, s.n - k}, &out->db, err, errlen);
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
    if (sch == NULL)
        return fail(url, err, errlen,
                    "unknown scheme (want redis://, rediss://, unix://, redis+cluster://, "
                    "rediss+cluster://, redis+sentinel:// or rediss+sentinel://)");
    out->kind = sch->kind;
    out->tls = sch->tls;
    rest = url + strlen(sch->prefix);
    at = userinfo_end(rest, sch->kind == REDISURL_UNIX);
    if (at != NULL) {
        if (parse_userinfo(url, (Span){rest, (size_t)(at - rest)}, out, err, errlen) < 0)
            return -1;
        rest = at + 1;
    }
    const char *q = strchr(rest, '?');
    Span tail = {rest, q != NULL ? (size_t)(q - rest) : strlen(rest)};
    int rc = -1;
    switch (sch->kind) {
    case REDISURL_TCP:
        rc = parse_tcp(url, tail, out, err, errlen);
        break;
    case REDISURL_UNIX:
        rc = parse_unix(url, tail, out, err, errlen);
        break;
    case REDISURL_CLUSTER:
        rc = parse_cluster(url, tail, out, err, errlen);
        break;
    case REDISURL_SENTINEL:
        rc = parse_sentinel(url, tail, out, err, errlen);
        break;
    }
    if (rc == 0 && q != NULL)
        rc = parse_query(url, (Span){q + 1, strlen(q + 1)}, out, err, errlen);
    return rc;
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
    case REDISURL_SENTINEL:
        snprintf(buf, buflen, "%s@%s", u->master_name, u->seeds);
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
