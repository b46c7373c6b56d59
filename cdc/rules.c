/*
 * rules.c — loading the rules file (see rules.h, docs/rules.md).
 *
 * The file is parsed with cJSON, then walked field by field against tables
 * of known fields; every problem (unknown field, wrong type, bad template,
 * ...) is collected with the line and column that jsonpos finds for its JSON
 * path, so an operator sees all of them at once. Templates are compiled into
 * segments: literal bytes and placeholders {image, column}, where the column
 * is an index into the rule's own list of referenced column names. Finally
 * the table index and the scratch memory for evaluation are built.
 * Evaluation and catalog checks live in rules_eval.c.
 */
#include "rules.h"

#include "jsonpos.h"
#include "rules_int.h"

#include <cJSON.h>
#include <ctype.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

size_t rules_glob_escape(const char *s, size_t len, char *out)
{
    size_t o = 0;

    for (size_t i = 0; i < len; i++) {
        if (strchr("*?[]\\", s[i]) != NULL && s[i] != '\0')
            out[o++] = '\\';
        out[o++] = s[i];
    }
    out[o] = '\0';
    return o;
}

static const char *const tpl_field[TPL_NKINDS] = {"keys", "patterns", "tags", "versions"};

/* ---- problems ------------------------------------------------------------- */

void rules_problems_release(RulesProblems *p)
{
    if (p == NULL)
        return;
    free(p->items);
    p->items = NULL;
    p->count = 0;
}

static void problem_vadd(RulesProblems *p, int line, int column, const char *path, const char *fmt,
                         va_list ap)
{
    RulesProblem *it;

    p->items = xrealloc(p->items, (p->count + 1) * sizeof *p->items);
    it = &p->items[p->count++];
    it->line = line;
    it->column = column;
    snprintf(it->path, sizeof it->path, "%s", path ? path : "");
    vsnprintf(it->msg, sizeof it->msg, fmt, ap);
}

void rules_problem_at(RulesProblems *p, const SrcLoc *loc, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    problem_vadd(p, loc->line, loc->column, loc->path, fmt, ap);
    va_end(ap);
}

/* ---- loading: helpers ------------------------------------------------------ */

typedef struct Loader {
    const char *text;
    size_t len;
    JsonFinder finder; /* locates values in document order (jsonpos.h) */
    RulesProblems *problems;
    size_t added;
    Rules *r;
} Loader;

static void loc_find(Loader *ld, const char *path, bool at_key, const char *find, SrcLoc *loc)
{
    JsonPos pos;
    bool ok = jsonpos_finder_find(&ld->finder, find, at_key, &pos);

    loc->line = ok ? pos.line : 0;
    loc->column = ok ? pos.column : 0;
    loc->path = xstrdup(path);
}

static void ld_vproblem(Loader *ld, const char *path, bool at_key, const char *find,
                        const char *fmt, va_list ap)
{
    SrcLoc loc;

    loc_find(ld, path, at_key, find ? find : path, &loc);
    problem_vadd(ld->problems, loc.line, loc.column, loc.path, fmt, ap);
    free(loc.path);
    ld->added++;
}

/* A problem with the value at path. */
__attribute__((format(printf, 3, 4))) static void ld_problem(Loader *ld, const char *path,
                                                             const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    ld_vproblem(ld, path, false, NULL, fmt, ap);
    va_end(ap);
}

/* A problem with a member's key: shown as path, located through find. */
__attribute__((format(printf, 4, 5))) static void
ld_problem_key(Loader *ld, const char *path, const char *find, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    ld_vproblem(ld, path, true, find, fmt, ap);
    va_end(ap);
}

static const char *type_name(const cJSON *v)
{
    if (cJSON_IsString(v))
        return "a string";
    if (cJSON_IsNumber(v))
        return "a number";
    if (cJSON_IsBool(v))
        return "true/false";
    if (cJSON_IsNull(v))
        return "null";
    if (cJSON_IsArray(v))
        return "an array";
    return "an object";
}

/* Is a member name plain enough to show as ".name" in a path? */
static bool plain_name(const char *s)
{
    if (*s == '\0')
        return false;
    for (; *s; s++)
        if (strchr(".[]\"\\ ", *s) != NULL || (unsigned char)*s < 0x20)
            return false;
    return true;
}

/* base + member name, quoting the name when needed. */
static void path_member(char *out, size_t n, const char *base, const char *name)
{
    size_t o;

    if (plain_name(name)) {
        snprintf(out, n, "%s%s%s", base, *base ? "." : "", name);
        return;
    }
    o = (size_t)snprintf(out, n, "%s[\"", base);
    for (; *name && o + 4 < n; name++) {
        if (*name == '"' || *name == '\\')
            out[o++] = '\\';
        out[o++] = *name;
    }
    if (o + 3 <= n)
        memcpy(out + o, "\"]", 3);
}

/* Optimal string alignment distance, capped: for "did you mean". */
static size_t edit_distance(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    size_t d[3][129];

    if (la > 128 || lb > 128)
        return 99;
    for (size_t j = 0; j <= lb; j++)
        d[0][j] = j;
    for (size_t i = 1; i <= la; i++) {
        size_t *cur = d[i % 3], *prev = d[(i - 1) % 3], *prev2 = d[(i + 1) % 3];
        cur[0] = i;
        for (size_t j = 1; j <= lb; j++) {
            size_t cost = a[i - 1] != b[j - 1];
            size_t v = prev[j - 1] + cost;
            if (prev[j] + 1 < v)
                v = prev[j] + 1;
            if (cur[j - 1] + 1 < v)
                v = cur[j - 1] + 1;
            if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] &&
                prev2[j - 2] + 1 < v)
                v = prev2[j - 2] + 1;
            cur[j] = v;
        }
    }
    return d[la % 3][lb];
}

/* Closest of names[0..n) to s when close enough to be a typo, else NULL. */
static const char *did_you_mean(const char *s, const char *const *names, size_t n)
{
    const char *best = NULL;
    size_t bestd = 3;

    for (size_t i = 0; i < n; i++) {
        size_t d = edit_distance(s, names[i]);
        /* "prefix" for "tag_prefix": a part of the name is close enough. */
        if (strlen(s) >= 4 && strlen(names[i]) >= 4 &&
            (strstr(names[i], s) != NULL || strstr(s, names[i]) != NULL))
            d = d < 2 ? d : 2;
        if (d < bestd && d < strlen(names[i])) {
            bestd = d;
            best = names[i];
        }
    }
    return best;
}

/* See rules.h. Case-insensitive: "public.Orders" finds "public.orders". */
const char *rules_closest_name(const char *s, const char *const *names, size_t n)
{
    char a[129], b[129];
    const char *best = NULL;
    size_t bestd = 99, la = strlen(s);

    if (la > 128)
        return NULL;
    for (size_t i = 0; i <= la; i++)
        a[i] = (char)tolower((unsigned char)s[i]);
    for (size_t i = 0; i < n; i++) {
        size_t lb = strlen(names[i]), d, limit;
        if (lb > 128 || strcmp(s, names[i]) == 0)
            continue;
        for (size_t j = 0; j <= lb; j++)
            b[j] = (char)tolower((unsigned char)names[i][j]);
        d = edit_distance(a, b);
        limit = (lb < la ? lb : la) / 4 + 1; /* a typo, not another name */
        if (d <= limit && d < bestd) {
            bestd = d;
            best = names[i];
        }
    }
    return best;
}

