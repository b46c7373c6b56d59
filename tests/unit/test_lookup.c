/*
 * Unit tests for lookups: rules_eval_lookups(), rules_render_lookup(),
 * rules_check_lookup() (rules_eval.c) and the batch in lookup.c.
 *
 * Table-driven from tests/fixtures/rules/lookup/NAME.case, sections
 * introduced by "== name [arg]" ('#' lines and blank lines ignored, except
 * inside "== rules", which is raw JSON):
 *
 *   rules          the rules file
 *   change         a row change (table, op, cols, old, new; values: bare
 *                  words, "quoted", NULL, MISSING) run through
 *                  rules_eval_lookups() into the batch
 *   truncate T     rules_eval() of a truncate of T (emits at once)
 *   calls          the calls reported since the last "calls", one per line:
 *                  "<rule> <arg>..." or "<rule> ?" (arguments not carried)
 *   queries N      the batch holds N distinct queries
 *   result Q       query Q's result: "fields a b" then "row v1 v2" lines
 *   expect         renders the batch (lookup_batch_render()) and compares
 *                  everything emitted since the last expect, in order
 *                  ("key s", "pattern s", ...); clears the batch
 *   widen          like expect, through lookup_batch_widen()
 *   stats          after expect: "rows R over_limit O unknown U widened W"
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

#include "lookup.h"
#include "rules.h"

#define FIXTURES SOURCE_DIR "/tests/fixtures/rules/lookup"
#define MAX_TOK 16
#define MAX_LINES 128

static char *slurp(const char *path)
{
    FILE *f = fopen(path, "rb");
    char *buf;
    long n;

    if (f == NULL)
        fail_msg("cannot open %s", path);
    fseek(f, 0, SEEK_END);
    n = ftell(f);
    fseek(f, 0, SEEK_SET);
    buf = calloc(1, (size_t)n + 1);
    assert_non_null(buf);
    assert_int_equal(fread(buf, 1, (size_t)n, f), (size_t)n);
    fclose(f);
    return buf;
}

typedef struct Tok {
    RulesValKind kind;
    char s[256];
    size_t len;
} Tok;

/* Split a line into tokens: bare words, "quoted" (\" \\ \n \xHH), NULL, MISSING. */
static size_t toks(const char *p, Tok *t, size_t max)
{
    size_t n = 0;

    while (*p) {
        Tok *k;
        while (*p == ' ')
            p++;
        if (*p == '\0')
            break;
        assert_true(n < max);
        k = &t[n++];
        k->kind = RULES_VAL_TEXT;
        k->len = 0;
        if (*p == '"') {
            for (p++; *p && *p != '"'; p++) {
                if (*p == '\\' && p[1] == 'x') {
                    unsigned v;
                    assert_int_equal(sscanf(p + 2, "%2x", &v), 1);
                    k->s[k->len++] = (char)v;
                    p += 3;
                } else if (*p == '\\') {
                    p++;
                    k->s[k->len++] = *p == 'n' ? '\n' : *p;
                } else {
                    k->s[k->len++] = *p;
                }
            }
            assert_int_equal(*p, '"');
            p++;
        } else {
            while (*p && *p != ' ')
                k->s[k->len++] = *p++;
        }
        k->s[k->len] = '\0';
        if (strcmp(k->s, "NULL") == 0)
            k->kind = RULES_VAL_NULL;
        else if (strcmp(k->s, "MISSING") == 0)
            k->kind = RULES_VAL_MISSING;
    }
    return n;
}

/* Lines of a section body without comments and blanks. */
static size_t body_lines(char *body, char **lines)
{
    size_t n = 0;

    for (char *p = body; p && *p;) {
        char *eol = strchr(p, '\n');
        if (eol)
            *eol = '\0';
        if (p[0] != '#' && strspn(p, " ") < strlen(p)) {
            assert_true(n < MAX_LINES);
            lines[n++] = p;
        }
        p = eol ? eol + 1 : NULL;
    }
    return n;
}

/* ---- what the engine emits ------------------------------------------------------ */

static const char *const action_names[] = {
    [RULES_INV_KEY] = "key",         [RULES_INV_PATTERN] = "pattern",
    [RULES_INV_TAG] = "tag",         [RULES_INV_TAG_PATTERN] = "tag-pattern",
    [RULES_INV_VERSION] = "version", [RULES_INV_VERSION_PATTERN] = "version-pattern",
    [RULES_INV_PUBLISH] = "publish",
};

