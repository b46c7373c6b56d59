/*
 * mem.h — allocation that cannot fail.
 *
 * walbust treats out of memory as fatal (STYLE: abort with a message), so
 * every module allocates through these instead of checking each call. The
 * x-prefixed names follow git's wrapper.c convention.
 */
#ifndef WALBUST_MEM_H
#define WALBUST_MEM_H

#include <stddef.h>

/* Print "walbust: out of memory" and abort. */
void mem_oom(void) __attribute__((noreturn));

/* malloc/calloc/realloc that abort instead of returning NULL; a zero size
 * allocates one byte, so the result is never NULL. Free with free(). */
void *xmalloc(size_t n) __attribute__((malloc));
void *xcalloc(size_t n, size_t size) __attribute__((malloc));
void *xrealloc(void *p, size_t n);

/* Copies of s (NUL-terminated), or of its first n bytes plus a NUL. */
char *xstrdup(const char *s) __attribute__((malloc));
char *xstrndup(const char *s, size_t n) __attribute__((malloc));

/* Returns p, aborting when it is NULL: for memory that libraries allocate
 * (cJSON, libpq, strndup). */
void *mem_check(void *p);

/* A growable NUL-terminated string, e.g. SQL being built. Start from {0}:
 * s stays NULL until the first mem_text_add(); the owner free()s s. */
typedef struct MemText {
    char *s;
    size_t len, cap;
} MemText;

/* Append the NUL-terminated s to t. Aborts on out of memory. */
void mem_text_add(MemText *t, const char *s);

/* Grow arr (elements of elem bytes, *cap of them) to hold at least need,
 * doubling; returns the possibly moved array and updates *cap. Inline for
 * the common case, room already there (it runs several times per change:
 * a call each was 3 % of walbust's instructions in a drain). */
void *xgrow_slow(void *arr, size_t *cap, size_t need, size_t elem);

static inline void *xgrow(void *arr, size_t *cap, size_t need, size_t elem)
{
    return need <= *cap ? arr : xgrow_slow(arr, cap, need, elem);
}

#endif