/* "a, b, c" into out. */
static void join_names(char *out, size_t n, const char *const *names, size_t count)
{
    size_t o = 0;

    out[0] = '\0';
    for (size_t i = 0; i < count && o < n; i++)
        o += (size_t)snprintf(out + o, n - o, "%s%s", i ? ", " : "", names[i]);
}

/* ---- loading: object members driven by a field table ------------------------ */

typedef void (*FieldLoadFn)(Loader *ld, const cJSON *v, const char *path, void *ctx);

typedef struct FieldSpec {
    const char *name;
    FieldLoadFn load;
} FieldSpec;

#define MAX_FIELDS 13

static void unknown_field(Loader *ld, const char *name, const char *path, const char *find,
                          const char *what, const FieldSpec *specs, size_t n)
{
    const char *names[MAX_FIELDS];
    char all[160];
    const char *guess;

    for (size_t i = 0; i < n; i++)
        names[i] = specs[i].name;
    join_names(all, sizeof all, names, n);
    guess = did_you_mean(name, names, n);
    if (guess != NULL)
        ld_problem_key(ld, path, find,
                       "unknown field \"%s\" in %s (did you mean \"%s\"? expected one of: %s)",
                       name, what, guess, all);
    else
        ld_problem_key(ld, path, find, "unknown field \"%s\" in %s (expected one of: %s)", name,
                       what, all);
}

/* Load every member of obj (at path) through specs; seen[i] tells which
 * fields were present. Unknown and repeated members are problems. */
static void load_fields(Loader *ld, const cJSON *obj, const char *path, const char *what,
                        const FieldSpec *specs, size_t n, void *ctx, bool *seen)
{
    size_t mi = 0;

    for (const cJSON *m = obj->child; m != NULL; m = m->next, mi++) {
        char mpath[128], find[128];
        size_t i;

        path_member(mpath, sizeof mpath, path, m->string);
        snprintf(find, sizeof find, "%s[%zu]", path, mi);
        for (i = 0; i < n && strcmp(specs[i].name, m->string) != 0; i++)
            ;
        if (i == n) {
            unknown_field(ld, m->string, mpath, find, what, specs, n);
        } else if (seen[i]) {
            ld_problem_key(ld, mpath, find, "field \"%s\" appears twice in %s; keep one", m->string,
                           what);
        } else {
            seen[i] = true;
            if (specs[i].load != NULL)
                specs[i].load(ld, m, mpath, ctx);
        }
    }
}

/* Check that v is an array of strings; reports and returns false otherwise
 * (non-string elements are reported one by one and skipped by callers). */
static bool expect_array(Loader *ld, const cJSON *v, const char *path, const char *name,
                         const char *example)
{
    if (cJSON_IsArray(v))
        return true;
    ld_problem(ld, path, "\"%s\" must be an array, e.g. %s, not %s", name, example, type_name(v));
    return false;
}

static bool expect_string_elem(Loader *ld, const cJSON *e, const char *path, const char *what)
{
    if (cJSON_IsString(e))
        return true;
    ld_problem(ld, path, "%s must be a string, not %s", what, type_name(e));
    return false;
}

/* ---- loading: templates ------------------------------------------------------ */

/* Context while one rule is loaded. */
typedef struct RuleCtx {
    Rule *rule;
    Lookup *lk; /* the lookup or audit query being loaded */
    bool audit; /* lk is an audit's */
    Audit *au;  /* the audit being loaded */
    bool has_on;
    size_t nactions; /* action entries (and mistyped action fields) seen */
} RuleCtx;

static size_t rule_col(Rule *rule, const char *name, size_t n)
{
    for (size_t i = 0; i < rule->ncols; i++)
        if (strlen(rule->cols[i]) == n && memcmp(rule->cols[i], name, n) == 0)
            return i;
    rule->cols = xrealloc(rule->cols, (rule->ncols + 1) * sizeof *rule->cols);
    rule->cols[rule->ncols] = xstrndup(name, n);
    return rule->ncols++;
}

/* 1-based character number of byte offset off in s (for messages). */
static size_t char_no(const char *s, size_t off)
{
    size_t n = 1;
    for (size_t i = 0; i < off; i++)
        if (((unsigned char)s[i] & 0xC0) != 0x80)
            n++;
    return n;
}

static void seg_add(Template *t, SegKind kind, const char *text, size_t len, size_t col)
{
    t->segs = xrealloc(t->segs, (t->nsegs + 1) * sizeof *t->segs);
    t->segs[t->nsegs++] = (Seg){kind, xstrndup(text, len), len, col};
    if (kind != SEG_LIT) {
        t->nph++;
        t->uses |= 1u << kind;
    }
}

/* Parse the placeholder body name[0..n) (between the braces). */
static bool placeholder(Rule *rule, Template *t, const char *name, size_t n, char *err,
                        size_t errsz)
{
    SegKind kind = SEG_ANY;

    if (n >= 4 && memcmp(name, "old.", 4) == 0)
        kind = SEG_OLD;
    else if (n >= 4 && memcmp(name, "new.", 4) == 0)
        kind = SEG_NEW;
    if (kind != SEG_ANY) {
        name += 4;
        n -= 4;
    }
    if (n == 0) {
        snprintf(err, errsz, "has a placeholder {%s.} without a column name; write e.g. {%s.id}",
                 kind == SEG_OLD ? "old" : "new", kind == SEG_OLD ? "old" : "new");
        return false;
    }
    if (strchr(" \t", name[0]) != NULL || strchr(" \t", name[n - 1]) != NULL) {
        size_t a = strspn(name, " \t"), b = n;
        while (b > a && strchr(" \t", name[b - 1]) != NULL)
            b--;
        snprintf(err, errsz, "has spaces around the column name in {%.*s}; write {%.*s}", (int)n,
                 name, (int)(b - a), name + a);
        return false;
    }
    seg_add(t, kind, name, n, rule_col(rule, name, n));
    return true;
}

/* Compile src into t (segments and column references into rule). On a
 * problem writes the reason (to follow `template "src" `) into err. */
static bool tpl_compile(Rule *rule, const char *src, Template *t, char *err, size_t errsz)
{
    Buf lit = {0};
    bool ok = true;
    size_t i = 0;

    if (*src == '\0') {
        snprintf(err, errsz, "is empty");
        return false;
    }
    while (ok && src[i] != '\0') {
        char c = src[i];
        if ((c == '{' || c == '}') && src[i + 1] == c) {
            buf_put(&lit, &c, 1); /* {{ or }}: a literal brace */
            i += 2;
        } else if (c == '}') {
            snprintf(err, errsz,
                     "has a \"}\" without a matching \"{\" at character %zu; write \"}}\" for "
                     "a literal brace",
                     char_no(src, i));
            ok = false;
        } else if (c == '{') {
            size_t j = i + 1;
            while (src[j] != '\0' && src[j] != '}' && src[j] != '{')
                j++;
            if (src[j] != '}') {
                snprintf(err, errsz,
                         "has an unclosed \"{\" at character %zu; close the placeholder with "
                         "\"}\" or write \"{{\" for a literal brace",
                         char_no(src, i));
                ok = false;
            } else if (j == i + 1) {
                snprintf(err, errsz, "has an empty placeholder {}; name a column, e.g. {id}");
                ok = false;
            } else {
                if (lit.len > 0)
                    seg_add(t, SEG_LIT, lit.data, lit.len, 0);
                lit.len = 0;
                ok = placeholder(rule, t, src + i + 1, j - i - 1, err, errsz);
                i = j + 1;
            }
        } else {
            buf_put(&lit, &c, 1);
            i++;
        }
    }
    if (ok && lit.len > 0)
        seg_add(t, SEG_LIT, lit.data, lit.len, 0);
    free(lit.data);
    return ok;
}