typedef struct Out {
    char lines[MAX_LINES][300];
    size_t n;
    char calls[MAX_LINES][300];
    size_t ncalls;
    char widened[MAX_LINES][128];
    size_t nwidened;
    unsigned widened_total;
    LookupBatch *batch;
} Out;

static void collect(void *arg, RulesInvAction action, const char *s, size_t len,
                    const char *payload, size_t payload_len)
{
    Out *o = arg;

    (void)payload;
    assert_int_equal(payload_len, 0);
    assert_int_equal(strlen(s), len);
    assert_true(o->n < MAX_LINES);
    snprintf(o->lines[o->n++], sizeof o->lines[0], "%s %s", action_names[action], s);
}

static void on_call(void *arg, const RulesLookupCall *c)
{
    Out *o = arg;
    size_t used;
    char *line;

    assert_true(o->ncalls < MAX_LINES);
    line = o->calls[o->ncalls++];
    used = (size_t)snprintf(line, 300, "%zu", c->rule);
    if (c->unknown_args)
        snprintf(line + used, 300 - used, " ?");
    else
        for (size_t a = 0; a < c->nargs; a++) {
            assert_int_equal(strlen(c->args[a]), c->arglens[a]);
            used += (size_t)snprintf(line + used, 300 - used, " %s", c->args[a]);
        }
    lookup_batch_add(o->batch, c);
}

static void on_widened(void *arg, const char *table, unsigned n)
{
    Out *o = arg;

    assert_true(n > 0);
    o->widened_total += n;
    snprintf(o->widened[o->nwidened++ % MAX_LINES], 128, "%s", table);
}

/* ---- a change from a section --------------------------------------------------- */

typedef struct ChangeSpec {
    char table[128];
    RulesOp op;
    Tok cols[MAX_TOK], old[MAX_TOK], new[MAX_TOK];
    const char *colnames[MAX_TOK];
    RulesValue oldv[MAX_TOK], newv[MAX_TOK];
    size_t ncols;
    bool has_old, has_new;
} ChangeSpec;

static RulesOp op_of(const char *s)
{
    static const char *const names[] = {"insert", "update", "delete", "truncate"};
    for (int i = 0; i < 4; i++)
        if (strcmp(s, names[i]) == 0)
            return (RulesOp)(1 << i);
    fail_msg("unknown op %s", s);
    return RULES_INSERT;
}

static void image(Tok *t, RulesValue *v, const char *rest, size_t ncols)
{
    assert_int_equal(toks(rest, t, MAX_TOK), ncols);
    for (size_t i = 0; i < ncols; i++)
        v[i] = (RulesValue){t[i].kind, t[i].s, t[i].len};
}

static void change_spec(char *body, ChangeSpec *cs)
{
    char *lines[MAX_LINES];
    size_t n = body_lines(body, lines);

    memset(cs, 0, sizeof *cs);
    for (size_t i = 0; i < n; i++) {
        char *rest = strchr(lines[i], ' ');
        rest = rest ? rest + 1 : lines[i] + strlen(lines[i]);
        if (strncmp(lines[i], "table ", 6) == 0)
            snprintf(cs->table, sizeof cs->table, "%s", rest);
        else if (strncmp(lines[i], "op ", 3) == 0)
            cs->op = op_of(rest);
        else if (strncmp(lines[i], "cols ", 5) == 0) {
            cs->ncols = toks(rest, cs->cols, MAX_TOK);
            for (size_t k = 0; k < cs->ncols; k++)
                cs->colnames[k] = cs->cols[k].s;
        } else if (strncmp(lines[i], "old ", 4) == 0) {
            image(cs->old, cs->oldv, rest, cs->ncols);
            cs->has_old = true;
        } else if (strncmp(lines[i], "new ", 4) == 0) {
            image(cs->new, cs->newv, rest, cs->ncols);
            cs->has_new = true;
        } else
            fail_msg("unknown change line: %s", lines[i]);
    }
}

/* ---- results ---------------------------------------------------------------------- */

typedef struct Result {
    Tok fields[MAX_TOK];
    const char *names[MAX_TOK];
    size_t nfields;
    Tok cells[MAX_LINES][MAX_TOK];
    RulesValue vals[MAX_LINES * MAX_TOK];
    size_t nrows;
} Result;

