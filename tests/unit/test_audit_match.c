/*
 * Unit tests for rules_audit_match()'s cheap paths (rules_audit.c): the
 * streaming thread asks it about every key it invalidates, sampled or not,
 * so a key whose beginning or end differs from the audit key's literal text
 * is refused before any work, a yes/no question (out NULL) renders no
 * arguments, and the match state of a template with few names is on the
 * stack. The answers must not change: match with and without out, and an
 * ambiguous key still -1 both ways.
 *
 * Allocations are counted by wrapping malloc/calloc/realloc at link time
 * (-Wl,--wrap, see the Makefile): every allocation of the objects linked
 * into this binary (rules_audit.o, mem.o, ...) passes through the
 * __wrap_ functions below, which count and call the real ones.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "rules.h"

/* ---- counting allocations ------------------------------------------------ */

void *__real_malloc(size_t n);
void *__real_calloc(size_t n, size_t size);
void *__real_realloc(void *p, size_t n);
void *__wrap_malloc(size_t n);
void *__wrap_calloc(size_t n, size_t size);
void *__wrap_realloc(void *p, size_t n);

static unsigned long allocs;

void *__wrap_malloc(size_t n)
{
    allocs++;
    return __real_malloc(n);
}

void *__wrap_calloc(size_t n, size_t size)
{
    allocs++;
    return __real_calloc(n, size);
}

void *__wrap_realloc(void *p, size_t n)
{
    allocs++;
    return __real_realloc(p, n);
}

/* ---- the rules ------------------------------------------------------------ */

/* 0: item:{id}, a key template the rule's other key item:{id}:detail also
 *    fits (id = "5:detail");
 * 1: t:{a}:{b}:end, literal text at both ends (and ambiguous keys);
 * 2: nine names, more than the stack holds;
 * 3: {id}@tail, no leading literal;
 * 4: config:global, literal only. */
static const char rules_json[] =
    "{\"rules\": ["
    "{\"table\": \"item\", \"keys\": [\"item:{id}\", \"item:{id}:detail\"], \"audit\": {\"key\": "
    "\"item:{id}\", \"sql\": \"SELECT $1\", \"args\": [\"{id}\"]}},"
    "{\"table\": \"t\", \"keys\": [\"t\"], \"audit\": {\"key\": \"t:{a}:{b}:end\", \"sql\": "
    "\"SELECT $1 || $2\", \"args\": [\"{a}\", \"{b}\"]}},"
    "{\"table\": \"m\", \"keys\": [\"m\"], \"audit\": {\"key\": "
    "\"m:{a}.{b}.{c}.{d}.{e}.{f}.{g}.{h}.{i}\", \"sql\": \"SELECT $1\", \"args\": "
    "[\"{a}{b}{c}{d}{e}{f}{g}{h}{i}\"]}},"
    "{\"table\": \"s\", \"keys\": [\"s\"], \"audit\": {\"key\": \"{id}@tail\", \"sql\": "
    "\"SELECT $1\", \"args\": [\"{id}\"]}},"
    "{\"table\": \"c\", \"keys\": [\"c\"], \"audit\": {\"key\": \"config:global\", \"sql\": "
    "\"SELECT 1\"}}"
    "]}";

static int setup(void **state)
{
    RulesProblems p = {0};
    Rules *r = rules_parse(rules_json, sizeof rules_json - 1, &p);

    if (r == NULL)
        fail_msg("the rules do not load: %s", p.count ? p.items[0].msg : "?");
    *state = r;
    return 0;
}

static int teardown(void **state)
{
    rules_free(*state);
    return 0;
}

/* rules_audit_match() of key, with out NULL; *n_allocs: allocations made. */
static int match_bare(const Rules *r, size_t ri, const char *key, unsigned long *n_allocs)
{
    unsigned long before = allocs;
    int rc = rules_audit_match(r, ri, key, strlen(key), NULL);

    *n_allocs = allocs - before;
    return rc;
}

/* rules_audit_match() of key with out: the arguments joined by '|', or
 * "nomatch" / "ambiguous". */
static const char *match_args(const Rules *r, size_t ri, const char *key, char *got, size_t n)
{
    RulesAuditArgs a;
    int rc = rules_audit_match(r, ri, key, strlen(key), &a);

    got[0] = '\0';
    if (rc == 0)
        snprintf(got, n, "nomatch");
    else if (rc < 0)
        snprintf(got, n, "ambiguous");
    for (size_t i = 0; rc == 1 && i < a.n; i++) {
        assert_int_equal(a.lens[i], (int)strlen(a.args[i]));
        snprintf(got + strlen(got), n - strlen(got), "%s%s", i ? "|" : "", a.args[i]);
    }
    if (rc != 1) /* emptied on 0 and -1 */
        assert_true(a.n == 0 && a.args == NULL && a.lens == NULL);
    rules_audit_args_release(&a);
    return got;
}