static void tpl_release(Template *t)
{
    for (size_t i = 0; i < t->nsegs; i++)
        free(t->segs[i].text);
    free(t->segs);
    free(t->src);
    free(t->loc.path);
}

/* Compile every element of the array v (at path) as a template of rule and
 * append it to *arr (*n entries; xrealloc'ed, owned by the rule). An element
 * that is not a string or does not compile is a problem that names it as
 * `what` ("a template") and `noun` ("template"), and is left out. */
static void load_template_list(Loader *ld, const cJSON *v, const char *path, Rule *rule,
                               const char *what, const char *noun, Template **arr, size_t *n)
{
    size_t i = 0;

    for (const cJSON *e = v->child; e != NULL; e = e->next, i++) {
        char epath[128], err[256];
        Template t = {0};

        snprintf(epath, sizeof epath, "%s[%zu]", path, i);
        if (!expect_string_elem(ld, e, epath, what))
            continue;
        if (!tpl_compile(rule, e->valuestring, &t, err, sizeof err)) {
            ld_problem(ld, epath, "%s \"%s\" %s", noun, e->valuestring, err);
            tpl_release(&t);
            continue;
        }
        t.src = xstrdup(e->valuestring);
        loc_find(ld, epath, false, epath, &t.loc);
        *arr = xrealloc(*arr, (*n + 1) * sizeof t);
        (*arr)[(*n)++] = t;
    }
}

static void load_templates(Loader *ld, const cJSON *v, const char *path, RuleCtx *rc, int kind)
{
    Rule *rule = rc->rule;

    if (!expect_array(ld, v, path, tpl_field[kind], "[\"user:{id}\"]")) {
        rc->nactions++;
        return;
    }
    /* Every entry counts as an action, also one with a problem. */
    rc->nactions += (size_t)cJSON_GetArraySize(v);
    load_template_list(ld, v, path, rule, "a template", "template", &rule->tpl[kind],
                       &rule->ntpl[kind]);
}

static void load_keys(Loader *ld, const cJSON *v, const char *path, void *ctx)
{
    load_templates(ld, v, path, ctx, TPL_KEY);
}

static void load_patterns(Loader *ld, const cJSON *v, const char *path, void *ctx)
{
    load_templates(ld, v, path, ctx, TPL_PATTERN);
}

static void load_tags(Loader *ld, const cJSON *v, const char *path, void *ctx)
{
    load_templates(ld, v, path, ctx, TPL_TAG);
}

static void load_versions(Loader *ld, const cJSON *v, const char *path, void *ctx)
{
    load_templates(ld, v, path, ctx, TPL_VERSION);
}

/* ---- loading: the other rule fields ------------------------------------------ */

static void load_table(Loader *ld, const cJSON *v, const char *path, void *ctx)
{
    Rule *rule = ((RuleCtx *)ctx)->rule;
    const char *s, *dot;

    if (!cJSON_IsString(v)) {
        ld_problem(ld, path, "\"table\" must be a string like \"public.users\", not %s",
                   type_name(v));
        return;
    }
    s = v->valuestring;
    dot = strchr(s, '.');
    if (*s == '\0') {
        ld_problem(ld, path, "\"table\" is empty; name the table, e.g. \"public.users\"");
    } else if (dot != NULL && (dot == s || dot[1] == '\0' || strchr(dot + 1, '.') != NULL)) {
        ld_problem(ld, path,
                   "table \"%s\" is not a valid name; write \"schema.table\" or a bare "
                   "table name (meaning public.<name>)",
                   s);
    } else if (dot == NULL) {
        rule->table = xrealloc(NULL, strlen(s) + sizeof "public.");
        sprintf(rule->table, "public.%s", s);
    } else {
        rule->table = xstrdup(s);
    }
    loc_find(ld, path, false, path, &rule->table_loc);
}

static const char *const op_names[] = {"insert", "update", "delete", "truncate"};

static void load_on(Loader *ld, const cJSON *v, const char *path, void *ctx)
{
    RuleCtx *rc = ctx;
    size_t i = 0;

    rc->has_on = true;
    if (!expect_array(ld, v, path, "on", "[\"insert\", \"update\"]"))
        return;
    if (v->child == NULL)
        ld_problem(ld, path,
                   "\"on\" is empty; list at least one of insert, update, delete, "
                   "truncate, or leave \"on\" out for all four");
    for (const cJSON *e = v->child; e != NULL; e = e->next, i++) {
        char epath[128];
        size_t k;
        snprintf(epath, sizeof epath, "%s[%zu]", path, i);
        if (!expect_string_elem(ld, e, epath, "an event"))
            continue;
        for (k = 0; k < 4 && strcmp(op_names[k], e->valuestring) != 0; k++)
            ;
        if (k == 4) {
            const char *g = did_you_mean(e->valuestring, op_names, 4);
            ld_problem(ld, epath,
                       "unknown event \"%s\" in \"on\" (%s%s%sexpected insert, update, "
                       "delete or truncate)",
                       e->valuestring, g ? "did you mean \"" : "", g ? g : "", g ? "\"? " : "");
        } else if (rc->rule->on & (1u << k)) {
            ld_problem(ld, epath, "event \"%s\" is listed twice in \"on\"; keep one",
                       e->valuestring);
        } else {
            rc->rule->on |= 1u << k;
        }
    }
}

static void load_changed(Loader *ld, const cJSON *v, const char *path, void *ctx)
{
    Rule *rule = ((RuleCtx *)ctx)->rule;
    size_t i = 0;

    if (!expect_array(ld, v, path, "changed", "[\"name\", \"email\"]"))
        return;
    if (v->child == NULL)
        ld_problem(ld, path,
                   "\"changed\" is empty, so updates would never fire; list columns "
                   "or leave \"changed\" out to fire on every update");
    for (const cJSON *e = v->child; e != NULL; e = e->next, i++) {
        char epath[128];
        snprintf(epath, sizeof epath, "%s[%zu]", path, i);
        if (!expect_string_elem(ld, e, epath, "a column name in \"changed\""))
            continue;
        if (e->valuestring[0] == '\0') {
            ld_problem(ld, epath, "empty column name in \"changed\"");
            continue;
        }
        rule->changed = xrealloc(rule->changed, (rule->nchanged + 1) * sizeof *rule->changed);
        rule->changed_loc =
            xrealloc(rule->changed_loc, (rule->nchanged + 1) * sizeof *rule->changed_loc);
        rule->changed[rule->nchanged] = rule_col(rule, e->valuestring, strlen(e->valuestring));
        loc_find(ld, epath, false, epath, &rule->changed_loc[rule->nchanged++]);
    }
}

static size_t intern_channel(Rules *r, const char *name)
{
    for (size_t i = 0; i < r->nchannels; i++)
        if (strcmp(r->channels[i], name) == 0)
            return i;
    r->channels = xgrow(r->channels, &r->chancap, r->nchannels + 1, sizeof *r->channels);
    r->channels[r->nchannels] = xstrdup(name);
    return r->nchannels++;
}

