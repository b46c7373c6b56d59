/*
 * Unit tests for the rules engine (rules.c, rules_eval.c) and jsonpos.c.
 *
 * Mostly table-driven from data files under tests/fixtures/rules/:
 *
 *   eval/NAME.case     a rules file, then changes and the exact invalidations
 *                      each must emit (in order), with optional stats
 *   bad/NAME.json      broken rules files; bad/NAME.expect lists every
 *                      problem rules_parse() must report, in order, as
 *                      "LINE:COL PATH TEXT" (PATH "-" when none; TEXT a
 *                      substring of the message, or its end when TEXT
 *                      ends with '$')
 *   catalog/NAME.case  rules plus a fake catalog for rules_check_catalog()
 *
 * Case files are sections introduced by "== name [arg]". Lines starting
 * with '#' and blank lines are ignored, except inside "== rules" (raw JSON).
 * Change sections: table, op, cols, old/new (values: bare words are text;
 * "quoted" with \" \\ \n \t \xHH escapes; NULL and MISSING are keywords; no
 * old/new line means no such image), lsn/time ("-" for none), xid. Expect
 * lines: "<action> <string>" with the rest of the line verbatim, or
 * "<action>~ "quoted"" with escapes; publish is "publish <channel> <payload>".
 */
#include <dirent.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "jsonpos.h"
#include "rules.h"

#define FIXTURES SOURCE_DIR "/tests/fixtures/rules"
#define MAX_COLS 16
#define MAX_EMITS 64

/* ---- small helpers -------------------------------------------------------- */

static char *slurp(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    char *buf;
    long n;

    if (f == NULL)
        fail_msg("cannot open %s", path);
    fseek(f, 0, SEEK_END);
    n = ftell(f);
    fseek(f, 0, SEEK_SET);
    buf = malloc((size_t)n + 1);
    assert_non_null(buf);
    assert_int_equal(fread(buf, 1, (size_t)n, f), (size_t)n);
    buf[n] = '\0';
    fclose(f);
    *len = (size_t)n;
    return buf;
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Sorted names in dir ending with suffix; NULL-terminated, caller frees. */
static char **list_dir(const char *dir, const char *suffix)
{
    DIR *d = opendir(dir);
    struct dirent *e;
    char **names = calloc(256, sizeof *names);
    size_t n = 0, sl = strlen(suffix);

    assert_non_null(d);
    while ((e = readdir(d)) != NULL) {
        size_t l = strlen(e->d_name);
        if (l > sl && strcmp(e->d_name + l - sl, suffix) == 0 && n < 255)
            names[n++] = strdup(e->d_name);
    }
    closedir(d);
    qsort(names, n, sizeof *names, cmp_str);
    assert_true(n > 0);
    return names;
}

static void free_list(char **names)
{
    for (size_t i = 0; names[i] != NULL; i++)
        free(names[i]);
    free(names);
}

/* Printable form of bytes for failure messages. */
static const char *show(const char *s, size_t n)
{
    static char out[4][2048];
    static int k;
    char *o = out[k = (k + 1) % 4];
    size_t j = 0;

    for (size_t i = 0; i < n && j + 5 < sizeof out[0]; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c < 0x20 || c >= 0x7F)
            j += (size_t)snprintf(o + j, 5, "\\x%02x", c);
        else
            o[j++] = (char)c;
    }
    o[j] = '\0';
    return o;
}

/* ---- case files --------------------------------------------------------------- */

typedef struct Section {
    char name[32];
    char arg[256];
    char *body; /* the lines after the header, NUL-terminated */
    int line;   /* line of the header in the file */
} Section;

typedef struct CaseFile {
    char *text;
    Section sec[64];
    size_t nsec;
} CaseFile;

static void case_load(CaseFile *cf, const char *path)
{
    size_t len;
    char *p;
    int line = 1;

    memset(cf, 0, sizeof *cf);
    cf->text = slurp(path, &len);
    for (p = cf->text; *p; line++) {
        char *eol = strchr(p, '\n');
        char *next = eol ? eol + 1 : p + strlen(p);
        if (p[0] == '#') /* comments: blanked, so line numbers stay */
            memset(p, ' ', (size_t)((eol ? eol : next) - p));
        else if (strncmp(p, "== ", 3) == 0) {
            Section *s = &cf->sec[cf->nsec++];
            assert_true(cf->nsec < 64);
            if (eol)
                *eol = '\0';
            sscanf(p + 3, "%31s %255[^\n]", s->name, s->arg);
            s->body = next;
            s->line = line;
            if (cf->nsec > 1)
                p[0] = '\0'; /* terminate the previous body */
        }
        p = next;
    }
}

/* Next content line of a section body: skips comments and blanks. */
static char *next_line(char **cursor, char *buf, size_t n)
{
    while (**cursor) {
        char *eol = strchr(*cursor, '\n');
        size_t l = eol ? (size_t)(eol - *cursor) : strlen(*cursor);
        char *line = *cursor;
        *cursor += l + (eol != NULL);
        if (strspn(line, " ") >= l || line[0] == '#')
            continue;
        assert_true(l < n);
        memcpy(buf, line, l);
        buf[l] = '\0';
        return buf;
    }
    return NULL;
}

/* Decode a "quoted" token at *p; returns the byte length written to out. */
static size_t unquote(const char **p, char *out)
{
    const char *s = *p + 1;
    size_t o = 0;

    for (; *s && *s != '"'; s++) {
        if (*s != '\\') {
            out[o++] = *s;
            continue;
        }
        s++;
        if (*s == 'n')
            out[o++] = '\n';
        else if (*s == 't')
            out[o++] = '\t';
        else if (*s == 'x') {
            unsigned v;
            assert_int_equal(sscanf(s + 1, "%2x", &v), 1);
            out[o++] = (char)v;
            s += 2;
        } else
            out[o++] = *s;
    }
    assert_int_equal(*s, '"');
    *p = s + 1;
    return o;
}

typedef struct Token {
    RulesValKind kind;
    char data[512];
    size_t len;
} Token;

static size_t tokenize(const char *s, Token *toks, size_t max)
{
    size_t n = 0;

    while (*s) {
        while (*s == ' ')
            s++;
        if (*s == '\0')
            break;
        assert_true(n < max);
        Token *t = &toks[n++];
        t->kind = RULES_VAL_TEXT;
        if (*s == '"') {
            t->len = unquote(&s, t->data);
            t->data[t->len] = '\0';
            continue;
        }
        const char *e = strchr(s, ' ');
        t->len = e ? (size_t)(e - s) : strlen(s);
        memcpy(t->data, s, t->len);
        t->data[t->len] = '\0';
        if (strcmp(t->data, "NULL") == 0)
            t->kind = RULES_VAL_NULL;
        else if (strcmp(t->data, "MISSING") == 0)
            t->kind = RULES_VAL_MISSING;
        s += t->len;
    }
    return n;
}

/* ---- eval cases --------------------------------------------------------------- */

typedef struct Emitted {
    RulesInvAction action;
    char s[600];
    size_t len;
    char payload[1200];
    size_t plen;
} Emitted;

typedef struct Collector {
    Emitted e[MAX_EMITS];
    size_t n;
} Collector;

static void collect(void *arg, RulesInvAction action, const char *s, size_t len,
                    const char *payload, size_t payload_len)
{
    Collector *c = arg;
    Emitted *e;

    assert_true(c->n < MAX_EMITS);
    assert_int_equal(strlen(s), len); /* NUL-terminated as promised */
    assert_true(len < sizeof e->s && payload_len < sizeof e->payload);
    e = &c->e[c->n++];
    e->action = action;
    memcpy(e->s, s, len + 1);
    e->len = len;
    e->plen = payload_len;
    if (action == RULES_INV_PUBLISH) {
        assert_non_null(payload);
        memcpy(e->payload, payload, payload_len);
    } else if (action == RULES_INV_REFRESH || action == RULES_INV_STALE) {
        assert_non_null(payload); /* four NUL-separated fields, shown with '|' */
        for (size_t i = 0; i < payload_len; i++)
            e->payload[i] = payload[i] == '\0' ? '|' : payload[i];
    } else {
        assert_null(payload);
        assert_int_equal(payload_len, 0);
    }
}