static void result_parse(Result *res, char *body)
{
    char *lines[MAX_LINES];
    size_t n = body_lines(body, lines);

    memset(res, 0, sizeof *res);
    for (size_t i = 0; i < n; i++) {
        if (strncmp(lines[i], "fields", 6) == 0) {
            res->nfields = toks(lines[i] + 6, res->fields, MAX_TOK);
            for (size_t k = 0; k < res->nfields; k++)
                res->names[k] = res->fields[k].s;
        } else if (strncmp(lines[i], "row", 3) == 0) {
            Tok *t = res->cells[res->nrows];
            assert_int_equal(toks(lines[i] + 3, t, MAX_TOK), res->nfields);
            for (size_t k = 0; k < res->nfields; k++)
                res->vals[res->nrows * res->nfields + k] =
                    (RulesValue){t[k].kind, t[k].s, t[k].len};
            res->nrows++;
        } else {
            fail_msg("unknown result line: %s", lines[i]);
        }
    }
}

/* ---- one case file ------------------------------------------------------------------ */

typedef struct Sec {
    char name[32], arg[128];
    char *body;
    int line;
} Sec;

static size_t sections(char *text, Sec *sec, size_t max)
{
    size_t n = 0;
    int line = 1;

    for (char *p = text; *p; line++) {
        char *eol = strchr(p, '\n');
        char *next = eol ? eol + 1 : p + strlen(p);
        if (p[0] == '#') /* comments: blanked, so the rules JSON stays valid */
            memset(p, ' ', (size_t)((eol ? eol : next) - p));
        else if (strncmp(p, "== ", 3) == 0) {
            assert_true(n < max);
            if (eol)
                *eol = '\0';
            sec[n].arg[0] = '\0';
            sscanf(p + 3, "%31s %127[^\n]", sec[n].name, sec[n].arg);
            sec[n].body = next;
            sec[n].line = line;
            if (n > 0)
                p[0] = '\0';
            n++;
        }
        p = next;
    }
    return n;
}

static void compare(char lines[][300], size_t n, char *body, const char *what, int at)
{
    char *want[MAX_LINES];
    size_t nw = body_lines(body, want);
    bool same = nw == n;

    for (size_t i = 0; same && i < n; i++)
        same = strcmp(lines[i], want[i]) == 0;
    if (!same) {
        print_message("  expected (%zu):\n", nw);
        for (size_t i = 0; i < nw; i++)
            print_message("    %s\n", want[i]);
        print_message("  got (%zu):\n", n);
        for (size_t i = 0; i < n; i++)
            print_message("    %s\n", lines[i]);
        fail_msg("%s: mismatch at line %d", what, at);
    }
}

static Rules *parse_ok(const char *json, const char *what)
{
    RulesProblems pr = {0, NULL};
    Rules *r = rules_parse(json, strlen(json), &pr);

    for (size_t i = 0; i < pr.count; i++)
        print_message("%s:%d:%d: %s\n", what, pr.items[i].line, pr.items[i].column,
                      pr.items[i].msg);
    if (r == NULL)
        fail_msg("%s: rules did not load", what);
    rules_problems_release(&pr);
    return r;
}

static void render(Out *o, const Rules *r, Result *res, size_t nres, bool widen,
                   LookupRenderStats *st)
{
    size_t nq = lookup_batch_queries(o->batch);
    LookupRows *rows = calloc(nq + 1, sizeof *rows);

    assert_true(nq <= nres);
    for (size_t q = 0; q < nq; q++)
        rows[q] = (LookupRows){res[q].nfields, res[q].names, res[q].nrows, res[q].vals};
    if (widen)
        lookup_batch_widen(o->batch, r, collect, on_widened, o);
    else
        lookup_batch_render(o->batch, r, rows, collect, on_widened, o, st);
    free(rows);
}