static void load_publish(Loader *ld, const cJSON *v, const char *path, void *ctx)
{
    RuleCtx *rc = ctx;
    Rule *rule = rc->rule;
    size_t i = 0;

    if (!expect_array(ld, v, path, "publish", "[\"cache:invalidation\"]")) {
        rc->nactions++;
        return;
    }
    for (const cJSON *e = v->child; e != NULL; e = e->next, i++) {
        char epath[128];
        size_t ch;
        bool dup = false;

        rc->nactions++;
        snprintf(epath, sizeof epath, "%s[%zu]", path, i);
        if (!expect_string_elem(ld, e, epath, "a channel name"))
            continue;
        if (e->valuestring[0] == '\0') {
            ld_problem(ld, epath, "empty channel name in \"publish\"");
            continue;
        }
        if (strpbrk(e->valuestring, "{}") != NULL) {
            ld_problem(ld, epath,
                       "channel \"%s\" contains a placeholder or brace; channels are "
                       "plain names (the payload carries the keys)",
                       e->valuestring);
            continue;
        }
        ch = intern_channel(ld->r, e->valuestring);
        for (size_t k = 0; k < rule->nchannels; k++)
            dup = dup || rule->channels[k] == ch;
        if (dup)
            continue; /* one message per channel anyway */
        rule->channels = xrealloc(rule->channels, (rule->nchannels + 1) * sizeof ch);
        rule->channels[rule->nchannels++] = ch;
    }
}

/* ---- loading: lookups ------------------------------------------------------- */

#define LOOKUP_DEFAULT_LIMIT 10000
#define LOOKUP_MAX_LIMIT 1000000

/* The highest $N parameter the SQL text uses outside string literals,
 * quoted identifiers and comments (0 when none). */
static size_t sql_max_param(const char *sql)
{
    size_t max = 0;

    for (const char *p = sql; *p; p++) {
        if (*p == '\'' || *p == '"') {
            const char *e = strchr(p + 1, *p);
            if (e == NULL)
                break;
            p = e;
        } else if (p[0] == '-' && p[1] == '-') {
            p += strcspn(p, "\n");
            if (*p == '\0')
                break;
        } else if (p[0] == '/' && p[1] == '*') {
            const char *e = strstr(p + 2, "*/");
            if (e == NULL)
                break;
            p = e + 1;
        } else if (*p == '$' && p[1] >= '1' && p[1] <= '9' &&
                   (p == sql || !(isalnum((unsigned char)p[-1]) || p[-1] == '_'))) {
            size_t n = strtoul(p + 1, NULL, 10);
            if (n > max)
                max = n;
        }
    }
    return max;
}

static void load_lookup_sql(Loader *ld, const cJSON *v, const char *path, void *ctx)
{
    const RuleCtx *rc = ctx;
    Lookup *lk = rc->lk;
    size_t n;

    if (!cJSON_IsString(v)) {
        ld_problem(ld, path,
                   "\"sql\" must be a string like \"SELECT team_id FROM public.team_members "
                   "WHERE user_id = $1\", not %s",
                   type_name(v));
        return;
    }
    n = strlen(v->valuestring);
    while (n > 0 && strchr(" \t\r\n;", v->valuestring[n - 1]) != NULL)
        n--;
    if (n == 0) {
        ld_problem(ld, path, "\"sql\" is empty; write the query %s",
                   rc->audit ? "that gives the value the key must hold"
                             : "whose rows feed the templates");
        return;
    }
    lk->sql = xstrndup(v->valuestring, n);
    loc_find(ld, path, false, path, &lk->sql_loc);
}

static void load_lookup_args(Loader *ld, const cJSON *v, const char *path, void *ctx)
{
    Rule *rule = ((RuleCtx *)ctx)->rule;
    Lookup *lk = ((RuleCtx *)ctx)->lk;

    lk->args_written = (size_t)cJSON_GetArraySize(v);
    if (!expect_array(ld, v, path, "args", "[\"{id}\"]"))
        return;
    load_template_list(ld, v, path, rule, "an argument template", "argument template", &lk->args,
                       &lk->nargs);
}

static void load_lookup_limit(Loader *ld, const cJSON *v, const char *path, void *ctx)
{
    Lookup *lk = ((RuleCtx *)ctx)->lk;

    char got[64];

    /* The range first: casting a double outside long long's range is undefined. */
    if (!cJSON_IsNumber(v) || !(v->valuedouble >= 1 && v->valuedouble <= LOOKUP_MAX_LIMIT) ||
        v->valuedouble != (double)(long long)v->valuedouble) {
        if (cJSON_IsNumber(v))
            snprintf(got, sizeof got, "%g", v->valuedouble);
        else
            snprintf(got, sizeof got, "%s", type_name(v));
        ld_problem(ld, path,
                   "\"limit\" must be a whole number from 1 to %d (result rows before the "
                   "lookup's placeholders widen to *), not %s",
                   LOOKUP_MAX_LIMIT, got);
        return;
    }
    lk->limit = (size_t)v->valuedouble;
}

static const FieldSpec lookup_fields[] = {
    {"sql", load_lookup_sql}, {"args", load_lookup_args}, {"limit", load_lookup_limit}};

/* The SQL's highest $N against the number of "args" written. */
static void check_params(Loader *ld, const Lookup *lk, const char *path, bool has_args)
{
    size_t used = sql_max_param(lk->sql);
    char apath[160];

    snprintf(apath, sizeof apath, "%s.args", path);
    if (used != lk->args_written && (has_args || used > 0))
        ld_problem(ld, has_args ? apath : path,
                   "the %s SQL uses parameters up to $%zu but \"args\" has %zu "
                   "entr%s; give one argument template per parameter, in order",
                   lk->limit ? "lookup's" : "audit's", used, lk->args_written,
                   lk->args_written == 1 ? "y" : "ies");
}

static void load_lookup(Loader *ld, const cJSON *v, const char *path, void *ctx)
{
    Rule *rule = ((RuleCtx *)ctx)->rule;
    bool seen[3] = {false, false, false};

    if (!cJSON_IsObject(v)) {
        ld_problem(ld, path,
                   "\"lookup\" must be an object like {\"sql\": \"SELECT team_id FROM "
                   "public.team_members WHERE user_id = $1\", \"args\": [\"{id}\"]}, not %s",
                   type_name(v));
        return;
    }
    rule->lookup = xcalloc(1, sizeof *rule->lookup);
    rule->lookup->limit = LOOKUP_DEFAULT_LIMIT;
    loc_find(ld, path, false, path, &rule->lookup->loc);
    ((RuleCtx *)ctx)->lk = rule->lookup;
    load_fields(ld, v, path, "lookup", lookup_fields, 3, ctx, seen);
    if (!seen[0]) {
        ld_problem(ld, path,
                   "\"lookup\" has no \"sql\"; add the query, e.g. \"sql\": "
                   "\"SELECT team_id FROM public.team_members WHERE user_id = $1\"");
        return;
    }
    if (rule->lookup->sql != NULL)
        check_params(ld, rule->lookup, path, seen[1]);
}

/* {old.…} on insert only, {new.…} on delete only: never renders. */
static void check_image(Loader *ld, const Rule *rule, const Template *t)
{
    unsigned row = rule->on & ROW_OPS;

    if (row == 0)
        return;
    if ((t->uses & USES_OLD) && !(row & (RULES_UPDATE | RULES_DELETE)))
        ld_problem(ld, t->loc.path,
                   "template \"%s\" uses {old.…} but the rule fires only on insert, "
                   "which has no old row, so it never renders; use {column} or "
                   "{new.column}, or add \"update\"/\"delete\" to \"on\"",
                   t->src);
    if ((t->uses & USES_NEW) && !(row & (RULES_INSERT | RULES_UPDATE)))
        ld_problem(ld, t->loc.path,
                   "template \"%s\" uses {new.…} but the rule fires only on delete, "
                   "which has no new row, so it never renders; use {column} or "
                   "{old.column}",
                   t->src);
}

