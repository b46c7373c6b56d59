/*
 * fuzz_glob.c — libFuzzer target for rules_glob_escape() (docs/rules.md: values
 * substituted into a pattern are glob-escaped, "so a row whose name is `*`
 * can never wipe the cache").
 *
 * Input: byte 0 chooses where to split the rest into a value s and a probe
 * string t. Properties checked against a reference matcher with Redis'
 * semantics (globmatch.h):
 *  - the escaped form fits the documented 2*len+1 bytes, is NUL-terminated,
 *    returns its length, and unescapes back to s byte for byte;
 *  - as a MATCH pattern it matches s and nothing else: not t (unless t == s),
 *    not s with a byte dropped or added;
 *  - composed like walbust composes patterns, esc(a) + "*" + esc(b) matches
 *    exactly the strings that start with a and end with b (no overlap), and
 *    esc(a) + "?" + esc(b) exactly those one byte longer than a + b.
 * Any violation aborts, which libFuzzer reports as a crash.
 */
#include "rules.h"

#include "globmatch.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHECK(cond, ...)                                                                           \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "fuzz_glob: property failed: %s: ", #cond);                           \
            fprintf(stderr, __VA_ARGS__);                                                          \
            fputc('\n', stderr);                                                                   \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

static bool is_meta(char c)
{
    return c == '*' || c == '?' || c == '[' || c == ']' || c == '\\';
}

static void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (p == NULL) {
        fprintf(stderr, "fuzz_glob: out of memory\n");
        abort();
    }
    return p;
}

/* Escape s into an exactly-sized heap buffer (so ASan sees any overrun) and
 * check the escaped text's shape. Returns the buffer; *elen gets its length. */
static char *escape_checked(const char *s, size_t len, size_t *elen)
{
    char *e = xmalloc(2 * len + 1);
    size_t metas = 0, n = rules_glob_escape(s, len, e), j = 0;

    for (size_t i = 0; i < len; i++)
        metas += is_meta(s[i]);
    CHECK(n == len + metas, "returned %zu for %zu bytes with %zu metacharacters", n, len, metas);
    CHECK(e[n] == '\0', "no NUL after %zu bytes", n);
    for (size_t i = 0; i < n; i++, j++) {
        if (e[i] == '\\') {
            CHECK(i + 1 < n && is_meta(e[i + 1]), "stray backslash at %zu", i);
            i++;
        } else {
            CHECK(!is_meta(e[i]), "unescaped '%c' at %zu", e[i], i);
        }
        CHECK(j < len && e[i] == s[j], "escaped text differs from the value at byte %zu", j);
    }
    CHECK(j == len, "escaped text unescapes to %zu bytes, value has %zu", j, len);
    *elen = n;
    return e;
}

/* esc(a) + joiner + esc(b) must match t exactly when t = a + middle + b
 * where middle is any run (joiner '*') or exactly one byte (joiner '?'). */
static void check_composed(const char *a, size_t alen, const char *b, size_t blen, char joiner,
                           const char *t, size_t tlen)
{
    size_t ealen, eblen;
    char *ea = escape_checked(a, alen, &ealen), *eb = escape_checked(b, blen, &eblen);
    char *pat = xmalloc(ealen + eblen + 2);
    bool want, got;

    memcpy(pat, ea, ealen);
    pat[ealen] = joiner;
    memcpy(pat + ealen + 1, eb, eblen + 1);
    /* Redis quirk, kept by the reference: an empty string matches only the
     * empty pattern (stringmatchlen("*", "") is 0; SCAN special-cases a
     * pattern that is exactly "*", walbust's sink does not rely on it). */
    want = tlen > 0 && (joiner == '*' ? tlen >= alen + blen : tlen == alen + blen + 1) &&
           memcmp(t, a, alen) == 0 && memcmp(t + tlen - blen, b, blen) == 0;
    got = globmatch(pat, ealen + eblen + 1, t, tlen);
    CHECK(got == want, "pattern esc(a)%cesc(b) (%zu+%zu bytes) on %zu bytes: got %d want %d",
          joiner, alen, blen, tlen, got, want);
    free(pat);
    free(ea);
    free(eb);
}

/* The escaped value matches itself and nothing else. */
static void check_exact(const char *s, size_t len, const char *t, size_t tlen)
{
    size_t elen;
    char *e = escape_checked(s, len, &elen);
    char *longer = xmalloc(len + 1);

    CHECK(globmatch(e, elen, s, len), "escaped value does not match itself (%zu bytes)", len);
    CHECK(globmatch(e, elen, t, tlen) == (tlen == len && memcmp(s, t, len) == 0),
          "escaped value (%zu bytes) vs probe (%zu bytes)", len, tlen);
    if (len > 0) {
        CHECK(!globmatch(e, elen, s, len - 1), "matches the value minus its last byte");
        CHECK(!globmatch(e, elen, s + 1, len - 1), "matches the value minus its first byte");
    }
    memcpy(longer, s, len);
    longer[len] = len > 0 ? s[len - 1] : 'x';
    CHECK(!globmatch(e, elen, longer, len + 1), "matches the value plus one byte");
    free(longer);
    free(e);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *s, *t;
    size_t slen, tlen, half;
    char *probe;

    if (size < 1 || size > 4096)
        return 0;
    slen = (size - 1) * data[0] / 255;
    s = (const char *)data + 1;
    t = s + slen;
    tlen = size - 1 - slen;
    check_exact(s, slen, t, tlen);
    check_exact(s, slen, s, slen);
    /* Split s in two for the composed patterns; probe with t and with
     * strings built from the parts so matches are reachable. */
    half = slen / 2;
    check_composed(s, half, s + half, slen - half, '*', t, tlen);
    check_composed(s, half, s + half, slen - half, '?', t, tlen);
    probe = xmalloc(slen + tlen + 1);
    memcpy(probe, s, half);
    memcpy(probe + half, t, tlen);
    memcpy(probe + half + tlen, s + half, slen - half);
    check_composed(s, half, s + half, slen - half, '*', probe, slen + tlen);
    check_composed(s, half, s + half, slen - half, '?', probe, slen + tlen);
    check_composed(s, half, s + half, slen - half, '*', s, slen);
    free(probe);
    return 0;
}