static const char *const action_names[] = {
    [RULES_INV_KEY] = "key",         [RULES_INV_PATTERN] = "pattern",
    [RULES_INV_TAG] = "tag",         [RULES_INV_TAG_PATTERN] = "tag-pattern",
    [RULES_INV_VERSION] = "version", [RULES_INV_VERSION_PATTERN] = "version-pattern",
    [RULES_INV_PUBLISH] = "publish", [RULES_INV_REFRESH] = "refresh",
    [RULES_INV_STALE] = "stale",
};

static void parse_expect_line(const char *line, Emitted *e)
{
    char word[32];
    const char *rest;
    size_t wl = strcspn(line, " ");
    bool quoted;
    size_t a;

    memset(e, 0, sizeof *e);
    assert_true(wl < sizeof word && line[wl] == ' ');
    memcpy(word, line, wl);
    word[wl] = '\0';
    quoted = word[wl - 1] == '~';
    if (quoted)
        word[wl - 1] = '\0';
    for (a = 0; a <= RULES_INV_STALE && strcmp(action_names[a], word) != 0; a++)
        ;
    if (a > RULES_INV_STALE)
        fail_msg("unknown action in expect line: %s", line);
    e->action = (RulesInvAction)a;
    rest = line + wl + 1;
    if (e->action == RULES_INV_PUBLISH || e->action == RULES_INV_REFRESH ||
        e->action == RULES_INV_STALE) {
        const char *sp = strchr(rest, ' ');
        assert_non_null(sp);
        e->len = (size_t)(sp - rest);
        memcpy(e->s, rest, e->len);
        e->plen = strlen(sp + 1);
        memcpy(e->payload, sp + 1, e->plen);
    } else if (quoted) {
        e->len = unquote(&rest, e->s);
    } else {
        e->len = strlen(rest);
        memcpy(e->s, rest, e->len);
    }
}

static bool emitted_equal(const Emitted *a, const Emitted *b)
{
    return a->action == b->action && a->len == b->len && memcmp(a->s, b->s, a->len) == 0 &&
           a->plen == b->plen && memcmp(a->payload, b->payload, a->plen) == 0;
}

static void print_emits(const char *title, const Emitted *e, size_t n)
{
    print_message("  %s (%zu):\n", title, n);
    for (size_t i = 0; i < n; i++)
        print_message("    %s %s%s%s\n", action_names[e[i].action], show(e[i].s, e[i].len),
                      e[i].plen ? " " : "", show(e[i].payload, e[i].plen));
}

/* Values of an old/new line. */
typedef struct Image {
    bool present;
    RulesValue vals[MAX_COLS];
    Token toks[MAX_COLS];
} Image;

typedef struct ChangeSpec {
    char table[128], lsn[64], time[64];
    bool has_lsn, has_time, partition_row;
    RulesOp op;
    uint32_t xid;
    Token coltoks[MAX_COLS];
    const char *colnames[MAX_COLS];
    size_t ncols;
    Image old, new;
} ChangeSpec;

static void image_line(Image *img, const char *rest, size_t ncols)
{
    size_t n = tokenize(rest, img->toks, MAX_COLS);
    assert_int_equal(n, ncols);
    img->present = true;
    for (size_t i = 0; i < n; i++)
        img->vals[i] = (RulesValue){img->toks[i].kind, img->toks[i].data, img->toks[i].len};
}

static RulesOp parse_op(const char *s)
{
    static const char *const names[] = {"insert", "update", "delete", "truncate"};
    for (int i = 0; i < 4; i++)
        if (strcmp(s, names[i]) == 0)
            return (RulesOp)(1 << i);
    fail_msg("unknown op %s", s);
    return RULES_INSERT;
}

static void change_parse(char *body, ChangeSpec *cs)
{
    char buf[2048];
    char *cur = body, *line;

    memset(cs, 0, sizeof *cs);
    strcpy(cs->lsn, "0/16B3748");
    strcpy(cs->time, "2026-11-27T03:22:20.123456Z");
    cs->has_lsn = cs->has_time = true;
    cs->xid = 1234;
    while ((line = next_line(&cur, buf, sizeof buf)) != NULL) {
        char *rest = strchr(line, ' ');
        rest = rest ? rest + 1 : line + strlen(line);
        if (strncmp(line, "table ", 6) == 0)
            snprintf(cs->table, sizeof cs->table, "%s", rest);
        else if (strncmp(line, "op ", 3) == 0)
            cs->op = parse_op(rest);
        else if (strncmp(line, "cols ", 5) == 0) {
            cs->ncols = tokenize(rest, cs->coltoks, MAX_COLS);
            for (size_t i = 0; i < cs->ncols; i++)
                cs->colnames[i] = cs->coltoks[i].data;
        } else if (strncmp(line, "old ", 4) == 0)
            image_line(&cs->old, rest, cs->ncols);
        else if (strncmp(line, "new ", 4) == 0)
            image_line(&cs->new, rest, cs->ncols);
        else if (strncmp(line, "lsn ", 4) == 0) {
            cs->has_lsn = strcmp(rest, "-") != 0;
            snprintf(cs->lsn, sizeof cs->lsn, "%s", rest);
        } else if (strncmp(line, "time ", 5) == 0) {
            cs->has_time = strcmp(rest, "-") != 0;
            snprintf(cs->time, sizeof cs->time, "%s", rest);
        } else if (strncmp(line, "xid ", 4) == 0)
            cs->xid = (uint32_t)strtoul(rest, NULL, 10);
        else if (strcmp(line, "partition_row") == 0)
            cs->partition_row = true;
        else
            fail_msg("unknown change line: %s", line);
    }
}

static void check_meta(const Rules *r, char *body, const char *file)
{
    char buf[512];
    char *cur = body, *line;

    while ((line = next_line(&cur, buf, sizeof buf)) != NULL) {
        Token toks[8];
        size_t n = tokenize(line, toks, 8);
        if (strcmp(toks[0].data, "use_del") == 0) {
            assert_int_equal(rules_use_del(r), strcmp(toks[1].data, "true") == 0);
        } else if (strcmp(toks[0].data, "tag_prefix") == 0) {
            assert_string_equal(rules_tag_prefix(r), n > 1 ? toks[1].data : "");
        } else if (strcmp(toks[0].data, "tables") == 0) {
            assert_int_equal(rules_table_count(r), n - 1);
            for (size_t i = 1; i < n; i++) {
                assert_string_equal(rules_table(r, i - 1), toks[i].data);
                assert_true(rules_has_table(r, toks[i].data));
            }
            assert_null(rules_table(r, n - 1));
        } else {
            fail_msg("%s: unknown meta line: %s", file, line);
        }
    }
}

/* Compare stats with a "== stats" section: "matched M widened W emitted E"
 * and optionally "changed_missing N", "refreshes N", "refresh_deletes N",
 * "stales N" (each 0 unless given). */
static void check_stats(const RulesEvalStats *got, const Section *st, const char *file, int line)
{
    static const char *const names[] = {"matched",         "widened",   "emitted",
                                        "changed_missing", "refreshes", "refresh_deletes",
                                        "stales"};
    const unsigned have[] = {got->matched,         got->widened,   got->emitted,
                             got->changed_missing, got->refreshes, got->refresh_deletes,
                             got->stales};
    unsigned want[7] = {0};
    bool given[7] = {false};
    const char *p = st->body;
    char name[32];
    unsigned v;
    int used;

    while (sscanf(p, " %31s %u%n", name, &v, &used) == 2) {
        size_t k = 0;
        while (k < 7 && strcmp(names[k], name) != 0)
            k++;
        if (k == 7)
            fail_msg("%s: line %d: unknown stats field \"%s\"", file, line, name);
        want[k] = v;
        given[k] = true;
        p += used;
    }
    if (!given[0] || !given[1] || !given[2])
        fail_msg("%s: line %d: stats need matched, widened and emitted", file, line);
    for (size_t k = 0; k < 7; k++)
        if (have[k] != want[k])
            fail_msg("%s: change at line %d: stats %s %u, expected %u", file, line, names[k],
                     have[k], want[k]);
}