/* ---- loading: refresh and stale (docs/rules.md "Refresh", "Stale") ------------ */

static void load_refresh_key(Loader *ld, const cJSON *v, const char *path, void *ctx)
{
    Rule *rule = ((RuleCtx *)ctx)->rule;
    Refresh *rf = &rule->refresh[rule->nrefresh - 1];
    char err[256];

    if (!cJSON_IsString(v)) {
        ld_problem(ld, path, "\"key\" must be a template string like \"product:{id}\", not %s",
                   type_name(v));
        return;
    }
    if (!tpl_compile(rule, v->valuestring, &rf->key, err, sizeof err)) {
        ld_problem(ld, path, "template \"%s\" %s", v->valuestring, err);
        return;
    }
    rf->key.src = xstrdup(v->valuestring);
    loc_find(ld, path, false, path, &rf->key.loc);
}

static void load_refresh_value(Loader *ld, const cJSON *v, const char *path, void *ctx)
{
    (void)ctx;
    if (!cJSON_IsString(v) || strcmp(v->valuestring, "row") != 0)
        ld_problem(ld, path,
                   "\"value\" must be \"row\" (the new row, every column as PostgreSQL's "
                   "text), not %s%s%s",
                   cJSON_IsString(v) ? "\"" : "", cJSON_IsString(v) ? v->valuestring : type_name(v),
                   cJSON_IsString(v) ? "\"" : "");
}

/* A whole number of seconds from 0 (or 1) to 10 years, into *out. */
static bool load_seconds(Loader *ld, const cJSON *v, const char *path, const char *name, long min,
                         long *out)
{
    const long max = 10L * 366 * 86400;
    char got[64];

    if (cJSON_IsNumber(v) && v->valuedouble >= (double)min && v->valuedouble <= (double)max &&
        v->valuedouble == (double)(long long)v->valuedouble) {
        *out = (long)v->valuedouble;
        return true;
    }
    if (cJSON_IsNumber(v))
        snprintf(got, sizeof got, "%g", v->valuedouble);
    else
        snprintf(got, sizeof got, "%s", type_name(v));
    ld_problem(ld, path, "\"%s\" must be a whole number of seconds from %ld to %ld, not %s", name,
               min, max, got);
    return false;
}

static void load_refresh_ttl(Loader *ld, const cJSON *v, const char *path, void *ctx)
{
    Rule *rule = ((RuleCtx *)ctx)->rule;
    (void)load_seconds(ld, v, path, "ttl", 0, &rule->refresh[rule->nrefresh - 1].ttl);
}

static void load_refresh_format(Loader *ld, const cJSON *v, const char *path, void *ctx)
{
    Rule *rule = ((RuleCtx *)ctx)->rule;

    if (cJSON_IsString(v) && strcmp(v->valuestring, "json") == 0)
        rule->refresh[rule->nrefresh - 1].hash = false;
    else if (cJSON_IsString(v) && strcmp(v->valuestring, "hash") == 0)
        rule->refresh[rule->nrefresh - 1].hash = true;
    else
        ld_problem(ld, path,
                   "\"format\" must be \"json\" (one string value) or \"hash\" (a Redis hash, "
                   "one field per column), not %s%s%s",
                   cJSON_IsString(v) ? "\"" : "", cJSON_IsString(v) ? v->valuestring : type_name(v),
                   cJSON_IsString(v) ? "\"" : "");
}

static const FieldSpec refresh_fields[] = {{"key", load_refresh_key},
                                           {"value", load_refresh_value},
                                           {"ttl", load_refresh_ttl},
                                           {"format", load_refresh_format}};

static void load_refresh(Loader *ld, const cJSON *v, const char *path, void *ctx)
{
    RuleCtx *rc = ctx;
    Rule *rule = rc->rule;
    size_t i = 0;

    rc->nactions++;
    if (!cJSON_IsArray(v)) {
        ld_problem(ld, path,
                   "\"refresh\" must be an array like [{\"key\": \"product:{id}\", \"value\": "
                   "\"row\", \"ttl\": 3600}], not %s",
                   type_name(v));
        return;
    }
    for (const cJSON *e = v->child; e != NULL; e = e->next, i++) {
        bool seen[4] = {false, false, false, false};
        char epath[128];

        snprintf(epath, sizeof epath, "%s[%zu]", path, i);
        if (!cJSON_IsObject(e)) {
            ld_problem(ld, epath,
                       "a refresh entry must be an object like {\"key\": \"product:{id}\", "
                       "\"value\": \"row\"}, not %s",
                       type_name(e));
            continue;
        }
        rule->refresh = xrealloc(rule->refresh, (rule->nrefresh + 1) * sizeof *rule->refresh);
        memset(&rule->refresh[rule->nrefresh++], 0, sizeof *rule->refresh);
        load_fields(ld, e, epath, "a refresh entry", refresh_fields, 4, ctx, seen);
        if (!seen[0])
            ld_problem(ld, epath,
                       "refresh entry has no \"key\"; add e.g. \"key\": \"product:{id}\"");
        if (!seen[1])
            ld_problem(ld, epath, "refresh entry has no \"value\"; add \"value\": \"row\"");
        if (rule->refresh[rule->nrefresh - 1].key.src == NULL) {
            tpl_release(&rule->refresh[--rule->nrefresh].key);
            continue;
        }
    }
}

static void load_stale(Loader *ld, const cJSON *v, const char *path, void *ctx)
{
    RuleCtx *rc = ctx;
    Rule *rule = rc->rule;

    rc->nactions++;
    if (!expect_array(ld, v, path, "stale", "[\"product:{id}:page\"]"))
        return;
    load_template_list(ld, v, path, rule, "a template", "template", &rule->stale, &rule->nstale);
}

static void load_stale_grace(Loader *ld, const cJSON *v, const char *path, void *ctx)
{
    Rule *rule = ((RuleCtx *)ctx)->rule;

    if (load_seconds(ld, v, path, "stale_grace", 1, &rule->stale_grace))
        loc_find(ld, path, false, path, &rule->grace_loc);
}

/* What refresh and stale need from the rest of the rule. */
static void check_refresh(Loader *ld, const Rule *rule, const char *path)
{
    char p[160];

    for (size_t i = 0; i < rule->nrefresh; i++)
        check_image(ld, rule, &rule->refresh[i].key);
    for (size_t i = 0; i < rule->nstale; i++)
        check_image(ld, rule, &rule->stale[i]);
    snprintf(p, sizeof p, "%s.refresh", path);
    if (rule->nrefresh > 0 && rule->nchanged > 0)
        ld_problem(ld, p,
                   "a rule with \"refresh\" stores the whole row, so it must fire on every "
                   "update; remove \"changed\" or move \"refresh\" to a rule of its own");
    if ((rule->nrefresh > 0 || rule->nstale > 0) && rule->lookup != NULL)
        ld_problem(ld, path,
                   "a rule with a \"lookup\" cannot have \"refresh\" or \"stale\"; move them "
                   "to a rule without a lookup on %s",
                   rule->table ? rule->table : "the same table");
    if (rule->grace_loc.path != NULL && rule->nstale == 0)
        ld_problem(ld, rule->grace_loc.path,
                   "\"stale_grace\" is set but the rule has no \"stale\" keys; add "
                   "\"stale\": [\"...\"] or remove it");
}

/* Problems that need the whole rule: placeholders that can never render,
 * and what a lookup rule must (not) have. */
