/*
 * mem.c — allocation that cannot fail (see mem.h).
 */
#include "mem.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void mem_oom(void)
{
    fputs("walbust: out of memory\n", stderr);
    abort();
}

void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (p == NULL)
        mem_oom();
    return p;
}

void *xcalloc(size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (p == NULL)
        mem_oom();
    return p;
}

void *xrealloc(void *p, size_t n)
{
    void *q = realloc(p, n ? n : 1);
    if (q == NULL)
        mem_oom();
    return q;
}

char *xstrndup(const char *s, size_t n)
{
    char *d = xmalloc(n + 1);
    memcpy(d, s, n);
    d[n] = '\0';
    return d;
}

char *xstrdup(const char *s)
{
    return xstrndup(s, strlen(s));
}

void *mem_check(void *p)
{
    if (p == NULL)
        mem_oom();
    return p;
}

void *xgrow_slow(void *arr, size_t *cap, size_t need, size_t elem)
{
    size_t n = *cap ? *cap : 8;

    if (need <= *cap)
        return arr;
    while (n < need) {
        if (n > SIZE_MAX / 4 / elem)
            mem_oom();
        n *= 2;
    }
    *cap = n;
    return xrealloc(arr, n * elem);
}

void mem_text_add(MemText *t, const char *s)
{
    size_t n = strlen(s);

    t->s = xgrow(t->s, &t->cap, t->len + n + 1, 1);
    memcpy(t->s + t->len, s, n + 1);
    t->len += n;
}