/* Run one change against r and compare with the expect/stats sections. */
static void run_change(const Rules *r, Section *chg, Section *exp, Section *st, const char *file)
{
    ChangeSpec cs;
    Collector got = {.n = 0};
    Emitted want[MAX_EMITS];
    size_t nwant = 0;
    char buf[2048];
    char *cur, *line;
    RulesEvalStats stats = {0};
    unsigned matched;

    change_parse(chg->body, &cs);
    RulesChange c = {cs.table,
                     cs.op,
                     cs.ncols,
                     cs.colnames,
                     cs.old.present ? cs.old.vals : NULL,
                     cs.new.present ? cs.new.vals : NULL,
                     cs.has_lsn ? cs.lsn : NULL,
                     cs.xid,
                     cs.has_time ? cs.time : NULL,
                     cs.partition_row,
                     false,
                     0,
                     0,
                     0};
    matched = rules_eval(r, &c, collect, &got, &stats);
    cur = exp->body;
    while ((line = next_line(&cur, buf, sizeof buf)) != NULL) {
        assert_true(nwant < MAX_EMITS);
        parse_expect_line(line, &want[nwant++]);
    }
    bool same = got.n == nwant;
    for (size_t i = 0; same && i < nwant; i++)
        same = emitted_equal(&got.e[i], &want[i]);
    if (!same) {
        print_message("%s: change at line %d\n", file, chg->line);
        print_emits("expected", want, nwant);
        print_emits("got", got.e, got.n);
        fail_msg("%s: wrong invalidations for the change at line %d", file, chg->line);
    }
    assert_int_equal(matched, stats.matched);
    assert_int_equal(stats.emitted, got.n);
    if (st != NULL)
        check_stats(&stats, st, file, chg->line);
}

static Rules *parse_or_fail(const char *json, size_t len, const char *what)
{
    RulesProblems pr = {0, NULL};
    Rules *r = rules_parse(json, len, &pr);

    for (size_t i = 0; i < pr.count; i++)
        print_message("%s:%d:%d: %s: %s\n", what, pr.items[i].line, pr.items[i].column,
                      pr.items[i].path, pr.items[i].msg);
    if (r == NULL)
        fail_msg("%s: rules did not load", what);
    assert_int_equal(pr.count, 0);
    return r;
}

static void run_eval_file(const char *name)
{
    char path[512];
    CaseFile cf;
    Rules *r = NULL;
    size_t nchanges = 0;

    snprintf(path, sizeof path, "%s/eval/%s", FIXTURES, name);
    case_load(&cf, path);
    for (size_t i = 0; i < cf.nsec; i++) {
        Section *s = &cf.sec[i];
        if (strcmp(s->name, "rules") == 0) {
            rules_free(r);
            r = parse_or_fail(s->body, strlen(s->body), name);
        } else if (strcmp(s->name, "meta") == 0) {
            check_meta(r, s->body, name);
        } else if (strcmp(s->name, "change") == 0) {
            Section *exp = i + 1 < cf.nsec ? &cf.sec[i + 1] : NULL;
            Section *st = i + 2 < cf.nsec ? &cf.sec[i + 2] : NULL;
            assert_non_null(r);
            if (exp == NULL || strcmp(exp->name, "expect") != 0)
                fail_msg("%s: change at line %d has no expect section", name, s->line);
            if (st != NULL && strcmp(st->name, "stats") != 0)
                st = NULL;
            run_change(r, s, exp, st, name);
            nchanges++;
        } else if (strcmp(s->name, "expect") != 0 && strcmp(s->name, "stats") != 0) {
            fail_msg("%s: unknown section %s", name, s->name);
        }
    }
    assert_true(nchanges > 0);
    rules_free(r);
    free(cf.text);
}

static void test_eval_cases(void **state)
{
    char dir[512];
    char **names;

    (void)state;
    snprintf(dir, sizeof dir, "%s/eval", FIXTURES);
    names = list_dir(dir, ".case");
    for (size_t i = 0; names[i] != NULL; i++) {
        print_message("  eval/%s\n", names[i]);
        run_eval_file(names[i]);
    }
    free_list(names);
}

/* ---- bad files ------------------------------------------------------------------ */

static void print_problems(const RulesProblems *pr)
{
    for (size_t i = 0; i < pr->count; i++)
        print_message("    %d:%d %s %s\n", pr->items[i].line, pr->items[i].column,
                      pr->items[i].path[0] ? pr->items[i].path : "-", pr->items[i].msg);
}

/* Compare problems[from..] with the "L:C PATH TEXT" lines of an expectation. */
static void match_problems(const RulesProblems *pr, size_t from, char *body, const char *what)
{
    char buf[1024];
    char *cur = body, *line;
    size_t k = from;

    while ((line = next_line(&cur, buf, sizeof buf)) != NULL) {
        int l, c, off = 0;
        char path[128];
        if (sscanf(line, "%d:%d %127s %n", &l, &c, path, &off) != 3 || off == 0)
            fail_msg("%s: bad expect line: %s", what, line);
        if (strcmp(path, "-") == 0)
            path[0] = '\0';
        if (k >= pr->count) {
            print_problems(pr);
            fail_msg("%s: missing problem %s", what, line);
        }
        const RulesProblem *p = &pr->items[k++];
        const char *want = line + off, *hit = strstr(p->msg, want);
        size_t wl = strlen(want);
        /* A trailing '$' anchors the text at the end of the message. */
        if (wl > 0 && want[wl - 1] == '$') {
            size_t ml = strlen(p->msg);
            hit = ml >= wl - 1 && memcmp(p->msg + ml - (wl - 1), want, wl - 1) == 0 ? p->msg : NULL;
        }
        if (p->line != l || p->column != c || strcmp(p->path, path) != 0 || hit == NULL) {
            print_problems(pr);
            fail_msg("%s: problem %zu is %d:%d %s \"%s\", expected %s", what, k - from, p->line,
                     p->column, p->path, p->msg, line);
        }
    }
    if (k != pr->count) {
        print_problems(pr);
        fail_msg("%s: %zu problems, expected %zu", what, pr->count - from, k - from);
    }
}

static void test_bad_files(void **state)
{
    char dir[512];
    char **names;

    (void)state;
    snprintf(dir, sizeof dir, "%s/bad", FIXTURES);
    names = list_dir(dir, ".json");
    for (size_t i = 0; names[i] != NULL; i++) {
        char path[600];
        size_t len, elen;
        RulesProblems pr = {0, NULL};

        print_message("  bad/%s\n", names[i]);
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        char *json = slurp(path, &len);
        strcpy(path + strlen(path) - 5, ".expect");
        char *expect = slurp(path, &elen);
        Rules *r = rules_parse(json, len, &pr);
        assert_null(r);
        assert_true(pr.count > 0);
        match_problems(&pr, 0, expect, names[i]);
        rules_problems_release(&pr);
        assert_int_equal(pr.count, 0);
        assert_null(pr.items);
        free(json);
        free(expect);
    }
    free_list(names);
}

/* ---- catalog cases ------------------------------------------------------------- */

typedef struct FakeTable {
    RulesTableInfo info;
    char name[128];
    Token coltoks[MAX_COLS];
    const char *colnames[MAX_COLS];
    bool identity[MAX_COLS];
    bool unknown;    /* lookup returns NULL */
    char strs[1024]; /* storage for the string fields below */
    size_t used;
    const char *unpublished[MAX_COLS];
    const char *not_full[MAX_COLS];
} FakeTable;

/* A copy of s in t's storage. */
static const char *fake_str(FakeTable *t, const char *s)
{
    size_t n = strlen(s) + 1;
    char *p = t->strs + t->used;

    assert_true(t->used + n <= sizeof t->strs);
    memcpy(p, s, n);
    t->used += n;
    return p;
}

/* "|"-separated names into out; returns how many. */
static size_t fake_list(FakeTable *t, const char *s, const char **out)
{
    char *copy = (char *)fake_str(t, s);
    size_t n = 0;

    for (char *tok = strtok(copy, "|"); tok != NULL && n < MAX_COLS; tok = strtok(NULL, "|"))
        out[n++] = tok;
    return n;
}

