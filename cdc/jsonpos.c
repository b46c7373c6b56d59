/*
 * jsonpos.c — line/column lookups and syntax diagnosis over raw JSON text
 * (see jsonpos.h).
 *
 * Everything here walks the text directly with a cursor; nothing is
 * allocated. Lookups skip over values they do not descend into with an
 * iterative bracket counter, so deeply nested input cannot exhaust the
 * stack; the syntax checker recurses but stops at JSONPOS_MAX_DEPTH.
 */
#include "jsonpos.h"

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#define NAME_MAX_BYTES 256
#define NOT_FOUND SIZE_MAX

void jsonpos_at(const char *text, size_t len, size_t offset, JsonPos *out)
{
    int line = 1, column = 1;

    if (offset > len)
        offset = len;
    for (size_t i = 0; i < offset; i++) {
        unsigned char c = (unsigned char)text[i];
        if (c == '\n') {
            line++;
            column = 1;
        } else if ((c & 0xC0) != 0x80) {
            /* UTF-8 continuation bytes belong to the previous column. */
            column++;
        }
    }
    out->offset = offset;
    out->line = line;
    out->column = column;
}

static bool is_ws(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

static size_t skip_ws(const char *t, size_t len, size_t p)
{
    while (p < len && is_ws(t[p]))
        p++;
    return p;
}

/* p is at an opening quote; returns the offset after the closing quote, or
 * NOT_FOUND when the string never ends. */
static size_t scan_string(const char *t, size_t len, size_t p)
{
    for (p++; p < len; p++) {
        if (t[p] == '\\')
            p++;
        else if (t[p] == '"')
            return p + 1;
    }
    return NOT_FOUND;
}

/* p is at the first character of a value; returns the offset just after it
 * or NOT_FOUND. Containers are skipped by counting brackets, not recursing. */
static size_t skip_value(const char *t, size_t len, size_t p)
{
    size_t depth = 0;

    if (p >= len)
        return NOT_FOUND;
    do {
        if (p >= len)
            return NOT_FOUND;
        char c = t[p];
        if (c == '"') {
            p = scan_string(t, len, p);
            if (p == NOT_FOUND)
                return NOT_FOUND;
            continue;
        }
        if (c == '{' || c == '[')
            depth++;
        else if (c == '}' || c == ']') {
            if (depth == 0)
                return NOT_FOUND;
            depth--;
        } else if (depth == 0) {
            /* A scalar at top level: number or literal. */
            while (p < len && !is_ws(t[p]) && strchr(",]}:", t[p]) == NULL)
                p++;
            return p;
        }
        p++;
    } while (depth > 0);
    return p;
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

static bool read_u16(const char *s, size_t n, size_t i, unsigned *out)
{
    unsigned v = 0;

    if (i + 4 > n)
        return false;
    for (size_t k = 0; k < 4; k++) {
        int h = hexval(s[i + k]);
        if (h < 0)
            return false;
        v = v * 16 + (unsigned)h;
    }
    *out = v;
    return true;
}

static size_t put_utf8(unsigned cp, char *o)
{
    if (cp < 0x80) {
        o[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        o[0] = (char)(0xC0 | (cp >> 6));
        o[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        o[0] = (char)(0xE0 | (cp >> 12));
        o[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        o[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    o[0] = (char)(0xF0 | (cp >> 18));
    o[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    o[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    o[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* Decode one escape at s[i] (just after the backslash) into o. Returns the
 * bytes written and advances *i past the escape; 0 on a bad escape. */
static size_t unescape_one(const char *s, size_t n, size_t *i, char *o)
{
    static const char from[] = "\"\\/bfnrt", to[] = "\"\\/\b\f\n\r\t";
    const char *hit;
    unsigned cp, lo;

    if (*i >= n)
        return 0;
    if (s[*i] != 'u') {
        hit = strchr(from, s[*i]);
        if (hit == NULL || s[*i] == '\0')
            return 0;
        o[0] = to[hit - from];
        (*i)++;
        return 1;
    }
    if (!read_u16(s, n, *i + 1, &cp))
        return 0;
    *i += 5;
    if (cp >= 0xD800 && cp < 0xDC00 && *i + 1 < n && s[*i] == '\\' && s[*i + 1] == 'u' &&
        read_u16(s, n, *i + 2, &lo) && lo >= 0xDC00 && lo < 0xE000) {
        cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
        *i += 6;
    }
    return put_utf8(cp, o);
}

/* Decode the JSON string body s[0..n) into out (cap bytes). Returns the
 * decoded length, or NOT_FOUND when it does not fit or is malformed. */
static size_t unescape(const char *s, size_t n, char *out, size_t cap)
{
    size_t o = 0;
    char tmp[4];

    for (size_t i = 0; i < n;) {
        size_t w;
        if (s[i] != '\\') {
            tmp[0] = s[i++];
            w = 1;
        } else {
            i++;
            w = unescape_one(s, n, &i, tmp);
            if (w == 0)
                return NOT_FOUND;
        }
        if (o + w > cap)
            return NOT_FOUND;
        memcpy(out + o, tmp, w);
        o += w;
    }
    return o;
}

/* One step of a path. */
typedef struct Step {
    bool is_index;
    size_t index;
    size_t name_len;
    char name[NAME_MAX_BYTES];
} Step;

/* Parse the step at path[*i]; false on malformed paths. */
static bool next_step(const char *path, size_t *i, Step *st)
{
    size_t n = strlen(path), start;

    if (path[*i] == '.')
        (*i)++;
    if (path[*i] == '[' && path[*i + 1] == '"') {
        start = *i + 2;
        size_t end = scan_string(path, n, *i + 1);
        if (end == NOT_FOUND || end >= n || path[end] != ']')
            return false;
        st->is_index = false;
        st->name_len = unescape(path + start, end - 1 - start, st->name, sizeof st->name);
        *i = end + 1;
        return st->name_len != NOT_FOUND;
    }
    if (path[*i] == '[') {
        size_t v = 0, k = *i + 1;
        if (path[k] < '0' || path[k] > '9')
            return false;
        for (; path[k] >= '0' && path[k] <= '9'; k++)
            v = v * 10 + (size_t)(path[k] - '0');
        if (path[k] != ']')
            return false;
        st->is_index = true;
        st->index = v;
        *i = k + 1;
        return true;
    }
    start = *i;
    while (path[*i] != '\0' && path[*i] != '.' && path[*i] != '[')
        (*i)++;
    st->is_index = false;
    st->name_len = *i - start;
    if (st->name_len == 0 || st->name_len > sizeof st->name)
        return false;
    memcpy(st->name, path + start, st->name_len);
    return true;
}

static bool key_matches(const char *t, size_t kstart, size_t kend, const Step *st)
{
    char buf[NAME_MAX_BYTES];
    /* kstart is the opening quote, kend is just past the closing one. */
    size_t n = unescape(t + kstart + 1, kend - kstart - 2, buf, sizeof buf);
    return n == st->name_len && memcmp(buf, st->name, n) == 0;
}

/* Where a step landed: the member's first character (its key for an
 * object, the element for an array), its position among the container's
 * members, its key (NOT_FOUND for an element) and its value. */
typedef struct Hit {
    size_t member, index, key, value;
} Hit;

/* Look for st among the members of the container at c, starting with the
 * member that begins at q and is number i (q = the first member, i = 0 for
 * a full scan). Returns true with *h filled. */
static bool descend_from(const char *t, size_t len, size_t c, size_t q, size_t i, const Step *st,
                         Hit *h)
{
    bool obj = t[c] == '{';

    if (!obj && (t[c] != '[' || !st->is_index))
        return false;
    for (; q < len && t[q] != '}' && t[q] != ']'; i++) {
        size_t k = NOT_FOUND, member = q;
        bool hit = st->is_index && st->index == i;
        if (obj) {
            if (t[q] != '"')
                return false;
            k = q;
            q = scan_string(t, len, q);
            if (q == NOT_FOUND)
                return false;
            hit = hit || (!st->is_index && key_matches(t, k, q, st));
            q = skip_ws(t, len, q);
            if (q >= len || t[q] != ':')
                return false;
            q = skip_ws(t, len, q + 1);
        }
        if (hit) {
            *h = (Hit){member, i, k, q};
            return q < len;
        }
        q = skip_value(t, len, q);
        if (q == NOT_FOUND)
            return false;
        q = skip_ws(t, len, q);
        if (q < len && t[q] == ',')
            q = skip_ws(t, len, q + 1);
    }
    return false;
}

/* Descend one step from the container at *p. On success *p is the member's
 * value and *key its key (or the element, with *key = NOT_FOUND). */
static bool descend(const char *t, size_t len, size_t *p, const Step *st, size_t *key)
{
    Hit h;

    if (!descend_from(t, len, *p, skip_ws(t, len, *p + 1), 0, st, &h))
        return false;
    *p = h.value;
    *key = h.key;
    return true;
}

static bool find(const char *text, size_t len, const char *path, bool want_key, JsonPos *out)
{
    size_t p = skip_ws(text, len, 0), key = NOT_FOUND, i = 0;
    Step st;

    if (path == NULL || p >= len)
        return false;
    while (path[i] != '\0') {
        if (!next_step(path, &i, &st) || !descend(text, len, &p, &st, &key))
            return false;
    }
    if (want_key && key == NOT_FOUND)
        return false;
    jsonpos_at(text, len, want_key ? key : p, out);
    return true;
}

bool jsonpos_find(const char *text, size_t len, const char *path, JsonPos *out)
{
    return find(text, len, path, false, out);
}

bool jsonpos_find_key(const char *text, size_t len, const char *path, JsonPos *out)
{
    return find(text, len, path, true, out);
}

/* ---- lookups in document order ------------------------------------------ */

void jsonpos_finder_init(JsonFinder *f, const char *text, size_t len)
{
    memset(f, 0, sizeof *f);
    f->text = text;
    f->len = len;
    f->at_line = f->at_column = 1;
}

/* jsonpos_at(), counting on from the finder's last position when offset
 * lies after it. */
static void finder_at(JsonFinder *f, size_t offset, JsonPos *out)
{
    JsonPos d;

    if (offset > f->len)
        offset = f->len;
    if (offset < f->at_offset) {
        f->at_offset = 0;
        f->at_line = f->at_column = 1;
    }
    jsonpos_at(f->text + f->at_offset, offset - f->at_offset, offset - f->at_offset, &d);
    f->at_column = d.line == 1 ? f->at_column + d.column - 1 : d.column;
    f->at_line += d.line - 1;
    f->at_offset = offset;
    *out = (JsonPos){offset, f->at_line, f->at_column};
}

/* Is step j of path (ending at path[end]) the same text as the cached one? */
static bool same_step(const JsonFinder *f, const char *path, size_t j, size_t end)
{
    size_t start = j == 0 ? 0 : f->steps[j - 1].end;

    return j < f->nsteps && f->steps[j].end == end &&
           memcmp(f->path + start, path + start, end - start) == 0;
}

/* Keep the first n steps of path as the cached ones. */
static void finder_keep(JsonFinder *f, const char *path, size_t n)
{
    f->nsteps = n;
    memcpy(f->path, path, n > 0 ? f->steps[n - 1].end : 0);
}

bool jsonpos_finder_find(JsonFinder *f, const char *path, bool want_key, JsonPos *out)
{
    const char *t = f->text;
    size_t len = f->len, p = skip_ws(t, len, 0), key = NOT_FOUND, i = 0, j = 0;
    bool reuse = true; /* every step so far is the cached one */
    Step st;

    if (path == NULL)
        return false;
    if (strlen(path) >= sizeof f->path)
        return find(t, len, path, want_key, out);
    if (p >= len)
        return false;
    for (; path[i] != '\0'; j++) {
        JsonFinderStep *c;
        Hit h;
        if (j >= JSONPOS_FINDER_DEPTH) {
            finder_keep(f, path, j);
            return find(t, len, path, want_key, out);
        }
        if (!next_step(path, &i, &st)) {
            finder_keep(f, path, j);
            return false;
        }
        c = &f->steps[j];
        if (reuse && same_step(f, path, j, i)) {
            h = (Hit){c->member, c->index, c->key, c->value};
        } else {
            /* An index at or after the cached one in the same container:
             * go on from the cached member instead of the first. */
            bool resume = reuse && j < f->nsteps && st.is_index && c->is_index &&
                          st.index >= c->index && c->container == p;
            if (!(resume ? descend_from(t, len, p, c->member, c->index, &st, &h)
                         : descend_from(t, len, p, skip_ws(t, len, p + 1), 0, &st, &h))) {
                finder_keep(f, path, j);
                return false;
            }
            reuse = false;
            *c = (JsonFinderStep){i, p, h.member, h.index, h.key, h.value, st.is_index};
        }
        p = h.value;
        key = h.key;
    }
    finder_keep(f, path, j);
    if (want_key && key == NOT_FOUND)
        return false;
    finder_at(f, want_key ? key : p, out);
    return true;
}

/* ---- syntax checking ---------------------------------------------------- */

typedef struct Checker {
    const char *t;
    size_t len;
    size_t p;
    size_t err_at;
    char *msg;
    size_t msgsize;
} Checker;

__attribute__((format(printf, 3, 4))) static bool fail_at(Checker *c, size_t at, const char *fmt,
                                                          ...)
{
    va_list ap;

    c->err_at = at;
    va_start(ap, fmt);
    vsnprintf(c->msg, c->msgsize, fmt, ap);
    va_end(ap);
    return false;
}

/* Explain an unexpected character where a value (or key) should start. */
static bool fail_unexpected(Checker *c, const char *expected)
{
    size_t p = c->p;
    char ch;

    if (p >= c->len)
        return fail_at(c, p, "unexpected end of file; expected %s", expected);
    ch = c->t[p];
    if (ch == '\'')
        return fail_at(c, p, "strings and keys need double quotes (\"), not single quotes");
    if (ch == '/' && p + 1 < c->len && (c->t[p + 1] == '/' || c->t[p + 1] == '*'))
        return fail_at(c, p, "comments are not allowed in JSON; remove them");
    if ((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || ch == '_')
        return fail_at(c, p, "unexpected word; expected %s (text must be in double quotes)",
                       expected);
    if ((unsigned char)ch < 0x20 || (unsigned char)ch >= 0x7F)
        return fail_at(c, p, "unexpected byte 0x%02X; expected %s", (unsigned char)ch, expected);
    return fail_at(c, p, "unexpected '%c'; expected %s", ch, expected);
}

static bool check_value(Checker *c, int depth);

static bool check_string(Checker *c)
{
    size_t open = c->p;

    for (c->p++; c->p < c->len; c->p++) {
        char ch = c->t[c->p];
        if (ch == '"') {
            c->p++;
            return true;
        }
        if (ch == '\\') {
            size_t i = c->p + 1;
            char tmp[4];
            if (unescape_one(c->t, c->len, &i, tmp) == 0)
                return fail_at(c, c->p,
                               "invalid escape in string; use \\\", \\\\, \\/, \\b, \\f, "
                               "\\n, \\r, \\t or \\uXXXX");
            c->p = i - 1;
        }
    }
    return fail_at(c, open, "this string is never closed; add the missing \"");
}

static bool check_number(Checker *c)
{
    size_t start = c->p, digits = 0;
    const char *t = c->t;

    if (t[c->p] == '-')
        c->p++;
    for (; c->p < c->len && t[c->p] >= '0' && t[c->p] <= '9'; c->p++)
        digits++;
    if (c->p < c->len && t[c->p] == '.')
        for (c->p++; c->p < c->len && t[c->p] >= '0' && t[c->p] <= '9'; c->p++)
            digits++;
    if (digits == 0)
        return fail_at(c, start, "malformed number");
    if (c->p < c->len && (t[c->p] == 'e' || t[c->p] == 'E')) {
        size_t e = c->p++;
        if (c->p < c->len && (t[c->p] == '+' || t[c->p] == '-'))
            c->p++;
        if (c->p >= c->len || t[c->p] < '0' || t[c->p] > '9')
            return fail_at(c, e, "malformed number exponent");
        while (c->p < c->len && t[c->p] >= '0' && t[c->p] <= '9')
            c->p++;
    }
    return true;
}

static bool check_literal(Checker *c)
{
    static const char *const words[] = {"true", "false", "null"};

    for (size_t i = 0; i < 3; i++) {
        size_t n = strlen(words[i]);
        if (c->len - c->p >= n && memcmp(c->t + c->p, words[i], n) == 0) {
            c->p += n;
            return true;
        }
    }
    return fail_unexpected(c, "a value (string, number, object, array, true, false or null)");
}

/* After an element or member: ',' or the closer. *done is set at the closer. */
static bool check_separator(Checker *c, char closer, size_t open, bool *done)
{
    const char *what = closer == '}' ? "object" : "array";

    c->p = skip_ws(c->t, c->len, c->p);
    if (c->p >= c->len)
        return fail_at(c, open, "this %s is never closed; add the missing '%c'", what, closer);
    if (c->t[c->p] == closer) {
        c->p++;
        *done = true;
        return true;
    }
    if (c->t[c->p] != ',')
        return fail_at(c, c->p, "expected ',' or '%c' after the %s (missing comma?)", closer,
                       closer == '}' ? "member's value" : "element");
    size_t comma = c->p;
    c->p = skip_ws(c->t, c->len, c->p + 1);
    if (c->p < c->len && (c->t[c->p] == '}' || c->t[c->p] == ']'))
        return fail_at(c, comma, "trailing comma before '%c'; JSON allows none, remove it",
                       c->t[c->p]);
    return true;
}

static bool check_object(Checker *c, int depth)
{
    size_t open = c->p;
    bool done = false;

    c->p = skip_ws(c->t, c->len, c->p + 1);
    if (c->p < c->len && c->t[c->p] == '}') {
        c->p++;
        return true;
    }
    while (!done) {
        c->p = skip_ws(c->t, c->len, c->p);
        if (c->p >= c->len)
            return fail_at(c, open, "this object is never closed; add the missing '}'");
        if (c->t[c->p] != '"')
            return fail_unexpected(c, "a member name in double quotes");
        if (!check_string(c))
            return false;
        c->p = skip_ws(c->t, c->len, c->p);
        if (c->p >= c->len || c->t[c->p] != ':')
            return fail_at(c, c->p, "expected ':' after the member name");
        c->p = skip_ws(c->t, c->len, c->p + 1);
        if (!check_value(c, depth + 1) || !check_separator(c, '}', open, &done))
            return false;
    }
    return true;
}

static bool check_array(Checker *c, int depth)
{
    size_t open = c->p;
    bool done = false;

    c->p = skip_ws(c->t, c->len, c->p + 1);
    if (c->p < c->len && c->t[c->p] == ']') {
        c->p++;
        return true;
    }
    while (!done) {
        c->p = skip_ws(c->t, c->len, c->p);
        if (c->p >= c->len)
            return fail_at(c, open, "this array is never closed; add the missing ']'");
        if (!check_value(c, depth + 1) || !check_separator(c, ']', open, &done))
            return false;
    }
    return true;
}

static bool check_value(Checker *c, int depth)
{
    const char *expected = "a value (string, number, object, array, true, false or null)";

    if (depth > JSONPOS_MAX_DEPTH)
        return fail_at(c, c->p, "nesting deeper than %d levels", JSONPOS_MAX_DEPTH);
    if (c->p >= c->len)
        return fail_unexpected(c, expected);
    switch (c->t[c->p]) {
    case '{':
        return check_object(c, depth);
    case '[':
        return check_array(c, depth);
    case '"':
        return check_string(c);
    case 't':
    case 'f':
    case 'n':
        return check_literal(c);
    default:
        if (c->t[c->p] == '-' || (c->t[c->p] >= '0' && c->t[c->p] <= '9'))
            return check_number(c);
        return fail_unexpected(c, expected);
    }
}

bool jsonpos_check(const char *text, size_t len, JsonPos *where, char *msg, size_t msgsize)
{
    Checker c = {.t = text, .len = len, .msg = msg, .msgsize = msgsize};
    bool ok;

    if (msgsize > 0)
        msg[0] = '\0';
    c.p = skip_ws(text, len, 0);
    if (c.p >= len)
        ok = fail_at(&c, c.p, "the file is empty; expected a JSON object");
    else if ((ok = check_value(&c, 1))) {
        c.p = skip_ws(text, len, c.p);
        if (c.p < len)
            ok = fail_at(&c, c.p, "unexpected text after the end of the JSON value");
    }
    if (!ok)
        jsonpos_at(text, len, c.err_at, where);
    return ok;
}