static void check_images(Loader *ld, const Rule *rule, const char *path, bool any_actions)
{
    size_t ntpl = 0;
    char ppath[160];

    for (int k = 0; k < TPL_NKINDS; k++) {
        ntpl += rule->ntpl[k];
        for (size_t i = 0; i < rule->ntpl[k]; i++)
            check_image(ld, rule, &rule->tpl[k][i]);
    }
    if (rule->lookup == NULL)
        return;
    for (size_t i = 0; i < rule->lookup->nargs; i++)
        check_image(ld, rule, &rule->lookup->args[i]);
    snprintf(ppath, sizeof ppath, "%s.publish", path);
    if (rule->nchannels > 0)
        ld_problem(ld, ppath,
                   "a rule with a \"lookup\" cannot publish (its keys are known only after "
                   "the lookup ran); move \"publish\" to a rule without a lookup on %s",
                   rule->table ? rule->table : "the same table");
    else if (ntpl == 0 && any_actions)
        ld_problem(ld, rule->lookup->loc.path,
                   "a rule with a \"lookup\" needs templates for its result rows; add keys, "
                   "patterns, tags or versions using the lookup's columns, e.g. "
                   "\"keys\": [\"team:{team_id}:members\"]");
}

/* ---- loading: audit (docs/audit.md) ------------------------------------------ */

static void load_audit_key(Loader *ld, const cJSON *v, const char *path, void *ctx)
{
    RuleCtx *ac = ctx;
    Audit *au = ac->au;
    char err[256];

    if (!cJSON_IsString(v)) {
        ld_problem(ld, path,
                   "\"key\" must be the template of the cached key, like \"product:{id}\", not %s",
                   type_name(v));
        return;
    }
    if (!tpl_compile(ac->rule, v->valuestring, &au->key, err, sizeof err)) {
        ld_problem(ld, path, "template \"%s\" %s", v->valuestring, err);
        tpl_release(&au->key);
        memset(&au->key, 0, sizeof au->key);
        return;
    }
    au->key.src = xstrdup(v->valuestring);
    loc_find(ld, path, false, path, &au->key.loc);
}

static void load_audit_compare(Loader *ld, const cJSON *v, const char *path, void *ctx)
{
    Audit *au = ((RuleCtx *)ctx)->au;

    if (cJSON_IsString(v) && strcmp(v->valuestring, "exact") == 0)
        au->json = false;
    else if (cJSON_IsString(v) && strcmp(v->valuestring, "json") == 0)
        au->json = true;
    else
        ld_problem(ld, path,
                   "\"compare\" must be \"exact\" (the same bytes) or \"json\" (equal JSON, key "
                   "order and whitespace ignored), not %s%s%s",
                   cJSON_IsString(v) ? "\"" : "", cJSON_IsString(v) ? v->valuestring : type_name(v),
                   cJSON_IsString(v) ? "\"" : "");
}

/* Placeholders of an audit's templates are names read back from a key:
 * plain {name}, never two without text between them in the key, and every
 * argument's name also in the key. */
static void check_audit_templates(Loader *ld, const Audit *au)
{
    const Template *key = &au->key;

    for (size_t i = 0; i <= au->q.nargs; i++) {
        const Template *t = i == 0 ? key : &au->q.args[i - 1];
        if (t->src != NULL && (t->uses & (USES_OLD | USES_NEW)))
            ld_problem(ld, t->loc.path,
                       "audit template \"%s\" uses {old.…} or {new.…}; an audit reads values "
                       "back from the stored key, so write {column}",
                       t->src);
    }
    for (size_t i = 1; key->src != NULL && i < key->nsegs; i++)
        if (key->segs[i].kind != SEG_LIT && key->segs[i - 1].kind != SEG_LIT)
            ld_problem(ld, key->loc.path,
                       "audit key \"%s\" has the placeholders {%s}{%s} with no text between "
                       "them, so a key cannot be split back into their values; put a "
                       "separator between them, e.g. {%s}:{%s}",
                       key->src, key->segs[i - 1].text, key->segs[i].text, key->segs[i - 1].text,
                       key->segs[i].text);
    for (size_t i = 0; key->src != NULL && i < au->q.nargs; i++) {
        const Template *a = &au->q.args[i];
        for (size_t k = 0; k < a->nsegs; k++) {
            bool found = false;
            if (a->segs[k].kind == SEG_LIT)
                continue;
            for (size_t j = 0; j < key->nsegs; j++)
                found = found || (key->segs[j].kind != SEG_LIT &&
                                  strcmp(key->segs[j].text, a->segs[k].text) == 0);
            if (!found)
                ld_problem(ld, a->loc.path,
                           "audit argument \"%s\" uses {%s}, which the audit key \"%s\" does "
                           "not have; an audit reads its arguments back from the key, so use "
                           "only the key's placeholders",
                           a->src, a->segs[k].text, key->src);
        }
    }
}

static const FieldSpec audit_fields[] = {{"key", load_audit_key},
                                         {"sql", load_lookup_sql},
                                         {"args", load_lookup_args},
                                         {"compare", load_audit_compare}};

static void load_audit(Loader *ld, const cJSON *v, const char *path, void *ctx)
{
    Rule *rule = ((RuleCtx *)ctx)->rule;
    Rule scope = {0}; /* collects the audit's own placeholder names */
    RuleCtx ac = {.rule = &scope, .audit = true};
    bool seen[4] = {false, false, false, false};
    Audit *au;

    if (!cJSON_IsObject(v)) {
        ld_problem(ld, path,
                   "\"audit\" must be an object like {\"key\": \"product:{id}\", \"sql\": "
                   "\"SELECT row_to_json(p)::text FROM public.products p WHERE id = $1\", "
                   "\"args\": [\"{id}\"], \"compare\": \"json\"}, not %s",
                   type_name(v));
        return;
    }
    au = rule->audit = xcalloc(1, sizeof *rule->audit);
    loc_find(ld, path, false, path, &au->q.loc);
    ac.lk = &au->q;
    ac.au = au;
    load_fields(ld, v, path, "audit", audit_fields, 4, &ac, seen);
    au->names = scope.cols;
    au->nnames = scope.ncols;
    if (!seen[0])
        ld_problem(ld, path,
                   "\"audit\" has no \"key\"; add the cached key it checks, e.g. \"key\": "
                   "\"product:{id}\"");
    if (!seen[1])
        ld_problem(ld, path,
                   "\"audit\" has no \"sql\"; add the query that gives the value the key must "
                   "hold, e.g. \"sql\": \"SELECT row_to_json(p)::text FROM public.products p "
                   "WHERE id = $1\"");
    check_audit_templates(ld, au);
    if (au->q.sql != NULL)
        check_params(ld, &au->q, path, seen[2]);
}

static const FieldSpec rule_fields[] = {
    {"table", load_table},       {"on", load_on},
    {"changed", load_changed},   {"keys", load_keys},
    {"patterns", load_patterns}, {"tags", load_tags},
    {"versions", load_versions}, {"publish", load_publish},
    {"lookup", load_lookup},     {"refresh", load_refresh},
    {"stale", load_stale},       {"stale_grace", load_stale_grace},
    {"audit", load_audit},
};
#define NRULE_FIELDS (sizeof rule_fields / sizeof rule_fields[0])