typedef struct FakeCatalog {
    FakeTable t[8];
    size_t n;
    unsigned lookups;
} FakeCatalog;

static const RulesTableInfo *fake_lookup(void *arg, const char *table)
{
    FakeCatalog *fc = arg;

    fc->lookups++;
    for (size_t i = 0; i < fc->n; i++)
        if (strcmp(fc->t[i].name, table) == 0)
            return fc->t[i].unknown ? NULL : &fc->t[i].info;
    return NULL;
}

static void fake_table(FakeCatalog *fc, const char *name, char *body)
{
    FakeTable *t = &fc->t[fc->n++];
    char buf[512];
    char *cur = body, *line;

    assert_true(fc->n <= 8);
    memset(t, 0, sizeof *t);
    snprintf(t->name, sizeof t->name, "%s", name);
    t->info = (RulesTableInfo){.table = t->name,
                               .exists = true,
                               .replident = 'd',
                               .colnames = t->colnames,
                               .identity = t->identity,
                               .in_publication = true};
    while ((line = next_line(&cur, buf, sizeof buf)) != NULL) {
        char *rest = strchr(line, ' ');
        rest = rest ? rest + 1 : line + strlen(line);
        if (strncmp(line, "replident ", 10) == 0)
            t->info.replident = rest[0];
        else if (strncmp(line, "publication ", 12) == 0)
            t->info.in_publication = strcmp(rest, "yes") == 0;
        else if (strncmp(line, "exists ", 7) == 0)
            t->info.exists = strcmp(rest, "yes") == 0;
        else if (strcmp(line, "unknown") == 0)
            t->unknown = true;
        else if (strncmp(line, "via_root ", 9) == 0)
            t->info.via_root = strcmp(rest, "yes") == 0;
        else if (strncmp(line, "relkind ", 8) == 0)
            t->info.relkind = rest[0];
        else if (strncmp(line, "suggestion ", 11) == 0)
            t->info.suggestion = fake_str(t, rest);
        else if (strncmp(line, "sql_name ", 9) == 0)
            t->info.sql_name = fake_str(t, rest);
        else if (strncmp(line, "ops_publication ", 16) == 0)
            t->info.ops_publication = fake_str(t, rest);
        else if (strncmp(line, "pub_ops ", 8) == 0)
            t->info.pub_ops = (unsigned)atoi(rest);
        else if (strncmp(line, "unpublished ", 12) == 0)
            t->info.nunpublished = fake_list(t, rest, t->unpublished),
            t->info.unpublished = t->unpublished;
        else if (strncmp(line, "not_full ", 9) == 0)
            t->info.nnot_full = fake_list(t, rest, t->not_full), t->info.not_full = t->not_full;
        else if (strncmp(line, "columns ", 8) == 0) {
            /* "id*" marks a replica identity column */
            t->info.ncols = tokenize(rest, t->coltoks, MAX_COLS);
            for (size_t i = 0; i < t->info.ncols; i++) {
                Token *k = &t->coltoks[i];
                t->identity[i] = k->len > 1 && k->data[k->len - 1] == '*';
                if (t->identity[i])
                    k->data[--k->len] = '\0';
                t->colnames[i] = k->data;
            }
        } else
            fail_msg("unknown table line: %s", line);
    }
}

static void run_catalog_file(const char *name)
{
    char path[512];
    CaseFile cf;
    FakeCatalog fc;
    Rules *r = NULL;
    const char *publication = "walbust";
    bool checked = false;

    memset(&fc, 0, sizeof fc);
    snprintf(path, sizeof path, "%s/catalog/%s", FIXTURES, name);
    case_load(&cf, path);
    for (size_t i = 0; i < cf.nsec; i++) {
        Section *s = &cf.sec[i];
        if (strcmp(s->name, "rules") == 0) {
            r = parse_or_fail(s->body, strlen(s->body), name);
        } else if (strcmp(s->name, "rules-file") == 0) {
            size_t len;
            char file[512];
            snprintf(file, sizeof file, "%s/%s", SOURCE_DIR, s->arg);
            char *json = slurp(file, &len);
            r = parse_or_fail(json, len, s->arg);
            free(json);
        } else if (strcmp(s->name, "table") == 0) {
            fake_table(&fc, s->arg, s->body);
        } else if (strcmp(s->name, "publication") == 0) {
            publication = s->arg;
        } else if (strcmp(s->name, "expect") == 0) {
            RulesProblems pr = {0, NULL};
            size_t added;
            assert_non_null(r);
            /* Appends after what is already there. */
            pr.items = calloc(1, sizeof *pr.items);
            pr.count = 1;
            added = rules_check_catalog(r, publication, fake_lookup, &fc, &pr);
            assert_int_equal(added, pr.count - 1);
            match_problems(&pr, 1, s->body, name);
            rules_problems_release(&pr);
            checked = true;
        } else {
            fail_msg("%s: unknown section %s", name, s->name);
        }
    }
    assert_true(checked);
    assert_true(fc.lookups > 0);
    rules_free(r);
    free(cf.text);
}

static void test_catalog_cases(void **state)
{
    char dir[512];
    char **names;

    (void)state;
    snprintf(dir, sizeof dir, "%s/catalog", FIXTURES);
    names = list_dir(dir, ".case");
    for (size_t i = 0; names[i] != NULL; i++) {
        print_message("  catalog/%s\n", names[i]);
        run_catalog_file(names[i]);
    }
    free_list(names);
}

/* ---- glob escaping ---------------------------------------------------------------- */

static void test_glob_escape(void **state)
{
    char out[64];

    (void)state;
    assert_int_equal(rules_glob_escape("", 0, out), 0);
    assert_string_equal(out, "");
    assert_int_equal(rules_glob_escape("a*b?c[d]e\\f", 11, out), 16);
    assert_string_equal(out, "a\\*b\\?c\\[d\\]e\\\\f");
    assert_int_equal(rules_glob_escape("plain:{x}^-!", 12, out), 12);
    assert_string_equal(out, "plain:{x}^-!");
    /* Only len bytes are read. */
    assert_int_equal(rules_glob_escape("**", 1, out), 2);
    assert_string_equal(out, "\\*");
}

/* Redis' glob (stringmatchlen): *, ?, [set] with ^ and ranges, \ escapes. */
static bool glob_match(const char *p, size_t pl, const char *s, size_t sl)
{
    while (pl > 0) {
        if (*p == '*') {
            for (size_t k = 0; k <= sl; k++)
                if (glob_match(p + 1, pl - 1, s + k, sl - k))
                    return true;
            return false;
        }
        if (sl == 0)
            return false;
        if (*p == '?') {
            p++, pl--, s++, sl--;
            continue;
        }
        if (*p == '[') {
            bool neg, hit = false;
            p++, pl--;
            neg = pl > 0 && *p == '^';
            if (neg)
                p++, pl--;
            while (pl > 0 && *p != ']') {
                if (*p == '\\' && pl >= 2) {
                    hit = hit || p[1] == *s;
                    p += 2, pl -= 2;
                } else if (pl >= 3 && p[1] == '-') {
                    hit = hit || (*s >= p[0] && *s <= p[2]);
                    p += 3, pl -= 3;
                } else {
                    hit = hit || *p == *s;
                    p++, pl--;
                }
            }
            if (pl > 0)
                p++, pl--;
            if (hit == neg)
                return false;
            s++, sl--;
            continue;
        }
        if (*p == '\\' && pl >= 2)
            p++, pl--;
        if (*p != *s)
            return false;
        p++, pl--, s++, sl--;
    }
    return sl == 0;
}

static uint32_t rng_state = 12345;

static uint32_t rng(void)
{
    rng_state = rng_state * 1103515245u + 12345u;
    return rng_state >> 8;
}

static size_t random_value(char *buf, size_t max)
{
    static const char alphabet[] = "ab*?[]\\^-:{}x ";
    size_t n = rng() % max;
    for (size_t i = 0; i < n; i++)
        buf[i] = rng() % 4 == 0 ? (char)(1 + rng() % 255) : alphabet[rng() % (sizeof alphabet - 1)];
    return n;
}