static void run_file(const char *name)
{
    char path[512];
    char *text;
    Sec sec[64];
    size_t nsec;
    Rules *r = NULL;
    static Result res[8];
    static Out o;
    LookupRenderStats st = {0, 0, 0};
    size_t checked = 0;

    snprintf(path, sizeof path, "%s/%s", FIXTURES, name);
    text = slurp(path);
    nsec = sections(text, sec, 64);
    memset(&o, 0, sizeof o);
    memset(res, 0, sizeof res);
    o.batch = lookup_batch_new();
    for (size_t i = 0; i < nsec; i++) {
        Sec *s = &sec[i];
        if (strcmp(s->name, "rules") == 0) {
            rules_free(r);
            r = parse_ok(s->body, name);
        } else if (strcmp(s->name, "change") == 0) {
            ChangeSpec cs;
            change_spec(s->body, &cs);
            RulesChange c = {cs.table,
                             cs.op,
                             cs.ncols,
                             cs.colnames,
                             cs.has_old ? cs.oldv : NULL,
                             cs.has_new ? cs.newv : NULL,
                             "0/1",
                             7,
                             "2026-01-01T00:00:00Z",
                             false,
                             false,
                             0,
                             0,
                             0};
            /* Lookup rules never render at decode time for row changes. */
            size_t before = o.n;
            (void)rules_eval(r, &c, collect, &o, NULL);
            (void)rules_eval_lookups(r, &c, on_call, &o);
            (void)before;
        } else if (strcmp(s->name, "truncate") == 0) {
            RulesChange c = {s->arg, RULES_TRUNCATE, 0, NULL, NULL, NULL, "0/1", 7, NULL, false, false, 0, 0, 0};
            assert_int_equal(rules_eval_lookups(r, &c, on_call, &o), 0);
            (void)rules_eval(r, &c, collect, &o, NULL);
        } else if (strcmp(s->name, "calls") == 0) {
            compare(o.calls, o.ncalls, s->body, name, s->line);
            o.ncalls = 0;
        } else if (strcmp(s->name, "queries") == 0) {
            assert_int_equal(lookup_batch_queries(o.batch), (size_t)atoi(s->arg));
        } else if (strcmp(s->name, "result") == 0) {
            size_t q = (size_t)atoi(s->arg);
            assert_true(q < 8);
            result_parse(&res[q], s->body);
        } else if (strcmp(s->name, "expect") == 0 || strcmp(s->name, "widen") == 0) {
            memset(&st, 0, sizeof st);
            o.widened_total = 0;
            render(&o, r, res, 8, strcmp(s->name, "widen") == 0, &st);
            compare(o.lines, o.n, s->body, name, s->line);
            o.n = 0;
            lookup_batch_clear(o.batch);
            assert_int_equal(lookup_batch_calls(o.batch), 0);
            memset(res, 0, sizeof res);
            checked++;
        } else if (strcmp(s->name, "stats") == 0) {
            unsigned rows, over, unknown, wid;
            assert_int_equal(sscanf(s->body, " rows %u over_limit %u unknown %u widened %u", &rows,
                                    &over, &unknown, &wid),
                             4);
            if (rows != st.rows || over != st.over_limit || unknown != st.unknown ||
                wid != o.widened_total)
                fail_msg("%s:%d: stats rows %zu over_limit %zu unknown %zu widened %u", name,
                         s->line, st.rows, st.over_limit, st.unknown, o.widened_total);
        } else {
            fail_msg("%s: unknown section %s", name, s->name);
        }
    }
    assert_true(checked > 0);
    assert_int_equal(o.ncalls, 0); /* every call was checked */
    lookup_batch_free(o.batch);
    rules_free(r);
    free(text);
}

static void test_cases(void **state)
{
    DIR *d = opendir(FIXTURES);
    struct dirent *e;
    size_t n = 0;

    (void)state;
    assert_non_null(d);
    while ((e = readdir(d)) != NULL) {
        size_t l = strlen(e->d_name);
        if (l < 5 || strcmp(e->d_name + l - 5, ".case") != 0)
            continue;
        print_message("  lookup/%s\n", e->d_name);
        run_file(e->d_name);
        n++;
    }
    closedir(d);
    assert_true(n >= 4);
}

/* ---- the rest --------------------------------------------------------------------- */

static void test_wrap_sql(void **state)
{
    char *s = lookup_wrap_sql("SELECT team_id FROM tm WHERE user_id = $1 -- who", 10000);

    (void)state;
    assert_string_equal(s, "SELECT * FROM (SELECT team_id FROM tm WHERE user_id = $1 -- who\n) "
                           "AS walbust_lookup LIMIT 10001");
    free(s);
}

static const char *RULES_JSON =
    "{\"rules\": [\n"
    "  {\"table\": \"public.users\", \"keys\": [\"user:{id}\"]},\n"
    "  {\"table\": \"public.users\",\n"
    "   \"lookup\": {\"sql\": \"SELECT team_id FROM tm WHERE user_id = $1\", \"args\": "
    "[\"{id}\"], \"limit\": 5},\n"
    "   \"keys\": [\"team:{team_id}:members\", \"team:{team_id}:{name}\"]}\n"
    "]}";