static void load_rule(Loader *ld, const cJSON *v, const char *path)
{
    Rules *r = ld->r;
    bool seen[NRULE_FIELDS] = {false};
    RuleCtx rc = {0};
    Rule *rule;

    if (!cJSON_IsObject(v)) {
        ld_problem(ld, path, "a rule must be an object with \"table\" and actions, not %s",
                   type_name(v));
        return;
    }
    r->rules = xgrow(r->rules, &r->rulecap, r->nrules + 1, sizeof *r->rules);
    rule = &r->rules[r->nrules++];
    memset(rule, 0, sizeof *rule);
    rc.rule = rule;
    loc_find(ld, path, false, path, &rule->loc);
    load_fields(ld, v, path, "rule", rule_fields, NRULE_FIELDS, &rc, seen);
    if (!rc.has_on)
        rule->on = ALL_OPS;
    if (rule->stale_grace == 0)
        rule->stale_grace = STALE_DEFAULT_GRACE;
    if (!seen[0])
        ld_problem(ld, path, "rule has no \"table\"; add e.g. \"table\": \"public.users\"");
    if (rc.nactions == 0)
        ld_problem(ld, path,
                   "rule for %s has no actions; add at least one of keys, patterns, "
                   "tags, versions, publish, refresh or stale",
                   rule->table ? rule->table : "(no table)");
    check_images(ld, rule, path, rc.nactions > 0);
    check_refresh(ld, rule, path);
}

/* ---- loading: top level --------------------------------------------------------- */

static void load_delete(Loader *ld, const cJSON *v, const char *path, void *ctx)
{
    (void)ctx;
    if (cJSON_IsString(v) && strcmp(v->valuestring, "unlink") == 0)
        ld->r->use_del = false;
    else if (cJSON_IsString(v) && strcmp(v->valuestring, "del") == 0)
        ld->r->use_del = true;
    else if (cJSON_IsString(v))
        ld_problem(ld, path, "\"delete\" must be \"unlink\" or \"del\", not \"%s\"",
                   v->valuestring);
    else
        ld_problem(ld, path, "\"delete\" must be \"unlink\" or \"del\", not %s", type_name(v));
}

static void load_tag_prefix(Loader *ld, const cJSON *v, const char *path, void *ctx)
{
    (void)ctx;
    if (!cJSON_IsString(v)) {
        ld_problem(ld, path, "\"tag_prefix\" must be a string like \"tag:\", not %s", type_name(v));
        return;
    }
    free(ld->r->tag_prefix);
    ld->r->tag_prefix = xstrdup(v->valuestring);
}

static const FieldSpec default_fields[] = {{"delete", load_delete},
                                           {"tag_prefix", load_tag_prefix}};

static void load_defaults(Loader *ld, const cJSON *v, const char *path, void *ctx)
{
    bool seen[2] = {false, false};

    (void)ctx;
    if (!cJSON_IsObject(v)) {
        ld_problem(ld, path,
                   "\"defaults\" must be an object like {\"delete\": \"unlink\", "
                   "\"tag_prefix\": \"tag:\"}, not %s",
                   type_name(v));
        return;
    }
    load_fields(ld, v, path, "defaults", default_fields, 2, NULL, seen);
}

static void load_rules(Loader *ld, const cJSON *v, const char *path, void *ctx)
{
    size_t i = 0;

    (void)ctx;
    if (!cJSON_IsArray(v)) {
        ld_problem(ld, path, "\"rules\" must be an array of rule objects, not %s", type_name(v));
        return;
    }
    if (v->child == NULL)
        ld_problem(ld, path, "\"rules\" is empty; add at least one rule");
    for (const cJSON *e = v->child; e != NULL; e = e->next, i++) {
        char epath[64];
        snprintf(epath, sizeof epath, "rules[%zu]", i);
        load_rule(ld, e, epath);
    }
}

static const FieldSpec top_fields[] = {
    {"$schema", NULL}, {"defaults", load_defaults}, {"rules", load_rules}};

static void load_top(Loader *ld, const cJSON *root)
{
    bool seen[3] = {false, false, false};

    if (!cJSON_IsObject(root)) {
        ld_problem(ld, "", "the rules file must be a JSON object like {\"rules\": [...]}, not %s",
                   type_name(root));
        return;
    }
    load_fields(ld, root, "", "the top-level object", top_fields, 3, NULL, seen);
    if (!seen[2])
        ld_problem(ld, "", "the rules file has no \"rules\"; add \"rules\": [ ... ]");
}

/* ---- loading: entry point and index ---------------------------------------------- */

static void syntax_problem(Loader *ld, size_t cjson_off)
{
    JsonPos where;
    char msg[256];
    SrcLoc loc = {0, 0, NULL};

    if (jsonpos_check(ld->text, ld->len, &where, msg, sizeof msg)) {
        /* cJSON refused what our checker accepts: report cJSON's position. */
        jsonpos_at(ld->text, ld->len, cjson_off, &where);
        snprintf(msg, sizeof msg, "the JSON parser stopped here");
    }
    loc.line = where.line;
    loc.column = where.column;
    loc.path = NULL;
    rules_problem_at(ld->problems, &loc, "invalid JSON: %s", msg);
    ld->added++;
}

static size_t table_slot(const Rules *r, const char *name)
{
    size_t mask = r->thashcap - 1;
    size_t h = (size_t)hash_bytes(name, strlen(name), HASH_SEED) & mask;

    while (r->thash[h] != 0 && strcmp(r->tables[r->thash[h] - 1].name, name) != 0)
        h = (h + 1) & mask;
    return h;
}

/* TableEnt.chcols/chmask: the distinct `changed` columns of the table's
 * rules and, per rule, the bits of those it names. Left NULL (rule by
 * rule) when no rule filters or more than CHANGED_MASK_MAX columns are
 * named. */
static void build_changed_masks(Rules *r, TableEnt *te)
{
    char *cols[CHANGED_MASK_MAX];
    uint64_t *masks = xcalloc(te->nrules, sizeof *masks);
    size_t n = 0;

    for (size_t i = 0; i < te->nrules; i++) {
        const Rule *rule = &r->rules[te->rules[i]];
        for (size_t k = 0; k < rule->nchanged; k++) {
            char *name = rule->cols[rule->changed[k]];
            size_t j = 0;
            while (j < n && strcmp(cols[j], name) != 0)
                j++;
            if (j == n && n == CHANGED_MASK_MAX) {
                free(masks);
                return; /* too many columns: filters run rule by rule */
            }
            if (j == n)
                cols[n++] = name;
            masks[i] |= UINT64_C(1) << j;
        }
    }
    if (n == 0) {
        free(masks);
        return;
    }
    te->chcols = xcalloc(n, sizeof *te->chcols);
    memcpy(te->chcols, cols, n * sizeof *cols);
    te->nchcols = n;
    te->chmask = masks;
    te->nwords = (te->nrules + 63) / 64;
    te->unfiltered = xcalloc(te->nwords, sizeof *te->unfiltered);
    te->colrules = xcalloc(n * te->nwords, sizeof *te->colrules);
    for (size_t i = 0; i < te->nrules; i++) {
        uint64_t bit = UINT64_C(1) << (i % 64);
        if (masks[i] == 0)
            te->unfiltered[i / 64] |= bit;
        for (size_t j = 0; j < n; j++)
            if (masks[i] & (UINT64_C(1) << j))
                te->colrules[j * te->nwords + i / 64] |= bit;
    }
    te->chcache = xcalloc(1, sizeof *te->chcache);
    te->chcache->idx = xcalloc(n, sizeof *te->chcache->idx);
}