/* In pattern p, is every glob metacharacter escaped except the expected
 * number of bare '*'? Returns the count of unescaped metacharacters. */
static size_t bare_metachars(const char *p, size_t n)
{
    size_t bare = 0;
    for (size_t i = 0; i < n; i++) {
        if (p[i] == '\\')
            i++;
        else if (strchr("*?[]", p[i]) != NULL)
            bare++;
    }
    return bare;
}

static void test_random_glob_escape(void **state)
{
    static const char json[] = "{\"rules\": [{\"table\": \"public.t\", \"keys\": [\"k:{v}:{m}\"],"
                               " \"patterns\": [\"p:{v}:x\"]}]}";
    static const char *const cols[] = {"v", "m"};
    Rules *r;

    (void)state;
    r = parse_or_fail(json, strlen(json), "random");
    for (int iter = 0; iter < 3000; iter++) {
        char v[40], v2[40], probe[128];
        size_t vl = random_value(v, sizeof v), v2l = random_value(v2, sizeof v2);
        RulesValue vals[2] = {{RULES_VAL_TEXT, v, vl}, {RULES_VAL_MISSING, NULL, 0}};
        RulesChange c = {"public.t", RULES_INSERT, 2,     cols,  NULL, vals, "0/1",
                         1,          "t",          false, false, 0,    0,    0};
        Collector got = {.n = 0};

        assert_int_equal(rules_eval(r, &c, collect, &got, NULL), 1);
        assert_int_equal(got.n, 2);
        for (size_t i = 0; i < 2; i++) {
            const Emitted *e = &got.e[i];
            bool widened_key = i == 0;
            assert_int_equal(e->action, RULES_INV_PATTERN);
            /* The only bare metacharacter is the widened `*` for {m}. */
            assert_int_equal(bare_metachars(e->s, e->len), widened_key ? 1 : 0);
            /* It matches the literal rendering of this value... */
            int pl = snprintf(probe, sizeof probe, widened_key ? "k:%.*s:anything" : "p:%.*s:x",
                              (int)vl, v);
            if (!glob_match(e->s, e->len, probe, (size_t)pl))
                fail_msg("pattern %s does not match %s", show(e->s, e->len),
                         show(probe, (size_t)pl));
            /* ...and another value's only when the value's own text says so:
             * exactly for the pattern, as a prefix "k:<v>:" for the widened key. */
            pl = snprintf(probe, sizeof probe, widened_key ? "k:%.*s:anything" : "p:%.*s:x",
                          (int)v2l, v2);
            bool same = widened_key ? (size_t)pl >= vl + 3 && memcmp(probe + 2, v, vl) == 0 &&
                                          probe[2 + vl] == ':'
                                    : v2l == vl && memcmp(v, v2, vl) == 0;
            assert_int_equal(glob_match(e->s, e->len, probe, (size_t)pl), same);
        }
    }
    rules_free(r);
}

/* ---- behaviours that need code rather than data ---------------------------------- */

/* The column cache is keyed by the colnames pointer; when the same array is
 * reused for a different shape, names are checked and re-resolved. */
static void test_column_cache(void **state)
{
    static const char json[] = "{\"rules\": [{\"table\": \"public.t\", \"keys\": [\"k:{b}\"]}]}";
    const char *names[2] = {"a", "b"};
    RulesValue vals[2] = {{RULES_VAL_TEXT, "1", 1}, {RULES_VAL_TEXT, "2", 1}};
    RulesChange c = {"public.t", RULES_INSERT, 2,     names, NULL, vals, "0/1",
                     1,          "t",          false, false, 0,    0,    0};
    Collector got = {.n = 0};
    Rules *r;

    (void)state;
    r = parse_or_fail(json, strlen(json), "cache");
    assert_int_equal(rules_eval(r, &c, collect, &got, NULL), 1);
    assert_string_equal(got.e[0].s, "k:2");
    names[0] = "b"; /* same pointer and count, columns swapped */
    names[1] = "a";
    got.n = 0;
    assert_int_equal(rules_eval(r, &c, collect, &got, NULL), 1);
    assert_string_equal(got.e[0].s, "k:1");
    /* A different array with fewer columns: b is gone, widened. */
    const char *one[1] = {"a"};
    c.colnames = one;
    c.ncols = 1;
    got.n = 0;
    assert_int_equal(rules_eval(r, &c, collect, &got, NULL), 1);
    assert_int_equal(got.e[0].action, RULES_INV_PATTERN);
    assert_string_equal(got.e[0].s, "k:*");
    rules_free(r);
}

/* With RulesChange.shape set, the mapping of a shape is reused without
 * checking names; a new shape on the same recycled array is re-resolved. */
static void test_column_cache_shape(void **state)
{
    static const char json[] = "{\"rules\": [{\"table\": \"public.t\", \"keys\": [\"k:{b}\"]}]}";
    const char *names[2] = {"a", "b"};
    RulesValue vals[2] = {{RULES_VAL_TEXT, "1", 1}, {RULES_VAL_TEXT, "2", 1}};
    RulesChange c = {.table = "public.t",
                     .op = RULES_INSERT,
                     .ncols = 2,
                     .colnames = names,
                     .new_vals = vals,
                     .shape = 7};
    Collector got = {.n = 0};
    Rules *r;

    (void)state;
    r = parse_or_fail(json, strlen(json), "cache");
    assert_int_equal(rules_eval(r, &c, collect, &got, NULL), 1);
    assert_string_equal(got.e[0].s, "k:2");
    got.n = 0;
    assert_int_equal(rules_eval(r, &c, collect, &got, NULL), 1); /* cached */
    assert_string_equal(got.e[0].s, "k:2");
    names[0] = "b"; /* the array recycled for another relation: a new shape */
    names[1] = "a";
    c.shape = 8;
    got.n = 0;
    assert_int_equal(rules_eval(r, &c, collect, &got, NULL), 1);
    assert_string_equal(got.e[0].s, "k:1");
    /* Shape 0 (unknown) is checked by name every time, as before. */
    names[0] = "a";
    names[1] = "b";
    c.shape = 0;
    got.n = 0;
    assert_int_equal(rules_eval(r, &c, collect, &got, NULL), 1);
    assert_string_equal(got.e[0].s, "k:2");
    rules_free(r);
}

/* rules_eval() remembers tables by the address of the change's name: changes
 * alternating between tables get each table's rules, and an address reused
 * for another table's name (the decoder freed one relation and allocated
 * the next there) gets the new table's rules, not the remembered ones. */
static void test_recent_tables(void **state)
{
    static const char json[] = "{\"rules\": [{\"table\": \"public.a\", \"keys\": [\"a:{id}\"]},"
                               " {\"table\": \"public.b\", \"keys\": [\"b:{id}\"]}]}";
    const char *names[1] = {"id"};
    RulesValue vals[1] = {{RULES_VAL_TEXT, "5", 1}};
    char a[16] = "public.a", b[16] = "public.b", other[16] = "public.zz";
    RulesChange c = {.op = RULES_INSERT, .ncols = 1, .colnames = names, .new_vals = vals};
    Collector got = {.n = 0};
    Rules *r = parse_or_fail(json, strlen(json), "recent");

    (void)state;
    for (int round = 0; round < 3; round++) {
        c.table = a;
        got.n = 0;
        assert_int_equal(rules_eval(r, &c, collect, &got, NULL), 1);
        assert_string_equal(got.e[0].s, "a:5");
        c.table = b;
        got.n = 0;
        assert_int_equal(rules_eval(r, &c, collect, &got, NULL), 1);
        assert_string_equal(got.e[0].s, "b:5");
    }
    strcpy(a, "public.b"); /* the same address, now another table's name */
    c.table = a;
    got.n = 0;
    assert_int_equal(rules_eval(r, &c, collect, &got, NULL), 1);
    assert_string_equal(got.e[0].s, "b:5");
    strcpy(a, other); /* and now a table without rules */
    got.n = 0;
    assert_int_equal(rules_eval(r, &c, collect, &got, NULL), 0);
    assert_int_equal(got.n, 0);
    rules_free(r);
}