/* ---- tests ---------------------------------------------------------------- */

static void test_prefix_suffix_reject(void **state)
{
    const Rules *r = *state;
    unsigned long n;

    /* The leading literal is not a prefix of the key. */
    assert_int_equal(match_bare(r, 0, "detail:5", &n), 0);
    assert_int_equal(n, 0);
    assert_int_equal(match_bare(r, 0, "ite", &n), 0);
    assert_int_equal(match_bare(r, 0, "", &n), 0);
    assert_int_equal(match_bare(r, 0, "item:", &n), 0); /* {id} takes one byte or more */
    /* The trailing literal is not a suffix. */
    assert_int_equal(match_bare(r, 1, "t:1:2:en", &n), 0);
    assert_int_equal(n, 0);
    assert_int_equal(match_bare(r, 1, "t:1:2:endx", &n), 0);
    assert_int_equal(match_bare(r, 3, "5@tai", &n), 0);
    assert_int_equal(match_bare(r, 3, "@tail", &n), 0);
    /* Prefix and suffix must not overlap: "t:end" begins with "t:" and ends
     * with ":end" only by sharing bytes. */
    assert_int_equal(match_bare(r, 1, "t:end", &n), 0);
    assert_int_equal(n, 0);
    assert_int_equal(match_bare(r, 4, "config:globals", &n), 0);
    assert_int_equal(match_bare(r, 4, "config:global", &n), 1);
    /* With out, refused keys leave it empty. */
    char got[256];
    assert_string_equal(match_args(r, 0, "detail:5", got, sizeof got), "nomatch");
    assert_string_equal(match_args(r, 1, "t:1:2:endx", got, sizeof got), "nomatch");
    assert_string_equal(match_args(r, 1, "t:end", got, sizeof got), "nomatch");
}

static void test_match_with_and_without_out(void **state)
{
    const Rules *r = *state;
    unsigned long n;
    char got[256];

    /* Without out: the answer, no allocation (the state is on the stack). */
    assert_int_equal(match_bare(r, 0, "item:42", &n), 1);
    assert_int_equal(n, 0);
    assert_int_equal(match_bare(r, 1, "t:1:2:end", &n), 1);
    assert_int_equal(n, 0);
    assert_int_equal(match_bare(r, 3, "x@y@tail", &n), 1);
    assert_int_equal(n, 0);
    /* The key of the rule's other template matches item:{id} too: its
     * value is "5:detail" (the audit's SQL refuses it; see audit_check.c). */
    assert_int_equal(match_bare(r, 0, "item:5:detail", &n), 1);
    assert_string_equal(match_args(r, 0, "item:5:detail", got, sizeof got), "5:detail");
    /* With out: the same answers, with the arguments. */
    assert_string_equal(match_args(r, 0, "item:42", got, sizeof got), "42");
    assert_string_equal(match_args(r, 1, "t:1:2:end", got, sizeof got), "1|2");
    assert_string_equal(match_args(r, 3, "x@y@tail", got, sizeof got), "x@y");
    assert_string_equal(match_args(r, 4, "config:global", got, sizeof got), "");
    /* More names than the stack holds: the same answers, from the heap. */
    assert_int_equal(match_bare(r, 2, "m:1.2.3.4.5.6.7.8.9", &n), 1);
    assert_true(n > 0);
    assert_int_equal(match_bare(r, 2, "m:1.2.3.4.5.6.7.8", &n), 0);
    assert_string_equal(match_args(r, 2, "m:1.2.3.4.5.6.7.8.9", got, sizeof got), "123456789");
    /* A NUL byte in a value never matches. */
    assert_int_equal(rules_audit_match(r, 0, "item:4\0002", 7, NULL), 0);
    /* No audit, or no such rule. */
    assert_int_equal(rules_audit_match(r, 9, "item:42", 7, NULL), 0);
}

static void test_ambiguous(void **state)
{
    const Rules *r = *state;
    unsigned long n;
    char got[256];

    /* t:1:2:3:end splits as a=1, b=2:3 or a=1:2, b=3. */
    assert_int_equal(match_bare(r, 1, "t:1:2:3:end", &n), -1);
    assert_int_equal(n, 0);
    assert_string_equal(match_args(r, 1, "t:1:2:3:end", got, sizeof got), "ambiguous");
    assert_int_equal(match_bare(r, 2, "m:1.2.3.4.5.6.7.8.9.10", &n), -1);
    assert_string_equal(match_args(r, 2, "m:1.2.3.4.5.6.7.8.9.10", got, sizeof got), "ambiguous");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_prefix_suffix_reject),
        cmocka_unit_test(test_match_with_and_without_out),
        cmocka_unit_test(test_ambiguous),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
