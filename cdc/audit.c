/*
 * audit.c — the cache audit's decisions (see audit.h, docs/audit.md).
 */
#include "audit.h"

#include <cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mem.h"

bool audit_is_marker(const char *v, size_t len)
{
    return len >= AUDIT_MARKER_LEN && memcmp(v, AUDIT_MARKER_PREFIX, AUDIT_MARKER_LEN) == 0;
}

static cJSON *parse_json(const char *s, size_t len)
{
    const char *end = NULL;
    char *copy = xstrndup(s, len);
    cJSON *j = cJSON_ParseWithLengthOpts(copy, len + 1, &end, 1);

    free(copy);
    return j;
}

bool audit_equal(bool json, const char *v, size_t vlen, const AuditDb *d)
{
    cJSON *a, *b;
    bool eq;

    if (d->absent)
        return false;
    if (!json)
        return vlen == d->len && memcmp(v, d->val, vlen) == 0;
    if (vlen == d->len && memcmp(v, d->val, vlen) == 0)
        return true;
    if (memchr(v, '\0', vlen) != NULL || memchr(d->val, '\0', d->len) != NULL)
        return false;
    a = parse_json(v, vlen);
    b = parse_json(d->val, d->len);
    eq = a != NULL && b != NULL && cJSON_Compare(a, b, /* case_sensitive= */ true);
    cJSON_Delete(a);
    cJSON_Delete(b);
    return eq;
}

AuditStep audit_first(bool json, const AuditKey *v, const AuditDb *d)
{
    if (v->kind != AUDIT_KEY_VALUE || audit_is_marker(v->val, v->len))
        return AUDIT_SKIP;
    return audit_equal(json, v->val, v->len, d) ? AUDIT_CLEAN : AUDIT_VERIFY;
}

AuditStep audit_second(bool json, const AuditKey *v1, const AuditKey *v2, const AuditDb *d2)
{
    if (v2->kind != AUDIT_KEY_VALUE || v2->len != v1->len || memcmp(v2->val, v1->val, v1->len))
        return AUDIT_CLEAN;
    if (d2 == NULL)
        return AUDIT_VERIFY;
    return audit_equal(json, v1->val, v1->len, d2) ? AUDIT_CLEAN : AUDIT_STALE;
}

bool audit_sample(AuditSampler *s, double rate)
{
    if (rate <= 0)
        return false;
    s->acc += rate;
    if (s->acc < 1.0 - 1e-9)
        return false;
    s->acc -= 1.0;
    if (s->acc < 0)
        s->acc = 0;
    return true;
}

bool audit_parse_rate(const char *text, double *out)
{
    char *end;
    double v;

    if (text == NULL || *text == '\0')
        return false;
    v = strtod(text, &end);
    if (end == text || (*end != '\0' && strcmp(end, "%") != 0) || !(v >= 0 && v <= 100))
        return false;
    *out = v / 100.0;
    return true;
}

void audit_bucket_init(AuditBucket *b, double rate, double burst, int64_t now_us)
{
    b->rate = rate > 0 ? rate : 1;
    b->burst = burst >= 1 ? burst : 1;
    b->tokens = b->burst;
    b->last_us = now_us;
}

static void refill(AuditBucket *b, int64_t now_us)
{
    if (now_us > b->last_us) {
        b->tokens += (double)(now_us - b->last_us) * b->rate / 1e6;
        if (b->tokens > b->burst)
            b->tokens = b->burst;
        b->last_us = now_us;
    }
}

bool audit_bucket_take(AuditBucket *b, int64_t now_us)
{
    refill(b, now_us);
    if (b->tokens < 1.0)
        return false;
    b->tokens -= 1.0;
    return true;
}

int64_t audit_bucket_wait_us(const AuditBucket *b, int64_t now_us)
{
    AuditBucket c = *b;

    refill(&c, now_us);
    if (c.tokens >= 1.0)
        return 0;
    return (int64_t)ceil((1.0 - c.tokens) * 1e6 / c.rate);
}

double audit_nines(uint64_t checked, uint64_t stale)
{
    if (checked == 0)
        return 0;
    if (stale == 0)
        return log10((double)checked);
    if (stale >= checked)
        return 0;
    return -log10((double)stale / (double)checked);
}

void audit_consistency(uint64_t checked, uint64_t stale, char *out, size_t n)
{
    double nines = audit_nines(checked, stale);

    if (checked == 0)
        snprintf(out, n, "no checks yet");
    else if (stale == 0)
        snprintf(out, n, "no stale entry in %llu check%s (at least %.1f nines)",
                 (unsigned long long)checked, checked == 1 ? "" : "s", nines);
    else
        snprintf(out, n, "%.4f%% (%.1f nines): %llu stale in %llu checks",
                 100.0 * (double)(checked - stale) / (double)checked, nines,
                 (unsigned long long)stale, (unsigned long long)checked);
}

void audit_show(const char *v, size_t len, size_t max, char *out, size_t n)
{
    size_t o = 0, i;

    if (n < 2) {
        if (n == 1)
            out[0] = '\0';
        return;
    }
    out[o++] = '"';
    for (i = 0; i < len && i < max; i++) {
        unsigned char c = (unsigned char)v[i];
        char tmp[5];
        size_t k;
        if (c == '"' || c == '\\')
            k = (size_t)snprintf(tmp, sizeof tmp, "\\%c", c);
        else if (c < 0x20 || c >= 0x7f)
            k = (size_t)snprintf(tmp, sizeof tmp, "\\x%02x", c);
        else
            k = (size_t)snprintf(tmp, sizeof tmp, "%c", c);
        if (o + k + 2 > n)
            break;
        memcpy(out + o, tmp, k);
        o += k;
    }
    out[o++] = '"';
    out[o] = '\0';
    if (i < len)
        snprintf(out + o, n - o, "...(%zu bytes)", len);
}