/* `changed` filters are decided by bitmasks over a table's distinct
 * filter columns (at most 64); a table whose rules name more filters rule
 * by rule. Both must fire exactly the rules whose columns changed. */
static void check_changed_columns(size_t ncols)
{
    size_t cap = 96 * ncols + 32, len = 0;
    char *json = malloc(cap);
    const char **names = calloc(ncols + 1, sizeof *names);
    RulesValue *oldv = calloc(ncols + 1, sizeof *oldv), *newv = calloc(ncols + 1, sizeof *newv);
    char(*colname)[16] = calloc(ncols, sizeof *colname);
    RulesChange c = {.table = "public.w",
                     .op = RULES_UPDATE,
                     .ncols = ncols + 1,
                     .colnames = names,
                     .old_vals = oldv,
                     .new_vals = newv,
                     .shape = 3};
    Collector got = {.n = 0};
    RulesEvalStats st = {0};
    Rules *r;

    assert_non_null(json);
    len += (size_t)snprintf(json + len, cap - len, "{\"rules\": [");
    for (size_t i = 0; i < ncols; i++)
        len += (size_t)snprintf(
            json + len, cap - len,
            "%s{\"table\": \"w\", \"changed\": [\"c%zu\"], \"keys\": [\"k%zu:{id}\"]}",
            i ? ", " : "", i, i);
    len += (size_t)snprintf(json + len, cap - len, "]}");
    assert_true(len < cap);
    r = parse_or_fail(json, len, "changed_columns");
    names[0] = "id";
    oldv[0] = newv[0] = (RulesValue){RULES_VAL_TEXT, "1", 1};
    for (size_t i = 0; i < ncols; i++) {
        snprintf(colname[i], sizeof colname[i], "c%zu", i);
        names[i + 1] = colname[i];
        oldv[i + 1] = (RulesValue){RULES_VAL_TEXT, "0", 1};
        newv[i + 1] = (RulesValue){RULES_VAL_TEXT, i == 3 || i == ncols - 2 ? "1" : "0", 1};
    }
    assert_int_equal(rules_eval(r, &c, collect, &got, &st), 2);
    assert_int_equal(got.n, 2);
    assert_string_equal(got.e[0].s, "k3:1");
    char want[32];
    snprintf(want, sizeof want, "k%zu:1", ncols - 2);
    assert_string_equal(got.e[1].s, want);
    assert_int_equal(st.changed_missing, 0);
    /* Again (the cached mapping of the shape), now without c3's value in the
     * old image: not carried counts as changed. */
    got.n = 0;
    oldv[4] = (RulesValue){RULES_VAL_MISSING, NULL, 0};
    newv[ncols - 1] = (RulesValue){RULES_VAL_TEXT, "0", 1};
    assert_int_equal(rules_eval(r, &c, collect, &got, NULL), 1);
    assert_string_equal(got.e[0].s, "k3:1");
    rules_free(r);
    free(json);
    free(names);
    free(oldv);
    free(newv);
    free(colname);
}

static void test_changed_columns(void **state)
{
    (void)state;
    check_changed_columns(10); /* bitmasks */
    check_changed_columns(64); /* bitmasks, every bit */
    check_changed_columns(70); /* rule by rule */
}

/* Rule numbers of the keys "k<n>:..." an evaluation emitted, in order. */
typedef struct Fired {
    size_t n[256], count;
} Fired;

static void collect_rule_numbers(void *arg, RulesInvAction action, const char *s, size_t len,
                                 const char *payload, size_t payload_len)
{
    Fired *f = arg;

    (void)action, (void)len, (void)payload, (void)payload_len;
    assert_true(f->count < 256 && s[0] == 'k');
    f->n[f->count++] = strtoul(s + 1, NULL, 10);
}

/* An update looks only at the rules without a filter and those naming a
 * column that changed or that the table lacks (per-column bitmaps over
 * the table's rules, three words here). Every combination of changed
 * columns must fire exactly what a rule-by-rule reading of the filters
 * fires, in the rules' order. */
static void test_changed_index(void **state)
{
    enum { NRULES = 150, NCOLS = 5 };
    char *json = malloc(NRULES * 96 + 32);
    size_t len = 0;
    const char *names[NCOLS + 1] = {"id", "c0", "c1", "c2", "c3", "c4"};
    RulesValue oldv[NCOLS + 1], newv[NCOLS + 1];
    unsigned named[NRULES] = {0};
    Rules *r;

    (void)state;
    assert_non_null(json);
    len += (size_t)sprintf(json + len, "{\"rules\": [");
    for (size_t i = 0; i < NRULES; i++) {
        len += (size_t)sprintf(json + len, "%s{\"table\": \"w\", \"keys\": [\"k%zu:{id}\"]",
                               i ? ", " : "", i);
        if (i % 4 != 0) {
            named[i] = 1u << (i % 5);
            if (i % 3 == 0)
                named[i] |= 1u << ((i + 2) % 5);
            len += (size_t)sprintf(json + len, ", \"changed\": [\"c%zu\"", i % 5);
            if (i % 3 == 0)
                len += (size_t)sprintf(json + len, ", \"c%zu\"", (i + 2) % 5);
            len += (size_t)sprintf(json + len, "]");
        }
        len += (size_t)sprintf(json + len, "}");
    }
    len += (size_t)sprintf(json + len, "]}");
    r = parse_or_fail(json, len, "changed_index");
    /* Every subset of changed columns; then the same with c4 not in the
     * table (a column a migration dropped counts as changed). */
    for (unsigned lacks = 0; lacks < 2; lacks++) {
        for (unsigned changed = 0; changed < (1u << NCOLS); changed++) {
            RulesChange c = {.table = "public.w",
                             .op = RULES_UPDATE,
                             .ncols = NCOLS + 1 - lacks,
                             .colnames = names,
                             .old_vals = oldv,
                             .new_vals = newv,
                             .shape = 10 + lacks};
            Fired got = {.count = 0};
            RulesEvalStats st = {0};
            size_t want = 0, want_missing = 0;
            unsigned hit = changed | (lacks ? 1u << 4 : 0u);
            oldv[0] = newv[0] = (RulesValue){RULES_VAL_TEXT, "1", 1};
            for (size_t k = 0; k < NCOLS; k++) {
                oldv[k + 1] = (RulesValue){RULES_VAL_TEXT, "0", 1};
                newv[k + 1] = (RulesValue){RULES_VAL_TEXT, changed & (1u << k) ? "1" : "0", 1};
            }
            rules_eval(r, &c, collect_rule_numbers, &got, &st);
            for (size_t i = 0; i < NRULES; i++) {
                if (named[i] != 0 && (named[i] & hit) == 0)
                    continue;
                assert_true(want < got.count);
                assert_int_equal(got.n[want], i);
                want++;
                /* Counted when the filter, read in its order, reaches the
                 * lacking c4 before a column that changed. */
                if (lacks && named[i] != 0 &&
                    (i % 5 == 4 ||
                     (!(changed & (1u << (i % 5))) && i % 3 == 0 && (i + 2) % 5 == 4)))
                    want_missing++;
            }
            assert_int_equal(got.count, want);
            assert_int_equal(st.changed_missing, want_missing);
        }
    }
    rules_free(r);
    free(json);
}

static void test_stats_accumulate(void **state)
{
    static const char json[] = "{\"rules\": [{\"table\": \"t\", \"keys\": [\"k:{a}\"]}]}";
    const char *names[1] = {"a"};
    RulesValue vals[1] = {{RULES_VAL_MISSING, NULL, 0}};
    RulesChange c = {"public.t", RULES_INSERT, 1,     names, NULL, vals, NULL,
                     0,          NULL,         false, false, 0,    0,    0};
    RulesEvalStats st = {0};
    Collector got = {.n = 0};
    Rules *r;

    (void)state;
    r = parse_or_fail(json, strlen(json), "stats");
    for (int i = 0; i < 3; i++)
        assert_int_equal(rules_eval(r, &c, collect, &got, &st), 1);
    assert_int_equal(st.matched, 3);
    assert_int_equal(st.widened, 3);
    assert_int_equal(st.emitted, 3);
    c.op = (RulesOp)0; /* not an event: nothing */
    assert_int_equal(rules_eval(r, &c, collect, &got, &st), 0);
    assert_int_equal(got.n, 3);
    rules_free(r);
}