static void build_index(Rules *r)
{
    size_t maxwords = 1; /* the candidates' scratch (rules_eval), in words */

    r->thashcap = 16;
    while (r->thashcap < r->nrules * 2)
        r->thashcap *= 2;
    r->thash = xcalloc(r->thashcap, sizeof *r->thash);
    for (size_t i = 0; i < r->nrules; i++) {
        Rule *rule = &r->rules[i];
        size_t h = table_slot(r, rule->table);
        TableEnt *te;
        if (r->thash[h] == 0) {
            r->tables = xgrow(r->tables, &r->tablecap, r->ntables + 1, sizeof *r->tables);
            r->tables[r->ntables] = (TableEnt){.name = xstrdup(rule->table)};
            r->thash[h] = ++r->ntables;
        }
        te = &r->tables[r->thash[h] - 1];
        te->rules = xrealloc(te->rules, (te->nrules + 1) * sizeof *te->rules);
        te->ons = xrealloc(te->ons, (te->nrules + 1) * sizeof *te->ons);
        te->ons[te->nrules] =
            (unsigned char)((rule->on & 0x0fu) | (rule->lookup != NULL ? TABLE_ON_LOOKUP : 0u) |
                            (rule->nchanged > 0 ? TABLE_ON_FILTER : 0u));
        te->rules[te->nrules++] = i;
        rule->cache = xcalloc(1, sizeof *rule->cache);
        rule->cache->idx = xcalloc(rule->ncols, sizeof *rule->cache->idx);
    }
    for (size_t t = 0; t < r->ntables; t++) {
        build_changed_masks(r, &r->tables[t]);
        if (r->tables[t].nwords > maxwords)
            maxwords = r->tables[t].nwords;
    }
    r->scratch = xcalloc(1, sizeof *r->scratch);
    r->scratch->cand = xcalloc(maxwords, sizeof *r->scratch->cand);
    r->scratch->fired = xcalloc(r->nrules, sizeof *r->scratch->fired);
    r->scratch->chans = xcalloc(r->nchannels, sizeof *r->scratch->chans);
}

Rules *rules_parse(const char *json, size_t len, RulesProblems *problems)
{
    Loader ld = {.len = len, .problems = problems};
    const char *end = NULL;
    const char *nul = memchr(json, '\0', len);
    char *copy;
    cJSON *root;

    copy = xstrndup(json, len); /* cJSON wants the terminating NUL in range */
    ld.text = copy;
    jsonpos_finder_init(&ld.finder, copy, len);
    if (nul != NULL) {
        JsonPos at;
        jsonpos_at(json, len, (size_t)(nul - json), &at);
        rules_problem_at(problems, &(SrcLoc){at.line, at.column, NULL},
                         "the file contains a NUL byte; a rules file is UTF-8 JSON text");
        free(copy);
        return NULL;
    }
    root = cJSON_ParseWithLengthOpts(copy, len + 1, &end, 1);
    ld.r = xcalloc(1, sizeof *ld.r);
    ld.r->tag_prefix = xstrdup("tag:");
    if (root == NULL)
        syntax_problem(&ld, end ? (size_t)(end - copy) : 0);
    else
        load_top(&ld, root);
    cJSON_Delete(root);
    free(copy);
    if (ld.added > 0) {
        rules_free(ld.r);
        return NULL;
    }
    build_index(ld.r);
    return ld.r;
}

static void lookup_release(Lookup *lk)
{
    for (size_t i = 0; i < lk->nargs; i++)
        tpl_release(&lk->args[i]);
    free(lk->args);
    free(lk->sql);
    free(lk->loc.path);
    free(lk->sql_loc.path);
}

static void audit_release(Audit *au)
{
    if (au == NULL)
        return;
    tpl_release(&au->key);
    lookup_release(&au->q);
    for (size_t i = 0; i < au->nnames; i++)
        free(au->names[i]);
    free(au->names);
    free(au);
}

static void rule_release(Rule *rule)
{
    for (int k = 0; k < TPL_NKINDS; k++) {
        for (size_t i = 0; i < rule->ntpl[k]; i++)
            tpl_release(&rule->tpl[k][i]);
        free(rule->tpl[k]);
    }
    for (size_t i = 0; i < rule->ncols; i++)
        free(rule->cols[i]);
    for (size_t i = 0; i < rule->nchanged; i++)
        free(rule->changed_loc[i].path);
    if (rule->lookup != NULL) {
        lookup_release(rule->lookup);
        free(rule->lookup);
    }
    for (size_t i = 0; i < rule->nrefresh; i++)
        tpl_release(&rule->refresh[i].key);
    free(rule->refresh);
    for (size_t i = 0; i < rule->nstale; i++)
        tpl_release(&rule->stale[i]);
    free(rule->stale);
    free(rule->grace_loc.path);
    audit_release(rule->audit);
    if (rule->cache != NULL)
        free(rule->cache->idx);
    free(rule->cache);
    free(rule->cols);
    free(rule->changed);
    free(rule->changed_loc);
    free(rule->channels);
    free(rule->table);
    free(rule->loc.path);
    free(rule->table_loc.path);
}

void rules_free(Rules *r)
{
    if (r == NULL)
        return;
    for (size_t i = 0; i < r->nrules; i++)
        rule_release(&r->rules[i]);
    for (size_t i = 0; i < r->ntables; i++) {
        free(r->tables[i].name);
        free(r->tables[i].rules);
        free(r->tables[i].ons);
        free(r->tables[i].chcols);
        free(r->tables[i].chmask);
        free(r->tables[i].unfiltered);
        free(r->tables[i].colrules);
        if (r->tables[i].chcache != NULL)
            free(r->tables[i].chcache->idx);
        free(r->tables[i].chcache);
    }
    for (size_t i = 0; i < r->nchannels; i++)
        free(r->channels[i]);
    if (r->scratch != NULL) {
        free(r->scratch->strs.data);
        free(r->scratch->items);
        free(r->scratch->set);
        free(r->scratch->fired);
        free(r->scratch->cand);
        free(r->scratch->chans);
        free(r->scratch->payload.data);
        free(r->scratch);
    }
    free(r->rules);
    free(r->tables);
    free(r->thash);
    free(r->channels);
    free(r->tag_prefix);
    free(r);
}

/* ---- accessors ------------------------------------------------------------------ */

const TableEnt *rules_table_find(const Rules *r, const char *table)
{
    size_t h;

    if (r == NULL || table == NULL || r->thash == NULL)
        return NULL;
    h = table_slot(r, table);
    return r->thash[h] ? &r->tables[r->thash[h] - 1] : NULL;
}

bool rules_has_table(const Rules *r, const char *table)
{
    return rules_table_find(r, table) != NULL;
}

size_t rules_table_count(const Rules *r)
{
    return r ? r->ntables : 0;
}

const char *rules_table(const Rules *r, size_t i)
{
    return r && i < r->ntables ? r->tables[i].name : NULL;
}

bool rules_use_del(const Rules *r)
{
    return r && r->use_del;
}

const char *rules_tag_prefix(const Rules *r)
{
    return r ? r->tag_prefix : "tag:";
}

size_t rules_rule_count(const Rules *r)
{
    return r ? r->nrules : 0;
}

bool rules_lookup_info(const Rules *r, size_t i, RulesLookupInfo *out)
{
    const Lookup *lk;

    if (r == NULL || i >= r->nrules || r->rules[i].lookup == NULL)
        return false;
    lk = r->rules[i].lookup;
    *out = (RulesLookupInfo){r->rules[i].table, lk->sql,      lk->nargs,
                             lk->limit,         lk->loc.line, lk->loc.column};
    return true;
}

bool rules_has_lookups(const Rules *r)
{
    for (size_t i = 0; r != NULL && i < r->nrules; i++)
        if (r->rules[i].lookup != NULL)
            return true;
    return false;
}
