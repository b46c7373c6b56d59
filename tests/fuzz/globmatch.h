/*
 * globmatch.h — a reference glob matcher with Redis' semantics, for fuzzers.
 *
 * walbust sends patterns to Redis (`SCAN MATCH`), so what a pattern means is
 * what Redis' stringmatchlen() (src/util.c, Redis 7) makes of it: `*` any
 * run of bytes, `?` one byte, `[...]` a class with `^` negation, `a-z`
 * ranges (ends swapped when reversed) and `\x` escapes, and `\x` outside a
 * class for a literal x. This is a transcription of that function with the
 * same control flow, including the "skip longer matches" cut-off, but with
 * every read bounded by the pattern length instead of relying on a NUL
 * after the pattern (Redis patterns are sds strings, which have one): where
 * Redis peeks at pattern[patlen] it sees NUL, and so do these guards.
 * Case-sensitive only (walbust never asks for NOCASE). Header-only: each
 * fuzzer is one translation unit.
 */
#ifndef WALBUST_FUZZ_GLOBMATCH_H
#define WALBUST_FUZZ_GLOBMATCH_H

#include <stdbool.h>
#include <stddef.h>

/* One bracket class at pat (just after '['); c is the byte to test. Advances
 * *pat and *plen to the closing ']' (or the last byte when unterminated, as Redis
 * does). Returns whether c is in the class. */
static bool gm_class(const unsigned char **pat, long *plen, unsigned char c)
{
    const unsigned char *p = *pat;
    long n = *plen;
    bool neg = n > 0 && p[0] == '^', match = false;

    if (neg) {
        p++;
        n--;
    }
    for (;;) {
        if (n >= 2 && p[0] == '\\') {
            p++;
            n--;
            if (p[0] == c)
                match = true;
        } else if (n > 0 && p[0] == ']') {
            break;
        } else if (n == 0) {
            p--;
            n++;
            break;
        } else if (n >= 3 && p[1] == '-') {
            /* Redis compares these as (signed) char on x86-64. */
            int lo = (signed char)p[0], hi = (signed char)p[2], sc = (signed char)c;
            if (lo > hi) {
                int t = lo;
                lo = hi;
                hi = t;
            }
            p += 2;
            n -= 2;
            if (sc >= lo && sc <= hi)
                match = true;
        } else if (p[0] == c) {
            match = true;
        }
        p++;
        n--;
    }
    *pat = p;
    *plen = n;
    return neg ? !match : match;
}

static bool gm_impl(const unsigned char *p, long plen, const unsigned char *s, long slen,
                    bool *skip_longer, int nesting)
{
    if (nesting > 1000)
        return false;
    while (plen > 0 && slen > 0) {
        switch (p[0]) {
        case '*':
            while (plen > 1 && p[1] == '*') {
                p++;
                plen--;
            }
            if (plen == 1)
                return true;
            while (slen > 0) {
                if (gm_impl(p + 1, plen - 1, s, slen, skip_longer, nesting + 1))
                    return true;
                if (*skip_longer)
                    return false;
                s++;
                slen--;
            }
            *skip_longer = true;
            return false;
        case '?':
            s++;
            slen--;
            break;
        case '[':
            p++;
            plen--;
            if (!gm_class(&p, &plen, s[0]))
                return false;
            s++;
            slen--;
            break;
        case '\\':
            if (plen >= 2) {
                p++;
                plen--;
            }
            /* fall through */
        default:
            if (p[0] != s[0])
                return false;
            s++;
            slen--;
            break;
        }
        p++;
        plen--;
        if (slen == 0) {
            while (plen > 0 && p[0] == '*') {
                p++;
                plen--;
            }
            break;
        }
    }
    return plen == 0 && slen == 0;
}

/* Does Redis' MATCH pattern pat (plen bytes) match s (slen bytes)? */
static bool globmatch(const char *pat, size_t plen, const char *s, size_t slen)
{
    bool skip_longer = false;

    return gm_impl((const unsigned char *)pat, (long)plen, (const unsigned char *)s, (long)slen,
                   &skip_longer, 0);
}

#endif