/* Rules for `hot` (public.hot, each keyed on {id}) plus, with `others`,
 * two rules on each of 5,000 other tables: 10,000 + hot rules. */
static char *many_rules_json(int hot, bool others)
{
    size_t cap = 1 << 20, len = 0;
    char *j = malloc(cap);

    assert_non_null(j);
    len += (size_t)snprintf(j + len, cap - len, "{\"rules\": [");
    for (int i = 0; i < hot; i++)
        len += (size_t)snprintf(j + len, cap - len,
                                "%s{\"table\": \"public.hot\", \"keys\": [\"hot%d:{id}\"]}",
                                i ? ", " : "", i);
    for (int t = 0; others && t < 5000; t++) {
        assert_true(cap - len > 256);
        len += (size_t)snprintf(j + len, cap - len,
                                ", {\"table\": \"public.t%d\", \"keys\": [\"t%d:{id}\"]}"
                                ", {\"table\": \"public.t%d\", \"changed\": [\"v\"], "
                                "\"keys\": [\"t%d:{id}:v\"], \"tags\": [\"t%d\"]}",
                                t, t, t, t, t);
    }
    snprintf(j + len, cap - len, "]}");
    return j;
}

/* Evaluating a change looks only at its own table's rules: with 10,000
 * rules on 5,000 other tables a change on the hot table examines its 10
 * rules and emits exactly what a file of those 10 rules alone emits (the
 * per-change cost measured in `make bench` rules10k follows from this). */
static void test_eval_ignores_other_tables(void **state)
{
    const char *names[2] = {"id", "v"};
    RulesValue vals[2] = {{RULES_VAL_TEXT, "7", 1}, {RULES_VAL_TEXT, "1", 1}};
    RulesChange hot = {"public.hot", RULES_UPDATE, 2,     names, NULL, vals, "0/1", 1,
                       "t",          false,        false, 0,     0,    0};
    RulesChange other = {"public.t4321", RULES_UPDATE, 2, names, vals, vals, "0/1", 1, "t",
                         false,          false,        0, 0,     0};
    RulesChange none = {"public.nope", RULES_UPDATE, 2,     names, NULL, vals, "0/1", 1,
                        "t",           false,        false, 0,     0,    0};
    char *big_json = many_rules_json(10, true), *small_json = many_rules_json(10, false);
    Rules *big = parse_or_fail(big_json, strlen(big_json), "10,010 rules");
    Rules *small = parse_or_fail(small_json, strlen(small_json), "10 rules");
    Collector a = {.n = 0}, b = {.n = 0};
    RulesEvalStats sa = {0}, sb = {0};

    (void)state;
    assert_int_equal(rules_rule_count(big), 10010);
    assert_int_equal(rules_table_count(big), 5001);
    assert_int_equal(rules_eval(big, &hot, collect, &a, &sa), 10);
    assert_int_equal(rules_eval(small, &hot, collect, &b, &sb), 10);
    assert_int_equal(sa.examined, 10);
    assert_int_equal(sb.examined, 10);
    assert_int_equal(a.n, b.n);
    for (size_t i = 0; i < a.n; i++)
        assert_true(emitted_equal(&a.e[i], &b.e[i]));
    /* Another table: its own two rules (the second's `changed` column v is
     * unchanged: old and new are the same image, so it does not fire). */
    memset(&sa, 0, sizeof sa);
    a.n = 0;
    assert_int_equal(rules_eval(big, &other, collect, &a, &sa), 1);
    assert_int_equal(sa.examined, 2);
    assert_int_equal(a.n, 1);
    assert_string_equal(a.e[0].s, "t4321:7");
    /* A table without rules: nothing looked at. */
    memset(&sa, 0, sizeof sa);
    assert_int_equal(rules_eval(big, &none, collect, &a, &sa), 0);
    assert_int_equal(sa.examined, 0);
    rules_free(big);
    rules_free(small);
    free(big_json);
    free(small_json);
}

static void test_example_file(void **state)
{
    char path[512];
    size_t len;
    char *json;
    Rules *r;

    (void)state;
    snprintf(path, sizeof path, "%s/rules/example.json", SOURCE_DIR);
    json = slurp(path, &len);
    r = parse_or_fail(json, len, "rules/example.json");
    assert_int_equal(rules_table_count(r), 3);
    assert_string_equal(rules_table(r, 0), "public.users");
    assert_string_equal(rules_table(r, 1), "public.teams");
    assert_string_equal(rules_table(r, 2), "public.products");
    assert_false(rules_has_table(r, "public.orders"));
    assert_false(rules_use_del(r));
    assert_string_equal(rules_tag_prefix(r), "tag:");
    rules_free(r);
    free(json);
}

static void test_parse_edges(void **state)
{
    RulesProblems pr = {0, NULL};
    static const char nul[] = "{\"rules\": []}\0{";
    Rules *r;

    (void)state;
    r = rules_parse(nul, sizeof nul - 1, &pr);
    assert_null(r);
    assert_int_equal(pr.count, 1);
    assert_int_equal(pr.items[0].line, 1);
    assert_int_equal(pr.items[0].column, 14);
    assert_non_null(strstr(pr.items[0].msg, "NUL byte"));
    /* Problems append to what is there; the text need not be terminated. */
    static const char part[] = "{\"rules\": 1}XXXX";
    r = rules_parse(part, 12, &pr);
    assert_null(r);
    assert_int_equal(pr.count, 2);
    assert_string_equal(pr.items[1].path, "rules");
    rules_problems_release(&pr);
    rules_problems_release(NULL);
    rules_free(NULL);
    assert_false(rules_has_table(NULL, "public.t"));
    assert_int_equal(rules_table_count(NULL), 0);
    assert_null(rules_table(NULL, 0));
    /* A file that loads leaves problems empty. */
    static const char ok[] =
        "{\"$schema\": \"x\", \"rules\": [{\"table\": \"t\", \"keys\": [\"k\"]}]}";
    r = rules_parse(ok, strlen(ok), &pr);
    assert_non_null(r);
    assert_int_equal(pr.count, 0);
    rules_free(r);
}

/* ---- jsonpos --------------------------------------------------------------------- */

static void expect_pos(const char *text, const char *path, bool key, int line, int col)
{
    JsonPos pos = {0, 0, 0};
    bool ok = key ? jsonpos_find_key(text, strlen(text), path, &pos)
                  : jsonpos_find(text, strlen(text), path, &pos);
    if (!ok || pos.line != line || pos.column != col)
        fail_msg("path %s: got %s %d:%d, expected %d:%d", path, ok ? "found" : "not found",
                 pos.line, pos.column, line, col);
}

static void test_jsonpos_find(void **state)
{
    static const char doc[] = "{\n"
                              "  \"rules\": [\n"
                              "    {\"table\": \"a\", \"keys\": [\"x\", \"y\"]},\n"
                              "    {\"table\": \"é\", \"k\\u00e9y\": {\"n\": [1, [2, 3]]}}\n"
                              "  ],\n"
                              "  \"a.b\": true, \"rules\": 2\n"
                              "}\n";
    JsonPos pos;

    (void)state;
    expect_pos(doc, "", false, 1, 1);
    expect_pos(doc, "rules", false, 2, 12);
    expect_pos(doc, "rules", true, 2, 3);
    expect_pos(doc, "rules[0]", false, 3, 5);
    expect_pos(doc, "rules[0].keys[1]", false, 3, 34);
    expect_pos(doc, "rules[0].keys", true, 3, 20);
    expect_pos(doc, "rules[1].table", false, 4, 15);
    /* Columns count characters: "é" is two bytes, one column. */
    expect_pos(doc, "rules[1][\"k\\u00e9y\"]", true, 4, 20);
    expect_pos(doc, "rules[1].kéy.n[1]", false, 4, 42);
    expect_pos(doc, "rules[1].kéy.n[1][1]", false, 4, 46);
    expect_pos(doc, "[\"a.b\"]", false, 6, 10);
    /* An index on an object selects the n-th member: the second "rules". */
    expect_pos(doc, "[2]", true, 6, 16);
    expect_pos(doc, "[2]", false, 6, 25);
    assert_false(jsonpos_find(doc, strlen(doc), "rules[2]", &pos));
    assert_false(jsonpos_find(doc, strlen(doc), "nope", &pos));
    assert_false(jsonpos_find(doc, strlen(doc), "rules.x", &pos));
    assert_false(jsonpos_find(doc, strlen(doc), "rules[", &pos));
    assert_false(jsonpos_find_key(doc, strlen(doc), "rules[0]", &pos));
    assert_false(jsonpos_find("", 0, "", &pos));
    assert_false(jsonpos_find("{\"a\": [1, ", 10, "a[2]", &pos));
    jsonpos_at("ab\ncd", 5, 99, &pos);
    assert_int_equal(pos.offset, 5);
    assert_int_equal(pos.line, 2);
    assert_int_equal(pos.column, 3);
}