static void test_info_and_check(void **state)
{
    Rules *r = parse_ok(RULES_JSON, "inline");
    RulesLookupInfo info;
    const char *cols[] = {"id", "name"};
    bool ident[] = {true, false};
    RulesTableInfo ti = {.table = "public.users",
                         .exists = true,
                         .replident = 'f',
                         .ncols = 2,
                         .colnames = cols,
                         .identity = ident,
                         .in_publication = true};
    const char *fields[] = {"team_id"};
    const char *tables[] = {"public.tm", "public.users"};
    RulesLookupShape sh = {NULL, 0, 1, 1, fields, 2, tables};
    RulesProblems pr = {0, NULL}, warn = {0, NULL};

    (void)state;
    assert_int_equal(rules_rule_count(r), 2);
    assert_true(rules_has_lookups(r));
    assert_false(rules_lookup_info(r, 0, &info));
    assert_false(rules_lookup_info(r, 9, &info));
    assert_true(rules_lookup_info(r, 1, &info));
    assert_string_equal(info.table, "public.users");
    assert_string_equal(info.sql, "SELECT team_id FROM tm WHERE user_id = $1");
    assert_int_equal(info.nargs, 1);
    assert_int_equal(info.limit, 5);
    assert_int_equal(info.line, 4);

    /* Fine, but public.tm has no rule: one warning, no problem. */
    assert_int_equal(rules_check_lookup(r, 1, &sh, &ti, &pr, &warn), 0);
    assert_int_equal(pr.count, 0);
    assert_int_equal(warn.count, 1);
    assert_non_null(strstr(warn.items[0].msg, "reads public.tm, which has no rule of its own"));
    assert_string_equal(warn.items[0].path, "rules[1].lookup");
    rules_problems_release(&warn);

    /* Parameter count, an ambiguous and an unknown placeholder. */
    const char *fields2[] = {"team_id", "name"};
    RulesLookupShape sh2 = {NULL, 0, 2, 2, fields2, 0, NULL};
    assert_int_equal(rules_check_lookup(r, 1, &sh2, &ti, &pr, &warn), 2);
    assert_non_null(strstr(pr.items[0].msg, "takes 2 parameters but \"args\" has 1"));
    assert_non_null(strstr(pr.items[1].msg, "{name} in template \"team:{team_id}:{name}\" is "
                                            "ambiguous"));
    assert_string_equal(pr.items[1].path, "rules[1].keys[1]");
    rules_problems_release(&pr);
    const char *fields3[] = {"tid"};
    RulesLookupShape sh3 = {NULL, 0, 1, 1, fields3, 0, NULL};
    assert_int_equal(rules_check_lookup(r, 1, &sh3, &ti, &pr, &warn), 2); /* both templates */
    assert_non_null(strstr(pr.items[0].msg, "{team_id} in template \"team:{team_id}:members\" is "
                                            "neither a column of the lookup's result (tid) nor "
                                            "of public.users"));
    rules_problems_release(&pr);

    /* PREPARE failed: one problem at the SQL, with the position. */
    RulesLookupShape bad = {"relation \"tm\" does not exist", 21, 0, 0, NULL, 0, NULL};
    assert_int_equal(rules_check_lookup(r, 1, &bad, &ti, &pr, &warn), 1);
    assert_string_equal(pr.items[0].msg, "rule for public.users: the lookup's SQL does not "
                                         "prepare: relation \"tm\" does not exist (at character "
                                         "21 of the SQL)");
    assert_string_equal(pr.items[0].path, "rules[1].lookup.sql");
    assert_int_equal(pr.items[0].line, 4);
    rules_problems_release(&pr);
    /* No lookup on rule 0. */
    assert_int_equal(rules_check_lookup(r, 0, &bad, &ti, &pr, &warn), 0);
    assert_int_equal(warn.count, 0);
    rules_free(r);
}

static void test_batch_bounded(void **state)
{
    LookupBatch *b = lookup_batch_new();
    char arg[32];
    const char *args[1] = {arg};
    size_t lens[1];
    RulesValue v[1] = {{RULES_VAL_TEXT, "x", 1}};

    (void)state;
    for (size_t i = 0; i < LOOKUP_BATCH_MAX_CALLS; i++) {
        RulesLookupCall c = {0, RULES_UPDATE, 1, args, lens, 1, v, v, false};
        lens[0] = (size_t)snprintf(arg, sizeof arg, "%zu", i % 1000);
        assert_false(lookup_batch_full(b));
        lookup_batch_add(b, &c);
    }
    assert_true(lookup_batch_full(b));
    assert_int_equal(lookup_batch_calls(b), LOOKUP_BATCH_MAX_CALLS);
    assert_int_equal(lookup_batch_queries(b), 1000);
    lookup_batch_clear(b);
    assert_false(lookup_batch_full(b));
    assert_int_equal(lookup_batch_queries(b), 0);
    lookup_batch_free(b);
    lookup_batch_free(NULL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_cases),
        cmocka_unit_test(test_wrap_sql),
        cmocka_unit_test(test_info_and_check),
        cmocka_unit_test(test_batch_bounded),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