/* The finder answers exactly what jsonpos_find / jsonpos_find_key answer,
 * whatever the order of the lookups (document order, backwards, a long
 * path after a short one, misses in between). */
static void test_jsonpos_finder(void **state)
{
    static const char doc[] = "{\n"
                              "  \"rules\": [\n"
                              "    {\"table\": \"a\", \"keys\": [\"x\", \"y\"]},\n"
                              "    {\"table\": \"\u00e9\", \"k\\u00e9y\": {\"n\": [1, [2, 3]]}},\n"
                              "    {\"table\": \"c\", \"keys\": [\"z\"], \"tags\": []}\n"
                              "  ],\n"
                              "  \"a.b\": true, \"rules\": 2\n"
                              "}\n";
    static const char *const paths[] = {
        "",
        "rules",
        "rules[0]",
        "rules[0].table",
        "rules[0].keys",
        "rules[0].keys[0]",
        "rules[0].keys[1]",
        "rules[0].keys[2]",
        "rules[1]",
        "rules[1].table",
        "rules[1][\"k\\u00e9y\"]",
        "rules[1].k\u00e9y.n[1][1]",
        "rules[1].k\u00e9y.n[1]",
        "rules[2].keys[0]",
        "rules[2].tags",
        "rules[2][2]",
        "rules[3]",
        "rules[1][1]",
        "[\"a.b\"]",
        "[2]",
        "nope",
        "rules.x",
        "rules[",
        "rules[0].keys[0].x",
    };
    size_t n = sizeof paths / sizeof paths[0];
    JsonFinder f;

    (void)state;
    jsonpos_finder_init(&f, doc, strlen(doc));
    for (int round = 0; round < 3; round++) {
        for (size_t k = 0; k < 2 * n; k++) {
            /* round 0: in order; 1: backwards; 2: strided */
            size_t idx = round == 0 ? k % n : round == 1 ? n - 1 - k % n : (k * 7) % n;
            for (int key = 0; key < 2; key++) {
                JsonPos a = {0, 0, 0}, b = {0, 0, 0};
                bool oa = key ? jsonpos_find_key(doc, strlen(doc), paths[idx], &a)
                              : jsonpos_find(doc, strlen(doc), paths[idx], &a);
                bool ob = jsonpos_finder_find(&f, paths[idx], key, &b);
                if (oa != ob ||
                    (oa && (a.offset != b.offset || a.line != b.line || a.column != b.column)))
                    fail_msg("path %s (key %d, round %d): find %d %zu %d:%d, finder %d %zu %d:%d",
                             paths[idx], key, round, oa, a.offset, a.line, a.column, ob, b.offset,
                             b.line, b.column);
            }
        }
    }
}

/* A rules file with 20,000 rules loads in linear time: every value is
 * located from the previous lookup, not from the top of the file (this
 * took minutes when each lookup walked from the start). The problem
 * reported on the last rule names its line. */
static void test_rules_many_locate(void **state)
{
    size_t n = 20000, cap = n * 64 + 64, len = 0;
    char *doc = malloc(cap);
    RulesProblems pr = {0};
    Rules *r;

    (void)state;
    assert_non_null(doc);
    len += (size_t)snprintf(doc + len, cap - len, "{\"rules\": [\n");
    for (size_t i = 0; i < n; i++)
        len += (size_t)snprintf(doc + len, cap - len,
                                " {\"table\": \"t%zu\", \"keys\": [\"%s{id}\"]}%s\n", i,
                                i + 1 == n ? "k:{nope" : "k:", i + 1 == n ? "" : ",");
    len += (size_t)snprintf(doc + len, cap - len, "]}\n");
    r = rules_parse(doc, len, &pr);
    assert_null(r);
    assert_int_equal(pr.count, 1);
    assert_int_equal(pr.items[0].line, (int)n + 1);
    rules_problems_release(&pr);
    free(doc);
}

static void test_jsonpos_check(void **state)
{
    static const struct {
        const char *text;
        int line, col;
        const char *msg;
    } cases[] = {
        {"{\"a\": 1}", 0, 0, NULL},
        {" [1, 2.5e-3, -0, \"x\\u0041\", true, false, null, {}] ", 0, 0, NULL},
        {"", 1, 1, "empty"},
        {"{\"a\": 1,}", 1, 8, "trailing comma"},
        {"[1,\n 2,\n]", 2, 3, "trailing comma"},
        {"{\"a\" 1}", 1, 6, "expected ':'"},
        {"{\"a\": 1 \"b\": 2}", 1, 9, "missing comma"},
        {"{'a': 1}", 1, 2, "double quotes"},
        {"{\"a\": /* x */ 1}", 1, 7, "comments"},
        {"{\"a\": tru}", 1, 7, "unexpected word"},
        {"{\"a\": \"x}", 1, 7, "never closed"},
        {"\n\n  {\"a\": [1, 2}", 3, 14, "expected ',' or ']'"},
        {"  {\"a\": [1, 2]", 1, 3, "object is never closed"},
        {"{\"a\": \"\\q\"}", 1, 8, "invalid escape"},
        {"{\"a\": 1} x", 1, 10, "after the end"},
        {"{\"a\": -}", 1, 7, "malformed number"},
        {"{\"a\": 1e}", 1, 8, "exponent"},
        {"{a: 1}", 1, 2, "member name in double quotes"},
    };
    char msg[256];
    JsonPos where;

    (void)state;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        bool ok = jsonpos_check(cases[i].text, strlen(cases[i].text), &where, msg, sizeof msg);
        if (cases[i].msg == NULL) {
            if (!ok)
                fail_msg("case %zu: unexpected error %s", i, msg);
            continue;
        }
        if (ok || where.line != cases[i].line || where.column != cases[i].col ||
            strstr(msg, cases[i].msg) == NULL)
            fail_msg("case %zu (%s): got %d:%d \"%s\", expected %d:%d \"%s\"", i, cases[i].text,
                     where.line, where.column, msg, cases[i].line, cases[i].col, cases[i].msg);
    }
    /* Deep nesting stops at the limit instead of exhausting the stack. */
    size_t n = 3 * JSONPOS_MAX_DEPTH;
    char *deep = malloc(n);
    memset(deep, '[', n);
    assert_false(jsonpos_check(deep, n, &where, msg, sizeof msg));
    assert_non_null(strstr(msg, "nesting"));
    free(deep);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_eval_cases),
        cmocka_unit_test(test_bad_files),
        cmocka_unit_test(test_catalog_cases),
        cmocka_unit_test(test_glob_escape),
        cmocka_unit_test(test_random_glob_escape),
        cmocka_unit_test(test_column_cache),
        cmocka_unit_test(test_column_cache_shape),
        cmocka_unit_test(test_recent_tables),
        cmocka_unit_test(test_changed_columns),
        cmocka_unit_test(test_changed_index),
        cmocka_unit_test(test_stats_accumulate),
        cmocka_unit_test(test_example_file),
        cmocka_unit_test(test_eval_ignores_other_tables),
        cmocka_unit_test(test_parse_edges),
        cmocka_unit_test(test_jsonpos_find),
        cmocka_unit_test(test_jsonpos_finder),
        cmocka_unit_test(test_rules_many_locate),
        cmocka_unit_test(test_jsonpos_check),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
